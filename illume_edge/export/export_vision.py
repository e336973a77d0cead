"""ONNX exporters for the vision input branches and the VQ detokenizer, plus the VQ-decode torch oracle.

Graph contracts (float32 throughout; names are fixed, sizes in brackets; letters are dynamic):

vision_semantic  pixel_values [N, C*T*P*P], rotary_cos [N, head_dim], rotary_sin [N, head_dim]
                 -> features [N/m^2, llm_hidden]
                 One image per call. Rows of pixel_values are patches in merge-window order and the rotary
                 tables match them (both from runtime/image_prep.vit_inputs); features are row-major over the
                 merged grid.
vision_pixel     pixel_values [1, 3, H, W] (H, W multiples of the branch factor, mean/std 0.5 normalised)
                 -> features [(H/f)*(W/f), llm_hidden], row-major over the grid.
vq_decoder       codes_level{i} [1, code_dim_i, h_i, w_i] for every output level i (the effective-codebook rows
                 laid on that level's grid) -> image [1, 3, d*h_L, d*w_L] (raw decoder output, [-1, 1] scale,
                 not clamped). Inside: every level but the last is upsampled bicubic (a=-0.75,
                 align_corners=False) to the last level's grid, all are concatenated on channels in level order,
                 then post_quant_conv and decoder(quant2, quant), as DualViTok.decode.
"""
from __future__ import annotations

import os
from typing import Sequence

import onnx
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from illume_edge.config import CNNEncoderConfig, ConfigError, InputBranch, ModelConfig, ViTEncoderConfig
from illume_edge.export.onnx_io import ExportError, GraphInfo, TensorInfo, export_onnx
from illume_edge.export.projector import projector_dims
from illume_edge.export.vit import ViTFeatures

# Largest grids the dynamic dimensions are declared for (tokens per side); ILLUME+ anchors stay far below.
MAX_GRID_SIDE = 256
# Example grid of the semantic export (merged tokens): distinct, non-square sizes so no dimension specialises.
_EXAMPLE_MERGED_GRID = (2, 3)


