"""Host image preparation (illume_edge.runtime.image_prep) against torch and the release's definitions."""
from __future__ import annotations

import dataclasses
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from illume_edge.config import CNNEncoderConfig, preset
from illume_edge.runtime import image_prep as ip

CFG = preset("tiny-plus")
VIT = CFG.branches[0].encoder
CNN = CFG.branches[1].encoder
RESIZE_TOL = 1e-5  # float32 images in [0, 1]


def _torch_resize(img_hwc: np.ndarray, out_h: int, out_w: int, antialias: bool) -> np.ndarray:
    t = torch.from_numpy(img_hwc).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=(out_h, out_w), mode="bicubic", align_corners=False, antialias=antialias)
    return out[0].permute(1, 2, 0).numpy()


# Output sides of 1 are left out on purpose: torch's CPU antialias kernel returns a constant column there
# (a torch quirk), while the separable definition does not.
@pytest.mark.parametrize("in_hw,out_hw", [((64, 64), (56, 56)), ((96, 128), (84, 112)), ((256, 256), (252, 252)),
                                          ((300, 200), (56, 84)), ((30, 40), (70, 90)), ((17, 23), (17, 23)),
                                          ((20, 90), (45, 28))])
def test_resize_bicubic_antialias_matches_torch(in_hw, out_hw):
    img = np.random.default_rng(1).random((*in_hw, 3), dtype=np.float32)
    ours = ip.resize_bicubic_antialias(img, *out_hw)
    ref = _torch_resize(img, *out_hw, antialias=True)
    assert ours.shape == (*out_hw, 3) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= RESIZE_TOL


@pytest.mark.parametrize("in_hw,out_hw", [((9, 9), (16, 16)), ((3, 4), (6, 8)), ((2, 3), (4, 5)),
                                          ((40, 30), (21, 17))])
def test_resize_bicubic_plain_matches_torch(in_hw, out_hw):
    img = np.random.default_rng(2).standard_normal((*in_hw, 8)).astype(np.float32)
    ours = ip.resize_bicubic(img, *out_hw)
    ref = _torch_resize(img, *out_hw, antialias=False)
    assert np.abs(ours - ref).max() <= RESIZE_TOL * max(1.0, float(np.abs(ref).max()))


def test_resize_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"expected an image \[H, W, C\]"):
        ip.resize_bicubic_antialias(np.zeros((4, 4), np.float32), 2, 2)
    with pytest.raises(ValueError, match="sizes must be positive"):
        ip.resize_bicubic(np.zeros((4, 4, 3), np.float32), 0, 2)


