"""Stage 4 alone from a recipe run's stage-3 weights, in several mixtures, each exported fp32 and evaluated held
out as `make eval-nano` does (docs/nano.md, "A judge trained on rendered near misses"). The pool is the
recipe's (its seed and stage-3 engine), and so are the steps, seed and learning rate: "recipe" reproduces the
run's own stage 4.
    python tools/nano_stage4_mixtures.py --work build/nano-judge-items-seed2 --seed 20242209 \\
        --schedule judge-phase recipe no-corrections more-editing
Mixtures: "recipe" (the schedule's own), "no-corrections" (poor samples without their corrected image),
"more-editing" (Schedule.stage4_edit 0.2, as --schedule judge-edit), "edit-<share>" (Schedule.stage4_edit
<share>, e.g. edit-0.1). Writes engines/illume-nano-s4-<mixture> and
benchmarks/results/nano-eval-stage4-<tag>-<mixture>.json. (One schedule's stage 4 with its ablation, written
as a checkpoint: `python -m illume_edge.nano.recipe --stage3-from WORK --schedule NAME`.)"""
import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

from illume_edge.export.engine import export_engine
from illume_edge.nano import probes, recipe, world

MIXTURES = {"recipe": {}, "no-corrections": {"corrections": False}, "more-editing": {"stage4_edit": 0.2}}


def mixture(name: str) -> dict:
    """A mixture's Schedule changes (and "corrections"): MIXTURES, or "edit-<share>"."""
    if name in MIXTURES:
        return dict(MIXTURES[name])
    if name.startswith("edit-"):
        try:
            return {"stage4_edit": float(name[len("edit-"):])}
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"mixture {name!r}: expected one of {sorted(MIXTURES)} or edit-<share>")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="a recipe run's --work folder (stage3_checkpoint, stage3_engine)")
    ap.add_argument("--seed", type=int, default=recipe.SEED)
    ap.add_argument("--schedule", default="judge-phase", choices=sorted(recipe.SCHEDULES))
    ap.add_argument("--tag", default="seed2")
    ap.add_argument("mixtures", nargs="+", help=f"{', '.join(sorted(MIXTURES))} or edit-<share>")
    args = ap.parse_args()
    changes = {name: mixture(name) for name in args.mixtures}  # a bad name fails before the pool is drawn
    with recipe.reproducible(2):
        return fine_tune_each(args, changes)


def fine_tune_each(args: argparse.Namespace, changes: dict[str, dict]) -> int:
    """Stage 4 of each mixture on the run's stage-3 weights and its pool; each evaluated on the held-out split."""
    work, wcfg = Path(args.work), world.WorldConfig()
    base = recipe.SCHEDULES[args.schedule]
    pool = recipe.self_assess_pool(work / "stage3_engine", wcfg, base.self_enhance_prompts,
                                   recipe._seed("self_assess", args.seed), probes._Quiet())
    print(f"pool: {sum(x.assessment.good for x in pool)} good of {len(pool)}", flush=True)
    for name in args.mixtures:
        opts = changes[name]
        corrections = opts.pop("corrections", True)
        s = dataclasses.replace(base, **opts)
        mods, trainer, builder = recipe.load_modules(work / "stage3_checkpoint")
        tasks = recipe.Tasks.for_schedule(builder, wcfg, s)
        sft = recipe.stage_mixtures(tasks, s.lookup_kinds, s.assess_rendered)["stage3"]
        assess = recipe.assessment_examples(pool, builder, wcfg, s.assess_poor_share, s.assess_evidence, corrections,
                                            evidence_axis=s.evidence_axis)
        mix, _ = recipe.stage4_mixtures(sft, tasks.edit, assess, s.stage4_edit, tasks.t2i_geneval, s.stage4_gen)
        trainer.train(mix, steps=s.stage4, batch=s.llm_batch, lr=5e-4, seed=recipe._seed("stage4", args.seed),
                      trainable="all", progress=probes._Quiet())
        engine = Path(f"engines/illume-nano-s4-{name}")
        export_engine(mods, engine, work / "stage3_checkpoint" / "mllm" / "tokenizer.json", progress=lambda m: None)
        out = f"benchmarks/results/nano-eval-stage4-{args.tag}-{name}.json"
        subprocess.run([sys.executable, "-m", "illume_edge.nano.evaluate", "--engine", str(engine), "--threads", "2",
                        "--json", out], check=True)
        print(f"{name}: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
