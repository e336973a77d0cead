"""device_buffer: request buffers allocated on the sessions' device and bound by address.

The GPU route (OrtValue-owned memory) runs here with the device string "cpu"; what a GPU adds is only
where onnxruntime puts the allocation."""
import numpy as np
import pytest

from illume_edge.manifest import EngineError
from illume_edge.runtime.device_buffer import allocate


@pytest.mark.parametrize("owner", ["auto", "numpy", "ortvalue"])
def test_views_address_the_right_elements_and_host_reads_them(owner):
    buf = allocate((4, 6), np.float32, owner=owner)
    assert buf.shape == (4, 6) and buf.nbytes == 96 and buf.device == "cpu"
    assert not buf.host().any()  # zero-filled
    view = buf.view(6, (2, 3))  # elements 6..11: the second row of the [4, 6] buffer
    assert view.address == buf.address + 6 * 4 and view.shape == (2, 3)
    # write through the owning memory, read back through the view
    if owner == "ortvalue":
        memory = buf._memory.numpy()  # an OrtValue on "cpu" wraps host memory: write it via numpy's view
        assert memory.ctypes.data == buf.address
        memory.reshape(-1)[:] = np.arange(24)
    else:
        buf.host().reshape(-1)[:] = np.arange(24)
    np.testing.assert_array_equal(view.host(), np.arange(6, 12).reshape(2, 3))
    np.testing.assert_array_equal(view.view(3, (3,)).host(), [9, 10, 11])  # a view of a view
    assert (view.host() is view.host()) == (owner != "ortvalue")  # numpy memory: the memory itself


def test_bad_views_and_owners_fail_clearly():
    buf = allocate((10,), np.int64)
    with pytest.raises(EngineError, match="outside its 10"):
        buf.view(8, (3,))
    with pytest.raises(EngineError, match="outside"):
        buf.view(-1, (2,))
    with pytest.raises(EngineError, match=r"owner \(SessionOptions.buffers\) must be one of"):
        allocate((2,), np.float32, owner="cupy")
    with pytest.raises(EngineError, match="numpy memory is host memory"):
        allocate((2,), np.float32, device="cuda", owner="numpy")


def test_a_gpu_buffer_without_a_gpu_build_names_the_fix():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: CUDA buffers can be allocated")
    with pytest.raises(EngineError, match="onnxruntime-gpu"):
        allocate((2,), np.float32, device="cuda")


def test_device_arrays_are_checked_against_the_contract_like_host_arrays(tiny_engine):
    """A DeviceArray input goes through the same contract check (dtype, rank, dynamic ranges) as a numpy one."""
    from illume_edge.runtime.engine import Engine
    from illume_edge.runtime.session import SessionOptions

    engine = Engine.load(tiny_engine("tiny-plus")[0], SessionOptions(buffers="ortvalue"))
    head = engine.session("head_text")
    hidden = head.allocate((2, engine.config.llm.hidden_size), np.float32)
    out = head.run({"hidden": hidden})["logits"]
    np.testing.assert_array_equal(out, head.run({"hidden": np.zeros((2, engine.config.llm.hidden_size),
                                                                     np.float32)})["logits"])
    with pytest.raises(EngineError, match="dtype int64, expected float32"):
        head.run({"hidden": head.allocate((2, engine.config.llm.hidden_size), np.int64)})
    with pytest.raises(EngineError, match="rank 1"):
        head.run({"hidden": hidden.view(0, (engine.config.llm.hidden_size,))})


def test_a_scalar_input_stays_a_scalar_through_the_binding(tmp_path):
    """A 0-d numpy input (e.g. a flag) keeps rank 0 when bound (np.ascontiguousarray would make it [1])."""
    import onnx
    from onnx import TensorProto, helper

    from illume_edge.manifest import Component, TensorSpec
    from illume_edge.runtime.session import Session

    graph = helper.make_graph([helper.make_node("Where", ["flag", "x", "y"], ["out"])], "scalar",
                              [helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])])
    path = tmp_path / "scalar.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    spec = Component("onnx", (), (TensorSpec("flag", "bool", ()), TensorSpec("x", "float32", (2,)),
                                  TensorSpec("y", "float32", (2,))), (TensorSpec("out", "float32", (2,)),), {})
    session = Session("scalar", str(path), spec)
    x, y = np.array([1, 2], np.float32), np.array([3, 4], np.float32)
    binding = session.binding()
    binding.bind_inputs({"flag": np.array(True), "x": x, "y": y})
    binding.bind_outputs({}, ["out"])
    np.testing.assert_array_equal(binding.run()["out"], x)
    binding.bind_inputs({"flag": np.array(False)})
    np.testing.assert_array_equal(binding.run()["out"], y)


