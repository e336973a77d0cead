"""Host-side image preparation for the vision input branches (numpy + pillow, no torch).

Both the runtime and the torch reference pipeline call these functions, so the two see identical graph inputs.
The steps follow the ILLUME+ release:

1. `load_image`: decode to uint8 RGB [H, W, 3].
2. Editing only: `letterbox_to_anchor` (PIL Lanczos resize into the anchor of the nearest aspect ratio, white
   bars), later undone on the output by `unletterbox`.
3. `preprocess_image`: `smart_resize` to multiples of 16 within [min_pixels, max_pixels] with PIL bicubic on
   uint8 (the release's MoVQImageProcessor), then scale to [-1, 1] (mean = std = 0.5): "image_m11" [3, H, W].
4. `pixel_inputs` (CNN branch): the normalised image as [1, 3, H, W].
   `vit_inputs` (ViT branch): the release's ScalingLayerForQwen2ViT on the host - bicubic+antialias resize to a
   multiple of 28 (`resize_bicubic_antialias`, torch's kernel), clamp, CLIP mean/std, the frame repeated
   temporal_patch_size times, patches in merge-window order - plus Qwen2-VL's 2-D rotary cos/sin tables.
"""
from __future__ import annotations

import functools
import io
import math
import os
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

from illume_edge.config import CNNEncoderConfig, ModelConfig, ViTEncoderConfig

# Largest decoded image accepted by default (pixels); callers pass their own bound to `load_image`.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
# Keys' cubic-convolution parameter: torch's antialiased bicubic (like PIL) uses -0.5, plain bicubic -0.75.
CUBIC_A_ANTIALIAS = -0.5
CUBIC_A_PLAIN = -0.75
CUBIC_SUPPORT = 2.0  # the cubic kernel is non-zero on (-2, 2) input pixels
WHITE = (255, 255, 255)  # letterbox fill, as the release's resize_with_padding


class ImageLoadError(ValueError):
    """An input image cannot be decoded or is outside the accepted size."""


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------
def load_image(src: bytes | bytearray | memoryview | str | os.PathLike | Image.Image,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image (encoded bytes, a file path or a PIL image) to uint8 RGB [H, W, 3].

    Raises ImageLoadError (a ValueError) for undecodable or truncated data, a missing file, a zero-size image
    or one with more than `max_pixels` pixels (checked from the header, before decoding the pixels).
    """
    if isinstance(src, Image.Image):
        what, img = f"PIL image ({src.mode})", src
    elif isinstance(src, (bytes, bytearray, memoryview)):
        what = f"image bytes ({len(src)} bytes)"
        img = _open(io.BytesIO(bytes(src)), what)
    elif isinstance(src, (str, os.PathLike)):
        what = f"image file {os.fspath(src)!r}"
        if not os.path.isfile(src):
            raise ImageLoadError(f"{what}: no such file")
        img = _open(src, what)
    else:
        raise ImageLoadError(f"load_image: expected bytes, a path or a PIL.Image, got {type(src).__name__}")
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{what}: image has zero size ({width}x{height} WxH)")
    if width * height > max_pixels:
        raise ImageLoadError(f"{what}: {width}x{height} (WxH) = {width * height} pixels exceeds the limit "
                             f"{max_pixels}; downscale it or raise max_pixels")
    try:
        rgb = img.convert("RGB")  # decodes the pixel data; P/L/LA/RGBA/CMYK -> RGB
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"{what}: cannot decode pixel data ({e})") from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def _open(fp, what: str) -> Image.Image:
    try:
        return Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{what}: too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"{what}: not a readable image ({e})") from None


def _check_uint8_hwc(img: np.ndarray, where: str) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"{where}: expected a uint8 RGB array [H, W, 3] (from load_image), got {got}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"{where}: image has zero size {img.shape[:2]}")


def _check_m11(image_m11: np.ndarray, where: str) -> None:
    if not isinstance(image_m11, np.ndarray) or image_m11.ndim != 3 or image_m11.shape[0] != 3:
        got = image_m11.shape if isinstance(image_m11, np.ndarray) else type(image_m11).__name__
        raise ValueError(f"{where}: expected an image [3, H, W] in [-1, 1] (from preprocess_image), got {got}")
    if not np.issubdtype(image_m11.dtype, np.floating):
        raise ValueError(f"{where}: expected a float image in [-1, 1], got dtype {image_m11.dtype}; convert uint8 "
                         f"images with preprocess_image")
    if not np.isfinite(image_m11).all():
        raise ValueError(f"{where}: image contains NaN or inf")


# ----------------------------------------------------------------------------------------------------
# Resizing
# ----------------------------------------------------------------------------------------------------
def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a at x, in float32 arithmetic (as torch's CPU kernels)."""
    f32 = np.float32
    x = np.abs(np.asarray(x, dtype=f32))
    a = f32(a)
    near = ((a + f32(2.0)) * x - (a + f32(3.0))) * x * x + f32(1.0)
    far = ((a * x - f32(5.0) * a) * x + f32(8.0) * a) * x - f32(4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, f32(0.0))).astype(f32)


