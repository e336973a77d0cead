"""LLM decode on a GPU: our fp16 and int4 engines against PyTorch eager, next to the GPU's bandwidth roofline.

    python -m benchmarks.gpu_decode                                  # ILLUME+ 3B shape, 8 of its 36 layers
    python -m benchmarks.gpu_decode --layers 0                       # all 36 layers (export takes minutes)
    python -m benchmarks.gpu_decode --shape smoke --device cpu       # the same code on the host, in seconds

One set of seeded random weights of the shape, batch 1, a `--prompt`-token prompt, then `--steps` greedy decode
steps (EOS ignored):
- illume-edge fp16: the fused `llm` graph + `head_text` exported from the module in half precision; KV cache,
  hidden state and logits in device memory (`SessionOptions(device="cuda")`), the decode step replayed as a
  CUDA graph (and, for the A/B, without), the greedy token drawn by the sampling kernel straight into the next
  step's input ids (`decode_loops.DevicePick`; only its 8 bytes come back, read one step late). `--device cpu`
  runs the same code with the buffers as onnxruntime OrtValues on the host and the host sampler.
- illume-edge int4: the fp16 engine quantized (`quantize_engine`, int4 weights over fp16 activations,
  block `--block-size`), the same way.
- onnxruntime-genai (the peer a user would otherwise pick; onnxruntime-genai-cuda on a GPU): its model
  builder on the same weights saved as a HF folder, fp16 and int4 (block `--block-size`, symmetric), its
  Generator greedy, with its CUDA graph on and (for the A/B) off; int4 on the CPU with `--device cpu`.
  `--skip-genai` leaves it out; not installed, it is reported as a failure, not hidden.
- PyTorch eager (transformers) on the same module in fp16 on the device: DynamicCache, logits_to_keep=1.
Each runtime's per-token time is compared with its weight-read bound: the bytes a step must read (every
streamed weight once, the KV cache at the mean context) over the device's bandwidth, measured in the same run
as a device-to-device copy (bytes read + written per second). The issue's anchor: onnxruntime-genai reaches
~46% of that roofline for Phi-3-mini fp16 on an A100; the target is >= 40% with CUDA graphs.

`--layers N` keeps the shape's width, heads and vocabulary and N of its layers: the full 3B export (6 GB of
fp16 weights) takes minutes of CPU time, more than one call on a lent GPU machine allows. Fewer layers
make the fixed per-step costs (the text head, launches, the token's round trip) weigh more, so the roofline
percentage of a truncated model is a lower bound for the full one.
Writes JSON (`--out`, default benchmarks/results/<date>-<host>-gpu-decode.json) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import inspect
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import closing
from pathlib import Path

import numpy as np

from benchmarks.llm_decode import (Rep, add_roofline, export_bench_engine, genai_cuda_graph, genai_linked_copy,
                                   genai_rep, interleaved, kv_bytes_per_step, roofline_table, smoke_shape,
                                   step_split_lines, streamed_weight_bytes)
from benchmarks.machine import (BANDWIDTH_STATISTIC, cores, cpu_model, git_commit, measure_read_bandwidth, versions,
                                write_result)
from illume_edge.config import illume_plus

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


SHAPES = {"illume-plus-3b": lambda: illume_plus("3b"), "illume-plus-7b": lambda: illume_plus("7b"),
          "smoke": smoke_shape}


def with_layers(cfg, layers: int):
    """`cfg` with `layers` of its LLM's layers (0: all)."""
    if not layers or layers >= cfg.llm.num_layers:
        return cfg
    return dataclasses.replace(cfg, name=f"{cfg.name} ({layers} of {cfg.llm.num_layers} layers)",
                               llm=dataclasses.replace(cfg.llm, num_layers=layers)).validate()


