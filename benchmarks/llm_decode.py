"""LLM decode benchmark at a real architecture shape with random weights: our runtime vs its peers.

    python -m benchmarks.llm_decode                  # Qwen2.5-0.5B shape, ~4-5 minutes on 2 cores
    python -m benchmarks.llm_decode --shape smoke    # tiny shape, seconds (checks the harness)

One run, one set of weights (a seeded random Qwen2ForCausalLM of the shape):
- illume-edge: our `llm` graph (`--llm-graph`, default the fused one) + `head_text` exported fp32, then
  `quantize_engine` int8 / int4, run by the runtime's `LLMRunner` (IO-bound KV cache) with greedy argmax
  over the text head each step; default session threading (a pool per session, no spinning), and with
  `--shared-pool fp32 int4` again in a fresh process with ILLUME_EDGE_THREAD_POOL=shared (one pool for all
  sessions). `--profile` (default int4) runs onnxruntime's profiler over the `llm` graph's decode steps.
- transformers eager on the same module (DynamicCache, logits_to_keep=1: the full LM head per step).
- onnxruntime-genai: its model builder on a HF folder saved from the same module (fp32 and int4, block 32,
  accuracy level 4), `Generator` with intra_op_num_threads = cores, greedy.
Every peer's per-token number includes its LM head and the greedy pick. Batch 1, a 128-token prompt, then
64 decode steps; warm-up + repetitions; median and spread. The machine's read bandwidth is measured in the
same run and each decode time is compared with its weight-read bound (bytes read per token / bandwidth).
Writes benchmarks/results/<date>-<host>.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from benchmarks.machine import REPO, cores, cpu_model, git_commit, measure_read_bandwidth, versions

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------------------
def qwen25_05b_shape():
    """Qwen2.5-0.5B's LLM (24 layers, hidden 896, 14/2 heads, FFN 4864, 151936 vocab rows, tied embeddings)
    inside an ILLUME-layout ModelConfig. The two image levels get 116 codes each so that the vocabulary is
    exactly 151936 rows: the text head covers ids [0, 151704), the peers' LM head all 151936 rows (0.15% more)."""
    from illume_edge.config import LLMConfig, ModelConfig, OutputLevel, TokenIds, tiny_plus

    tokens = TokenIds(tokenizer_len=None)
    first = tokens.first_code_id(2)
    levels = (OutputLevel("semantic", 116, 8, first, "semantic_quantizer"),
              OutputLevel("pixel", 116, 8, first + 116, "pixel_quantizer", top_k_scale=3.0))
    llm = LLMConfig("qwen2", 24, 896, 14, 2, 4864, vocab_rows=first + 232, rope_theta=1_000_000.0,
                    rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=32768, max_batch=2)
    assert llm.vocab_rows == 151936
    return dataclasses.replace(tiny_plus(), name="qwen2.5-0.5b-shape", llm=llm, tokens=tokens,
                               levels=levels).validate()


def smoke_shape():
    """A small shape with the same layout, for checking the harness in seconds."""
    cfg = qwen25_05b_shape()
    llm = dataclasses.replace(cfg.llm, num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2,
                              intermediate_size=256)
    return dataclasses.replace(cfg, name="smoke", llm=llm).validate()


SHAPES = {"qwen2.5-0.5b": qwen25_05b_shape, "smoke": smoke_shape}


# ---------------------------------------------------------------------------------------------------------
# Bytes read per decode step
# ---------------------------------------------------------------------------------------------------------
# (op type, input index) of tables a node reads by index, a few rows per token: embeddings, and the fused
# graph's RoPE cos / sin caches (RotaryEmbedding reads the rows at the position ids).
INDEXED_INPUTS = {("Gather", 0), ("GatherBlockQuantized", 0), ("RotaryEmbedding", 2), ("RotaryEmbedding", 3)}