class EmulatedKernel:
    """Stands in for cuda.GpuSampler on the CPU: `sample_device` reads the logits by address and runs the
    kernel's numpy emulation row by row from the packed LaunchArgs; `binding` is host memory. So a test covers
    what the image loop hands the kernel (address, stride, rows, params, uniforms, penalties, range)."""

    memory = "cpu"  # it reads the buffers by host address (the real kernel: "cuda")

    class Binding:
        def __init__(self):
            self.bufs = []

        def alloc(self, nbytes):
            buf = np.zeros(max(int(nbytes), 8), np.uint8)
            self.bufs.append(buf)
            return buf

        def ptr(self, buf):
            return buf.ctypes.data

        def dtoh(self, arr, src):  # src: a buffer of ours, or an address (a DeviceArray's)
            if isinstance(src, int):
                import ctypes

                src = np.ctypeslib.as_array((ctypes.c_uint8 * arr.nbytes).from_address(src))
            arr.view(np.uint8)[:] = src[:arr.nbytes]

    def __init__(self, stream_handle=None):
        self.binding, self.launches, self.outputs, self.advances = self.Binding(), 0, [], []
        self.stream_handle = stream_handle  # GpuSampler's: the CUDA stream the engine's sessions may share
        self.reads: list[int] = []  # read_async's copies, by ticket
        self.log: list[tuple[str, int]] = []  # ("launch", n), ("read", ticket), ("wait", ticket) in order
        self.queued: set[int] = set()

    def read(self, host, src):
        self.binding.dtoh(host, src)

    def read_async(self, src):
        """The copy happens now: on a stream it comes before anything queued after it, as here."""
        host = np.zeros(1, np.int64)
        self.binding.dtoh(host, src)
        self.reads.append(int(host[0]))
        ticket = len(self.reads) - 1
        self.queued.add(ticket)
        self.log.append(("read", ticket))
        return ticket

    def wait(self, ticket):
        self.queued.remove(ticket)  # each read is waited for once
        self.log.append(("wait", ticket))
        return self.reads[ticket]

    def sample_device(self, logits_ptr, dtype, row_stride, col0, la, out_ptr, out_stride=1, out_copies=1,
                      advance=None):
        import ctypes

        from illume_edge.runtime.cuda import emulation

        self.launches += 1
        self.log.append(("launch", self.launches))
        self.outputs.append((out_ptr, out_stride, out_copies))
        self.advances.append(advance)
        rows_in = int(max(la.cond_row.max(), la.uncond_row.max())) + 1
        ctype = ctypes.c_float if dtype == "float32" else ctypes.c_uint16
        flat = np.ctypeslib.as_array((ctype * (rows_in * row_stride)).from_address(logits_ptr))
        logits = (flat if dtype == "float32" else flat.view(np.float16)).reshape(rows_in, row_stride)
        out = np.ctypeslib.as_array((ctypes.c_int64 * ((la.grid[0] - 1) * out_stride + out_copies))
                                    .from_address(out_ptr))
        for r in range(la.grid[0]):
            t, top_p, cfg, penalty = la.params[r]
            cond = logits[la.cond_row[r], col0:col0 + la.v].astype(np.float32)
            uncond = (logits[la.uncond_row[r], col0:col0 + la.v].astype(np.float32) if la.uncond_row[r] >= 0
                      else None)
            pen = la.pen_ids[la.pen_offsets[r]:la.pen_offsets[r + 1]].astype(np.int64) - la.range_start
            bans = [(int(lo) - la.range_start, int(hi) - la.range_start) for lo, hi in la.bans]
            x = emulation.combined_logits(cond, uncond, cfg, penalty, pen, bans)
            out[r * out_stride:r * out_stride + out_copies] = la.range_start + emulation.sample_row(
                x, t, int(la.top_k[r]), top_p, float(la.uniforms[r]))
            if advance is not None and advance.positions and out[r * out_stride] >= 0:  # sampling.cu's advance_step
                rows = (la.grid[0] - 1) * out_stride + out_copies
                pos = np.ctypeslib.as_array((ctypes.c_int64 * rows).from_address(advance.positions))
                mask = np.ctypeslib.as_array((ctypes.c_int64 * (rows * advance.mask_stride))
                                             .from_address(advance.mask)).reshape(rows, advance.mask_stride)
                for row in range(r * out_stride, r * out_stride + out_copies):
                    pos[row] += 1
                    mask[row, advance.mask_slot if advance.mask_slot >= 0 else pos[row]] = 1


