"""Diffusion decoder: diffusers configs, UNet / VAE-decoder ONNX parity, and the torch reference decode."""
import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from illume_edge.config import SDXL_SCHEDULER, ConfigError, UNetConfig, VAEConfig, preset
from illume_edge.export.diffusion import (build_unet, build_vae, reference_decode, time_ids_for,
                                          unet_cfg_from_diffusers, unet_config_dict, vae_cfg_from_diffusers,
                                          vae_config_dict)
from illume_edge.export.export_diffusion import (UNET_INPUTS, ConstantCrossAttention, UNetGraph,
                                                 constant_cross_attention, export_unet, export_vae_decoder)
from illume_edge.export.onnx_io import ExportError
from illume_edge.runtime import schedulers as S

DPM_CONFIG = dict(SDXL_SCHEDULER, _class_name="DPMSolverMultistepScheduler", algorithm_type="dpmsolver++",
                  solver_order=2)

# The released SDXL-derived decoder's unet/config.json and vae/config.json (SDXL base values, 68 input channels).
SDXL_UNET_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "attention_type": "default", "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dropout": 0.0, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 68, "layers_per_block": 2,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None, "sample_size": 128, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_VAE_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def _tol(ref: np.ndarray) -> float:
    """fp32 parity bound: 1e-4 of the output scale (at least 1e-4)."""
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.fixture(scope="module")
def plus():
    cfg = preset("tiny-plus").diffusion
    torch.manual_seed(0)
    return cfg, build_unet(cfg.unet), build_vae(cfg.vae)


@pytest.fixture(scope="module")
def unet_onnx(plus, tmp_path_factory):
    cfg, unet, _ = plus
    info = export_unet(unet, cfg, tmp_path_factory.mktemp("unet") / "unet.onnx")
    return info, ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def vae_onnx(plus, tmp_path_factory):
    cfg, _, vae = plus
    info = export_vae_decoder(vae, cfg, tmp_path_factory.mktemp("vae") / "vae_decoder.onnx")
    return info, ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])


def _unet_inputs(cfg: UNetConfig, b, h, w, res_index=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"latent": torch.randn(b, cfg.latent_channels, h, w, generator=g),
            "timestep": torch.tensor([999.0, 261.0, 1.0, 500.0][:b]),
            "code_map": torch.randn(b, cfg.code_channels, h, w, generator=g),
            "time_ids": torch.tensor([time_ids_for(cfg, res_index)] * b)}


def _release_unet_call(unet, cfg: UNetConfig, x: dict, text_len: int) -> np.ndarray:
    """The release's call: zero prompt embeds [B, 77, D] and pooled [B, P], code map concatenated to the latent."""
    b = x["latent"].shape[0]
    with torch.no_grad():
        out = unet(torch.cat([x["latent"], x["code_map"]], 1), x["timestep"],
                   encoder_hidden_states=torch.zeros(b, text_len, cfg.cross_attention_dim),
                   added_cond_kwargs={"text_embeds": torch.zeros(b, cfg.pooled_text_dim), "time_ids": x["time_ids"]},
                   return_dict=False)[0]
    return out.numpy()


# ----------------------------------------------------------------------------------------------------
# diffusers configs
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-plus", "tiny-v1", "illume-plus-3b"])
def test_config_dicts_round_trip(name):
    d = preset(name).diffusion
    assert unet_cfg_from_diffusers(unet_config_dict(d.unet), text_seq_len=d.unet.text_seq_len) == d.unet
    assert vae_cfg_from_diffusers(vae_config_dict(d.vae)) == d.vae


def test_release_sdxl_configs_map_to_the_default_config():
    assert unet_cfg_from_diffusers(SDXL_UNET_JSON) == UNetConfig()
    assert vae_cfg_from_diffusers(SDXL_VAE_JSON) == VAEConfig()
    assert UNetConfig().in_channels == 68 and UNetConfig().projection_class_embeddings_input_dim == 2816