def streamed_weight_bytes(onnx_path: Path) -> dict:
    """Bytes of the initializers a decode step reads in full: every initializer except tables that are only
    read by index (INDEXED_INPUTS). A table also used by a MatMul (tied head) counts."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    gathered, other = set(), set()
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            (gathered if (node.op_type, i) in INDEXED_INPUTS else other).add(name)
    total = table = 0
    for init in model.graph.initializer:
        size = _initializer_bytes(init)
        if init.name in gathered and init.name not in other:
            table += size
        else:
            total += size
    return {"streamed": total, "gathered_tables": table}


def _initializer_bytes(init) -> int:
    import onnx

    for kv in init.external_data:
        if kv.key == "length":
            return int(kv.value)
    if init.raw_data:
        return len(init.raw_data)
    n = int(np.prod(init.dims)) if init.dims else 1
    return n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize


def kv_bytes_per_step(cfg, context: int, bytes_per_value: int = 4) -> int:
    """K and V of every layer at `context` positions (what attention reads at that step)."""
    llm = cfg.llm
    return 2 * llm.num_layers * llm.num_kv_heads * llm.head_size * context * bytes_per_value


def param_bytes(module, skip_gathered_embedding: bool = True) -> int:
    """Bytes a torch decode step streams: every parameter once; with tied weights the embedding is read
    by the LM head, so it counts once; an untied embedding is only gathered."""
    seen, total = set(), 0
    emb = module.get_input_embeddings().weight
    tied = module.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    for p in module.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if p is emb and not tied and skip_gathered_embedding:
            continue
        total += p.numel() * p.element_size()
    return total


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------
def summarize(prefill_s: list[float], steps_s: list[list[float]]) -> dict:
    """Per-rep mean ms/token -> median over reps, min/max; per-step p10/p90 over all steps."""
    per_rep = [1e3 * sum(s) / len(s) for s in steps_s]
    flat = np.array([1e3 * x for s in steps_s for x in s])
    return {
        "decode_ms_per_token": statistics.median(per_rep),
        "decode_ms_min": min(per_rep), "decode_ms_max": max(per_rep),
        "step_ms_p10": float(np.percentile(flat, 10)), "step_ms_p90": float(np.percentile(flat, 90)),
        "prefill_ms": 1e3 * statistics.median(prefill_s),
        "prefill_ms_min": 1e3 * min(prefill_s), "prefill_ms_max": 1e3 * max(prefill_s),
        "reps": len(per_rep), "steps": len(steps_s[0]) if steps_s else 0,
    }


def time_ours(engine_dir: Path, prompt: list[int], steps: int, warmup: int, reps: int, threads: int) -> dict:
    from illume_edge.runtime.engine import Engine
    from illume_edge.runtime.llm_runner import LLMRunner
    from illume_edge.runtime.session import SessionOptions

    engine = Engine.load(engine_dir, SessionOptions(threads=threads), check_hash=False)
    runner = LLMRunner(engine)
    t0 = time.perf_counter()
    runner.engine.session("head_text")
    load_s = time.perf_counter() - t0
    prefills, decodes, tokens = [], [], []
    for rep in range(warmup + reps):
        t0 = time.perf_counter()
        state = runner.prefill([prompt], max_new_tokens=steps)
        tok = int(np.argmax(runner.logits("text", state.hidden)[0]))
        t_prefill = time.perf_counter() - t0
        step_s, out = [], [tok]
        for _ in range(steps):
            t0 = time.perf_counter()
            hidden = runner.feed(state, np.array([[tok]], np.int64))
            tok = int(np.argmax(runner.logits("text", hidden)[0]))
            step_s.append(time.perf_counter() - t0)
            out.append(tok)
        if rep >= warmup:
            prefills.append(t_prefill)
            decodes.append(step_s)
            tokens = out
    del runner, engine
    gc.collect()
    return {**summarize(prefills, decodes), "session_load_s": load_s, "tokens": tokens[:16],
            "head_included": "text head (151704 rows) + argmax"}


def time_ours_shared_pool(engine_dir: Path, prompt: list[int], steps: int, warmup: int, reps: int,
                          threads: int) -> dict:
    """`time_ours` with ILLUME_EDGE_THREAD_POOL=shared (all sessions on one intra-op pool), in a fresh process:
    the pool mode is fixed per process once the first session exists."""
    code = ("import json, sys; from pathlib import Path; from benchmarks.llm_decode import time_ours; "
            "a = json.loads(sys.argv[1]); a['engine_dir'] = Path(a['engine_dir']); print(json.dumps(time_ours(**a)))")
    args = {"engine_dir": str(engine_dir), "prompt": prompt, "steps": steps, "warmup": warmup, "reps": reps,
            "threads": threads}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "ILLUME_EDGE_THREAD_POOL": "shared"}, timeout=1800)
    if out.returncode:
        raise RuntimeError(f"shared-pool run failed: {out.stderr[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_eager(model, prompt: list[int], steps: int, warmup: int, reps: int, threads: int) -> dict:
    import torch
    from transformers import DynamicCache

    torch.set_num_threads(threads)
    ids = torch.tensor([prompt], dtype=torch.int64)
    prefills, decodes, tokens = [], [], []
    with torch.inference_mode():
        for rep in range(warmup + reps):
            cache = DynamicCache(config=model.config)
            t0 = time.perf_counter()
            out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            tok = int(out.logits[0, -1].argmax())
            t_prefill = time.perf_counter() - t0
            step_s, got = [], [tok]
            for _ in range(steps):
                t0 = time.perf_counter()
                out = model(input_ids=torch.tensor([[tok]]), cache=out.cache, use_cache=True,
                            logits_to_keep=1)
                tok = int(out.logits[0, -1].argmax())
                step_s.append(time.perf_counter() - t0)
                got.append(tok)
            if rep >= warmup:
                prefills.append(t_prefill)
                decodes.append(step_s)
                tokens = got
    return {**summarize(prefills, decodes), "tokens": tokens[:16],
            "head_included": "full LM head (151936 rows) + argmax"}


def build_genai(hf_dir: Path, out_dir: Path, precision: str, threads: int, cache_dir: Path) -> float:
    """onnxruntime-genai's model builder (CPU) on the HF folder; set its thread count. Returns seconds."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
           "-p", precision, "-e", "cpu", "-c", str(cache_dir)]
    if precision == "int4":
        cmd += ["--extra_options", "int4_block_size=32", "int4_accuracy_level=4", "block_size=32",
                "accuracy_level=4", "is_symmetric=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"model builder failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}")
    cfg_path = out_dir / "genai_config.json"
    gcfg = json.loads(cfg_path.read_text())
    model = gcfg["model"]
    so = model["decoder"].setdefault("session_options", {})
    so["intra_op_num_threads"] = threads
    so["inter_op_num_threads"] = 1
    cfg_path.write_text(json.dumps(gcfg, indent=2))
    return time.perf_counter() - t0


