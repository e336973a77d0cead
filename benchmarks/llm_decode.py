"""LLM decode benchmark at a real architecture shape with random weights: our runtime vs its peers.

    python -m benchmarks.llm_decode                  # Qwen2.5-0.5B shape, ~4-5 minutes on 2 cores
    python -m benchmarks.llm_decode --shape smoke    # tiny shape, seconds (checks the harness)

One run, one set of weights (a seeded random Qwen2ForCausalLM of the shape):
- illume-edge: our `llm` graph (`--llm-graph`, default the fused one) + `head_text` exported fp32, then
  `quantize_engine` int4 (and int8 with `--precisions fp32 int8 int4`), run by the runtime's `LLMRunner`
  (IO-bound KV cache) with greedy argmax over the text head each step; default session threading (a pool per
  session, spinning only inside a run), and with
  `--shared-pool fp32 int4` again in a fresh process with ILLUME_EDGE_THREAD_POOL=shared (one pool for all
  sessions). `--profile` (default int4) runs onnxruntime's profiler over the decode steps (llm + head), and
  over onnxruntime-genai's (its genai_config.json `enable_profiling`), kernels side by side.
  With `--llm-graphs fused portable`, fp32 and int4 are also timed on the portable graph (the A/B).
- transformers eager on the same module (DynamicCache, logits_to_keep=1: the full LM head per step).
- onnxruntime-genai: its model builder on a HF folder saved from the same module (fp32 and int4 at
  `--block-size`, default 32, accuracy level 4, as ours), `Generator` with intra_op_num_threads = cores, greedy.
Every peer's per-token number includes its LM head and the greedy pick. Batch 1, a 128-token prompt, then
64 decode steps. The ONNX runtimes (ours and genai) are timed in fresh processes, one per load order
(`--load-orders`, default 2: ours loaded first in one, the peers in the other), because the runtime loaded
first in a process decodes slower; in each, every runtime is loaded, warmed up, then timed in interleaved
rounds (each round runs every runtime once, in a rotating order), so that the machine's drift over minutes
falls on all of them alike; median over all processes' rounds and spread. Eager is timed alone, in this
process. The machine's read bandwidth is measured in the
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
from typing import Callable

import numpy as np

from benchmarks.machine import (BANDWIDTH_STATISTIC, REPO, bandwidth_label, cores, cpu_model,
                                git_commit, measure_read_bandwidth, versions, write_result)
from illume_edge.manifest import DEFAULT_LLM_GRAPH, LLM_GRAPHS



# ---------------------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------------------
def qwen25_05b_shape():
    """Qwen2.5-0.5B's LLM (24 layers, hidden 896, 14/2 heads, FFN 4864, 151936 vocab rows, tied embeddings)
    inside an ILLUME-layout ModelConfig. The two image levels get 116 codes each so that the vocabulary is
    exactly 151936 rows: the text head covers ids [0, 151704), the peers' LM head all 151936 rows (0.15% more)."""
    from illume_edge.config import LLMConfig, OutputLevel, TokenIds, tiny_plus

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
# graph's RoPE cos / sin caches (GroupQueryAttention reads the rows at its positions).
INDEXED_INPUTS = {("Gather", 0), ("GatherBlockQuantized", 0), ("GroupQueryAttention", 7),
                  ("GroupQueryAttention", 8), ("RotaryEmbedding", 2), ("RotaryEmbedding", 3)}


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


# A runtime under test is a function running one repetition of its `steps` decode steps, or of the given
# number (the warm-up's): (prefill seconds, per-step seconds, tokens, {part: seconds over the steps} for the
# runtimes that can split a step, e.g. ours into llm and head).
Rep = Callable[..., tuple[float, list[float], list[int], dict[str, float]]]
WARMUP_STEPS = 8  # a warm-up repetition's decode steps: every weight read once, every buffer allocated


def add_roofline(runs: dict[str, dict], gbs: float, eager: str) -> None:
    """Each run's bytes read per token (its weights + the KV cache) against the bandwidth `gbs`: the time that
    reading takes (bound_ms), the bandwidth the run achieved and its share of the roofline; and its speed-up
    over the run named `eager` (None when that one is missing)."""
    for r in runs.values():
        total = r["weight_bytes_per_token"] + r["kv_bytes_per_token"]
        r["bytes_per_token"] = total
        r["bound_ms"] = total / (gbs * 1e9) * 1e3
        r["achieved_gbs"] = total / (r["decode_ms_per_token"] / 1e3) / 1e9
        r["roofline_pct"] = 100 * r["bound_ms"] / r["decode_ms_per_token"]
    ref = runs.get(eager)
    for r in runs.values():
        r["speedup_vs_eager"] = ref["decode_ms_per_token"] / r["decode_ms_per_token"] if ref else None


