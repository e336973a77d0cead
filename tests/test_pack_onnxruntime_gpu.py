"""tools/pack_onnxruntime_gpu.py: keeping one architecture's cubins in a CUDA library's fat binaries.

Checked on a real library nvcc builds here (two architectures), and on hand-made fat binaries for the
parser's edge cases. Whether the CUDA runtime then loads the kept kernels needs a GPU (tools/gpu_check.sh
runs onnxruntime-gpu packed this way)."""
from __future__ import annotations

import importlib.util
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from illume_edge.runtime.cuda import build

TOOL = Path(__file__).parents[1] / "tools" / "pack_onnxruntime_gpu.py"
_spec = importlib.util.spec_from_file_location("pack_ort", TOOL)
pack = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = pack  # dataclasses look their module up while the class is made
_spec.loader.exec_module(pack)


def _entry(kind: int, arch: int, payload: bytes) -> bytes:
    header = bytearray(64)
    struct.pack_into("<HHIQ", header, 0, kind, 0x101, 64, len(payload))
    struct.pack_into("<I", header, 28, arch)
    return bytes(header) + payload


def _container(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", pack.FATBIN_MAGIC, 1, 16, len(body)) + body


def test_entries_of_hand_made_containers():
    a = _container(_entry(2, 87, b"A" * 40), _entry(2, 90, b"B" * 24))
    b = _container(_entry(1, 75, b"ptx text"), _entry(2, 90, b"C" * 8))
    data = bytearray(b"\0" * 8 + a + b"\0" * 8 + b)  # padding before and between containers
    es = pack.fatbin_entries(data, 0, len(data))
    assert [(e.kind, e.arch, e.size) for e in es] == [(2, 87, 40), (2, 90, 24), (1, 75, 8), (2, 90, 8)]
    assert bytes(data[es[1].offset:es[1].offset + es[1].size]) == b"B" * 24
    with pytest.raises(ValueError, match="runs past its section"):
        pack.fatbin_entries(data, 0, len(data) - 4)


@pytest.mark.skipif(build.find_nvcc() is None or shutil.which("g++") is None, reason="needs nvcc and a host compiler")
def test_keep_one_arch_of_a_real_library(tmp_path):
    """nvcc builds a shared library with sm_87 and sm_90 cubins; keeping sm_90 zeroes exactly the sm_87
    payloads and leaves the file's size, its sections and every sm_90 byte as they were."""
    src = tmp_path / "k.cu"
    src.write_text('extern "C" __global__ void add_one(float* x) { x[threadIdx.x] += 1.0f; }\n')
    lib = tmp_path / "libk.so"
    subprocess.run([build.find_nvcc(), "-shared", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_87,code=sm_87",
                    "-gencode", "arch=compute_90,code=sm_90", "-o", str(lib), str(src)], check=True)
    before = lib.read_bytes()
    entries = pack.fatbin_entries(before, *pack.elf_section(before, pack.FATBIN_SECTION))
    assert sorted({(e.kind, e.arch) for e in entries}) == [(2, 87), (2, 90)]
    data = bytearray(before)
    report = pack.keep_archs(data, {90})
    assert set(report["zeroed_bytes"]) == {87} and set(report["kept_bytes"]) == {90}
    assert len(data) == len(before) and pack.elf_section(data, pack.FATBIN_SECTION) == pack.elf_section(
        before, pack.FATBIN_SECTION)
    for e in entries:
        got = bytes(data[e.offset:e.offset + e.size])
        assert got == (before[e.offset:e.offset + e.size] if e.arch == 90 else bytes(e.size)), e
    changed = [i for i in range(len(data)) if data[i] != before[i]]
    inside = lambda i: any(e.offset <= i < e.offset + e.size for e in entries if e.arch == 87)  # noqa: E731
    assert changed and all(inside(i) for i in changed)  # nothing outside the dropped payloads moved
    with pytest.raises(ValueError, match=r"no cubin for sm_\[80\]"):
        pack.keep_archs(bytearray(before), {80})


def test_not_an_elf_file():
    with pytest.raises(ValueError, match="not a 64-bit little-endian ELF"):
        pack.elf_section(b"MZ" + bytes(100), pack.FATBIN_SECTION)
