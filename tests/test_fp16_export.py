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
        assert [(t.name, t.dtype) for t in comp.inputs] == [(t.name, t.dtype) for t in ref.inputs], name
        assert [(t.name, t.dtype) for t in comp.outputs] == [(t.name, t.dtype) for t in ref.outputs], name
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