def summarize_reps(runs: list[tuple]) -> dict:
    """`summarize` of several repetitions, the last one's first tokens, and each part's ms per token
    (median over repetitions)."""
    out = {**summarize([r[0] for r in runs], [r[1] for r in runs]), "tokens": runs[-1][2][:16]}
    for part in runs[-1][3]:
        out[f"{part}_ms_per_token"] = statistics.median(1e3 * r[3][part] / len(r[1]) for r in runs)
    return out


def ours_rep(engine_dir: Path, prompt: list[int], steps: int, threads: int, spin: str | None = None) -> Rep:
    """Load our engine (llm + text head sessions, `spin` their SessionOptions.spin) and return its repetition
    function."""
    from illume_edge.runtime.engine import Engine
    from illume_edge.runtime.llm_runner import LLMRunner
    from illume_edge.runtime.session import SessionOptions

    engine = Engine.load(engine_dir, SessionOptions(threads=threads, spin=spin), check_hash=False)
    runner = LLMRunner(engine)
    runner.engine.session("head_text")

    def rep(n: int = steps):
        t0 = time.perf_counter()
        state = runner.prefill([prompt], max_new_tokens=n)
        tok = int(np.argmax(runner.logits("text", state=state)[0]))
        t_prefill = time.perf_counter() - t0
        step_s, out, llm_s = [], [tok], 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            runner.feed(state, np.array([[tok]], np.int64))
            t1 = time.perf_counter()
            tok = int(np.argmax(runner.logits("text", state=state)[0]))
            step_s.append(time.perf_counter() - t0)
            llm_s += t1 - t0
            out.append(tok)
        return t_prefill, step_s, out, {"llm": llm_s, "head_and_pick": sum(step_s) - llm_s}

    return rep


def step_split_lines(runs: dict[str, dict], ms_digits: int) -> list[str]:
    """The markdown line of our runtimes' step split (their `Rep` extras "llm" and "head_and_pick")."""
    split = [f"{name} {r['llm_ms_per_token']:.{ms_digits}f} + {r['head_and_pick_ms_per_token']:.{ms_digits}f}"
             for name, r in runs.items() if "llm_ms_per_token" in r]
    return [f"\nOur step split, `llm` graph + head and greedy pick (ms/token): {'; '.join(split)}"] if split else []


def interleaved_runs(reps_by_name: dict[str, Rep], warmup: int, reps: int, log, failures: dict,
                     warmup_steps: int | None = None) -> dict[str, list]:
    """Every runtime's warm-up (`warmup` repetitions, of `warmup_steps` decode steps if given), then
    repetition r of each runtime in turn (the order rotating by one each round), so that a slow drift of the
    machine (this VM's memory bandwidth moves by 10-20% over minutes) lands on every runtime alike instead of
    on whichever ran during it. A runtime that fails is reported and leaves the rotation. Returns each
    runtime's repetitions (`Rep` results)."""
    names = list(reps_by_name)
    runs: dict[str, list] = {n: [] for n in names}
    for name in list(names):  # a copy: a failing runtime leaves `names`
        try:
            for _ in range(warmup):
                reps_by_name[name](*([] if warmup_steps is None else [warmup_steps]))
        except Exception as e:  # a failing configuration is reported, not hidden
            failures[name] = f"{type(e).__name__}: {str(e)[-1500:]}"
            traceback.print_exc()
            names.remove(name)
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        log(f"round {r + 1}/{reps}: {', '.join(order)}")
        for name in order:
            try:
                runs[name].append(reps_by_name[name]())
            except Exception as e:
                failures[name] = f"{type(e).__name__}: {str(e)[-1500:]}"
                traceback.print_exc()
                names.remove(name)
    return {n: rs for n, rs in runs.items() if rs and n not in failures}


def interleaved(reps_by_name: dict[str, Rep], warmup: int, reps: int, log, failures: dict,
                warmup_steps: int | None = None) -> dict[str, dict]:
    """`interleaved_runs`, summarized per runtime."""
    return {n: summarize_reps(rs) for n, rs in
            interleaved_runs(reps_by_name, warmup, reps, log, failures, warmup_steps).items()}


# ---------------------------------------------------------------------------------------------------------
# Load orders: the runtime loaded first in a process runs slower
# ---------------------------------------------------------------------------------------------------------
# Measured on the 2-core VM (docs/performance.md, "Load order"): in a process that loads our int4 engine and
# onnxruntime-genai's, whichever is loaded first decodes ~10% slower, in every interleaved round; swapping
# the order swapped the winner (ours / genai 1.11 and 1.21 with ours loaded first, 0.93 and 0.97 with genai
# first). So the ONNX runtimes are timed in fresh child processes, one per load order (`load_orders`), and
# their rounds are pooled.
RuntimeSpec = dict  # {"name", "kind": "ours" | "genai", "path", "spin"}: what a child process loads