@functools.lru_cache(maxsize=64)  # pure in (in_size, out_size); rebuilt per image otherwise
def _antialias_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's separable bicubic+antialias (align_corners=False) along one axis.

    Same construction as torch (and PIL): the kernel is stretched by the scale when downsampling, each output
    pixel's taps cover [center - support, center + support) clipped to the image, and weights are normalised.
    Index and weight arithmetic is float32 like torch's CPU kernel, so weights agree to the last bit or so.
    """
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    support = f32(CUBIC_SUPPORT * float(scale)) if scale >= 1.0 else f32(CUBIC_SUPPORT)
    invscale = f32(1.0 / float(scale)) if scale >= 1.0 else f32(1.0)
    m = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = f32(float(scale) * (i + 0.5))
        lo = max(int(float(f32(center - support)) + 0.5), 0)
        hi = min(int(float(f32(center + support)) + 0.5), in_size)
        taps = np.arange(lo, hi)
        w = _cubic(((taps.astype(f32) - center).astype(np.float64) + 0.5) * float(invscale), CUBIC_A_ANTIALIAS)
        total = f32(0.0)
        for v in w:  # sequential float32 sum, as torch
            total = f32(total + v)
        m[i, lo:hi] = w / total if total != 0.0 else w
    m.setflags(write=False)  # cached: shared by every caller
    return m


@functools.lru_cache(maxsize=64)  # pure in (in_size, out_size); rebuilt per image otherwise
def _bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's plain bicubic (a=-0.75, align_corners=False, edge-clamped taps)."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    m = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        src = f32(scale * f32(i + 0.5)) - f32(0.5)
        base = math.floor(src)
        t = f32(src - f32(base))
        weights = _cubic(np.array([t + f32(1.0), t, f32(1.0) - t, f32(2.0) - t], dtype=f32), CUBIC_A_PLAIN)
        for k, w in enumerate(weights):
            m[i, min(max(base - 1 + k, 0), in_size - 1)] += w
    m.setflags(write=False)  # cached: shared by every caller
    return m


def _resize_hwc(img: np.ndarray, out_h: int, out_w: int, matrix, where: str) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.ndim != 3:
        got = img.shape if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"{where}: expected an image [H, W, C], got {got}")
    h, w, c = img.shape
    if min(h, w, c) <= 0 or out_h <= 0 or out_w <= 0:
        raise ValueError(f"{where}: sizes must be positive, got input {img.shape} and output {out_h}x{out_w}")
    rows = matrix(h, out_h)  # [out_h, h]
    cols = matrix(w, out_w)  # [out_w, w]
    x = (rows @ img.astype(np.float64).reshape(h, w * c)).reshape(out_h, w, c)
    # along the width as one BLAS product (a plain einsum here loops in C: 1.5 s for a 640x480 image)
    x = np.tensordot(x, cols, axes=([1], [1]))  # [out_h, c, out_w]
    return np.ascontiguousarray(x.transpose(0, 2, 1), dtype=np.float32)  # [out_h, out_w, c]


def resize_bicubic_antialias(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mode='bicubic', antialias=True, align_corners=False) of img [H, W, C]."""
    return _resize_hwc(img, out_h, out_w, _antialias_matrix, "resize_bicubic_antialias")