def _release_scaling_layer(image_m11: torch.Tensor, cfg) -> tuple[torch.Tensor, tuple[int, int]]:
    """ScalingLayerForQwen2ViT's steps for one image [3, H, W], with the release's reshape sequence."""
    p, m, t = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size
    images = image_m11[None, None]  # [b=1, t=1, c, H, W]
    b, temporal, c, h, w = images.shape
    rh, rw = cfg.resize_for(h, w)
    images = (images + 1) / 2
    images = F.interpolate(images.flatten(0, 1), size=(rh, rw), mode="bicubic", align_corners=False,
                           antialias=True)
    images = images.clamp(0, 1)
    mean = torch.tensor(cfg.mean)[None, :, None, None]
    std = torch.tensor(cfg.std)[None, :, None, None]
    images = ((images - mean) / std).reshape(b, temporal, c, rh, rw)
    images = images.repeat_interleave(t, dim=1)  # temporal == 1 -> t frames
    gh, gw = rh // p, rw // p
    images = images.reshape(b, t, c, -1)  # 'b p c n'
    images = images.permute(0, 3, 2, 1).reshape(b, rh * rw, c * t)  # 'b p c n -> b n (c p)'
    images = images.reshape(b, gh // m, m, p, gw // m, m, p, -1)  # b h k s1 w l s2 n
    images = images.permute(0, 1, 4, 2, 5, 7, 3, 6)  # -> b h w k l n s1 s2
    return images.reshape(b * gh * gw, -1), (gh, gw)


@pytest.mark.parametrize("hw", [(56, 56), (84, 112), (64, 96), (256, 256)])
def test_vit_inputs_match_release_scaling_layer(hw):
    img = np.random.default_rng(3).uniform(-1, 1, (3, *hw)).astype(np.float32)
    vi = ip.vit_inputs(img, VIT)
    ref, grid = _release_scaling_layer(torch.from_numpy(img), VIT)
    assert vi.grid == grid
    assert vi.merged_grid == (grid[0] // 2, grid[1] // 2) == VIT.grid(*hw)
    assert vi.pixel_values.shape == (grid[0] * grid[1], VIT.patch_dim) and vi.pixel_values.dtype == np.float32
    ref = ref.numpy()
    assert np.abs(vi.pixel_values - ref).max() <= RESIZE_TOL * max(1.0, float(np.abs(ref).max()))


def test_vit_inputs_use_the_resolution_map():
    img = np.zeros((3, 256, 256), np.float32)
    assert ip.vit_inputs(img, VIT).grid == (252 // 14, 252 // 14)  # 256x256 -> 252x252 (RESOLUTION_MAPPING)


@pytest.mark.parametrize("grid", [(4, 4), (6, 8), (18, 18)])
def test_vit_rotary_tables_match_transformers(grid):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLVisionRotaryEmbedding
    from transformers.vision_utils import get_vision_position_ids

    from illume_edge.export.vit import vision_config

    gh, gw = grid
    pos = get_vision_position_ids(torch.tensor([[1, gh, gw]]), VIT.spatial_merge_size)
    assert np.array_equal(ip.vit_position_ids(gh, gw, VIT.spatial_merge_size), pos.numpy())
    rope = Qwen2VLVisionRotaryEmbedding(vision_config(VIT))
    cos, sin = rope(torch.zeros(1), pos)
    ours_cos, ours_sin = ip.vit_rotary_tables(gh, gw, VIT)
    assert ours_cos.shape == (gh * gw, VIT.embed_dim // VIT.num_heads)
    assert np.abs(ours_cos - cos.numpy()).max() <= 1e-6
    assert np.abs(ours_sin - sin.numpy()).max() <= 1e-6


def test_vit_inputs_reject_bad_images():
    with pytest.raises(ValueError, match=r"expected an image \[3, H, W\]"):
        ip.vit_inputs(np.zeros((56, 56, 3), np.float32), VIT)
    with pytest.raises(ValueError, match="float image"):
        ip.vit_inputs(np.zeros((3, 56, 56), np.uint8), VIT)
    with pytest.raises(ValueError, match="NaN"):
        ip.vit_inputs(np.full((3, 56, 56), np.nan, np.float32), VIT)


def test_smart_resize_release_rule():
    mn, mx = CFG.min_pixels, CFG.max_pixels  # 32^2, 768^2
    assert ip.smart_resize(256, 256, 16, mn, mx) == (256, 256)
    assert ip.smart_resize(24, 40, 16, mn, mx) == (32, 32)  # round(1.5) = 2, round(2.5) = 2 (halves to even)
    assert ip.smart_resize(1000, 2000, 16, mn, mx) == (528, 1072)  # too large: floor at sqrt(area / max)
    assert ip.smart_resize(10, 20, 16, mn, mx) == (32, 48)  # too small: ceil at sqrt(min / area)
    assert ip.smart_resize(3, 5000, 16, mn, mx) == (16, 1312)  # h rounds to 0: the min path, floor at 16
    with pytest.raises(ValueError, match="must be positive"):
        ip.smart_resize(0, 10, 16, mn, mx)
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        ip.smart_resize(10, 10, 16, mx, mn)


def test_preprocess_image_is_pil_bicubic_then_m11():
    img = np.random.default_rng(4).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    out = ip.preprocess_image(img, CFG)
    h, w = ip.smart_resize(50, 70, CFG.resize_multiple, CFG.min_pixels, CFG.max_pixels)
    assert out.shape == (3, h, w) and out.dtype == np.float32
    resized = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    assert np.abs(out - (resized / 127.5 - 1.0).transpose(2, 0, 1)).max() <= 1e-6
    exact = np.random.default_rng(5).integers(0, 256, (64, 96, 3), dtype=np.uint8)  # already on the grid
    assert np.abs(ip.preprocess_image(exact, CFG) - (exact / 127.5 - 1.0).transpose(2, 0, 1)).max() <= 1e-6
    with pytest.raises(ValueError, match="uint8 RGB"):
        ip.preprocess_image(exact.astype(np.float32), CFG)


def test_postprocess_image_release_conversion():
    x = np.array([-1.0, 0.0, 1.0, 2.0, -3.0, 0.5], np.float32).reshape(1, 1, 6).repeat(3, axis=0)
    out = ip.postprocess_image(x[None])
    assert out.shape == (1, 6, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 128, 255, 255, 0, 191]  # clamp(127.5 x + 128), truncated
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        ip.postprocess_image(np.zeros((4, 4), np.float32))


def test_nearest_anchor_ratio_then_size():
    anchors = CFG.anchors  # (256,256), (384,512), (512,384), (512,512)
    assert ip.nearest_anchor(300, 400, anchors) == (384, 512)
    assert ip.nearest_anchor(400, 290, anchors) == (512, 384)
    assert ip.nearest_anchor(100, 100, anchors) == (256, 256)  # ratio tie -> nearest size
    assert ip.nearest_anchor(600, 600, anchors) == (512, 512)
    with pytest.raises(ValueError, match="empty"):
        ip.nearest_anchor(10, 10, [])


def _gradient_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy * 200 // h, xx * 200 // w, (yy + xx) * 100 // (h + w)], -1).astype(np.uint8)


def test_letterbox_and_unletterbox():
    img = _gradient_image(100, 250)
    boxed, anchor, box = ip.letterbox_to_anchor(img, CFG.anchors)
    assert anchor == (384, 512) and boxed.shape == (384, 512, 3) and boxed.dtype == np.uint8
    assert box == ip.Box(top=(384 - 204) // 2, left=0, height=204, width=512)  # 100*512/250 = 204.8 -> 204
    mask = np.zeros(boxed.shape[:2], bool)
    mask[box.top:box.top + box.height, box.left:box.left + box.width] = True
    assert (boxed[~mask] == 255).all()  # white bars
    assert boxed[mask].mean() < 150  # the (dark) content is inside the box
    back = ip.unletterbox(boxed, img.shape[:2])
    assert back.shape == img.shape
    assert np.abs(back.astype(int) - img).mean() < 3.0
    # a decoder that doubles the resolution: the same call still finds the content
    doubled = np.asarray(Image.fromarray(boxed).resize((1024, 768), Image.Resampling.NEAREST))
    assert np.abs(ip.unletterbox(doubled, img.shape[:2]).astype(int) - img).mean() < 3.0
    with pytest.raises(ValueError, match="uint8 RGB"):
        ip.letterbox_to_anchor(img.astype(np.float32), CFG.anchors)
    with pytest.raises(ValueError, match="must be positive"):
        ip.unletterbox(boxed, (0, 5))


def test_pixel_inputs():
    img = np.random.default_rng(6).uniform(-1, 1, (3, 64, 96)).astype(np.float32)
    x = ip.pixel_inputs(img, CNN)
    assert x.shape == (1, 3, 64, 96) and x.dtype == np.float32
    assert np.abs(x[0] - img).max() <= 1e-6  # mean = std = 0.5 maps [-1, 1] to itself
    other = dataclasses.replace(CNN, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    expect = ((img + 1) / 2 - np.array([0.4, 0.5, 0.6])[:, None, None]) / np.array([0.2, 0.25, 0.3])[:, None, None]
    assert np.abs(ip.pixel_inputs(img, other)[0] - expect).max() <= 1e-5
    with pytest.raises(ValueError, match="multiple of the pixel branch factor 16"):
        ip.pixel_inputs(img[:, :60], CNN)
    assert isinstance(CNN, CNNEncoderConfig)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_load_image_formats(tmp_path):
    rgb = _gradient_image(20, 30)
    png = _encode(Image.fromarray(rgb), "PNG")
    assert np.array_equal(ip.load_image(png), rgb)
    path = tmp_path / "x.png"
    path.write_bytes(png)
    assert np.array_equal(ip.load_image(str(path)), rgb)
    assert np.array_equal(ip.load_image(path), rgb)
    gray = ip.load_image(Image.fromarray(rgb[:, :, 0], "L"))
    assert gray.shape == (20, 30, 3) and gray.dtype == np.uint8 and np.array_equal(gray[..., 1], rgb[:, :, 0])
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 128, np.uint8)], -1)
    assert np.array_equal(ip.load_image(Image.fromarray(rgba, "RGBA")), rgb)
    jpg = ip.load_image(_encode(Image.fromarray(rgb), "JPEG"))
    assert jpg.shape == (20, 30, 3) and np.abs(jpg.astype(int) - rgb).mean() < 8


def test_load_image_bad_inputs(tmp_path):
    png = _encode(Image.fromarray(_gradient_image(20, 30)), "PNG")
    with pytest.raises(ValueError, match="not a readable image"):
        ip.load_image(b"definitely not an image")
    with pytest.raises(ValueError, match="cannot decode pixel data"):
        ip.load_image(png[: len(png) // 2])  # truncated
    with pytest.raises(ValueError, match="zero size"):
        ip.load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match="exceeds the limit 500"):
        ip.load_image(png, max_pixels=500)
    with pytest.raises(ValueError, match="no such file"):
        ip.load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="expected bytes, a path or a PIL.Image"):
        ip.load_image(12345)


def test_image_prep_does_not_import_torch():
    code = "import sys, illume_edge.runtime.image_prep; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
