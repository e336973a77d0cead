"""The runtime on a GPU (onnxruntime-gpu's CUDA provider): device-resident request buffers, static decode
steps replayed as CUDA graphs, and the sampling kernel writing tokens into the next step's ids. Marked `gpu`:
skipped cleanly without an NVIDIA GPU (tests/conftest.py) or without onnxruntime-gpu. The same code paths run
on the CPU in test_runtime.py / test_device_buffer.py (OrtValue buffers, graph ids, the kernel's emulation)."""
import numpy as np
import pytest

from illume_edge.runtime.engine import Engine
from illume_edge.runtime.llm_runner import LLMRunner
from illume_edge.runtime.session import SessionOptions

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
HIDDEN_REL = 2e-2  # fp16 compute: CUDA's GEMMs and flash attention sum in another order than the CPU kernels
# The image-loop test ran past a 150 s call on an H100 (2026-11-27) with no trace of where. A suspect, not
# established: onnxruntime's default exhaustive cuDNN algorithm search on every convolution of the VQ decoder
# and the encoders at their first run. These tests check the sampling, not the convolutions' speed.
QUICK_CONV_SETUP = {"CUDAExecutionProvider": {"cudnn_conv_algo_search": "HEURISTIC"}}


@pytest.fixture(scope="module")
def fp16_engine(tiny_checkpoint, tmp_path_factory):
    """tiny-plus exported fp16 on the fused graph: onnxruntime's CUDA GroupQueryAttention takes float16 /
    bfloat16 only (session.check_cuda_attention refuses an fp32 fused engine on CUDA)."""
    import torch

    from illume_edge.export.checkpoint import load_checkpoint
    from illume_edge.export.engine import export_engine

    ckpt = tiny_checkpoint("tiny-plus")
    out = tmp_path_factory.mktemp("gpu-fp16") / "tiny-plus-fp16"
    export_engine(load_checkpoint(ckpt, dtype=torch.float16), out, ckpt / "mllm" / "tokenizer.json",
                  precision="fp16", progress=lambda s: None, llm_graph="fused")
    return out


@pytest.fixture()
def cuda_provider():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) is not installed")


def _greedy(runner: LLMRunner, rows, steps: int, forced=None):
    """Greedy tokens and hidden states per step; with `forced`, feed those tokens instead (teacher forcing,
    so that an fp16 near-tie flipping one argmax does not change every later step)."""
    state = runner.prefill(rows, None, max_new_tokens=steps)
    tokens, hidden = [], []
    for t in range(steps):
        logits = runner.logits("text", state=state)
        tok = np.argmax(logits, axis=1)[:, None]
        tokens.append(tok[:, 0].tolist())
        hidden.append(state.hidden.copy())
        runner.feed(state, tok if forced is None else np.array(forced[t])[:, None])
    return tokens, hidden


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_decode_equals_cpu_decode(fp16_engine, cuda_provider, cuda_graph):
    """Decode of a batch of unequal rows (right-padded in the cache) with every request buffer in GPU memory
    (the fp16 KV cache appended in place), with and without the decode step replayed as a CUDA graph, over two
    requests of one shape (the second replays the first's graph on reused buffers): the CPU runner's hidden
    states within HIDDEN_REL, teacher-forced with the CPU's greedy tokens, and >= 90% of the greedy tokens
    equal."""
    gpu = LLMRunner(Engine.load(fp16_engine, SessionOptions(providers=CUDA, device="cuda", cuda_graph=cuda_graph)))
    # the CPU provider pinned: with onnxruntime-gpu installed the default would be CUDA
    cpu = LLMRunner(Engine.load(fp16_engine, SessionOptions(providers=["CPUExecutionProvider"])))
    assert gpu.cuda_graph == cuda_graph and gpu.kv_dtype == np.float16 and cpu.session.device == "cpu"
    for rows in ([[5, 6, 7, 8, 9], [10, 11]], [[12, 13, 14], [15, 16, 17, 18]]):
        want_tokens, want_hidden = _greedy(cpu, rows, 12)
        got_tokens, got_hidden = _greedy(gpu, rows, 12, forced=want_tokens)
        same = sum(a == b for g, w in zip(got_tokens, want_tokens) for a, b in zip(g, w))
        assert same >= 0.9 * 2 * 12
        for g, w in zip(got_hidden, want_hidden):
            assert np.abs(g - w).max() <= HIDDEN_REL * np.abs(w).max()


