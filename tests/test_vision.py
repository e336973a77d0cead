"""Vision input branches: the ViT and MoVQ references, their ONNX exports and the host inputs that feed them."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from illume_edge.config import ConfigError, MoVQConfig, preset
from illume_edge.export import movq as mq
from illume_edge.export.export_vision import PixelFeatures, export_vision_pixel, export_vision_semantic
from illume_edge.export.onnx_io import export_onnx
from illume_edge.export.projector import build_projector
from illume_edge.export.vit import ViTFeatures, build_vit
from illume_edge.runtime.image_prep import pixel_inputs, vit_inputs
from parity import randomize, tol

CFG = preset("tiny-plus")
SEM, PIX = CFG.branches
HIDDEN = CFG.llm.hidden_size


def randomize_gain(module, seed):
    return randomize(module, seed, gain=1.5)


def m11_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (3, h, w)).astype(np.float32)


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------------------
# ViT (semantic branch)
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_parts():
    vit = randomize_gain(build_vit(SEM.encoder), 0)
    projector = randomize_gain(build_projector(SEM.in_dim, HIDDEN), 1)
    return vit, projector


@pytest.fixture(scope="module")
def semantic_graph(vit_parts, tmp_path_factory):
    vit, projector = vit_parts
    path = tmp_path_factory.mktemp("vision") / "vision_semantic.onnx"
    return export_vision_semantic(vit, projector, SEM, path)


def test_vit_state_dict_names_are_the_release_names(vit_parts):
    vit, _ = vit_parts
    cfg = SEM.encoder
    expected = {"patch_embed.proj.weight", "merger.ln_q.weight", "merger.ln_q.bias"}
    expected |= {f"merger.mlp.{i}.{t}" for i in (0, 2) for t in ("weight", "bias")}
    for b in range(cfg.depth):
        for mod in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            expected |= {f"blocks.{b}.{mod}.weight", f"blocks.{b}.{mod}.bias"}
    sd = vit.state_dict()
    assert set(sd) == expected
    assert tuple(sd["patch_embed.proj.weight"].shape) == (cfg.embed_dim, 3, cfg.temporal_patch_size,
                                                          cfg.patch_size, cfg.patch_size)
    assert tuple(sd["merger.mlp.2.weight"].shape) == (cfg.out_dim, 4 * cfg.embed_dim)


@pytest.mark.parametrize("hw", [(56, 56), (84, 112)])
def test_vit_host_inputs_reproduce_the_transformers_forward(vit_parts, hw):
    """vit_inputs + ViTFeatures == projector(Qwen2VisionTransformerPretrainedModel(pixel_values, grid_thw))."""
    vit, projector = vit_parts
    vi = vit_inputs(m11_image(*hw, seed=10), SEM.encoder)
    with torch.no_grad():
        ours = ViTFeatures(vit, SEM.encoder, projector)(*(torch.from_numpy(a) for a in vi[:3])).numpy()
        grid_thw = torch.tensor([[1, *vi.grid]])
        ref = projector(vit(torch.from_numpy(vi.pixel_values), grid_thw).pooler_output).numpy()
    gh, gw = vi.merged_grid
    assert ours.shape == ref.shape == (gh * gw, HIDDEN)
    assert np.abs(ref).max() > 0.5  # a real signal, not a vanishing one
    assert np.abs(ours - ref).max() <= tol(ref)


def test_semantic_graph_contract(semantic_graph):
    cfg = SEM.encoder
    head_dim = cfg.embed_dim // cfg.num_heads
    ins = {t.name: t for t in semantic_graph.inputs}
    assert list(ins) == ["pixel_values", "rotary_cos", "rotary_sin"]
    assert all(t.dtype == "float32" for t in semantic_graph.inputs + semantic_graph.outputs)
    n = ins["pixel_values"].shape[0]
    assert isinstance(n, str) and ins["pixel_values"].shape[1] == cfg.patch_dim
    assert ins["rotary_cos"].shape == ins["rotary_sin"].shape == [n, head_dim]
    (out,) = semantic_graph.outputs
    assert out.name == "features" and out.shape == ["merged_tokens", HIDDEN]
    assert "Conv" not in semantic_graph.ops  # patch embed as MatMul; attention as MatMul + Softmax
    assert {"MatMul", "Softmax"} <= set(semantic_graph.ops)


@pytest.mark.parametrize("hw", [(56, 56), (84, 112), (32, 32)])  # 32x32 -> one merged token
def test_semantic_export_matches_torch(vit_parts, semantic_graph, hw):
    vit, projector = vit_parts
    vi = vit_inputs(m11_image(*hw, seed=11), SEM.encoder)
    got = session(semantic_graph.path).run(None, {"pixel_values": vi.pixel_values, "rotary_cos": vi.rotary_cos,
                                                  "rotary_sin": vi.rotary_sin})[0]
    with torch.no_grad():
        ref = ViTFeatures(vit, SEM.encoder, projector)(*(torch.from_numpy(a) for a in vi[:3])).numpy()
    assert got.shape == (vi.merged_grid[0] * vi.merged_grid[1], HIDDEN)
    assert np.abs(got - ref).max() <= tol(ref)


def test_semantic_export_rejects_mismatched_parts(vit_parts, tmp_path):
    vit, _ = vit_parts
    with pytest.raises(ConfigError, match=rf"projector input width 7 != the semantic encoder's output width "
                                          rf"{SEM.in_dim}"):
        export_vision_semantic(vit, build_projector(7, HIDDEN), SEM, tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match="expected a ViTEncoderConfig"):
        export_vision_semantic(vit, build_projector(PIX.in_dim, HIDDEN), PIX, tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match="patch_embed.proj.weight: expected shape"):
        ViTFeatures(vit, dataclasses.replace(SEM.encoder, embed_dim=64, num_heads=4))


# ----------------------------------------------------------------------------------------------------
# MoVQ encoder (pixel branch)
# ----------------------------------------------------------------------------------------------------
def release_movq_keys(cfg: MoVQConfig, decoder: bool) -> set[str]:
    """State-dict names of the release's MoVQEncoder / MoVQDecoder for a config (from modeling_movqgan.py)."""
    keys: set[str] = set()

    def conv(name):
        keys.update({f"{name}.weight", f"{name}.bias"})

    def norm(name):
        if decoder:
            conv(f"{name}.norm_layer")
            conv(f"{name}.conv_y")
            conv(f"{name}.conv_b")
        else:
            conv(name)

    def resnet(name, cin, cout):
        for part in ("norm1", "norm2"):
            norm(f"{name}.{part}")
        for part in ("conv1", "conv2"):
            conv(f"{name}.{part}")
        if cin != cout:
            conv(f"{name}.nin_shortcut")

    def attn(name):
        norm(f"{name}.norm")
        for c in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{c}")

    def middle(width):
        resnet("mid.block_1", width, width)
        attn("mid.attn_1")
        resnet("mid.block_2", width, width)

    levels = len(cfg.ch_mult)
    conv("conv_in")
    conv("conv_out")
    if decoder:
        norm("norm_out")
        block_in = cfg.ch * cfg.ch_mult[-1]
        order, n_blocks, part, sampler = reversed(range(levels)), cfg.num_res_blocks + 1, "up", "upsample"
    else:
        conv("norm_out")
        block_in = cfg.ch
        order, n_blocks, part, sampler = range(levels), cfg.num_res_blocks, "down", "downsample"
    if decoder:
        middle(block_in)  # the decoder runs mid first, the encoder last
    for i in order:
        for j in range(n_blocks):
            resnet(f"{part}.{i}.block.{j}", block_in, cfg.ch * cfg.ch_mult[i])
            block_in = cfg.ch * cfg.ch_mult[i]
            if i in cfg.attn_resolutions:
                attn(f"{part}.{i}.attn.{j}")
        if (decoder and i != 0) or (not decoder and i != levels - 1):
            conv(f"{part}.{i}.{sampler}.conv")
    if not decoder:
        middle(block_in)
    return keys


