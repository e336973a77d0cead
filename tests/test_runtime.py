"""The runtime (numpy + onnxruntime) against the torch reference pipeline, and its behaviour on bad input.

Parity is exact where it can be: greedy understanding tokens and seeded image codes must be identical
to the torch reference's (same prompts, same seed, same numpy sampler; fp32 logits differ by ~1e-6).
Decoded images may differ by float rounding only: uint8 images within 2 levels (max) of each other.
"""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from illume_edge.manifest import EngineError
from illume_edge.runtime.engine import Engine
from illume_edge.runtime.llm_runner import LLMRunner
from illume_edge.runtime.pipeline import Pipeline
from illume_edge.runtime.sampler import SamplingParams
from illume_edge.runtime.session import SessionOptions

# (preset, llm graph): both presets on the default (fused) graph, and the portable graph once
ENGINES = [("tiny-plus", "fused"), ("tiny-v1", "fused"), ("tiny-plus", "portable")]


@pytest.fixture(scope="module", params=ENGINES, ids=lambda p: "-".join(p))
def pair(request, tiny_engine):
    from illume_edge.export.reference import ReferencePipeline

    engine_dir, mods = tiny_engine(*request.param)
    pipe = Pipeline.load(engine_dir)
    return pipe, ReferencePipeline(mods, pipe.tokenizer)


def _image(seed, h, w):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_understanding_greedy_tokens_equal_torch(pair):
    pipe, ref = pair
    greedy = SamplingParams(temperature=0.0)
    for seed, (h, w) in enumerate(((64, 64), (90, 140), (200, 120))):
        img = _image(seed, h, w)
        question = "What is in the picture?"
        want = ref.understand_ids(img, question, greedy, 0, max_new_tokens=12)
        got = pipe.understand(img, question, max_new_tokens=12, temperature=0.0)
        assert got.text == pipe.tokenizer.decode(want), f"{h}x{w}"
        assert {"vision_semantic", "prefill", "decode", "total"} <= set(got.timings)


def test_streaming_yields_the_same_text(pair):
    pipe, _ = pair
    img = _image(7, 80, 80)
    full = pipe.understand(img, "Describe it.", max_new_tokens=10, temperature=0.0).text
    stream = pipe.understand(img, "Describe it.", max_new_tokens=10, temperature=0.0, stream=True)
    pieces = list(stream)
    assert "".join(pieces) == full == stream.result.text


def test_sampled_understanding_equals_torch(pair):
    """A random tiny model's text logits are nearly flat over 151k ids, so at T=1 the top-k boundary sits
    between logits ~1e-7 apart and fp32 rounding moves it; T=0.1 keeps several tokens in play (a real
    draw) while the kept set's edge carries no mass."""
    pipe, ref = pair
    img = _image(3, 64, 96)
    params = SamplingParams(temperature=0.1, top_k=128, top_p=0.9, repetition_penalty=1.05)
    want = ref.understand_ids(img, "Why?", params, 11, max_new_tokens=10)
    got = pipe.understand(img, "Why?", max_new_tokens=10, temperature=0.1, top_k=128, top_p=0.9,
                          repetition_penalty=1.05, seed=11)
    assert got.text == pipe.tokenizer.decode(want)


@pytest.mark.parametrize("resolution", [(256, 256), (384, 512)])
def test_generation_codes_equal_torch_with_cfg(pair, resolution):
    pipe, ref = pair
    h, w = resolution
    params = SamplingParams(temperature=1.0, top_k=64, top_p=0.95, cfg_scale=2.0, repetition_penalty=1.05)
    want = ref.generate_codes("a red circle above a blue square", h, w, params, seed=5)
    got = pipe.generate("a red circle above a blue square", resolution=f"{h}x{w}", seed=5, cfg=2.0, top_k=64,
                        top_p=0.95, repetition_penalty=1.05, decoder="diffusion", steps=2)
    for lv, (a, b) in enumerate(zip(got.codes, want)):
        np.testing.assert_array_equal(a, b, err_msg=f"level {lv}")
    assert got.image.shape == (2 * h, 2 * w, 3) and got.image.dtype == np.uint8
    ref_image = ref.diffusion_image(want, h, w, steps=2, cfg_scale=pipe.cfg.diffusion.default_cfg, seed=5)
    assert np.abs(got.image.astype(int) - ref_image.astype(int)).max() <= 2