# ---------------------------------------------------------------------------------------------------------
# The device: bandwidth, memory, identity
# ---------------------------------------------------------------------------------------------------------
def device_bandwidth(device: str, mib: int = 1024, reps: int = 10) -> dict:
    """GB/s of a device-to-device copy of `mib` MiB (bytes read + bytes written, as GPU bandwidth is quoted);
    on "cpu", the host's streaming read (machine.measure_read_bandwidth)."""
    if device == "cpu":
        bw = measure_read_bandwidth(cores())
        return {"best_gbs": bw["best_gbs"], "median_gbs": bw["median_gbs"], "method": bw["method"]}
    import torch

    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    rates = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        stop.record()
        stop.synchronize()
        rates.append(2 * src.numel() / (start.elapsed_time(stop) / 1e3) / 1e9)
    del src, dst
    torch.cuda.empty_cache()
    return {"best_gbs": max(rates), "median_gbs": float(np.median(rates)),
            "method": f"torch device-to-device copy of {mib} MiB, (read + write bytes) / time, CUDA events"}


def device_used_bytes(device: str) -> int | None:
    """Bytes in use on the whole device (every allocator: onnxruntime's arena and torch's alike)."""
    if device == "cpu":
        return None
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free


def gpu_identity(device: str) -> dict:
    if device == "cpu":
        return {"device": "cpu", "cpu": cpu_model(), "cores": cores()}
    out = {"device": device}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, check=True).stdout
        out.update(zip(("name", "driver", "memory", "max_sm_clock"), (x.strip() for x in q.splitlines()[0].split(","))))
    except (OSError, subprocess.CalledProcessError, IndexError) as e:
        out["nvidia_smi"] = f"failed: {e}"
    try:
        import torch

        out["torch_cuda"] = torch.version.cuda
        out["sm"] = "%d%d" % torch.cuda.get_device_capability()
    except Exception as e:  # noqa: BLE001 - reported
        out["torch"] = f"failed: {e}"
    return out


# ---------------------------------------------------------------------------------------------------------
# The runtimes
# ---------------------------------------------------------------------------------------------------------
def ours_rep(engine_dir: Path, prompt: list[int], steps: int, device: str, cuda_graph: bool,
             one_stream: bool = True, late_read: bool = True) -> Rep:
    """Our runtime on `engine_dir`: prefill, then greedy steps through the runtime's own `Pick` (the kernel on
    a GPU, the host sampler on "cpu"). On a GPU the sessions run on the kernel's stream (as `Pipeline.load`
    sets them up), so that a step waits for the device once, and (`late_read`) the text loop's own iterator
    (`decode_loops.text_tokens`) reads each token one step late, the next step queued first (docs/gpu.md,
    "Reading a token one step late"): a step's time is then the time between two tokens. Otherwise each
    step's time is split into the llm run and the head + draw (`Rep` extras "llm", "head_and_pick"). For
    the A/B: `late_read` False reads each token before the next step is queued; `one_stream` False as well
    times the step as it was before "One stream for the decode step": each session on its own stream, every
    run synchronized."""
    from illume_edge.runtime.decode_loops import device_pick, host_pick, text_tokens
    from illume_edge.runtime.engine import Engine
    from illume_edge.runtime.llm_runner import LLMRunner
    from illume_edge.runtime.sampler import SamplingParams, Uniforms
    from illume_edge.runtime.session import SessionOptions

    if device == "cpu":  # the device path's allocation and binding (OrtValues), on the host
        opts = SessionOptions(threads=cores(), buffers="ortvalue", cuda_graph=cuda_graph)
        pick = host_pick
    else:
        from illume_edge.runtime.cuda import GpuSampler

        sampler = GpuSampler()
        opts = SessionOptions(providers=CUDA, device=device, cuda_graph=cuda_graph,
                              compute_stream=sampler.stream_handle if one_stream else None)
        pick = device_pick(sampler)
    runner = LLMRunner(Engine.load(engine_dir, opts, check_hash=False))
    cfg = runner.cfg
    text_start = cfg.head_ranges()["text"][0]
    greedy = SamplingParams(temperature=0.0)

    def rep_late(n: int = steps):
        uniforms = Uniforms(0, rows=1, steps=n + 1)
        t0 = time.perf_counter()
        state = runner.prefill([prompt], max_new_tokens=n + 1)
        times, out = [], []
        with closing(text_tokens(runner, state, pick, greedy, uniforms, text_start, (), n + 1)) as tokens:
            for tok in tokens:
                t1 = time.perf_counter()
                times.append(t1 - t0)
                out.append(tok)
                t0 = t1
        return times[0], times[1:], out, {}  # the first token's time is the prefill's, each later one a step

    def rep(n: int = steps):
        uniforms = Uniforms(0, rows=1, steps=n + 1)
        t0 = time.perf_counter()
        state = runner.prefill([prompt], max_new_tokens=n + 1)
        tok = pick(runner, state, "text", greedy, uniforms[0], text_start, False, ())
        t_prefill = time.perf_counter() - t0
        step_s, out, llm_s = [], [tok], 0.0
        for i in range(n):
            t0 = time.perf_counter()
            runner.feed(state, np.array([[tok]], np.int64))
            t1 = time.perf_counter()
            tok = pick(runner, state, "text", greedy, uniforms[i + 1], text_start, False, ())  # syncs: 8 bytes back
            step_s.append(time.perf_counter() - t0)
            llm_s += t1 - t0
            out.append(tok)
        # the step's two halves, as the CPU bench records them: the llm run, then the head and the draw
        return t_prefill, step_s, out, {"llm": llm_s, "head_and_pick": sum(step_s) - llm_s}

    return rep_late if late_read else rep  # (on "cpu" the host sampler reads every token at once)


