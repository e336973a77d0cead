"""Loading and launching ``sampling.cu``: cubin-or-NVRTC choice, argument packing, :class:`GpuSampler`.

Binding: pycuda if importable, else cuda-python (``cuda.bindings.driver`` / ``cuda.cuda``). All imports
are lazy; the pure functions here (:func:`choose_kernel_source`, :func:`pack_launch`,
:func:`workspace_bytes`, :func:`shared_memory_bytes`) need numpy only and are unit-tested without a GPU.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from ..sampler import SamplingParams
from .build import (BLOCK, DEFAULT_OUT, ENTRY_POINTS, GREEDY_MAX_ROWS, GREEDY_SLICE, KMAX, nvrtc_compile,
                    source_sha256)


class CudaUnavailableError(RuntimeError):
    """No usable CUDA binding / driver / kernel image."""


# ----------------------------------------------------------------------------------------------------
# cubin or NVRTC
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelChoice:
    kind: str  # "cubin" | "nvrtc"
    arch: int  # the sm the image is built for
    path: Path | None = None
    reason: str = ""


def choose_kernel_source(sm: int, driver_version: int, manifest: dict | None, build_dir: Path = DEFAULT_OUT
                         ) -> KernelChoice:
    """A prebuilt cubin when one runs on ``sm`` (same major, built minor <= device minor), was built from this
    sampling.cu (its launch arguments are the ones this module passes), and the driver's CUDA version
    (``cuDriverGetVersion``: 12040 = 12.4) is >= the toolkit that built it; else NVRTC."""
    if not manifest or not manifest.get("cubins"):
        return KernelChoice("nvrtc", sm, reason="no prebuilt cubins")
    if manifest.get("source_sha256") != source_sha256():
        return KernelChoice("nvrtc", sm, reason="the cubins were built from another sampling.cu (rebuild them: "
                                                "make kernels)")
    built = int(manifest.get("cuda_version", 0))
    if driver_version < built:
        return KernelChoice("nvrtc", sm, reason=f"driver CUDA {driver_version} < build CUDA {built}")
    fits = [int(a) for a in manifest["cubins"] if int(a) // 10 == sm // 10 and int(a) <= sm]
    if not fits:
        return KernelChoice("nvrtc", sm, reason=f"no cubin for sm_{sm} (have {sorted(manifest['cubins'])})")
    a = max(fits)
    return KernelChoice("cubin", a, Path(build_dir) / manifest["cubins"][str(a)], reason="prebuilt")


def read_manifest(build_dir: Path = DEFAULT_OUT) -> dict | None:
    f = Path(build_dir) / "manifest.json"
    return json.loads(f.read_text()) if f.is_file() else None


# ----------------------------------------------------------------------------------------------------
# sizes and argument packing
# ----------------------------------------------------------------------------------------------------
def shared_memory_bytes(block: int = BLOCK, kmax: int = KMAX) -> int:
    """Static shared memory of one block (the ``Shared`` struct): independent of V and k."""
    nw = block // 32
    n = kmax * 4 * 2 + (nw + 1) * 8 + (nw + 1) * 4 + nw * 4 + nw * 4 + 256 * 4 + 4 * 4
    return (n + 7) // 8 * 8


def greedy_shared_memory_bytes(block: int = BLOCK) -> int:
    """Static shared memory of a greedy block (``GreedyShared``): the slice's penalty bitmap and reductions."""
    nw = block // 32
    return GREEDY_SLICE // 32 * 4 + nw * 4 + nw * 4 + (nw + 1) * 4 + 4


def workspace_bytes(rows: int, v: int) -> int:
    """Global scratch: per output row the combined logits and a kept-set spill area (3 x 4 B x V)."""
    return rows * 3 * 4 * v