def test_vq_path_image_equals_torch(pair):
    pipe, ref = pair
    if not pipe.engine.has("vq_decoder"):
        with pytest.raises(Exception, match="no vq decoder"):
            pipe.generate("x", decoder="vq")
        return
    got = pipe.generate("a green triangle", resolution="512x384", seed=2, decoder="vq")
    np.testing.assert_array_equal(got.image.shape, (512, 384, 3))
    want = ref.vq_image(got.codes)
    assert np.abs(got.image.astype(int) - want.astype(int)).max() <= 2


def test_edit_codes_equal_torch(pair):
    pipe, ref = pair
    img = _image(9, 120, 180)
    params = SamplingParams(temperature=0.7, top_k=32, top_p=0.8, cfg_scale=1.5, repetition_penalty=1.05)
    want, anchor, source_hw = ref.edit_codes(img, "make the square yellow", params, seed=4)
    got = pipe.edit(img, "make the square yellow", seed=4, cfg=1.5, temperature=0.7, top_k=32, top_p=0.8,
                    repetition_penalty=1.05, decoder="diffusion", steps=2)
    assert got.resolution == anchor and source_hw == (120, 180)
    for a, b in zip(got.codes, want):
        np.testing.assert_array_equal(a, b)
    assert got.image.shape == (120, 180, 3)  # cropped back to the source's size


def test_sampled_generation_is_reproducible_per_seed(pair):
    pipe, _ = pair
    a = pipe.generate("a cat", seed=1, decoder="diffusion", steps=1, top_k=16)
    b = pipe.generate("a cat", seed=1, decoder="diffusion", steps=1, top_k=16)
    c = pipe.generate("a cat", seed=2, decoder="diffusion", steps=1, top_k=16)
    assert all((x == y).all() for x, y in zip(a.codes, b.codes)) and (a.image == b.image).all()
    assert any((x != y).any() for x, y in zip(a.codes, c.codes))


