"""Diagnostics of ILLUME-nano's LLM on a checkpoint (docs/nano.md, "Binding"), in torch:

- teacher-forced QA accuracy per question kind: a question counts as right when every answer token and the
  closing ``<|im_end|>`` is the argmax at its position, which is exactly when greedy decoding answers it
  right (tested against the runtime). Hundreds of questions in seconds, no decoding loop;
- ``--continue``: train the checkpoint's LLM further on a mixture and score it after every chunk (does the
  plateau move with more steps, a higher learning rate, QA only?);
- ``--attention``: where the position that predicts the answer looks, per layer and head, for "what color is
  the triangle?" / "what shape is the red object?": its attention mass on the image, the share of that mass on
  the asked-about object's tokens and on any object's tokens;
- ``--from-scratch``: the recipe's vision stages and LLM stages 1-3 (no decoder, no stage 4) with a variant
  (ViT pretrained on factored targets, another LLM RoPE base), scored after every LLM stage;
- ``--supervise-layer L``: continue on single-turn QA with an auxiliary loss that pulls layer L's attention at
  the answer position onto the asked-about object (`train_with_attention_supervision`);
- ``--vit-position``: is each token's cell (row, column) linearly readable from the checkpoint's ViT features
  (`vit_position`)? Not from the shipped ViT's: its 2-D RoPE is relative and its targets never ask where;
- ``--linear-probes L``: is the asked attribute linearly readable from the answer position's input to layer
  L (the query side), and each object token's shape and color from its layer-L keys (`linear_probes`)?
- ``--answer-style echo|describe-first``: ``--continue`` on answers in another format, scored in it
  (`restyle`): the asked object restated before its attribute, or the scene described before the answer;
- ``--text-lookup KINDS:STEPS,...``: the nano LLM trained from scratch on the same questions about the
  scene's *description* in text, no image at all, in phases (`text_lookup`, on the recipe's stage 0
  `text_pretrain`): can this LLM learn the lookup itself, and after how many steps?
- ``--image-lookup KINDS:STEPS,...`` (with ``--checkpoint``): a fresh LLM and projector on the checkpoint's
  vision tower, single-turn image questions of each phase's kinds in turn (`image_lookup`); ``--placed-vit
  STEPS`` first swaps in a fresh ViT pretrained with its own-position targets (`placed_vit_tower`);
- ``--slot-lookup KINDS:STEPS,...``: as ``--text-lookup``, with the scene as the image's 6 x 6 token grid, each
  object token the sum of its color and shape words' embeddings (`SlotScenes`): one position per object
  token, in the text's own directions, as an image token behind a projector aligned to the text space would be;
  ``--slot-placed`` adds each cell's row and column words to its tokens (features that carry their place);
- ``--layers N``: the fresh LLM of ``--text-lookup`` / ``--slot-lookup`` / ``--image-lookup`` N layers deep;
- ``--answer-style positions-first|winner-first|axis-first|named-axis`` with ``--slot-lookup`` /
  ``--image-lookup`` / ``--checkpoint``: also scores the relation answers' two parts apart (`relation_parts`):
  the positions, the named object or the places along the axis (after each object's name), and the yes / no
  after the true ones;
- every QA scoring also reports color, exist, position and relation per number of objects in the scene
  (`accuracy_by_objects`): a lookup that works only when one object is there shows;
- ``--extra-phase TASK=SHARE,...:STEPS --save-work WORK`` (with ``--checkpoint``): the weights trained further on
  edits / GenEval-style prompts with the stage-3 replay, saved as a work folder that ``recipe --stage3-from``
  takes (`extra_phase`): does a phase before stage 4 give back what a schedule lost?
- ``--judge PAIRS [--judge-evidence [--evidence-axis]]`` (with ``--checkpoint``): the self-assessment without
  free-running noise, teacher-forced on rendered held-out prompts, half right images and half near misses
  (`judge`): are the verdicts right on wrong images, and (with the evidence field) is the evidence?

Run: python -m illume_edge.nano.probes --checkpoint build/nano/stage3_checkpoint [--continue qa --steps 300
--chunks 2] [--attention] [--split train]
     python -m illume_edge.nano.probes --from-scratch [--vit-targets factored] [--rope-theta 1e6]
     python -m illume_edge.nano.probes --checkpoint build/nano/stage3_checkpoint --supervise-layer 1 [--attention]
     python -m illume_edge.nano.probes --checkpoint build/nano/stage3_checkpoint --linear-probes 1 --split train --per-kind 200
     python -m illume_edge.nano.probes --checkpoint build/nano/stage3_checkpoint --continue stage3 --answer-style echo
     python -m illume_edge.nano.probes --text-lookup color:4000,all:1500 [--hidden 256] [--lr 1e-3]
     python -m illume_edge.nano.probes --slot-lookup color:1000
     python -m illume_edge.nano.probes --slot-lookup relation:2000 --per-kind 100 [--layers 8] [--slot-placed] \
         [--answer-style positions-first]
     python -m illume_edge.nano.probes --checkpoint models/illume-nano --image-lookup color:250,color:250
     python -m illume_edge.nano.probes --checkpoint models/illume-nano --placed-vit 400 --answer-style axis-first \
         --image-lookup color+shape:650,color+shape+exist:350,position:400,position+relation:600,all:750
     python -m illume_edge.nano.probes --checkpoint models/illume-nano --vit-position
     python -m illume_edge.nano.probes --checkpoint build/nano/stage3_checkpoint --schedule judge-edit-light \
         --extra-phase edit=0.3,geneval=0.3:300 --save-work build/phase
     python -m illume_edge.nano.probes --checkpoint build/nano-evidence/checkpoint --judge 240 --judge-evidence
     python -m illume_edge.nano.probes --checkpoint CKPT --continue rendered --steps 400 --chunks 1 --judge 240 \
         --judge-evidence
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import PROMPT_LAYOUTS
from ..runtime.prompts import IMAGE_MARKER
from . import evaluate, recipe, text_pretrain, world
from .llm_train import LLMTrainer
from .recipe import load_modules
from .text import base_words
from .sequences import IGNORE, SequenceBuilder

QA = list[tuple[world.Scene, world.QA]]


def load_trainer(checkpoint: str | Path) -> tuple[LLMTrainer, SequenceBuilder]:
    """The checkpoint's LLM, projector and vision tower (ViT + tokenizer from its DualViTok file)."""
    _, trainer, builder = load_modules(checkpoint)
    return trainer, builder


def questions(per_kind: int, split: str, wcfg: world.WorldConfig = world.WorldConfig(), style: str = "short") -> QA:
    """`per_kind` questions of every kind: the evaluation's own held-out questions, or as many from training
    scenes (same seed), with their answers in `style` (see `restyle`)."""
    if style != "short":
        return [(s, restyle(s, q, style)) for s, q in questions(per_kind, split, wcfg)]
    if split == "heldout":
        return evaluate.heldout_tasks(evaluate.EvalSize(qa_per_kind=per_kind), wcfg)[0]
    rng, out = np.random.default_rng(evaluate.EVAL_SEED), []
    for kind in world.QA_KINDS:
        while sum(q.kind == kind for _, q in out) < per_kind:
            scene = world.sample_scene(rng, wcfg, split=split)
            q = world.make_qa(scene, rng, kind)
            if q is not None:
                out.append((scene, q))
    return out


