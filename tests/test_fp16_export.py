"""--precision fp16: fp16 weights and compute behind the same fp32 graph contract, half the bytes, outputs
within fp16 tolerance of the fp32 engine (run here on onnxruntime's CPU provider)."""
import numpy as np
import onnx
import pytest
import torch

from illume_edge.runtime.engine import Engine
from illume_edge.runtime.llm_runner import LLMRunner


@pytest.fixture(scope="module")
def engines(tiny_checkpoint, tiny_engine, tmp_path_factory):
    from illume_edge.export.checkpoint import load_checkpoint
    from illume_edge.export.engine import export_engine

    ckpt = tiny_checkpoint("tiny-v1")
    out = tmp_path_factory.mktemp("fp16") / "tiny-v1-fp16"
    mods = load_checkpoint(ckpt, dtype=torch.float16)
    assert mods.llm.get_input_embeddings().weight.dtype == torch.float16  # loaded once, already half
    export_engine(mods, out, ckpt / "mllm" / "tokenizer.json", precision="fp16", progress=lambda s: None)
    return Engine.load(tiny_engine("tiny-v1")[0]), Engine.load(out)


def test_precision_contract_and_size(engines):
    fp32, fp16 = engines
    assert fp16.manifest.precision == "fp16"
    for name, comp in fp16.manifest.components.items():
        assert comp.precision == ("fp32" if name == "vae_decoder" else "fp16"), name
        ref = fp32.manifest.component(name)
        # the fp32 contract, except the LLM's KV cache, kept fp16 (a step appends to it in place, no casts)
        kv = lambda t: t.name.startswith(("past_key_values.", "present."))  # noqa: E731
        want = lambda ts: [(t.name, "float16" if name == "llm" and kv(t) else t.dtype) for t in ts]  # noqa: E731
        assert [(t.name, t.dtype) for t in comp.inputs] == want(ref.inputs), name
        assert [(t.name, t.dtype) for t in comp.outputs] == want(ref.outputs), name
        if name == "llm":
            assert sum(kv(t) for t in comp.inputs) == 2 * fp16.config.llm.num_layers
        model = onnx.load(str(fp16.dir / comp.path), load_external_data=False)
        weights: dict[int, int] = {}  # element type -> elements (small fp32 constants, e.g. sinusoid tables)
        for t in model.graph.initializer:
            weights[t.data_type] = weights.get(t.data_type, 0) + int(np.prod(t.dims))
        want = onnx.TensorProto.FLOAT if name == "vae_decoder" else onnx.TensorProto.FLOAT16
        assert weights.get(want, 0) >= 0.99 * sum(weights.values()), f"{name}: initializer elements {weights}"
    size = lambda e, n: sum(f.bytes for f in e.manifest.component(n).files)  # noqa: E731
    assert size(fp16, "llm") < 0.6 * size(fp32, "llm") and size(fp16, "head_text") < 0.6 * size(fp32, "head_text")


def _rel(a, b):
    return float(np.abs(a - b).max() / max(1e-6, np.abs(b).max()))


def test_outputs_within_fp16_tolerance(engines):
    fp32, fp16 = engines
    cfg = fp32.config
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5000, (2, 7))
    ids[0, 2] = cfg.llm.vocab_rows + 1  # one spliced image row
    table = rng.standard_normal((3, 64)).astype(np.float32)
    a, b = (LLMRunner(e).prefill(ids.tolist(), table, max_new_tokens=1).hidden for e in (fp32, fp16))
    assert _rel(b, a) < 2e-2
    for head in cfg.head_ranges():
        x, y = (e.session(f"head_{head}").run({"hidden": a})["logits"] for e in (fp32, fp16))
        assert _rel(y, x) < 2e-2, head
    latent = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    unet = {"latent": latent, "timestep": np.full((2,), 500.0, np.float32),
            "code_map": rng.standard_normal((2, cfg.diffusion.unet.code_channels, 8, 8)).astype(np.float32),
            "time_ids": np.zeros((2, 6), np.float32)}
    x, y = (e.session("unet").run(unet)["noise_pred"] for e in (fp32, fp16))
    assert _rel(y, x) < 3e-2
    image = rng.uniform(-1, 1, (3, 56, 56)).astype(np.float32)
    from illume_edge.runtime.image_prep import vit_inputs

    v = vit_inputs(image, cfg.branches[0].encoder)
    vf = {"pixel_values": v.pixel_values, "rotary_cos": v.rotary_cos, "rotary_sin": v.rotary_sin}
    x, y = (e.session("vision_semantic").run(vf)["features"] for e in (fp32, fp16))
    assert _rel(y, x) < 2e-2