@pytest.mark.parametrize("buffers", ["auto", "ortvalue"])
def test_device_pick_draws_the_host_samplers_tokens(tiny_engine, buffers):
    """The image loop with the kernel's draw (`device_pick`, here on the kernel's emulation reading the
    head's logits buffer by address) picks the same codes as the numpy sampler, with CFG, top-k, top-p and
    the repetition penalty, on numpy and on OrtValue buffers. The kernel writes each token into the next
    decode step's input ids buffer, for both rows of the CFG pair."""
    from illume_edge.runtime.decode_loops import device_pick
    from illume_edge.runtime.engine import Engine
    from illume_edge.runtime.pipeline import Pipeline
    from illume_edge.runtime.session import SessionOptions

    engine = Engine.load(tiny_engine("tiny-plus")[0], SessionOptions(buffers=buffers))
    host = Pipeline(engine, sampler="host")
    kernel = EmulatedKernel()
    dev = Pipeline(engine)  # "auto" on the CPU: the host sampler
    dev.pick = device_pick(kernel)
    args = dict(resolution="256x256", seed=3, cfg=2.0, top_k=64, top_p=0.9, repetition_penalty=1.1,
                decoder="vq")
    want, got = host.generate("a red circle", **args), dev.generate("a red circle", **args)
    for lv, (a, b) in enumerate(zip(got.codes, want.codes)):
        np.testing.assert_array_equal(a, b, err_msg=f"level {lv}")
    assert kernel.launches == sum(c.size for c in want.codes)  # one launch per sampled code
    # each token went straight into the next step's input ids, both rows of the CFG pair (static decode)
    assert {(stride, copies) for _, stride, copies in kernel.outputs} == {(2, 2)}
    # and advanced both rows' positions and mask there where they are device copies (OrtValues), which the
    # host would write whole every step; numpy buffers are the request's own mask: nothing to advance
    advanced = sum(a is not None for a in kernel.advances)
    assert advanced > kernel.launches // 2 if buffers == "ortvalue" else advanced == 0
    scratch = {kernel.binding.ptr(b) for b in kernel.binding.bufs}
    assert not {ptr for ptr, _, _ in kernel.outputs} & scratch
    with pytest.raises(ValueError, match="sampler: expected one of"):
        Pipeline(engine, sampler="gpu")


@pytest.mark.parametrize("buffers", ["auto", "ortvalue"])
def test_device_pick_streams_the_host_samplers_text(tiny_engine, buffers, monkeypatch):
    """The text loop with the kernel's draw gives the host sampler's answer token for token (temperature,
    top-k, top-p, penalty), with the banned ranges applied by the kernel. The real ranges hold 5 of the tiny
    engine's 151,704 text ids, which random weights never pick, so the test bans the lower half of the text
    vocabulary too: without the kernel's bans about half the draws would differ. Each token goes into the
    next step's input ids (one row), and the step that feeds it does not write it again."""
    from illume_edge.runtime import decode_loops
    from illume_edge.runtime.decode_loops import device_pick
    from illume_edge.runtime.engine import Engine
    from illume_edge.runtime.grammar import text_banned_ranges
    from illume_edge.runtime.pipeline import Pipeline
    from illume_edge.runtime.session import SessionOptions

    engine = Engine.load(tiny_engine("tiny-plus")[0], SessionOptions(buffers=buffers))
    half = engine.config.head_ranges()["text"][1] // 2
    banned = [(0, half)] + text_banned_ranges(engine.config)
    monkeypatch.setattr(decode_loops, "text_banned_ranges", lambda cfg: banned)
    host, dev, kernel = Pipeline(engine, sampler="host"), Pipeline(engine), EmulatedKernel()
    picks = {"host": [], "device": []}
    for name, pipe, inner in (("host", host, host.pick), ("device", dev, device_pick(kernel))):
        pipe.pick = lambda *a, _inner=inner, _out=picks[name]: _out.append(_inner(*a)) or _out[-1]
    writes = []
    real_write = dev.runner._write_step
    dev.runner._write_step = lambda state, ids, pos: (writes.append(state.step.ids_written),
                                                      real_write(state, ids, pos))
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for seed in range(3):
        args = dict(max_new_tokens=24, seed=seed, temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.2)
        want, got = host.understand(image, "what is this?", **args), dev.understand(image, "what is this?", **args)
        assert picks["device"] == picks["host"] and got.text == want.text, f"seed {seed}"
    assert len(picks["device"]) > 24
    assert all(not any(a <= t < b for a, b in banned) for t in picks["device"])
    assert kernel.launches >= 3 and {(stride, copies) for _, stride, copies in kernel.outputs} == {(1, 1)}
    assert writes and all(w is not None for w in writes)  # every fed token was already in the ids buffer