def load_orders(names: list[str], count: int) -> list[list[str]]:
    """`count` rotations of `names`, evenly spaced: with `count` = len(names) each runtime is loaded first
    once; with 2 and our runtimes listed before as many peers (the default), ours and the peers trade places."""
    n = len(names)
    return [names[k * n // count:] + names[:k * n // count] for k in range(count)] if n else []


def load_rep(spec: RuntimeSpec, prompt: list[int], steps: int, threads: int) -> Rep:
    if spec["kind"] == "ours":
        return ours_rep(Path(spec["path"]), prompt, steps, threads, spec.get("spin"))
    if spec["kind"] == "genai":
        return genai_rep(Path(spec["path"]), prompt, steps)
    raise ValueError(f"runtime spec {spec['name']!r}: unknown kind {spec['kind']!r} (ours | genai)")


def timing_process(specs: list[RuntimeSpec], prompt: list[int], steps: int, warmup: int, rounds: int,
                   threads: int, warmup_steps: int | None) -> dict:
    """One child process's work: load `specs` in their order, then `interleaved_runs`. JSON-able."""
    log = lambda s: print(f"[timing child] {s}", file=sys.stderr, flush=True)  # noqa: E731
    reps, failures = {}, {}
    for spec in specs:
        try:
            reps[spec["name"]] = load_rep(spec, prompt, steps, threads)
        except Exception as e:  # a failing peer is reported, not hidden
            failures[spec["name"]] = f"{type(e).__name__}: {str(e)[-1500:]}"
            traceback.print_exc()
    runs = interleaved_runs(reps, warmup, rounds, log, failures, warmup_steps)
    return {"runs": runs, "failures": failures}


def time_in_load_orders(specs: list[RuntimeSpec], orders: int, rounds: int, prompt: list[int], steps: int,
                        warmup: int, threads: int, warmup_steps: int | None, log) -> tuple[dict, list, dict]:
    """`timing_process` in a fresh process per load order (`load_orders`), `rounds` rounds each; returns
    (summary per runtime over every process's rounds, per-order medians, failures)."""
    by_name = {s["name"]: s for s in specs}
    pooled: dict[str, list] = {n: [] for n in by_name}
    per_order, failures = [], {}
    code = ("import json, sys; from benchmarks.llm_decode import timing_process; "
            "print(json.dumps(timing_process(**json.loads(sys.stdin.read()))))")
    for k, order in enumerate(load_orders(list(by_name), orders)):
        log(f"load order {k + 1}/{orders} (fresh process): {', '.join(order)}")
        job = {"specs": [by_name[n] for n in order], "prompt": prompt, "steps": steps, "warmup": warmup,
               "rounds": rounds, "threads": threads, "warmup_steps": warmup_steps}
        proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(job), cwd=REPO, capture_output=True,
                              text=True, timeout=3600)
        sys.stderr.write(proc.stderr if proc.returncode else "")
        if proc.returncode:
            failures[f"load order {k + 1}"] = f"timing process failed ({proc.returncode}): {proc.stderr[-1500:]}"
            continue
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        failures.update(out["failures"])
        per_order.append({"order": order, "decode_ms_per_token": {
            n: summarize_reps(rs)["decode_ms_per_token"] for n, rs in out["runs"].items()}})
        for n, rs in out["runs"].items():
            pooled[n] += rs
    summary = {n: summarize_reps(rs) for n, rs in pooled.items() if rs and n not in failures}
    return summary, per_order, failures


def time_ours(engine_dir: Path, prompt: list[int], steps: int, warmup: int, reps: int, threads: int) -> dict:
    """Our engine alone (used in a fresh process for the shared-pool variant)."""
    failures: dict[str, str] = {}
    out = interleaved({"ours": ours_rep(engine_dir, prompt, steps, threads)}, warmup, reps, lambda s: None, failures)
    if failures:
        raise RuntimeError(failures["ours"])
    return out["ours"]


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


def eager_rep(model, prompt: list[int], steps: int, threads: int) -> Rep:
    """transformers eager on the module: DynamicCache, logits_to_keep=1 (the full LM head per step)."""
    import torch
    from transformers import DynamicCache

    torch.set_num_threads(threads)
    ids = torch.tensor([prompt], dtype=torch.int64)

    @torch.inference_mode()
    def rep(n: int = steps):
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        tok = int(out.logits[0, -1].argmax())
        t_prefill = time.perf_counter() - t0
        step_s, got = [], [tok]
        for _ in range(n):
            t0 = time.perf_counter()
            out = model(input_ids=torch.tensor([[tok]]), cache=out.cache, use_cache=True, logits_to_keep=1)
            tok = int(out.logits[0, -1].argmax())
            step_s.append(time.perf_counter() - t0)
            got.append(tok)
        return t_prefill, step_s, got, {}

    return rep


def build_genai(hf_dir: Path, out_dir: Path, precision: str, threads: int, cache_dir: Path,
                block_size: int = 32, ep: str = "cpu") -> float:
    """onnxruntime-genai's model builder on the HF folder for execution provider `ep` ("cpu": its thread count
    set; "cuda": onnxruntime-genai-cuda's layout, fp16 activations). int4 is quantized with our settings
    (symmetric, accuracy level 4, `block_size`), so that both runtimes time the same model. Returns seconds."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
           "-p", precision, "-e", ep, "-c", str(cache_dir)]
    if precision == "int4":
        cmd += ["--extra_options", f"int4_block_size={block_size}", "int4_accuracy_level=4",
                f"block_size={block_size}", "accuracy_level=4", "is_symmetric=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"model builder failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}")
    if ep == "cpu":
        cfg_path = out_dir / "genai_config.json"
        gcfg = json.loads(cfg_path.read_text())
        so = gcfg["model"]["decoder"].setdefault("session_options", {})
        so["intra_op_num_threads"] = threads
        so["inter_op_num_threads"] = 1
        cfg_path.write_text(json.dumps(gcfg, indent=2))
    return time.perf_counter() - t0


def genai_linked_copy(model_dir: Path, dest: Path, edit) -> None:
    """A copy of onnxruntime-genai model folder `model_dir` at `dest`, its files linked (not copied), its
    genai_config.json's decoder session options changed by `edit(options)`."""
    config_path = model_dir / "genai_config.json"
    if not config_path.is_file():
        raise RuntimeError(f"{model_dir}: no genai_config.json (an onnxruntime-genai model folder has one)")
    config = json.loads(config_path.read_text())
    try:
        options = config["model"]["decoder"].setdefault("session_options", {})
    except (KeyError, AttributeError, TypeError):
        raise RuntimeError(f"{config_path}: expected model.decoder in the config; rebuild the model") from None
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name != config_path.name:
            (dest / f.name).symlink_to(f.resolve())
    edit(options)
    (dest / config_path.name).write_text(json.dumps(config, indent=2))


def genai_cuda_graph(options: dict, on: bool) -> None:
    """Turn onnxruntime-genai's CUDA graph on or off in a decoder's session options (its CUDA provider's
    `enable_cuda_graph`)."""
    providers = options.setdefault("provider_options", [])
    cuda = next((p["cuda"] for p in providers if isinstance(p, dict) and "cuda" in p), None)
    if cuda is None:
        cuda = {}
        providers.append({"cuda": cuda})
    cuda["enable_cuda_graph"] = "1" if on else "0"


def genai_rep(model_dir: Path, prompt: list[int], steps: int) -> Rep:
    """onnxruntime-genai's Generator on the builder's model, greedy, a fixed number of steps."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))

    def rep(n: int = steps):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + n + 1, do_sample=False, min_length=len(prompt) + n + 1)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.array(prompt, np.int32))  # prefill + the first token
        t_prefill = time.perf_counter() - t0
        step_s = []
        for _ in range(n):
            if gen.is_done():
                raise RuntimeError(f"the Generator stopped after {len(step_s)} of {n} steps")
            t0 = time.perf_counter()
            gen.generate_next_token()
            step_s.append(time.perf_counter() - t0)
        tokens = [int(t) for t in list(gen.get_sequence(0))[len(prompt):]]
        return t_prefill, step_s, tokens, {}

    return rep


# ---------------------------------------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------------------------------------
def profile_ours(engine_dir: Path, prompt: list[int], steps: int, threads: int, out_json: Path) -> dict:
    """onnxruntime's profiler over `steps` greedy decode steps (llm graph + text head) with the runtime's own
    session options: ms per step and time share per op type, per graph."""
    from illume_edge.runtime.engine import Engine
    from illume_edge.runtime.llm_runner import LLMRunner
    from illume_edge.runtime.session import SessionOptions

    engine = Engine.load(engine_dir, SessionOptions(threads=threads, profile_prefix=str(out_json.with_suffix(""))),
                         check_hash=False)
    runner = LLMRunner(engine)
    state = runner.prefill([prompt], max_new_tokens=steps)
    tok = int(np.argmax(runner.logits("text", state=state)[0]))
    for _ in range(steps):
        runner.feed(state, np.array([[tok]], np.int64))
        tok = int(np.argmax(runner.logits("text", state=state)[0]))
    result = {"steps": steps, "context": len(prompt) + steps // 2, "graphs": {}}
    for name in ("llm", "head_text"):
        path = Path(engine.session(name).end_profiling())
        result["graphs"][name] = profile_summary(json.loads(path.read_text()), skip_runs=1)
        path.unlink(missing_ok=True)
    del runner, engine
    gc.collect()
    return result


def genai_profiling_dir(model_dir: Path, dest: Path) -> Path:
    """A copy of onnxruntime-genai model folder `model_dir` at `dest` (its files linked, not copied) whose
    genai_config.json turns onnxruntime's profiler on (the decoder session option `enable_profiling`: a file
    prefix). Returns that prefix; the profile is written when the og.Model is freed."""
    prefix = dest / "ort-profile"
    genai_linked_copy(model_dir, dest, lambda options: options.__setitem__("enable_profiling", str(prefix)))
    return prefix


def profile_genai(model_dir: Path, prompt: list[int], steps: int, work: Path) -> dict:
    """onnxruntime's profiler inside onnxruntime-genai's Generator over `steps` greedy decode steps (its one
    graph, LM head included): the summary `profile_ours` gives for ours, to compare kernel by kernel."""
    dest = work / f"{model_dir.name}-profile"
    prefix = genai_profiling_dir(model_dir, dest)
    rep = genai_rep(dest, prompt, steps)
    rep(steps)
    del rep  # frees the og.Model, which writes the profile
    gc.collect()
    files = sorted(dest.glob(f"{prefix.name}*.json"))
    if not files:
        raise RuntimeError(f"onnxruntime-genai wrote no profile under {dest} (enable_profiling ignored?)")
    summary = profile_summary(json.loads(files[-1].read_text()), skip_runs=1)
    shutil.rmtree(dest, ignore_errors=True)
    return {"steps": steps, "context": len(prompt) + steps // 2, "graphs": {"model": summary}}


def profile_summary(events: list[dict], skip_runs: int = 0) -> dict:
    """Per-step wall time of a session's runs and its kernels' time per op type, from onnxruntime profiler
    events; the first `skip_runs` runs (the prefill) are left out."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[skip_runs:]
    if not runs:
        raise RuntimeError("the profile holds no decode runs")
    start, n = runs[0]["ts"], len(runs)
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e.get("dur", 0)
    total = sum(by_op.values()) or 1.0
    order = sorted(by_op, key=lambda k: -by_op[k])
    return {"runs": n, "model_run_ms_per_step": sum(r["dur"] for r in runs) / 1e3 / n,
            "kernel_ms_per_step": total / 1e3 / n,
            "op_share_pct": {k: round(100 * by_op[k] / total, 1) for k in order},
            "op_ms_per_step": {k: round(by_op[k] / 1e3 / n, 3) for k in order}}


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
# Precisions also timed on the non-default llm graph (the A/B of the two graphs).
COMPARED_PRECISIONS = ("fp32", "int4")