def test_runtime_never_imports_torch(tiny_engine):
    engine_dir, _ = tiny_engine("tiny-plus")
    code = f"""
import sys, numpy as np
import illume_edge.runtime
from illume_edge.runtime.pipeline import Pipeline
p = Pipeline.load({str(engine_dir)!r})
img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
p.understand(img, "q", max_new_tokens=2)
p.generate("x", steps=1)
p.generate("x", decoder="vq")
p.edit(img, "y", steps=1)
bad = [m for m in sys.modules if m == "torch" or m.startswith("torch.") or m.startswith("transformers")]
assert not bad, bad
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------
# Bad inputs fail clearly
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipe(tiny_engine):
    return Pipeline.load(tiny_engine("tiny-plus")[0])


@pytest.mark.parametrize("image, message", [
    (b"not an image", "not a readable image"),
    (np.zeros((0, 0, 3), np.uint8), "image"),
    (np.zeros((10, 10), np.uint8), "expected uint8 \\[H, W, 3\\]"),
    (np.zeros((10, 10, 3), np.float32), "expected uint8"),
])
def test_bad_images(tiny_pipe, image, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe.understand(image, "what?")


def test_huge_image_is_refused(tiny_pipe, tmp_path):
    from PIL import Image

    path = tmp_path / "huge.png"
    Image.new("RGB", (9000, 8000), "white").save(path)
    with pytest.raises(ValueError, match="pixels"):
        tiny_pipe.understand(path, "what?")


def test_bad_prompts_and_resolutions(tiny_pipe):
    with pytest.raises(ValueError, match="non-empty"):
        tiny_pipe.generate("  ")
    with pytest.raises(ValueError, match="question"):
        tiny_pipe.understand(_image(0, 32, 32), "")
    with pytest.raises(ValueError, match="not supported by tiny-plus; choose one of 256x256"):
        tiny_pipe.generate("a dog", resolution="300x300")
    with pytest.raises(ValueError, match="expected HxW"):
        tiny_pipe.generate("a dog", resolution="big")
    with pytest.raises(ValueError, match="decoder 'gan'"):
        tiny_pipe.generate("a dog", decoder="gan")


def test_session_validates_inputs_before_onnxruntime(tiny_pipe):
    head = tiny_pipe.engine.session("head_level0")
    ok = np.zeros((1, 64), np.float32)
    with pytest.raises(EngineError, match="head_level0: input hidden dtype float64, expected float32"):
        head.run({"hidden": ok.astype(np.float64)})
    with pytest.raises(EngineError, match="head_level0: input hidden has rank 1"):
        head.run({"hidden": ok[0]})
    with pytest.raises(EngineError, match="head_level0: input hidden dim 1 is 63, expected 64"):
        head.run({"hidden": ok[:, :63]})
    with pytest.raises(EngineError, match=r"dim 0 \(batch\) is 9, outside the exported range \[1, 8\]"):
        head.run({"hidden": np.zeros((9, 64), np.float32)})
    with pytest.raises(EngineError, match=r"inputs missing \['hidden'\], unknown \['x'\]"):
        head.run({"x": ok})
    llm = tiny_pipe.engine.session("llm")
    with pytest.raises(EngineError, match="llm: token id 999999 outside"):
        tiny_pipe.runner.prefill([[1, 2, 999999]])
    assert llm.name == "llm"


def test_binding_checks_what_is_rebound_against_what_stays_bound(tiny_pipe):
    """After its first run a binding checks only the inputs rebound since (a decode step rebinds 4 of the llm
    graph's inputs), but still against the dims of the inputs that stay bound (every layer's K/V)."""
    runner = tiny_pipe.runner
    state = runner.prefill([[1, 2, 3]], max_new_tokens=4)
    binding = state.binding
    good = {k: binding.feeds[k] for k in ("input_ids", "attention_mask", "position_ids")}
    batch = [d for d in runner.session.inputs["attention_mask"].shape if isinstance(d, str)][0]
    binding.bind_inputs({"attention_mask": np.ones((2, good["attention_mask"].shape[1]), np.int64)})
    with pytest.raises(EngineError, match=rf"attention_mask dim 0 \({batch}\) is 2 but another input has {batch}=1"):
        binding.run()
    binding.bind_inputs({"attention_mask": good["attention_mask"].astype(np.int32)})
    with pytest.raises(EngineError, match="llm: input attention_mask dtype int32, expected int64"):
        binding.run()
    binding.bind_inputs(good)
    binding.run()  # the contract holds again: the step runs
    checked = []
    validate = runner.session.validate
    runner.session.validate = lambda feeds, names=None, known=None: checked.append(sorted(names)) or validate(
        feeds, names, known)
    try:
        runner.feed(state, np.array([[5]]))
    finally:
        runner.session.validate = validate
    assert checked == [["attention_mask", "image_embeds", "input_ids", "position_ids"]]


def test_io_binding_path_equals_plain_run(tiny_pipe):
    head = tiny_pipe.engine.session("head_level1")
    hidden = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    plain = head.run({"hidden": hidden})["logits"]
    buf = np.empty_like(plain)
    bound = head.run({"hidden": hidden}, out={"logits": buf})["logits"]
    assert bound is buf
    np.testing.assert_array_equal(bound, plain)
    with pytest.raises(EngineError, match="output buffer logits dtype float64"):
        head.run({"hidden": hidden}, out={"logits": buf.astype(np.float64)})


def test_engine_errors(tiny_engine, tmp_path):
    src, _ = tiny_engine("tiny-v1")
    dst = tmp_path / "e"
    shutil.copytree(src, dst)
    (dst / "vae_decoder.onnx").unlink()
    with pytest.raises(EngineError, match="vae_decoder.onnx: missing"):
        Pipeline.load(dst)
    with pytest.raises(EngineError, match="does not exist"):
        Pipeline.load(tmp_path / "nowhere")
    shutil.rmtree(dst)
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["assets"]["tokenizer"]["sha256"] = "0" * 64
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="tokenizer.json: sha256"):
        Pipeline.load(dst)


def test_cli_reports_bad_input_in_one_line(tiny_engine, tmp_path):
    engine_dir, _ = tiny_engine("tiny-plus")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    cmd = [sys.executable, "-m", "illume_edge.cli"]
    out = subprocess.run(cmd + ["understand", "--engine", str(engine_dir), "--image", str(bad), "q"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "not a readable image" in out.stderr
    out = subprocess.run(cmd + ["generate", "--engine", str(engine_dir), "--resolution", "1x1", "--out",
                                str(tmp_path / "o.png"), "dog"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not supported" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("buffers", ["auto", "ortvalue"])
@pytest.mark.parametrize("graph,layout", [("fused", "shared"), ("portable", "concat")])
def test_llm_runner_kv_positions_and_padding_equal_full_recompute(tiny_engine, graph, layout, buffers):
    """Both KV layouts (ping-pong buffers for the portable graph, one shared buffer for the fused one), left
    padding and multi-token feeds (a 2-row feed of 3 tokens: the fused graph takes it a token at a time)
    vs recomputing each row from scratch. `buffers="ortvalue"`: the KV cache and hidden state are OrtValues
    bound by address, the GPU's code path with the device string "cpu"."""
    runner = LLMRunner(Engine.load(tiny_engine("tiny-plus", graph)[0], SessionOptions(buffers=buffers)))
    assert runner.kv_layout == layout
    runs = runner.runs
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(0, 5000, 9)), list(rng.integers(0, 5000, 4))]
    state = runner.prefill(rows, None, max_new_tokens=8)
    hidden = [state.hidden.copy()]
    for chunk in ([[11], [12]], [[13, 14, 15], [16, 17, 18]], [[19], [20]]):
        runner.feed(state, np.array(chunk))
        hidden.append(state.hidden.copy())
    assert runner.runs - runs == 1 + 1 + (3 if layout == "shared" else 1) + 1

    def full(seq):  # one unpadded row from scratch
        return runner.prefill([seq]).hidden[0]

    for b, row in enumerate(rows):
        seq = list(row)
        expected = [full(seq)]
        for chunk in ([11, 12], [13, 14, 15, 16, 17, 18], [19, 20]):
            part = chunk[:len(chunk) // 2] if b == 0 else chunk[len(chunk) // 2:]
            seq += part
            expected.append(full(seq))
        for step, (h, e) in enumerate(zip(hidden, expected)):
            np.testing.assert_allclose(h[b], e, atol=1e-5, err_msg=f"row {b} step {step}")
    assert state.length == 9 + 1 + 3 + 1 and state.next_pos.tolist() == [14, 9]
    assert state.kv.nbytes == (1 if layout == "shared" else 2) * 2 * runner.num_layers * 2 * runner.kv_heads \
        * state.kv.capacity * runner.head_dim * 4


@pytest.mark.parametrize("buffers", ["auto", "ortvalue"])
@pytest.mark.parametrize("batch", [1, 2])
def test_static_decode_steps_run_one_binding_at_fixed_addresses(tiny_engine, buffers, batch, monkeypatch):
    """Static decode (the fused graph): every single-token step of a request runs with the same input
    buffers (ids, positions [B, 1]; the mask over the whole capacity), bound once and rewritten in place, so
    their addresses and shapes never change (what a CUDA graph replays); a multi-token feed binds its own
    inputs and the next single-token step binds the step buffers again (batch 1; a 2-row batch is fed a
    token at a time, all static). The hidden states equal those of the same runner feeding every step
    through per-step bindings (the mask cut to its slots)."""
    from illume_edge.runtime.session import Binding

    engine = Engine.load(tiny_engine("tiny-plus", "fused")[0], SessionOptions(buffers=buffers))
    runner = LLMRunner(engine)
    assert runner.static_decode
    assert not LLMRunner(Engine.load(tiny_engine("tiny-plus", "portable")[0])).static_decode
    bound: list[set] = []
    real_bind = Binding.bind_inputs
    monkeypatch.setattr(Binding, "bind_inputs", lambda self, feeds: (bound.append(set(feeds)),
                                                                      real_bind(self, feeds))[1])
    rows, capacity = [[5, 6, 7, 8, 9], [10, 11]][:batch], 5 + 9
    feeds = [[[20], [21]], [[22], [23]], [[24, 25], [26, 27]], [[28], [29]], [[30], [31]], [[32], [33]]]
    feeds = [chunk[:batch] for chunk in feeds]

    def decode(static: bool):
        runner.static_decode = static
        state = runner.prefill(rows, None, max_new_tokens=capacity - 5)
        bound.clear()
        hidden, seen = [], []
        for chunk in feeds:
            runner.feed(state, np.array(chunk))
            hidden.append(state.hidden.copy())
            f = state.binding.feeds
            seen.append(tuple((name, f[name].address, f[name].shape) for name in ("input_ids", "attention_mask",
                                                                                   "position_ids")
                              if hasattr(f[name], "address")))
        return state, hidden, seen

    state, got, seen = decode(True)
    step = state.step
    assert step.mask.shape == (batch, capacity) and step.ids.shape == step.positions.shape == (batch, 1)
    singles = [s for s, chunk in zip(seen, feeds) if len(chunk[0]) == 1]
    assert len(set(singles)) == 1 and singles[0][1][2] == (batch, capacity)  # one set of addresses and shapes
    # the step buffers bound at the first step; batch 1: the 2-token feed binds its own inputs, and the step
    # after it the step buffers again
    assert sum("input_ids" in b for b in bound) == (3 if batch == 1 else 1)
    _, want, _ = decode(False)
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=0, err_msg=f"feed {i}")


