"""SimVQ code tables of the DualViTok quantizers (one per output level).

The release's quantizer (`vision_tokenizer/tokenizer/vector_quantize_pytorch/sim_vq.py`, built with
`channel_first=True, rotation_trick=False`) keeps a *frozen* Gaussian table as a registered buffer
`frozen_codebook` [N, dim] and learns a bias-free linear map `code_transform` (nn.Linear(dim, dim,
bias=False)). The code an index decodes to is row `index` of `code_transform(frozen_codebook)`; encoding is
the Euclidean nearest neighbour on that effective table (`torch.cdist` + argmin, in blocks of 32,768 codes
when the table is larger). State-dict names (under each level's `quantizer_prefix`):

    <prefix>.frozen_codebook        [codebook_size, dim]   buffer (saved in the checkpoint)
    <prefix>.code_transform.weight  [dim, dim]             parameter, no bias

The runtime never sees this module: the engine stores `effective_table()` as a `.npy` and the host gathers
rows of it.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..errors import CheckpointError

# The release compares inputs with at most this many codes at a time (its cdist block size).
SEARCH_BLOCK = 32768


class SimVQ(nn.Module):
    """Frozen Gaussian codebook times a learned linear map; channel-first code maps [B, dim, h, w]."""

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        # Same init as the release (only matters for random tiny checkpoints): N(0, 1/dim).
        self.register_buffer("frozen_codebook", torch.randn(codebook_size, dim) * dim ** -0.5)
        self.code_transform = nn.Linear(dim, dim, bias=False)

    def effective_table(self) -> torch.Tensor:
        """[codebook_size, dim]: row i is the code index i decodes to (= code_transform(frozen_codebook))."""
        return self.code_transform(self.frozen_codebook)

    @torch.no_grad()
    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code per position: z [B, dim, h, w] -> indices int64 [B, h, w]."""
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"SimVQ.quantize: expected z of shape [B, {self.dim}, h, w], got {tuple(z.shape)}")
        b, _, h, w = z.shape
        x = z.permute(0, 2, 3, 1).reshape(b, h * w, self.dim).float()  # [B, h*w, dim]
        table = self.effective_table().float()
        best_dist = best_idx = None
        for start in range(0, self.codebook_size, SEARCH_BLOCK):
            dist = torch.cdist(x, table[start:start + SEARCH_BLOCK])  # [B, h*w, block]
            d, i = dist.min(dim=-1)
            i = i + start
            if best_dist is None:
                best_dist, best_idx = d, i
            else:
                # strictly closer wins: on a tie the earlier block keeps it, as the release's stacked min does
                closer = d < best_dist
                best_dist = torch.where(closer, d, best_dist)
                best_idx = torch.where(closer, i, best_idx)
        return best_idx.reshape(b, h, w)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B, h, w] (integer) -> code map [B, dim, h, w]."""
        if indices.ndim != 3 or indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"SimVQ.indices_to_codes: expected integer indices [B, h, w], got "
                             f"{indices.dtype} {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"SimVQ.indices_to_codes: indices must lie in [0, {self.codebook_size}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        codes = self.effective_table()[indices.long()]  # [B, h, w, dim]
        return codes.permute(0, 3, 1, 2).contiguous()

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str, *,
                        codebook_size: int | None = None, dim: int | None = None,
                        where: str = "DualViTok state dict") -> "SimVQ":
        """Build one level's quantizer from a DualViTok state dict (keys under `prefix`), checking shapes."""
        keys = {"frozen_codebook": f"{prefix}.frozen_codebook",
                "code_transform.weight": f"{prefix}.code_transform.weight"}
        missing = [k for k in keys.values() if k not in state_dict]
        if missing:
            raise CheckpointError(f"{where}: missing key(s) {missing} (a SimVQ quantizer stores its frozen table "
                                  f"as a buffer and a bias-free code_transform)")
        extra = sorted(k for k in state_dict if k.startswith(prefix + ".") and k not in keys.values())
        if extra:
            raise CheckpointError(f"{where}: unexpected key(s) {extra} under {prefix!r}; expected exactly "
                                  f"{sorted(keys.values())}")
        table = state_dict[keys["frozen_codebook"]]
        weight = state_dict[keys["code_transform.weight"]]
        n, d = (int(s) for s in table.shape) if table.ndim == 2 else (-1, -1)
        want_n = codebook_size if codebook_size is not None else n
        want_d = dim if dim is not None else d
        if table.shape != (want_n, want_d) or want_n <= 0:
            raise CheckpointError(f"{where}: {keys['frozen_codebook']} has shape {tuple(table.shape)}, expected "
                                  f"({want_n}, {want_d}); check the level's codebook_size / code_dim in the config")
        if weight.shape != (want_d, want_d):
            raise CheckpointError(f"{where}: {keys['code_transform.weight']} has shape {tuple(weight.shape)}, "
                                  f"expected ({want_d}, {want_d})")
        q = cls(want_n, want_d)
        q.load_state_dict({"frozen_codebook": table.float(), "code_transform.weight": weight.float()}, strict=True)
        return q
