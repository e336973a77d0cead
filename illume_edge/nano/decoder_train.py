"""ILLUME-nano's diffusion detokenizer: a small VAE, then the UNet conditioned on the code map (torch).

As ILLUME+'s decoder: an SDXL-layout UNet whose input is the noisy latent concatenated with the code map
(the level's code vectors, nearest-upsampled to the latent grid), zero text conditioning, the resolution index
as time id, on the release's DDPM schedule (scaled-linear betas, 1000 steps); the code map is dropped (zeroed)
for 10% of samples so that decoder CFG works. The target follows the scheduler config's `prediction_type`
(the release: epsilon; ILLUME-nano: sample, i.e. x0). The VAE is trained first on the world's
images and its latents are rescaled to unit spread (folded into its weights, so `scaling_factor` stays 1).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..export.diffusion import time_ids_for, zero_text_conditioning
from ..runtime.schedulers import train_alphas_cumprod
from . import world
from .progress import Progress
from .vision_train import VisionTower


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] list -> float32 [B, 3, H, W] in [-1, 1] (the decoder's output convention)."""
    x = torch.from_numpy(np.stack(images)).float().permute(0, 3, 1, 2)  # [B, 3, H, W]
    return x / 127.5 - 1.0


def _render_batch(rng: np.random.Generator, wcfg: world.WorldConfig, n: int):
    scenes = [world.sample_scene(rng, wcfg, split="train") for _ in range(n)]
    return scenes, [world.render(s, wcfg) for s in scenes]


def train_vae(vae: nn.Module, wcfg: world.WorldConfig, *, steps: int, batch: int, lr: float, seed: int,
              progress: Progress) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    vae.train()
    for step in range(steps):
        x = images_to_tensor(_render_batch(rng, wcfg, batch)[1])
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        # objects cover ~10% of the pixels but carry all the semantics: weight them 10x (colors were the VAE's
        # main error when every pixel counted the same)
        weight = 1.0 + 9.0 * (x < 0.98).any(dim=1, keepdim=True).float()  # [B, 1, H, W]: non-white pixels
        err = recon - x
        rec = (weight * (err.abs() + err ** 2)).mean() / weight.mean()
        kl = post.kl().mean() / x[0].numel()
        loss = rec + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        progress.update(step + 1, loss=loss.item(), l1=F.l1_loss(recon, x).item())
    vae.eval().requires_grad_(False)
    normalize_latents(vae, wcfg, seed)


@torch.no_grad()
def normalize_latents(vae: nn.Module, wcfg: world.WorldConfig, seed: int, n: int = 256) -> float:
    """Rescale the latent space to unit standard deviation inside the weights: the mean half of quant_conv is
    divided by s (its log-variance half shifted by -2 log s) and post_quant_conv's input multiplied by s, so
    decode(encode(x)) is unchanged and the UNet sees N(0, 1)-sized latents. Returns s."""
    rng = np.random.default_rng(seed + 1)
    x = images_to_tensor(_render_batch(rng, wcfg, n)[1])
    s = float(vae.encode(x).latent_dist.mean.std())
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] /= s
    vae.quant_conv.bias[:c] /= s
    vae.quant_conv.bias[c:] -= 2.0 * math.log(s)
    vae.post_quant_conv.weight.mul_(s)
    return s


def code_map_from_indices(quantizer: nn.Module, idx: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """indices [B, rows*cols] -> code map [B, code_dim, rows, cols] (the runtime's code_maps, in torch)."""
    table = quantizer.effective_table()
    b = idx.shape[0]
    return table[idx].reshape(b, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()


def unet_forward(unet: nn.Module, cfg: ModelConfig, latents: torch.Tensor, codes: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
    ucfg = cfg.diffusion.unet
    b = latents.shape[0]
    text, pooled = zero_text_conditioning(ucfg, b, latents)
    res = cfg.diffusion.resolution_index(*cfg.anchors[0])
    time_ids = torch.tensor([time_ids_for(ucfg, res)], dtype=torch.float32).repeat(b, 1)
    up = F.interpolate(codes, size=latents.shape[-2:], mode="nearest")  # [B, code_dim, h_lat, w_lat]
    return unet(torch.cat([latents, up], 1), t, encoder_hidden_states=text,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]


def target_for(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output for `x_t = sqrt(a) x0 + sqrt(1 - a) noise` (diffusers' conventions)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    raise ValueError(f"scheduler_config: prediction_type {prediction_type!r}: expected epsilon, sample or "
                     f"v_prediction")


def train_unet(cfg: ModelConfig, unet: nn.Module, vae: nn.Module, tower: VisionTower, wcfg: world.WorldConfig,
               scheduler_config: dict, *, steps: int, batch: int, lr: float, seed: int, progress: Progress,
               drop: float = 0.1) -> None:
    alphas = torch.from_numpy(train_alphas_cumprod(scheduler_config))  # the runtime's own schedule code
    kind = scheduler_config.get("prediction_type", "epsilon")
    grid = cfg.level_grid(0, *cfg.anchors[0])
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    unet.train()
    for step in range(steps):
        _, images = _render_batch(rng, wcfg, batch)
        with torch.no_grad():
            x0 = vae.encode(images_to_tensor(images)).latent_dist.mean * vae.config.scaling_factor
            codes = code_map_from_indices(tower.tokenizer.quantizer, tower.codes(images), grid)
            keep = (torch.rand(batch, 1, 1, 1, generator=gen) >= drop).float()
            codes = codes * keep  # code-map dropout: the unconditional branch of decoder CFG
        t = torch.randint(0, len(alphas), (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].reshape(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet_forward(unet, cfg, noisy, codes, t), target_for(kind, x0, noise, a))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        progress.update(step + 1, loss=loss.item())
    unet.eval().requires_grad_(False)