def test_cuda_graph_runs_replay_one_shapes_buffers_under_one_graph_id(tiny_engine, monkeypatch):
    """SessionOptions(cuda_graph=True), the runner's side (on the CPU onnxruntime ignores the graph ids): the
    static decode steps run under the request shape's graph id, prefills outside any graph (-1); a finished
    request's buffers (KV cache, hidden state, step inputs) serve the next request of the same shape, so the
    addresses a captured graph replays stay valid; a second live request of that shape gets fresh buffers and
    no graph; capacities are rounded up to CUDA_GRAPH_CAPACITY_STEP. Outputs equal a runner without graphs."""
    import gc

    from illume_edge.runtime.llm_runner import CUDA_GRAPH_CAPACITY_STEP
    from illume_edge.runtime.session import Binding

    engine_dir = tiny_engine("tiny-plus", "fused")[0]
    runner = LLMRunner(Engine.load(engine_dir, SessionOptions(cuda_graph=True)))
    plain = LLMRunner(Engine.load(engine_dir))
    assert runner.cuda_graph and runner.session.cuda_graph and not plain.cuda_graph
    assert not Engine.load(engine_dir, SessionOptions(cuda_graph=True)).session("head_text").cuda_graph
    runs = []
    real_run = Binding.run

    def spy(self, run_options=None):
        gid = None if run_options is None else int(run_options.get_run_config_entry("gpu_graph_id"))
        f = self.feeds
        runs.append((gid, f["input_ids"].shape[1], tuple(getattr(f[n], "address", None) for n in
                                                          ("input_ids", "attention_mask", "past_key_values.0.key"))))
        return real_run(self, run_options)

    monkeypatch.setattr(Binding, "run", spy)

    def request(r, rows, steps):
        runs.clear()
        state = r.prefill(rows, None, max_new_tokens=steps)
        hidden = [state.hidden.copy()]
        for t in range(steps):
            r.feed(state, np.full((len(rows), 1), 30 + t))
            hidden.append(state.hidden.copy())
        return state, hidden, list(runs)

    first, h1, runs1 = request(runner, [[5, 6, 7, 8, 9]], 4)
    assert first.kv.capacity == CUDA_GRAPH_CAPACITY_STEP and first.graph_id == 1
    assert runs1[0][0] == -1 and {gid for gid, _, _ in runs1[1:]} == {1}
    step_addresses = {a for _, _, a in runs1[1:]}
    assert len(step_addresses) == 1
    _, want, _ = request(plain, [[5, 6, 7, 8, 9]], 4)
    for g, w in zip(h1, want):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=0)
    # a second request of the same shape while the first is alive: fresh buffers, no graph
    second, _, runs2 = request(runner, [[11, 12]], 6)
    assert second.graph_id == -1 and {gid for gid, _, _ in runs2} == {-1}
    assert second.kv is not first.kv
    # once the first has finished, the next request of that shape (another prompt length) reuses its buffers
    kv, step = first.kv, first.step
    del first, second
    gc.collect()
    third, h3, runs3 = request(runner, [[13, 14, 15]], 5)
    assert third.kv is kv and third.step is step and third.graph_id == 1
    assert {a for _, _, a in runs3[1:]} == step_addresses and {gid for gid, _, _ in runs3[1:]} == {1}
    _, want3, _ = request(plain, [[13, 14, 15]], 5)
    for g, w in zip(h3, want3):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=0)
    # another shape (a CFG pair) has its own graph
    pair, _, runs4 = request(runner, [[5, 6, 7], [8, 9]], 3)
    assert pair.graph_id == 2 and {gid for gid, _, _ in runs4[1:]} == {2}
    with pytest.raises(EngineError, match="use -1"):
        runner.session.run_options(0)
    # on a stream shared with the sampling kernel a decode step's run may also skip the host's wait
    from illume_edge.runtime.session import Session

    assert runner.session.run_options(1, synchronize=False) is runner.session.run_options(1)  # not shared
    monkeypatch.setattr(Session, "shares_stream", property(lambda self: True))
    ro = runner.session.run_options(1, synchronize=False)
    assert ro is runner.session.run_options(1, synchronize=False) is not runner.session.run_options(1)
    assert ro.get_run_config_entry("gpu_graph_id") == "1"
    assert ro.get_run_config_entry("disable_synchronize_execution_providers") == "1"
    assert plain.session.run_options(7, synchronize=False).get_run_config_entry(
        "disable_synchronize_execution_providers") == "1"  # no graphs: the graph id is ignored
    assert plain.session.run_options(7) is None


