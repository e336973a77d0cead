"""`make eval-nano`: ILLUME-nano's task accuracy on the held-out split, through the runtime engines.

Every number comes from the world's evaluator reading the model's output (answers compared with the truth,
generated and edited images parsed back into scenes), never from logits:

- understanding: accuracy per question kind and overall (held-out scenes, greedy answers);
- generation: GenEval's categories (single object, two objects, counting, colors, position, color attribute),
  overall = the mean over categories, as GenEval reports it. Each prompt gets `candidates` samples (seeds
  seed..seed+N-1); "single" is the mean accuracy over all samples (the expected single-sample accuracy),
  "best_of_N" the accuracy of the candidate the model's own assessment ranks first, with why it gains what it
  gains (`best_of_diagnostics`: ties, a perfect judge's ceiling, the valid assessments' score on right and
  wrong samples); "best_of_N_self_described" ranks the same candidates another way: the model describes each
  ("describe the image."), its words are parsed back into a scene (`world.parse_description`) and checked
  against the prompt in code; the first candidate so judged right wins (else the first). The perception is
  the model's, the comparison is not, so this is not the paper's self-assessment: it measures what the
  model's own reading of its images could give a ranker; "single_failures" says which aspect of the prompts
  the single samples broke (`evaluator.generation_failures`: a named shape missing, the pair misplaced, ...);
- editing: accuracy per edit kind and overall (output parsed == target scene); "editing_failures" per kind
  the share of outputs that are the source unchanged, that miss the edit, or that change an object the edit
  leaves alone (`evaluator.editing_failures`);
- self-assessment: agreement of the model's verdicts (object / count / color / spatial) with the evaluator's
  on the model's own generations, and per aspect how often its verdict agrees and how often it passes a
  fault the evaluator finds; "valid" is the share of answers that are a well-formed assessment.

Backends: "runtime" (an engine folder, onnxruntime) or "torch" (the checkpoint through the export side's
reference pipeline, the parity oracle), on the same prompts and seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.prompts import final_answer
from . import evaluator, world

EVAL_SEED = 777


@dataclass(frozen=True)
class EvalSize:
    qa_per_kind: int = 30
    prompts_per_category: int = 20
    edits_per_kind: int = 20
    candidates: int = 4


SIZES = {"full": EvalSize(), "small": EvalSize(qa_per_kind=6, prompts_per_category=4, edits_per_kind=4, candidates=2)}


# ----------------------------------------------------------------------------------------------------
# Held-out tasks (fixed seeds, never in training: world.is_heldout scenes only)
# ----------------------------------------------------------------------------------------------------
def heldout_tasks(size: EvalSize, wcfg: world.WorldConfig = world.WorldConfig()):
    rng = np.random.default_rng(EVAL_SEED)
    qas = []
    for kind in world.QA_KINDS:
        while sum(q.kind == kind for _, q in qas) < size.qa_per_kind:
            scene = world.sample_scene(rng, wcfg, split="heldout")
            q = world.make_qa(scene, rng, kind)
            if q is not None:
                qas.append((scene, q))
    prompts = [world.sample_gen_prompt(rng, wcfg, cat, "heldout")[0]
               for cat in world.GEN_CATEGORIES for _ in range(size.prompts_per_category)]
    edits = [world.sample_edit(rng, wcfg, "heldout", kind) for kind in world.EDIT_KINDS
             for _ in range(size.edits_per_kind)]
    return qas, prompts, edits


# ----------------------------------------------------------------------------------------------------
# Backends: answer / generate / edit / assess
# ----------------------------------------------------------------------------------------------------
class RuntimeBackend:
    def __init__(self, engine_dir: str | Path, threads: int | None = None):
        from ..runtime.pipeline import Pipeline

        self.pipe = Pipeline.load(engine_dir, threads=threads)
        self.name = f"runtime ({self.pipe.engine.manifest.precision})"
        self.answer_separator = self.pipe.cfg.prompts.answer_separator

    def answer(self, image, question: str) -> str:
        return self.pipe.understand(image, question, max_new_tokens=64).text

    def generate(self, prompt: str, seed: int) -> np.ndarray:
        return self.pipe.generate(prompt, seed=seed).image

    def edit(self, image, instruction: str, seed: int) -> np.ndarray:
        return self.pipe.edit(image, instruction, seed=seed).image

    def assess(self, image, prompt: str) -> str:
        return self.pipe.assess(image, prompt).text


class TorchBackend:
    """The checkpoint in torch (export/reference.py), with the runtime's sampling semantics."""

    def __init__(self, checkpoint: str | Path):
        from ..export.checkpoint import CheckpointPaths, load_checkpoint
        from ..export.reference import ReferencePipeline
        from ..runtime.prompts import TextTokenizer
        from ..runtime.sampler import SamplingParams

        mods = load_checkpoint(checkpoint)
        paths = CheckpointPaths.from_dir(checkpoint)
        self.cfg = mods.cfg
        self.answer_separator = self.cfg.prompts.answer_separator
        self.tok = TextTokenizer.from_file(paths.mllm / "tokenizer.json", self.cfg)
        self.ref = ReferencePipeline(mods, self.tok)
        rp = float(mods.generation_config.get("repetition_penalty", 1.0))
        self.params = {t: SamplingParams.from_defaults(getattr(self.cfg.defaults, t), rp)
                       for t in ("understand", "generate", "edit")}
        self.name = "torch reference"

    def answer(self, image, question: str, max_new_tokens: int = 64) -> str:
        ids = self.ref.understand_ids(image, question, self.params["understand"], 0, max_new_tokens)
        return self.tok.decode(ids)

    def _image(self, codes, seed: int) -> np.ndarray:
        d = self.cfg.diffusion
        h, w = self.cfg.anchors[0]
        return self.ref.diffusion_image(codes, h, w, d.default_steps, d.default_cfg, seed)

    def generate(self, prompt: str, seed: int) -> np.ndarray:
        h, w = self.cfg.anchors[0]
        return self._image(self.ref.generate_codes(prompt, h, w, self.params["generate"], seed), seed)

    def edit(self, image, instruction: str, seed: int) -> np.ndarray:
        codes, _, _ = self.ref.edit_codes(image, instruction, self.params["edit"], seed)
        return self._image(codes, seed)

    def assess(self, image, prompt: str) -> str:
        from ..runtime.assessment import complete_object
        from ..runtime.pipeline import ASSESS_MAX_NEW_TOKENS

        # the runtime's Pipeline.assess budget (it stops at the closing brace, which greedy decoding reaches
        # identically here)
        text = self.answer(image, self.cfg.prompts.assess.format(caption=prompt),
                           max_new_tokens=ASSESS_MAX_NEW_TOKENS)
        return complete_object(text) or text


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------
def evaluate(backend, size: EvalSize, wcfg: world.WorldConfig = world.WorldConfig(), progress=None) -> dict:
    qas, prompts, edits = heldout_tasks(size, wcfg)
    t0 = time.perf_counter()
    total = len(qas) + len(prompts) + len(edits)
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    answers = []  # scored on the final answer (the whole reply unless the model reasons first)
    for scene, q in qas:
        answers.append((q, final_answer(backend.answer(world.render(scene, wcfg), q.question),
                                        backend.answer_separator)))
        tick()
    per_sample: list[list[tuple[world.GenPrompt, world.Scene]]] = [[] for _ in range(size.candidates)]
    best, agree, oracle, judged, ties = [], [], [], [], []  # judged: (model score, evaluator: right) per sample
    mixed = []  # prompts with right and wrong candidates: (the ranking's pick is right, share of right candidates)
    described = []  # best-of-N ranked by the model's own description of each candidate (module docstring)
    for i, prompt in enumerate(prompts):
        scored, ok, seen_ok = [], [], []  # per candidate: (model score, scene), evaluator's verdict, described
        for c in range(size.candidates):
            image = backend.generate(prompt.text, seed=1000 * i + c)
            scene = evaluator.parse(image, wcfg)
            per_sample[c].append((prompt, scene))
            text = backend.assess(image, prompt.text)
            model = evaluator.assessment_from_json(text)
            agree.append((text, evaluator.assess(prompt, scene)))
            scored.append((model.score if model is not None else -1.0, scene))
            ok.append(evaluator.prompt_satisfied(prompt, scene))
            if model is not None:  # a well-formed assessment ("valid" counts the others)
                judged.append((model.score, ok[-1]))
            if size.candidates > 1:  # what the model says it drew, checked against the prompt in code
                seen = world.parse_description(backend.answer(image, world.DESCRIBE_QUESTION))
                seen_ok.append(seen is not None and evaluator.prompt_satisfied(prompt, seen))
        top = int(np.argmax([s for s, _ in scored]))  # the model's pick: first of equal scores
        best.append((prompt, scored[top][1]))
        if seen_ok:
            described.append((prompt, scored[seen_ok.index(True) if any(seen_ok) else 0][1]))
        oracle.append((prompt, scored[ok.index(True)][1] if any(ok) else scored[0][1]))  # a perfect judge's pick
        ties.append(len({s for s, _ in scored}) == 1)
        if len(set(ok)) == 2:  # right and wrong candidates: where the ranking matters
            mixed.append((ok[top], float(np.mean(ok))))
        tick()
    edited = []
    for i, e in enumerate(edits):
        edited.append((e, evaluator.parse(backend.edit(world.render(e.source, wcfg), e.instruction, seed=i), wcfg)))
        tick()

    single = [evaluator.generation_scores(s) for s in per_sample]
    single_mean = {k: float(np.mean([s[k] for s in single])) for k in single[0]}
    return {
        "backend": backend.name,
        "understanding": evaluator.understanding_scores(answers),
        "generation_single": single_mean,
        "generation_single_failures": evaluator.generation_failures(x for s in per_sample for x in s),
        f"generation_best_of_{size.candidates}": evaluator.generation_scores(best),
        "editing": evaluator.editing_scores(edited),
        "editing_failures": evaluator.editing_failures(edited),
        "self_assessment": evaluator.assessment_scores(agree),
        f"best_of_{size.candidates}_diagnostics": best_of_diagnostics(judged, ties, oracle, mixed, len(prompts)),
        f"generation_best_of_{size.candidates}_self_described": evaluator.generation_scores(described)
        if described else None,
        "counts": {"questions": len(qas), "prompts": len(prompts), "samples_per_prompt": size.candidates,
                   "edits": len(edits)},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def best_of_diagnostics(judged: list[tuple[float, bool]], ties: list[bool],
                        oracle: list[tuple[world.GenPrompt, world.Scene]], mixed: list[tuple[bool, float]],
                        prompts: int) -> dict[str, float | None]:
    """Why best-of-N gains what it gains:
    - tied_prompts: the share of prompts whose N assessment scores are all equal (the first candidate is kept);
    - oracle_overall: GenEval overall if a perfect judge picked (a right candidate whenever there is one), the
      ceiling of self-assessed selection;
    - score_on_right / score_on_wrong: the valid assessments' mean score on the samples the evaluator finds
      right / wrong, over all prompts (a score can separate prompts, e.g. by category, and not images);
    - mixed_prompts, pick_right_when_mixed, chance_when_mixed: among the prompts that have right and wrong
      candidates, where ranking matters, how often the top-ranked one is right, against the share of right
      candidates (a random pick). Only a judge of the image beats chance there."""
    def mean(xs):
        return float(np.mean(xs)) if xs else None

    return {"tied_prompts": mean(ties), "oracle_overall": evaluator.generation_scores(oracle)["overall"],
            "score_on_right": mean([s for s, ok in judged if ok]),
            "score_on_wrong": mean([s for s, ok in judged if not ok]),
            "mixed_prompts": len(mixed) / prompts if prompts else None,
            "pick_right_when_mixed": mean([p for p, _ in mixed]), "chance_when_mixed": mean([c for _, c in mixed])}


def decoder_fidelity(checkpoint: str | Path, n: int = 40, seed: int = 1,
                     wcfg: world.WorldConfig = world.WorldConfig()) -> dict[str, float]:
    """How faithfully the detokenizer draws *true* codes (torch): the codes of n rendered training scenes,
    decoded by UNet + VAE at the model's defaults (and, for comparison, the VAE's own encode-decode), parsed
    back; the share of exact scenes. An upper bound on generation accuracy that the LLM does not affect."""
    import torch

    from ..export.checkpoint import CheckpointPaths, load_checkpoint, read_dualvitok
    from ..export.diffusion import reference_decode
    from ..runtime.detokenize import initial_noise
    from ..runtime.image_prep import postprocess_image
    from .decoder_train import code_map_from_indices, images_to_tensor
    from .vision_train import SemanticTokenizer, VisionTower

    mods = load_checkpoint(checkpoint)
    cfg, d = mods.cfg, mods.cfg.diffusion
    sem = SemanticTokenizer.from_dualvitok(read_dualvitok(CheckpointPaths.from_dir(checkpoint).dualvitok),
                                           mods.quantizers[0], cfg.branches[0].in_dim)
    tower = VisionTower(cfg, mods.encoders["semantic"], sem)
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, wcfg) for _ in range(n)]
    images = [world.render(s, wcfg) for s in scenes]
    codes = tower.codes(images)
    grid = cfg.level_grid(0, *cfg.anchors[0])
    h, w = cfg.anchors[0]
    lat = (1, d.unet.latent_channels, h * d.upscale // d.vae.downsample, w * d.upscale // d.vae.downsample)
    vae_ok = decoder_ok = 0
    with torch.no_grad():
        rec = mods.vae.decode(mods.vae.encode(images_to_tensor(images)).latent_dist.mean).sample
        for i, scene in enumerate(scenes):
            vae_ok += evaluator.parse(postprocess_image(rec[i].numpy()), wcfg) == scene
            out = reference_decode(mods.unet, mods.vae, mods.scheduler_config,
                                   code_map_from_indices(mods.quantizers[0], codes[i:i + 1], grid),
                                   d.resolution_index(h, w), d.default_steps, d.default_cfg,
                                   torch.from_numpy(initial_noise(i, lat)), unet_cfg=d.unet)
            decoder_ok += evaluator.parse(postprocess_image(out.numpy()), wcfg) == scene
    return {"scenes": n, "vae_roundtrip_exact": vae_ok / n, "decoder_exact": decoder_ok / n}


def results_table(results: list[dict]) -> str:
    """Markdown: one column per backend."""
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, getter):
        rows.append((label, [_fmt(getter(r)) for r in results]))

    add("understanding (overall)", lambda r: r["understanding"].get("overall"))
    for k in world.QA_KINDS:
        add(f"  {k}", lambda r, k=k: r["understanding"].get(k))
    gb = next(k for k in results[0] if re.fullmatch(r"generation_best_of_\d+", k))
    add("generation GenEval overall (single sample)", lambda r: r["generation_single"].get("overall"))
    for k in world.GEN_CATEGORIES:
        add(f"  {k}", lambda r, k=k: r["generation_single"].get(k))
    add(f"generation GenEval overall ({gb.split('_', 1)[1].replace('_', '-')}, self-assessed)",
        lambda r: r[gb].get("overall"))
    add(f"generation GenEval overall ({gb.split('_', 1)[1].replace('_', '-')}, ranked by the model's own "
        f"description)", lambda r: (r.get(gb + "_self_described") or {}).get("overall"))
    diag = gb.replace("generation_", "") + "_diagnostics"
    add("  prompts whose assessments all tie (first kept)", lambda r: r.get(diag, {}).get("tied_prompts"))
    add("  a perfect judge's pick (ceiling)", lambda r: r.get(diag, {}).get("oracle_overall"))
    add("  model's score on right / wrong samples", lambda r: _pair(r.get(diag, {}), "score_on_right",
                                                                     "score_on_wrong"))
    add("  prompts with right and wrong candidates", lambda r: r.get(diag, {}).get("mixed_prompts"))
    add("  there, top-ranked right / a random pick", lambda r: _pair(r.get(diag, {}), "pick_right_when_mixed",
                                                                      "chance_when_mixed"))
    add("editing (overall)", lambda r: r["editing"].get("overall"))
    for k in world.EDIT_KINDS:
        add(f"  {k}", lambda r, k=k: r["editing"].get(k))
    add("self-assessment agreement", lambda r: r["self_assessment"].get("agreement"))
    for a in evaluator.ASPECTS:  # where the verdicts part (not in results written before the breakdown)
        add(f"  {a} verdict agrees / passes a fault", lambda r, a=a: _pair(
            r["self_assessment"].get("by_aspect", {}).get(a, {}), "agree", "missed"))
    add("self-assessment valid JSON", lambda r: r["self_assessment"].get("valid"))
    add("eval seconds", lambda r: r["seconds"])
    head = "| metric | " + " | ".join(f"{r['backend']}: {Path(r.get('source', '')).name}" for r in results) + " |"
    sep = "|---|" + "---|" * len(results)
    return "\n".join([head, sep] + [f"| {label} | " + " | ".join(v) + " |" for label, v in rows])