def eager_rep(model, prompt: list[int], steps: int, device: str, text: tuple[int, int]) -> Rep:
    """transformers eager on the module (on `device`): DynamicCache, logits_to_keep=1, argmax over the text
    ids [text[0], text[1]) as our text head draws (over the whole vocabulary it picks image codes, and the
    sequences cannot be compared); `.item()` synchronizes every step."""
    import torch
    from transformers import DynamicCache

    ids = torch.tensor([prompt], dtype=torch.int64, device=device)
    lo, hi = text
    # transformers renamed the cache argument (`cache`; `past_key_values` deprecated): take what this one has
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def rep(n: int = steps):
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{key: DynamicCache(config=model.config)})
        tok = int(out.logits[0, -1, lo:hi].argmax().item()) + lo
        t_prefill = time.perf_counter() - t0
        step_s, got = [], [tok]
        for _ in range(n):
            t0 = time.perf_counter()
            out = model(input_ids=torch.tensor([[tok]], device=device), use_cache=True, logits_to_keep=1,
                        **{key: getattr(out, key)})
            tok = int(out.logits[0, -1, lo:hi].argmax().item()) + lo
            step_s.append(time.perf_counter() - t0)
            got.append(tok)
        return t_prefill, step_s, got, {}

    return rep


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
def build_stamp(cfg, block_size: int) -> dict:
    """What a workdir's engines were built from: a workdir whose `built.json` says the same is reused."""
    return {"shape": cfg.name, "layers": cfg.llm.num_layers, "block_size": block_size, "seed": 0,
            "git_commit": git_commit()}


def genai_precisions(ep: str) -> tuple[str, ...]:
    """onnxruntime-genai's models for its execution provider: fp16 and int4 (over fp16) on CUDA, as ours;
    int4 on the CPU (its peer in `make bench`; the harness check on the host)."""
    return ("int4",) if ep == "cpu" else ("fp16", "int4")