def test_kv_cache_is_bound_to_the_attention_kernel_directly(engines):
    """The fp16 fused graph feeds its fp16 past K/V inputs straight into GroupQueryAttention and returns the
    kernel's present outputs as they are: no Cast on the cache, so past and present stay one buffer that a
    decode step appends to in place (the CUDA kernel's shared-buffer fast path; a cast would copy the whole
    cache twice per step). Decoding a batch of unequal rows then stays within fp16 tolerance of the fp32 engine."""
    fp32, fp16 = engines
    model = onnx.load(str(fp16.dir / fp16.manifest.component("llm").path), load_external_data=False)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    if not gqa:
        pytest.skip("the portable llm graph (no fused attention)")
    inputs, outputs = {i.name for i in model.graph.input}, {o.name for o in model.graph.output}
    for n in gqa:
        assert {n.input[3], n.input[4]} <= inputs and {n.output[1], n.output[2]} <= outputs, n.name
    runners = [LLMRunner(e) for e in (fp32, fp16)]
    assert [r.kv_dtype for r in runners] == [np.float32, np.float16]
    states = [r.prefill([[5, 6, 7, 8, 9], [10, 11]], max_new_tokens=4) for r in runners]
    for t in range(4):
        for r, st in zip(runners, states):
            r.feed(st, np.array([[20 + t], [30 + t]]))
        assert _rel(states[1].hidden, states[0].hidden) < 2e-2, t


