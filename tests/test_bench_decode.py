"""The LLM-decode benchmark harness (benchmarks/llm_decode.py): interleaved timing rounds and a smoke run of the
whole flow (export both graphs, quantize, time ours and transformers eager). Timings are not asserted."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import llm_decode

REPO = Path(__file__).resolve().parent.parent


def test_interleaved_rounds_rotate_and_report_failures():
    calls: list[str] = []

    def fake(name, fail_at=None):
        def rep():
            calls.append(name)
            if fail_at is not None and calls.count(name) == fail_at:
                raise RuntimeError(f"{name} broke")
            return 0.5, [0.01 * len(name)] * 4, [1, 2, 3], ({"llm": 0.03} if name == "a" else {})
        return rep

    failures: dict[str, str] = {}
    out = llm_decode.interleaved({"a": fake("a"), "bb": fake("bb"), "ccc": fake("ccc", fail_at=3)}, 1, 3,
                                 lambda s: None, failures)
    warmup, rounds = calls[:3], calls[3:]
    assert warmup == ["a", "bb", "ccc"]
    # round 1: a bb ccc; round 2 starts one later: bb ccc(fails, 3rd call) a; round 3 without ccc
    assert rounds == ["a", "bb", "ccc", "bb", "ccc", "a", "a", "bb"]
    assert set(out) == {"a", "bb"} and "ccc broke" in failures["ccc"]
    assert out["a"]["reps"] == 3 and out["a"]["decode_ms_per_token"] == pytest.approx(10.0)
    assert out["bb"]["decode_ms_per_token"] == pytest.approx(20.0) and out["a"]["prefill_ms"] == 500.0
    assert out["a"]["llm_ms_per_token"] == pytest.approx(7.5) and "llm_ms_per_token" not in out["bb"]

    # a runtime failing its warm-up leaves the rotation; the one after it is still warmed up and timed
    calls.clear()
    failures.clear()
    out = llm_decode.interleaved({"x": fake("x", fail_at=1), "y": fake("y"), "z": fake("z")}, 1, 2,
                                 lambda s: None, failures)
    assert calls == ["x", "y", "z", "y", "z", "z", "y"] and set(out) == {"y", "z"} and "x broke" in failures["x"]


def test_load_orders_rotate_evenly():
    names = ["ours fp32", "ours int4", "genai fp32", "genai int4"]
    two = llm_decode.load_orders(names, 2)
    assert two == [names, ["genai fp32", "genai int4", "ours fp32", "ours int4"]]  # ours and the peers trade places
    every = llm_decode.load_orders(names, 4)
    assert sorted(o[0] for o in every) == sorted(names) and all(sorted(o) == sorted(names) for o in every)
    assert llm_decode.load_orders(names, 1) == [names] and llm_decode.load_orders([], 2) == []



def test_genai_cuda_graph_variants_keep_the_builders_cuda_options(tmp_path):
    """The GPU bench times onnxruntime-genai with its CUDA graph on and off: a linked copy of the model folder
    whose CUDA provider options say which, the builder's other options kept, the original untouched."""
    model = tmp_path / "genai-fp16"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"onnx")
    cuda = {"cuda": {"enable_cuda_graph": "0", "enable_skip_layer_norm_strict_mode": "1"}}
    config = {"model": {"decoder": {"session_options": {"provider_options": [cuda]}}}}
    (model / "genai_config.json").write_text(json.dumps(config))
    for on, flag in ((True, "1"), (False, "0")):
        dest = tmp_path / f"graph-{flag}"
        llm_decode.genai_linked_copy(model, dest, lambda o, _on=on: llm_decode.genai_cuda_graph(o, _on))
        got = json.loads((dest / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
        assert got == {"provider_options": [{"cuda": {"enable_cuda_graph": flag,
                                                      "enable_skip_layer_norm_strict_mode": "1"}}]}
        assert (dest / "model.onnx").is_symlink()
    assert json.loads((model / "genai_config.json").read_text()) == config
    options: dict = {}  # a config without CUDA provider options gets them
    llm_decode.genai_cuda_graph(options, True)
    assert options == {"provider_options": [{"cuda": {"enable_cuda_graph": "1"}}]}

def test_a_timing_process_that_fails_is_reported():
    """A child whose runtime cannot load reports it by name; the pooled summary leaves it out."""
    spec = {"name": "ours int4", "kind": "ours", "path": "/nonexistent/engine", "spin": None}
    summary, per_order, failures = llm_decode.time_in_load_orders([spec], 1, 1, [1, 2, 3], 2, 0, 1, None,
                                                                  lambda s: None)
    assert summary == {} and "ours int4" in failures and per_order[0]["decode_ms_per_token"] == {}
    with pytest.raises(ValueError, match="unknown kind"):
        llm_decode.load_rep({"name": "x", "kind": "tflite", "path": "."}, [1], 1, 1)


def test_smoke_run_times_both_graphs_and_eager(tmp_path):
    out = tmp_path / "decode.json"
    cmd = [sys.executable, "-m", "benchmarks.llm_decode", "--shape", "smoke", "--steps", "4", "--reps", "2",
           "--skip-genai", "--profile", "int4", "--llm-graphs", "fused", "portable", "--precisions", "fp32", "int8",
           "int4", "--spin-modes", "off", "--eager-reps", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert not result["failures"], result["failures"]
    runs = result["runs"]
    want = {"illume-edge fp32", "illume-edge int8", "illume-edge int4", "illume-edge fp32 (portable graph)",
            "illume-edge int4 (portable graph)", "transformers eager fp32", "illume-edge fp32 (spin off)",
            "illume-edge int8 (spin off)", "illume-edge int4 (spin off)"}
    assert set(runs) == want
    for name, r in runs.items():  # 2 load orders x 2 rounds for the ONNX runtimes, eager's own 2 rounds
        assert r["reps"] == (2 if "eager" in name else 4), name
        assert r["steps"] == 4 and 0 < r["decode_ms_min"] <= r["decode_ms_max"]
        assert 0 < r["roofline_pct"] and r["bytes_per_token"] > r["kv_bytes_per_token"]
    orders = result["load_orders"]
    assert len(orders) == 2 and orders[0]["order"][0] != orders[1]["order"][0]
    assert all(set(o["decode_ms_per_token"]) == set(runs) - {"transformers eager fp32"} for o in orders)
    # same weights, fp32, greedy: both graphs and eager pick the same tokens
    assert runs["illume-edge fp32"]["tokens"] == runs["illume-edge fp32 (portable graph)"]["tokens"] \
        == runs["transformers eager fp32"]["tokens"] == runs["illume-edge fp32 (spin off)"]["tokens"]
    ours = runs["illume-edge int4"]
    assert 0 < ours["llm_ms_per_token"] < ours["decode_ms_max"] and ours["head_and_pick_ms_per_token"] > 0
    profile = result["profiles"]["int4"]["graphs"]
    llm, head = profile["llm"], profile["head_text"]
    assert "GroupQueryAttention" in llm["op_share_pct"] and llm["op_ms_per_step"]["GroupQueryAttention"] > 0
    assert llm["runs"] == head["runs"] == result["profiles"]["int4"]["steps"]  # the decode steps, not the prefill
    assert list(head["op_share_pct"]) == ["MatMulNBits"]  # the int4 text head: one weight-only GEMM
    assert "interleaved rounds" in proc.stdout and "Load order 2 (loaded first" in proc.stdout


def test_genai_profiling_dir_links_the_model_and_turns_the_profiler_on(tmp_path):
    model = tmp_path / "genai-int4"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"onnx")
    config = {"model": {"decoder": {"filename": "model.onnx", "session_options": {"intra_op_num_threads": 2}}}}
    (model / "genai_config.json").write_text(json.dumps(config))
    prefix = llm_decode.genai_profiling_dir(model, tmp_path / "prof")
    copied = json.loads((tmp_path / "prof" / "genai_config.json").read_text())
    options = copied["model"]["decoder"]["session_options"]
    assert options == {"intra_op_num_threads": 2, "enable_profiling": str(prefix)}
    linked = tmp_path / "prof" / "model.onnx"
    assert linked.is_symlink() and linked.read_bytes() == b"onnx"
    assert json.loads((model / "genai_config.json").read_text()) == config  # the original is untouched
    (model / "genai_config.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(RuntimeError, match="expected model.decoder"):
        llm_decode.genai_profiling_dir(model, tmp_path / "prof")
    (model / "genai_config.json").unlink()
    with pytest.raises(RuntimeError, match="no genai_config.json"):
        llm_decode.genai_profiling_dir(model, tmp_path / "prof")


def test_profile_genai_on_a_built_model(tmp_path):
    """The peer's profile, end to end on the smoke shape (where onnxruntime-genai is installed: `.[bench]`)."""
    pytest.importorskip("onnxruntime_genai")
    from illume_edge.export.llm import build_llm
    from illume_edge.export.tokenizer_factory import save_tokenizer_files

    cfg = llm_decode.smoke_shape()
    hf = tmp_path / "hf"
    build_llm(cfg, seed=0).save_pretrained(hf, safe_serialization=True)
    save_tokenizer_files(cfg, hf)
    llm_decode.build_genai(hf, tmp_path / "genai-int4", "int4", 2, tmp_path / "cache")
    result = llm_decode.profile_genai(tmp_path / "genai-int4", [5, 6, 7, 8, 9], 4, tmp_path)
    g = result["graphs"]["model"]
    assert g["runs"] >= 3 and g["kernel_ms_per_step"] > 0  # decode runs only: the prefill is left out
    assert {"MatMulNBits", "GroupQueryAttention"} <= set(g["op_ms_per_step"])
    assert not (tmp_path / "genai-int4-profile").exists()  # the profiling copy is removed


def test_gpu_decode_harness_runs_on_the_host(tmp_path):
    """benchmarks/gpu_decode.py with --device cpu: the GPU bench's code (fp16 export, int4 over fp16, the
    runtime with OrtValue buffers and graph ids, eager fp16, bandwidth and roofline) on the host, so that the
    first GPU run does not find a harness bug. fp16 engines and eager fp16 start from the same weights: their
    first greedy tokens agree. Our engines are built by a `--build-only` run into a workdir and reused by the
    timing run, which adds onnxruntime-genai's model where it is installed (a lent GPU's short calls: the
    export runs in the background while the GPU tests run)."""
    out, work = tmp_path / "gpu.json", tmp_path / "work"
    base = [sys.executable, "-m", "benchmarks.gpu_decode", "--shape", "smoke", "--device", "cpu", "--workdir",
            str(work)]
    build = subprocess.run(base + ["--build-only", "--skip-genai"], cwd=REPO, capture_output=True, text=True,
                           timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    stamp = json.loads((work / "built.json").read_text())
    assert stamp["built_from"]["shape"] == "smoke" and stamp["built_from"]["block_size"] == 32
    assert "| illume-edge" not in build.stdout
    assert stamp["genai_ep"] is None and stamp["genai_models"] == {}  # the timing run adds the peer's models
    cmd = base + ["--steps", "4", "--prompt", "12", "--reps", "2", "--graph-ab", "--step-ab", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engines reused" in proc.stderr and "export fp16" not in proc.stderr
    assert not work.exists()  # removed after timing (no --keep)
    result = json.loads(out.read_text())
    runs, failures = result["runs"], result["failures"]
    # --step-ab: each token read before the next step is queued, and the step as before the third H100 session
    read, before = " (token read before the next step)", " (runs synchronized, own streams)"
    ours = {"illume-edge fp16", "illume-edge fp16 (no CUDA graph)", "illume-edge int4",
            "illume-edge int4 (no CUDA graph)", "illume-edge fp16" + before, "illume-edge int4" + before,
            "illume-edge fp16" + read, "illume-edge int4" + read, "PyTorch eager fp16"}
    if importlib.util.find_spec("onnxruntime_genai") is None:  # `make test` has no peer; `make bench` has
        assert set(runs) == ours and list(failures) == ["onnxruntime-genai"], failures
        assert "not installed" in failures["onnxruntime-genai"]
    else:  # its int4 model from the same weights, through the same harness
        assert set(runs) == ours | {"onnxruntime-genai int4"} and not failures, failures
        assert "onnxruntime-genai int4: model builder (cpu)" in proc.stderr
    for name, r in runs.items():
        assert r["reps"] == 2 and r["steps"] == 4 and 0 < r["decode_ms_min"] <= r["decode_ms_max"], name
        assert 0 < r["roofline_pct"] and r["bytes_per_token"] > r["kv_bytes_per_token"] > 0, name
    assert runs["illume-edge int4"]["weight_bytes_per_token"] < 0.5 * runs["illume-edge fp16"]["weight_bytes_per_token"]
    assert runs["illume-edge fp16"]["tokens"] == runs["illume-edge fp16 (no CUDA graph)"]["tokens"]
    assert runs["illume-edge int4"]["tokens"] == runs["illume-edge int4" + before]["tokens"]
    assert runs["illume-edge fp16"]["tokens"] == runs["illume-edge fp16" + read]["tokens"]
    for name in ours - {"PyTorch eager fp16"}:  # each step read at once split into the llm run and the head + draw
        r = runs[name]
        if name.endswith((read, before)):
            assert 0 < r["llm_ms_per_token"] < r["decode_ms_max"] and r["head_and_pick_ms_per_token"] > 0, name
        else:  # the runtime's own text loop (decode_loops.text_tokens): no split
            assert "llm_ms_per_token" not in r, name
    assert "Our step split" in proc.stdout
    assert runs["illume-edge fp16"]["tokens"][:2] == runs["PyTorch eager fp16"]["tokens"][:2]
    assert result["machine"]["device"] == "cpu" and "| illume-edge int4 |" in proc.stdout


def test_versions_report_the_module_that_runs_and_the_gpu_flavours(monkeypatch):
    """A bench reports the imported runtime's own version (onnxruntime-gpu on PYTHONPATH shadows the machine's
    CPU wheel, whose metadata said 1.30.0 on the H100 while 1.31.1 ran), and finds the GPU distributions
    (onnxruntime-genai-cuda) where the module is not importable."""
    import types
    from importlib import metadata

    from benchmarks import machine

    shadow = types.ModuleType("onnxruntime")
    shadow.__version__ = "9.9.9"
    monkeypatch.setitem(sys.modules, "onnxruntime", shadow)
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import fails: the metadata decides
    monkeypatch.setitem(sys.modules, "diffusers", None)  # not imported (other tests may have imported it)
    installed = {"onnxruntime": "1.30.0", "onnxruntime-genai-cuda": "0.18.0"}

    def version(dist):
        if dist in installed:
            return installed[dist]
        raise metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(machine.metadata, "version", version)
    v = machine.versions()
    assert v["onnxruntime"] == "9.9.9" and v["onnxruntime-genai"] == "0.18.0" and v["diffusers"] == "absent"