# ----------------------------------------------------------------------------------------------------
# Wrappers
# ----------------------------------------------------------------------------------------------------
class PixelFeatures(nn.Module):
    """encoder [1, 3, H, W] -> [1, C, h, w] -> rows [h*w, C] (row-major) -> projector."""

    def __init__(self, encoder: nn.Module, projector: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(pixel_values)  # [1, C, h, w]
        c = feats.shape[1]
        rows = feats.reshape(c, -1).transpose(0, 1)  # [h*w, C], row-major over the grid
        return self.projector(rows)


def merge_code_maps(code_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Upsample every map but the last bicubic to the last one's grid; concatenate on channels in order."""
    size = code_maps[-1].shape[-2:]
    resized = [F.interpolate(m, size=size, mode="bicubic", align_corners=False) for m in code_maps[:-1]]
    return torch.cat(resized + [code_maps[-1]], dim=1)


class VQDecode(nn.Module):
    """codes_level0, ..., codes_level{L-1} -> image (DualViTok.decode on precomputed code maps)."""

    def __init__(self, post_quant_conv: nn.Module, decoder: nn.Module):
        super().__init__()
        self.post_quant_conv = post_quant_conv
        self.decoder = decoder

    def forward(self, *code_maps: torch.Tensor) -> torch.Tensor:
        quant = merge_code_maps(code_maps)
        return self.decoder(self.post_quant_conv(quant), quant)


def reference_vq_decode(post_quant_conv: nn.Module, decoder: nn.Module,
                        code_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The VQ detokenizer in torch (the runtime's parity oracle): code maps [1, code_dim_i, h_i, w_i] in level
    order -> image [1, 3, d*h_L, d*w_L], raw (not clamped)."""
    code_maps = list(code_maps)
    if not code_maps:
        raise ValueError("reference_vq_decode: expected one code map per output level, got none")
    for i, m in enumerate(code_maps):
        if not isinstance(m, torch.Tensor) or m.ndim != 4 or m.shape[0] != 1:
            got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"reference_vq_decode: code map {i} must be a tensor [1, code_dim, h, w], got {got}")
    channels = sum(m.shape[1] for m in code_maps)
    expected = post_quant_conv.in_channels
    if channels != expected:
        raise ValueError(f"reference_vq_decode: code maps carry {channels} channels in all "
                         f"({[m.shape[1] for m in code_maps]}), post_quant_conv expects {expected}")
    with torch.no_grad():
        return VQDecode(post_quant_conv, decoder).eval()(*code_maps)


# ----------------------------------------------------------------------------------------------------
# Exporters
# ----------------------------------------------------------------------------------------------------
def _name_output_dims(info: GraphInfo, dims: dict[str, list[int | str]]) -> GraphInfo:
    """Give the outputs' dynamic dimensions readable names (shape inference leaves symbols like 's71').

    Only the graph's output declarations change; weights (inline or in the external-data sidecar) are untouched.
    """
    model = onnx.load(str(info.path), load_external_data=False)
    for out in model.graph.output:
        if out.name not in dims:
            continue
        want = dims[out.name]
        shape = out.type.tensor_type.shape
        if len(shape.dim) != len(want):
            raise ExportError(f"{info.path.name}: output {out.name!r} has rank {len(shape.dim)}, the contract says "
                               f"{len(want)} ({want})")
        for d, w in zip(shape.dim, want):
            if isinstance(w, str):
                d.dim_param = w
            elif d.HasField("dim_value") and d.dim_value != w:
                raise ExportError(f"{info.path.name}: output {out.name!r} has a fixed dimension {d.dim_value} where "
                                   f"the contract says {w}")
            else:
                d.dim_value = w
    onnx.save_model(model, str(info.path))
    info.outputs = [TensorInfo(o.name, o.dtype, list(dims.get(o.name, o.shape))) for o in info.outputs]
    return info


def _check_projector(projector: nn.Module, branch: InputBranch) -> int:
    in_dim, out_dim = projector_dims(projector)
    if in_dim != branch.in_dim:
        raise ConfigError(f"vision_{branch.name}: projector input width {in_dim} != the {branch.name} encoder's "
                          f"output width {branch.in_dim}; build it with build_projector(branch.in_dim, llm_hidden)")
    return out_dim


def export_vision_semantic(vit: nn.Module, projector: nn.Module, branch: InputBranch,
                           path: str | os.PathLike) -> GraphInfo:
    """Export the ViT branch (`ViTFeatures` + projector) for one image with a dynamic patch count."""
    cfg = branch.encoder
    if not isinstance(cfg, ViTEncoderConfig):
        raise ConfigError(f"export_vision_semantic: branch {branch.name!r} has a {type(cfg).__name__}, expected a "
                          f"ViTEncoderConfig; export CNN branches with export_vision_pixel")
    hidden = _check_projector(projector, branch)
    module = ViTFeatures(vit, cfg, projector).eval()
    unit = cfg.spatial_merge_size ** 2
    head_dim = cfg.embed_dim // cfg.num_heads
    n = unit * _EXAMPLE_MERGED_GRID[0] * _EXAMPLE_MERGED_GRID[1]
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(n, cfg.patch_dim, generator=gen), torch.rand(n, head_dim, generator=gen),
            torch.rand(n, head_dim, generator=gen))
    merged = Dim("merged_tokens", min=1, max=MAX_GRID_SIDE * MAX_GRID_SIDE)
    patches = unit * merged
    dynamic = ({0: patches}, {0: patches}, {0: patches})
    info = export_onnx(module, args, path, input_names=["pixel_values", "rotary_cos", "rotary_sin"],
                       output_names=["features"], dynamic_shapes=dynamic)
    return _name_output_dims(info, {"features": ["merged_tokens", hidden]})


def export_vision_pixel(encoder: nn.Module, projector: nn.Module, branch: InputBranch,
                        path: str | os.PathLike) -> GraphInfo:
    """Export the CNN branch (encoder + row-major flatten + projector) with dynamic H and W."""
    cfg = branch.encoder
    if not isinstance(cfg, CNNEncoderConfig):
        raise ConfigError(f"export_vision_pixel: branch {branch.name!r} has a {type(cfg).__name__}, expected a "
                          f"CNNEncoderConfig; export ViT branches with export_vision_semantic")
    hidden = _check_projector(projector, branch)
    f = cfg.factor
    module = PixelFeatures(encoder, projector).eval()
    example = torch.randn(1, cfg.movq.in_channels, 2 * f, 3 * f, generator=torch.Generator().manual_seed(0))
    gh = Dim("grid_h", min=1, max=MAX_GRID_SIDE)
    gw = Dim("grid_w", min=1, max=MAX_GRID_SIDE)
    dynamic = ({2: f * gh, 3: f * gw},)
    info = export_onnx(module, (example,), path, input_names=["pixel_values"], output_names=["features"],
                       dynamic_shapes=dynamic)
    return _name_output_dims(info, {"features": ["grid_h*grid_w", hidden]})


def vq_decoder_input_names(cfg: ModelConfig) -> list[str]:
    return [f"codes_level{i}" for i in range(cfg.num_levels)]


def export_vq_decoder(post_quant_conv: nn.Module, decoder: nn.Module, cfg: ModelConfig,
                      path: str | os.PathLike) -> GraphInfo:
    """Export `VQDecode`: one code-map input per level, dynamic grids, image out."""
    if cfg.vq_decoder is None:
        raise ConfigError(f"{cfg.name}: the config has no vq_decoder; export the diffusion decoder instead")
    movq = cfg.vq_decoder.movq
    code_dims = [lv.code_dim for lv in cfg.levels]
    if sum(code_dims) != movq.embed_dim or post_quant_conv.in_channels != movq.embed_dim:
        raise ConfigError(f"{cfg.name}: the levels' code dims {code_dims} (sum {sum(code_dims)}) must equal "
                          f"vq_decoder.movq.embed_dim {movq.embed_dim} and post_quant_conv's input channels "
                          f"{post_quant_conv.in_channels}")
    built_for = getattr(decoder, "cfg", movq)
    if built_for != movq:
        raise ConfigError(f"{cfg.name}: the decoder was built for {built_for}, the config's vq_decoder.movq is {movq}; "
                          f"build it with build_movq_decoder(cfg.vq_decoder.movq)")
    gen = torch.Generator().manual_seed(0)
    args, dynamic = [], []
    for i, dim in enumerate(code_dims):
        # Example grids differ per level and per side so that no dimension is specialised or tied to another.
        h, w = 2 + 2 * i, 3 + 2 * i
        args.append(torch.randn(1, dim, h, w, generator=gen))
        dynamic.append({2: Dim(f"level{i}_h", min=1, max=MAX_GRID_SIDE),
                        3: Dim(f"level{i}_w", min=1, max=MAX_GRID_SIDE)})
    module = VQDecode(post_quant_conv, decoder).eval()
    return export_onnx(module, tuple(args), path, input_names=vq_decoder_input_names(cfg), output_names=["image"],
                       dynamic_shapes=(tuple(dynamic),))  # one spec tuple for the *code_maps parameter
