"""Weight-only int8/int4 engines (illume_edge.export.quantize) from the tiny fp32 engines.

Accuracy is measured against the fp32 engine on the same weights:
- head logits: max |q - fp32| / max |fp32| over random hidden states (int8 and int4 bounds below);
- greedy tokens, teacher-forced: the fp32 engine's greedy continuation is fed to both engines and the
  fraction of steps whose argmax agrees is asserted. Teacher forcing keeps one early flip from counting
  every later step as a miss. The tiny random models have nearly flat logits (top-2 gaps far below the int4
  noise), so these bounds are loose for int4 by construction; a trained model's gaps are much larger.
- image generation through the Pipeline: seeded codes agreement with the fp32 engine.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from illume_edge.manifest import EngineError, read_manifest
from illume_edge.runtime.engine import Engine
from illume_edge.runtime.llm_runner import LLMRunner
from illume_edge.runtime.pipeline import Pipeline

PRESETS = ["tiny-plus", "tiny-v1"]
PRECISIONS = ["int8", "int4"]
# max |q - fp32| / max |fp32| of head logits. Measured on the tiny engines: int8 ~0.008, int4 ~0.10
# (block 32, symmetric, accuracy_level 4 = int8 activations). Bounds: ~3x headroom.
LOGIT_TOL = {"int8": 0.03, "int4": 0.30}
# Teacher-forced greedy agreement with fp32 (fraction of steps). Measured: see the module docstring.
TOKEN_AGREEMENT = {"int8": 0.90, "int4": 0.50}


@pytest.fixture(scope="module")
def quantized(tiny_engine, tmp_path_factory):
    """(preset, precision) -> quantized engine folder (built once per module)."""
    from illume_edge.export.quantize import quantize_engine

    made = {}

    def get(preset, precision):
        key = (preset, precision)
        if key not in made:
            src, _ = tiny_engine(preset)
            dst = tmp_path_factory.mktemp(f"q-{preset}-{precision}") / "engine"
            quantize_engine(src, dst, precision, block_size=32, progress=lambda s: None)
            made[key] = dst
        return made[key]

    return get


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_manifest_records_precision_and_non_portability(quantized, tiny_engine, preset, precision):
    import onnx

    src = read_manifest(tiny_engine(preset)[0])
    dst_dir = quantized(preset, precision)
    m = read_manifest(dst_dir)
    assert m.precision == precision
    assert m.producer == src.producer
    q = m.source["quantization"]
    assert (q["precision"], q["block_size"], q["symmetric"], q["accuracy_level"]) == (precision, 32, True, 4)
    for name, comp in m.components.items():
        if name == "llm" or name.startswith("head_"):
            assert comp.precision == precision and comp.portable is False, name
            assert "MatMulNBits" in comp.ops and comp.files != src.components[name].files
            model = onnx.load(str(dst_dir / comp.path), load_external_data=False)
            assert set(comp.ops) == {n.op_type for n in model.graph.node}
            bits = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                    if a.name == "bits"}
            assert bits == {int(precision[3:])}
            assert sum(f.bytes for f in comp.files) < sum(f.bytes for f in src.components[name].files)
        else:  # untouched graphs keep their entry (and stay portable)
            assert comp == src.components[name], name
            assert comp.portable is True


def test_old_manifests_without_portable_still_parse(tiny_engine, tmp_path):
    """`portable` defaults to True: manifests written before the field existed still load."""
    from illume_edge.manifest import parse_manifest

    data = json.loads((tiny_engine("tiny-plus")[0] / "manifest.json").read_text())
    for comp in data["components"].values():
        comp.pop("portable", None)
    m = parse_manifest(data)
    assert all(c.portable for c in m.components.values())


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_head_logits_close_to_fp32(quantized, tiny_engine, preset, precision):
    ref = Engine.load(tiny_engine(preset)[0])
    eng = Engine.load(quantized(preset, precision))
    hidden = np.random.default_rng(0).standard_normal((4, ref.config.llm.hidden_size)).astype(np.float32)
    for head in ref.config.head_ranges():
        want = ref.session(f"head_{head}").run({"hidden": hidden})["logits"]
        got = eng.session(f"head_{head}").run({"hidden": hidden})["logits"]
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        assert rel <= LOGIT_TOL[precision], f"{head}: relative error {rel:.4f} > {LOGIT_TOL[precision]}"


def _teacher_forced_argmax(runner: LLMRunner, prompt: list[int], forced: list[int]) -> list[int]:
    state = runner.prefill([prompt], max_new_tokens=len(forced))
    out = [int(np.argmax(runner.logits("text", state.hidden)[0]))]
    for tok in forced[:-1]:
        runner.feed(state, np.array([[tok]], np.int64))
        out.append(int(np.argmax(runner.logits("text", state=state)[0])))
    return out


def _greedy(runner: LLMRunner, prompt: list[int], n: int) -> list[int]:
    state = runner.prefill([prompt], max_new_tokens=n)
    out = [int(np.argmax(runner.logits("text", state.hidden)[0]))]
    for _ in range(n - 1):
        runner.feed(state, np.array([[out[-1]]], np.int64))
        out.append(int(np.argmax(runner.logits("text", state=state)[0])))
    return out


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_greedy_text_tokens_agree_with_fp32(quantized, tiny_engine, preset, precision):
    ref = LLMRunner(Engine.load(tiny_engine(preset)[0]))
    q = LLMRunner(Engine.load(quantized(preset, precision)))
    rng = np.random.default_rng(1)
    agree = total = 0
    for _ in range(4):
        prompt = rng.integers(0, ref.cfg.tokens.endoftext, 12).tolist()
        want = _greedy(ref, prompt, 24)
        got = _teacher_forced_argmax(q, prompt, want)
        agree += sum(a == b for a, b in zip(got, want))
        total += len(want)
    frac = agree / total
    print(f"{preset} {precision}: teacher-forced greedy agreement {frac:.3f} ({agree}/{total})")
    assert frac >= TOKEN_AGREEMENT[precision], f"agreement {frac:.3f} < {TOKEN_AGREEMENT[precision]}"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_pipeline_runs_understanding_and_generation(quantized, tiny_engine, precision):
    """The quantized engine loads through Pipeline and runs both tasks; image codes are compared with the
    fp32 engine's (same seed) and reported; understanding must produce text."""
    ref = Pipeline.load(tiny_engine("tiny-plus")[0])
    pipe = Pipeline.load(quantized("tiny-plus", precision))
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    got = pipe.understand(img, "What is in the picture?", max_new_tokens=8, temperature=0.0)
    want = ref.understand(img, "What is in the picture?", max_new_tokens=8, temperature=0.0)
    print(f"{precision} understand: {got.text!r} vs fp32 {want.text!r}")
    assert isinstance(got.text, str) and {"prefill", "decode"} <= set(got.timings)
    a = pipe.generate("a red circle", seed=3, decoder="vq", top_k=1)
    b = ref.generate("a red circle", seed=3, decoder="vq", top_k=1)
    assert [c.shape for c in a.codes] == [c.shape for c in b.codes] and a.image.shape == b.image.shape
    same = np.mean(np.concatenate([(x == y).ravel() for x, y in zip(a.codes, b.codes)]))
    print(f"{precision} greedy image codes equal to fp32: {same:.3f}")


