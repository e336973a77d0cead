"""ONNX exporters of the diffusion decoder: `unet` (one denoiser call) and `vae_decoder` (latent -> pixels).

Graph contracts (all float32; B, h, w dynamic):

    unet         latent [B, latent_channels, h, w], timestep [B], code_map [B, code_channels, h, w],
                 time_ids [B, num_time_ids]                          -> noise_pred [B, latent_channels, h, w]
    vae_decoder  latent [B, latent_channels, h, w]                   -> image [B, 3, f*h, f*w]

The host upsamples the code map to the latent grid (nearest), zeroes it for the unconditional CFG row, scales
the latent with the scheduler and runs the scheduler loop in numpy. The UNet graph builds the zero text
conditioning itself, so it takes no text inputs; h and w must be multiples of the UNet's overall
downsampling (2 ** (number of blocks - 1)). The VAE graph divides by `scaling_factor` first and returns
the raw decoder output (nominally [-1, 1], not clamped).
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.export import Dim

from ..config import DiffusionDecoderConfig, UNetConfig
from .diffusion import RGB_CHANNELS, unet_cfg_from_diffusers, vae_cfg_from_diffusers, zero_text_conditioning
from .onnx_io import ExportError, GraphInfo, export_onnx

UNET_INPUTS = ["latent", "timestep", "code_map", "time_ids"]
UNET_OUTPUTS = ["noise_pred"]
VAE_INPUTS = ["latent"]
VAE_OUTPUTS = ["image"]


class UNetGraph(nn.Module):
    """One conditioned denoiser call with the release's zero text conditioning built in."""

    def __init__(self, unet: nn.Module, cfg: UNetConfig):
        super().__init__()
        self.unet = unet
        self.cfg = cfg

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, code_map: torch.Tensor,
                time_ids: torch.Tensor) -> torch.Tensor:
        batch = latent.shape[0]
        text, pooled = zero_text_conditioning(self.cfg, batch, latent)
        pooled = pooled.float()  # concatenated with diffusers' fp32 sinusoidal time-id embedding (fp16 export)
        sample = torch.cat([latent, code_map], dim=1)  # [B, latent_channels + code_channels, h, w]
        return self.unet(sample, timestep, encoder_hidden_states=text,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]


class VAEDecoderGraph(nn.Module):
    """latent -> image: unscale by the VAE's scaling factor, then post_quant_conv + decoder."""

    def __init__(self, vae: nn.Module, scaling_factor: float):
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent / self.scaling_factor, return_dict=False)[0]


def _latent_limits(cfg: DiffusionDecoderConfig) -> int:
    """Largest latent side the graphs declare: the decoder's largest output side over the VAE's downsampling."""
    return max(max(w, h) for w, h in cfg.resolutions) // cfg.vae.downsample


def _example_batch(cfg: DiffusionDecoderConfig) -> int:
    """Batch of the example inputs: 2 (a traced batch of 1 would be specialised to a constant)."""
    if cfg.max_batch < 2:
        raise ExportError(f"diffusion.max_batch is {cfg.max_batch}; the decoder graphs need at least 2 (the "
                          f"unconditional and conditional CFG rows); raise it in the model config")
    return 2


def _check_module_config(module: nn.Module, expected, reader, what: str) -> None:
    got = reader(dict(module.config), where=f"{what}.config")
    if got != expected:
        raise ExportError(f"{what}: the module's config {got} does not match the model config {expected}; "
                          f"build it with build_{what}(cfg) or load the matching checkpoint")


def export_unet(unet: nn.Module, cfg: DiffusionDecoderConfig, path: str | os.PathLike) -> GraphInfo:
    """Export the decoder UNet as `unet.onnx` (see the module docstring for the contract)."""
    ucfg = cfg.unet
    example_b = _example_batch(cfg)
    _check_module_config(unet, ucfg, lambda d, where: unet_cfg_from_diffusers(
        d, text_seq_len=ucfg.text_seq_len, num_time_ids=ucfg.num_time_ids, where=where), "unet")
    stride = 2 ** (len(ucfg.block_out_channels) - 1)  # the UNet's overall downsampling
    blocks = max(1, _latent_limits(cfg) // stride)
    batch = Dim("batch", min=1, max=cfg.max_batch)
    # latent sides as multiples of the UNet stride, so no upsample needs an explicit output size
    h = stride * Dim("latent_h_blocks", min=1, max=blocks)
    w = stride * Dim("latent_w_blocks", min=1, max=blocks)
    example_h, example_w = 2 * stride, 3 * stride  # distinct sizes so the exporter cannot fuse h and w
    args = (torch.randn(example_b, ucfg.latent_channels, example_h, example_w),
            torch.full((example_b,), 500.0),
            torch.randn(example_b, ucfg.code_channels, example_h, example_w),
            torch.zeros(example_b, ucfg.num_time_ids))
    dynamic = ({0: batch, 2: h, 3: w}, {0: batch}, {0: batch, 2: h, 3: w}, {0: batch})
    return export_onnx(UNetGraph(unet.eval(), ucfg), args, path, input_names=UNET_INPUTS,
                       output_names=UNET_OUTPUTS, dynamic_shapes=dynamic)


def export_vae_decoder(vae: nn.Module, cfg: DiffusionDecoderConfig, path: str | os.PathLike) -> GraphInfo:
    """Export the VAE decoder as `vae_decoder.onnx`: latent [B, c, h, w] -> image [B, 3, f*h, f*w]."""
    example_b = _example_batch(cfg)
    _check_module_config(vae, cfg.vae, vae_cfg_from_diffusers, "vae")
    side = _latent_limits(cfg)
    batch = Dim("batch", min=1, max=cfg.max_batch)
    h = Dim("latent_h", min=1, max=side)
    w = Dim("latent_w", min=1, max=side)
    args = (torch.randn(example_b, cfg.vae.latent_channels, 4, 5),)
    info = export_onnx(VAEDecoderGraph(vae.eval(), cfg.vae.scaling_factor), args, path, input_names=VAE_INPUTS,
                       output_names=VAE_OUTPUTS, dynamic_shapes=({0: batch, 2: h, 3: w},))
    out = info.outputs[0]
    if len(out.shape) != 4 or out.shape[1] != RGB_CHANNELS:
        raise ExportError(f"{path}: vae_decoder output shape {out.shape}, expected [B, {RGB_CHANNELS}, H, W]")
    return info