def _late_reads(log) -> int:
    """Launches queued while an earlier launch's token was still unread (EmulatedKernel.log)."""
    unread, late = set(), 0
    for kind, n in log:
        if kind == "launch":
            late += bool(unread)
        elif kind == "read":
            unread.add(n)
        else:
            unread.discard(n)
    return late


@pytest.mark.parametrize("buffers", ["auto", "ortvalue"])
def test_device_pick_reads_image_tokens_one_step_late(tiny_engine, buffers):
    """Without a repetition penalty (whose arguments list the tokens fed so far) the image loop queues each
    code's step and the next code's draw before it reads the code (DevicePick.launch / wait,
    LLMRunner.feed_written) within every row, and feeds each row's last code with its <end_of_line> from the
    host. The codes are the host sampler's, the llm runs as many, and no read is left queued."""
    from illume_edge.runtime.decode_loops import device_pick
    from illume_edge.runtime.engine import Engine
    from illume_edge.runtime.pipeline import Pipeline
    from illume_edge.runtime.session import SessionOptions

    engine = Engine.load(tiny_engine("tiny-plus")[0], SessionOptions(buffers=buffers))
    host, dev, kernel = Pipeline(engine, sampler="host"), Pipeline(engine), EmulatedKernel()
    dev.pick = device_pick(kernel)
    args = dict(resolution="256x256", seed=4, cfg=2.0, top_k=64, top_p=0.9, decoder="vq")
    runs = host.runner.runs
    want = host.generate("a red circle", **args)
    runs, before = host.runner.runs - runs, dev.runner.runs
    got = dev.generate("a red circle", **args)
    for lv, (a, b) in enumerate(zip(got.codes, want.codes)):
        np.testing.assert_array_equal(a, b, err_msg=f"level {lv}")
    assert dev.runner.runs - before == runs
    rows = sum(c.shape[0] for c in want.codes)
    assert _late_reads(kernel.log) == kernel.launches - rows  # every code but a row's last is read late
    assert not kernel.queued


@pytest.mark.parametrize("buffers", ["auto", "ortvalue"])
def test_device_pick_reads_text_tokens_one_step_late(tiny_engine, buffers):
    """Without a penalty the text loop queues the step that feeds token t and the draw of t + 1 before it
    reads t: the answer is the host sampler's, token for token. A consumer that stops early (a stop token)
    leaves one step queued, which closing the token iterator waits for, and the next request on the same
    buffers draws the host's tokens again."""
    from contextlib import closing

    from illume_edge.runtime.decode_loops import device_pick, text_tokens
    from illume_edge.runtime.engine import Engine
    from illume_edge.runtime.llm_runner import LLMRunner
    from illume_edge.runtime.pipeline import Pipeline
    from illume_edge.runtime.sampler import SamplingParams, Uniforms
    from illume_edge.runtime.session import SessionOptions

    engine = Engine.load(tiny_engine("tiny-plus")[0], SessionOptions(buffers=buffers))
    host, dev, kernel = Pipeline(engine, sampler="host"), Pipeline(engine), EmulatedKernel()
    dev.pick = device_pick(kernel)
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for seed in range(2):
        args = dict(max_new_tokens=16, seed=seed, temperature=1.0, top_k=50, top_p=0.95)
        assert dev.understand(image, "what is this?", **args).text == host.understand(image, "what is this?",
                                                                                      **args).text
    assert _late_reads(kernel.log) > 20 and not kernel.queued
    runner = LLMRunner(engine)
    params, text = SamplingParams(temperature=1.0, top_k=50), engine.config.head_ranges()["text"][0]

    def tokens(pick, stop_after):
        state = runner.prefill([[5, 6, 7, 8]], max_new_tokens=12)
        with closing(text_tokens(runner, state, pick, params, Uniforms(3, rows=1, steps=12), text, (), 12)) as it:
            return [t for _, t in zip(range(stop_after), it)], state

    want, _ = tokens(host.pick, 12)
    got, state = tokens(dev.pick, 5)  # stopped at the fifth token: the sixth's draw was queued
    assert got == want[:5] and not kernel.queued and len(state.fed[0]) == 5
    assert state.fed[0] == want[:5]  # the fifth went in, unread when fed, filled in when read
    got, state = tokens(dev.pick, 12)
    assert got == want and state.fed[0] == want


