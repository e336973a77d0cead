"""The shipped ILLUME-nano checkpoint: intact, strict, within budget, and accurate through the runtime."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from illume_edge.config import ModelConfig, preset
from illume_edge.manifest import sha256_file

NANO = Path(__file__).resolve().parents[1] / "models" / "illume-nano"
BUDGET_BYTES = 12 * 1024 * 1024
# A regression guard on a small held-out subset (evaluate.SIZES["small"]: 42 questions, 24 prompts x 2
# samples, 16 edits). The shipped model ("judge-edit-light", deterministic) measured 0.905 / 0.875 / 0.500 /
# 0.854 there (fp32 runtime; the previous checkpoint 0.857 / 0.750 / 0.750 / 0.938); the bars sit about two
# misses below that. The 16 edits are 4 per kind: the shipped model removes none of its 4 (0.50 of 20 on the
# full split, editing 0.713 overall). docs/nano.md has the full split's numbers against issue 3's targets.
SMALL_BARS = {"understanding": 0.85, "generation": 0.8, "editing": 0.37, "assessment": 0.8}


def test_checkpoint_files_match_their_checksums():
    lines = (NANO / "SHA256SUMS").read_text().splitlines()
    listed = {}
    for line in lines:
        digest, rel = line.split("  ", 1)
        listed[rel] = digest
    on_disk = {p.relative_to(NANO).as_posix() for p in NANO.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert set(listed) == on_disk
    for rel, digest in listed.items():
        assert sha256_file(NANO / rel) == digest, f"{rel}: contents changed since the recipe wrote them"


def test_checkpoint_fits_the_budget():
    total = sum(p.stat().st_size for p in NANO.rglob("*") if p.is_file())
    assert total <= BUDGET_BYTES, f"models/illume-nano holds {total / 2**20:.2f} MiB, budget 12 MiB"


def test_the_shipped_checkpoint_was_trained_with_make_nanos_schedule():
    """recipe.json records how the checkpoint was trained: make nano's schedule (recipe.DEFAULT_SCHEDULE), the
    recipe's default seed and thread count. Training is deterministic for a thread count (recipe.reproducible),
    so `make nano` on this machine class rewrites these bytes (docs/nano.md, "Reproducing a run")."""
    import dataclasses
    import inspect

    from illume_edge.nano import recipe

    got = json.loads((NANO / "recipe.json").read_text())
    want = json.loads(json.dumps(dataclasses.asdict(recipe.SCHEDULES[recipe.DEFAULT_SCHEDULE])))  # tuples as lists
    # a field added to Schedule after the run is absent from its recipe.json, and the run had its default
    default = json.loads(json.dumps(dataclasses.asdict(recipe.Schedule())))
    later = {k: default[k] for k in set(want) - set(got["schedule"])}
    assert got["schedule"] | later == want and got["seed"] == recipe.SEED
    assert later == {"lookup_then": [], "gen_phase": 0, "stage4_gen": 0.0, "compare": 0,
                     "evidence_axis": False, "curriculum_grounding": 0.5,
                     "curriculum_edits": True}  # the fields added since: extend
    # this when one more is
    assert got["threads"] == inspect.signature(recipe.run).parameters["threads"].default


def test_checkpoint_config_is_the_preset():
    shipped = ModelConfig.from_dict(json.loads((NANO / "illume_edge.json").read_text()))
    assert shipped == preset("illume-nano")


def test_checkpoint_loads_strictly():
    from illume_edge.export.checkpoint import load_checkpoint

    mods = load_checkpoint(NANO)
    assert mods.cfg == preset("illume-nano")
    assert mods.unet is not None and mods.vae is not None and len(mods.quantizers) == 1


def test_shipped_tokenizer_codes_are_the_token_classes():
    """The DualViTok file rebuilds the tokenizer strictly, and its codes of unseen scenes are their classes."""
    import numpy as np

    from illume_edge.export.checkpoint import load_checkpoint, read_dualvitok
    from illume_edge.nano import world
    from illume_edge.nano.vision_train import SemanticTokenizer, VisionTower, token_classes

    mods = load_checkpoint(NANO)
    cfg = mods.cfg
    sem = SemanticTokenizer.from_dualvitok(read_dualvitok(NANO / "dualvitok" / "pytorch_model.bin"),
                                           mods.quantizers[0], cfg.branches[0].in_dim)
    tower = VisionTower(cfg, mods.encoders["semantic"], sem)
    scenes = world.heldout_scenes(32)
    codes = tower.codes([world.render(s) for s in scenes]).numpy()
    classes = np.stack([token_classes(s, (6, 6), world.WorldConfig()) for s in scenes])
    assert (codes == classes).mean() >= 0.98  # measured 0.989 (the recipe logs code_acc 0.989 at its end)


@pytest.fixture(scope="module")
def nano_engine(tmp_path_factory):
    from illume_edge.export.checkpoint import load_checkpoint
    from illume_edge.export.engine import export_engine

    out = tmp_path_factory.mktemp("nano") / "illume-nano"
    export_engine(load_checkpoint(NANO), out, NANO / "mllm" / "tokenizer.json", progress=lambda s: None)
    return out


def test_engine_manifest_matches_the_checkpoint(nano_engine):
    from illume_edge.manifest import read_manifest

    m = read_manifest(nano_engine)
    assert m.model_config() == preset("illume-nano")
    assert m.assets["tokenizer"].sha256 == sha256_file(NANO / "mllm" / "tokenizer.json")


def test_heldout_subset_meets_the_reduced_bar_through_the_runtime(nano_engine):
    from illume_edge.nano.evaluate import SIZES, RuntimeBackend, evaluate

    r = evaluate(RuntimeBackend(nano_engine), SIZES["small"])
    got = {"understanding": r["understanding"]["overall"], "generation": r["generation_single"]["overall"],
           "editing": r["editing"]["overall"], "assessment": r["self_assessment"]["agreement"]}
    short = {k: (round(v, 3), SMALL_BARS[k]) for k, v in got.items() if v < SMALL_BARS[k]}
    assert not short, f"below the bar (got, bar): {short}; full results: {json.dumps(r)}"
    # a perfect judge's pick is right whenever any candidate is: no ranking, and no single sample, beats it
    n = SIZES["small"].candidates
    diag = r[f"best_of_{n}_diagnostics"]
    assert diag["oracle_overall"] >= max(r[f"generation_best_of_{n}"]["overall"], r["generation_single"]["overall"],
                                         r[f"generation_best_of_{n}_self_described"]["overall"])
    assert 0.0 <= diag["tied_prompts"] <= 1.0
    assert all(0.0 <= diag[k] <= 1.0 for k in ("score_on_right", "score_on_wrong", "pick_right_when_mixed",
                                                "chance_when_mixed") if diag[k] is not None)
    if diag["chance_when_mixed"] is not None:  # a mixed prompt has a right and a wrong candidate among N
        assert 1 / n <= diag["chance_when_mixed"] <= 1 - 1 / n


def test_assessments_with_evidence_fit_the_runtimes_assess_budget():
    """Pipeline.assess stops at the closing brace or its max_new_tokens: an assessment with the evidence field, of
    a GenEval prompt or a full caption, for any near miss, must close within it (docs/nano.md, "Stating the
    evidence first")."""
    import inspect

    import numpy as np

    from illume_edge.export.checkpoint import CheckpointPaths
    from illume_edge.nano import evaluator, world
    from illume_edge.runtime.pipeline import Pipeline
    from illume_edge.runtime.prompts import TextTokenizer

    budget = inspect.signature(Pipeline.assess).parameters["max_new_tokens"].default
    paths = CheckpointPaths.from_dir(NANO)
    tok = TextTokenizer.from_file(paths.mllm / "tokenizer.json", preset("illume-nano"))
    rng, longest = np.random.default_rng(0), 0
    categories = world.GEN_CATEGORIES + ("full",)
    for i in range(1400):
        prompt, source = world.sample_gen_prompt(rng, world.WorldConfig(), categories[i % len(categories)])
        scene = world.near_miss(source, rng) or source
        for axis in (False, True):  # Schedule.evidence_axis: places instead of colors for position prompts
            text = evaluator.assessment_to_json(evaluator.assess(prompt, scene),
                                                evaluator.evidence(prompt, scene, axis=axis))
            longest = max(longest, len(tok.encode(text)))
    assert 100 < longest <= budget, (longest, budget)  # 123 tokens with the shipped tokenizer (full captions)
