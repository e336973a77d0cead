"""The per-stage benchmark harness (benchmarks/stages.py): every stage runs and is accounted for, the runtime
side never imports torch, and the table's arithmetic is right. Timings themselves are not asserted (speed
goals live in `make bench`)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import stages
from illume_edge.config import preset
from illume_edge.runtime.grammar import ImageGrammar

REPO = Path(__file__).resolve().parent.parent
SMOKE = dataclasses.replace(stages.Protocol(**stages.PROTOCOL_SIZES["smoke"]), threads=1)


def _timing(r: dict) -> None:
    assert r["n"] >= 1 and 0 < r["min"] <= r["ms"] <= r["max"], r


def _ours_worker(engine_dir: Path, llm_stages_only: bool = False, protocol: stages.Protocol = SMOKE) -> dict:
    """The runtime worker in its own interpreter (as `make bench` runs it)."""
    args = {"engine": str(engine_dir), "protocol": dataclasses.asdict(protocol), "llm_stages_only": llm_stages_only}
    code = "import sys; from benchmarks.stages import _worker_main; _worker_main('ours', sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ours(tiny_engine):
    return _ours_worker(tiny_engine("tiny-plus")[0])


def test_ours_worker_times_every_stage_without_torch(ours):
    cfg = preset("tiny-plus")
    assert ours["torch_imported"] is False
    keys = [k for k, _, _ in stages.stage_rows(SMOKE)]
    for key in keys:
        assert key in ours, f"stage {key} missing"
        if not key.startswith("image_loop"):
            _timing(ours[key])
    positions = ImageGrammar(cfg, *SMOKE.image_hw).length
    for batch in (1, 2):
        loop = ours[f"image_loop_b{batch}"]
        assert loop["positions"] == positions and loop["batch"] == batch
        # forced runs go in with the next sampled token: fewer LLM calls than positions, except a CFG pair
        # on the fused graph, whose attention kernel takes one new token per row on a non-empty cache
        assert 0 < loop["llm_calls"] < positions if batch == 1 else 0 < loop["llm_calls"] <= positions
        parts = loop["llm_ms"] + loop["head_ms"] + loop["sampler_ms"] + loop["host_ms"]
        assert parts == pytest.approx(loop["ms_per_image_token"], rel=1e-6)
        assert 0 <= loop["host_pct"] <= 100
    assert ours["decoder"] == "diffusion"
    assert set(ours["e2e_generate"]["stages_ms"]) >= {"prefill", "image_tokens", "unet", "vae_decoder", "total"}
    assert ours["peak_rss_mb"] > 0
    assert len(ours["parity_probe"]["greedy_tokens"]) == SMOKE.decode_steps


def test_eager_worker_and_the_table(ours, tiny_engine):
    """The eager side on the same shape (its own seeded weights), composed end-to-end figures and the table."""
    eager = stages.eager_worker("smoke", tiny_engine("tiny-plus")[0] / "tokenizer.json", SMOKE)
    for key in ("vision_semantic", "vision_pixel", "decode_b1", "image_step_b1", "image_step_b2", "vq_decoder",
                "unet_step_b2", "vae_decoder") + tuple(f"prefill_{n}" for n in SMOKE.prompt_lengths):
        _timing(eager[key])
    cfg = stages.smoke_shape()
    _timing(eager["prefill_generate"]), _timing(eager["edit_prefix"]), _timing(eager["e2e_understand"])
    composed = stages.compose_eager_e2e(eager, cfg, SMOKE)
    positions = ImageGrammar(cfg, *SMOKE.image_hw).length
    tail = (positions * eager["image_step_b2"]["ms"] + SMOKE.diffusion_steps * eager["unet_step_b2"]["ms"]
            + eager["vae_decoder"]["ms"])
    assert composed["e2e_generate"]["ms"] == pytest.approx(eager["prefill_generate"]["ms"] + tail)
    assert composed["e2e_edit"]["ms"] == pytest.approx(eager["edit_prefix"]["ms"] + tail)
    result = {"machine": {"cpu": "test", "cores": 1, "read_bandwidth_gbs": 1.0},
              "versions": {k: "x" for k in ("onnxruntime", "torch", "transformers", "diffusers")},
              "git_commit": "0" * 12, "protocol": dataclasses.asdict(SMOKE),
              "shape": {"name": "smoke", "summary": "tiny"}, "ours": {"fp32": ours}, "eager": eager,
              "eager_composed": composed, "failures": {"ours int4": "Traceback\nRuntimeError: boom"},
              "parity": stages.parity({"fp32": ours}, eager)}
    table = stages.markdown(result)
    ratio = eager["unet_step_b2"]["ms"] / ours["unet_step_b2"]["ms"]
    assert f"{ratio:.2f}x" in table.split("UNet step")[1].splitlines()[0]
    assert "(composed)" in table.split("generation")[1].splitlines()[0]
    assert "(composed)" not in table.split("understanding")[1].splitlines()[0]  # measured whole
    assert "FAILED ours int4: RuntimeError: boom" in table
    assert "greedy tokens" in result["parity"]["fp32"]


def test_engine_outside_e2e_precisions_times_the_stage_kernels_only(tiny_engine):
    """The default protocol runs the image loops and end-to-end requests on int4 only: the fp32 worker still
    times every per-stage kernel (the decoders on seeded codes of the level grids), and no loop."""
    fp32 = _ours_worker(tiny_engine("tiny-plus")[0], protocol=dataclasses.replace(SMOKE, e2e_precisions=("int4",)))
    assert fp32["precision"] == "fp32" and fp32["torch_imported"] is False
    for key in ("vision_semantic", "vision_pixel", "decode_b1", "vq_decoder", "unet_step_b2", "vae_decoder"):
        _timing(fp32[key])
    assert not {k for k in fp32 if k.startswith(("image_loop", "e2e_"))}


def test_repeat_stops_at_its_budget_after_two_runs():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.02)

    r = stages.repeat(slow, reps=5, budget_s=0.03)
    assert r["n"] == 2 and len(calls) == 3  # the warm-up, then two timed runs past the budget
    calls.clear()
    assert stages.repeat(slow, reps=3, budget_s=None)["n"] == 3 and len(calls) == 4
    assert stages.repeat(slow, reps=1, budget_s=0.0)["n"] == 1  # never more runs than asked


def test_quantized_worker_skips_the_graphs_it_shares_with_fp32(ours, tiny_engine):
    """The int4 worker (llm_stages_only) times the LLM stages and end to end, not the fp32 graphs again;
    the table marks those cells."""
    int4 = _ours_worker(tiny_engine("tiny-plus")[0], llm_stages_only=True)
    assert not set(stages.FP32_GRAPH_STAGES) & set(int4)
    assert {"decode_b1", "image_loop_b1", "image_loop_b2", "e2e_generate", "e2e_edit"} <= set(int4)
    result = {"machine": {"cpu": "test", "cores": 1, "read_bandwidth_gbs": 1.0},
              "versions": {k: "x" for k in ("onnxruntime", "torch", "transformers", "diffusers")},
              "git_commit": "0" * 12, "protocol": dataclasses.asdict(SMOKE),
              "shape": {"name": "smoke", "summary": "tiny"}, "ours": {"fp32": ours, "int4": int4}, "failures": {}}
    table = stages.markdown(result)
    assert "(fp32 graph)" in table.split("UNet step")[1].splitlines()[0]
    assert "(fp32 graph)" not in table.split("decode, batch 1")[1].splitlines()[0]


def test_roofline_counts_llm_calls_and_level_heads(ours, tiny_engine):
    from benchmarks.llm_decode import streamed_weight_bytes

    engine_dir = tiny_engine("tiny-plus")[0]
    cfg = preset("tiny-plus")
    o = {k: dict(v) for k, v in ours.items() if k in ("decode_b1", "image_loop_b1")}
    stages.roofline(o, engine_dir, cfg, SMOKE, gbs=10.0)
    w = {n: streamed_weight_bytes(engine_dir / f"{n}.onnx")["streamed"] for n in ("llm", "head_text", "head_level0",
                                                                                 "head_level1")}
    loop = o["image_loop_b1"]
    grid = [a * b for a, b in (cfg.level_grid(i, *SMOKE.image_hw) for i in range(2))]
    want = (loop["llm_calls"] * w["llm"] + grid[0] * w["head_level0"] + grid[1] * w["head_level1"]) / loop["positions"]
    assert loop["mb_read"] == pytest.approx(want / 1e6)
    assert loop["bound_ms"] == pytest.approx(want / 10e9 * 1e3)
    assert o["decode_b1"]["mb_read"] == pytest.approx((w["llm"] + w["head_text"]) / 1e6)
    assert o["decode_b1"]["roofline_pct"] == pytest.approx(100 * o["decode_b1"]["bound_ms"] / o["decode_b1"]["ms"])


def test_parity_flags_different_weights():
    a = {"fp32": {"parity_probe": {"vision_features_head": [0.0, 1.0], "greedy_tokens": [1, 2, 3]}}}
    b = {"parity_probe": {"vision_features_head": [0.0, 1.5], "greedy_tokens": [1, 9, 3]}}
    assert stages.parity(a, b)["fp32"] == "vision features max |diff| 5.00e-01; greedy tokens 2/3 equal"


def test_unknown_worker_fails_clearly():
    with pytest.raises(SystemExit, match="unknown worker 'gpu'"):
        stages._worker_main("gpu", json.dumps({"protocol": dataclasses.asdict(SMOKE)}))


def test_cli_bench_runs_the_checkout_benches_in_order(monkeypatch, capsys):
    import subprocess

    from illume_edge import cli

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, cwd: calls.append((cmd[2:], cwd)) or (1 if
                        cmd[3:] == ["--fail"] else 0))
    assert cli.main(["bench", "stages", "--shape", "smoke"]) == 0
    assert calls == [(["benchmarks.stages", "--shape", "smoke"], REPO)]
    calls.clear()
    assert cli.main(["bench"]) == 0
    assert [c[0][0] for c in calls] == ["benchmarks.llm_decode", "benchmarks.stages"]
    calls.clear()
    assert cli.main(["bench", "all", "--fail"]) == 1  # the first failure stops the run
    assert len(calls) == 1


def test_cli_bench_outside_a_checkout_says_how(monkeypatch, tmp_path, capsys):
    from illume_edge import cli

    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "illume_edge" / "cli.py"))
    assert cli.main(["bench"]) == 2
    assert "source checkout" in capsys.readouterr().err


def test_streamed_bytes_leave_out_tables_read_by_index(tiny_engine):
    """The roofline counts what a decode step reads in full: not the embedding table (one row per token) nor
    the fused graph's RoPE cos / sin caches (the rows at the position ids), but every projection."""
    import onnx
    from onnx import numpy_helper

    from benchmarks.llm_decode import streamed_weight_bytes

    path = tiny_engine("tiny-plus", "fused")[0] / "llm.onnx"
    model = onnx.load(str(path))
    sizes = {t.name: numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    rope = {n.input[i] for n in model.graph.node if n.op_type == "GroupQueryAttention" for i in (7, 8)}
    embed = {n.input[0] for n in model.graph.node if n.op_type == "Gather"} & set(sizes)
    assert len(rope) == 2 and rope <= set(sizes) and embed
    got = streamed_weight_bytes(path)
    assert got["gathered_tables"] == sum(sizes[n] for n in rope | embed)
    assert got["streamed"] == sum(sizes.values()) - got["gathered_tables"]


def test_layout_ops_bench_compares_equal_forms():
    """benchmarks/layout_ops.py: each op's torch export and the form the exporter emits agree: bit for bit where
    they only move data, to float rounding for the 2x2 mean (another summation order)."""
    from benchmarks import layout_ops

    x = np.random.default_rng(1).standard_normal((1, 8, 6, 10)).astype(np.float32)
    forms = layout_ops.pairs(8, 6, 10)
    assert len(forms) == 3
    for what, torch_form, ours in forms:
        (_, want), (_, got) = layout_ops._time(torch_form, x, reps=1), layout_ops._time(ours, x, reps=1)
        assert want.shape == got.shape, what
        if "mean" in what:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=what)
        else:
            assert np.array_equal(want, got), what