@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_movq_state_dict_names_are_the_release_names(which):
    cfg = PIX.encoder.movq if which == "encoder" else CFG.vq_decoder.movq
    module = mq.build_movq_encoder(cfg) if which == "encoder" else mq.build_movq_decoder(cfg)
    assert set(module.state_dict()) == release_movq_keys(cfg, decoder=which == "decoder")
    groups = {m.num_groups for m in module.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {cfg.norm_groups}


def test_movq_dc_blocks_are_pool_and_nearest_plus_conv():
    """With zeroed convs, DC down = 2x2 average pool and DC up = nearest 2x (their parameter-free shortcuts)."""
    x = torch.randn(1, 8, 6, 10)
    down, up = mq.DCDownBlock2d(8), mq.DCUpBlock2d(8)
    for m in (down, up):
        torch.nn.init.zeros_(m.conv.weight)
        torch.nn.init.zeros_(m.conv.bias)
    assert torch.allclose(down(x), F.avg_pool2d(x, 2), atol=1e-6)
    assert torch.equal(up(x), F.interpolate(x, scale_factor=2.0, mode="nearest"))
    randomize_gain(down, 3)
    randomize_gain(up, 4)
    # the release's formulation: the unshuffled input averaged over groups of 4 channels, and each channel
    # repeated 4 times then shuffled (the modules compute the same as a pool and a nearest resize)
    release_down = F.pixel_unshuffle(down.conv(x), 2) + F.pixel_unshuffle(x, 2).reshape(1, 8, 4, 3, 5).mean(dim=2)
    release_up = F.pixel_shuffle(up.conv(x), 2) + F.pixel_shuffle(x.repeat_interleave(4, dim=1), 2)
    assert torch.allclose(down(x), release_down, atol=1e-6)
    assert torch.equal(up(x), release_up)


def test_movq_spatial_norm_and_attention_semantics():
    cfg = CFG.vq_decoder.movq
    norm = randomize_gain(mq.SpatialNorm(cfg, 16, 4), 5)
    x, zq = torch.randn(1, 16, 8, 12), torch.randn(1, 4, 2, 3)
    with torch.no_grad():
        up = F.interpolate(zq, size=(8, 12), mode="nearest")  # the release: resize the code map, then convolve
        ref = norm.norm_layer(x) * norm.conv_y(up) + norm.conv_b(up)
        assert torch.allclose(norm(x, zq), ref, atol=1e-5)
        attn = randomize_gain(mq.AttnBlock(cfg, 16), 6)
        h = attn.norm(x)
        q, k, v = (c(h).flatten(2).transpose(1, 2) for c in (attn.q, attn.k, attn.v))  # [1, hw, c]
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 16, 8, 12)
        assert torch.allclose(attn(x), x + attn.proj_out(o), atol=1e-5)