def time_genai(model_dir: Path, prompt: list[int], steps: int, warmup: int, reps: int) -> dict:
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    prefills, decodes, tokens = [], [], []
    finished_early = False
    for rep in range(warmup + reps):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + steps + 1, do_sample=False, min_length=len(prompt) + steps + 1)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.array(prompt, np.int32))  # prefill + the first token
        t_prefill = time.perf_counter() - t0
        step_s = []
        for _ in range(steps):
            if gen.is_done():
                finished_early = True
                break
            t0 = time.perf_counter()
            gen.generate_next_token()
            step_s.append(time.perf_counter() - t0)
        if rep >= warmup:
            prefills.append(t_prefill)
            decodes.append(step_s)
            tokens = list(gen.get_sequence(0))[len(prompt):len(prompt) + 16]
        del gen, params
    del model
    gc.collect()
    return {**summarize(prefills, decodes), "tokens": [int(t) for t in tokens], "finished_early": finished_early,
            "head_included": "full LM head (151936 rows) + greedy search"}


# ---------------------------------------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------------------------------------
def profile_ours(engine_dir: Path, prompt: list[int], steps: int, threads: int, out_json: Path) -> dict:
    """onnxruntime's profiler over `steps` decode steps of the llm graph: time share per op type."""
    import onnxruntime as ort

    from illume_edge.runtime.engine import Engine
    from illume_edge.runtime.llm_runner import LLMRunner
    from illume_edge.runtime.session import Session, SessionOptions

    engine = Engine.load(engine_dir, SessionOptions(threads=threads), check_hash=False)
    runner = LLMRunner(engine)
    state = runner.prefill([prompt], max_new_tokens=steps)
    # A second, profiling session of the same graph (the runtime's own options + enable_profiling).
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = str(out_json.with_suffix(""))
    comp = engine.manifest.component("llm")
    sess = Session("llm", str(engine_dir / comp.path), comp, SessionOptions(threads=threads))
    sess._sess = ort.InferenceSession(str(engine_dir / comp.path), so, providers=["CPUExecutionProvider"])
    runner.session = sess
    tok = 0
    for _ in range(steps):
        runner.feed(state, np.array([[tok]], np.int64))
        tok = (tok + 1) % 1000
    path = sess._sess.end_profiling()
    events = json.loads(Path(path).read_text())
    by_op: dict[str, float] = {}
    run_us = 0.0
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e.get("dur", 0)
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            run_us += e.get("dur", 0)
    total = sum(by_op.values()) or 1.0
    Path(path).unlink(missing_ok=True)
    del runner, engine, sess
    gc.collect()
    share = {k: round(100 * v / total, 1) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])}
    return {"steps": steps, "model_run_ms_per_step": run_us / 1e3 / steps,
            "kernel_ms_per_step": total / 1e3 / steps, "op_share_pct": share}


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
def export_bench_engine(model, cfg, out_dir: Path, llm_graph: str) -> None:
    """llm + head graphs of `model` in an engine folder the runtime loads (no vision/decoder graphs)."""
    from illume_edge.config import FORMAT_VERSION
    from illume_edge.export.engine import _component, _precision_of, producer
    from illume_edge.export.export_llm import export_heads, export_llm
    from illume_edge.manifest import Manifest, write_manifest

    out_dir.mkdir(parents=True, exist_ok=True)
    graphs = {"llm": export_llm(model, cfg, out_dir / "llm.onnx", graph=llm_graph)}
    graphs.update({f"head_{k}": v for k, v in export_heads(model, cfg, out_dir).items()})
    comps = {n: _component(out_dir, g, _precision_of(g.path)) for n, g in graphs.items()}
    write_manifest(out_dir, Manifest(format_version=FORMAT_VERSION, name=cfg.name, config=cfg.to_dict(),
                                     producer=producer(), precision="fp32", components=comps, assets={},
                                     source={"benchmark": "random weights, seed 0"}))


