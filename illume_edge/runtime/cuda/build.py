"""Ahead-of-time build of ``sampling.cu`` (nvcc -> cubins per arch) and the NVRTC run-time fallback.

``python -m illume_edge.runtime.cuda.build --out DIR`` writes ``sampling.sm_87.cubin`` etc. plus
``manifest.json`` (nvcc's CUDA version, block size, the ptxas numbers per arch) into DIR (default: the
package's ``prebuilt/`` folder, git-ignored). The build fails if ptxas reports any local-memory spill or
stack frame. Nothing here imports a CUDA binding at module import time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("sampling.cu")
DEFAULT_OUT = Path(__file__).with_name("prebuilt")
ARCHS: tuple[int, ...] = (87, 89, 90)  # Jetson Orin, Ada, Hopper
BLOCK = 512  # threads per block (ILLUME_BLOCK); the launcher reads it from here
KMAX = 4096  # kept-set entries held in shared memory (ILLUME_KMAX); larger sets use the global workspace
ENTRY_POINTS = {"float32": "illume_sample_f32", "float16": "illume_sample_f16",
                "greedy_float32": "illume_greedy_f32", "greedy_float16": "illume_greedy_f16"}
GREEDY_SLICE = BLOCK * 16  # logits per block of the greedy entry points (ILLUME_GREEDY_SLICE)
GREEDY_MAX_ROWS = 1024  # rows a greedy launch may have (ILLUME_GREEDY_MAX_ROWS: its counters' region)
DEFINES = (f"-DILLUME_BLOCK={BLOCK}", f"-DILLUME_KMAX={KMAX}", f"-DILLUME_GREEDY_SLICE={GREEDY_SLICE}",
           f"-DILLUME_GREEDY_MAX_ROWS={GREEDY_MAX_ROWS}")


def source_sha256() -> str:
    """What the cubins are built from: sampling.cu and the defines. A manifest that names another (cubins from
    an older source, whose arguments may differ) is not loaded: NVRTC compiles the current source instead."""
    import hashlib

    return hashlib.sha256(SOURCE.read_bytes() + " ".join(DEFINES).encode()).hexdigest()


class KernelBuildError(RuntimeError):
    """nvcc/NVRTC failed, or ptxas reported spills."""


@dataclass(frozen=True)
class PtxasStats:
    function: str
    arch: str
    registers: int
    smem_bytes: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    lmem_bytes: int = 0

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads or self.stack_bytes or self.lmem_bytes)


_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_RE_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_USED = re.compile(r"Used (\d+) registers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")
_RE_LMEM = re.compile(r"(\d+) bytes lmem")


def parse_ptxas(text: str) -> list[PtxasStats]:
    """Per-entry-function numbers from ``ptxas -v`` output (nvcc ``-Xptxas -v`` stderr)."""
    out: list[PtxasStats] = []
    cur: dict | None = None

    def flush():
        if cur is not None and "registers" in cur:
            out.append(PtxasStats(**cur))

    for line in text.splitlines():
        m = _RE_ENTRY.search(line)
        if m:
            flush()
            cur = dict(function=m.group(1), arch=m.group(2), registers=-1, smem_bytes=0, stack_bytes=0,
                       spill_stores=0, spill_loads=0, lmem_bytes=0)
            del cur["registers"]
            continue
        if cur is None:
            continue
        m = _RE_FRAME.search(line)
        if m:
            cur["stack_bytes"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = _RE_USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            s = _RE_SMEM.search(line)
            cur["smem_bytes"] = int(s.group(1)) if s else 0
            lm = _RE_LMEM.search(line)
            cur["lmem_bytes"] = int(lm.group(1)) if lm else 0
    flush()
    return out


def find_nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def nvcc_cuda_version(nvcc: str) -> int:
    """nvcc's CUDA version as the driver API encodes it (12.4 -> 12040)."""
    text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", text)
    if not m:
        raise KernelBuildError(f"cannot read the CUDA version from `nvcc --version`: {text!r}")
    return int(m.group(1)) * 1000 + int(m.group(2)) * 10