def test_cuda_attention_check(engines):
    """onnxruntime's CUDA GroupQueryAttention takes float16 / bfloat16 only: a session asked for the CUDA
    provider refuses an fp32 fused graph (naming the fix); with the providers chosen automatically it runs
    that graph on the CPU provider and warns; the fp16 graph and every CPU session go through."""
    from illume_edge.manifest import EngineError
    from illume_edge.runtime.session import check_cuda_attention

    fp32, fp16 = engines
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    llm32, llm16 = fp32.manifest.component("llm"), fp16.manifest.component("llm")
    if "GroupQueryAttention" not in llm32.ops:
        pytest.skip("the portable llm graph (no fused attention)")
    with pytest.raises(EngineError, match=r"llm \(llm.onnx\).*float32.*--precision fp16"):
        check_cuda_attention("llm", llm32, cuda)  # asked for CUDA: refused
    with pytest.warns(UserWarning, match="runs on the CPU provider.*--precision fp16"):
        assert check_cuda_attention("llm", llm32, cuda, explicit=False) == ["CPUExecutionProvider"]
    assert check_cuda_attention("llm", llm16, cuda) == cuda
    assert check_cuda_attention("llm", llm32, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    head = fp32.manifest.component("head_text")  # no attention in it
    assert check_cuda_attention("head_text", head, cuda) == cuda


def test_sessions_ask_for_cuda_by_provider_device_or_graphs(engines, monkeypatch):
    """What counts as asking for CUDA: the providers, device "cuda" (buffers a CPU session cannot bind) or
    CUDA graphs. Asked, an fp32 fused llm is refused; not asked, it falls back to the CPU provider."""
    from illume_edge.manifest import EngineError
    from illume_edge.runtime import session as session_mod
    from illume_edge.runtime.session import SessionOptions

    fp32, _ = engines
    if "GroupQueryAttention" not in fp32.manifest.component("llm").ops:
        pytest.skip("the portable llm graph (no fused attention)")
    monkeypatch.setattr(session_mod, "choose_providers", lambda requested=None: requested or
                        ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.delenv("ILLUME_EDGE_PROVIDERS", raising=False)
    monkeypatch.delenv("ILLUME_EDGE_CUDA_GRAPH", raising=False)
    for opts in (SessionOptions(device="cuda"), SessionOptions(cuda_graph=True),
                 SessionOptions(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])):
        with pytest.raises(EngineError, match="--precision fp16"):
            Engine.load(fp32.dir, opts).session("llm")
    with pytest.warns(UserWarning, match="runs on the CPU provider"):
        llm = Engine.load(fp32.dir, SessionOptions()).session("llm")
    assert llm.providers == ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def quantized_fp16(engines, tmp_path_factory):
    """int4 / int8 weights over fp16 activations: the fp16 engine quantized (the GPU's quantized engine)."""
    from illume_edge.export.quantize import quantize_engine

    _, fp16 = engines
    out = {}
    for precision in ("int4", "int8"):
        dst = tmp_path_factory.mktemp(f"fp16-{precision}") / "engine"
        quantize_engine(fp16.dir, dst, precision, block_size=32, progress=lambda s: None)
        out[precision] = Engine.load(dst)
    return out


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_quantized_fp16_engine_keeps_fp16_activations_and_cache(engines, quantized_fp16, precision):
    """Quantizing the fp16 export keeps its float type everywhere but the weights: MatMulNBits takes fp16
    activations and fp16 block scales, the KV cache stays fp16 and bound straight to the attention kernel,
    so onnxruntime's CUDA attention (fp16 / bf16 only) accepts it. On the CPU provider, decoding two unequal
    rows stays within the tolerance of int4 / int8 weights of the fp32 engine (the bounds of
    tests/test_quantize.py: 0.30 / 0.03 of the logits' range; measured here 0.13-0.15 / 0.013-0.015, fp16
    rounding included)."""
    from illume_edge.runtime.session import check_cuda_attention

    fp32, fp16 = engines
    q = quantized_fp16[precision]
    quant = q.manifest.source["quantization"]
    assert (q.manifest.precision, quant["activations"]) == (precision, "float16")
    llm = q.manifest.component("llm")
    assert llm.precision == precision and "MatMulNBits" in llm.ops
    assert [(t.name, t.dtype) for t in llm.inputs] == [(t.name, t.dtype) for t in fp16.manifest.component("llm").inputs]
    model = onnx.load(str(q.dir / llm.path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(inits[n.input[2]].data_type == onnx.TensorProto.FLOAT16 for n in nbits)  # scales
    assert not [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]  # all quantized
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if "GroupQueryAttention" in llm.ops:
        assert check_cuda_attention("llm", llm, cuda) == cuda
        inputs, outputs = {i.name for i in model.graph.input}, {o.name for o in model.graph.output}
        for n in (n for n in model.graph.node if n.op_type == "GroupQueryAttention"):  # the cache, uncast
            assert {n.input[3], n.input[4]} <= inputs and {n.output[1], n.output[2]} <= outputs, n.name
    tol = {"int4": 0.30, "int8": 0.03}[precision]
    runners = [LLMRunner(e) for e in (fp32, q)]
    assert runners[1].kv_dtype == np.float16
    states = [r.prefill([[5, 6, 7, 8, 9], [10, 11]], max_new_tokens=4) for r in runners]
    for t in range(4):
        for r, st in zip(runners, states):
            r.feed(st, np.array([[20 + t], [30 + t]]))
        logits = [r.logits("text", state=st) for r, st in zip(runners, states)]
        rel = _rel(logits[1], logits[0])
        print(f"{precision} over fp16, step {t}: logits relative to fp32 {rel:.4f}")
        assert rel < tol, t


def test_quantizing_an_fp16_engine_refuses_the_cpu_dynamic_schemes(engines, tmp_path):
    """Dynamic int8 (vision / unet) quantizes float32 activations at run time: a CPU scheme, refused on an
    fp16 source with the fix named."""
    from illume_edge.export.quantize import quantize_engine
    from illume_edge.manifest import EngineError

    _, fp16 = engines
    with pytest.raises(EngineError, match=r"is fp16: dynamic int8 .*quantize the fp32 export, or drop --vision"):
        quantize_engine(fp16.dir, tmp_path / "x", "int4", vision="int8")


def test_the_fused_graph_keeps_host_values_out_of_device_ops(engines):
    """A shape-derived scalar meeting device data makes onnxruntime's CUDA provider insert a Memcpy node, and a
    graph with one cannot be captured as a CUDA graph (an H100 refused the fused graph until its W and S - 1
    came from Range on the device; export/placement.py). The fp16 fused graph has none; a graph that mixes a
    shape into a Where is caught."""
    import onnx
    from onnx import TensorProto, helper

    from illume_edge.export.placement import host_values_in_device_ops

    _, fp16 = engines
    llm = fp16.manifest.component("llm")
    if "GroupQueryAttention" not in llm.ops:
        pytest.skip("the portable llm graph (no fused attention)")
    assert host_values_in_device_ops(onnx.load(str(fp16.dir / llm.path), load_external_data=False)) == []

    x = helper.make_tensor_value_info("x", TensorProto.INT64, ["B", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["B"])
    zero = helper.make_tensor("zero", TensorProto.INT64, [], [0])
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "zero"], ["w"], name="w"),  # host: a shape and a constant
             helper.make_node("ReduceMax", ["x", "one"], ["m"], name="max", keepdims=0),  # device; axes on host
             helper.make_node("Greater", ["m", "zero"], ["gt"], name="gt"),
             helper.make_node("Where", ["gt", "m", "w"], ["y"], name="where")]  # device data meets host W
    bad = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [zero, one]))
    assert host_values_in_device_ops(bad) == ["where (Where) input 2: w"]