def build_genai_models(model, cfg, work: Path, block_size: int, ep: str, log) -> dict[str, str]:
    """onnxruntime-genai's model builder on the same weights (saved as a HF folder): precision -> its model
    folder, or the error that stopped it (a failing peer is reported, not hidden)."""
    from benchmarks.llm_decode import build_genai
    from illume_edge.export.tokenizer_factory import save_tokenizer_files

    hf_dir = work / "hf"
    model.save_pretrained(hf_dir, safe_serialization=True)
    save_tokenizer_files(cfg, hf_dir)
    out: dict[str, str] = {}
    for prec in genai_precisions(ep):
        d = work / f"genai-{prec}"
        shutil.rmtree(d, ignore_errors=True)
        log(f"onnxruntime-genai {prec}: model builder ({ep})")
        try:
            build_genai(hf_dir, d, prec, cores(), work / "genai-cache", block_size, ep=ep)
            out[prec] = str(d)
        except Exception as e:
            out[prec] = f"{type(e).__name__}: {str(e)[-1500:]}"
            traceback.print_exc()
    shutil.rmtree(hf_dir, ignore_errors=True)
    return out


def build_engines(model, cfg, work: Path, block_size: int, log, genai_ep: str | None = None
                  ) -> tuple[dict[str, Path], dict[str, str]]:
    """fp16 engine (the fused graph) and its int4 copy, and with `genai_ep` onnxruntime-genai's models
    (`build_genai_models`: precision -> folder or error). Kept from an earlier run into the same `--workdir`
    (`--build-only`, or `--keep`) when its stamp matches, the genai models too when they were built for the
    same provider (a lent GPU's calls are short: the CPU-bound export runs in the background while the GPU
    tests run, and the timing after)."""
    from illume_edge.export.quantize import quantize_engine

    stamp_file, stamp = work / "built.json", build_stamp(cfg, block_size)
    engines = {"fp16": work / "engine-fp16", "int4": work / "engine-int4"}
    saved = json.loads(stamp_file.read_text()) if stamp_file.exists() else {}
    if saved.get("built_from") == stamp:
        log(f"engines reused from {work} ({stamp})")
    else:
        stamp_file.unlink(missing_ok=True)
        saved = {"built_from": stamp, "genai_ep": None, "genai_models": {}}
        shutil.rmtree(engines["fp16"], ignore_errors=True)
        log("export fp16 (fused graph)")
        export_bench_engine(model, cfg, engines["fp16"], "fused", precision="fp16")
        log(f"quantize int4 over fp16 (block {block_size})")
        quantize_engine(engines["fp16"], engines["int4"], "int4", block_size=block_size, progress=lambda s: None)
    if genai_ep is None:
        genai = {}
    elif saved["genai_ep"] == genai_ep:
        genai = saved["genai_models"]
    else:
        genai = build_genai_models(model, cfg, work, block_size, genai_ep, log)
        saved.update(genai_ep=genai_ep, genai_models=genai)
    stamp_file.write_text(json.dumps(saved, indent=1) + "\n")
    return engines, genai


