"""ILLUME-nano's vision side: the semantic ViT (pretrained on the world) and its SimVQ tokenizer (torch).

- The ViT is the model family's Qwen2-VL encoder. It stands in for ILLUME+'s pretrained semantic encoder, so it
  is pretrained first on a supervised task of the world: every merged token predicts what its cell holds
  (empty, or shape x color) and which quarter of that cell it sees; optionally also where the token is (its
  row and column; `pretrain_vit`'s ``position_weight``). Its features then carry the semantics the LLM must
  read and write.
- The tokenizer is DualViTok's semantic half at nano scale: an MLP to the code dimension, a SimVQ quantizer
  (frozen Gaussian table x learned linear map, the release's layout) and a small decoder that reconstructs the
  ViT features from the codes; code c is assigned to token class c (see `train_tokenizer`).
  Codes of an image = its 6x6 grid of nearest-code indices.

Inputs are made with the runtime's own preprocessing (`preprocess_image`, `vit_inputs`), so training and
inference see identical pixels.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, ViTEncoderConfig
from ..runtime.image_prep import preprocess_image, vit_inputs
from . import world
from .progress import Progress


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def vit_batch(images: list[np.ndarray], cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixel_values [B, N, patch_dim], cos [N, hd], sin [N, hd]) for same-size uint8 images."""
    enc = cfg.branches[0].encoder
    ins = [vit_inputs(preprocess_image(im, cfg), enc) for im in images]
    pv = torch.from_numpy(np.stack([i.pixel_values for i in ins]))
    return pv, torch.from_numpy(ins[0].rotary_cos), torch.from_numpy(ins[0].rotary_sin)