def test_built_modules_carry_the_config(plus):
    cfg, unet, vae = plus
    assert unet_cfg_from_diffusers(dict(unet.config), text_seq_len=cfg.unet.text_seq_len) == cfg.unet
    assert vae_cfg_from_diffusers(dict(vae.config)) == cfg.vae
    assert unet.conv_in.in_channels == cfg.unet.latent_channels + cfg.unet.code_channels


@pytest.mark.parametrize("change,match", [
    ({"upcast_attention": True}, r"upcast_attention is True.*False"),
    ({"class_embed_type": "timestep"}, r"class_embed_type"),
    ({"addition_embed_type": "text"}, r"addition_embed_type"),
    ({"time_embedding_type": "fourier"}, r"time_embedding_type"),
    ({"some_future_option": 1}, r"unknown key 'some_future_option'"),
    ({"_class_name": "UNet2DModel"}, r"_class_name is 'UNet2DModel'"),
    ({"attention_head_dim": [5, 10]}, r"attention_head_dim has 2 entries.*3"),
    ({"in_channels": 4}, r"code_channels 0"),
])
def test_unsupported_unet_configs_fail_clearly(change, match):
    d = dict(SDXL_UNET_JSON, **change)
    with pytest.raises(ConfigError, match=match):
        unet_cfg_from_diffusers(d)
    missing = {k: v for k, v in SDXL_UNET_JSON.items() if k != "cross_attention_dim"}
    with pytest.raises(ConfigError, match="missing key 'cross_attention_dim'"):
        unet_cfg_from_diffusers(missing)


def test_unsupported_vae_configs_fail_clearly():
    with pytest.raises(ConfigError, match=r"latents_mean"):
        vae_cfg_from_diffusers(dict(SDXL_VAE_JSON, latents_mean=[0.0] * 4, latents_std=[1.0] * 4))
    with pytest.raises(ConfigError, match=r"down_block_types"):
        vae_cfg_from_diffusers(dict(SDXL_VAE_JSON, down_block_types=["DownEncoderBlock2D"] * 3 + ["Other"]))


# ----------------------------------------------------------------------------------------------------
# UNet graph
# ----------------------------------------------------------------------------------------------------
def test_unet_graph_contract(plus, unet_onnx):
    cfg, _, _ = plus
    info, _ = unet_onnx
    u = cfg.unet
    got = {t.name: (t.dtype, t.shape) for t in info.inputs}
    hw = ["2*latent_h_blocks", "2*latent_w_blocks"]  # tiny UNet: 2 blocks, latent sides multiples of 2
    assert got == {"latent": ("float32", ["batch", u.latent_channels, *hw]),
                   "timestep": ("float32", ["batch"]),
                   "code_map": ("float32", ["batch", u.code_channels, *hw]),
                   "time_ids": ("float32", ["batch", u.num_time_ids])}
    assert [(t.name, t.dtype, t.shape) for t in info.outputs] == [
        ("noise_pred", "float32", ["batch", u.latent_channels, *hw])]
    assert info.dynamic_ranges["batch"] == [1, cfg.max_batch]
    assert not any("Microsoft" in op or "com." in op for op in info.ops)
    assert {"MatMul", "Softmax"} <= set(info.ops)  # attention lowered to plain ops


@pytest.mark.parametrize("b,h,w", [(2, 8, 12), (2, 16, 6), (1, 4, 4)])
def test_unet_onnx_matches_torch(plus, unet_onnx, b, h, w):
    cfg, unet, _ = plus
    _, sess = unet_onnx
    x = _unet_inputs(cfg.unet, b, h, w, seed=b * 100 + h)
    with torch.no_grad():
        ref = UNetGraph(unet, cfg.unet)(*(x[k] for k in UNET_INPUTS)).numpy()
    out = sess.run(None, {k: v.numpy() for k, v in x.items()})[0]
    assert out.shape == (b, cfg.unet.latent_channels, h, w)
    assert np.abs(out - ref).max() <= _tol(ref)
    # the graph's built-in zero text conditioning equals the release's 77-token zero prompt
    release = _release_unet_call(unet, cfg.unet, x, text_len=77)
    assert np.abs(out - release).max() <= _tol(release)


