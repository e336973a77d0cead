"""Where a device decode step's time goes (docs/gpu.md): the llm + heads run (`feed`) against the kernel's
launch and 8-byte read (`pick`), the device's busy time per step from CUPTI (torch.profiler), and the host's
functions by their own time (cProfile, CUDA graph runs), on the GPU bench's engines
(benchmarks/gpu_decode.py --workdir DIR --build-only). Needs a GPU, torch and onnxruntime-gpu.
    python tools/gpu_step_split.py /tmp/illume-gpu-bench [fp16 int4]"""
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from illume_edge.runtime.cuda import GpuSampler
from illume_edge.runtime.decode_loops import device_pick
from illume_edge.runtime.engine import Engine
from illume_edge.runtime.llm_runner import LLMRunner
from illume_edge.runtime.sampler import SamplingParams, Uniforms
from illume_edge.runtime.session import SessionOptions

work = Path(sys.argv[1])
prompt = list(range(1000, 1128))
for name in sys.argv[2:] or ["fp16", "int4"]:
    for graph in (True, False):
        opts = SessionOptions(providers=["CUDAExecutionProvider"], device="cuda", cuda_graph=graph)
        r = LLMRunner(Engine.load(work / f"engine-{name}", opts, check_hash=False))
        pick = device_pick(GpuSampler())
        text, greedy = r.cfg.head_ranges()["text"][0], SamplingParams(temperature=0.0)

        def go(n):
            u = Uniforms(0, rows=1, steps=n + 1)
            st = r.prefill([prompt], max_new_tokens=n + 1)
            tok = pick(r, st, "text", greedy, u[0], text, False, ())
            fe, pk = [], []
            for i in range(n):
                t0 = time.perf_counter()
                r.feed(st, np.array([[tok]], np.int64))
                t1 = time.perf_counter()
                tok = pick(r, st, "text", greedy, u[i + 1], text, False, ())
                fe.append(t1 - t0)
                pk.append(time.perf_counter() - t1)
            return np.median(fe) * 1e3, np.median(pk) * 1e3

        go(32), go(32)
        fe, pk = go(64)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            go(32)
        torch.cuda.synchronize()
        ev = [e for e in prof.events() if e.device_type.name == "CUDA"]
        busy = sum(e.time_range.elapsed_us() for e in ev) / 1e3 / 33
        print(f"{name} {'CUDA graph' if graph else 'no graph'}: step {fe + pk:.3f} ms = feed (llm + heads run) "
              f"{fe:.3f} + pick (kernel launch, 8-byte read) {pk:.3f}; device busy {busy:.3f} ms per step "
              f"(1 prefill + 32 steps, {len(ev)} device events)", flush=True)
        if graph:  # the host's side of a step: 1 prefill + 64 steps, functions by their own time
            prof = cProfile.Profile()
            prof.runcall(go, 64)
            pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(22)
