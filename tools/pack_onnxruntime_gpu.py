"""Pack onnxruntime-gpu for one GPU architecture: a wheel of ~255 MB becomes ~70 MB of xz parts.

    python tools/pack_onnxruntime_gpu.py WHEEL --arch 90 --out .device/ort [--part-mib 30]
    # on the GPU machine:  cat .device/ort/*.part* | xz -d | tar -x -C SITE  (then PYTHONPATH=SITE)

Why: onnxruntime-gpu's CUDA provider library (`libonnxruntime_providers_cuda.so`, 284 MB in 1.31.1) carries
compiled kernels (cubins) for every architecture it supports (sm_75, 80, 86, 89, 90, 120: 218 MB of them).
A machine loads only its own. Where the install has to travel under a size limit (a container layer for a
Jetson or a robot, or this workplace's 64 MiB per call to its lent GPU machines; tools/gpu_check.sh), the
other architectures' cubins are dead weight.

How: the library's `.nv_fatbin` section is a sequence of fat-binary containers (magic 0xBA55ED50, a 16-byte
header, then entries). Each entry has its own header (kind: 1 PTX, 2 cubin; the target architecture at byte
28; the payload size at byte 8) followed by its payload. This tool overwrites the payloads of the entries for
other architectures with zeros and leaves every header, size and offset as it was, so the ELF file and the
fat binaries keep their layout, and the CUDA runtime, which picks the entry for the device's architecture,
finds it unchanged. PTX entries are kept whatever their architecture (the driver JIT-compiles them for newer
GPUs). Zeros compress to nothing, so the packed tree is about the size of one architecture's kernels.

What it does not do: it does not make onnxruntime smaller in memory, and a GPU of another architecture finds
only zeros where its kernels were (its first CUDA kernel launch then fails): pack one per target.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
FATBIN_SECTION = ".nv_fatbin"
KIND_PTX, KIND_CUBIN = 1, 2
CUDA_PROVIDER = "libonnxruntime_providers_cuda.so"


@dataclasses.dataclass(frozen=True)
class Entry:
    offset: int  # of the payload, in the buffer
    size: int  # payload bytes
    kind: int  # KIND_PTX | KIND_CUBIN
    arch: int  # e.g. 90 for sm_90


def elf_section(data: bytes | bytearray, name: str) -> tuple[int, int]:
    """(file offset, size) of ELF64 little-endian section `name`."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    # section header: name(u32) type(u32) flags(u64) addr(u64) offset(u64) size(u64) ...
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    for h in headers:
        start = strtab + h[0]
        if bytes(data[start:data.index(0, start)]).decode() == name:
            return h[4], h[5]
    raise ValueError(f"no {name} section")


def fatbin_entries(data: bytes | bytearray, offset: int, size: int) -> list[Entry]:
    """Every entry of the fat-binary containers in data[offset:offset + size]. Containers start 8-byte
    aligned; padding between them is skipped."""
    out, p, end = [], offset, offset + size
    while p + 16 <= end:
        magic, _version, header, body = struct.unpack_from("<IHHQ", data, p)
        if magic != FATBIN_MAGIC:
            p += 8
            continue
        q, stop = p + header, p + header + body
        if stop > end:
            raise ValueError(f"fat binary at {p:#x} runs past its section ({stop:#x} > {end:#x})")
        while q < stop:
            kind, _v, entry_header, payload = struct.unpack_from("<HHIQ", data, q)
            arch, = struct.unpack_from("<I", data, q + 28)
            if entry_header < 32 or q + entry_header + payload > stop:
                raise ValueError(f"malformed fat-binary entry at {q:#x}")
            out.append(Entry(q + entry_header, payload, kind, arch))
            q += entry_header + payload
        p = stop
    return out


def keep_archs(data: bytearray, archs: set[int]) -> dict:
    """Zero every cubin payload in `data` (an ELF shared library) whose architecture is not in `archs`; PTX
    is kept. Returns per-architecture bytes kept and zeroed."""
    entries = fatbin_entries(data, *elf_section(data, FATBIN_SECTION))
    kept: dict[int, int] = {}
    zeroed: dict[int, int] = {}
    for e in entries:
        if e.kind == KIND_CUBIN and e.arch not in archs:
            data[e.offset:e.offset + e.size] = bytes(e.size)
            zeroed[e.arch] = zeroed.get(e.arch, 0) + e.size
        else:
            kept[e.arch] = kept.get(e.arch, 0) + e.size
    if not any(a in archs for a in kept):
        raise ValueError(f"no cubin for sm_{sorted(archs)} in the library (it has sm_{sorted(kept | zeroed)})")
    return {"entries": len(entries), "kept_bytes": kept, "zeroed_bytes": zeroed}


def pack(wheel: Path, archs: set[int], out: Path, part_mib: int = 30) -> dict:
    """Unpack `wheel`, keep `archs` in its CUDA provider library, write the tree as a .tar.xz split into parts
    of `part_mib` MiB under `out`, with pack.json (sha256 of every part, what was kept)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.part*"):
        old.unlink()
    report: dict = {"wheel": wheel.name, "archs": sorted(archs)}
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as z:
        z.extractall(tmp)
        libs = list(Path(tmp).rglob(CUDA_PROVIDER))
        if len(libs) != 1:
            raise ValueError(f"{wheel}: expected one {CUDA_PROVIDER}, found {len(libs)} (an onnxruntime-gpu wheel?)")
        data = bytearray(libs[0].read_bytes())
        report["cuda_provider"] = keep_archs(data, archs)
        libs[0].write_bytes(bytes(data))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(tmp, arcname=".")
        xz = subprocess.run(["xz", "-T0", "-6", "-c"], input=buf.getvalue(), capture_output=True, check=True).stdout
    stem = wheel.name.removesuffix(".whl") + "-sm" + "-".join(map(str, sorted(archs))) + ".tar.xz"
    step = part_mib << 20
    parts = []
    for i in range(0, len(xz), step):
        p = out / f"{stem}.part{i // step:02d}"
        p.write_bytes(xz[i:i + step])
        parts.append({"file": p.name, "bytes": p.stat().st_size, "sha256": hashlib.sha256(xz[i:i + step]).hexdigest()})
    report.update(packed_bytes=len(xz), parts=parts)
    (out / "pack.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheel", type=Path, help="an onnxruntime-gpu wheel (pip download onnxruntime-gpu)")
    ap.add_argument("--arch", type=int, nargs="+", required=True, help="SM versions to keep, e.g. 90 (H100/H200), "
                                                                       "87 (Jetson Orin), 89 (L4/RTX 40)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--part-mib", type=int, default=30)
    args = ap.parse_args(argv)
    r = pack(args.wheel, set(args.arch), args.out, args.part_mib)
    mb = lambda d: {f"sm_{k}": round(v / 1e6, 1) for k, v in sorted(d.items())}  # noqa: E731
    print(f"kept (MB) {mb(r['cuda_provider']['kept_bytes'])}, zeroed {mb(r['cuda_provider']['zeroed_bytes'])}; "
          f"{len(r['parts'])} parts, {r['packed_bytes'] / 2**20:.1f} MiB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