@pytest.mark.parametrize("bad_launch", [5, 6])
def test_a_bad_row_read_late_fails_the_request_and_leaves_nothing_queued(tiny_engine, bad_launch):
    """A row the kernel flags (-1: NaN/+inf or no finite logit) fails the request at its read with the
    kernel's error, also when the next step was queued behind it (within a row of codes), and the queued
    draw is waited for, so that the next request starts on an idle device and draws the host's codes."""
    import ctypes

    from illume_edge.manifest import EngineError
    from illume_edge.runtime.decode_loops import device_pick
    from illume_edge.runtime.engine import Engine
    from illume_edge.runtime.pipeline import Pipeline
    from illume_edge.runtime.session import SessionOptions

    class Flagging(EmulatedKernel):
        def sample_device(self, logits_ptr, dtype, row_stride, col0, la, out_ptr, out_stride=1, out_copies=1,
                          advance=None):
            super().sample_device(logits_ptr, dtype, row_stride, col0, la, out_ptr, out_stride, out_copies,
                                  None if self.launches + 1 == bad_launch else advance)
            if self.launches == bad_launch:
                np.ctypeslib.as_array((ctypes.c_int64 * out_copies).from_address(out_ptr))[:] = -1

    engine = Engine.load(tiny_engine("tiny-plus")[0], SessionOptions(buffers="ortvalue"))
    host, dev, kernel = Pipeline(engine, sampler="host"), Pipeline(engine), Flagging()
    dev.pick = device_pick(kernel)
    args = dict(resolution="256x256", seed=4, cfg=2.0, top_k=64, decoder="vq")
    with pytest.raises(EngineError, match="head_level0: the sampling kernel found NaN"):
        dev.generate("a red circle", **args)
    assert not kernel.queued and _late_reads(kernel.log) > 0
    got, want = dev.generate("a red circle", **args), host.generate("a red circle", **args)
    for a, b in zip(got.codes, want.codes):
        np.testing.assert_array_equal(a, b)


def test_feed_written_needs_an_unread_token(tiny_engine):
    """`feed_written` feeds the token a device sampler wrote into the step's ids and has not read; with none
    there (a host sampler, or the token read already) it refuses, naming feed."""
    from illume_edge.manifest import EngineError
    from illume_edge.runtime.engine import Engine
    from illume_edge.runtime.llm_runner import LLMRunner

    runner = LLMRunner(Engine.load(tiny_engine("tiny-plus")[0]))
    state = runner.prefill([[5, 6, 7]], max_new_tokens=4)
    with pytest.raises(EngineError, match="feed_written.*has not read.*feed the token with feed"):
        runner.feed_written(state)


def _unsynchronized(run_options) -> bool:
    if run_options is None:
        return False
    try:
        return run_options.get_run_config_entry("disable_synchronize_execution_providers") == "1"
    except RuntimeError:  # no such entry
        return False