def compile_cubin(arch: int, out: Path, nvcc: str | None = None) -> list[PtxasStats]:
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise KernelBuildError("nvcc not found (set NVCC or put it on PATH)")
    cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-Xptxas", "-v", *DEFINES, str(SOURCE), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise KernelBuildError(f"nvcc failed for sm_{arch}:\n{res.stderr}")
    stats = parse_ptxas(res.stderr + res.stdout)
    if {s.function for s in stats} != set(ENTRY_POINTS.values()):
        raise KernelBuildError(f"sm_{arch}: ptxas reported {[s.function for s in stats]}, expected "
                               f"{sorted(ENTRY_POINTS.values())}")
    bad = [s for s in stats if s.spills]
    if bad:
        raise KernelBuildError(f"sm_{arch}: local memory in use (spills/stack): {bad}")
    return stats


def compile_cubins(out_dir: str | os.PathLike = DEFAULT_OUT, archs=ARCHS, nvcc: str | None = None) -> dict:
    """Build one cubin per arch into ``out_dir``; return (and write) the manifest."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise KernelBuildError("nvcc not found (set NVCC or put it on PATH)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"cuda_version": nvcc_cuda_version(nvcc), "block": BLOCK, "kmax": KMAX,
                "source_sha256": source_sha256(), "cubins": {}, "ptxas": []}
    for arch in archs:
        name = f"sampling.sm_{arch}.cubin"
        stats = compile_cubin(arch, out / name, nvcc)
        manifest["cubins"][str(arch)] = name
        manifest["ptxas"] += [asdict(s) for s in stats]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _nvrtc_module():
    try:
        from cuda.bindings import nvrtc  # cuda-python >= 12.6
        return nvrtc
    except ImportError:
        pass
    try:
        from cuda import nvrtc  # older cuda-python
        return nvrtc
    except ImportError as e:
        raise KernelBuildError("the NVRTC fallback needs cuda-python (`pip install cuda-python`); it is not "
                               "installed") from e


def nvrtc_compile(arch: int) -> bytes:
    """Compile ``sampling.cu`` at run time for ``sm_<arch>`` with NVRTC; returns a cubin image."""
    nvrtc = _nvrtc_module()

    def check(res):
        err = res[0]
        if int(err) != 0:
            raise KernelBuildError(f"NVRTC error {err}")
        return res[1:] if len(res) > 2 else (res[1] if len(res) == 2 else None)

    prog = check(nvrtc.nvrtcCreateProgram(SOURCE.read_bytes(), b"sampling.cu", 0, [], []))
    opts = [f"--gpu-architecture=sm_{arch}".encode(), b"-default-device", *(d.encode() for d in DEFINES)]
    res = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if int(res[0]) != 0:
        size = check(nvrtc.nvrtcGetProgramLogSize(prog))
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise KernelBuildError(f"NVRTC compile for sm_{arch} failed:\n{log.decode(errors='replace')}")
    size = check(nvrtc.nvrtcGetCUBINSize(prog))
    buf = b" " * size
    check(nvrtc.nvrtcGetCUBIN(prog, buf))
    nvrtc.nvrtcDestroyProgram(prog)
    return buf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--arch", type=int, action="append", help="sm number (repeatable); default 87, 89, 90")
    a = ap.parse_args(argv)
    try:
        man = compile_cubins(a.out, tuple(a.arch) if a.arch else ARCHS)
    except KernelBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for s in man["ptxas"]:
        print(f"{s['arch']:>6} {s['function']}: {s['registers']} registers, {s['smem_bytes']} B smem, "
              f"{s['stack_bytes']} B stack, spills {s['spill_stores']}/{s['spill_loads']}")
    print(f"wrote {a.out}/manifest.json (CUDA {man['cuda_version']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