def test_a_token_written_into_the_step_ids_on_the_device_is_not_written_again(tiny_engine, monkeypatch):
    """A device sampler writes the next token into `runner.step_ids(state)` and says so (`ids_written`): the
    step that feeds that token leaves the buffer alone (it would be a host-to-device copy on a GPU); a
    different token is written as usual. The hidden states are those of a run that wrote every step."""
    from illume_edge.runtime.device_buffer import DeviceArray

    runner = LLMRunner(Engine.load(tiny_engine("tiny-plus", "fused")[0]))
    rows = [[5, 6, 7], [8, 9]]
    want = runner.prefill(rows, None, max_new_tokens=3)
    state = runner.prefill(rows, None, max_new_tokens=3)
    ids = runner.step_ids(state)
    writes = []
    real_write = DeviceArray.write
    monkeypatch.setattr(DeviceArray, "write", lambda self, v: (writes.append(self is ids), real_write(self, v))[1])
    ids.host()[:] = 42  # what the kernel does on the device
    runner.ids_written(state, 42)
    for token in (42, 43):
        runner.feed(state, np.array([[token], [token]]))
        runner.feed(want, np.array([[token], [token]]))
        np.testing.assert_array_equal(state.hidden, want.hidden)
    assert writes.count(True) == 1 and ids.host().tolist() == [[43], [43]]  # 42 was not written again
    assert runner.step_ids(runner.prefill(rows, None, 1)) is not None
    portable = LLMRunner(Engine.load(tiny_engine("tiny-plus", "portable")[0]))
    assert portable.step_ids(portable.prefill(rows, None, 1)) is None


