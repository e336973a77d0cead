"""ILLUME-nano's stage 0: the LLM's language pretraining, on text alone.

ILLUME starts from a pretrained LLM (Qwen2.5) that already reads a passage and answers questions about it.
The nano LLM starts from random weights, so this stage stands in for that pretraining: the scene is written
out as text ("a red triangle at the top left and a blue circle on the right"), a question about it follows,
and the loss is on the answer. Looking an object up by one attribute and reading off another is a two-step
circuit that a 4-layer LLM learns only after a long plateau (docs/nano.md, "Binding"): a few thousand steps
of text teach it before the multimodal stages start.

`phases` run in order with one optimizer and one one-cycle schedule over all their steps; each phase draws
its questions from its own kinds. The recipe runs one phase of every kind (`recipe.stage0_phases`); the
probes' `--text-lookup` tries others (e.g. color first, the lookup whose answer precedes the asked word).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..runtime.prompts import TextTokenizer
from . import world
from .llm_train import LLMTrainer
from .progress import Progress
from .sequences import IGNORE

Phase = tuple[tuple[str, ...], int]  # (QA kinds, steps)
LAYOUTS = ("scene-first", "question-first")
# (scene, question) pairs -> (the LLM's keyword inputs, labels [B, L]): how a batch of lookups is written
Encode = Callable[[Sequence[tuple[world.Scene, world.QA]]], tuple[dict[str, torch.Tensor], torch.Tensor]]


def lookup_pair(tok: TextTokenizer, im_end: int, scene: world.Scene, qa: world.QA,
                layout: str = "scene-first") -> tuple[list[int], list[int]]:
    """(ids, labels) of "<description>. <question> <answer><|im_end|>" (`layout` "question-first":
    "<question> <description>. <answer><|im_end|>"), labels only on the answer."""
    if layout not in LAYOUTS:
        raise ValueError(f"text pretraining: layout must be one of {LAYOUTS}, got {layout!r}")
    text = (f"{world.describe(scene)}. {qa.question}" if layout == "scene-first"
            else f"{qa.question} {world.describe(scene)}.")
    prompt = tok.encode(text)
    answer = tok.encode(" " + qa.answer) + [im_end]
    return prompt + answer, [IGNORE] * len(prompt) + answer


def pad_batch(pairs: Sequence[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, labels and attention mask [B, L]: positions stay 0..len-1, as in the LLM stages."""
    n, width = len(pairs), max(len(ids) for ids, _ in pairs)
    ids, labels = torch.full((n, width), pad, dtype=torch.long), torch.full((n, width), IGNORE)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, (x, y) in enumerate(pairs):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, labels, mask


def text_inputs(tok: TextTokenizer, im_end: int, layout: str = "scene-first") -> Encode:
    """Lookups as text (`lookup_pair`), right-padded: input_ids and attention_mask."""
    def encode(pairs):
        ids, labels, mask = pad_batch([lookup_pair(tok, im_end, s, q, layout) for s, q in pairs],
                                      pad=tok.cfg.tokens.endoftext)
        return {"input_ids": ids, "attention_mask": mask}, labels
    return encode


def check_phases(phases: Sequence[Phase]) -> None:
    for kinds, steps in phases:
        unknown = sorted(set(kinds) - set(world.QA_KINDS))
        if unknown or not kinds:
            raise ValueError(f"text pretraining: expected QA kinds among {world.QA_KINDS}, got {list(kinds)}")
        if steps < 0:
            raise ValueError(f"text pretraining: steps must be >= 0, got {steps} for {list(kinds)}")


def pretrain_text(llm: nn.Module, tok: TextTokenizer, im_end: int, wcfg: world.WorldConfig,
                  phases: Sequence[Phase], *, batch: int, lr: float, seed: int, progress: Progress,
                  every: int = 0, evaluate: Callable[[int, float], None] | None = None,
                  layout: str = "scene-first", encode: Encode | None = None) -> float:
    """Train every parameter of `llm` on text lookups (train-split scenes only). `evaluate(step, loss)` runs
    every `every` steps and after the last one (the probes' learning curves). `encode` writes the batches
    (default: `text_inputs` in `layout`; the probes' slot scenes give input embeddings). Returns the last loss."""
    check_phases(phases)
    encode = encode or text_inputs(tok, im_end, layout)
    total = sum(steps for _, steps in phases)
    if total == 0:
        return float("nan")
    params = list(llm.parameters())
    for p in params:
        p.requires_grad_(True)
    opt, sched = LLMTrainer.optimizer(params, lr=lr, steps=total)  # the LLM stages' optimizer and schedule
    rng = np.random.default_rng(seed)
    attn = llm.config._attn_implementation
    llm.set_attn_implementation("sdpa")
    llm.train()

    step, last = 0, float("nan")
    for kinds, steps in phases:
        for _ in range(steps):
            inputs, labels = encode([world.sample_qa(rng, wcfg, kinds) for _ in range(batch)])
            loss = llm(**inputs, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step, last = step + 1, loss.item()
            progress.update(step, loss=last)
            if evaluate is not None and ((every and step % every == 0) or step == total):
                llm.eval()
                evaluate(step, last)
                llm.train()
    llm.set_attn_implementation(attn)
    return last