def resize_bicubic(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mode='bicubic', align_corners=False) (no antialias) of img [H, W, C]."""
    return _resize_hwc(img, out_h, out_w, _bicubic_matrix, "resize_bicubic")


def smart_resize(height: int, width: int, multiple: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) rounded to multiples of `multiple`, rescaled into [min_pixels, max_pixels] keeping aspect.

    The release MoVQImageProcessor's rule: round each side to the nearest multiple (Python's round, halves to
    even); if the area is too large, floor both sides at the scale that meets max_pixels; if too small, ceil them
    at the scale that meets min_pixels; never below one multiple.
    """
    if height <= 0 or width <= 0 or multiple <= 0:
        raise ValueError(f"smart_resize: height, width and multiple must be positive, got {height}, {width}, "
                         f"{multiple}")
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"smart_resize: expected 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    h_bar = round(height / multiple) * multiple
    w_bar = round(width / multiple) * multiple
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / multiple) * multiple
        w_bar = math.floor(width / beta / multiple) * multiple
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / multiple) * multiple
        w_bar = math.ceil(width * beta / multiple) * multiple
    return max(h_bar, multiple), max(w_bar, multiple)


def _pil_resize(img: np.ndarray, out_h: int, out_w: int, resample: Image.Resampling) -> np.ndarray:
    if img.shape[:2] == (out_h, out_w):
        return img.copy()
    return np.asarray(Image.fromarray(img).resize((out_w, out_h), resample=resample), dtype=np.uint8).copy()