@pytest.mark.parametrize("session_stream,kernel_stream", [(77, 77), (77, 78), (None, 77)])
def test_one_stream_lets_the_decode_runs_return_unsynchronized(tiny_engine, monkeypatch, session_stream,
                                                                kernel_stream):
    """Where the engine's sessions run on the kernel's stream (SessionOptions.compute_stream = its
    stream_handle), `device_pick` lets the static decode steps' llm runs and the head runs return without
    synchronizing the host (the token's read on that stream is the step's one wait); prefills, whose inputs
    come from the host, stay synchronized. Sessions on another stream, or their own, keep every run
    synchronized. The tokens are the host sampler's either way. (On the CPU a session never shares a stream;
    the test makes it one that does, to check the runs' options.)"""
    from illume_edge.runtime.decode_loops import device_pick
    from illume_edge.runtime.engine import Engine
    from illume_edge.runtime.pipeline import Pipeline
    from illume_edge.runtime.session import Binding, Session, SessionOptions

    monkeypatch.setattr(Session, "shares_stream", property(lambda self: self.compute_stream is not None))
    engine = Engine.load(tiny_engine("tiny-plus")[0], SessionOptions(buffers="ortvalue",
                                                                     compute_stream=session_stream))
    host, dev = Pipeline(engine, sampler="host"), Pipeline(engine)
    pick = device_pick(EmulatedKernel(stream_handle=kernel_stream))
    events = []  # ("prefill",), ("pick",), (session, static llm step, unsynchronized) in order
    dev.pick = lambda *a: events.append(("pick",)) or pick(*a)
    real_prefill, real_run = dev.runner.prefill, Binding.run
    dev.runner.prefill = lambda *a, **k: events.append(("prefill",)) or real_prefill(*a, **k)

    def spy(self, run_options=None):
        step = self.session.name == "llm" and self.feeds["input_ids"].shape[1] == 1 and hasattr(
            self.feeds["input_ids"], "address")
        events.append((self.session.name, step, _unsynchronized(run_options)))
        return real_run(self, run_options)

    monkeypatch.setattr(Binding, "run", spy)
    args = dict(resolution="256x256", seed=5, cfg=2.0, top_k=64, top_p=0.9, decoder="vq")
    got = dev.generate("a red circle", **args)
    text = dev.understand(np.zeros((64, 64, 3), np.uint8), "what is this?", max_new_tokens=8, seed=1)
    dev_events = list(events)
    want = host.generate("a red circle", **args)
    for a, b in zip(got.codes, want.codes):
        np.testing.assert_array_equal(a, b)
    assert text.text == host.understand(np.zeros((64, 64, 3), np.uint8), "what is this?", max_new_tokens=8,
                                        seed=1).text
    shared = session_stream is not None and session_stream == kernel_stream
    picked, seen = False, {True: set(), False: set()}
    for event in dev_events:
        if event[0] in ("prefill", "pick"):
            picked = event[0] == "pick" or (picked and event[0] != "prefill")
            continue
        name, step, unsync = event
        if name == "llm" and not step:  # prefills and forced multi-token runs: inputs from the host
            assert not unsync
        else:  # after a request's first pick its head runs and static steps are ordered by the kernel
            assert unsync == (shared and picked), event
            seen[picked].add(name)
    assert seen[True] >= {"llm", "head_text", "head_level0"}


def test_pipeline_load_puts_the_sessions_on_the_kernels_stream(monkeypatch):
    """`Pipeline.load(device="cuda")` makes the sampling kernel before the sessions and hands them its
    stream (SessionOptions.compute_stream) and the pipeline the kernel; "auto" without a usable CUDA binding
    leaves the decision to the sessions (as before), "device" raises; on the CPU no kernel is made."""
    from illume_edge.runtime import cuda, engine, pipeline

    made, loaded = [], []

    class Kernel:
        stream_handle = 0xC0FFEE

        def __init__(self):
            made.append(self)

    monkeypatch.setattr(cuda, "GpuSampler", Kernel)
    monkeypatch.setattr(engine.Engine, "load", classmethod(lambda cls, d, opts, check: loaded.append(opts) or d))
    monkeypatch.setattr(pipeline.Pipeline, "__init__", lambda self, eng, sampler, gpu: setattr(
        self, "args", (eng, sampler, gpu)))
    p = pipeline.Pipeline.load("ENGINE", device="cuda")
    assert loaded[-1].compute_stream == 0xC0FFEE and p.args == ("ENGINE", "auto", made[0])
    p = pipeline.Pipeline.load("ENGINE", device="cpu")
    assert loaded[-1].compute_stream is None and p.args[2] is None and len(made) == 1
    p = pipeline.Pipeline.load("ENGINE", device="cuda", sampler="host")
    assert loaded[-1].compute_stream is None and p.args[2] is None and len(made) == 1

    def unavailable():
        raise cuda.CudaUnavailableError("the CUDA sampling kernel needs pycuda or cuda-python")

    monkeypatch.setattr(cuda, "GpuSampler", unavailable)
    p = pipeline.Pipeline.load("ENGINE", device="cuda")
    assert loaded[-1].compute_stream is None and p.args[2] is None
    with pytest.raises(cuda.CudaUnavailableError, match="pycuda or cuda-python"):
        pipeline.Pipeline.load("ENGINE", device="cuda", sampler="device")