def greedy_workspace_bytes(rows: int, v: int) -> int:
    """The greedy entry points' scratch: GREEDY_MAX_ROWS counters, then 4 words per row and slice."""
    return 4 * (GREEDY_MAX_ROWS + 4 * rows * -(-v // GREEDY_SLICE))


@dataclass
class LaunchArgs:
    """Host arrays and scalars for one launch (device copies are made by the binding)."""
    cond_row: np.ndarray     # int32 [rows]: input row of each output's cond logits
    uncond_row: np.ndarray   # int32 [rows]: input row of its uncond logits, -1 = none
    params: np.ndarray       # float64 [rows, 4]: temperature, top_p, cfg_scale, repetition_penalty
    top_k: np.ndarray        # int32 [rows]
    uniforms: np.ndarray     # float64 [rows]
    pen_offsets: np.ndarray  # int32 [rows + 1]
    pen_ids: np.ndarray      # int32 [total] global token ids (the kernel subtracts range_start)
    bans: np.ndarray         # int32 [n, 2] global [start, stop) id ranges every row must not emit
    range_start: int
    v: int
    grid: tuple[int, int, int]
    block: tuple[int, int, int]


@dataclass(frozen=True)
class StepAdvance:
    """Where the kernel advances the next decode step's inputs (sampling.cu's advance_step): the int64
    positions [B, 1] and attention mask [B, mask_stride] device addresses, and the mask slot every row takes
    (>= 0: rows that end together) or -1 (each row's new position: right padding). positions 0: none."""
    positions: int
    mask: int
    mask_stride: int
    mask_slot: int


ARGUMENT_ARRAYS = ("cond_row", "uncond_row", "params", "top_k", "uniforms", "pen_offsets", "pen_ids", "bans")
ARGUMENT_ALIGN = 8  # bytes: the widest element (float64 params, uniforms)


def pack_arguments(la: LaunchArgs) -> tuple[np.ndarray, dict[str, int]]:
    """`la`'s argument arrays in one host buffer, each at an ARGUMENT_ALIGN-aligned offset, so that one
    host-to-device copy uploads them all (a copy costs microseconds however small it is, and a launch has
    eight arrays). Returns (uint8 buffer, array name -> byte offset); the kernel gets base + offset."""
    offsets, size = {}, 0
    for name in ARGUMENT_ARRAYS:
        offsets[name] = size
        size += -(-getattr(la, name).nbytes // ARGUMENT_ALIGN) * ARGUMENT_ALIGN
    host = np.zeros(max(size, ARGUMENT_ALIGN), np.uint8)
    for name in ARGUMENT_ARRAYS:
        raw = np.ascontiguousarray(getattr(la, name)).view(np.uint8).reshape(-1)  # the array's bytes
        host[offsets[name]:offsets[name] + raw.size] = raw
    return host, offsets


def pack_launch(rows: int, params: SamplingParams | Sequence[SamplingParams], uniforms, *, v: int,
                range_start: int = 0, has_uncond: bool = False,
                generated_ids_per_row: Sequence[Sequence[int]] | None = None,
                banned: Sequence[tuple[int, int]] = ()) -> LaunchArgs:
    """Arrays for ``rows`` outputs whose cond logits are input rows ``0..rows-1`` and, with ``has_uncond``,
    uncond logits rows ``rows..2*rows-1`` (``guided_sample``'s layout of ``[cond; uncond]``). ``banned``:
    global ``[start, stop)`` id ranges set to -inf in every row (``grammar.text_banned_ranges``)."""
    ps = [params] * rows if isinstance(params, SamplingParams) else list(params)
    if len(ps) != rows:
        raise ValueError(f"params: expected {rows} entries, got {len(ps)}")
    if any(p.temperature > 0 for p in ps):
        if uniforms is None:
            raise ValueError("uniforms: required when temperature > 0 (one float in [0, 1) per row)")
        us = np.asarray(uniforms, dtype=np.float64).reshape(-1)
        if us.shape != (rows,) or not ((us >= 0) & (us < 1)).all():
            raise ValueError(f"uniforms: expected {rows} values in [0, 1), got {uniforms!r}")
    else:
        us = np.zeros(rows)
    if generated_ids_per_row is not None and len(generated_ids_per_row) != rows:
        raise ValueError(f"generated_ids_per_row: expected {rows} lists, got {len(generated_ids_per_row)}")
    bans = np.asarray(list(banned), dtype=np.int64).reshape(-1, 2)
    if (bans[:, 0] > bans[:, 1]).any() or (bans < 0).any() or (bans >= 2 ** 31).any():
        raise ValueError(f"banned: expected [start, stop) ranges with 0 <= start <= stop < 2**31, got {banned!r}")
    uses_cfg = has_uncond and any(p.cfg_scale != 1.0 for p in ps)
    cond_row = np.arange(rows, dtype=np.int32)
    uncond_row = (np.arange(rows, 2 * rows, dtype=np.int32) if uses_cfg else np.full(rows, -1, np.int32))
    par = np.array([[p.temperature, p.top_p, p.cfg_scale, p.repetition_penalty] for p in ps], dtype=np.float64)
    offs = [0]
    ids: list[np.ndarray] = []
    for r in range(rows):
        g = (np.asarray(generated_ids_per_row[r], dtype=np.int64).reshape(-1)
             if generated_ids_per_row is not None and ps[r].repetition_penalty != 1.0 else np.zeros(0, np.int64))
        g = g[(g >= range_start) & (g < range_start + v)]
        ids.append(g.astype(np.int32))
        offs.append(offs[-1] + g.size)
    return LaunchArgs(cond_row, uncond_row, par, np.array([p.top_k for p in ps], dtype=np.int32), us,
                      np.array(offs, dtype=np.int32), np.concatenate(ids) if ids else np.zeros(0, np.int32),
                      bans.astype(np.int32), int(range_start), int(v), (rows, 1, 1), (BLOCK, 1, 1))


# ----------------------------------------------------------------------------------------------------
# bindings (lazy)
# ----------------------------------------------------------------------------------------------------
PYCUDA_FORMAT = {"i64": "q", "i32": "i", "ptr": "P"}  # pycuda's prepare() struct codes per argument kind
# CU_STREAM_NON_BLOCKING, as onnxruntime makes its own streams: the sessions that take this stream then run
# (and capture CUDA graphs) as they do on theirs, with no implicit ordering against the legacy default
# stream. What the sampler puts on it (uploads, memsets, launches, reads) goes through the stream itself;
# the host's synchronous copies into the step's buffers (OrtValue writes) come after a token's read, when
# nothing is in flight on it.
STREAM_FLAGS = 1
EVENT_DISABLE_TIMING = 2  # CU_EVENT_DISABLE_TIMING: the token reads' events only order, they time nothing
READ_SLOTS = 4  # token reads that may be queued and not yet waited for (GpuSampler.read_async)


class _Staging:
    """Page-locked host memory for a binding's copies on a stream. An upload on a stream from pageable
    memory may wait for the stream's earlier work (CUDA's API synchronization notes), which is the decode
    step's llm and head runs: the argument upload goes through page-locked memory instead, which must then
    stay as it is until the copy is done. So every upload takes a chunk of its own, tagged with the current
    *epoch*: the number of the next token read queued on the stream (`close`, called by the binding's
    `dtoh_async`). Once that read has been waited for, everything queued before it is done: `release(epoch)`
    returns the chunks of that epoch and earlier, and `synchronized` (the stream was synchronized) returns
    all. Chunks are pooled by size (powers of two), so a decode loop allocates page-locked memory only in its
    first steps. The synchronous token read comes back through `down`."""

    MIN_CHUNK = 256  # bytes: one launch's arguments fit (eight small arrays)

    def __init__(self, pinned):
        self._pinned = pinned  # nbytes -> page-locked uint8 array
        self._free: dict[int, list[np.ndarray]] = {}  # chunk size -> chunks no copy reads
        self._busy: list[tuple[int, np.ndarray]] = []  # (epoch, chunk) that copies in flight may read
        self.epoch = 0
        self.down = pinned(64)

    def up(self, arr: np.ndarray) -> np.ndarray:
        """`arr`'s bytes in page-locked memory no copy in flight reads."""
        raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
        size = max(self.MIN_CHUNK, 1 << max(raw.size - 1, 0).bit_length())
        pool = self._free.get(size)
        chunk = pool.pop() if pool else self._pinned(size)
        self._busy.append((self.epoch, chunk))
        view = chunk[:raw.size]
        view[:] = raw
        return view

    def close(self) -> int:
        """A token read was queued behind the uploads of the current epoch: returns that epoch (what
        `release` takes once the read is waited for) and starts the next."""
        self.epoch += 1
        return self.epoch - 1

    def release(self, epoch: int) -> None:
        """The read that closed `epoch` is done: so are the copies of that epoch and earlier."""
        busy = []
        for e, chunk in self._busy:
            if e <= epoch:
                self._free.setdefault(chunk.size, []).append(chunk)
            else:
                busy.append((e, chunk))
        self._busy = busy

    def synchronized(self) -> None:
        """The stream was synchronized: no copy reads the staging memory any more."""
        self.release(self.epoch)


class _PyCuda:
    name = "pycuda"

    def __init__(self):
        import atexit

        import pycuda.driver as drv
        self.drv = drv
        drv.init()
        dev = drv.Device(0)
        # device 0's primary context, not a new one (pycuda.autoinit's): onnxruntime's CUDA provider allocates
        # the head's logits there, and the kernel reads them in place (as _CudaPython does)
        self.ctx = dev.retain_primary_context()
        self.ctx.push()
        atexit.register(self.ctx.pop)
        self.sm = dev.compute_capability()[0] * 10 + dev.compute_capability()[1]
        self.driver_version = drv.get_driver_version()
        self._prepared: set[int] = set()  # id() of the functions prepared with their argument format
        self._staging: _Staging | None = None

    def make_stream(self):
        """A new stream in the primary context and its handle (STREAM_FLAGS)."""
        stream = self.drv.Stream(flags=STREAM_FLAGS)
        return stream, int(stream.handle)

    def pinned(self, nbytes: int) -> np.ndarray:
        """`nbytes` of page-locked host memory (uint8)."""
        return self.drv.pagelocked_empty(int(nbytes), np.uint8)

    def _stage(self) -> _Staging:
        if self._staging is None:
            self._staging = _Staging(self.pinned)
        return self._staging

    def make_event(self):
        """An event for `dtoh_async` / `wait` (no timing: cheaper to record)."""
        return self.drv.Event(self.drv.event_flags.DISABLE_TIMING)

    def dtoh_async(self, arr, src, stream, event) -> int:
        """Device to page-locked `arr` on `stream`, after its earlier work, the host not waiting; `event`
        recorded behind it. Returns the staging epoch the copy closes (`wait` takes it)."""
        self.drv.memcpy_dtoh_async(arr, src, stream)
        event.record(stream)
        return self._stage().close()

    def wait(self, event, epoch: int) -> None:
        """The host waits for `event` (a `dtoh_async`'s): that copy and everything before it are done."""
        event.synchronize()
        self._stage().release(epoch)

    def load(self, image: bytes, names):
        mod = self.drv.module_from_buffer(image)
        self._mod = mod
        return {k: mod.get_function(n) for k, n in names.items()}

    def alloc(self, nbytes):
        return self.drv.mem_alloc(max(int(nbytes), 8))

    def htod(self, dst, arr, stream=None):
        """Host to device; on `stream`: ordered after its earlier work, the host not waiting for it."""
        if not arr.nbytes:
            return
        if stream is None:
            self.drv.memcpy_htod(dst, np.ascontiguousarray(arr))
        else:
            self.drv.memcpy_htod_async(dst, self._stage().up(arr), stream)

    def zero(self, dst, nbytes, stream=None):
        if stream is None:
            self.drv.memset_d8(dst, 0, int(nbytes))
        else:
            self.drv.memset_d8_async(dst, 0, int(nbytes), stream)

    def dtoh(self, arr, src, stream=None):
        """Device to host; on `stream`: after its earlier work, the host waiting for it (the one
        synchronization of a decode step)."""
        if stream is None:
            self.drv.memcpy_dtoh(arr, src)
            return
        stage = self._stage()
        if arr.nbytes > stage.down.size:
            stage.down = self.pinned(arr.nbytes)
        down = stage.down[:arr.nbytes]
        self.drv.memcpy_dtoh_async(down, src, stream)
        stream.synchronize()
        stage.synchronized()
        arr.view(np.uint8).reshape(-1)[:] = down

    def ptr(self, buf):
        return int(buf)

    def free(self, buf):
        buf.free()

    def launch(self, fn, grid, block, args, stream=None):
        # a prepared call packs the arguments by a format fixed once per function (pycuda's plain call
        # inspects every argument at every launch: ~30 us a step under cProfile on the H100's host,
        # docs/gpu.md). No synchronize: the caller's copy back (dtoh) on the same stream waits for it.
        if id(fn) not in self._prepared:  # a function's arguments have the same kinds at every launch
            fn.prepare("".join(PYCUDA_FORMAT[t] for t, _ in args))
            self._prepared.add(id(fn))
        values = [int(a) for _, a in args]
        if stream is None:
            fn.prepared_call(grid, block, *values)
        else:
            fn.prepared_async_call(grid, block, stream, *values)


class _CudaPython:
    name = "cuda-python"

    def __init__(self):
        try:
            from cuda.bindings import driver as cu
        except ImportError:
            from cuda import cuda as cu
        self.cu = cu
        self._check(cu.cuInit(0))
        dev = self._check(cu.cuDeviceGet(0))
        self.ctx = self._check(cu.cuDevicePrimaryCtxRetain(dev))
        self._check(cu.cuCtxSetCurrent(self.ctx))
        a = cu.CUdevice_attribute
        major = self._check(cu.cuDeviceGetAttribute(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev))
        minor = self._check(cu.cuDeviceGetAttribute(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev))
        self.sm = major * 10 + minor
        self.driver_version = self._check(cu.cuDriverGetVersion())
        self._staging: _Staging | None = None

    @staticmethod
    def _check(res):
        err, *rest = res if isinstance(res, tuple) else (res,)
        if int(err) != 0:
            raise CudaUnavailableError(f"CUDA driver error {err}")
        return rest[0] if len(rest) == 1 else (tuple(rest) or None)

    def make_stream(self):
        """A new stream in the primary context and its handle (STREAM_FLAGS)."""
        stream = self._check(self.cu.cuStreamCreate(STREAM_FLAGS))
        return stream, int(stream)

    def pinned(self, nbytes: int) -> np.ndarray:
        """`nbytes` of page-locked host memory (uint8), freed with the process."""
        import ctypes

        nbytes = int(nbytes)
        address = int(self._check(self.cu.cuMemHostAlloc(nbytes, 0)))
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(address))

    def _stage(self) -> _Staging:
        if self._staging is None:
            self._staging = _Staging(self.pinned)
        return self._staging

    def make_event(self):
        """An event for `dtoh_async` / `wait` (CU_EVENT_DISABLE_TIMING: cheaper to record)."""
        return self._check(self.cu.cuEventCreate(EVENT_DISABLE_TIMING))

    def dtoh_async(self, arr, src, stream, event) -> int:
        """Device to page-locked `arr` on `stream`, after its earlier work, the host not waiting; `event`
        recorded behind it. Returns the staging epoch the copy closes (`wait` takes it)."""
        self._check(self.cu.cuMemcpyDtoHAsync(arr.ctypes.data, src, arr.nbytes, stream))
        self._check(self.cu.cuEventRecord(event, stream))
        return self._stage().close()

    def wait(self, event, epoch: int) -> None:
        """The host waits for `event` (a `dtoh_async`'s): that copy and everything before it are done."""
        self._check(self.cu.cuEventSynchronize(event))
        self._stage().release(epoch)

    def load(self, image: bytes, names):
        self._mod = self._check(self.cu.cuModuleLoadData(image))
        return {k: self._check(self.cu.cuModuleGetFunction(self._mod, n.encode())) for k, n in names.items()}

    def alloc(self, nbytes):
        return self._check(self.cu.cuMemAlloc(max(int(nbytes), 8)))

    def htod(self, dst, arr, stream=None):
        arr = np.ascontiguousarray(arr)
        if not arr.nbytes:
            return
        if stream is None:
            self._check(self.cu.cuMemcpyHtoD(dst, arr.ctypes.data, arr.nbytes))
        else:
            up = self._stage().up(arr)
            self._check(self.cu.cuMemcpyHtoDAsync(dst, up.ctypes.data, up.nbytes, stream))

    def zero(self, dst, nbytes, stream=None):
        if stream is None:
            self._check(self.cu.cuMemsetD8(dst, 0, int(nbytes)))
        else:
            self._check(self.cu.cuMemsetD8Async(dst, 0, int(nbytes), stream))

    def dtoh(self, arr, src, stream=None):
        if stream is None:
            self._check(self.cu.cuMemcpyDtoH(arr.ctypes.data, src, arr.nbytes))
            return
        stage = self._stage()
        if arr.nbytes > stage.down.size:
            stage.down = self.pinned(arr.nbytes)
        down = stage.down[:arr.nbytes]
        self._check(self.cu.cuMemcpyDtoHAsync(down.ctypes.data, src, arr.nbytes, stream))
        self._check(self.cu.cuStreamSynchronize(stream))
        stage.synchronized()
        arr.view(np.uint8).reshape(-1)[:] = down

    def ptr(self, buf):
        return int(buf)

    def free(self, buf):
        self._check(self.cu.cuMemFree(buf))

    def launch(self, fn, grid, block, args, stream=None):
        import ctypes
        ct = {"i64": ctypes.c_longlong, "i32": ctypes.c_int, "ptr": ctypes.c_void_p}
        vals = tuple(int(a) for _, a in args)
        types = tuple(ct[t] for t, _ in args)
        # no synchronize: the caller's copy back (dtoh) on the same stream waits for the kernel
        self._check(self.cu.cuLaunchKernel(fn, *grid, *block, 0, stream or 0, (vals, types), 0))


def _binding():
    """pycuda, else cuda-python; a binding that is missing or cannot reach a driver (pycuda raises its own
    error types from cuInit) falls through to the next, and CudaUnavailableError names both."""
    errors = []
    for name, make in (("pycuda", _PyCuda), ("cuda-python", _CudaPython)):
        try:
            return make()
        except Exception as e:  # ImportError, CudaUnavailableError, pycuda.driver.Error
            errors.append(f"{name}: {type(e).__name__}: {e}")
    raise CudaUnavailableError("the CUDA sampling kernel needs pycuda or cuda-python (neither is usable: "
                               + "; ".join(errors) + ")")


def load_kernel(build_dir: Path = DEFAULT_OUT, binding=None):
    """(binding, {"float32": fn, "float16": fn}, KernelChoice) for the current device."""
    b = binding or _binding()
    choice = choose_kernel_source(b.sm, b.driver_version, read_manifest(build_dir), build_dir)
    image = choice.path.read_bytes() if choice.kind == "cubin" else nvrtc_compile(choice.arch)
    return b, b.load(image, ENTRY_POINTS), choice


# ----------------------------------------------------------------------------------------------------
# the sampler
# ----------------------------------------------------------------------------------------------------
class _QueuedRead(NamedTuple):
    """A token read not yet waited for: page-locked `slot` and the binding's `epoch` for its event, or, on a
    sampler without its own stream (read at once), the token `value` itself."""
    slot: int = -1
    epoch: int = 0
    value: int | None = None


class GpuSampler:
    """The kernel behind ``guided_sample``'s interface. ``sample`` takes host arrays (tests, parity);
    ``sample_device`` takes the head's device logits buffer and writes ids into a device int64 buffer, and
    ``read`` brings a token back.

    With ``stream`` (the default) the sampler makes its own CUDA stream and puts its uploads, launches and
    reads there; ``stream_handle`` is what onnxruntime takes as ``user_compute_stream``
    (``SessionOptions.compute_stream``), so that the engine's runs, the kernel and the read are ordered on
    one stream and a decode step synchronizes the host once, in ``read`` (docs/gpu.md, "One stream for the
    decode step"). ``read_async`` queues a token's read without waiting and ``wait`` takes it later, so that
    the host can queue the next decode step first (docs/gpu.md, "Reading a token one step late")."""

    memory = "cuda"  # the logits and token buffers it takes by address (decode_loops.DevicePick checks)
    many_block_greedy = True  # greedy launches on the greedy entry points (False: a block a row, for A/B timing)

    def __init__(self, build_dir: Path = DEFAULT_OUT, binding=None, stream: bool = True):
        self.binding, self.functions, self.choice = load_kernel(build_dir, binding)
        self._stream, self.stream_handle = self.binding.make_stream() if stream else (None, None)
        self._bufs: dict[str, tuple[object, int]] = {}  # name -> (device buffer, bytes): kept across launches
        self._uploaded: bytes | None = None  # the argument bytes the "arguments" buffer holds
        self._issued = 0  # token reads queued so far (read_async's tickets are their numbers)
        self._queued: dict[int, _QueuedRead] = {}  # ticket -> the read, for reads not yet waited for
        self._slots = self._events = None  # READ_SLOTS page-locked int64 and their events, made on first use

    def _buffer(self, name: str, nbytes: int, zeroed: bool = False):
        """Device buffer `name` of at least `nbytes`, reused by every launch (the image loop launches once
        per sampled token); grown (the old one freed) when a launch needs more; `zeroed`: filled with zeros
        when allocated (the greedy entry points' counters, which each launch leaves at zero)."""
        buf, have = self._bufs.get(name, (None, -1))
        if nbytes > have:
            if buf is not None:
                self.binding.free(buf)
            buf = self.binding.alloc(nbytes)
            self._bufs[name] = buf, max(int(nbytes), 8)
            if zeroed:
                self.binding.zero(buf, max(int(nbytes), 8), self._stream)
            if name == "arguments":
                self._uploaded = None
        return buf

    def sample_device(self, logits_ptr: int, dtype: str, row_stride: int, col0: int, la: LaunchArgs,
                      out_ptr: int, out_stride: int = 1, out_copies: int = 1,
                      advance: StepAdvance | None = None) -> None:
        """One launch: output row r's token id goes to int64 slots ``out_ptr[r * out_stride + c]``, c <
        ``out_copies`` (the next step's input_ids: ``out_copies`` = 2 writes a CFG pair's token into both of its
        LLM rows). With ``advance``, those rows' positions and attention mask are advanced for the next step
        too (sampling.cu's advance_step)."""
        b = self.binding
        host, offsets = pack_arguments(la)
        arguments = self._buffer("arguments", host.nbytes)
        raw = host.tobytes()
        if raw != self._uploaded:  # one copy for the eight argument arrays, none when a launch repeats the
            b.htod(arguments, host, self._stream)  # last one's (greedy text steps without a penalty: every step)
            self._uploaded = raw
        base = b.ptr(arguments)
        rows, fn, grid = la.grid[0], self.functions[dtype], la.grid
        if self.many_block_greedy and (la.params[:, 0] == 0).all() and rows <= GREEDY_MAX_ROWS:  # many blocks
            slices = -(-la.v // GREEDY_SLICE)
            fn, grid = self.functions[f"greedy_{dtype}"], (rows, slices, 1)
            ws = self._buffer("greedy", greedy_workspace_bytes(rows, la.v), zeroed=True)
        else:
            ws = self._buffer("workspace", workspace_bytes(rows, la.v))
        P = lambda n: ("ptr", base + offsets[n])  # noqa: E731
        args = [("ptr", logits_ptr), ("i64", row_stride), ("i32", col0), ("i32", la.v), P("cond_row"),
                P("uncond_row"), P("params"), P("top_k"), P("uniforms"), P("pen_offsets"), P("pen_ids"),
                P("bans"), ("i32", la.bans.shape[0]), ("i64", la.range_start), ("ptr", out_ptr),
                ("i64", out_stride), ("i32", out_copies), ("ptr", b.ptr(ws))]
        adv = advance or StepAdvance(0, 0, 0, -1)
        args += [("ptr", adv.positions), ("ptr", adv.mask), ("i64", adv.mask_stride), ("i64", adv.mask_slot)]
        b.launch(fn, grid, la.block, args, self._stream)

    def read(self, host: np.ndarray, src) -> None:
        """Device buffer or address `src` into `host` after everything on the sampler's stream (the engine's
        runs too, where they share it): the host waits here."""
        self.binding.dtoh(host, src, self._stream)

    def read_async(self, src) -> int:
        """Queue the copy of the int64 at device buffer or address `src` to the host behind everything on the
        sampler's stream, without waiting; returns a ticket for `wait`. Up to READ_SLOTS reads may be queued.
        Without a stream of its own the read is synchronous and `wait` only hands its value over."""
        ticket = self._issued
        if len(self._queued) >= READ_SLOTS:
            raise RuntimeError(f"GpuSampler: {READ_SLOTS} token reads queued and not waited for; wait for "
                               f"ticket {min(self._queued)} first")
        if self._stream is None:
            host = np.zeros(1, np.int64)
            self.binding.dtoh(host, src)
            self._queued[ticket] = _QueuedRead(value=int(host[0]))
        else:
            if self._slots is None:
                self._slots = self.binding.pinned(8 * READ_SLOTS).view(np.int64)
                self._events = [self.binding.make_event() for _ in range(READ_SLOTS)]
            slot = min(set(range(READ_SLOTS)) - {q.slot for q in self._queued.values()})  # one no queued read uses
            epoch = self.binding.dtoh_async(self._slots[slot:slot + 1], src, self._stream, self._events[slot])
            self._queued[ticket] = _QueuedRead(slot, epoch)
        self._issued += 1
        return ticket

    def wait(self, ticket: int) -> int:
        """The token of `read_async`'s `ticket`; the host waits for that read (and so for everything queued
        on the stream before it), not for what was queued after."""
        try:
            queued = self._queued.pop(ticket)
        except KeyError:
            raise RuntimeError(f"GpuSampler: no token read {ticket} is queued (issued {self._issued}, queued "
                               f"{sorted(self._queued)})") from None
        if queued.value is not None:
            return queued.value
        self.binding.wait(self._events[queued.slot], queued.epoch)
        return int(self._slots[queued.slot])

    def sample(self, cond: np.ndarray, uncond: np.ndarray | None, params: SamplingParams, uniforms, *,
               range_start: int = 0, generated_ids_per_row=None, banned: Sequence[tuple[int, int]] = ()
               ) -> np.ndarray:
        """Same arguments and result as :func:`illume_edge.runtime.sampler.guided_sample` (indices within
        the range); raises ValueError for a row the kernel flags (NaN/+inf or no finite logit)."""
        cond = np.asarray(cond)
        dtype = "float16" if cond.dtype == np.float16 else "float32"
        cond = cond.astype(np.float16 if dtype == "float16" else np.float32)
        rows, v = cond.shape
        stack = cond if uncond is None else np.concatenate([cond, np.asarray(uncond, dtype=cond.dtype)])
        la = pack_launch(rows, params, uniforms, v=v, range_start=range_start, has_uncond=uncond is not None,
                         generated_ids_per_row=generated_ids_per_row, banned=banned)
        b = self.binding
        dl, do = b.alloc(stack.nbytes), b.alloc(rows * 8)
        out = np.empty(rows, dtype=np.int64)
        try:
            b.htod(dl, stack, self._stream)  # on the sampler's stream, before its launch
            self.sample_device(b.ptr(dl), dtype, v, 0, la, b.ptr(do))
            self.read(out, do)
        finally:
            b.free(dl)
            b.free(do)
        if (out < 0).any():
            raise ValueError(f"logits: row {int(np.flatnonzero(out < 0)[0])} contains NaN/+inf or no finite logit")
        return out - range_start
