"""ILLUME-nano's LLM stages (torch): batches of `Example` s -> spliced input embeddings -> next-token loss.

The input image's continuous features go through the projector into the marker positions (exactly what
the runtime's prompt table does), the output image's codes are the vision tower's code indices written
as token ids. Which parameters train is the stage's choice (`trainable`):

- "vision_init": the projector, the token embeddings and the LM head (stage 1, the paper's visual embedding
  initialization; the transformer blocks stay as they are),
- "all": everything (stages 2, 3 and the self-enhancing fine-tune).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..runtime.prompts import IMAGE_MARKER
from .progress import Progress
from .sequences import CODE_MARKER, IGNORE, Example
from .vision_train import VisionTower

Sampler = Callable[[np.random.Generator], Example]


class LLMTrainer:
    def __init__(self, cfg: ModelConfig, llm: nn.Module, projector: nn.Module, tower: VisionTower):
        self.cfg, self.llm, self.projector, self.tower = cfg, llm, projector, tower
        self.first_code = cfg.levels[0].first_token_id

    def batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Right-padded inputs_embeds [B, L, hidden], attention_mask [B, L] and labels [B, L]."""
        n = max(len(e.ids) for e in examples)
        pad = self.cfg.tokens.endoftext
        ids = torch.full((len(examples), n), pad, dtype=torch.long)
        labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), n), dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, :len(e.ids)] = torch.tensor(e.ids)
            labels[i, :len(e.labels)] = torch.tensor(e.labels)
            mask[i, :len(e.ids)] = 1
        inputs = [im for e in examples for im in e.inputs]
        targets = [im for e in examples for im in e.targets]
        code_pos = ids == CODE_MARKER
        if targets:
            codes = self.tower.codes(targets).reshape(-1) + self.first_code  # in example order, row-major
            if int(code_pos.sum()) != codes.numel():
                raise ValueError(f"batch: {int(code_pos.sum())} code markers but {codes.numel()} target codes")
            ids[code_pos] = codes
            labels[labels == CODE_MARKER] = codes
        feat_pos = ids == IMAGE_MARKER
        embeds = self.llm.get_input_embeddings()(ids.clamp(min=0))  # [B, L, hidden]
        if inputs:
            feats = self.projector(self.tower.features(inputs))  # [N_images, T, hidden]
            if int(feat_pos.sum()) != feats.shape[0] * feats.shape[1]:
                raise ValueError(f"batch: {int(feat_pos.sum())} image markers but {feats.shape[0]} images x "
                                 f"{feats.shape[1]} features")
            embeds = embeds.masked_scatter(feat_pos.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]).to(embeds.dtype))
        return {"inputs_embeds": embeds, "attention_mask": mask, "labels": labels}

    def loss(self, examples: list[Example]) -> tuple[torch.Tensor, int]:
        """(Mean next-token loss over the batch's supervised tokens, their number)."""
        b = self.batch(examples)
        logits = self.llm(inputs_embeds=b["inputs_embeds"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"][:, 1:]  # [B, L-1]: token t+1 is predicted at position t
        counted = int((labels != IGNORE).sum())
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=IGNORE)
        return loss, counted

    def grouped_loss(self, examples: list[Example], groups: int) -> torch.Tensor:
        """Backpropagates the batch's mean token loss in ``groups`` length-sorted micro-batches (a mixed batch
        padded to its longest example wastes ~30% of the compute) and returns it. Same gradient as one
        batch: each micro-batch's mean is weighted by its share of the supervised tokens."""
        order = sorted(examples, key=lambda e: len(e.ids))
        chunks = [[order[i] for i in c] for c in np.array_split(np.arange(len(order)), groups) if len(c)]
        total = sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in order)
        out = torch.zeros(())
        for chunk in chunks:
            loss, counted = self.loss(chunk)
            part = loss * (counted / total)
            part.backward()
            out += part.detach()
        return out

    def set_trainable(self, trainable: str) -> list[nn.Parameter]:
        self.llm.requires_grad_(trainable == "all")
        self.projector.requires_grad_(True)
        if trainable == "vision_init":
            self.llm.get_input_embeddings().requires_grad_(True)
            self.llm.get_output_embeddings().requires_grad_(True)
        elif trainable != "all":
            raise ValueError(f"trainable: expected 'vision_init' or 'all', got {trainable!r}")
        return [p for m in (self.llm, self.projector) for p in m.parameters() if p.requires_grad]

    @staticmethod
    def optimizer(params: list[nn.Parameter], *, lr: float, steps: int, warmup: float = 0.05):
        """(AdamW, one-cycle cosine schedule peaking at `lr` after `warmup` of `steps`): every LLM stage's."""
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=warmup,
                                                    anneal_strategy="cos")
        return opt, sched

    def train(self, sampler: Sampler, *, steps: int, batch: int, lr: float, seed: int, trainable: str,
              progress: Progress, warmup: float = 0.05, groups: int = 2) -> float:
        params = self.set_trainable(trainable)
        opt, sched = self.optimizer(params, lr=lr, steps=steps, warmup=warmup)
        rng = np.random.default_rng(seed)
        self.llm.train()
        self.projector.train()
        attn = self.llm.config._attn_implementation
        self.llm.set_attn_implementation("sdpa")  # ~1.5x faster training; the exporters keep their own attention
        last = float("nan")
        for step in range(steps):
            opt.zero_grad()
            loss = self.grouped_loss([sampler(rng) for _ in range(batch)], groups)
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            last = loss.item()
            progress.update(step + 1, loss=last)
        self.llm.set_attn_implementation(attn)
        self.llm.eval().requires_grad_(False)
        self.projector.eval().requires_grad_(False)
        return last

    @torch.no_grad()
    def eval_loss(self, sampler: Sampler, n: int, seed: int, batch: int = 32) -> float:
        rng = np.random.default_rng(seed)
        self.llm.eval()
        total = 0.0
        for start in range(0, n, batch):
            total += self.loss([sampler(rng) for _ in range(min(batch, n - start))])[0].item() * min(batch, n - start)
        return total / n