def test_bad_precision_and_inputs_fail_clearly(tiny_engine, quantized, tmp_path):
    from illume_edge.export.quantize import quantize_engine

    src = tiny_engine("tiny-plus")[0]
    with pytest.raises(ValueError, match="precision 'int3'"):
        quantize_engine(src, tmp_path / "x", "int3")
    with pytest.raises(ValueError, match="precision 'fp16'"):
        quantize_engine(src, tmp_path / "x", "fp16")
    with pytest.raises(ValueError, match="block_size 33"):
        quantize_engine(src, tmp_path / "x", "int4", block_size=33)
    with pytest.raises(ValueError, match="int4 only"):
        quantize_engine(src, tmp_path / "x", "int8", embeddings=True)
    with pytest.raises(EngineError, match="unknown component"):
        quantize_engine(src, tmp_path / "x", "int4", components=["nope"])
    with pytest.raises(EngineError, match="must differ"):
        quantize_engine(src, src, "int4")
    with pytest.raises(EngineError, match="int8 engine"):  # no double quantization
        quantize_engine(quantized("tiny-plus", "int8"), tmp_path / "y", "int4")


def test_cli_hook(tiny_engine, tmp_path, capsys):
    import argparse

    from illume_edge.export.quantize import add_quantize_parser

    ap = argparse.ArgumentParser()
    add_quantize_parser(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(["quantize", "--engine", str(tiny_engine("tiny-v1")[0]), "--out", str(tmp_path / "e"),
                          "--precision", "int4", "--embeddings"])
    assert args.fn(args) == 0
    m = read_manifest(tmp_path / "e")
    assert "GatherBlockQuantized" in m.components["llm"].ops and m.source["quantization"]["embeddings"] is True
    Engine.load(tmp_path / "e")  # sha256 + size + opset checks pass
    assert "onnxruntime only" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# Dynamic int8 vision encoders and UNet (quantize_engine(..., vision="int8", unet="int8"))
# ---------------------------------------------------------------------------------------------------------
# Per image token, cosine of the int8 encoder's features with the fp32 encoder's. Measured on the tiny
# engines: >= 0.999 (the bench's 1280-wide ViT: 0.999); bound with headroom.
VISION_COSINE = 0.99
# The int8 UNet's prediction: max |int8 - fp32| / max |fp32|. Measured: tiny-plus ~0.01, the bench UNet 0.021.
UNET_TOL = 0.06


@pytest.mark.parametrize("preset", PRESETS)
def test_vision_int8_features_close_to_fp32(tiny_engine, tmp_path, preset):
    """Every vision_* graph becomes MatMulInteger with run-time activation quantization; its features stay
    within VISION_COSINE of the fp32 graph's per token, on two image sizes; the manifest says int8 and not
    TensorRT-portable; the LLM and heads are int4 as asked; the engine loads with every check."""
    from illume_edge.export.quantize import quantize_engine
    from illume_edge.runtime.image_prep import preprocess_image
    from illume_edge.runtime.pipeline import to_rgb
    from illume_edge.runtime.vision import encode_image

    src = tiny_engine(preset)[0]
    dst = tmp_path / "engine"
    m = quantize_engine(src, dst, "int4", vision="int8", progress=lambda s: None)
    vision = [n for n in m.components if n.startswith("vision_")]
    assert vision and m.source["quantization"]["dynamic"]["components"] == vision
    for name in vision:
        c = m.components[name]
        assert c.precision == "int8" and "MatMulInteger" in c.ops and "DynamicQuantizeLinear" in c.ops
        assert not c.portable and "Gemm" not in c.ops
    assert m.components["llm"].precision == "int4"
    ref, got = Engine.load(src), Engine.load(dst)
    rng = np.random.default_rng(0)
    for hw in ((64, 64), (48, 96)):
        img = preprocess_image(to_rgb((rng.random((*hw, 3)) * 255).astype(np.uint8)), ref.config)
        for a, b in zip(encode_image(ref, img).features, encode_image(got, img).features):
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            print(f"{preset} {hw}: min cosine {cos.min():.5f}")
            assert cos.min() >= VISION_COSINE and not np.array_equal(a, b)


def test_unet_int8_prediction_close_to_fp32(tiny_engine, tmp_path):
    """The UNet's attention / feed-forward GEMMs become MatMulInteger; its convolutions stay fp32; one
    denoising prediction (CFG batch 2) stays within UNET_TOL of the fp32 graph's."""
    from illume_edge.export.quantize import quantize_engine

    src = tiny_engine("tiny-plus")[0]
    m = quantize_engine(src, tmp_path / "engine", "int8", unet="int8", progress=lambda s: None)
    c = m.components["unet"]
    assert c.precision == "int8" and {"MatMulInteger", "Conv"} <= set(c.ops) and not c.portable
    assert m.source["quantization"]["dynamic"]["components"] == ["unet"]
    assert all(m.components[n].precision == "fp32" for n in m.components if n.startswith("vision_"))
    ref, got = Engine.load(src).session("unet"), Engine.load(tmp_path / "engine").session("unet")
    g = np.random.default_rng(0)
    shapes = {t.name: [d if isinstance(d, int) else 2 if d == "batch" else 8 for d in t.shape]
              for t in ref.component.inputs}
    feeds = {name: g.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    feeds["timestep"] = np.full(shapes["timestep"], 500.0, np.float32)
    a, b = ref.run(feeds)["noise_pred"], got.run(feeds)["noise_pred"]
    err = np.abs(a - b).max() / np.abs(a).max()
    print(f"int8 UNet: max relative error {err:.4f}")
    assert 0 < err <= UNET_TOL


def test_dynamic_int8_bad_requests_fail_clearly(tiny_engine, tmp_path):
    from illume_edge.export.quantize import quantize_engine

    src = tiny_engine("tiny-plus")[0]
    with pytest.raises(ValueError, match="vision 'int4' is not one of"):
        quantize_engine(src, tmp_path / "x", "int4", vision="int4")
    with pytest.raises(ValueError, match="unet 'fp16' is not one of"):
        quantize_engine(src, tmp_path / "x", "int4", unet="fp16")
    with pytest.raises(EngineError, match="are compute-bound graphs"):
        quantize_engine(src, tmp_path / "x", "int4", components=["vision_semantic"], vision="int8")