@torch.no_grad()
def answers_right(trainer: LLMTrainer, builder: SequenceBuilder, qas: QA,
                  wcfg: world.WorldConfig = world.WorldConfig(), batch: int = 32,
                  parts: list[tuple[bool, bool]] | None = None) -> list[bool]:
    """Per question: is every answer token (and the closing <|im_end|>) the argmax at its position? With
    `parts`, also appends each question's `final_word_right` to it."""
    trainer.llm.eval()
    out: list[bool] = []
    for i in range(0, len(qas), batch):
        chunk = qas[i:i + batch]
        b = trainer.batch([builder.understand(world.render(s, wcfg), q.question, q.answer) for s, q in chunk])
        logits = trainer.llm(inputs_embeds=b["inputs_embeds"], attention_mask=b["attention_mask"]).logits
        out += teacher_forced_right(logits, b["labels"])
        if parts is not None:
            parts += final_word_right(logits, b["labels"])
    return out


def teacher_forced_right(logits: torch.Tensor, labels: torch.Tensor) -> list[bool]:
    """Per row of logits [B, L, V] and labels [B, L]: is every supervised token the argmax at its position?"""
    target = labels[:, 1:]  # [B, L-1]: token t+1 is predicted at position t
    return ((logits[:, :-1].argmax(-1) == target) | (target == IGNORE)).all(-1).tolist()


def final_word_right(logits: torch.Tensor, labels: torch.Tensor) -> list[tuple[bool, bool]]:
    """Per row of logits [B, L, V] and labels [B, L], teacher-forced: (every supervised token before the
    answer's last word right, that last word right). The last word is the token before the closing
    <|im_end|>: the "yes" / "no" of a reasoned relation answer (positions-first, winner-first, axis-first),
    predicted after the *true* reasoning."""
    target = labels[:, 1:]  # [B, L-1]: token t+1 is predicted at position t
    ok = logits[:, :-1].argmax(-1) == target
    out = []
    for r in range(len(target)):
        supervised = (target[r] != IGNORE).nonzero().flatten().tolist()
        if len(supervised) < 2:
            raise ValueError(f"final_word_right: row {r} has {len(supervised)} supervised tokens, expected an "
                             f"answer word and <|im_end|> at least")
        *before, last, _ = supervised
        out.append((bool(ok[r, before].all()), bool(ok[r, last])))
    return out


def relation_parts(qas: QA, parts: list[tuple[bool, bool]]) -> dict[str, float]:
    """The relation questions' share with every token before the yes / no right (`relation_reasoning`: the two
    positions of positions-first, the named object of winner-first, the two places of axis-first (with their
    objects' names in named-axis), and the separator) and with the yes / no right after the true reasoning
    (`relation_final`)."""
    rows = [p for (_, q), p in zip(qas, parts) if q.kind == "relation"]
    if not rows:
        return {}
    return {"relation_reasoning": round(float(np.mean([a for a, _ in rows])), 3),
            "relation_final": round(float(np.mean([b for _, b in rows])), 3)}


def accuracy_by_kind(qas: QA, right: list[bool]) -> dict[str, float]:
    """Accuracy per kind and "overall" (the mean over kinds, as the evaluation reports it)."""
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for (_, q), ok in zip(qas, right):
        by_kind[q.kind].append(ok)
    acc = {k: round(float(np.mean(v)), 3) for k, v in by_kind.items()}
    acc["overall"] = round(float(np.mean(list(acc.values()))), 3)
    return acc


def accuracy_by_objects(qas: QA, right: list[bool],
                        kinds: tuple[str, ...] = ("color", "exist", "position", "relation")) -> dict[str, float]:
    """Accuracy of the questions of `kinds` per number of objects in their scene: {"position_1": ..,
    "position_2": .., ...}. A lookup that only works when the scene holds one object shows here."""
    by: dict[str, list[bool]] = defaultdict(list)
    for (s, q), ok in zip(qas, right):
        if q.kind in kinds:
            by[f"{q.kind}_{len(s.objects)}"].append(ok)
    return {k: round(float(np.mean(v)), 3) for k, v in sorted(by.items())}


def asked_object(scene: world.Scene, q: world.QA, kinds: tuple[str, ...] = ("color", "shape")) -> world.Obj | None:
    """The one object a question of `kinds` is about (world.make_qa names it uniquely): color, shape, position,
    and exist when the answer is yes; None otherwise."""
    words = q.question.rstrip("?").split()
    if q.kind not in kinds:
        return None
    if q.kind == "color":  # "what color is the <shape>?"
        return scene.find(shape=words[-1])[0]
    if q.kind == "shape":  # "what shape is the <color> object?"
        return scene.find(color=words[-2])[0]
    if q.kind == "position":  # "where is the <color> <shape>?"
        return scene.find(shape=words[-1], color=words[-2])[0]
    if q.kind == "exist" and q.answer == "yes":  # "is there a <color> <shape>?"
        return scene.find(shape=words[-1], color=words[-2])[0]
    return None


SUPERVISED_KINDS = ("color", "shape", "position", "exist")


def train_with_attention_supervision(trainer: LLMTrainer, builder: SequenceBuilder, *, steps: int, lr: float,
                                     layer: int, weight: float, seed: int, batch: int = 32) -> None:
    """QA training (single-turn questions of every kind, training scenes) plus an auxiliary loss on `layer`'s
    attention: at the position that predicts the answer, -log of the mean over heads of the attention mass
    on the asked-about object's tokens (`asked_object`, SUPERVISED_KINDS), weighted by `weight`. A diagnostic:
    does a direct signal for selecting the named object move the plateau?"""
    wcfg = world.WorldConfig()
    grid = trainer.cfg.level_grid(0, *trainer.cfg.anchors[0])
    params = trainer.set_trainable("all")
    opt, sched = trainer.optimizer(params, lr=lr, steps=steps)
    rng = np.random.default_rng(seed)
    impl = trainer.llm.config._attn_implementation
    trainer.llm.set_attn_implementation("eager")  # attention weights (with gradients) come from eager only
    trainer.llm.train()
    trainer.projector.train()
    try:
        for _ in range(steps):
            exs, targets = [], []
            while len(exs) < batch:
                scene = world.sample_scene(rng, wcfg, split="train")
                q = world.make_qa(scene, rng, str(rng.choice(world.QA_KINDS)))
                if q is None:
                    continue
                ex = builder.understand(world.render(scene, wcfg), q.question, q.answer)
                obj = asked_object(scene, q, SUPERVISED_KINDS)
                image, at = _answer_layout(ex)
                targets.append(None if obj is None else (at, image[_cell_tokens([obj], grid, wcfg)]))
                exs.append(ex)
            b = trainer.batch(exs)
            out = trainer.llm(inputs_embeds=b["inputs_embeds"], attention_mask=b["attention_mask"],
                              output_attentions=True)
            labels = b["labels"][:, 1:]
            lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
            att = out.attentions[layer]  # [B, heads, L, L]
            picked = [att[i, :, t[0], t[1]].sum(-1).mean() for i, t in enumerate(targets) if t is not None]
            aux = -torch.log(torch.stack(picked) + 1e-6).mean() if picked else torch.zeros(())
            opt.zero_grad()
            (lm + weight * aux).backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
    finally:
        trainer.llm.set_attn_implementation(impl)
        trainer.llm.eval().requires_grad_(False)
        trainer.projector.eval().requires_grad_(False)


def _answer_layout(ex) -> tuple[np.ndarray, int]:
    """(the image's token positions in `ex`, the position that predicts the first answer token)."""
    image = np.flatnonzero(np.asarray(ex.ids) == IMAGE_MARKER)
    return image, next(i for i, lab in enumerate(ex.labels) if lab != IGNORE) - 1


def _asked_examples(trainer: LLMTrainer, builder: SequenceBuilder, qas: QA, wcfg: world.WorldConfig):
    """(scene, question, asked object, batch of one, image positions, answer position) for each color / shape
    question of `qas`."""
    for scene, q in qas:
        target = asked_object(scene, q)
        if target is not None:
            ex = builder.understand(world.render(scene, wcfg), q.question, q.answer)
            yield (scene, q, target, trainer.batch([ex]), *_answer_layout(ex))


