"""Codes -> pixels: code maps from the codebook tables, then the VQ decoder or the diffusion decoder.

- Code maps (numpy): each level's indices gather rows of its effective SimVQ table -> [1, code_dim, h, w].
- VQ path: the `vq_decoder` graph merges the levels itself (bicubic to the last grid) -> image at 1x.
- Diffusion path: levels merged on the host (bicubic, as DualViTok.merge_quants), nearest-upsampled to the
  latent grid, then the numpy scheduler loop over the `unet` graph with CFG against a zeroed code map
  (rows: unconditional, conditional), and `vae_decoder` -> image at `upscale` x the LLM resolution.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..config import ConfigError
from .decode_loops import Timings
from .engine import Engine
from .image_prep import postprocess_image, resize_bicubic
from .schedulers import make_schedule, new_state, scale_model_input, step

ProgressFn = Callable[[int, int], None]


def code_maps(engine: Engine, codes: list[np.ndarray]) -> list[np.ndarray]:
    """Per level, float32 [1, code_dim, h, w] = codebook rows of the level's [h, w] indices."""
    maps = []
    for level, idx in enumerate(codes):
        table = engine.codebook(level)  # [codebook_size, code_dim]
        maps.append(np.ascontiguousarray(table[idx].transpose(2, 0, 1)[None]))  # [h, w, d] -> [1, d, h, w]
    return maps


def merge_code_maps(maps: list[np.ndarray]) -> np.ndarray:
    """All levels on the last level's grid (earlier ones bicubic-upsampled), concatenated on channels."""
    h, w = maps[-1].shape[-2:]
    merged = []
    for m in maps[:-1]:
        hwc = m[0].transpose(1, 2, 0)  # [h_l, w_l, d]
        merged.append(resize_bicubic(hwc, h, w).transpose(2, 0, 1)[None])  # [1, d, h, w]
    return np.ascontiguousarray(np.concatenate(merged + [maps[-1]], axis=1), np.float32)


def upsample_nearest(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch F.interpolate(mode='nearest') of [N, C, h, w]: source index floor(dst * in / out)."""
    _, _, h, w = x.shape
    rows = np.minimum(np.floor(np.arange(out_h) * (h / out_h)).astype(np.int64), h - 1)
    cols = np.minimum(np.floor(np.arange(out_w) * (w / out_w)).astype(np.int64), w - 1)
    return np.ascontiguousarray(x[:, :, rows][:, :, :, cols])


def vq_decode(engine: Engine, maps: list[np.ndarray], timings: Timings | None = None) -> np.ndarray:
    """uint8 [H, W, 3] from the VQ decoder graph."""
    timings = timings or Timings()
    with timings.timed("vq_decoder"):
        out = engine.session("vq_decoder").run({f"codes_level{i}": m for i, m in enumerate(maps)})["image"]
    return postprocess_image(out)


def initial_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard-normal latents from numpy Philox (the torch reference is fed the same array)."""
    return np.random.Generator(np.random.Philox(seed)).standard_normal(shape, dtype=np.float32)


def diffusion_decode(engine: Engine, maps: list[np.ndarray], height: int, width: int, *, steps: int,
                     cfg_scale: float, seed: int, scheduler: dict | None = None,
                     timings: Timings | None = None, progress: ProgressFn | None = None) -> np.ndarray:
    """uint8 [upscale*height, upscale*width, 3] through the UNet loop and the VAE decoder."""
    cfg = engine.config
    dcfg = cfg.diffusion
    if dcfg is None or not engine.has("unet"):
        raise ConfigError(f"{cfg.name}: this engine has no diffusion decoder; use decoder='vq'")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    timings = timings or Timings()
    res_index = dcfg.resolution_index(height, width)
    factor = dcfg.vae.downsample
    lat_h, lat_w = height * dcfg.upscale // factor, width * dcfg.upscale // factor
    codes = upsample_nearest(merge_code_maps(maps), lat_h, lat_w)  # [1, C, lat_h, lat_w]
    schedule = make_schedule(scheduler or engine.json_asset("scheduler"), steps)
    state = new_state(schedule)
    latents = initial_noise(seed, (1, dcfg.unet.latent_channels, lat_h, lat_w)) * schedule.init_noise_sigma
    guided = cfg_scale > 1.0
    code_in = np.concatenate([np.zeros_like(codes), codes]) if guided else codes  # rows: uncond, cond
    batch = code_in.shape[0]
    time_ids = np.zeros((batch, dcfg.unet.num_time_ids), np.float32)
    time_ids[:, -1] = res_index
    unet = engine.session("unet")
    with timings.timed("unet"):
        for i in range(schedule.num_steps):
            model_in = scale_model_input(schedule, latents, i)
            noise = unet.run({"latent": np.ascontiguousarray(np.repeat(model_in, batch, axis=0), np.float32),
                              "timestep": np.full((batch,), schedule.timesteps[i], np.float32),
                              "code_map": code_in, "time_ids": time_ids})["noise_pred"]
            if guided:
                noise = noise[:1] + np.float32(cfg_scale) * (noise[1:] - noise[:1])
            latents = step(schedule, state, i, noise, latents)
            if progress is not None:
                progress(i + 1, schedule.num_steps)
    with timings.timed("vae_decoder"):
        image = engine.session("vae_decoder").run({"latent": np.ascontiguousarray(latents, np.float32)})["image"]
    return postprocess_image(image)