def run_name(precision: str, graph: str, default_graph: bool) -> str:
    return f"illume-edge {precision}" + ("" if default_graph else f" ({graph} graph)")


def export_bench_engine(model, cfg, out_dir: Path, llm_graph: str, precision: str = "fp32") -> None:
    """llm + head graphs of `model` in an engine folder the runtime loads (no vision/decoder graphs);
    `precision` "fp16" for a module already in half precision (its graphs compute in fp16)."""
    from illume_edge.config import FORMAT_VERSION
    from illume_edge.export.engine import _component, _precision_of, producer
    from illume_edge.export.export_llm import export_heads, export_llm
    from illume_edge.manifest import Manifest, write_manifest

    out_dir.mkdir(parents=True, exist_ok=True)
    graphs = {"llm": export_llm(model, cfg, out_dir / "llm.onnx", graph=llm_graph)}
    graphs.update({f"head_{k}": v for k, v in export_heads(model, cfg, out_dir).items()})
    comps = {n: _component(out_dir, g, _precision_of(g.path)) for n, g in graphs.items()}
    write_manifest(out_dir, Manifest(format_version=FORMAT_VERSION, name=cfg.name, config=cfg.to_dict(),
                                     producer=producer(), precision=precision, components=comps, assets={},
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
    log(f"read bandwidth {bw[BANDWIDTH_STATISTIC]:.1f} GB/s ({threads} threads; best pass {bw['best_gbs']:.1f}), "
        f"{bw1[BANDWIDTH_STATISTIC]:.1f} GB/s (1 thread)")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="illume-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.tokens.endoftext, args.prompt).tolist()
    context = args.prompt + args.steps // 2  # mean attention context of the decode steps
    result: dict = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
        "machine": {"cpu": cpu_model(), "cores": cores(), "threads_used": threads,
                    "read_bandwidth_gbs": bw[BANDWIDTH_STATISTIC], "bandwidth_statistic": BANDWIDTH_STATISTIC,
                    "read_bandwidth": bw, "read_bandwidth_1thread": bw1,
                    "platform": platform.platform()},
        "versions": versions(), "git_commit": git_commit(),
        "shape": {"name": cfg.name, "layers": llm.num_layers, "hidden": llm.hidden_size, "heads": llm.num_heads,
                  "kv_heads": llm.num_kv_heads, "ffn": llm.intermediate_size, "vocab_rows": llm.vocab_rows,
                  "text_head_rows": cfg.head_ranges()["text"][1], "tied_embeddings": llm.tie_word_embeddings},
        "protocol": {"batch": 1, "prompt_tokens": args.prompt, "decode_steps": args.steps, "warmup": args.warmup,
                     "warmup_steps": min(WARMUP_STEPS, args.steps), "reps": args.reps, "greedy": True,
                     "mean_context": context, "block_size": args.block_size, "llm_graphs": args.llm_graphs,
                     "spin_modes": ["run", *args.spin_modes],
                     "timing": "interleaved rounds in one fresh process per load order; eager alone",
                     "load_orders": args.load_orders or "one per runtime", "eager_reps": args.eager_reps},
        "runs": {}, "failures": {}, "build_s": {},
    }

    log(f"building random {cfg.name} ({llm.num_layers} layers, hidden {llm.hidden_size}) and exporting")
    model = build_llm(cfg, seed=0)
    engines: dict[str, Path] = {}  # run name -> engine folder
    for graph in args.llm_graphs:
        t0 = time.perf_counter()
        fp32_dir = work / f"engine-{graph}-fp32"
        if fp32_dir.exists():
            shutil.rmtree(fp32_dir)
        export_bench_engine(model, cfg, fp32_dir, graph)
        result["build_s"][f"export_{graph}_fp32"] = time.perf_counter() - t0
        first = graph == args.llm_graphs[0]
        for prec in args.precisions:
            if not first and prec not in COMPARED_PRECISIONS:
                continue  # the other graph: fp32 and int4 only, for the A/B
            d = fp32_dir
            if prec != "fp32":
                t0 = time.perf_counter()
                log(f"quantize {graph} {prec}")
                d = work / f"engine-{graph}-{prec}"
                quantize_engine(fp32_dir, d, prec, block_size=args.block_size, progress=lambda s: None)
                result["build_s"][f"quantize_{graph}_{prec}"] = time.perf_counter() - t0
            engines[run_name(prec, graph, first)] = d
    eager_bytes = param_bytes(model)
    kv = kv_bytes_per_step(cfg, context)

    genai_dirs: dict[str, Path] = {}
    if not args.skip_genai:
        hf_dir = work / "hf"
        model.save_pretrained(hf_dir, safe_serialization=True)
        save_tokenizer_files(cfg, hf_dir)
        for prec in ("fp32", "int4"):
            name, out = f"onnxruntime-genai {prec}", work / f"genai-{prec}"
            try:
                if out.exists():
                    shutil.rmtree(out)
                log(f"{name}: model builder")
                result["build_s"][f"genai_{prec}"] = build_genai(hf_dir, out, prec, threads, work / "genai-cache",
                                                                 args.block_size)
                genai_dirs[name] = out
            except Exception as e:  # a failing peer is reported, not hidden
                result["failures"][name] = f"{type(e).__name__}: {str(e)[-1500:]}"
                traceback.print_exc()

    # The ONNX runtimes: interleaved rounds in one fresh process per load order (`time_in_load_orders`)
    specs: list[RuntimeSpec] = []
    bytes_by_name: dict[str, dict] = {}
    # --spin-modes: the default graph's engines again, each under another SessionOptions.spin
    variants = [(name, d, None) for name, d in engines.items()]
    variants += [(f"{run_name(prec, args.llm_graphs[0], True)} (spin {mode})",
                  engines[run_name(prec, args.llm_graphs[0], True)], mode)
                 for mode in args.spin_modes for prec in args.precisions]
    for name, d, spin in variants:
        llm_b, head_b = streamed_weight_bytes(d / "llm.onnx"), streamed_weight_bytes(d / "head_text.onnx")
        bytes_by_name[name] = {"weight_bytes_per_token": llm_b["streamed"] + head_b["streamed"],
                               "llm_weight_bytes": llm_b["streamed"], "head_weight_bytes": head_b["streamed"],
                               "files_bytes": sum(p.stat().st_size for p in d.iterdir()
                                                  if p.name.startswith(("llm", "head_"))),
                               "head_included": "text head (151704 rows) + argmax"}
        log(f"{name}: {bytes_by_name[name]['weight_bytes_per_token'] / 1e6:.0f} MB weights per step")
        specs.append({"name": name, "kind": "ours", "path": str(d), "spin": spin})
    for name, out in genai_dirs.items():
        b = streamed_weight_bytes(out / "model.onnx")
        bytes_by_name[name] = {"weight_bytes_per_token": b["streamed"],
                               "head_included": "full LM head (151936 rows) + greedy search"}
        specs.append({"name": name, "kind": "genai", "path": str(out)})
    orders = args.load_orders or len(specs)
    log(f"timing {len(specs)} runtimes in {orders} load orders: {args.warmup} warm-up ({WARMUP_STEPS} steps) + "
        f"{args.reps} interleaved rounds each")
    timed, result["load_orders"], failed = time_in_load_orders(
        specs, orders, args.reps, prompt, args.steps, args.warmup, threads, min(WARMUP_STEPS, args.steps), log)
    result["failures"].update(failed)
    for name, r in timed.items():
        result["runs"][name] = {**r, **bytes_by_name[name], "kv_bytes_per_token": kv}
    if not args.skip_eager:  # in this process, alone: the model object is here
        log("transformers eager fp32: timing in this process")
        for name, r in interleaved({"transformers eager fp32": eager_rep(model, prompt, args.steps, threads)},
                                   args.warmup, args.eager_reps, log, result["failures"],
                                   warmup_steps=min(WARMUP_STEPS, args.steps)).items():
            result["runs"][name] = {**r, "weight_bytes_per_token": eager_bytes, "kv_bytes_per_token": kv,
                                    "head_included": "full LM head (151936 rows) + argmax"}
    gc.collect()

    for prec in args.shared_pool:
        base = run_name(prec, args.llm_graphs[0], True)
        if base not in result["runs"]:
            continue
        name = f"{base} (shared pool)"
        log(f"{name}: timing in a fresh process")
        try:
            r = time_ours_shared_pool(engines[base], prompt, args.steps, args.warmup, args.reps, threads)
            result["runs"][name] = {**r, **bytes_by_name[base], "kv_bytes_per_token": kv}
        except Exception as e:
            result["failures"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    del model
    gc.collect()

    if args.profile:
        result["profiles"] = {}
        for prec in args.profile:
            base = run_name(prec, args.llm_graphs[0], True)
            if base in engines:
                log(f"profile ours {prec} ({args.profile_steps} decode steps)")
                try:
                    result["profiles"][prec] = profile_ours(engines[base], prompt, args.profile_steps, threads,
                                                            work / f"profile-{prec}.json")
                except Exception as e:
                    result["failures"][f"profile {prec}"] = f"{type(e).__name__}: {e}"
                    traceback.print_exc()
            peer = f"onnxruntime-genai {prec}"
            if peer in genai_dirs:
                log(f"profile {peer} ({args.profile_steps} decode steps)")
                try:
                    result.setdefault("peer_profiles", {})[prec] = {
                        "name": peer, **profile_genai(genai_dirs[peer], prompt, args.profile_steps, work)}
                except Exception as e:  # a failing peer is reported, not hidden
                    result["failures"][f"profile {peer}"] = f"{type(e).__name__}: {e}"
                    traceback.print_exc()

    add_roofline(result["runs"], bw[BANDWIDTH_STATISTIC], "transformers eager fp32")
    result["total_s"] = time.perf_counter() - t_start
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def roofline_table(runs: dict[str, dict], failures: dict[str, str], ms_digits: int) -> list[str]:
    """Markdown rows: each run's decode time, spread, prefill, bytes per token and roofline (`add_roofline`),
    times with `ms_digits` decimals; then each failed runtime with its last error line."""
    d = ms_digits
    lines = ["| runtime | decode ms/token (median) | min-max | step p10-p90 | prefill ms | MB read/token | bound ms | "
             "achieved GB/s | roofline % | vs eager |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        sp = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else "-"
        lines.append(f"| {name} | {r['decode_ms_per_token']:.{d}f} | {r['decode_ms_min']:.{d}f}-"
                     f"{r['decode_ms_max']:.{d}f} | {r['step_ms_p10']:.{d}f}-{r['step_ms_p90']:.{d}f} | "
                     f"{r['prefill_ms']:.{max(d - 1, 0)}f} | {r['bytes_per_token'] / 1e6:.0f} | "
                     f"{r['bound_ms']:.{d}f} | {r['achieved_gbs']:.1f} | {r['roofline_pct']:.0f} | {sp} |")
    for name, why in failures.items():
        lines.append(f"| {name} | FAILED: {why.splitlines()[-1][:160] if why else ''} | | | | | | | | |")
    return lines


def markdown(result: dict) -> str:
    m = result["machine"]
    v = result["versions"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['threads_used']} threads), measured read bandwidth "
        f"{m['read_bandwidth_gbs']:.1f} GB/s ({bandwidth_label(m)}). onnxruntime {v['onnxruntime']}, onnxruntime-genai "
        f"{v['onnxruntime-genai']}, torch {v['torch']}, transformers {v['transformers']}; commit "
        f"{result['git_commit'][:12]}.",
        f"Shape {result['shape']['name']}: batch 1, prompt {result['protocol']['prompt_tokens']}, "
        f"{result['protocol']['decode_steps']} decode steps, {result['protocol']['warmup']} warm-up "
        f"({result['protocol'].get('warmup_steps', result['protocol']['decode_steps'])} steps) + "
        f"{result['protocol']['reps']} interleaved rounds (each round times every runtime once) in each of "
        f"{len(result.get('load_orders', []))} fresh processes, one per load order, pooled; eager alone, "
        f"{result['protocol'].get('eager_reps', result['protocol']['reps'])} rounds.",
        "",
        *roofline_table(result["runs"], result["failures"], ms_digits=1),
    ]
    for k, o in enumerate(result.get("load_orders", [])):
        ms = ", ".join(f"{n} {o['decode_ms_per_token'][n]:.1f}" for n in o["order"] if n in o["decode_ms_per_token"])
        lines.append(f"{'' if k else chr(10)}Load order {k + 1} (loaded first: {o['order'][0]}), median ms/token: {ms}")
    lines += step_split_lines(result["runs"], ms_digits=1)
    for prec, p in result.get("profiles", {}).items():
        parts = []
        for graph, g in p["graphs"].items():
            top = ", ".join(f"{k} {v}% ({g['op_ms_per_step'][k]:.2f} ms)"
                            for k, v in list(g["op_share_pct"].items())[:8])
            parts.append(f"`{graph}` run {g['model_run_ms_per_step']:.1f} ms/step, kernels "
                         f"{g['kernel_ms_per_step']:.1f} ms/step: {top}")
        lines.append(f"\nProfile illume-edge {prec} ({p['steps']} steps, mean context {p['context']}): "
                     + "; ".join(parts))
    for prec, p in result.get("peer_profiles", {}).items():
        g = p["graphs"]["model"]
        top = ", ".join(f"{k} {v}% ({g['op_ms_per_step'][k]:.2f} ms)" for k, v in list(g["op_share_pct"].items())[:8])
        lines.append(f"\nProfile {p['name']} ({p['steps']} steps): run {g['model_run_ms_per_step']:.1f} ms/step, "
                     f"kernels {g['kernel_ms_per_step']:.1f} ms/step: {top}")
        ours = result.get("profiles", {}).get(prec)
        if ours:
            kernels = sum(x["kernel_ms_per_step"] for x in ours["graphs"].values())
            mnb = sum(x["op_ms_per_step"].get("MatMulNBits", 0.0) for x in ours["graphs"].values())
            lines.append(f"Kernels per step, ours (every graph) vs {p['name']}: {kernels:.2f} vs "
                         f"{g['kernel_ms_per_step']:.2f} ms; MatMulNBits {mnb:.2f} vs "
                         f"{g['op_ms_per_step'].get('MatMulNBits', 0.0):.2f} ms (under the profiler)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.llm_decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2, help="interleaved rounds per load order")
    ap.add_argument("--eager-reps", dest="eager_reps", type=int, default=3, help="eager's rounds (alone)")
    ap.add_argument("--load-orders", dest="load_orders", type=int, default=2,
                    help="fresh timing processes, each loading the ONNX runtimes in another rotation "
                         "(load_orders); 2: ours and the peers trade places; 0: one per runtime")
    ap.add_argument("--threads", type=int, default=None, help="default: the cores this process may use")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int4"], choices=["fp32", "int8", "int4"],
                    help="our engines to time (make bench-full adds int8)")
    ap.add_argument("--block-size", dest="block_size", type=int, default=32,
                    help="int4/int8 quantization block, ours and onnxruntime-genai's alike (default 32)")
    ap.add_argument("--llm-graphs", dest="llm_graphs", nargs="+", default=[DEFAULT_LLM_GRAPH], choices=LLM_GRAPHS,
                    help="our llm graphs: the first gets every precision, the others fp32 and int4 (the A/B)")
    ap.add_argument("--shared-pool", dest="shared_pool", nargs="*", default=[],
                    help="precisions also timed with ILLUME_EDGE_THREAD_POOL=shared (default none; e.g. fp32 int4)")
    ap.add_argument("--spin-modes", dest="spin_modes", nargs="*", default=[], choices=["always", "off"],
                    help="our engines also timed under these SessionOptions.spin modes (the default is 'run')")
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--skip-genai", action="store_true")
    ap.add_argument("--profile", nargs="*", default=["int4"], help="precisions to profile (none: off)")
    ap.add_argument("--profile-steps", dest="profile_steps", type=int, default=16)
    ap.add_argument("--workdir", default=None, help="keep build outputs here (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<date>-<host>.json)")
    args = ap.parse_args(argv)
    result = run(args)
    write_result(result, args.out, "", markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