def test_movq_rejects_bad_configs():
    with pytest.raises(ConfigError, match="norm_groups 8 does not divide a 12-channel"):
        mq.build_movq_encoder(MoVQConfig(ch=12, norm_groups=8))
    with pytest.raises(ConfigError, match="level indices"):
        mq.build_movq_encoder(MoVQConfig(ch=16, norm_groups=8, attn_resolutions=(16,)))
    with pytest.raises(ConfigError, match="needs z_channels == embed_dim"):
        mq.build_movq_decoder(MoVQConfig(ch=16, norm_groups=8, z_channels=16, embed_dim=8))


@pytest.fixture(scope="module")
def pixel_parts():
    encoder = randomize_gain(mq.build_movq_encoder(PIX.encoder.movq), 7)
    projector = randomize_gain(build_projector(PIX.in_dim, HIDDEN), 8)
    return encoder, projector


@pytest.fixture(scope="module")
def pixel_graph(pixel_parts, tmp_path_factory):
    encoder, projector = pixel_parts
    path = tmp_path_factory.mktemp("vision") / "vision_pixel.onnx"
    return export_vision_pixel(encoder, projector, PIX, path)


def test_pixel_graph_contract(pixel_graph):
    (inp,), (out,) = pixel_graph.inputs, pixel_graph.outputs
    f = PIX.encoder.factor
    assert inp.name == "pixel_values" and inp.dtype == "float32"
    assert inp.shape[:2] == [1, 3] and all(isinstance(d, str) and d.startswith(f"{f}*") for d in inp.shape[2:])
    assert out.name == "features" and out.dtype == "float32" and out.shape == ["grid_h*grid_w", HIDDEN]