def test_unet_onnx_responds_to_every_input(plus, unet_onnx):
    """Each input reaches the output (a disconnected input would still pass a parity test at one value)."""
    cfg, unet, _ = plus
    _, sess = unet_onnx
    x = {k: v.numpy() for k, v in _unet_inputs(cfg.unet, 2, 8, 8).items()}
    base = sess.run(None, x)[0]
    for name, changed in [("time_ids", _unet_inputs(cfg.unet, 2, 8, 8, res_index=3)["time_ids"].numpy()),
                          ("timestep", x["timestep"] + 100.0), ("code_map", np.zeros_like(x["code_map"]))]:
        y = dict(x, **{name: changed})
        out = sess.run(None, y)[0]
        assert np.abs(out - base).max() > 1e-3, name
        with torch.no_grad():
            ref = UNetGraph(unet, cfg.unet)(*(torch.from_numpy(y[k]) for k in UNET_INPUTS)).numpy()
        assert np.abs(out - ref).max() <= _tol(ref)


def test_unet_graph_holds_cross_attention_as_constants(plus, unet_onnx):
    """With zero text conditioning the cross-attention blocks are constants in the graph: one Softmax per
    self-attention block only; the UNet module is left as it was after the export."""
    from diffusers.models.attention_processor import Attention

    cfg, unet, _ = plus
    info, _ = unet_onnx
    attns = [m for m in unet.modules() if isinstance(m, Attention)]
    cross = sum(m.is_cross_attention for m in attns)
    assert cross and len(attns) > cross, "the tiny UNet must have both kinds of attention"
    model = onnx.load(str(info.path), load_external_data=False)
    assert sum(n.op_type == "Softmax" for n in model.graph.node) == len(attns) - cross


@pytest.mark.parametrize("bias", [False, True])
def test_constant_cross_attention_is_the_block_on_a_zero_context(bias):
    """ConstantCrossAttention returns what the diffusers block computes for any query on a zero context
    (with projection biases too: the keys are then to_k's bias, still all the same)."""
    from diffusers.models.attention_processor import Attention

    ucfg = dataclasses.replace(preset("tiny-plus").diffusion.unet, text_seq_len=7, cross_attention_dim=12)
    torch.manual_seed(3)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, bias=bias, out_bias=True).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.5)
    constant = ConstantCrossAttention(attn, ucfg)
    queries = torch.randn(3, 10, 16) * 4
    with torch.no_grad():
        want = attn(queries, encoder_hidden_states=torch.zeros(3, 7, 12))
        got = constant(queries, encoder_hidden_states=None)
    assert got.shape == want.shape and want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_constant_cross_attention_is_undone_after_the_block(plus):
    cfg, unet, _ = plus
    before = {n: m for n, m in unet.named_modules()}
    with constant_cross_attention(unet, cfg.unet) as n:
        assert n == sum(isinstance(m, ConstantCrossAttention) for m in unet.modules()) > 0
    assert {n: m for n, m in unet.named_modules()} == before


def test_cross_attention_with_a_residual_connection_is_not_folded():
    """A block that adds its query input to its output is not constant: it stays as it is."""
    from diffusers.models.attention_processor import Attention

    ucfg = dataclasses.replace(preset("tiny-plus").diffusion.unet, text_seq_len=7, cross_attention_dim=12)
    host = torch.nn.Module()
    host.plain = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)
    host.residual = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, residual_connection=True)
    with constant_cross_attention(host, ucfg) as n:
        assert n == 1 and isinstance(host.plain, ConstantCrossAttention) and isinstance(host.residual, Attention)


