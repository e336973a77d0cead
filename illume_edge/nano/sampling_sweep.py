"""Choosing ILLUME-nano's sampling defaults on a development set, never on the held-out split.

The first defaults (generation: temperature 1, CFG 2; editing: temperature 1, CFG 1.5; decoder CFG 1.5) took
the release's CFG scales, which were set for 3B / 7B models. A model this small samples its own mistakes at
temperature 1, and editing's unconditional row is the reconstruction of the source, so guidance above 1
pushes every object away from the source, not only the edited one. This sweep measures each setting with the
world's evaluator on *training-split* prompts and edits drawn with their own seed (`DEV_SEED`, not the
evaluation's): the held-out split stays unseen by the choice, and `make eval-nano` then reports the chosen
defaults on it. The committed results (docs/nano.md, "Sampling defaults") came from

    python -m illume_edge.nano.sampling_sweep --engine engines/illume-nano --task generate \
        --temperature 0.2,0.4,0.7,1.0 --cfg 2,2.5 --decoder-cfg 1.5,3 --threads 2 \
        --json benchmarks/results/nano-sampling-sweep-generate.json
    python -m illume_edge.nano.sampling_sweep --engine engines/illume-nano --task edit \
        --temperature 0.2,0.4,1.0 --cfg 1,1.5 --decoder-cfg 1.5,3 --per-kind 40 --samples 1 --threads 2 \
        --json benchmarks/results/nano-sampling-sweep-edit.json

Every setting decodes the same prompts with the same seeds, so two rows differ only by the setting.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import evaluator, world

DEV_SEED = 9191  # the development set's draws (the held-out evaluation uses evaluate.EVAL_SEED on held-out scenes)
TASKS = ("generate", "edit")


@dataclass(frozen=True)
class Setting:
    temperature: float
    cfg: float
    decoder_cfg: float | None = None  # None: the checkpoint's default

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.cfg <= 0 or (self.decoder_cfg is not None and self.decoder_cfg <= 0):
            raise ValueError(f"sampling sweep: expected temperature >= 0 and CFG scales > 0, got {self}")


def dev_tasks(task: str, per_kind: int, wcfg: world.WorldConfig = world.WorldConfig(), seed: int = DEV_SEED) -> list:
    """Training-split (prompt, the scene it was written from) pairs, `per_kind` per GenEval category, or
    training-split edits, `per_kind` per edit kind."""
    if task not in TASKS:
        raise ValueError(f"sampling sweep: task must be one of {TASKS}, got {task!r}")
    rng = np.random.default_rng(seed)
    if task == "generate":
        return [world.sample_gen_prompt(rng, wcfg, c, "train") for c in world.GEN_CATEGORIES for _ in range(per_kind)]
    return [world.sample_edit(rng, wcfg, "train", k) for k in world.EDIT_KINDS for _ in range(per_kind)]


def score_setting(pipe, task: str, items: list, setting: Setting, samples: int = 1,
                  wcfg: world.WorldConfig = world.WorldConfig()) -> dict[str, float]:
    """The evaluator's scores of `setting` on `items` (`dev_tasks`; GenEval categories or edit kinds, and
    overall; and "failures", `evaluator.generation_failures` / `editing_failures`); item i's sample s uses seed
    10 * i + s, the same for every setting."""
    kw = dict(temperature=setting.temperature, cfg=setting.cfg, decoder_cfg=setting.decoder_cfg)
    if task == "generate":
        out = [(p, evaluator.parse(pipe.generate(p.text, seed=10 * i + s, **kw).image, wcfg))
               for i, (p, _) in enumerate(items) for s in range(samples)]
        return evaluator.generation_scores(out) | {"failures": evaluator.generation_failures(out)}
    out = [(e, evaluator.parse(pipe.edit(world.render(e.source, wcfg), e.instruction, seed=10 * i + s, **kw).image,
                               wcfg)) for i, e in enumerate(items) for s in range(samples)]
    return evaluator.editing_scores(out) | {"failures": evaluator.editing_failures(out)}


def sweep(pipe, task: str, settings: list[Setting], per_kind: int, samples: int = 1, log=None) -> list[dict]:
    items = dev_tasks(task, per_kind)
    rows = []
    for s in settings:
        t0 = time.perf_counter()
        rows.append({"temperature": s.temperature, "cfg": s.cfg, "decoder_cfg": s.decoder_cfg,
                     **score_setting(pipe, task, items, s, samples), "seconds": round(time.perf_counter() - t0, 1)})
        if log is not None:
            log(json.dumps(rows[-1]))
    return rows


def table(rows: list[dict], task: str) -> str:
    kinds = world.GEN_CATEGORIES if task == "generate" else world.EDIT_KINDS
    head = "| temperature | CFG | decoder CFG | " + " | ".join(kinds) + " | overall |"
    lines = [head, "|" + "---|" * (len(kinds) + 4)]
    best = max(rows, key=lambda x: x["overall"]) if rows else None
    for r in rows:
        dc = "default" if r["decoder_cfg"] is None else f"{r['decoder_cfg']:g}"
        overall = f"**{r['overall']:.3f}**" if r is best else f"{r['overall']:.3f}"
        lines.append(f"| {r['temperature']:g} | {r['cfg']:g} | {dc} | " + " | ".join(f"{r[k]:.3f}" for k in kinds)
                     + f" | {overall} |")
    return "\n".join(lines)


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", required=True, help="engine folder")
    ap.add_argument("--task", required=True, choices=TASKS)
    ap.add_argument("--temperature", default="0.2,0.4,0.7,1.0", help="comma-separated temperatures")
    ap.add_argument("--cfg", default="1,1.5,2,2.5", help="comma-separated LLM CFG scales")
    ap.add_argument("--decoder-cfg", dest="decoder_cfg", default="",
                    help="comma-separated diffusion-decoder CFG scales (empty: the checkpoint's default)")
    ap.add_argument("--per-kind", dest="per_kind", type=int, default=32,
                    help="prompts per GenEval category / edits per kind")
    ap.add_argument("--samples", type=int, default=2, help="samples per prompt or edit (seeds 10 * i + s)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    from ..runtime.pipeline import Pipeline

    decoder = _floats(args.decoder_cfg, "--decoder-cfg") or [None]
    settings = [Setting(t, c, d) for t, c, d in itertools.product(_floats(args.temperature, "--temperature"),
                                                                  _floats(args.cfg, "--cfg"), decoder)]
    pipe = Pipeline.load(args.engine, threads=args.threads)
    rows = sweep(pipe, args.task, settings, args.per_kind, args.samples, log=lambda s: print(s, file=sys.stderr))
    print(table(rows, args.task))
    if args.json:
        meta = {"engine": args.engine, "task": args.task, "per_kind": args.per_kind, "samples": args.samples,
                "dev_seed": DEV_SEED, "split": "train", "date": time.strftime("%Y-%m-%d")}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
