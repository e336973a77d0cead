"""MoVQGAN-style CNN encoder and spatially-conditioned decoder (the DualViTok pixel branch), torch reference.

Written from the ILLUME+ release's `movqgan/modeling_movqgan.py` semantics, with the same module tree, so a
release state dict (`model.vision_tower.pixel_encoder.*` of the MLLM, `pixel_decoder.*` of DualViTok) loads
strictly:

  conv_in, down.{i}.block.{j}, down.{i}.attn.{j}, down.{i}.downsample.conv, mid.{block_1,attn_1,block_2},
  norm_out, conv_out                                                                              (encoder)
  conv_in, mid.*, up.{i}.block.{j}, up.{i}.attn.{j}, up.{i}.upsample.conv, norm_out, conv_out     (decoder)

with resnet blocks `norm1, conv1, norm2, conv2[, nin_shortcut]`, attention `norm, q, k, v, proj_out` and, in
the decoder, spatial norms `norm_layer, conv_y, conv_b` in place of GroupNorms.

Semantics worth knowing
- `MoVQConfig.attn_resolutions` holds LEVEL INDICES (the release tests `i_level in attn_resolutions`): with
  ch_mult of length 5 and (4,), the last (coarsest) level's blocks each get an attention block.
  `MoVQConfig.resolution` is not used.
- With `use_dc_up_down_blocks` the down/up samplers are DC-AE style (conv + pixel (un)shuffle plus a
  parameter-free shortcut), the encoder output adds a channel-group-mean shortcut and the decoder input a
  channel-repeat shortcut.
- GroupNorms use `MoVQConfig.norm_groups` groups (the release: 32) and eps 1e-6.
- Spatial norm: norm(x) * conv_y(zq') + conv_b(zq'), zq' = zq nearest-resized to x's size. The 1x1 convs are
  applied before the nearest resize here (they commute exactly: a 1x1 conv acts per pixel and nearest resizing
  copies pixels), which computes them on the code grid instead of the full feature map.
- Dropout (0.0 in every release config) is omitted: these modules are for inference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from illume_edge.config import ConfigError, MoVQConfig

NORM_EPS = 1e-6  # every GroupNorm of the release's MoVQ
DC_FACTOR = 2  # spatial factor of one down/up sampling step


def _group_norm(cfg: MoVQConfig, channels: int) -> nn.GroupNorm:
    if channels % cfg.norm_groups:
        raise ConfigError(f"MoVQConfig.norm_groups {cfg.norm_groups} does not divide a {channels}-channel feature "
                          f"map (ch={cfg.ch}, ch_mult={cfg.ch_mult})")
    return nn.GroupNorm(num_groups=cfg.norm_groups, num_channels=channels, eps=NORM_EPS, affine=True)


def _conv3(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=padding)


def _conv1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class SpatialNorm(nn.Module):
    """GroupNorm modulated per pixel by the code map: norm(x) * conv_y(zq) + conv_b(zq)."""

    def __init__(self, cfg: MoVQConfig, channels: int, zq_channels: int):
        super().__init__()
        self.norm_layer = _group_norm(cfg, channels)
        self.conv_y = _conv1(zq_channels, channels)
        self.conv_b = _conv1(zq_channels, channels)

    def forward(self, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        scale = F.interpolate(self.conv_y(zq), size=size, mode="nearest")
        shift = F.interpolate(self.conv_b(zq), size=size, mode="nearest")
        return self.norm_layer(x) * scale + shift


class ResnetBlock(nn.Module):
    def __init__(self, cfg: MoVQConfig, in_channels: int, out_channels: int, zq_channels: int | None = None):
        super().__init__()
        self.conditioned = zq_channels is not None
        if self.conditioned:
            self.norm1 = SpatialNorm(cfg, in_channels, zq_channels)
            self.norm2 = SpatialNorm(cfg, out_channels, zq_channels)
        else:
            self.norm1 = _group_norm(cfg, in_channels)
            self.norm2 = _group_norm(cfg, out_channels)
        self.conv1 = _conv3(in_channels, out_channels)
        self.conv2 = _conv3(out_channels, out_channels)
        if in_channels != out_channels:
            self.nin_shortcut = _conv1(in_channels, out_channels)
        else:
            self.nin_shortcut = None

    def _norm(self, norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None) -> torch.Tensor:
        return norm(x, zq) if self.conditioned else norm(x)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(_swish(self._norm(self.norm1, x, zq)))
        h = self.conv2(_swish(self._norm(self.norm2, h, zq)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of the feature map (MatMul + Softmax)."""

    def __init__(self, cfg: MoVQConfig, channels: int, zq_channels: int | None = None):
        super().__init__()
        self.conditioned = zq_channels is not None
        self.norm = SpatialNorm(cfg, channels, zq_channels) if self.conditioned else _group_norm(cfg, channels)
        self.q = _conv1(channels, channels)
        self.k = _conv1(channels, channels)
        self.v = _conv1(channels, channels)
        self.proj_out = _conv1(channels, channels)
        self.scale = 1.0 / math.sqrt(channels)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        nx = self.norm(x, zq) if self.conditioned else self.norm(x)
        b, c, h, w = x.shape
        q = self.q(nx).reshape(b, c, h * w).transpose(1, 2)  # [b, hw, c]
        k = self.k(nx).reshape(b, c, h * w)  # [b, c, hw]
        v = self.v(nx).reshape(b, c, h * w)  # [b, c, hw]
        attn = torch.softmax(torch.matmul(q, k) * self.scale, dim=-1)  # [b, hw(query), hw(key)]
        out = torch.matmul(v, attn.transpose(1, 2)).reshape(b, c, h, w)  # [b, c, hw(query)] -> map
        return x + self.proj_out(out)