def run(args) -> dict:
    import torch

    from illume_edge.export.llm import build_llm

    t_start = time.perf_counter()
    def log(s: str) -> None:
        print(f"[gpu-bench {time.perf_counter() - t_start:6.1f}s] {s}", file=sys.stderr, flush=True)
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device (use --device cpu to check the harness)")
    torch.set_num_threads(cores())
    cfg = with_layers(SHAPES[args.shape](), args.layers)
    llm = cfg.llm
    work = Path(args.workdir or tempfile.mkdtemp(prefix="illume-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    prompt = np.random.default_rng(0).integers(0, cfg.tokens.endoftext, args.prompt).tolist()
    context = args.prompt + args.steps // 2
    log(f"device: {gpu_identity(args.device)}")
    bw = (device_bandwidth(args.device) if not args.build_only else  # the timing run measures it
          {BANDWIDTH_STATISTIC: 0.0, "best_gbs": 0.0, "method": "not measured (--build-only)"})
    log(f"bandwidth {bw[BANDWIDTH_STATISTIC]:.0f} GB/s, best pass {bw['best_gbs']:.0f} ({bw['method']})")
    result: dict = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
        "machine": {**gpu_identity(args.device), "bandwidth_gbs": bw[BANDWIDTH_STATISTIC], "bandwidth": bw,
                    "bandwidth_statistic": BANDWIDTH_STATISTIC,
                    "host_cpu": cpu_model(), "host_cores": cores()},
        "versions": {**versions(), "onnxruntime_providers": _providers()}, "git_commit": git_commit(),
        "shape": {"name": cfg.name, "layers": llm.num_layers, "hidden": llm.hidden_size, "heads": llm.num_heads,
                  "kv_heads": llm.num_kv_heads, "ffn": llm.intermediate_size, "vocab_rows": llm.vocab_rows,
                  "text_head_rows": cfg.head_ranges()["text"][1] - cfg.head_ranges()["text"][0]},
        "protocol": {"batch": 1, "prompt_tokens": args.prompt, "decode_steps": args.steps, "warmup": args.warmup,
                     "reps": args.reps, "greedy": True, "mean_context": context, "block_size": args.block_size,
                     "timing": "interleaved rounds in one process; per-step wall time, the token's id read back"},
        "runs": {}, "failures": {}, "build_s": {},
    }
    log(f"building random {cfg.name} in fp16")
    t0 = time.perf_counter()
    model = build_llm(cfg, seed=0).half().eval()
    genai_ep = None if args.skip_genai else ("cpu" if args.device == "cpu" else "cuda")
    if genai_ep and importlib.util.find_spec("onnxruntime_genai") is None:
        result["failures"]["onnxruntime-genai"] = ("not installed: pip install onnxruntime-genai (on a GPU "
                                                   "onnxruntime-genai-cuda), or pass --skip-genai")
        genai_ep = None
    engines, genai = build_engines(model, cfg, work, args.block_size, log, genai_ep)
    result["build_s"]["export_and_quantize"] = time.perf_counter() - t0
    if args.build_only:
        log(f"built into {work}; time them with the same --workdir")
        return result
    kv = kv_bytes_per_step(cfg, context, bytes_per_value=2)
    reps, bytes_by_name = {}, {}
    for prec, d in engines.items():
        weights = sum(streamed_weight_bytes(d / f)["streamed"] for f in ("llm.onnx", "head_text.onnx"))
        variants = ([(True, True, True)] + ([(False, True, True)] if args.graph_ab else [])
                    + ([(True, True, False), (True, False, False)] if args.step_ab else []))
        for graph, lean, late in variants:  # (CUDA graph, one stream, token read one step late)
            name = (f"illume-edge {prec}" + ("" if graph else " (no CUDA graph)")
                    + ("" if late or not lean else " (token read before the next step)")
                    + ("" if lean else " (runs synchronized, own streams)"))
            before = device_used_bytes(args.device)
            try:
                reps[name] = ours_rep(d, prompt, args.steps, args.device, graph, lean, late)
                after = device_used_bytes(args.device)  # sessions loaded (request buffers come at the first run)
                bytes_by_name[name] = {"weight_bytes_per_token": weights,
                                       "device_bytes_loaded": None if before is None else after - before}
            except Exception as e:  # a failing configuration is reported, not hidden
                result["failures"][name] = f"{type(e).__name__}: {str(e)[-1500:]}"
                traceback.print_exc()
    # onnxruntime-genai: on CUDA with its CUDA graph on and (for the A/B) off, each a linked copy of the model
    # folder whose config says which; on the CPU its folder as built
    graph_modes = ([True, False] if args.graph_ab else [True]) if genai_ep == "cuda" else [None]
    for prec, d in genai.items():
        for graph in graph_modes:
            name = f"onnxruntime-genai {prec}" + (" (no CUDA graph)" if graph is False else "")
            if not Path(d).is_dir():  # the builder's error
                result["failures"][name] = d
                continue
            try:
                folder = Path(d)
                if graph is not None:
                    folder = work / f"genai-{prec}-graph-{int(graph)}"
                    genai_linked_copy(Path(d), folder, lambda options, on=graph: genai_cuda_graph(options, on))
                reps[name] = genai_rep(folder, prompt, args.steps)
                weights = streamed_weight_bytes(Path(d) / "model.onnx")["streamed"]
                bytes_by_name[name] = {"weight_bytes_per_token": weights}
            except Exception as e:
                result["failures"][name] = f"{type(e).__name__}: {str(e)[-1500:]}"
                traceback.print_exc()
    if not args.skip_eager:
        from benchmarks.llm_decode import param_bytes

        model = model.to(args.device)
        reps["PyTorch eager fp16"] = eager_rep(model, prompt, args.steps, args.device, cfg.head_ranges()["text"])
        bytes_by_name["PyTorch eager fp16"] = {"weight_bytes_per_token": param_bytes(model)}
    log(f"timing {len(reps)} runtimes: {args.warmup} warm-up + {args.reps} interleaved rounds")
    for name, r in interleaved(reps, args.warmup, args.reps, log, result["failures"]).items():
        result["runs"][name] = {**r, **bytes_by_name[name], "kv_bytes_per_token": kv}
    add_roofline(result["runs"], bw[BANDWIDTH_STATISTIC], "PyTorch eager fp16")
    result["device_bytes_in_use_at_end"] = device_used_bytes(args.device)  # every runtime's, buffers included
    result["total_s"] = time.perf_counter() - t_start
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def markdown(result: dict) -> str:
    m, v, p = result["machine"], result["versions"], result["protocol"]
    what = m.get("name") or m.get("cpu")
    lines = [f"Device: {what} ({m['device']}; driver {m.get('driver', '-')}), measured bandwidth "
             f"{m['bandwidth_gbs']:.0f} GB/s (median; {m['bandwidth']['method']}). onnxruntime {v['onnxruntime']} "
             f"({', '.join(v['onnxruntime_providers'])}), torch {v['torch']}; commit {result['git_commit'][:12]}.",
             f"Shape {result['shape']['name']}: batch 1, prompt {p['prompt_tokens']}, {p['decode_steps']} greedy "
             f"steps, {p['warmup']} warm-up + {p['reps']} interleaved rounds.", "",
             *roofline_table(result["runs"], result["failures"], ms_digits=3),
             *step_split_lines(result["runs"], ms_digits=3)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="illume-plus-3b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=8, help="LLM layers kept (0: all of the shape's)")
    ap.add_argument("--device", default="cuda", help="cuda (a GPU) or cpu (the same code on the host)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--block-size", dest="block_size", type=int, default=32)
    ap.add_argument("--graph-ab", dest="graph_ab", action="store_true",
                    help="also time our engines without CUDA graphs")
    ap.add_argument("--step-ab", dest="step_ab", action="store_true",
                    help="also time ours, CUDA graph on, with each token read before the next step is queued, and "
                         "with the step as before the third H100 session (each session on its own stream, every "
                         "run synchronized)")
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--skip-genai", action="store_true",
                    help="no onnxruntime-genai peer (its model builder on the same weights: fp16 and int4 on "
                         "CUDA with onnxruntime-genai-cuda, int4 on the host)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--build-only", dest="build_only", action="store_true",
                    help="export and quantize into --workdir, then stop (a later run with it reuses them)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/<date>-<host>-gpu-decode.json)")
    args = ap.parse_args(argv)
    if args.build_only and not args.workdir:
        ap.error("--build-only needs --workdir (where the timing run will find the engines)")
    result = run(args)
    if args.build_only:
        return 0
    write_result(result, args.out, "-gpu-decode", markdown(result))
    return 0 if result["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