def test_pixel_graph_downsamples_without_6d_transposes(pixel_graph):
    """The DC downsamplers export as AveragePool (shortcut) and SpaceToDepth + a plane-moving 5-D Transpose
    (the conv branch's pixel_unshuffle, export/portable_ops.py), not as 6-D transposes of the feature map."""
    model = onnx.load(str(pixel_graph.path), load_external_data=False)
    levels = len(PIX.encoder.movq.ch_mult)
    count = lambda op: sum(n.op_type == op for n in model.graph.node)  # noqa: E731
    assert count("SpaceToDepth") == count("AveragePool") == levels - 1
    perms = [list(a.ints) for n in model.graph.node if n.op_type == "Transpose" for a in n.attribute]
    assert all(len(p) <= 5 for p in perms), perms


@pytest.mark.parametrize("shape", [(1, 8, 6, 10), (1, 3, 4, 2), (2, 5, 12, 8)])
def test_pixel_unshuffle_translation_is_exact(tmp_path, shape):
    """torch's pixel_unshuffle and the SpaceToDepth form agree bit for bit, on dynamic H, W and batch."""
    class Unshuffle(torch.nn.Module):
        def forward(self, x):
            return F.pixel_unshuffle(x, 2)

    b, h, w = torch.export.Dim("b", min=1, max=4), torch.export.Dim("h", min=1, max=64), \
        torch.export.Dim("w", min=1, max=64)
    info = export_onnx(Unshuffle(), (torch.randn(2, shape[1], 4, 6),), tmp_path / "u.onnx", input_names=["x"],
                       output_names=["y"], dynamic_shapes=({0: b, 2: 2 * h, 3: 2 * w},))
    assert "SpaceToDepth" in info.ops and info.portable
    x = torch.randn(*shape)
    got = session(info.path).run(None, {"x": x.numpy()})[0]
    assert np.array_equal(got, F.pixel_unshuffle(x, 2).numpy())


@pytest.mark.parametrize("hw", [(64, 64), (64, 96), (16, 48)])  # 16x48 -> a one-row grid
def test_pixel_export_matches_torch(pixel_parts, pixel_graph, hw):
    encoder, projector = pixel_parts
    x = pixel_inputs(m11_image(*hw, seed=12), PIX.encoder)
    got = session(pixel_graph.path).run(None, {"pixel_values": x})[0]
    with torch.no_grad():
        ref = PixelFeatures(encoder, projector)(torch.from_numpy(x)).numpy()
        fmap = encoder(torch.from_numpy(x))[0]  # [C, h, w]
        gh, gw = PIX.grid(*hw)
        assert fmap.shape[1:] == (gh, gw)
        r, c = gh - 1, 1  # row-major: token r*gw + c is grid cell (r, c)
        cell = projector(fmap[:, r, c][None]).numpy()[0]
    assert got.shape == (gh * gw, HIDDEN)
    assert np.abs(got - ref).max() <= tol(ref)
    assert np.abs(ref[r * gw + c] - cell).max() <= tol(cell)


def test_pixel_export_rejects_mismatched_parts(pixel_parts, tmp_path):
    encoder, _ = pixel_parts
    with pytest.raises(ConfigError, match="projector input width 5 != the pixel encoder's output width"):
        export_vision_pixel(encoder, build_projector(5, HIDDEN), PIX, tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match="expected a CNNEncoderConfig"):
        export_vision_pixel(encoder, build_projector(SEM.in_dim, HIDDEN), SEM, tmp_path / "x.onnx")


def test_projector_layout():
    p = build_projector(6, 10)
    assert set(p.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert isinstance(p[1], torch.nn.GELU) and p[1].approximate == "none"
    with pytest.raises(ValueError, match="must be positive"):
        build_projector(0, 10)