@pytest.mark.parametrize("buffers", ["auto", "ortvalue"])
@pytest.mark.parametrize("graph", ["fused", "portable"])
def test_head_binding_in_the_decode_state_matches_a_plain_head_run(tiny_engine, graph, buffers):
    """runner.logits(head, state=state): the head's IO binding and logits buffer live in the state, bound
    once; every step's logits equal a plain run of the head graph on a copy of the hidden state, for each
    head range and a 2-row batch. On the CPU the host array is the buffer itself; with OrtValue buffers (the
    GPU's path) it is a copy of the same device buffer. A hidden array that is not the state's is refused."""
    runner = LLMRunner(Engine.load(tiny_engine("tiny-plus", graph)[0], SessionOptions(buffers=buffers)))
    state = runner.prefill([[5, 6, 7, 8], [9, 10]], None, max_new_tokens=4)
    heads = list(runner.cfg.head_ranges())
    first, buffers_seen = {}, {}
    for step in range(4):
        for head in heads:
            got = runner.logits(head, state=state)
            want = runner.logits(head, state.hidden.copy())
            np.testing.assert_array_equal(got, want, err_msg=f"{head} step {step}")
            if step:  # numpy memory: the buffer itself, rewritten in place; an OrtValue's: a copy
                assert (got is first[head]) == (buffers == "auto")
            first.setdefault(head, got)
            buffers_seen.setdefault(head, state.heads[head][1])
            assert state.heads[head][1] is buffers_seen[head]  # one device buffer per head and state
        runner.feed(state, np.array([[11 + step], [12 + step]]))
    assert set(state.heads) == set(heads)
    with pytest.raises(EngineError, match="pass no hidden"):
        runner.logits(heads[0], state.hidden.copy(), state)