def test_unet_export_tiny_v1_code_channels(tmp_path):
    cfg = preset("tiny-v1").diffusion
    assert cfg.unet.code_channels == 8
    torch.manual_seed(1)
    unet = build_unet(cfg.unet)
    info = export_unet(unet, cfg, tmp_path / "unet.onnx")
    assert info.inputs[2].shape[1] == 8
    sess = ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
    for b, h, w in [(2, 6, 10), (1, 12, 4)]:
        x = _unet_inputs(cfg.unet, b, h, w)
        out = sess.run(None, {k: v.numpy() for k, v in x.items()})[0]
        ref = _release_unet_call(unet, cfg.unet, x, text_len=77)
        assert np.abs(out - ref).max() <= _tol(ref)


def test_unet_export_rejects_mismatched_module(plus, tmp_path):
    cfg, unet, _ = plus
    other = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, code_channels=8))
    with pytest.raises(ExportError, match="does not match the model config"):
        export_unet(unet, other, tmp_path / "unet.onnx")
    with pytest.raises(ExportError, match="max_batch is 1"):
        export_unet(unet, dataclasses.replace(cfg, max_batch=1), tmp_path / "unet.onnx")


def test_unet_onnx_rejects_bad_inputs(plus, unet_onnx):
    cfg, _, _ = plus
    _, sess = unet_onnx
    x = {k: v.numpy() for k, v in _unet_inputs(cfg.unet, 1, 8, 8).items()}
    with pytest.raises(Exception, match="code_map"):  # wrong code channel count
        sess.run(None, dict(x, code_map=np.zeros((1, cfg.unet.code_channels + 1, 8, 8), np.float32)))
    with pytest.raises(Exception, match=r"data type.*int64.*float"):  # integer timestep
        sess.run(None, dict(x, timestep=np.array([10], np.int64)))


# ----------------------------------------------------------------------------------------------------
# VAE decoder graph
# ----------------------------------------------------------------------------------------------------
def test_vae_graph_contract(plus, vae_onnx):
    cfg, _, _ = plus
    info, _ = vae_onnx
    f = cfg.vae.downsample
    assert [(t.name, t.dtype, t.shape) for t in info.inputs] == [
        ("latent", "float32", ["batch", cfg.vae.latent_channels, "latent_h", "latent_w"])]
    assert [(t.name, t.dtype, t.shape) for t in info.outputs] == [
        ("image", "float32", ["batch", 3, f"{f}*latent_h", f"{f}*latent_w"])]


@pytest.mark.parametrize("b,h,w", [(1, 4, 6), (2, 7, 3)])
def test_vae_decoder_onnx_matches_torch(plus, vae_onnx, b, h, w):
    cfg, _, vae = plus
    _, sess = vae_onnx
    latent = torch.randn(b, cfg.vae.latent_channels, h, w, generator=torch.Generator().manual_seed(h))
    with torch.no_grad():
        ref = vae.decode(latent / cfg.vae.scaling_factor, return_dict=False)[0].numpy()
    out = sess.run(None, {"latent": latent.numpy()})[0]
    f = cfg.vae.downsample
    assert out.shape == (b, 3, f * h, f * w)
    assert np.abs(out - ref).max() <= _tol(ref)


# ----------------------------------------------------------------------------------------------------
# Reference decode
# ----------------------------------------------------------------------------------------------------
def _numpy_loop_decode(unet, vae, cfg, scheduler_config, code_map, res_index, steps, cfg_scale, noise):
    """The runtime's recipe (numpy scheduler, host upsampling and CFG) around the torch modules."""
    sched = S.make_schedule(scheduler_config, steps)
    state = S.new_state(sched)
    latent = noise * sched.init_noise_sigma
    fy, fx = latent.shape[2] // code_map.shape[2], latent.shape[3] // code_map.shape[3]
    codes = code_map.repeat(fy, axis=2).repeat(fx, axis=3)  # nearest upsampling by an integer factor
    guided = cfg_scale > 1
    if guided:
        codes = np.concatenate([np.zeros_like(codes), codes])
    b = codes.shape[0]
    graph = UNetGraph(unet, cfg.unet)
    time_ids = torch.tensor([time_ids_for(cfg.unet, res_index)] * b)
    for i, t in enumerate(sched.timesteps):
        model_in = S.scale_model_input(sched, latent, i)
        model_in = np.concatenate([model_in] * b)
        with torch.no_grad():
            noise_pred = graph(torch.from_numpy(model_in), torch.full((b,), float(t)), torch.from_numpy(codes),
                               time_ids).numpy()
        if guided:
            noise_pred = noise_pred[:1] + np.float32(cfg_scale) * (noise_pred[1:] - noise_pred[:1])
        latent = S.step(sched, state, i, noise_pred, latent)
    with torch.no_grad():
        return vae.decode(torch.from_numpy(latent) / cfg.vae.scaling_factor, return_dict=False)[0].numpy()


