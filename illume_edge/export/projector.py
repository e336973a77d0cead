"""The 2-layer MLP projector that maps one input branch's features to the LLM hidden size.

Same layout as the release's MLPProjector (mlp_depth 2, no pre-norm): Linear, exact GELU, Linear, so the
checkpoint keys under `model.mm_projector.projector_{1,2}` are `0.weight`, `0.bias`, `2.weight`, `2.bias`.
"""
from __future__ import annotations

from torch import nn


def build_projector(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear(in_dim, out_dim) -> GELU (erf, not tanh) -> Linear(out_dim, out_dim)."""
    if in_dim <= 0 or out_dim <= 0:
        raise ValueError(f"build_projector: dimensions must be positive, got in_dim={in_dim}, out_dim={out_dim}")
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(approximate="none"), nn.Linear(out_dim, out_dim))


def projector_dims(projector: nn.Module) -> tuple[int, int]:
    """(in_dim, out_dim) of a projector built by `build_projector` (or any Sequential of Linears)."""
    linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"projector: expected a module with Linear layers, got {type(projector).__name__}")
    return linears[0].in_features, linears[-1].out_features