def _cell_tokens(objs, grid: tuple[int, int], wcfg: world.WorldConfig) -> np.ndarray:
    """bool [rows*cols]: the image tokens covering the objects' cells (the ViT's own token layout)."""
    from .vision_train import token_classes

    return token_classes(world.Scene(tuple(objs)), grid, wcfg) > 0


@torch.no_grad()
def attention_on_asked_object(trainer: LLMTrainer, builder: SequenceBuilder, qas: QA,
                              wcfg: world.WorldConfig = world.WorldConfig()) -> list[dict]:
    """Per (layer, head), means over the color and shape questions of `qas`, at the position that predicts the
    answer's first token: `image` = attention mass on the image's tokens; `asked` / `objects` = the share of
    that mass on the asked-about object's tokens / on any object's tokens; `asked_uniform` = the share
    `asked` would have if the head spread its image mass evenly over the objects."""
    cfg = trainer.cfg
    grid = cfg.level_grid(0, *cfg.anchors[0])
    impl = trainer.llm.config._attn_implementation
    trainer.llm.set_attn_implementation("eager")  # attention weights are returned by eager attention only
    trainer.llm.eval()
    rows: dict[tuple[int, int], list[tuple[float, float, float, float]]] = defaultdict(list)
    try:
        for scene, _, target, b, image, at in _asked_examples(trainer, builder, qas, wcfg):
            asked, objects = _cell_tokens([target], grid, wcfg), _cell_tokens(scene.objects, grid, wcfg)
            out = trainer.llm(inputs_embeds=b["inputs_embeds"], attention_mask=b["attention_mask"],
                              output_attentions=True)
            for layer, att in enumerate(out.attentions):  # att [1, heads, L, L]
                for head, w in enumerate(att[0, :, at, image].numpy()):  # w [rows*cols]
                    mass = float(w.sum())
                    rows[(layer, head)].append((mass, float(w[asked].sum()) / max(mass, 1e-9),
                                                float(w[objects].sum()) / max(mass, 1e-9),
                                                asked.sum() / objects.sum()))
    finally:
        trainer.llm.set_attn_implementation(impl)
    keys = ("image", "asked", "objects", "asked_uniform")
    return [{"layer": layer, "head": head, **{k: round(float(v), 3) for k, v in zip(keys, np.mean(vals, axis=0))}}
            for (layer, head), vals in sorted(rows.items())]


def _value_positions(builder: SequenceBuilder, text: str, keys: tuple[str, ...]) -> dict[str, int]:
    """Per JSON key of `text`: the index, among `text`'s tokens, of its string value's first token. The
    tokenizer splits at every punctuation mark, so a prefix ending in the value's opening quote encodes to a
    prefix of the whole text's tokens (checked)."""
    full = builder.tok.encode(text)
    out = {}
    for key in keys:
        head = text[:text.index(f'"{key}": "') + len(f'"{key}": "')]
        ids = builder.tok.encode(head)
        if full[:len(ids)] != ids:
            raise ValueError(f"assessment {text!r}: the tokens of {head!r} are not a prefix of the whole text's")
        out[key] = len(ids)
    return out


@torch.no_grad()
def judge(trainer: LLMTrainer, builder: SequenceBuilder, pairs: int = 240, evidence: bool = False,
          wcfg: world.WorldConfig = world.WorldConfig(), seed: int = evaluate.EVAL_SEED, batch: int = 16,
          evidence_axis: bool = False) -> dict:
    """The judge without free-running noise: held-out prompts with rendered images, half right and half wrong
    (recipe.rendered_assessment, split "heldout"), each assessment teacher-forced. Per pair, are the four
    verdicts (each value's first token: yes / no / n of n/a) the argmax at their positions, after the true
    JSON before them; with `evidence` the JSON opens with the evidence field (in its axis form with
    `evidence_axis`, Schedule.evidence_axis), and its tokens are scored too.
    Returns the share of pairs whose verdicts are all right, on right and on wrong images; per aspect on the
    wrong images that break it; the evidence's share (whole field right); and logit(yes) - logit(no) at the
    "object" verdict, mean and spread, on right and on wrong images (docs/nano.md, "A judge trained on
    rendered near misses")."""
    from . import evaluator

    rng = np.random.default_rng(seed)
    drawn = [recipe.rendered_assessment(rng, wcfg, want_good=i % 2 == 0, split="heldout") for i in range(pairs)]
    shown = [evaluator.evidence(r.prompt, r.scene, evidence_axis) if evidence else None for r in drawn]
    texts = [evaluator.assessment_to_json(r.verdict, s) for r, s in zip(drawn, shown)]
    yes, no = (builder.tok.encode(w)[0] for w in ("yes", "no"))
    keys = evaluator.ASPECTS + ((evaluator.EVIDENCE_KEY,) if evidence else ())
    trainer.llm.eval()
    rows = []
    for i in range(0, pairs, batch):
        chunk = list(zip(drawn[i:i + batch], texts[i:i + batch], shown[i:i + batch]))
        exs = [builder.assess(world.render(r.scene, wcfg), r.prompt.text, t) for r, t, _ in chunk]
        b = trainer.batch(exs)
        logits = trainer.llm(inputs_embeds=b["inputs_embeds"], attention_mask=b["attention_mask"]).logits
        for row, ((r, text, field), ex) in enumerate(zip(chunk, exs)):
            start = next(k for k, t in enumerate(ex.labels) if t != IGNORE)  # the answer's first token
            right = logits[row].argmax(-1)[:-1] == b["labels"][row, 1:]  # [L-1]: is token t + 1 predicted at t?
            at = {k: start + j for k, j in _value_positions(builder, text, keys).items()}
            verdicts = {k: bool(right[at[k] - 1]) for k in evaluator.ASPECTS}
            shows = None
            if evidence:  # every token of the field's value
                first, n = at[evaluator.EVIDENCE_KEY], len(builder.tok.encode(field))
                shows = bool(right[first - 1:first - 1 + n].all())
            margin = float(logits[row, at["object"] - 1, yes] - logits[row, at["object"] - 1, no])
            rows.append((r.verdict, verdicts, shows, margin))
    out: dict = {"pairs": pairs, "evidence": evidence}
    for name, good in (("right", True), ("wrong", False)):
        sel = [x for x in rows if x[0].good == good]
        out[f"verdicts_{name}"] = round(float(np.mean([all(v.values()) for _, v, _, _ in sel])), 3)
        m = np.array([x[3] for x in sel if x[0].object is not None])
        out[f"object_margin_{name}"] = [round(float(m.mean()), 2), round(float(m.std()), 2)]
    out["wrong_by_aspect"] = {a: round(float(np.mean([v[a] for t, v, _, _ in rows if getattr(t, a) is False])), 3)
                              for a in evaluator.ASPECTS if any(getattr(t, a) is False for t, _, _, _ in rows)}
    if evidence:
        out["evidence_right"] = round(float(np.mean([s for _, _, s, _ in rows])), 3)
    return out