def _repeat_channels(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """x.repeat_interleave(repeats, dim=1) for [b, c, h, w], as an expand + reshape."""
    b, c, h, w = x.shape
    return x[:, :, None].expand(b, c, repeats, h, w).reshape(b, c * repeats, h, w)


def _group_mean(x: torch.Tensor, group: int) -> torch.Tensor:
    """Mean over consecutive channel groups: [b, c, h, w] -> [b, c/group, h, w]."""
    b, c, h, w = x.shape
    return x.reshape(b, c // group, group, h, w).mean(dim=2)


class DCDownBlock2d(nn.Module):
    """conv to c/4 channels + pixel_unshuffle(2), plus pixel_unshuffle(x) averaged over groups of 4 channels.

    That shortcut is a 2x2 average pool: pixel_unshuffle puts the 2x2 block of channel c in channels
    [4c, 4c + 4), and the group mean averages exactly those. It is computed as the pool, which onnxruntime runs
    6-10x faster than the unshuffle's 6-D transpose of the full-resolution map (AveragePool 10-14 ms vs
    83-101 ms at 128 x 336 x 448 on 2 cores; `python -m benchmarks.layout_ops`). The conv branch's unshuffle
    exports as SpaceToDepth (export/portable_ops.py).
    """

    def __init__(self, channels: int):
        super().__init__()
        ratio = DC_FACTOR ** 2
        if channels % ratio:
            raise ConfigError(f"DC downsample: {channels} channels is not a multiple of {ratio}")
        self.conv = _conv3(channels, channels // ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(self.conv(x), DC_FACTOR) + F.avg_pool2d(x, DC_FACTOR)


class DCUpBlock2d(nn.Module):
    """conv to 4c channels + pixel_shuffle(2), plus each channel repeated 4 times then pixel_shuffle(2).

    That shortcut is a nearest 2x upsample (each pixel copied into its 2x2 block), computed as one: a Resize
    instead of Expand + Reshape + DepthToSpace, 3.5-4.7x faster in onnxruntime (`benchmarks/layout_ops.py`) and
    bit-identical.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels * DC_FACTOR ** 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(x), DC_FACTOR) + F.interpolate(x, scale_factor=float(DC_FACTOR),
                                                                        mode="nearest")


class Downsample(nn.Module):
    """Classic MoVQ downsampler: zero-pad right/bottom by 1, 3x3 conv stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels, stride=DC_FACTOR, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Classic MoVQ upsampler: nearest 2x, 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=float(DC_FACTOR), mode="nearest"))


def _check(cfg: MoVQConfig) -> None:
    if not cfg.ch_mult:
        raise ConfigError("MoVQConfig.ch_mult is empty")
    bad = [i for i in cfg.attn_resolutions if not 0 <= i < len(cfg.ch_mult)]
    if bad:
        raise ConfigError(f"MoVQConfig.attn_resolutions {cfg.attn_resolutions}: these are level indices in "
                          f"[0, {len(cfg.ch_mult)}) (release semantics), got {bad}")


class MoVQEncoder(nn.Module):
    """[b, 3, H, W] -> [b, z_channels, H/d, W/d], d = 2^(levels-1)."""

    def __init__(self, cfg: MoVQConfig):
        super().__init__()
        _check(cfg)
        self.cfg = cfg
        levels = len(cfg.ch_mult)
        self.conv_in = _conv3(cfg.in_channels, cfg.ch)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i in range(levels):
            block_out = cfg.ch * cfg.ch_mult[i]
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cfg, block_in, block_out))
                block_in = block_out
                if i in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(cfg, block_in))
            if i != levels - 1:
                level.downsample = DCDownBlock2d(block_in) if cfg.use_dc_up_down_blocks else Downsample(block_in)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cfg, block_in, block_in)
        self.mid.attn_1 = AttnBlock(cfg, block_in)
        self.mid.block_2 = ResnetBlock(cfg, block_in, block_in)
        self.norm_out = _group_norm(cfg, block_in)
        out_channels = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = _conv3(block_in, out_channels)
        if cfg.use_dc_up_down_blocks and block_in % out_channels:
            raise ConfigError(f"MoVQ encoder: the output shortcut averages groups of channels, so {block_in} "
                              f"channels must be a multiple of z_channels ({out_channels})")
        self.out_group = block_in // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        h = _swish(self.norm_out(h))
        if self.cfg.use_dc_up_down_blocks:
            return self.conv_out(h) + _group_mean(h, self.out_group)
        return self.conv_out(h)


