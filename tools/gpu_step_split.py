"""Where a device decode step's time goes (docs/gpu.md): the llm run against the head + the kernel's draw (the
GPU bench's own split), the device's busy time per step from CUPTI (torch.profiler), and the host's functions
by their own time (cProfile, CUDA graph runs), on the GPU bench's engines (benchmarks/gpu_decode.py --workdir
DIR --build-only), through the bench's `ours_rep`. Needs a GPU, torch and onnxruntime-gpu.
    python tools/gpu_step_split.py /tmp/illume-gpu-bench [fp16 int4]"""
import cProfile
import pstats
import sys
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.gpu_decode import ours_rep

work = Path(sys.argv[1])
prompt = list(range(1000, 1128))
for name in sys.argv[2:] or ["fp16", "int4"]:
    # (CUDA graph, the sessions on the kernel's stream, the token read one step late): the runtime's step; the
    # token read before the next step is queued (docs/gpu.md, "Reading a token one step late"), without
    # graphs, and with every run synchronized on its own stream ("One stream for the decode step")
    for graph, one_stream, late in ((True, True, True), (True, True, False), (False, True, False),
                                    (True, False, False)):
        rep = ours_rep(work / f"engine-{name}", prompt, 64, "cuda", graph, one_stream, late)
        rep(32), rep(32)  # warm-up (CUDA graph capture, cuDNN / cuBLAS set-up)
        _, step_s, _, parts = rep(64)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            rep(32)
        torch.cuda.synchronize()
        ev = [e for e in prof.events() if e.device_type.name == "CUDA"]
        busy = sum(e.time_range.elapsed_us() for e in ev) / 1e3 / 33
        label = (("CUDA graph" if graph else "no graph") + ("" if one_stream else ", runs synchronized")
                 + (", token read one step late" if late else ""))
        split = ""
        if parts:  # the late-read loop has no split: the next step is queued before the token is read
            llm, head = (1e3 * parts[k] / len(step_s) for k in ("llm", "head_and_pick"))
            split = f" = llm run {llm:.3f} + head and draw {head:.3f} (means)"
        print(f"{name} {label}: step {1e3 * np.median(step_s):.3f} ms (median){split}; device busy {busy:.3f} ms "
              f"per step (1 prefill + 32 steps, {len(ev)} device events)", flush=True)
        if graph and late:  # the host's side of a step: 1 prefill + 64 steps, functions by their own time
            host = cProfile.Profile()
            host.runcall(rep, 64)
            pstats.Stats(host, stream=sys.stdout).sort_stats("tottime").print_stats(22)
