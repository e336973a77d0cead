"""The VQ detokenizer: torch oracle (reference_vq_decode) and its ONNX export, on tiny-plus."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch

from illume_edge.config import ConfigError, preset
from illume_edge.export import movq as mq
from illume_edge.export.export_vision import export_vq_decoder, reference_vq_decode, vq_decoder_input_names
from illume_edge.runtime.image_prep import resize_bicubic
from parity import randomize, tol

CFG = preset("tiny-plus")
MOVQ = CFG.vq_decoder.movq
# LLM-side sizes whose level grids are (semantic, pixel): (2x2, 4x4) and (3x4, 6x8).
SIZES = [(64, 64), (96, 128)]


def code_maps(height: int, width: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, lv.code_dim, *CFG.level_grid(i, height, width))).astype(np.float32)
            for i, lv in enumerate(CFG.levels)]


@pytest.fixture(scope="module")
def parts():
    return randomize(mq.build_post_quant_conv(MOVQ), 0), randomize(mq.build_movq_decoder(MOVQ), 1)


@pytest.fixture(scope="module")
def graph(parts, tmp_path_factory):
    post, decoder = parts
    return export_vq_decoder(post, decoder, CFG, tmp_path_factory.mktemp("vq") / "vq_decoder.onnx")


def test_graph_contract(graph):
    names = vq_decoder_input_names(CFG)
    assert names == ["codes_level0", "codes_level1"]
    assert [t.name for t in graph.inputs] == names
    for t, lv in zip(graph.inputs, CFG.levels):
        assert t.dtype == "float32" and t.shape[:2] == [1, lv.code_dim]
        assert all(isinstance(d, str) for d in t.shape[2:])
    (out,) = graph.outputs
    last_h, last_w = graph.inputs[-1].shape[2:]
    d = MOVQ.downsample
    assert out.name == "image" and out.dtype == "float32" and out.shape == [1, 3, f"{d}*{last_h}", f"{d}*{last_w}"]
    assert "Resize" in graph.ops


@pytest.mark.parametrize("size", SIZES)
def test_export_matches_reference(parts, graph, size):
    post, decoder = parts
    maps = code_maps(*size, seed=2)
    feeds = dict(zip(vq_decoder_input_names(CFG), maps))
    got = ort.InferenceSession(str(graph.path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    ref = reference_vq_decode(post, decoder, [torch.from_numpy(m) for m in maps]).numpy()
    h, w = maps[-1].shape[2:]
    assert ref.shape == got.shape == (1, 3, MOVQ.downsample * h, MOVQ.downsample * w)
    assert np.abs(ref).max() > 0.5
    assert np.abs(got - ref).max() <= tol(ref)


@pytest.mark.parametrize("size", SIZES)
def test_reference_is_dualvitok_decode(parts, size):
    """Semantic map bicubic-upsampled (checked with the independent numpy resize) to the pixel grid, concatenated
    semantic-first, post_quant_conv, decoder(quant2, quant)."""
    post, decoder = parts
    sem, pix = code_maps(*size, seed=3)
    h, w = pix.shape[2:]
    sem_up = resize_bicubic(sem[0].transpose(1, 2, 0), h, w).transpose(2, 0, 1)[None]
    quant = torch.from_numpy(np.concatenate([sem_up, pix], axis=1))
    with torch.no_grad():
        expected = decoder(post(quant), quant).numpy()
    got = reference_vq_decode(post, decoder, [torch.from_numpy(sem), torch.from_numpy(pix)]).numpy()
    assert np.abs(got - expected).max() <= tol(expected)


def test_reference_rejects_bad_code_maps(parts):
    post, decoder = parts
    sem, pix = (torch.from_numpy(m) for m in code_maps(64, 64, seed=4))
    with pytest.raises(ValueError, match=r"carry 24 channels in all \(\[8, 8, 8\]\), post_quant_conv expects 16"):
        reference_vq_decode(post, decoder, [sem, pix, pix])
    with pytest.raises(ValueError, match="got none"):
        reference_vq_decode(post, decoder, [])
    with pytest.raises(ValueError, match=r"code map 1 must be a tensor \[1, code_dim, h, w\]"):
        reference_vq_decode(post, decoder, [sem, pix[0]])


def test_export_rejects_bad_configs(parts, tmp_path):
    post, decoder = parts
    with pytest.raises(ConfigError, match="has no vq_decoder"):
        export_vq_decoder(post, decoder, preset("tiny-v1"), tmp_path / "x.onnx")
    wide = dataclasses.replace(CFG, vq_decoder=dataclasses.replace(
        CFG.vq_decoder, movq=dataclasses.replace(MOVQ, embed_dim=24, z_channels=24)))
    with pytest.raises(ConfigError, match=r"code dims \[8, 8\] \(sum 16\) must equal vq_decoder.movq.embed_dim 24"):
        export_vq_decoder(post, decoder, wide, tmp_path / "x.onnx")
    other = mq.build_movq_decoder(dataclasses.replace(MOVQ, num_res_blocks=2))
    with pytest.raises(ConfigError, match="the decoder was built for"):
        export_vq_decoder(post, other, CFG, tmp_path / "x.onnx")
