"""Tensors in an engine's device memory, bound to IO bindings by address.

A decode request's long-lived buffers (the KV cache, the last hidden state, each head's logits) are
allocated once, on the device the sessions run on, and every IO binding names them by (device, address,
dtype, shape). Only the allocation depends on the device:
- "cpu": a numpy array owns the memory, and `host()` is that memory (the numpy sampler reads logits in place);
- any other device ("cuda"): an onnxruntime `OrtValue` owns it, so the KV cache, the hidden state and the
  logits never leave the GPU; `host()` copies (the GPU sampler reads the logits by address instead).
`allocate(..., owner="ortvalue")` takes the second route on "cpu" too, so the CPU tests run the allocation
and binding code that a GPU uses, with a different device string.
"""
from __future__ import annotations

import math

import numpy as np

from ..manifest import EngineError

OWNERS = ("auto", "numpy", "ortvalue")


class DeviceArray:
    """A C-contiguous tensor at `address` on (`device`, `device_id`); `_memory` keeps the allocation alive: the
    owning numpy array or OrtValue, shared by views. A plain class with slots: the portable graph's runner
    makes 4 views per layer every decode step, so a view computes only its address (its host view, for
    numpy memory, is made when first asked for)."""
    __slots__ = ("device", "device_id", "dtype", "shape", "address", "_memory", "_offset", "_host")

    def __init__(self, device: str, device_id: int, dtype: np.dtype, shape: tuple[int, ...], address: int,
                 memory: object, offset: int = 0):
        self.device, self.device_id, self.dtype, self.shape = device, device_id, dtype, shape
        self.address, self._memory, self._offset = address, memory, offset  # offset: elements into the memory
        self._host: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"DeviceArray({self.device}:{self.device_id}, {self.dtype}, {list(self.shape)}, 0x{self.address:x})"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def view(self, offset: int, shape: tuple[int, ...]) -> "DeviceArray":
        """Elements [offset, offset + prod(shape)) of this array (flat, C order), as a `shape` tensor."""
        n = math.prod(shape)
        if offset < 0 or offset + n > self.size:
            raise EngineError(f"device buffer: view of {n} elements at {offset} is outside its {self.size}")
        return DeviceArray(self.device, self.device_id, self.dtype, tuple(shape),
                           self.address + offset * self.dtype.itemsize, self._memory, self._offset + offset)

    @property
    def on_host(self) -> bool:
        """True if numpy owns the memory: `host()` is the buffer itself, and writing to it writes the buffer."""
        return isinstance(self._memory, np.ndarray)

    def write(self, values: np.ndarray) -> None:
        """Copy host `values` (this array's shape; cast to its dtype) into the buffer, at the same address: in
        place for numpy memory, `OrtValue.update_inplace` for an OrtValue (a host-to-device copy on a GPU).
        An OrtValue is written whole: a view of part of one is refused."""
        values = np.asarray(values)
        if values.shape != self.shape:
            raise EngineError(f"device buffer: writing {list(values.shape)} into a {list(self.shape)} buffer")
        if self.on_host:
            np.copyto(self.host(), values, casting="same_kind")
            return
        if self._offset or self.size != math.prod(self._memory.shape()):
            raise EngineError("device buffer: only a whole OrtValue-owned buffer can be written, not a view")
        self._memory.update_inplace(np.ascontiguousarray(values, dtype=self.dtype))

    def host(self) -> np.ndarray:
        """The values on the host: numpy-owned memory itself (the same object every call, written in place by
        the next run), else a copy."""
        if self.on_host:
            if self._host is None:
                self._host = self._memory.reshape(-1)[self._offset:self._offset + self.size].reshape(self.shape)
            return self._host
        flat = self._memory.numpy().reshape(-1)  # an OrtValue: copy the allocation, then cut this view out
        return flat[self._offset:self._offset + self.size].reshape(self.shape).copy()


def allocate(shape: tuple[int, ...], dtype, device: str = "cpu", device_id: int = 0,
             owner: str = "auto") -> DeviceArray:
    """A zero-filled `shape` tensor on the device. `owner` "auto": numpy on "cpu", an OrtValue elsewhere."""
    if owner not in OWNERS:
        raise EngineError(f"device buffer: owner (SessionOptions.buffers) must be one of {OWNERS}, got {owner!r}")
    dtype = np.dtype(dtype)
    zeros = np.zeros(shape, dtype)
    if owner == "numpy" or (owner == "auto" and device == "cpu"):
        if device != "cpu":
            raise EngineError(f"device buffer: numpy memory is host memory, but the device is {device!r}")
        return DeviceArray(device, device_id, dtype, tuple(shape), zeros.ctypes.data, zeros)
    import onnxruntime as ort

    try:
        value = ort.OrtValue.ortvalue_from_numpy(zeros, device, device_id)  # copies to the device
    except Exception as e:  # onnxruntime's own error types
        raise EngineError(f"device buffer: cannot allocate {list(shape)} {dtype} on {device}:{device_id}: "
                          f"{str(e).splitlines()[0][:200]}; is onnxruntime-gpu installed for this device?") from None
    # on "cpu" the OrtValue wraps `zeros` itself and holds a reference to it
    return DeviceArray(device, device_id, dtype, tuple(shape), value.data_ptr(), value)