@pytest.mark.parametrize("scheduler_config", [dict(SDXL_SCHEDULER), DPM_CONFIG], ids=["euler", "dpmpp_2m"])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_reference_decode_matches_numpy_scheduler_loop(plus, scheduler_config, cfg_scale):
    cfg, unet, vae = plus
    g = torch.Generator().manual_seed(7)
    code_map = torch.randn(1, cfg.unet.code_channels, 3, 4, generator=g)
    noise = torch.randn(1, cfg.unet.latent_channels, 12, 16, generator=g)  # latent grid = 4x the code grid
    img = reference_decode(unet, vae, scheduler_config, code_map, 11, 4, cfg_scale, noise, unet_cfg=cfg.unet)
    f = cfg.vae.downsample
    assert img.shape == (1, 3, 12 * f, 16 * f) and img.dtype == torch.float32
    assert torch.isfinite(img).all()
    ours = _numpy_loop_decode(unet, vae, cfg, scheduler_config, code_map.numpy(), 11, 4, cfg_scale, noise.numpy())
    assert np.abs(ours - img.numpy()).max() <= _tol(img.numpy())


def test_reference_decode_guidance_and_resolution_matter(plus):
    cfg, unet, vae = plus
    g = torch.Generator().manual_seed(3)
    code_map = torch.randn(1, cfg.unet.code_channels, 2, 2, generator=g)
    noise = torch.randn(1, cfg.unet.latent_channels, 8, 8, generator=g)
    run = lambda res, s: reference_decode(unet, vae, dict(SDXL_SCHEDULER), code_map, res, 3, s, noise)  # noqa: E731
    base = run(11, 1.5)
    assert (run(11, 3.0) - base).abs().max() > 1e-4
    assert (run(0, 1.5) - base).abs().max() > 1e-4


def test_reference_decode_bad_inputs(plus):
    cfg, unet, vae = plus
    noise = torch.randn(1, cfg.unet.latent_channels, 8, 8)
    good = torch.randn(1, cfg.unet.code_channels, 2, 2)
    with pytest.raises(ValueError, match=rf"code_map must be \[1, {cfg.unet.code_channels}, h, w\]"):
        reference_decode(unet, vae, dict(SDXL_SCHEDULER), torch.randn(1, 3, 2, 2), 0, 2, 1.5, noise)
    with pytest.raises(ValueError, match="init_noise must be"):
        reference_decode(unet, vae, dict(SDXL_SCHEDULER), good, 0, 2, 1.5, torch.randn(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="'PNDMScheduler' is not supported"):
        reference_decode(unet, vae, dict(SDXL_SCHEDULER, _class_name="PNDMScheduler"), good, 0, 2, 1.5, noise)


def test_absent_keys_mean_diffusers_defaults():
    """A config.json without `addition_embed_type` describes a UNet without the SDXL text_time embedding."""
    d = {k: v for k, v in SDXL_UNET_JSON.items() if k != "addition_embed_type"}
    with pytest.raises(ConfigError, match="missing key 'addition_embed_type'.*None.*text_time"):
        unet_cfg_from_diffusers(d)
    sparse = {k: v for k, v in SDXL_UNET_JSON.items() if k in unet_config_dict(UNetConfig())}
    assert unet_cfg_from_diffusers(sparse) == UNetConfig()  # keys left at diffusers' defaults may be omitted