@pytest.mark.gpu
def test_cuda_refuses_a_float32_fused_engine(tiny_engine, cuda_provider):
    from illume_edge.manifest import EngineError

    with pytest.raises(EngineError, match="float16 / bfloat16 only"):
        Engine.load(tiny_engine("tiny-plus", "fused")[0], SessionOptions(providers=CUDA, device="cuda")).session("llm")


@pytest.mark.gpu
def test_cuda_image_loop_with_the_kernel_equals_the_host_sampler(fp16_engine, cuda_provider):
    """Generation on the GPU with the real sampling kernel writing each token into the next step's input
    ids (CFG pair, top-k, top-p, repetition penalty) and the decode step as a CUDA graph: the codes of the
    numpy sampler on the same engine and logits (>= 99% equal: only the kernel's float64 summation order
    differs, docs/gpu.md, so a flip is ~1e-16-likely per draw, and one flip changes every later code)."""
    from illume_edge.runtime.pipeline import Pipeline

    engine = Engine.load(fp16_engine, SessionOptions(providers=CUDA, device="cuda", cuda_graph=True,
                                                   provider_options=QUICK_CONV_SETUP))
    args = dict(resolution="256x256", seed=3, cfg=2.0, top_k=64, top_p=0.9, repetition_penalty=1.1,
                decoder="vq")
    want = Pipeline(engine, sampler="host").generate("a red circle", **args)
    got = Pipeline(engine, sampler="device").generate("a red circle", **args)
    same = sum(int((a == b).sum()) for a, b in zip(got.codes, want.codes))
    assert same / sum(c.size for c in want.codes) >= 0.99


@pytest.mark.gpu
def test_cuda_text_loop_with_the_kernel_equals_the_host_sampler(fp16_engine, cuda_provider):
    """Understanding on the GPU with the kernel drawing every text token on the device (ban ranges, top-k,
    top-p, penalty) into the next step's input ids, under CUDA graphs: the numpy sampler's answer."""
    from illume_edge.runtime.pipeline import Pipeline

    engine = Engine.load(fp16_engine, SessionOptions(providers=CUDA, device="cuda", cuda_graph=True,
                                                   provider_options=QUICK_CONV_SETUP))
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    args = dict(max_new_tokens=32, seed=5, temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.2)
    want = Pipeline(engine, sampler="host").understand(image, "what is this?", **args)
    got = Pipeline(engine, sampler="device").understand(image, "what is this?", **args)
    assert got.text == want.text


@pytest.mark.gpu
def test_a_fused_engine_on_the_cuda_provider_keeps_its_cache_on_the_gpu_unasked(fp16_engine, cuda_provider):
    """No device asked for, the CUDA provider chosen: the runtime binds the fused graph's shared KV cache in GPU
    memory itself (session.buffer_device; bound on the host, onnxruntime's copies break the kernel's shared
    buffer and the cache comes back wrong), and decode gives the CPU's greedy tokens."""
    gpu = LLMRunner(Engine.load(fp16_engine, SessionOptions(providers=CUDA)))
    cpu = LLMRunner(Engine.load(fp16_engine, SessionOptions(providers=["CPUExecutionProvider"])))
    assert gpu.session.device == "cuda" and not gpu.session.device_requested
    rows = [[5, 6, 7, 8, 9], [10, 11]]
    want_tokens, _ = _greedy(cpu, rows, 12)
    got_tokens, _ = _greedy(gpu, rows, 12, forced=want_tokens)
    same = sum(a == b for g, w in zip(got_tokens, want_tokens) for a, b in zip(g, w))
    assert same >= 0.9 * 2 * 12