class MoVQDecoder(nn.Module):
    """decoder(z [b, z_channels, h, w], zq [b, embed_dim, h, w]) -> [b, out_channels, h*d, w*d]."""

    def __init__(self, cfg: MoVQConfig):
        super().__init__()
        _check(cfg)
        self.cfg = cfg
        levels = len(cfg.ch_mult)
        zq_ch = cfg.embed_dim
        block_in = cfg.ch * cfg.ch_mult[-1]
        if cfg.use_dc_up_down_blocks and (block_in % cfg.embed_dim or cfg.z_channels != cfg.embed_dim):
            raise ConfigError(f"MoVQ decoder: the input shortcut repeats the {cfg.z_channels} code channels "
                              f"{block_in}//{cfg.embed_dim} times to {block_in}; needs z_channels == embed_dim and "
                              f"embed_dim dividing {block_in}")
        self.in_repeats = block_in // cfg.embed_dim
        self.conv_in = _conv3(cfg.z_channels, block_in)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cfg, block_in, block_in, zq_ch)
        self.mid.attn_1 = AttnBlock(cfg, block_in, zq_ch)
        self.mid.block_2 = ResnetBlock(cfg, block_in, block_in, zq_ch)
        ups: list[nn.Module] = [nn.Module() for _ in range(levels)]
        for i in reversed(range(levels)):  # coarsest first, as the data flows
            block_out = cfg.ch * cfg.ch_mult[i]
            level = ups[i]
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(cfg, block_in, block_out, zq_ch))
                block_in = block_out
                if i in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(cfg, block_in, zq_ch))
            if i != 0:
                level.upsample = DCUpBlock2d(block_in) if cfg.use_dc_up_down_blocks else Upsample(block_in)
        self.up = nn.ModuleList(ups)
        self.norm_out = SpatialNorm(cfg, block_in, zq_ch)
        self.conv_out = _conv3(block_in, cfg.out_channels)

    def forward(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        if self.cfg.use_dc_up_down_blocks:
            h = h + _repeat_channels(z, self.in_repeats)
        h = self.mid.block_1(h, zq)
        h = self.mid.attn_1(h, zq)
        h = self.mid.block_2(h, zq)
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h, zq)
                if len(level.attn) > 0:
                    h = level.attn[j](h, zq)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h, zq)))


def build_movq_encoder(cfg: MoVQConfig) -> MoVQEncoder:
    """The pixel-branch encoder (no quant conv: the MLLM feeds its output to the projector directly)."""
    return MoVQEncoder(cfg).eval()


def build_movq_decoder(cfg: MoVQConfig) -> MoVQDecoder:
    return MoVQDecoder(cfg).eval()


def build_post_quant_conv(cfg: MoVQConfig) -> nn.Conv2d:
    """DualViTok's `pixel_post_quant_conv`: 1x1 conv from the concatenated code maps (embed_dim channels) to
    the decoder's z_channels."""
    return _conv1(cfg.embed_dim, cfg.z_channels).eval()