def test_device_pick_refuses_host_buffers_for_the_gpu_kernel(tiny_engine):
    """The GPU kernel reads the logits and writes the token by address: handed host buffers it would fault
    (an H100 reported an illegal address when only the llm's buffers were on the GPU). The draw refuses
    them before any launch, naming both ways out."""
    from illume_edge.manifest import EngineError
    from illume_edge.runtime.decode_loops import device_pick
    from illume_edge.runtime.engine import Engine
    from illume_edge.runtime.pipeline import Pipeline

    pipe = Pipeline(Engine.load(tiny_engine("tiny-plus")[0]), sampler="host")
    kernel = EmulatedKernel()
    kernel.memory = "cuda"  # as the real kernel
    pipe.pick = device_pick(kernel)
    with pytest.raises(EngineError, match=r"head_level0.*cuda memory, the logits are on 'cpu'.*--device cuda"
                                          r".*sampler='host'"):
        pipe.generate("a red circle", resolution="256x256", seed=0, decoder="vq")
    assert kernel.launches == 0


@pytest.mark.parametrize("right_padded", [True, False])
def test_the_kernel_advances_the_next_steps_positions_and_mask(tiny_engine, right_padded, monkeypatch):
    """With its token the kernel advances the next static step's positions and attention mask on the device
    (sampling.cu's advance_step, here its emulation on OrtValue buffers in host memory): afterwards they hold
    exactly what the host would have written for the next token, each row at its own position (rows of
    unequal length), the mask slot each row's new position (right padding) or the one slot all rows share
    (rows that end together). The step that feeds the token then writes neither (two host-to-device copies a
    step on a GPU, one of the whole B x capacity mask); a second draw without a feed does not advance them
    again, and after a prefill, whose run binds its own inputs, there is nothing to advance."""
    from illume_edge.runtime.decode_loops import device_pick
    from illume_edge.runtime.device_buffer import DeviceArray
    from illume_edge.runtime.engine import Engine
    from illume_edge.runtime.llm_runner import LLMRunner
    from illume_edge.runtime.sampler import SamplingParams
    from illume_edge.runtime.session import SessionOptions

    runner = LLMRunner(Engine.load(tiny_engine("tiny-plus")[0], SessionOptions(buffers="ortvalue")))
    assert runner.static_decode
    runner.right_padded = right_padded  # the buffers' bookkeeping only: what the graph computes is not checked
    kernel = EmulatedKernel()
    pick = device_pick(kernel)
    text, greedy = runner.cfg.head_ranges()["text"][0], SamplingParams(temperature=0.0)
    state = runner.prefill([[5, 6, 7, 8], [5, 6]], max_new_tokens=8)
    step = state.step
    tok = pick(runner, state, "text", greedy, np.zeros(1), text, False, ())
    assert kernel.advances[-1] is None  # the prefill's run did not use the step buffers
    written = []
    real_write = DeviceArray.write
    monkeypatch.setattr(DeviceArray, "write", lambda self, v: (written.append(self), real_write(self, v)))
    for i in range(5):
        written.clear()
        runner.feed(state, np.full((2, 1), tok))
        assert (step.positions in written, step.mask in written) == ((True, True) if i == 0 else (False, False))
        tok = pick(runner, state, "text", greedy, np.zeros(1), text, False, ())
        assert kernel.advances[-1] is not None
        want_mask = state.mask.copy()
        slots = state.next_pos if right_padded else np.full(2, state.length)
        want_mask[np.arange(2), slots] = 1
        np.testing.assert_array_equal(step.positions.host(), state.next_pos[:, None], err_msg=f"step {i}")
        np.testing.assert_array_equal(step.mask.host(), want_mask, err_msg=f"step {i}")
    assert state.next_pos.tolist() == [9, 7]  # 4 + 5 and 2 + 5 tokens
    pick(runner, state, "text", greedy, np.zeros(1), text, False, ())
    assert kernel.advances[-1] is None  # already advanced for the next token