def run(args) -> dict:
    import torch

    from illume_edge.export.llm import build_llm
    from illume_edge.export.quantize import quantize_engine
    from illume_edge.export.tokenizer_factory import save_tokenizer_files

    t_start = time.perf_counter()
    threads = args.threads or cores()
    torch.set_num_threads(threads)
    cfg = SHAPES[args.shape]()
    llm = cfg.llm
    log = lambda s: print(f"[bench {time.perf_counter() - t_start:6.1f}s] {s}", file=sys.stderr, flush=True)

    log(f"machine: {cpu_model()}, {cores()} cores; measuring read bandwidth with {threads} threads")
    bw = measure_read_bandwidth(threads)
    bw1 = measure_read_bandwidth(1, reps=3)
    log(f"read bandwidth {bw['best_gbs']:.1f} GB/s ({threads} threads), {bw1['best_gbs']:.1f} GB/s (1 thread)")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="illume-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.tokens.endoftext, args.prompt).tolist()
    context = args.prompt + args.steps // 2  # mean attention context of the decode steps
    result: dict = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
        "machine": {"cpu": cpu_model(), "cores": cores(), "threads_used": threads,
                    "read_bandwidth_gbs": bw["best_gbs"], "read_bandwidth": bw, "read_bandwidth_1thread": bw1,
                    "platform": platform.platform()},
        "versions": versions(), "git_commit": git_commit(),
        "shape": {"name": cfg.name, "layers": llm.num_layers, "hidden": llm.hidden_size, "heads": llm.num_heads,
                  "kv_heads": llm.num_kv_heads, "ffn": llm.intermediate_size, "vocab_rows": llm.vocab_rows,
                  "text_head_rows": cfg.head_ranges()["text"][1], "tied_embeddings": llm.tie_word_embeddings},
        "protocol": {"batch": 1, "prompt_tokens": args.prompt, "decode_steps": args.steps, "warmup": args.warmup,
                     "reps": args.reps, "greedy": True, "mean_context": context, "llm_graph": args.llm_graph},
        "runs": {}, "failures": {}, "build_s": {},
    }

    log(f"building random {cfg.name} ({llm.num_layers} layers, hidden {llm.hidden_size}) and exporting")
    t0 = time.perf_counter()
    model = build_llm(cfg, seed=0)
    fp32_dir = work / "engine-fp32"
    if fp32_dir.exists():
        shutil.rmtree(fp32_dir)
    export_bench_engine(model, cfg, fp32_dir, args.llm_graph)
    result["build_s"]["export_fp32"] = time.perf_counter() - t0
    hf_dir = work / "hf"
    if not args.skip_genai:
        model.save_pretrained(hf_dir, safe_serialization=True)
        save_tokenizer_files(cfg, hf_dir)
    eager_bytes = param_bytes(model)

    engines = {"fp32": fp32_dir}
    for prec in args.precisions:
        if prec == "fp32":
            continue
        t0 = time.perf_counter()
        log(f"quantize {prec}")
        engines[prec] = work / f"engine-{prec}"
        quantize_engine(fp32_dir, engines[prec], prec, block_size=args.block_size, progress=lambda s: None)
        result["build_s"][f"quantize_{prec}"] = time.perf_counter() - t0

    kv = kv_bytes_per_step(cfg, context)
    for prec, d in engines.items():
        llm_b = streamed_weight_bytes(d / "llm.onnx")
        head_b = streamed_weight_bytes(d / "head_text.onnx")
        weights = llm_b["streamed"] + head_b["streamed"]
        log(f"ours {prec}: {weights / 1e6:.0f} MB weights per step; timing")
        try:
            r = time_ours(d, prompt, args.steps, args.warmup, args.reps, threads)
            r["weight_bytes_per_token"] = weights
            r["kv_bytes_per_token"] = kv
            r["llm_weight_bytes"], r["head_weight_bytes"] = llm_b["streamed"], head_b["streamed"]
            r["files_bytes"] = sum(p.stat().st_size for p in d.iterdir() if p.name.startswith(("llm", "head_")))
            result["runs"][f"illume-edge {prec}"] = r
        except Exception as e:  # a failing configuration is reported, not hidden
            result["failures"][f"illume-edge {prec}"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        if prec in args.shared_pool:
            name = f"illume-edge {prec} (shared pool)"
            log(f"{name}: timing in a fresh process")
            try:
                r = time_ours_shared_pool(d, prompt, args.steps, args.warmup, args.reps, threads)
                r.update({k: result["runs"][f"illume-edge {prec}"][k] for k in
                          ("weight_bytes_per_token", "kv_bytes_per_token", "llm_weight_bytes", "head_weight_bytes")})
                result["runs"][name] = r
            except Exception as e:
                result["failures"][name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()

    if not args.skip_eager:
        log("transformers eager fp32: timing")
        try:
            r = time_eager(model, prompt, args.steps, args.warmup, max(1, args.reps - 1), threads)
            r["weight_bytes_per_token"], r["kv_bytes_per_token"] = eager_bytes, kv
            result["runs"]["transformers eager fp32"] = r
        except Exception as e:
            result["failures"]["transformers eager fp32"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    del model
    gc.collect()

    if not args.skip_genai:
        for prec in ("fp32", "int4"):
            name = f"onnxruntime-genai {prec}"
            out = work / f"genai-{prec}"
            try:
                if out.exists():
                    shutil.rmtree(out)
                log(f"{name}: model builder")
                result["build_s"][f"genai_{prec}"] = build_genai(hf_dir, out, prec, threads, work / "genai-cache")
                b = streamed_weight_bytes(out / "model.onnx")
                log(f"{name}: {b['streamed'] / 1e6:.0f} MB weights per step; timing")
                r = time_genai(out, prompt, args.steps, args.warmup, args.reps)
                r["weight_bytes_per_token"], r["kv_bytes_per_token"] = b["streamed"], kv
                result["runs"][name] = r
            except Exception as e:
                result["failures"][name] = f"{type(e).__name__}: {str(e)[-1500:]}"
                traceback.print_exc()
            if out.exists() and not args.keep:
                shutil.rmtree(out, ignore_errors=True)

    if args.profile:
        result["profiles"] = {}
        for prec in args.profile:
            if prec in engines:
                log(f"profile ours {prec} ({args.profile_steps} decode steps)")
                try:
                    result["profiles"][prec] = profile_ours(engines[prec], prompt, args.profile_steps, threads,
                                                            work / f"profile-{prec}.json")
                except Exception as e:
                    result["failures"][f"profile {prec}"] = f"{type(e).__name__}: {e}"
                    traceback.print_exc()

    gbs = bw["best_gbs"]
    for r in result["runs"].values():
        total = r["weight_bytes_per_token"] + r["kv_bytes_per_token"]
        r["bytes_per_token"] = total
        r["bound_ms"] = total / (gbs * 1e9) * 1e3
        r["achieved_gbs"] = total / (r["decode_ms_per_token"] / 1e3) / 1e9
        r["roofline_pct"] = 100 * r["bound_ms"] / r["decode_ms_per_token"]
    eager = result["runs"].get("transformers eager fp32")
    for r in result["runs"].values():
        r["speedup_vs_eager"] = eager["decode_ms_per_token"] / r["decode_ms_per_token"] if eager else None
    result["total_s"] = time.perf_counter() - t_start
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def markdown(result: dict) -> str:
    m = result["machine"]
    v = result["versions"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['threads_used']} threads), measured read bandwidth "
        f"{m['read_bandwidth_gbs']:.1f} GB/s. onnxruntime {v['onnxruntime']}, onnxruntime-genai "
        f"{v['onnxruntime-genai']}, torch {v['torch']}, transformers {v['transformers']}; commit "
        f"{result['git_commit'][:12]}.",
        f"Shape {result['shape']['name']}: batch 1, prompt {result['protocol']['prompt_tokens']}, "
        f"{result['protocol']['decode_steps']} decode steps, {result['protocol']['warmup']} warm-up + "
        f"{result['protocol']['reps']} reps (eager: reps - 1).",
        "",
        "| runtime | decode ms/token (median) | min-max | step p10-p90 | prefill ms | MB read/token | bound ms | "
        "achieved GB/s | roofline % | vs eager |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        sp = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else "-"
        lines.append(f"| {name} | {r['decode_ms_per_token']:.1f} | {r['decode_ms_min']:.1f}-{r['decode_ms_max']:.1f}"
                     f" | {r['step_ms_p10']:.1f}-{r['step_ms_p90']:.1f} | {r['prefill_ms']:.0f} | "
                     f"{r['bytes_per_token'] / 1e6:.0f} | {r['bound_ms']:.1f} | {r['achieved_gbs']:.1f} | "
                     f"{r['roofline_pct']:.0f} | {sp} |")
    for name, why in result["failures"].items():
        lines.append(f"| {name} | FAILED: {why.splitlines()[-1][:160] if why else ''} | | | | | | | | |")
    for prec, p in result.get("profiles", {}).items():
        top = ", ".join(f"{k} {v}%" for k, v in list(p["op_share_pct"].items())[:8])
        lines.append(f"\nProfile illume-edge {prec} ({p['steps']} steps): model_run {p['model_run_ms_per_step']:.1f} "
                     f"ms/step, kernels {p['kernel_ms_per_step']:.1f} ms/step; {top}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.llm_decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="default: the cores this process may use")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8", "int4"])
    ap.add_argument("--block-size", dest="block_size", type=int, default=32)
    ap.add_argument("--llm-graph", dest="llm_graph", default="fused", choices=["fused", "portable"],
                    help="our llm graph: onnxruntime contrib ops (fused) or standard ops (portable)")
    ap.add_argument("--shared-pool", dest="shared_pool", nargs="*", default=[],
                    help="precisions also timed with ILLUME_EDGE_THREAD_POOL=shared (default none; e.g. fp32 int4)")
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--skip-genai", action="store_true")
    ap.add_argument("--profile", nargs="*", default=["int4"], help="precisions to profile (none: off)")
    ap.add_argument("--profile-steps", dest="profile_steps", type=int, default=16)
    ap.add_argument("--workdir", default=None, help="keep build outputs here (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<date>-<host>.json)")
    args = ap.parse_args(argv)
    result = run(args)
    out = Path(args.out) if args.out else RESULTS_DIR / f"{dt.date.today().isoformat()}-{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwrote {out} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
