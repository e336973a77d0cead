"""What a benchmark records about the machine and the software it ran on (shared by every bench)."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# The pass statistic a roofline divides by. The median, not the best pass: on this shared VM the best of 7 is
# an outlier now and then (56.8 GB/s in a run whose median was 30.2, on 2026-11-27), when the neighbours are
# idle for one pass; the decode times it is compared with are medians over minutes (docs/performance.md).
BANDWIDTH_STATISTIC = "median_gbs"


def measure_read_bandwidth(threads: int, mib: int = 1024, reps: int = 7) -> dict:
    """Streaming read of a buffer far larger than cache, split over `threads` threads (numpy's reductions
    release the GIL). Best and median GB/s over `reps` passes (1 GB = 1e9 bytes); rooflines use
    BANDWIDTH_STATISTIC."""
    buf = np.ones(mib * (1 << 20) // 8, np.float64)
    parts = np.array_split(buf, threads)
    sink = [0.0] * threads

    def read(i):
        sink[i] = float(np.add.reduce(parts[i]))

    rates = []
    for _ in range(reps):
        ts = [threading.Thread(target=read, args=(i,)) for i in range(threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        rates.append(buf.nbytes / (time.perf_counter() - t0) / 1e9)
    del buf, parts
    return {"threads": threads, "buffer_mib": mib, "best_gbs": max(rates), "median_gbs": statistics.median(rates),
            "method": "numpy add.reduce over float64, one contiguous slice per thread"}


def bandwidth_label(machine: dict) -> str:
    """How a result's roofline bandwidth was taken (results before the switch to the median used the best)."""
    if machine.get("bandwidth_statistic", "best_gbs") == "best_gbs":
        return "best pass"
    return f"median of the passes; best {machine.get('read_bandwidth', {}).get('best_gbs', float('nan')):.1f}"


# the runtimes a bench times, imported here to read the version of the module that runs: a package on
# PYTHONPATH (onnxruntime-gpu unpacked beside the machine's CPU onnxruntime by tools/gpu_check.sh) shadows the
# installed distribution, whose metadata would otherwise be reported; both import in well under a second
RUNTIME_MODULES = ("onnxruntime", "onnxruntime_genai")
# the distributions that provide a module under another name (the GPU builds of the two runtimes)
FLAVOURS = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
            "onnxruntime-genai": ("onnxruntime-genai", "onnxruntime-genai-cuda")}


def versions() -> dict:
    """Each package's version: the imported module's own (the runtimes are imported for it), else the first
    installed distribution that provides it; "absent" where none does."""
    import importlib

    for name in RUNTIME_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - absent or broken: the metadata (or "absent") says what is there
            pass
    out = {"python": platform.python_version()}
    for pkg in ("illume-edge", "numpy", "onnx", "onnxruntime", "onnxruntime-genai", "torch", "transformers", "diffusers"):
        module = sys.modules.get(pkg.replace("-", "_"))
        if getattr(module, "__version__", None):
            out[pkg] = str(module.__version__)
            continue
        out[pkg] = "absent"
        for dist in FLAVOURS.get(pkg, (pkg,)):
            try:
                out[pkg] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                pass
    return out


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def peak_rss_mb() -> float:
    """This process's peak resident set (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


RESULTS_DIR = REPO / "benchmarks" / "results"


def write_result(result: dict, out: str | None, suffix: str, markdown: str) -> Path:
    """Write a bench's JSON to `out` (default benchmarks/results/<date>-<host><suffix>.json), print its
    markdown table and where it went; returns the path."""
    import datetime as dt
    import json
    import socket

    path = Path(out) if out else RESULTS_DIR / f"{dt.date.today().isoformat()}-{socket.gethostname()}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown)
    print(f"\nwrote {path} ({result['total_s']:.0f} s)")
    return path