def _pair(d: dict, a: str, b: str) -> str | None:
    return None if d.get(a) is None or d.get(b) is None else f"{d[a]:.3f} / {d[b]:.3f}"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.3f}" if isinstance(v, float) and v <= 1.0 else f"{v}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", action="append", default=[], help="engine folder (repeatable)")
    ap.add_argument("--checkpoint", action="append", default=[], help="checkpoint folder for the torch reference")
    ap.add_argument("--size", default="full", choices=sorted(SIZES))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--from-json", dest="from_json", nargs="+", default=None,
                    help="print one table from saved result files instead of evaluating")
    ap.add_argument("--decoder-fidelity", dest="decoder_fidelity", default=None, metavar="CHECKPOINT",
                    help="only measure how faithfully the checkpoint's decoder draws true codes")
    args = ap.parse_args(argv)
    if args.decoder_fidelity:
        print(json.dumps(decoder_fidelity(args.decoder_fidelity)))
        return 0
    if args.from_json:
        loaded = [json.loads(Path(f).read_text()) for f in args.from_json]
        print(results_table([r for d in loaded for r in (d["results"] if isinstance(d, dict) else d)]))
        return 0
    if not args.engine and not args.checkpoint:
        ap.error("give at least one --engine or --checkpoint")
    size = SIZES[args.size]
    results = []
    backends = [lambda e=e: RuntimeBackend(e, args.threads) for e in args.engine]
    backends += [lambda c=c: TorchBackend(c) for c in args.checkpoint]
    labels = args.engine + args.checkpoint
    for label, make in zip(labels, backends):
        backend = make()
        res = evaluate(backend, size, progress=lambda d, t: print(f"\r[eval] {label}: {d}/{t}", end="",
                                                                   file=sys.stderr, flush=True))
        print(file=sys.stderr)
        res["source"] = label
        results.append(res)
    print(results_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "date": time.strftime("%Y-%m-%d"), "threads": args.threads, "size": args.size}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