def test_stream_text_stops_at_eos_unless_told_to_ignore_it(tiny_engine):
    """A model whose text head always prefers <|im_end|>: the answer ends at once, or, with ignore_eos (the
    benchmarks' fixed-length answers), runs all max_new_tokens steps."""
    from types import SimpleNamespace

    from illume_edge.config import preset
    from illume_edge.runtime.decode_loops import stream_text
    from illume_edge.runtime.prompts import TextTokenizer

    cfg = preset("tiny-plus")
    tok = TextTokenizer.from_file(tiny_engine("tiny-plus")[0] / "tokenizer.json", cfg)

    class EndRunner:
        def __init__(self):
            self.cfg, self.fed = cfg, 0

        def prefill(self, rows, image_embeds, max_new_tokens):
            return SimpleNamespace(hidden=np.zeros((1, 4), np.float32), fed=[list(rows[0])])

        def logits(self, head, hidden=None, state=None):
            out = np.zeros((1, cfg.head_ranges()["text"][1]), np.float32)
            out[0, cfg.tokens.im_end] = 10.0
            return out

        def feed(self, state, tokens):
            self.fed += 1
            state.fed[0].extend(tokens[0].tolist())
            return None

    greedy = SamplingParams(temperature=0.0)
    for ignore, feeds in ((False, 0), (True, 7)):
        runner = EndRunner()
        list(stream_text(runner, tok, [1, 2, 3], None, greedy, 0, 8, ignore_eos=ignore))
        assert runner.fed == feeds  # the last of the 8 tokens is never fed back


def test_an_environment_without_onnxruntime_is_told_which_extra(tiny_engine, monkeypatch):
    """Neither onnxruntime flavour is a base dependency (both install the same module): without one, loading
    an engine names the `cpu` and `gpu` extras rather than failing on an import deep inside."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(EngineError, match=r"onnxruntime is not installed.*illume-edge\[cpu\].*illume-edge\[gpu\]"):
        Engine.load(tiny_engine("tiny-plus")[0])