def preprocess_image(img: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float32 [3, H', W'] in [-1, 1], H', W' from `smart_resize` with the config's rule.

    As the release's MoVQImageProcessor: PIL bicubic resize of the uint8 image, /255, mean 0.5, std 0.5.
    """
    _check_uint8_hwc(img, "preprocess_image")
    out_h, out_w = smart_resize(img.shape[0], img.shape[1], cfg.resize_multiple, cfg.min_pixels, cfg.max_pixels)
    resized = _pil_resize(img, out_h, out_w, Image.Resampling.BICUBIC)
    x = resized.astype(np.float64) / 255.0
    return ((x - 0.5) / 0.5).transpose(2, 0, 1).astype(np.float32)  # [3, H', W']


def postprocess_image(image: np.ndarray) -> np.ndarray:
    """Decoder output [3, H, W] or [1, 3, H, W] in [-1, 1] -> uint8 RGB [H, W, 3] (the release's conversion:
    clamp(127.5 * x + 128, 0, 255), truncated to uint8)."""
    if isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[0] != 3:
        got = image.shape if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"postprocess_image: expected [3, H, W] or [1, 3, H, W], got {got}")
    x = np.clip(127.5 * image.astype(np.float32) + 128.0, 0.0, 255.0)
    return np.ascontiguousarray(x.transpose(1, 2, 0)).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Letterboxing (editing)
# ----------------------------------------------------------------------------------------------------
class Box(NamedTuple):
    """Where the resized source sits inside a letterboxed image: top, left, height, width (pixels)."""
    top: int
    left: int
    height: int
    width: int


def nearest_anchor(height: int, width: int, anchors: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The anchor (h, w) whose aspect ratio w/h is closest to the image's; ties go to the anchor nearest in
    size ((h - ah)^2 + (w - aw)^2), then to the earlier anchor (the release's AspectRatioCrop._find_size)."""
    if not anchors:
        raise ValueError("nearest_anchor: the anchor list is empty")
    ratio = width / height
    diffs = [abs(aw / ah - ratio) for ah, aw in anchors]
    best = min(diffs)
    tied = [i for i, d in enumerate(diffs) if d == best]
    tied.sort(key=lambda i: (height - anchors[i][0]) ** 2 + (width - anchors[i][1]) ** 2)
    ah, aw = anchors[tied[0]]
    return int(ah), int(aw)


def content_box(out_hw: tuple[int, int], source_hw: tuple[int, int]) -> Box:
    """The box a source of size source_hw occupies when fitted (aspect kept) and centred in out_hw."""
    out_h, out_w = out_hw
    src_h, src_w = source_hw
    ratio = min(out_w / src_w, out_h / src_h)
    new_w, new_h = int(src_w * ratio), int(src_h * ratio)
    return Box(top=(out_h - new_h) // 2, left=(out_w - new_w) // 2, height=new_h, width=new_w)


def letterbox_to_anchor(img: np.ndarray, anchors: Sequence[tuple[int, int]]
                        ) -> tuple[np.ndarray, tuple[int, int], Box]:
    """Fit img (uint8 [H, W, 3]) into the anchor of nearest aspect ratio with white bars.

    Returns (letterboxed uint8 [ah, aw, 3], anchor (ah, aw), content box). Undo with
    `unletterbox(output, (H, W))`, which works at any output scale (e.g. a 2x diffusion decode).
    Resampling is PIL Lanczos, as the release's resize_with_padding.
    """
    _check_uint8_hwc(img, "letterbox_to_anchor")
    height, width = img.shape[:2]
    anchor = nearest_anchor(height, width, anchors)
    box = content_box(anchor, (height, width))
    if box.height <= 0 or box.width <= 0:
        raise ValueError(f"letterbox_to_anchor: a {height}x{width} image is too thin for anchor "
                         f"{anchor[0]}x{anchor[1]} (its content would be {box.height}x{box.width})")
    out = np.full((anchor[0], anchor[1], 3), WHITE, dtype=np.uint8)
    out[box.top:box.top + box.height, box.left:box.left + box.width] = _pil_resize(
        img, box.height, box.width, Image.Resampling.LANCZOS)
    return out, anchor, box


def unletterbox(img: np.ndarray, original_hw: tuple[int, int]) -> np.ndarray:
    """Crop the content box out of a letterboxed (or generated-at-anchor) image and resize it back to
    original_hw with PIL Lanczos (the release's unpad_and_resize_back)."""
    _check_uint8_hwc(img, "unletterbox")
    if original_hw[0] <= 0 or original_hw[1] <= 0:
        raise ValueError(f"unletterbox: original size must be positive, got {original_hw}")
    box = content_box(img.shape[:2], original_hw)
    if box.height <= 0 or box.width <= 0:
        raise ValueError(f"unletterbox: a {img.shape[0]}x{img.shape[1]} image holds no content for original size "
                         f"{original_hw}")
    crop = np.ascontiguousarray(img[box.top:box.top + box.height, box.left:box.left + box.width])
    return _pil_resize(crop, int(original_hw[0]), int(original_hw[1]), Image.Resampling.LANCZOS)


# ----------------------------------------------------------------------------------------------------
# Branch inputs
# ----------------------------------------------------------------------------------------------------
def pixel_inputs(image_m11: np.ndarray, cfg: CNNEncoderConfig) -> np.ndarray:
    """The CNN branch's `pixel_values` [1, 3, H, W] float32: the [-1, 1] image renormalised with the branch's
    mean/std (identity for ILLUME+'s 0.5 / 0.5). H and W must be multiples of the branch factor."""
    _check_m11(image_m11, "pixel_inputs")
    _, h, w = image_m11.shape
    if h % cfg.factor or w % cfg.factor:
        raise ValueError(f"pixel_inputs: image {h}x{w} is not a multiple of the pixel branch factor {cfg.factor}; "
                         f"resize it with preprocess_image / smart_resize first")
    mean = np.asarray(cfg.mean, dtype=np.float64).reshape(-1, 1, 1)
    std = np.asarray(cfg.std, dtype=np.float64).reshape(-1, 1, 1)
    x = ((image_m11.astype(np.float64) + 1.0) / 2.0 - mean) / std
    return x.astype(np.float32)[None]


class VitInputs(NamedTuple):
    """Inputs of the semantic (ViT) graph for one image.

    pixel_values [N, C*T*P*P], rotary_cos / rotary_sin [N, head_dim] (float32), grid = (gh, gw) the PATCH grid
    (Qwen2-VL's grid_thw[1:], with t = 1); the output features lie on `merged_grid` = (gh/m, gw/m), row-major.
    """
    pixel_values: np.ndarray
    rotary_cos: np.ndarray
    rotary_sin: np.ndarray
    grid: tuple[int, int]
    merge_size: int

    @property
    def merged_grid(self) -> tuple[int, int]:
        return self.grid[0] // self.merge_size, self.grid[1] // self.merge_size


def vit_inputs(image_m11: np.ndarray, cfg: ViTEncoderConfig) -> VitInputs:
    """ScalingLayerForQwen2ViT + Qwen2-VL's rotary position table, on the host.

    image_m11: [3, H, W] in [-1, 1] (H, W as after preprocess_image). The image is mapped to [0, 1], resized to
    cfg.resize_for(H, W) with torch's bicubic+antialias, clamped, normalised with the config's mean/std, repeated
    temporal_patch_size times and cut into patches whose rows follow the merge windows: for each window (row-major
    over the merged grid) its m x m patches row-major; each row is (channel, frame, py, px) flattened.
    """
    _check_m11(image_m11, "vit_inputs")
    if image_m11.shape[0] != cfg.in_channels:
        raise ValueError(f"vit_inputs: image has {image_m11.shape[0]} channels, the ViT expects {cfg.in_channels}")
    _, h, w = image_m11.shape
    rh, rw = cfg.resize_for(h, w)
    p, m, t = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size
    if rh % (p * m) or rw % (p * m):
        raise ValueError(f"vit_inputs: resize_for({h}, {w}) gave {rh}x{rw}, not a multiple of {p * m}; fix the "
                         f"config's resolution_map")
    img01 = ((image_m11.astype(np.float32) + 1.0) / 2.0).transpose(1, 2, 0)  # [H, W, C]
    x = np.clip(resize_bicubic_antialias(img01, rh, rw), 0.0, 1.0)
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    x = ((x - mean) / std).astype(np.float32).transpose(2, 0, 1)  # [C, rh, rw]
    gh, gw = rh // p, rw // p
    c = cfg.in_channels
    frames = np.broadcast_to(x[None], (t, c, rh, rw))  # the same frame t times: [T, C, rh, rw]
    # [T, C, gh/m, m, p, gw/m, m, p]: split rows into (window row, row in window, pixel row in patch), same for cols
    patches = frames.reshape(t, c, gh // m, m, p, gw // m, m, p)
    # -> [gh/m, gw/m, m(row), m(col), C, T, p, p]: windows row-major, patches in a window row-major
    patches = patches.transpose(2, 5, 3, 6, 1, 0, 4, 7)
    pixel_values = np.ascontiguousarray(patches.reshape(gh * gw, c * t * p * p), dtype=np.float32)
    cos, sin = vit_rotary_tables(gh, gw, cfg)
    return VitInputs(pixel_values, cos, sin, (gh, gw), m)


def vit_position_ids(gh: int, gw: int, merge_size: int) -> np.ndarray:
    """[gh*gw, 2] (row, col) of each patch, in merge-window order."""
    if gh % merge_size or gw % merge_size:
        raise ValueError(f"vit_position_ids: patch grid {gh}x{gw} is not a multiple of the merge size {merge_size}")
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")  # [gh, gw] each
    shape = (gh // merge_size, merge_size, gw // merge_size, merge_size)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)  # window-major, then row-major in the window
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([rows, cols], axis=-1)


def vit_rotary_tables(gh: int, gw: int, cfg: ViTEncoderConfig) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2-VL's 2-D rotary cos/sin [gh*gw, head_dim] (float32, merge-window order).

    head_dim/4 frequencies theta^(-2i/(head_dim/2)); the angle row is [row*f, col*f], and it is repeated twice
    to span the head (rotate-half convention). Computed in float32 like transformers.
    """
    head_dim = cfg.embed_dim // cfg.num_heads
    spatial = head_dim // 2
    exponent = np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial)
    inv_freq = (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponent)).astype(np.float32)
    pos = vit_position_ids(gh, gw, cfg.spatial_merge_size).astype(np.float32)  # [N, 2]
    angles = pos[:, :, None] * inv_freq[None, None, :]  # [N, 2, head_dim/4]
    angles = angles.reshape(pos.shape[0], -1)  # [N, head_dim/2]: row freqs then col freqs
    angles = np.concatenate([angles, angles], axis=-1)  # [N, head_dim]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
