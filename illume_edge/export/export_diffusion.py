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

import contextlib
import os
from typing import Iterator

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


class ConstantCrossAttention(nn.Module):
    """A cross-attention block whose context is all zeros, as the value it always returns.

    The release's decoder conditions on zero text embeddings (`zero_text_conditioning`). Every key is then the
    same vector (to_k(0)), so every score of a query is the same, the softmax is uniform, and the output is
    to_out(to_v(0)) for every query, whatever the image. Computing that once at export drops each block's
    query projection, scores, softmax and output projection from the graph (exact up to float rounding;
    tested against the diffusers blocks).
    """

    def __init__(self, attn: nn.Module, cfg: UNetConfig):
        super().__init__()
        param = next(attn.parameters())
        query = torch.zeros(1, 1, attn.to_q.in_features, dtype=param.dtype)
        context = torch.zeros(1, cfg.text_seq_len, cfg.cross_attention_dim, dtype=param.dtype)
        with torch.no_grad():
            self.register_buffer("value", attn(query, encoder_hidden_states=context).detach().clone())  # [1, 1, C]

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **_) -> torch.Tensor:
        return self.value.expand(*hidden_states.shape[:-1], -1)  # [B, HW, C]: the same row for every query


@contextlib.contextmanager
def constant_cross_attention(unet: nn.Module, cfg: UNetConfig) -> Iterator[int]:
    """Within the block, every cross-attention block of a diffusers UNet is its `ConstantCrossAttention`
    (valid for the zero text conditioning only); the originals are put back on exit. Yields their count.
    A block that adds its input to its output (`residual_connection`) depends on the query, and is kept."""
    swaps = []
    for name, module in list(unet.named_modules()):
        if (getattr(module, "is_cross_attention", False) and hasattr(module, "to_q")
                and not getattr(module, "residual_connection", False)):
            parent_name, _, attr = name.rpartition(".")
            swaps.append((unet.get_submodule(parent_name), attr, module, ConstantCrossAttention(module, cfg)))
    try:
        for parent, attr, _, constant in swaps:
            setattr(parent, attr, constant)
        yield len(swaps)
    finally:
        for parent, attr, original, _ in swaps:
            setattr(parent, attr, original)


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
    with constant_cross_attention(unet.eval(), ucfg):  # the graph has no text input: its context is zeros
        return export_onnx(UNetGraph(unet, ucfg), args, path, input_names=UNET_INPUTS,
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
