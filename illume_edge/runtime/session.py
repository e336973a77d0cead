"""One small onnxruntime session wrapper: validated inputs, clear errors, an IO-binding path.

Every component of an engine runs through `Session`. Inputs are checked against the manifest's contract
(name, dtype, rank, fixed dims, dynamic ranges, dims shared between inputs) *before* onnxruntime sees them,
so a bad call fails with a message naming the component and the input instead of a stack trace from deep
inside the runtime. `run(..., out=)` binds preallocated output buffers (IO binding): the CPU path exercises
the same code that, with a CUDA device string, keeps tensors on the GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from ..manifest import Component, EngineError, TensorSpec
from .device_buffer import DeviceArray, allocate
from .provider_options import ENV as PROVIDER_OPTIONS_ENV
from .provider_options import GPU_PROVIDERS, check_provider_options, provider_list

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
              "bool": np.bool_, "uint8": np.uint8, "int8": np.int8}
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(uint8)": "uint8", "tensor(int8)": "int8"}

PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# onnxruntime-gpu lists TensorrtExecutionProvider whether or not TensorRT is installed; without its runtime
# library every session prints an error and onnxruntime retries without it (seen on an H100 with
# onnxruntime-gpu 1.31.1, docs/gpu.md). onnxruntime-gpu 1.31 links TensorRT 10.
TENSORRT_LIBRARIES = ("libnvinfer.so.10",)


def default_threads() -> int:
    """Physical-ish core count for intra-op parallelism (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def tensorrt_loadable(load=None) -> bool:
    """True if TensorRT's runtime library loads (`load`: ctypes.CDLL, replaceable in tests)."""
    import ctypes

    load = load or ctypes.CDLL
    for lib in TENSORRT_LIBRARIES:
        try:
            load(lib)
            return True
        except OSError:
            continue
    return False


def choose_providers(requested: list[str] | None = None, available: list[str] | None = None,
                     tensorrt_present=tensorrt_loadable) -> list[str]:
    """TensorRT > CUDA > CPU among the installed providers (TensorRT only where its library loads), unless the
    caller (or ILLUME_EDGE_PROVIDERS) says."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    env = os.environ.get("ILLUME_EDGE_PROVIDERS")
    if requested is None and env:
        requested = [p.strip() for p in env.split(",") if p.strip()]
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise EngineError(f"execution provider(s) {missing} not available in this onnxruntime "
                              f"(has {available}); install onnxruntime-gpu for CUDA/TensorRT")
        return list(requested)
    chosen = [p for p in PROVIDER_PREFERENCE if p in available]
    if "TensorrtExecutionProvider" in chosen and not tensorrt_present():
        chosen.remove("TensorrtExecutionProvider")
    return chosen or ["CPUExecutionProvider"]


def shares_kv_buffer(component: Component) -> bool:
    """A fused llm graph: GroupQueryAttention appends to a KV cache bound as both its past input and its
    present output (one buffer per layer; llm_runner.py)."""
    return "GroupQueryAttention" in component.ops and any(
        t.name.startswith("past_key_values.") for t in component.inputs)


def buffer_device(component: Component, requested: str, providers: list[str]) -> str:
    """Where a session's request buffers live: `requested`, except that a fused llm graph run by a GPU provider
    keeps them in GPU memory even when "cpu" was asked. Its attention writes the new slots into the very
    buffer its past came from. Bound in host memory, the cache came back wrong (an H100 repeated the first
    token of every answer; docs/gpu.md): onnxruntime copies past and present through two device buffers,
    and its CUDA kernel, which compares the two pointers, then takes them for two buffers."""
    if requested == "cpu" and providers and providers[0] in GPU_PROVIDERS and shares_kv_buffer(component):
        return "cuda"
    return requested


# onnxruntime's CUDA provider registers GroupQueryAttention for float16 and bfloat16 only (its
# contrib_ops/cuda/bert/group_query_attention.cc). A fused graph whose attention is float32 (an fp32 or
# int4 / int8 engine) would have those nodes placed on the CPU provider: the KV cache copied across the bus
# at every layer of every step, and no CUDA graph (docs/gpu.md).
CUDA_ATTENTION_DTYPES = ("float16", "bfloat16")


def check_cuda_attention(name: str, component: Component, providers: list[str], explicit: bool = True
                         ) -> list[str]:
    """The providers for a session of `component`: unchanged, unless it is a fused graph whose
    GroupQueryAttention the CUDA provider cannot run (CUDA_ATTENTION_DTYPES) and CUDA is among them. Then, if
    CUDA was asked for (`explicit`: SessionOptions.providers, ILLUME_EDGE_PROVIDERS, device "cuda" or CUDA
    graphs), the session is refused, naming the fix; otherwise (the providers this onnxruntime has, buffers
    on the host) it runs on the CPU provider, with a warning, rather than split across the bus."""
    if "CUDAExecutionProvider" not in providers or "GroupQueryAttention" not in component.ops:
        return providers
    kv = next((t for t in component.inputs if t.name.startswith("past_key_values.")), None)
    if kv is None or kv.dtype in CUDA_ATTENTION_DTYPES:
        return providers
    why = (f"{name} ({component.path}): onnxruntime's CUDA provider runs GroupQueryAttention in "
           f"{' / '.join(CUDA_ATTENTION_DTYPES)} only, and this engine's attention and KV cache are {kv.dtype} "
           f"({component.precision} engine)")
    fix = ("export with `illume-edge export --precision fp16` for CUDA (and for int4 / int8 weights, `illume-edge "
           "quantize` that fp16 engine: its activations and cache stay fp16)")
    if explicit:
        raise EngineError(f"{why}: its attention would run on the CPU, copying the cache every step; {fix}, or "
                          f"run this engine on the CPU provider")
    import warnings

    warnings.warn(f"{why}: this session runs on the CPU provider; {fix}", stacklevel=3)
    return ["CPUExecutionProvider"]


@dataclass
class SessionOptions:
    providers: list[str] | None = None
    threads: int | None = None
    device: str = "cpu"  # IO-binding device for outputs: "cpu" or "cuda"
    device_id: int = 0
    # Who owns a request's device buffers (KV cache, hidden state, logits; device_buffer.OWNERS): "auto" is
    # numpy on "cpu" and an OrtValue on a GPU; "ortvalue" on "cpu" runs the GPU's allocation path on the host.
    buffers: str = "auto"
    # Per-session pools only (see thread_pool_mode): how the pool's threads wait for work, one of SPIN_MODES
    # (None: ILLUME_EDGE_SPIN, else "run").
    spin: str | None = None
    # onnxruntime's CPU memory arena (None: ILLUME_EDGE_MEM_ARENA=1 or off). Off by default: the arena keeps
    # every session's largest activations for the life of the process (a 640x480 understanding request left
    # 4.6 GB resident against 1.2 GB without it, at the same speed; docs/performance.md).
    memory_arena: bool | None = None
    # onnxruntime's profiler: each session writes <profile_prefix>-<component>_<time>.json, flushed by
    # Session.end_profiling() (or when the session is freed). Off when None.
    profile_prefix: str | None = None
    # Decode-step CUDA graphs (None: ILLUME_EDGE_CUDA_GRAPH=1, else off), for the components in
    # CUDA_GRAPH_COMPONENTS: the CUDA provider gets enable_cuda_graph, and the runner replays each request's
    # static decode step under a graph id, prefills and multi-token runs outside any graph (llm_runner.py).
    # Without the CUDA provider only the runner's side runs (buffer reuse, graph ids; the CPU ignores them).
    cuda_graph: bool | None = None
    # onnxruntime provider options, provider -> {option: value} (runtime/provider_options.py): over the
    # engine manifest's `provider_options` and ILLUME_EDGE_PROVIDER_OPTIONS
    provider_options: dict[str, dict[str, Any]] | None = None
    # A CUDA stream (its handle) the CUDA and TensorRT providers run on (onnxruntime's user_compute_stream),
    # made by the CUDA sampling kernel (cuda.GpuSampler.stream_handle), so that the decode step's llm run, head run,
    # kernel and token read are ordered on one stream and the runs need not synchronize the host
    # (Session.run_options(synchronize=False), docs/gpu.md "One stream for the decode step"). None: each
    # provider's own stream, every run synchronized.
    compute_stream: int | None = None


# Components whose runs the runtime drives through IO bindings at fixed addresses, so that onnxruntime may
# capture and replay them as CUDA graphs: the decode step. (A component run as session.run(dict) must not be
# captured: its inputs move every run.)
CUDA_GRAPH_COMPONENTS = ("llm",)


# Every engine component is its own session, and a decode step alternates the llm and head sessions. With a
# pool per session (the default), how the pool's threads wait for work decides the decode speed:
#   "run"    busy-wait between the nodes of a run and stop the moment the run returns
#            (session.force_spinning_stop): warm threads inside a run, and a pool that just ran no longer
#            spins on the cores the next session needs. The default.
#   "always" onnxruntime's own default, spinning after the run too: only for a session that runs alone
#            (1.7x slower decode when the llm and head pools spin against each other on 2 cores).
#   "off"    block whenever a worker runs out of work (11% slower int4 decode than "run" on 2 cores).
# ILLUME_EDGE_THREAD_POOL=shared makes every session of the
# process share one intra-op pool, created by the first session with its ``threads`` (another 5-15% on
# decode); onnxruntime then refuses any session in the process that owns a pool (so it is opt-in: other
# onnxruntime users in the same process break). The mode is read when the first session is made.
# docs/performance.md has the measurements.
THREAD_POOL_MODES = ("shared", "per-session")
SPIN_MODES = ("run", "always", "off")
_pool: dict[str, object] = {}


def thread_pool_mode() -> str:
    mode = os.environ.get("ILLUME_EDGE_THREAD_POOL", "per-session")
    if mode not in THREAD_POOL_MODES:
        raise EngineError(f"ILLUME_EDGE_THREAD_POOL={mode!r}: expected one of {THREAD_POOL_MODES}")
    return str(_pool.setdefault("mode", mode))


def _shared_intra_op_pool(threads: int) -> None:
    """Create (once per process) the intra-op pool every session shares."""
    if "threads" in _pool:
        return
    import onnxruntime.capi._pybind_state as ort_c

    try:
        ort_c.set_global_thread_pool_sizes(threads, 1)
    except Exception as e:  # onnxruntime's own error type
        if "already been created" not in str(e):
            raise EngineError(f"cannot create onnxruntime's shared thread pool ({threads} threads): {e}; "
                              f"set ILLUME_EDGE_THREAD_POOL=per-session") from None
    _pool["threads"] = threads


def spin_mode(value: str | None) -> str:
    """The caller's spin mode, else ILLUME_EDGE_SPIN, else "run"; see SPIN_MODES."""
    mode = value if value is not None else os.environ.get("ILLUME_EDGE_SPIN", "run")
    if mode not in SPIN_MODES:
        src = "SessionOptions.spin" if value is not None else "ILLUME_EDGE_SPIN"
        raise EngineError(f"{src}={mode!r}: expected one of {SPIN_MODES}")
    return mode


def _spin_config(mode: str) -> dict[str, str]:
    """onnxruntime session config entries for a per-session pool's spin mode."""
    return {"session.intra_op.allow_spinning": "0" if mode == "off" else "1",
            "session.force_spinning_stop": "1" if mode == "run" else "0"}


def _flag(value: bool | None, env: str) -> bool:
    """An on/off session option: the caller's value, else the environment variable `env` = "1", else off."""
    return value if value is not None else os.environ.get(env, "0") == "1"


class Session:
    def __init__(self, name: str, path: str, component: Component, options: SessionOptions | None = None):
        import onnxruntime as ort

        self.name, self.component = name, component
        opts = options or SessionOptions()
        so = ort.SessionOptions()
        threads = opts.threads or default_threads()
        if thread_pool_mode() == "shared":
            _shared_intra_op_pool(threads)
            so.use_per_session_threads = False
        else:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            for key, value in _spin_config(spin_mode(opts.spin)).items():
                so.add_session_config_entry(key, value)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.enable_cpu_mem_arena = _flag(opts.memory_arena, "ILLUME_EDGE_MEM_ARENA")
        so.log_severity_level = 3
        if opts.profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = f"{opts.profile_prefix}-{name}"
        # CUDA was asked for: by provider, or by keeping the request's buffers in GPU memory (which a session on
        # the CPU provider cannot bind)
        asked = (opts.providers is not None or bool(os.environ.get("ILLUME_EDGE_PROVIDERS"))
                 or opts.device == "cuda" or _flag(opts.cuda_graph, "ILLUME_EDGE_CUDA_GRAPH"))
        self.providers = check_cuda_attention(name, component, choose_providers(opts.providers), explicit=asked)
        self.device = buffer_device(component, opts.device, self.providers)
        self.device_requested = self.device == opts.device  # False: moved to the GPU by buffer_device
        self.device_id, self.buffer_owner = opts.device_id, opts.buffers
        self.cuda_graph = name in CUDA_GRAPH_COMPONENTS and _flag(opts.cuda_graph, "ILLUME_EDGE_CUDA_GRAPH")
        self.compute_stream = opts.compute_stream
        # (CUDA graph id or None, synchronize) -> onnxruntime RunOptions (run_options)
        self._run_opts: dict[tuple[int | None, bool], object] = {}
        try:
            self._sess = ort.InferenceSession(path, so, providers=self._provider_list(opts))
        except Exception as e:  # onnxruntime raises its own exception types for load failures
            given = {p: o for p, o in (opts.provider_options or {}).items() if p in self.providers}
            fix = (f"check the provider options {given} (manifest provider_options, {PROVIDER_OPTIONS_ENV}, "
                   f"--provider-option) or re-export the engine" if given else "re-export the engine")
            raise EngineError(f"{name} ({path}): onnxruntime cannot load it: {str(e).splitlines()[0][:300]}; "
                              f"{fix}") from None
        self.inputs: dict[str, TensorSpec] = {t.name: t for t in component.inputs}
        self.outputs: dict[str, TensorSpec] = {t.name: t for t in component.outputs}
        self._check_contract()
        self.output_names = [o.name for o in self._sess.get_outputs()]

    def _provider_list(self, opts: SessionOptions) -> list:
        """`providers` as onnxruntime takes them, with their options (provider_options.provider_list)."""
        options = check_provider_options(opts.provider_options, "SessionOptions.provider_options")
        return provider_list(self.providers, options, opts.device_id, self.cuda_graph, opts.compute_stream)

    @property
    def shares_stream(self) -> bool:
        """Whether a run may return before the device finishes it: the session runs on a caller's stream
        (SessionOptions.compute_stream) with a GPU provider, so work the caller puts on that stream after
        the run waits for it."""
        return self.compute_stream is not None and self.providers[0] in GPU_PROVIDERS

    def run_options(self, graph_id: int | None, synchronize: bool = True):
        """onnxruntime RunOptions, made once per (graph id, synchronize) (a decode step asks every step):
        `graph_id` replays the run as CUDA graph `graph_id` (>= 1) or keeps it out of any graph (-1), where this
        session has CUDA graphs (else ignored); `synchronize` False lets the run return without waiting for
        the device (disable_synchronize_execution_providers), where the session `shares_stream`: for runs
        whose inputs and outputs all stay in device buffers, read only by work the caller orders on that
        stream (the decode step, `LLMRunner`). None: a plain run."""
        graph = graph_id if self.cuda_graph else None
        sync = synchronize or not self.shares_stream
        if graph is None and sync:
            return None
        key = graph, sync
        if key not in self._run_opts:
            import onnxruntime as ort

            if graph is not None and (graph == 0 or graph < -1):
                raise EngineError(f"{self.name}: CUDA graph id {graph}: use -1 (no graph) or an id >= 1")
            ro = ort.RunOptions()
            if graph is not None:
                ro.add_run_config_entry("gpu_graph_id", str(graph))
            if not sync:
                ro.add_run_config_entry("disable_synchronize_execution_providers", "1")
            self._run_opts[key] = ro
        return self._run_opts[key]

    def _check_contract(self) -> None:
        """The graph's own I/O must be what the manifest says (a swapped file would otherwise run)."""
        for kind, declared, actual in (("input", self.inputs, self._sess.get_inputs()),
                                       ("output", self.outputs, self._sess.get_outputs())):
            got = {a.name: _ORT_TYPES.get(a.type, a.type) for a in actual}
            want = {n: t.dtype for n, t in declared.items()}
            if got != want:
                raise EngineError(f"{self.name}: graph {kind}s {got} differ from the manifest's {want}; "
                                  f"re-export the engine")

    # --- validation -----------------------------------------------------------------------------------
    def validate(self, feeds: Mapping[str, np.ndarray], names: Iterable[str] | None = None,
                 known: Mapping[str, int] | None = None) -> dict[str, dict[str, int]]:
        """Check `feeds` against the input contract: every input present, dtypes, ranks, fixed dims, dynamic
        dims inside their exported ranges and equal wherever a name repeats. Returns each checked input's
        dynamic dims ({input: {dim: size}}).

        With `names`, only those inputs are checked (a binding that rebinds a few inputs per step), their
        dynamic dims against `known` (the dims of the inputs left as they were)."""
        if names is None:
            unknown = sorted(set(feeds) - set(self.inputs))
            missing = sorted(set(self.inputs) - set(feeds))
            names = self.inputs
        else:
            names = list(names)
            unknown, missing = sorted(set(names) - set(self.inputs)), []
        if unknown or missing:
            raise EngineError(f"{self.name}: inputs missing {missing}, unknown {unknown} "
                              f"(expects {sorted(self.inputs)})")
        bound: dict[str, int] = dict(known or {})
        dims: dict[str, dict[str, int]] = {}
        for name in names:
            spec, arr, dims[name] = self.inputs[name], feeds[name], {}
            if not isinstance(arr, (np.ndarray, DeviceArray)):
                raise EngineError(f"{self.name}: input {name} must be a numpy array or DeviceArray, got "
                                  f"{type(arr).__name__}")
            want = _NP_DTYPES[spec.dtype]
            if arr.dtype != want:
                raise EngineError(f"{self.name}: input {name} dtype {arr.dtype}, expected {spec.dtype}")
            if arr.ndim != len(spec.shape):
                raise EngineError(f"{self.name}: input {name} has rank {arr.ndim} (shape {arr.shape}), expected "
                                  f"rank {len(spec.shape)} {list(spec.shape)}")
            for axis, (dim, size) in enumerate(zip(spec.shape, arr.shape)):
                if isinstance(dim, int):
                    if dim != size:
                        raise EngineError(f"{self.name}: input {name} dim {axis} is {size}, expected {dim}")
                    continue
                lo_hi = self.component.dynamic_ranges.get(dim)
                if lo_hi is not None and (size < lo_hi[0] or (lo_hi[1] is not None and size > lo_hi[1])):
                    raise EngineError(f"{self.name}: input {name} dim {axis} ({dim}) is {size}, outside the "
                                      f"exported range [{lo_hi[0]}, {lo_hi[1]}]; re-export with a wider range")
                if dim in bound and bound[dim] != size:
                    raise EngineError(f"{self.name}: input {name} dim {axis} ({dim}) is {size} but another input "
                                      f"has {dim}={bound[dim]}")
                bound[dim] = dims[name][dim] = size
        return dims

    # --- running --------------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray] | None = None,
            outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the graph. `out` preallocates output buffers (IO binding); others are allocated by ORT.
        `DeviceArray` inputs are bound by address (IO binding)."""
        if out is None and self.device == "cpu" and not any(isinstance(a, DeviceArray) for a in feeds.values()):
            self.validate(feeds)
            names = outputs or self.output_names
            try:
                return dict(zip(names, self._sess.run(names, dict(feeds))))
            except Exception as e:  # onnxruntime's own error types
                raise EngineError(f"{self.name}: onnxruntime failed: {str(e).splitlines()[0][:300]}") from None
        binding = self.binding()
        binding.bind_inputs(feeds)
        binding.bind_outputs(out or {}, outputs or self.output_names)
        return binding.run()

    def end_profiling(self) -> str:
        """Stop the profiler (SessionOptions.profile_prefix) and return its JSON file's path."""
        return self._sess.end_profiling()

    def output_dtype(self, name: str) -> type:
        """Output `name`'s numpy dtype, from the contract."""
        if name not in self.outputs:
            raise EngineError(f"{self.name}: no output {name} (has {sorted(self.outputs)})")
        return _NP_DTYPES[self.outputs[name].dtype]

    def allocate(self, shape: tuple[int, ...], dtype) -> DeviceArray:
        """A zero-filled buffer on this session's IO-binding device (`device_buffer.allocate`)."""
        return allocate(shape, dtype, self.device, self.device_id, self.buffer_owner)

    def binding(self) -> "Binding":
        """A reusable IO binding of this session (see `Binding`)."""
        return Binding(self)


class Binding:
    """An IO binding that lives across runs: what is bound stays bound, so a decode loop rebinds only the
    tensors that change each step (token ids, mask, positions), not every layer's K/V. Inputs are host arrays
    (kept alive here; onnxruntime copies them to a GPU) or `DeviceArray`s (bound by address); outputs go to
    preallocated host arrays or `DeviceArray`s or, when none is given, to the session's device (read back
    after the run)."""

    def __init__(self, session: Session):
        self.session = session
        self._binding = session._sess.io_binding()
        self.feeds: dict[str, np.ndarray | DeviceArray] = {}
        self._out: dict[str, np.ndarray | DeviceArray | None] = {}  # in first-bind order (onnxruntime's output order)
        # The contract check walks only the inputs bound since the last run (the first run checks all):
        # a decode step rebinds 4 of the llm graph's 52 inputs, and checking all of them took ~50 us a step.
        self._dims: dict[str, dict[str, int]] | None = None  # each checked input's dynamic dims
        self._dirty: set[str] = set()
        # dims of the inputs not rebound, for the last run's set of rebound ones: a decode loop rebinds the
        # same inputs every step, so this is built once per request, not once per step
        self._known: tuple[frozenset[str], dict[str, int]] = (frozenset(), {})

    def bind_inputs(self, feeds: Mapping[str, np.ndarray | DeviceArray]) -> None:
        """Host arrays (copied to the session's device by onnxruntime when it is not the CPU) or
        `DeviceArray`s (bound by address, no copy)."""
        for name, arr in feeds.items():
            if isinstance(arr, DeviceArray):
                self._binding.bind_input(name, arr.device, arr.device_id, arr.dtype.type, list(arr.shape),
                                         arr.address)
            elif isinstance(arr, np.ndarray):
                arr = np.require(arr, requirements="C")  # np.ascontiguousarray would make a 0-d input 1-d
                self._binding.bind_cpu_input(name, arr)
            else:
                raise EngineError(f"{self.session.name}: input {name} must be a numpy array or DeviceArray, "
                                  f"got {type(arr).__name__}")
            self.feeds[name] = arr
            self._dirty.add(name)

    def bind_outputs(self, out: Mapping[str, np.ndarray | DeviceArray], names: list[str] | None = None) -> None:
        """Bind `out`'s buffers (host arrays or `DeviceArray`s); the other `names` go to the session's device."""
        s = self.session
        for name in names or list(out):
            buf = out.get(name)
            if buf is None:
                self._binding.bind_output(name, s.device, s.device_id)
            else:
                if name not in s.outputs:
                    raise EngineError(f"{s.name}: no output {name} (has {sorted(s.outputs)})")
                if isinstance(buf, np.ndarray) and not buf.flags.c_contiguous:
                    raise EngineError(f"{s.name}: output buffer {name} must be C-contiguous")
                want = _NP_DTYPES[s.outputs[name].dtype]
                if buf.dtype != want:
                    raise EngineError(f"{s.name}: output buffer {name} dtype {buf.dtype}, expected "
                                      f"{want.__name__}")
                if isinstance(buf, DeviceArray):
                    self._binding.bind_output(name, buf.device, buf.device_id, buf.dtype.type, list(buf.shape),
                                              buf.address)
                else:
                    self._binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
            self._out[name] = buf

    def run(self, run_options=None) -> dict[str, np.ndarray | DeviceArray]:
        """Validate the bound inputs against the contract, run (with onnxruntime `run_options`, e.g.
        `Session.run_options`), and return every bound output (preallocated buffers as they were bound;
        outputs left to the device read back to the host)."""
        s = self.session
        if self._dims is None:
            self._dims = s.validate(self.feeds)
        elif self._dirty:
            dirty = frozenset(self._dirty)
            if dirty != self._known[0]:  # another set rebound: an input outside it may have changed since
                self._known = dirty, {d: n for name, dims in self._dims.items() if name not in dirty
                                      for d, n in dims.items()}
            self._dims.update(s.validate(self.feeds, dirty, self._known[1]))
        self._dirty.clear()
        try:
            s._sess.run_with_iobinding(self._binding, run_options)
            result = {name: buf for name, buf in self._out.items() if buf is not None}
            if len(result) < len(self._out):  # device-allocated outputs: read them back
                for name, value in zip(self._out, self._binding.get_outputs()):
                    if self._out[name] is None:
                        result[name] = value.numpy()
        except Exception as e:  # onnxruntime's own error types
            raise EngineError(f"{s.name}: onnxruntime failed: {str(e).splitlines()[0][:300]}") from None
        return result