def test_providers_and_where_a_fused_engines_buffers_live(engines, monkeypatch):
    """TensorRT is chosen only where its library loads (onnxruntime-gpu lists it regardless, and every session
    then fails over noisily); a fused llm run by a GPU provider keeps its request buffers in GPU memory even
    when "cpu" was asked (its attention's past and present must be one device buffer), every other session
    where it was asked."""
    from illume_edge.runtime import session as session_mod
    from illume_edge.runtime.session import buffer_device, choose_providers, tensorrt_loadable

    monkeypatch.delenv("ILLUME_EDGE_PROVIDERS", raising=False)
    trt, cuda, cpu = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
    assert choose_providers(available=[cpu, cuda, trt], tensorrt_present=lambda: False) == [cuda, cpu]
    assert choose_providers(available=[cpu, cuda, trt], tensorrt_present=lambda: True) == [trt, cuda, cpu]
    assert choose_providers(available=[cpu]) == [cpu]

    def missing(lib):
        raise OSError(f"{lib}: cannot open shared object file")
    assert tensorrt_loadable(missing) is False and tensorrt_loadable(lambda lib: object()) is True

    fp32, fp16 = engines
    llm, head = fp16.manifest.component("llm"), fp16.manifest.component("head_text")
    if "GroupQueryAttention" not in llm.ops:
        pytest.skip("the portable llm graph (no fused attention)")
    assert buffer_device(llm, "cpu", [cuda, cpu]) == "cuda" and buffer_device(llm, "cpu", [trt, cuda]) == "cuda"
    assert buffer_device(llm, "cpu", [cpu]) == "cpu" and buffer_device(head, "cpu", [cuda, cpu]) == "cpu"
    assert buffer_device(llm, "cuda", [cuda, cpu]) == "cuda"
    # through a session (this onnxruntime has no CUDA provider: it runs on the CPU, but the choice stands)
    monkeypatch.setattr(session_mod, "choose_providers", lambda requested=None: requested or [cuda, cpu])
    s = Engine.load(fp16.dir).session("llm")
    assert s.device == "cuda" and s.device_requested is False
    s = Engine.load(fp16.dir, session_mod.SessionOptions(device="cuda")).session("llm")
    assert s.device == "cuda" and s.device_requested is True