def _linear_probe_accuracy(x: np.ndarray, y: np.ndarray, seed: int = 0, steps: int = 500) -> dict:
    """Held-out accuracy of a logistic regression x -> y (3/4 train, 1/4 test, standardised features), next to
    the test split's majority share."""
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    idx = torch.randperm(len(Y), generator=g)
    fit, test = idx[: len(Y) * 3 // 4], idx[len(Y) * 3 // 4:]
    mu, sd = X[fit].mean(0), X[fit].std(0) + 1e-6
    X = (X - mu) / sd
    torch.manual_seed(seed)
    lin = nn.Linear(X.shape[1], int(Y.max()) + 1)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    with torch.enable_grad():  # callers may hold no_grad
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(lin(X[fit]), Y[fit]).backward()
            opt.step()
    with torch.no_grad():
        acc = (lin(X[test]).argmax(-1) == Y[test]).float().mean().item()
    return {"accuracy": round(acc, 3), "majority": round(float(np.bincount(y[test.numpy()]).max() / len(test)), 3),
            "samples": len(Y)}


@torch.no_grad()
def linear_probes(trainer: LLMTrainer, builder: SequenceBuilder, qas: QA, layer: int = 1,
                  wcfg: world.WorldConfig = world.WorldConfig()) -> dict[str, dict]:
    """Does `layer`'s attention have what selection needs? Over the color and shape questions of `qas`:
    - "query": the asked attribute (3 shapes + 6 colors) from the answer position's input to `layer`;
    - "key_shape" / "key_color": each object token's shape / color from its `layer` keys (before RoPE)."""
    grid = trainer.cfg.level_grid(0, *trainer.cfg.anchors[0])
    block = trainer.llm.model.layers[layer]
    trainer.llm.eval()
    query, asked, keys, shapes, colors = [], [], [], [], []
    for scene, q, target, b, image, at in _asked_examples(trainer, builder, qas, wcfg):
        h = trainer.llm(inputs_embeds=b["inputs_embeds"], attention_mask=b["attention_mask"],
                        output_hidden_states=True).hidden_states[layer][0]  # [L, hidden]: the layer's input
        query.append(h[at].numpy())
        asked.append(world.SHAPES.index(target.shape) if q.kind == "color"  # the word the question names
                     else len(world.SHAPES) + list(world.COLORS).index(target.color))
        k = block.self_attn.k_proj(block.input_layernorm(h)).numpy()  # [L, kv_heads * head_dim]
        for o in scene.objects:
            for pos in image[_cell_tokens([o], grid, wcfg)]:
                keys.append(k[pos])
                shapes.append(world.SHAPES.index(o.shape))
                colors.append(list(world.COLORS).index(o.color))
    keys_ = np.array(keys)
    return {"query": _linear_probe_accuracy(np.array(query), np.array(asked)),
            "key_shape": _linear_probe_accuracy(keys_, np.array(shapes)),
            "key_color": _linear_probe_accuracy(keys_, np.array(colors))}


@torch.no_grad()
def vit_position(tower, scenes: int = 1200, seed: int = 0, wcfg: world.WorldConfig = world.WorldConfig()) -> dict:
    """Is a token's place in the world's grid linearly readable from the ViT's features? The cell's row and
    column (of the world's 3 x 3 grid), over the object tokens and the empty tokens of `scenes` training
    scenes (`_linear_probe_accuracy`; chance is the majority share). The ViT's 2-D RoPE is relative, so its
    features carry position only if its pretraining asked for it (vision_train.pretrain_vit)."""
    rng = np.random.default_rng(seed)
    drawn = [world.sample_scene(rng, wcfg, "train") for _ in range(scenes)]
    feats = torch.cat([tower.features([world.render(s, wcfg) for s in drawn[i:i + 100]])
                       for i in range(0, scenes, 100)]).numpy()  # [S, T, out_dim]
    grid = tower.cfg.level_grid(0, *tower.cfg.anchors[0])
    rows, cols = grid
    per_r, per_c = rows // wcfg.grid, cols // wcfg.grid  # tokens per cell side
    cell_row = np.tile(np.repeat(np.arange(rows) // per_r, cols), scenes)  # [S*T], row-major over each token grid
    cell_col = np.tile(np.tile(np.arange(cols) // per_c, rows), scenes)
    occupied = np.stack([_cell_tokens(s.objects, grid, wcfg) for s in drawn]).reshape(-1)  # [S*T]
    x = feats.reshape(-1, feats.shape[-1])  # [S*T, out_dim]
    return {name: {"row": _linear_probe_accuracy(x[mask], cell_row[mask]),
                   "column": _linear_probe_accuracy(x[mask], cell_col[mask])}
            for name, mask in (("object_tokens", occupied), ("empty_tokens", ~occupied))}


# the styles whose relation answers are scored in two parts (relation_parts)
REASONED_RELATION = ("positions-first", "winner-first", "axis-first", "named-axis")
ANSWER_STYLES = ("short", "echo", "describe-first", "positions-first", "winner-first", "axis-first", "named-axis")
# the world's question templates that name one object (world.make_qa / scaffold_qa) -> the phrase naming it
_NAMED = {"color": r"what color is (the \w+)\?", "shape": r"what shape is (the \w+ object)\?",
          "position": r"where is (the [\w ]+)\?"}


def restyle(scene: world.Scene, qa: world.QA, style: str) -> world.QA:
    """`qa` with its answer in another format (the question is unchanged):
    - "short": the world's own answer ("red");
    - "echo": color, shape and position answers restate the asked object first, so that the word to look up
      sits right before the answer ("the triangle is red", "the red object is a circle", "the red circle is at
      the top left"); other kinds stay short;
    - "describe-first": the scene's description, ". ", then the short answer, for every kind but describe
      (the model writes what it sees, then answers from its own text);
    - "positions-first": relation answers after the two objects' positions ("top left, bottom. yes"),
      other kinds short (world.positions_first);
    - "winner-first": relation answers after naming the object further the asked way ("the red circle. yes"),
      other kinds short (world.winner_first);
    - "axis-first": relation answers after the two objects' coordinates along the asked axis ("top, bottom.
      yes"), other kinds short (world.axis_first);
    - "named-axis": the same with each place after its object's name ("the red circle top, the blue square
      bottom. yes"), other kinds short (world.named_axis)."""
    if style not in ANSWER_STYLES:
        raise ValueError(f"--answer-style: expected one of {ANSWER_STYLES}, got {style!r}")
    if style == "describe-first":
        return world.describe_first(scene, qa)
    if style == "positions-first":
        return world.positions_first(scene, qa)
    if style == "winner-first":
        return world.winner_first(scene, qa)
    if style == "axis-first":
        return world.axis_first(scene, qa)
    if style == "named-axis":
        return world.named_axis(scene, qa)
    if style != "echo" or qa.kind not in _NAMED:
        return qa
    m = re.fullmatch(_NAMED[qa.kind], qa.question)
    if m is None:
        raise ValueError(f"restyle: {qa.kind} question {qa.question!r} does not match {_NAMED[qa.kind]!r}")
    if qa.kind == "color":
        answer = qa.answer
    elif qa.kind == "shape":
        answer = f"{world.article(qa.answer)} {qa.answer}"
    else:  # "top left" -> "at the top left", as the descriptions phrase it
        answer = next(world.position_phrase(r, c) for r in range(3) for c in range(3)
                      if world.position_name(r, c) == qa.answer)
    return world.QA(qa.kind, qa.question, f"{m.group(1)} is {answer}")


def _variant_config(cfg, hidden: int | None = None, heads: int | None = None, kv_heads: int | None = None,
                    layers: int | None = None):
    """`cfg` with its LLM `hidden` wide (FFN 3x), with `heads` / `kv_heads` attention heads, or `layers` deep."""
    if hidden is not None:
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, hidden_size=hidden,
                                                               intermediate_size=3 * hidden))
    if heads is not None or kv_heads is not None:
        h = heads or cfg.llm.num_heads
        attn = dataclasses.replace(cfg.llm, num_heads=h, num_kv_heads=kv_heads or min(
            cfg.llm.num_kv_heads, h))
        cfg = dataclasses.replace(cfg, llm=attn)
    if layers is not None:
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_layers=layers))
    return cfg


def _fresh_llm(hidden: int | None = None, heads: int | None = None, kv_heads: int | None = None, seed: int = 0,
               layers: int | None = None):
    """(cfg, tokenizer, a from-scratch nano LLM): nano's, or a variant (`_variant_config`)."""
    from ..config import preset
    from ..export.llm import build_llm
    from ..export.tokenizer_factory import build_tokenizer
    from ..runtime.prompts import TextTokenizer
    from .text import base_words

    cfg = _variant_config(preset("illume-nano"), hidden, heads, kv_heads, layers)
    tok = TextTokenizer(build_tokenizer(cfg, base_words(cfg)), cfg)
    return cfg, tok, build_llm(cfg, seed=seed)


def _scored_kinds(phases: list[text_pretrain.Phase], per_kind: int, wcfg: world.WorldConfig) -> QA:
    kinds = {k for ks, _ in phases for k in ks}
    return [(s, q) for s, q in questions(per_kind, "heldout", wcfg) if q.kind in kinds]


def text_lookup(phases: list[text_pretrain.Phase], lr: float = 1e-3, hidden: int | None = None,
                per_kind: int = 60, batch: int = 32, every: int = 250, seed: int = 0, log=print,
                layout: str = "scene-first", heads: int | None = None, kv_heads: int | None = None,
                layers: int | None = None) -> list[dict]:
    """The nano LLM (or a variant, `_fresh_llm`) from scratch on the recipe's text pretraining
    (`text_pretrain.pretrain_text`: "<description>. <question>" -> answer, `phases` of (kinds, steps) in order).
    Teacher-forced accuracy on the evaluation's held-out scenes, of every kind the phases train, every
    `every` steps. Without an image, this asks how many steps the LLM needs to learn to look an object up."""
    text_pretrain.check_phases(phases)
    cfg, tok, model = _fresh_llm(hidden, heads, kv_heads, seed, layers)
    encode = text_pretrain.text_inputs(tok, cfg.tokens.im_end, layout)
    return _learning_curve(model, tok, cfg.tokens.im_end, phases, encode, lr, per_kind, batch, every, seed, log)


def _learning_curve(model: nn.Module, tok, im_end: int, phases: list[text_pretrain.Phase],
                    encode: text_pretrain.Encode, lr: float, per_kind: int, batch: int, every: int, seed: int,
                    log, split_relation: bool = False) -> list[dict]:
    """Stage 0's training loop on `encode`'s batches, scored teacher-forced on the held-out questions of the
    phases' kinds every `every` steps (with `split_relation`, also `relation_parts`)."""
    wcfg = world.WorldConfig()
    held = _scored_kinds(phases, per_kind, wcfg)
    history, t0 = [], time.perf_counter()

    def evaluate(step: int, loss: float) -> None:
        with torch.no_grad():
            inputs, labels = encode(held)
            logits = model(**inputs).logits
        history.append({"steps": step, "seconds": round(time.perf_counter() - t0), "loss": round(loss, 4),
                        **accuracy_by_kind(held, teacher_forced_right(logits, labels))})
        if split_relation:
            history[-1].update(relation_parts(held, final_word_right(logits, labels)))
        log(json.dumps(history[-1]))

    text_pretrain.pretrain_text(model, tok, im_end, wcfg, phases, batch=batch, lr=lr, seed=seed + 1,
                                progress=_Quiet(), every=every, evaluate=evaluate, encode=encode)
    return history


class SlotScenes:
    """The scene as the image's 6 x 6 token grid, one input vector per token, then the question in text:
    a token on an object is the sum of the LLM's own input embeddings of its color and shape words (so the
    object's attributes sit in *one* position, as in an image token, and in the words' own directions, as a
    projector aligned to the text space would put them); a token on an empty cell is the embedding of the
    padding token. Position comes from the token's place in the sequence (RoPE), as for image tokens; with
    `placed`, every token also adds the embeddings of its cell's row and column words ("top", "left"), as the
    features of a ViT with absolute position embeddings would carry its place."""

    def __init__(self, cfg, tok, grid: tuple[int, int] = (6, 6), wcfg: world.WorldConfig = world.WorldConfig(),
                 placed: bool = False):
        self.tok, self.grid, self.wcfg, self.placed = tok, grid, wcfg, placed
        self.pad, self.im_end = cfg.tokens.endoftext, cfg.tokens.im_end
        self.word = {w: tok.encode(" " + w) for w in (*world.COLORS, *world.SHAPES, *world.ROW_NAMES,
                                                         *world.COL_NAMES)}
        several = {w: ids for w, ids in self.word.items() if len(ids) != 1}
        if several:
            raise ValueError(f"slot scenes need one token per color and shape word, got {several}")

    def word_grid(self, scene: world.Scene) -> tuple[np.ndarray, np.ndarray]:
        """int64 [rows*cols] color-word ids and shape-word ids, the padding id on empty cells."""
        rows, cols = self.grid
        per_r, per_c = rows // self.wcfg.grid, cols // self.wcfg.grid  # tokens per cell side
        color, shape = np.full((rows, cols), self.pad), np.full((rows, cols), self.pad)
        for o in scene.objects:
            cell = np.s_[o.row * per_r:(o.row + 1) * per_r, o.col * per_c:(o.col + 1) * per_c]
            color[cell], shape[cell] = self.word[o.color][0], self.word[o.shape][0]
        return color.reshape(-1), shape.reshape(-1)

    def place_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """int64 [rows*cols] the row-name and column-name word ids of each token's cell."""
        rows, cols = self.grid
        cell_r = np.arange(rows) * self.wcfg.grid // rows  # token row -> cell row
        cell_c = np.arange(cols) * self.wcfg.grid // cols
        row = np.array([self.word[world.ROW_NAMES[r]][0] for r in cell_r])
        col = np.array([self.word[world.COL_NAMES[c]][0] for c in cell_c])
        return np.repeat(row, cols), np.tile(col, rows)  # [rows*cols] each, row-major

    def batch(self, embed: nn.Embedding, qas: QA) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded inputs_embeds [B, L, hidden], labels [B, L] (the answer and <|im_end|>) and mask [B, L]."""
        rows = []
        for scene, q in qas:
            prompt, answer = self.tok.encode(" " + q.question), self.tok.encode(" " + q.answer) + [self.im_end]
            rows.append((*self.word_grid(scene), prompt + answer, [IGNORE] * len(prompt) + answer))
        n_slots = self.grid[0] * self.grid[1]
        width = n_slots + max(len(r[2]) for r in rows)
        embeds = torch.zeros(len(rows), width, embed.embedding_dim)
        labels = torch.full((len(rows), width), IGNORE)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (color, shape, ids, lab) in enumerate(rows):
            color, shape = torch.from_numpy(color), torch.from_numpy(shape)
            on_object = (shape != self.pad).unsqueeze(-1)
            embeds[i, :n_slots] = embed(color) + on_object * embed(shape)  # [slots, hidden]
            if self.placed:
                row, col = (torch.from_numpy(g) for g in self.place_grid())
                embeds[i, :n_slots] += embed(row) + embed(col)
            embeds[i, n_slots:n_slots + len(ids)] = embed(torch.tensor(ids))
            labels[i, n_slots:n_slots + len(ids)] = torch.tensor(lab)
            mask[i, :n_slots + len(ids)] = 1
        return embeds, labels, mask


def slot_lookup(phases: list[text_pretrain.Phase], lr: float = 1e-3, per_kind: int = 60, batch: int = 32,
                every: int = 250, seed: int = 0, log=print, layers: int | None = None,
                placed: bool = False, answer_style: str = "short") -> list[dict]:
    """`text_lookup` with the scene as `SlotScenes` instead of its description: is the lookup slow because
    the text's attributes sit in separate words (a two-step circuit: bind the color word to the shape word,
    then match), or because matching the question against the scene is? Same optimizer and schedule as
    stage 0 (`LLMTrainer.optimizer`, gradients clipped at 1)."""
    text_pretrain.check_phases(phases)
    cfg, tok, model = _fresh_llm(seed=seed, layers=layers)
    slots = SlotScenes(cfg, tok, cfg.level_grid(0, *cfg.anchors[0]), placed=placed)
    embed = model.get_input_embeddings()

    def encode(pairs):
        embeds, labels, mask = slots.batch(embed, [(s, restyle(s, q, answer_style)) for s, q in pairs])
        return {"inputs_embeds": embeds, "attention_mask": mask}, labels
    return _learning_curve(model, tok, cfg.tokens.im_end, phases, encode, lr, per_kind, batch, every, seed, log,
                           split_relation=answer_style in REASONED_RELATION)


def image_lookup(checkpoint: str | Path, phases: list[text_pretrain.Phase], lr: float = 1e-3, per_kind: int = 60,
                 batch: int = 32, seed: int = 0, log=print, answer_style: str = "short",
                 layers: int | None = None, placed_vit: int = 0) -> list[dict]:
    """A fresh LLM and projector on `checkpoint`'s vision tower (ViT + tokenizer, frozen), trained on
    single-turn image questions of each phase's kinds in turn (each phase its own call of `LLMTrainer.train`:
    AdamW, one-cycle schedule, gradients clipped), scored after every phase, teacher-forced on the held-out
    questions of every kind the phases train, also per number of objects in the scene (`accuracy_by_objects`).
    Does the image lookup form when a few kinds are trained alone, and does it survive when more join? (The
    recipe's stages train every kind and task at once.) `placed_vit` > 0: the checkpoint's ViT is replaced by a
    fresh one pretrained that many steps with its own-position targets as well (`placed_vit_tower`)."""
    from ..export.llm import build_llm

    text_pretrain.check_phases(phases)
    trainer, builder = load_trainer(checkpoint)
    if placed_vit:
        trainer.tower.vit = placed_vit_tower(trainer.cfg, placed_vit, log)
    trainer.cfg = _variant_config(trainer.cfg, layers=layers)
    trainer.llm = build_llm(trainer.cfg, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in trainer.projector.modules():
            if m is not trainer.projector and hasattr(m, "reset_parameters"):
                m.reset_parameters()
    wcfg = world.WorldConfig()
    held = [(s, restyle(s, q, answer_style)) for s, q in _scored_kinds(phases, per_kind, wcfg)]
    history, t0, done = [], time.perf_counter(), 0
    for i, (kinds, steps) in enumerate(phases):
        def sample(rng, kinds=kinds):
            scene, q = world.sample_qa(rng, wcfg, kinds)
            q = restyle(scene, q, answer_style)
            return builder.understand(world.render(scene, wcfg), q.question, q.answer)

        trainer.train(sample, steps=steps, batch=batch, lr=lr, seed=seed + 100 + i, trainable="all", progress=_Quiet())
        done += steps
        parts: list[tuple[bool, bool]] = []
        right = answers_right(trainer, builder, held, wcfg, parts=parts)
        history.append({"steps": done, "kinds": "+".join(kinds), "seconds": round(time.perf_counter() - t0),
                        **accuracy_by_kind(held, right), "by_objects": accuracy_by_objects(held, right)})
        if answer_style in REASONED_RELATION:
            history[-1].update(relation_parts(held, parts))
        log(json.dumps(history[-1]))
    return history


def placed_vit_tower(cfg, steps: int, log=print) -> nn.Module:
    """A fresh semantic ViT pretrained as the recipe's ViT stage does (its seed, batch and learning rate) for
    `steps` steps with its own-position targets weighted 1 (Schedule.vit_position), frozen: features that say
    where each token is, as a pretrained CLIP-style encoder's do (docs/nano.md, "Where an object is")."""
    from ..export.modules import build_modules

    vit = build_modules(cfg).encoders["semantic"].train().requires_grad_(True)
    t0 = time.perf_counter()
    recipe_vit(cfg, vit, world.WorldConfig(), steps, recipe.Schedule.vision_batch, position_weight=1.0)
    log(json.dumps({"placed_vit_steps": steps, "seconds": round(time.perf_counter() - t0)}))
    return vit.eval().requires_grad_(False)


def recipe_vit(cfg, vit: nn.Module, wcfg: world.WorldConfig, steps: int, batch: int,
               position_weight: float = 0.0) -> None:
    """`vit` pretrained as the recipe's ViT stage does (vision_train.pretrain_vit, its seed and learning rate)."""
    from .vision_train import pretrain_vit

    pretrain_vit(cfg, vit, wcfg, steps=steps, batch=batch, lr=recipe.VIT_LR, seed=recipe._seed("vit"),
                 progress=_Quiet(), position_weight=position_weight)


def parse_phases(spec: str) -> list[text_pretrain.Phase]:
    """"color:4000,all:1500" -> [(("color",), 4000), (QA_KINDS, 1500)]; kinds joined by "+" ("color+shape:500")."""
    phases = []
    for part in spec.split(","):
        kinds, sep, steps = part.partition(":")
        if not sep or not steps.strip().isdigit():
            raise ValueError(f"--text-lookup: expected KINDS:STEPS[,KINDS:STEPS...], got {part!r} in {spec!r}")
        names = world.QA_KINDS if kinds == "all" else tuple(kinds.split("+"))
        phases.append((names, int(steps)))
    text_pretrain.check_phases(phases)
    return phases


def continue_training(trainer: LLMTrainer, builder: SequenceBuilder, mix: str, steps: int, chunks: int,
                      lr: float, score, log=print, answer_style: str = "short",
                      assess_evidence: bool = False, evidence_axis: bool = False) -> list[dict]:
    """Train `chunks` x `steps` more steps on `mix` ("stage3": the SFT mixture; "qa": half QA dialogues, half
    grounding dialogues; "rendered": rendered near-miss assessments alone, with the evidence field if
    `assess_evidence`, in its axis form with `evidence_axis`), scoring with `score()` before and after every
    chunk. `answer_style`: the QA dialogues' answers in that format (`restyle`)."""
    style = None if answer_style == "short" else (lambda scene, qa: restyle(scene, qa, answer_style))
    tasks = recipe.Tasks(builder, world.WorldConfig(), answer_style=style, assess_evidence=assess_evidence,
                         evidence_axis=evidence_axis)
    samplers = {"stage3": recipe.stage_mixtures(tasks)["stage3"],
                "qa": recipe.mixture([(0.5, tasks.qa), (0.5, tasks.qa_grounding)]),
                "rendered": tasks.assess_rendered}
    if mix not in samplers:
        raise ValueError(f"--continue: expected one of {sorted(samplers)}, got {mix!r}")

    history = [{"steps": 0, **score()}]
    log(json.dumps(history[-1]))
    for c in range(chunks):
        trainer.train(samplers[mix], steps=steps, batch=32, lr=lr, seed=100 + c, trainable="all", progress=_Quiet())
        history.append({"steps": (c + 1) * steps, **score()})
        log(json.dumps(history[-1]))
    return history


EXTRA_PHASE_TASKS = ("edit", "geneval")  # --extra-phase: Tasks.edit, Tasks.t2i_geneval
EXTRA_PHASE_SEED = 777


def parse_extra_phase(spec: str) -> tuple[dict[str, float], int]:
    """"edit=0.3,geneval=0.3:300" -> ({"edit": 0.3, "geneval": 0.3}, 300)."""
    shares, sep, steps = spec.rpartition(":")
    try:
        parts = {k: float(v) for k, v in (item.split("=") for item in shares.split(","))}
        steps_n = int(steps)
    except ValueError:
        parts, steps_n = {}, 0
    if not sep or not parts or steps_n <= 0 or set(parts) - set(EXTRA_PHASE_TASKS) or not (
            0 < sum(parts.values()) <= 1 and min(parts.values()) > 0):
        raise ValueError(f"--extra-phase {spec!r}: expected TASK=SHARE[,TASK=SHARE]:STEPS with TASK one of "
                         f"{list(EXTRA_PHASE_TASKS)}, shares > 0 summing to at most 1, STEPS > 0")
    return parts, steps_n


def extra_phase(checkpoint: str | Path, work: Path, shares: dict[str, float], steps: int, lr: float = 1e-3,
                schedule: str = recipe.DEFAULT_SCHEDULE, seed: int = EXTRA_PHASE_SEED) -> None:
    """`checkpoint`'s weights trained `steps` more on `shares` of edits / GenEval-style prompts and the
    schedule's stage-3 mixture for the rest (a phase the recipe could add after stage 3), saved as `work`'s
    stage3_checkpoint and stage3_engine: `recipe --stage3-from work` then runs stage 4 on them, and the engine
    is the phase's result alone."""
    s = recipe.SCHEDULES[schedule]
    mods, trainer, builder = load_modules(checkpoint)
    tasks = recipe.Tasks.for_schedule(builder, world.WorldConfig(), s)
    sft = recipe.stage_mixtures(tasks, s.lookup_kinds, s.assess_rendered)["stage3"]
    samplers = {"edit": tasks.edit, "geneval": tasks.t2i_geneval}
    rest = 1.0 - sum(shares.values())
    parts = [(w, samplers[k]) for k, w in shares.items()] + ([(rest, sft)] if rest > 0 else [])
    trainer.train(recipe.mixture(parts), steps=steps, batch=s.llm_batch, lr=lr, seed=seed, trainable="all",
                  progress=_Quiet())
    extra = recipe.dualvitok_extra(trainer.tower.tokenizer, trainer.tower.vit)
    recipe.save(mods, work / "stage3_checkpoint", base_words(mods.cfg), extra, torch.float32)
    recipe.export_fp32(work / "stage3_checkpoint", work / "stage3_engine")


def pretrain_vit_factored(cfg, vit: nn.Module, wcfg: world.WorldConfig, steps: int, batch: int, lr: float,
                          seed: int) -> None:
    """The recipe's ViT pretraining (vision_train.pretrain_vit) with one linear probe per factor of the token
    class instead of one over the joint class: the shape and the color of what the token's cell holds and
    the quarter it sees (0 = empty cell for each)."""
    from .vision_train import _scene_batch, token_classes, vit_batch, vit_forward

    enc = cfg.branches[0].encoder
    grid = cfg.level_grid(0, *cfg.anchors[0])
    per = (grid[0] // wcfg.grid) * (grid[1] // wcfg.grid)  # tokens per cell
    n_colors = len(world.COLORS)
    probes = nn.ModuleDict({"shape": nn.Linear(enc.out_dim, 1 + len(world.SHAPES)),
                            "color": nn.Linear(enc.out_dim, 1 + n_colors), "quarter": nn.Linear(enc.out_dim, 1 + per)})
    opt = torch.optim.AdamW(list(vit.parameters()) + list(probes.parameters()), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    vit.train()
    for _ in range(steps):
        scenes = _scene_batch(rng, wcfg, batch)
        cls = torch.from_numpy(np.stack([token_classes(s, grid, wcfg) for s in scenes]))  # [B, T]
        k = (cls - 1).clamp(min=0)  # kind * per + quarter on occupied tokens
        targets = {"shape": k // per // n_colors, "color": k // per % n_colors, "quarter": k % per}
        feats = vit_forward(vit, enc, *vit_batch([world.render(s, wcfg) for s in scenes], cfg))  # [B, T, out]
        loss = sum(F.cross_entropy(probes[n](feats).flatten(0, 1), torch.where(cls > 0, 1 + t, 0).flatten())
                   for n, t in targets.items())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    vit.eval().requires_grad_(False)


def from_scratch(vit_targets: str, rope_theta: float | None, schedule: "recipe.Schedule", qas: QA,
                 log=print, prompt_layout: str = "image-first") -> list[dict]:
    """Vision stages and LLM stages 0-3 of the recipe (same seeds and steps), scored after each of stages 1-3.
    `prompt_layout` (`config.PROMPT_LAYOUTS`) sets where the prompts put the input image, in training and scoring."""
    import dataclasses

    from ..config import preset
    from ..export.modules import build_modules
    from ..export.tokenizer_factory import build_tokenizer
    from ..runtime.prompts import TextTokenizer
    from .text import base_words
    from .vision_train import SemanticTokenizer, VisionTower, num_token_classes, train_tokenizer

    cfg = preset("illume-nano")
    if rope_theta is not None:
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, rope_theta=rope_theta))
    cfg = dataclasses.replace(cfg, prompts=PROMPT_LAYOUTS[prompt_layout](cfg.prompts))
    wcfg, s = world.WorldConfig(), schedule
    builder = SequenceBuilder(TextTokenizer(build_tokenizer(cfg, base_words(cfg)), cfg), cfg)
    mods = build_modules(cfg)
    quiet = _Quiet()
    vit = mods.encoders["semantic"].train().requires_grad_(True)
    if vit_targets == "factored":
        pretrain_vit_factored(cfg, vit, wcfg, s.vit, s.vision_batch, 2e-3, recipe._seed("vit"))
    elif vit_targets == "joint":
        recipe_vit(cfg, vit, wcfg, s.vit, s.vision_batch)
    else:
        raise ValueError(f"--vit-targets: expected 'joint' or 'factored', got {vit_targets!r}")
    grid = cfg.level_grid(0, *cfg.anchors[0])
    sem = SemanticTokenizer(mods.quantizers[0].train().requires_grad_(True), cfg.branches[0].in_dim,
                            num_token_classes(grid, wcfg))
    train_tokenizer(cfg, vit, sem, wcfg, steps=s.tokenizer, batch=s.vision_batch, lr=3e-3, seed=recipe._seed("tokenizer"),
                    progress=quiet)
    text_pretrain.pretrain_text(mods.llm, builder.tok, cfg.tokens.im_end, wcfg, recipe.stage0_phases(s),
                                batch=s.llm_batch, lr=recipe.STAGE0_LR, seed=recipe._seed("stage0"), progress=quiet)
    trainer = LLMTrainer(cfg, mods.llm, mods.projectors["semantic"], VisionTower(cfg, vit, sem))
    mixes = recipe.stage_mixtures(recipe.Tasks.for_schedule(builder, wcfg, s))
    history = []
    for name, trainable, lr, seed in recipe.LLM_STAGES:
        trainer.train(mixes[name], steps=getattr(s, name), batch=s.llm_batch, lr=lr, seed=recipe._seed(seed),
                      trainable=trainable, progress=quiet)
        history.append({"stage": name, **accuracy_by_kind(qas, answers_right(trainer, builder, qas))})
        log(json.dumps(history[-1]))
    return history


class _Quiet:
    def update(self, *a, **k):
        pass

    def note(self, **k):
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a nano checkpoint folder (e.g. build/nano/stage3_checkpoint)")
    ap.add_argument("--from-scratch", dest="scratch", action="store_true", help="train a variant instead (no checkpoint)")
    ap.add_argument("--vit-targets", dest="vit_targets", default="joint", choices=["joint", "factored"])
    ap.add_argument("--rope-theta", dest="rope_theta", type=float, default=None)
    ap.add_argument("--prompt-layout", dest="prompt_layout", default="image-first",
                    choices=sorted(PROMPT_LAYOUTS), help="--from-scratch: the input image before or after "
                    "the prompt's text (config.PROMPT_LAYOUTS)")
    ap.add_argument("--schedule", default="full", choices=sorted(recipe.SCHEDULES))
    ap.add_argument("--per-kind", dest="per_kind", type=int, default=60)
    ap.add_argument("--split", default="heldout", choices=["heldout", "train"])
    ap.add_argument("--continue", dest="mix", default=None,
                    help="train further on this mixture: stage3 | qa | rendered (scored by --judge if given)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--attention", action="store_true")
    ap.add_argument("--linear-probes", dest="linear", type=int, default=None, metavar="LAYER",
                    help="linear probes of the query and key sides of this layer (linear_probes)")
    ap.add_argument("--vit-position", dest="vit_position", action="store_true",
                    help="with --checkpoint: can a linear probe read each token's cell from its ViT features?")
    ap.add_argument("--supervise-layer", dest="supervise_layer", type=int, default=None,
                    help="continue on single-turn QA with the attention-supervision loss on this layer")
    ap.add_argument("--supervise-weight", dest="supervise_weight", type=float, default=1.0)
    ap.add_argument("--answer-style", dest="answer_style", default="short", choices=ANSWER_STYLES,
                    help="--continue and the scoring on answers in this format (restyle)")
    ap.add_argument("--text-lookup", dest="text_lookup", default=None, metavar="KINDS:STEPS,...",
                    help="train the LLM from scratch on text only (descriptions + questions), phases in order: "
                         "e.g. color:4000,all:1500 ('all': every kind; kinds joined by '+')")
    ap.add_argument("--slot-lookup", dest="slot_lookup", default=None, metavar="KINDS:STEPS,...",
                    help="as --text-lookup, with the scene as 36 grid tokens that each sum their object's color "
                         "and shape word embeddings (SlotScenes) instead of its description")
    ap.add_argument("--image-lookup", dest="image_lookup", default=None, metavar="KINDS:STEPS,...",
                    help="with --checkpoint: a fresh LLM and projector on its vision tower, single-turn image "
                         "questions of each phase's kinds in turn (image_lookup)")
    ap.add_argument("--placed-vit", dest="placed_vit", type=int, default=0, metavar="STEPS",
                    help="--image-lookup: first replace the checkpoint's ViT by a fresh one pretrained STEPS "
                         "steps with its own-position targets (placed_vit_tower)")
    ap.add_argument("--hidden", type=int, default=None, help="--text-lookup: the LLM's width (nano: 128)")
    ap.add_argument("--heads", type=int, default=None, help="--text-lookup: attention heads (nano: 4)")
    ap.add_argument("--extra-phase", dest="extra_phase", default=None, metavar="TASK=SHARE,...:STEPS",
                    help="with --checkpoint and --save-work: train its weights on edits / geneval prompts (the "
                         "rest the schedule's stage-3 mixture) and save them as a work folder for "
                         "recipe --stage3-from (extra_phase); give the --schedule of the run, whose stage-3 "
                         "mixture is replayed")
    ap.add_argument("--save-work", dest="save_work", default=None, metavar="WORK")
    ap.add_argument("--slot-placed", dest="slot_placed", action="store_true",
                    help="--slot-lookup: each slot also carries its cell's row and column words")
    ap.add_argument("--layers", type=int, default=None,
                    help="--text-lookup / --slot-lookup / --image-lookup: the fresh LLM's depth (nano: 4)")
    ap.add_argument("--kv-heads", dest="kv_heads", type=int, default=None,
                    help="--text-lookup: key/value heads (nano: 2)")
    ap.add_argument("--layout", default="scene-first", choices=text_pretrain.LAYOUTS,
                    help="--text-lookup: the description before the question (the recipe's) or after it")
    ap.add_argument("--judge", type=int, default=None, metavar="PAIRS",
                    help="with --checkpoint: teacher-forced assessments of this many rendered held-out pairs, "
                         "half right, half near misses (judge)")
    ap.add_argument("--judge-evidence", dest="judge_evidence", action="store_true",
                    help="--judge: the assessments open with the evidence field, which is scored too")
    ap.add_argument("--evidence-axis", dest="evidence_axis", action="store_true",
                    help="--judge-evidence: position prompts' evidence in its axis form (Schedule.evidence_axis)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    with recipe.reproducible(args.threads):
        return _probe(ap, args)


def _probe(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    torch.manual_seed(recipe.SEED)
    if args.slot_lookup is not None:
        slot_lookup(parse_phases(args.slot_lookup), args.lr, args.per_kind, layers=args.layers,
                    placed=args.slot_placed, answer_style=args.answer_style)
        return 0
    if args.text_lookup is not None:
        text_lookup(parse_phases(args.text_lookup), args.lr, args.hidden, args.per_kind, layout=args.layout,
                    heads=args.heads, kv_heads=args.kv_heads, layers=args.layers)
        return 0
    if args.extra_phase is not None:
        if args.checkpoint is None or args.save_work is None:
            ap.error("--extra-phase needs --checkpoint and --save-work")
        shares, steps = parse_extra_phase(args.extra_phase)
        with recipe.reproducible(args.threads):
            extra_phase(args.checkpoint, Path(args.save_work), shares, steps, args.lr, args.schedule)
        return 0
    if args.image_lookup is not None:
        if args.checkpoint is None:
            ap.error("--image-lookup needs --checkpoint (its vision tower)")
        image_lookup(args.checkpoint, parse_phases(args.image_lookup), args.lr, args.per_kind,
                     answer_style=args.answer_style, layers=args.layers, placed_vit=args.placed_vit)
        return 0
    qas = questions(args.per_kind, args.split, style=args.answer_style)
    if args.scratch:
        from_scratch(args.vit_targets, args.rope_theta, recipe.SCHEDULES[args.schedule], qas,
                     prompt_layout=args.prompt_layout)
        return 0
    if args.checkpoint is None:
        ap.error("give --checkpoint or --from-scratch")
    trainer, builder = load_trainer(args.checkpoint)

    def score() -> dict:
        if args.judge is not None:
            return judge(trainer, builder, args.judge, args.judge_evidence, evidence_axis=args.evidence_axis)
        parts: list[tuple[bool, bool]] = []
        right = answers_right(trainer, builder, qas, parts=parts)
        out = {**accuracy_by_kind(qas, right), "by_objects": accuracy_by_objects(qas, right)}
        return {**out, **relation_parts(qas, parts)} if args.answer_style in REASONED_RELATION else out

    if args.linear is not None:
        print(json.dumps(linear_probes(trainer, builder, qas, args.linear)))
        return 0
    if args.vit_position:
        print(json.dumps(vit_position(trainer.tower)))
        return 0
    if args.attention:
        for row in attention_on_asked_object(trainer, builder, qas):
            print(json.dumps(row))
    if args.supervise_layer is not None:
        print(json.dumps({"steps": 0, **score()}))
        for c in range(args.chunks):
            train_with_attention_supervision(trainer, builder, steps=args.steps, lr=args.lr,
                                             layer=args.supervise_layer, weight=args.supervise_weight, seed=100 + c)
            print(json.dumps({"steps": (c + 1) * args.steps, **score()}))
        if args.attention:
            for row in attention_on_asked_object(trainer, builder, qas):
                print(json.dumps(row))
    elif args.mix:
        continue_training(trainer, builder, args.mix, args.steps, args.chunks, args.lr, score,
                          answer_style=args.answer_style, assess_evidence=args.judge_evidence,
                          evidence_axis=args.evidence_axis)
    elif not args.attention:
        print(json.dumps(score()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
