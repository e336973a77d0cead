"""Qwen2-VL vision transformer: the ILLUME+ semantic input encoder (torch reference + export-friendly forward).

The reference module is transformers' `Qwen2VisionTransformerPretrainedModel`, built from our
`ViTEncoderConfig`. Its state-dict names are the release's (`patch_embed.proj.weight`,
`blocks.N.{norm1,norm2,attn.qkv,attn.proj,mlp.fc1,mlp.fc2}`, `merger.ln_q`, `merger.mlp.{0,2}`), so the
checkpoint's `model.vision_tower.semantic_encoder.*` weights load into it unchanged.

`ViTFeatures` runs the same weights for ONE image with host-computed inputs:
- `pixel_values` [N, C*T*P*P]: patches in the merge-window order (see runtime/image_prep.vit_inputs),
- `rotary_cos`, `rotary_sin` [N, head_dim]: the 2-D RoPE tables for those patches,
and writes attention with plain MatMul/Softmax (one image = full attention, no cu_seqlens), the 3-D patch
embedding as one MatMul (its kernel equals its stride, so the Conv3d is a per-patch linear map), and the 2x2
PatchMerger as a reshape of consecutive patch rows. Nothing in it needs an op outside standard ONNX.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from illume_edge.config import ConfigError, ViTEncoderConfig


def vision_config(cfg: ViTEncoderConfig) -> Qwen2VLVisionConfig:
    """transformers' Qwen2VLVisionConfig for one of our ViT configs."""
    if cfg.kind != "qwen2vit":
        raise ConfigError(f"ViTEncoderConfig.kind: expected 'qwen2vit', got {cfg.kind!r}")
    if cfg.embed_dim % cfg.num_heads:
        raise ConfigError(f"ViTEncoderConfig: embed_dim {cfg.embed_dim} is not a multiple of num_heads {cfg.num_heads}")
    head_dim = cfg.embed_dim // cfg.num_heads
    if head_dim % 4:
        raise ConfigError(f"ViTEncoderConfig: head_dim {head_dim} must be a multiple of 4 (2-D RoPE rotates h and w "
                          f"halves of the head in pairs)")
    if float(cfg.mlp_ratio) != int(cfg.mlp_ratio):
        raise ConfigError(f"ViTEncoderConfig.mlp_ratio: transformers' Qwen2-VL ViT needs an integer, got "
                          f"{cfg.mlp_ratio}")
    return Qwen2VLVisionConfig(
        depth=cfg.depth, embed_dim=cfg.embed_dim, hidden_size=cfg.out_dim, hidden_act=cfg.hidden_act,
        mlp_ratio=int(cfg.mlp_ratio), num_heads=cfg.num_heads, in_channels=cfg.in_channels,
        patch_size=cfg.patch_size, spatial_merge_size=cfg.spatial_merge_size,
        temporal_patch_size=cfg.temporal_patch_size,
        rope_parameters={"rope_type": "axial", "rope_theta": float(cfg.rope_theta)},
    )


def build_vit(cfg: ViTEncoderConfig) -> Qwen2VisionTransformerPretrainedModel:
    """The reference ViT (random weights, eval mode, eager attention); load the checkpoint into it."""
    vcfg = vision_config(cfg)
    vcfg._attn_implementation = "eager"
    return Qwen2VisionTransformerPretrainedModel(vcfg).eval()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ViTFeatures(nn.Module):
    """merger(blocks(patch_embed(pixel_values))) for one image, rotary tables given; optional projector after.

    forward(pixel_values [N, patch_dim], rotary_cos [N, head_dim], rotary_sin [N, head_dim])
      -> [N / merge^2, out_dim] (or [N / merge^2, projector out] with a projector).
    """

    def __init__(self, vit: Qwen2VisionTransformerPretrainedModel, cfg: ViTEncoderConfig,
                 projector: nn.Module | None = None):
        super().__init__()
        self.vit = vit
        self.projector = projector
        self.embed_dim = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.merge_unit = cfg.spatial_merge_size ** 2
        self.patch_dim = cfg.patch_dim
        weight = vit.patch_embed.proj.weight
        expected = (cfg.embed_dim, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        if tuple(weight.shape) != expected:
            raise ConfigError(f"ViT patch_embed.proj.weight: expected shape {expected} from the config, got "
                              f"{tuple(weight.shape)}; build the ViT with build_vit(cfg) for the same config")

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        qkv = attn.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)  # [N, 3, heads, hd]
        qkv = qkv.permute(1, 2, 0, 3)  # [3, heads, N, hd]
        q, k, v = qkv[0], qkv[1], qkv[2]
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)  # [1, N, hd], shared by all heads
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        scores = torch.matmul(q, k.transpose(1, 2)) * (self.head_dim ** -0.5)  # [heads, N, N]
        out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [heads, N, hd]
        out = out.transpose(0, 1).reshape(n, self.embed_dim)  # [N, heads*hd]
        return attn.proj(out)

    def forward(self, pixel_values: torch.Tensor, rotary_cos: torch.Tensor, rotary_sin: torch.Tensor) -> torch.Tensor:
        w = self.vit.patch_embed.proj.weight
        x = torch.matmul(pixel_values, w.reshape(self.embed_dim, self.patch_dim).t())  # [N, embed]
        for blk in self.vit.blocks:
            x = x + self._attention(blk.attn, blk.norm1(x), rotary_cos, rotary_sin)
            x = x + blk.mlp(blk.norm2(x))
        merger = self.vit.merger
        # Each run of merge_unit consecutive rows is one 2x2 window (merge-window patch order).
        x = merger.ln_q(x).reshape(-1, self.merge_unit * self.embed_dim)  # [N/4, 4*embed]
        x = merger.mlp(x)
        if self.projector is not None:
            x = self.projector(x)
        return x