def vit_forward(vit: nn.Module, enc: ViTEncoderConfig, pv: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
    """The exported `ViTFeatures` computation with a batch dimension: [B, N, patch_dim] -> [B, N/4, out_dim]."""
    b, n, _ = pv.shape
    e, heads = enc.embed_dim, enc.num_heads
    hd = e // heads
    x = pv @ vit.patch_embed.proj.weight.reshape(e, -1).t()  # [B, N, E]
    for blk in vit.blocks:
        qkv = blk.attn.qkv(blk.norm1(x)).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)  # [3, B, H, N, hd]
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, hd]
        x = x + blk.attn.proj(out.transpose(1, 2).reshape(b, n, e))
        x = x + blk.mlp(blk.norm2(x))
    m = enc.spatial_merge_size ** 2
    x = vit.merger.ln_q(x).reshape(b, n // m, m * e)  # [B, N/4, 4E]: one merge window per row
    return vit.merger.mlp(x)


def token_classes(scene: "world.Scene", grid: tuple[int, int], cfg: world.WorldConfig) -> np.ndarray:
    """int64 [rows*cols]: 0 for a token on an empty cell, else 1 + (object kind * 4 + quarter of the cell)."""
    rows, cols = grid
    per_r, per_c = rows // cfg.grid, cols // cfg.grid  # tokens per cell side (2 x 2 for the nano layout)
    out = np.zeros((rows, cols), dtype=np.int64)
    n_colors = len(world.COLORS)
    for o in scene.objects:
        kind = world.SHAPES.index(o.shape) * n_colors + list(world.COLORS).index(o.color)
        for dr in range(per_r):
            for dc in range(per_c):
                quarter = dr * per_c + dc
                out[o.row * per_r + dr, o.col * per_c + dc] = 1 + kind * per_r * per_c + quarter
    return out.reshape(-1)


def num_token_classes(grid: tuple[int, int], cfg: world.WorldConfig) -> int:
    per = (grid[0] // cfg.grid) * (grid[1] // cfg.grid)
    return 1 + len(world.SHAPES) * len(world.COLORS) * per


class SemanticTokenizer(nn.Module):
    """Features -> code_dim -> nearest SimVQ code -> reconstructed features (DualViTok's semantic half).

    State-dict groups as saved in the DualViTok file: ``semantic_encoder.proj`` (an MLP, features -> code_dim),
    the level's quantizer, ``semantic_decoder.*`` (reconstruction + class head, training only).
    """

    def __init__(self, quantizer: nn.Module, in_dim: int, n_classes: int):
        super().__init__()
        d = quantizer.dim
        self.proj = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, d))
        self.quantizer = quantizer
        self.decoder = nn.Sequential(nn.Linear(d, in_dim), nn.GELU(), nn.Linear(in_dim, in_dim))
        self.classes = nn.Linear(d, n_classes)  # training only: its size is the number of token classes
        self.register_buffer("feature_scale", torch.ones(()))  # ViT features are divided by it before proj

    def encode(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """feats [B, T, F] -> (z [B, T, d], codes [B, T, d] straight-through, indices [B, T])."""
        z = self.proj(feats / self.feature_scale)
        table = self.quantizer.effective_table()  # [K, d]
        idx = torch.cdist(z.reshape(-1, z.shape[-1]), table).argmin(-1).reshape(z.shape[:-1])
        q = table[idx]
        return z, q, idx

    @torch.no_grad()
    def indices(self, feats: torch.Tensor) -> torch.Tensor:
        return self.encode(feats)[2]

    @classmethod
    def from_dualvitok(cls, state: dict[str, torch.Tensor], quantizer: nn.Module, in_dim: int) -> "SemanticTokenizer":
        """Rebuild the encoder side from a DualViTok file written by the recipe (recipe.dualvitok_extra)."""
        def group(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}

        classes = group("semantic_decoder.classes.")
        tok = cls(quantizer, in_dim, classes["weight"].shape[0])
        tok.proj.load_state_dict(group("semantic_encoder.proj."))
        tok.classes.load_state_dict(classes)
        tok.feature_scale.fill_(float(state["semantic_encoder.feature_scale"]))
        decoder = {k: v for k, v in group("semantic_decoder.").items() if not k.startswith("classes.")}
        tok.decoder.load_state_dict(decoder)
        return tok.eval().requires_grad_(False)


class VisionTower:
    """Frozen ViT + tokenizer for the LLM and decoder trainers: features and codes of uint8 images."""

    def __init__(self, cfg: ModelConfig, vit: nn.Module, tokenizer: SemanticTokenizer):
        self.cfg, self.vit, self.tokenizer = cfg, vit, tokenizer
        self.enc = cfg.branches[0].encoder

    @torch.no_grad()
    def features(self, images: list[np.ndarray]) -> torch.Tensor:
        """[B, T, out_dim] ViT features (row-major over the 6x6 grid)."""
        if not images:
            return torch.zeros(0, 0, self.enc.out_dim)
        return vit_forward(self.vit, self.enc, *vit_batch(images, self.cfg))

    @torch.no_grad()
    def codes(self, images: list[np.ndarray], feats: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] int64 code indices."""
        return self.tokenizer.indices(self.features(images) if feats is None else feats)


def _scene_batch(rng: np.random.Generator, wcfg: world.WorldConfig, n: int) -> list["world.Scene"]:
    return [world.sample_scene(rng, wcfg, split="train") for _ in range(n)]


def pretrain_vit(cfg: ModelConfig, vit: nn.Module, wcfg: world.WorldConfig, *, steps: int, batch: int,
                 lr: float, seed: int, progress: Progress, position_weight: float = 0.0) -> nn.Module:
    """Supervised pretraining on per-token cell classes; returns the linear probe (discarded afterwards).

    ``position_weight`` > 0 adds a second linear head: every merged token also predicts its own row and column
    in the token grid (cross-entropies weighted by ``position_weight``). The ViT's 2-D RoPE is relative, so
    without this target its features say what a token holds and not where it is (a linear probe reads the
    cell's row at chance: docs/nano.md, "Where an object is"); a pretrained CLIP-style encoder's features do
    carry position, and the LLM's position and relation answers need it."""
    enc = cfg.branches[0].encoder
    grid = cfg.level_grid(0, *cfg.anchors[0])
    rows, cols = grid
    probe = nn.Linear(enc.out_dim, num_token_classes(grid, wcfg))
    params = list(vit.parameters()) + list(probe.parameters())
    if position_weight > 0:  # built only when used: its initialisation draws from torch's generator
        where = nn.Linear(enc.out_dim, rows + cols)  # [row logits | column logits] per token
        params += list(where.parameters())
        row_ids = torch.arange(rows * cols).repeat(batch) // cols  # [B*T], row-major over each grid
        col_ids = torch.arange(rows * cols).repeat(batch) % cols
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    vit.train()
    for step in range(steps):
        scenes = _scene_batch(rng, wcfg, batch)
        pv, cos, sin = vit_batch([world.render(s, wcfg) for s in scenes], cfg)
        labels = torch.from_numpy(np.stack([token_classes(s, grid, wcfg) for s in scenes]))
        feats = vit_forward(vit, enc, pv, cos, sin)  # [B, T, out_dim]
        logits = probe(feats)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        stats = {"token_acc": (logits.argmax(-1) == labels).float().mean().item()}
        if position_weight > 0:
            pos = where(feats).reshape(-1, rows + cols)  # [B*T, rows + cols]
            r, c = pos[:, :rows], pos[:, rows:]
            loss = loss + position_weight * (F.cross_entropy(r, row_ids) + F.cross_entropy(c, col_ids))
            stats["position_acc"] = ((r.argmax(-1) == row_ids) & (c.argmax(-1) == col_ids)).float().mean().item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        progress.update(step + 1, loss=loss.item(), **stats)
    vit.eval().requires_grad_(False)
    return probe


ASSIGN_TEMPERATURE = 0.1  # code distances are O(1): the table's rows are N(0, 1/dim) points mapped by a near-identity


def train_tokenizer(cfg: ModelConfig, vit: nn.Module, tokenizer: SemanticTokenizer, wcfg: world.WorldConfig, *,
                    steps: int, batch: int, lr: float, seed: int, progress: Progress) -> None:
    """Reconstruct the (standardised) ViT features from the codes, the table learning through SimVQ's code
    transform. The world's token classes are known, so code ``c`` is assigned to class
    ``c``: a commitment to the assigned code plus a cross-entropy on negative code distances pull each class
    onto its own code. (Plain nearest-code VQ losses left ~20% of tokens on a neighbour's code and used ~23
    codes for 73 classes: a shared linear map cannot move one code alone.)"""
    enc = cfg.branches[0].encoder
    grid = cfg.level_grid(0, *cfg.anchors[0])
    if tokenizer.classes.out_features > tokenizer.quantizer.codebook_size:
        raise ValueError(f"train_tokenizer: {tokenizer.classes.out_features} token classes need at least as many "
                         f"codes, the codebook has {tokenizer.quantizer.codebook_size}")
    opt = torch.optim.AdamW([p for p in tokenizer.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    tokenizer.train()
    with torch.no_grad():
        probe = [world.render(world.sample_scene(rng, wcfg), wcfg) for _ in range(4 * batch)]
        tokenizer.feature_scale.fill_(float(vit_forward(vit, enc, *vit_batch(probe, cfg)).std()))
    for step in range(steps):
        scenes = _scene_batch(rng, wcfg, batch)
        with torch.no_grad():
            feats = vit_forward(vit, enc, *vit_batch([world.render(s, wcfg) for s in scenes], cfg))
            feats = feats / tokenizer.feature_scale
        labels = torch.from_numpy(np.stack([token_classes(s, grid, wcfg) for s in scenes])).reshape(-1)
        z = tokenizer.proj(feats).reshape(-1, tokenizer.quantizer.dim)  # [B*T, d] (feats already scaled)
        table = tokenizer.quantizer.effective_table()  # [K, d]
        dist = torch.cdist(z, table)  # [B*T, K]
        idx = dist.argmin(-1)
        # the decoder reads the codes as the detokenizer will (no straight-through gradient into the encoder: it
        # pulled tokens onto wrong codes early on)
        recon = F.mse_loss(tokenizer.decoder(table[idx].detach()), feats.reshape(-1, feats.shape[-1]))
        commit = F.mse_loss(z, table[labels])  # encoder and table meet at the assigned code
        assign = F.cross_entropy(-dist / ASSIGN_TEMPERATURE, labels)
        loss = recon + commit + assign
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        progress.update(step + 1, loss=loss.item(), recon=recon.item(), code_acc=(idx == labels).float().mean().item())
    tokenizer.eval().requires_grad_(False)


@torch.no_grad()
def code_purity(tower: VisionTower, wcfg: world.WorldConfig, n: int = 256, seed: int = 99) -> float:
    """Fraction of tokens whose code maps to one cell class only (1.0: codes are exactly the world's semantics)."""
    rng = np.random.default_rng(seed)
    grid = tower.cfg.level_grid(0, *tower.cfg.anchors[0])
    scenes = _scene_batch(rng, wcfg, n)
    idx = tower.codes([world.render(s, wcfg) for s in scenes]).reshape(-1).numpy()
    labels = np.stack([token_classes(s, grid, wcfg) for s in scenes]).reshape(-1)
    pure = 0
    for code in np.unique(idx):
        counts = np.bincount(labels[idx == code])
        pure += counts.max()
    return pure / len(idx)
