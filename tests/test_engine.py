"""Engine folders from tiny checkpoints: strict manifest, TensorRT-parsable graphs (all of a portable export,
all but the fused llm graph of the default one), and every exported component equal to its torch module
(fp32) at two or more shapes, for tiny-plus and tiny-v1."""
import json
import shutil

import numpy as np
import pytest
import torch

from illume_edge.manifest import EngineError, read_manifest, verify_engine
from illume_edge.runtime.engine import Engine
from illume_edge.runtime.image_prep import pixel_inputs, vit_inputs
from illume_edge.runtime.llm_runner import LLMRunner
from illume_edge.runtime.session import SessionOptions
from illume_edge.tensorrt_ops import unsupported_ops

PRESETS = ["tiny-plus", "tiny-v1"]


@pytest.fixture(params=PRESETS)
def preset_name(request) -> str:
    return request.param


def _close(got, want, what, rel=1e-4):
    """max |got - want| <= rel * max(1, max |want|) (fp32 graph vs fp32 torch)."""
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else want
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert err <= rel * scale, f"{what}: max abs err {err:.3g} > {rel} x scale {scale:.3g}"


@pytest.fixture(scope="module", params=PRESETS)
def built(request, tiny_engine):
    engine_dir, mods = tiny_engine(request.param)
    return Engine.load(engine_dir), mods


def test_components_and_assets(built):
    engine, mods = built
    cfg = mods.cfg
    names = {f"vision_{b.name}" for b in cfg.branches} | {"llm"} | {f"head_{k}" for k in cfg.head_ranges()}
    names |= {"unet", "vae_decoder"} | ({"vq_decoder"} if cfg.vq_decoder else set())
    assert set(engine.manifest.components) == names
    assert set(engine.manifest.assets) == {"tokenizer", "scheduler", "generation_config"} | \
        {f"codebook_level{i}" for i in range(cfg.num_levels)}
    p = engine.manifest.producer
    assert p.opset == 18 and p.torch.startswith("2.") and p.onnxruntime
    for i, q in enumerate(mods.quantizers):
        np.testing.assert_array_equal(engine.codebook(i), q.effective_table().detach().numpy())


_POOL_PROBE = """
import sys
from illume_edge.runtime.engine import Engine
from illume_edge.runtime.session import SessionOptions, thread_pool_mode
spin = None if sys.argv[2] == "none" else sys.argv[2]
so = Engine.load(sys.argv[1], SessionOptions(threads=2, spin=spin)).session("llm")._sess.get_session_options()
entries = []
for key in ("session.intra_op.allow_spinning", "session.force_spinning_stop"):
    try:
        entries.append(so.get_session_config_entry(key))
    except RuntimeError:  # not set: the shared pool decides
        entries.append("-")
print(thread_pool_mode(), so.use_per_session_threads, *entries)
"""


@pytest.mark.parametrize("env, spin, want", [
    ({}, "none", "per-session True 1 1"),
    ({}, "off", "per-session True 0 0"),
    ({}, "always", "per-session True 1 0"),
    ({"ILLUME_EDGE_SPIN": "always"}, "none", "per-session True 1 0"),
    ({"ILLUME_EDGE_SPIN": "always"}, "run", "per-session True 1 1"),
    ({"ILLUME_EDGE_THREAD_POOL": "shared"}, "none", "shared False - -"),
])
def test_sessions_share_one_pool_or_spin_only_inside_a_run(tiny_engine, env, spin, want):
    """A pipeline alternates components, each its own session: a pool per session may busy-wait between the
    nodes of its run but must stop when the run returns, or it takes the cores from the next session's
    (docs/performance.md); opt-in, all sessions share one pool. The mode is per process, so each case runs
    in its own."""
    import os
    import subprocess
    import sys

    engine_dir, _ = tiny_engine("tiny-plus")
    clean = {k: v for k, v in os.environ.items() if k not in ("ILLUME_EDGE_THREAD_POOL", "ILLUME_EDGE_SPIN")}
    out = subprocess.run([sys.executable, "-c", _POOL_PROBE, str(engine_dir), spin], env={**clean, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = out.stdout.strip().splitlines()[-1]
    assert got.startswith(want), got


@pytest.mark.parametrize("env, spin", [({}, "sometimes"), ({"ILLUME_EDGE_SPIN": "1"}, None)])
def test_unknown_spin_mode_is_refused_by_name(tiny_engine, monkeypatch, env, spin):
    from illume_edge.runtime.engine import Engine
    from illume_edge.runtime.session import SessionOptions

    engine_dir, _ = tiny_engine("tiny-plus")
    monkeypatch.delenv("ILLUME_EDGE_THREAD_POOL", raising=False)
    monkeypatch.delenv("ILLUME_EDGE_SPIN", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    where = "SessionOptions.spin" if spin else "ILLUME_EDGE_SPIN"
    with pytest.raises(EngineError, match=f"{where}=.*expected one of .'run', 'always', 'off'"):
        Engine.load(engine_dir, SessionOptions(threads=1, spin=spin)).session("llm")


@pytest.mark.parametrize("env, arena, want", [({}, None, False), ({"ILLUME_EDGE_MEM_ARENA": "1"}, None, True),
                                             ({}, True, True), ({"ILLUME_EDGE_MEM_ARENA": "1"}, False, False)])
def test_memory_arena_is_off_unless_asked(tiny_engine, monkeypatch, env, arena, want):
    """onnxruntime's CPU arena keeps each session's largest activations resident for the process's life (a
    640x480 understanding request: 4.6 GB against 1.2 GB, docs/performance.md): off unless the caller or
    ILLUME_EDGE_MEM_ARENA=1 asks for it."""
    monkeypatch.delenv("ILLUME_EDGE_MEM_ARENA", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    engine = Engine.load(tiny_engine("tiny-plus")[0], SessionOptions(threads=1, memory_arena=arena))
    assert engine.session("head_text")._sess.get_session_options().enable_cpu_mem_arena is want


def test_unknown_thread_pool_mode_fails_clearly(monkeypatch):
    from illume_edge.runtime import session

    monkeypatch.setattr(session, "_pool", {})
    monkeypatch.setenv("ILLUME_EDGE_THREAD_POOL", "global")
    with pytest.raises(EngineError, match="ILLUME_EDGE_THREAD_POOL='global'.*shared"):
        session.thread_pool_mode()


@pytest.mark.parametrize("llm_graph", ["portable", "fused"])
def test_graphs_are_portable_and_tensorrt_parsable(tiny_engine, preset_name, llm_graph):
    """Every graph of a --llm-graph portable export is TensorRT-parsable; the default (fused) export differs
    only in its llm graph, which its manifest marks as onnxruntime-only."""
    import onnx

    engine = Engine.load(tiny_engine(preset_name, llm_graph)[0])
    for name, comp in engine.manifest.components.items():
        model = onnx.load(str(engine.dir / comp.path), load_external_data=False)
        domains = {n.domain or "ai.onnx" for n in model.graph.node}
        ops = {n.op_type for n in model.graph.node}
        assert set(comp.ops) == ops
        if name == "llm" and llm_graph == "fused":
            assert domains == {"ai.onnx", "com.microsoft"} and not comp.portable
            continue
        assert domains == {"ai.onnx"} and comp.portable, f"{name}: non-standard domains {domains}"
        assert not unsupported_ops(ops), f"{name}: {unsupported_ops(ops)} not in TensorRT's ONNX parser"


def test_vision_branches_match_torch_at_two_sizes(built):
    from illume_edge.config import ViTEncoderConfig

    engine, mods = built
    rng = np.random.default_rng(0)
    for h, w in ((64, 64), (96, 128)):
        image = rng.uniform(-1, 1, (3, h, w)).astype(np.float32)
        for b in mods.cfg.branches:
            enc, proj = mods.encoders[b.name], mods.projectors[b.name]
            with torch.no_grad():
                if isinstance(b.encoder, ViTEncoderConfig):
                    v = vit_inputs(image, b.encoder)
                    feeds = {"pixel_values": v.pixel_values, "rotary_cos": v.rotary_cos, "rotary_sin": v.rotary_sin}
                    out = enc(torch.from_numpy(v.pixel_values), grid_thw=torch.tensor([[1, *v.grid]]))
                    want = proj(out.pooler_output)  # transformers' own forward (cu_seqlens, its own rotary)
                else:
                    feeds = {"pixel_values": pixel_inputs(image, b.encoder)}
                    z = enc(torch.from_numpy(feeds["pixel_values"]))
                    want = proj(z[0].flatten(1).T)
            got = engine.session(f"vision_{b.name}").run(feeds)["features"]
            _close(got, want, f"vision_{b.name} {h}x{w}")


def test_llm_and_heads_match_transformers(built):
    """Prefill then decode steps through the engine's graphs (driven by the runtime's LLMRunner, whatever
    the graph's KV layout) vs transformers' full forward."""
    engine, mods = built
    cfg = mods.cfg
    rng = np.random.default_rng(1)
    for length in (5, 11):
        ids = rng.integers(0, cfg.tokens.text_vocab_size, (1, length))
        runner = LLMRunner(engine)
        seq = ids
        state = runner.prefill(ids.tolist(), max_new_tokens=2)
        for step in range(3):
            if step:
                runner.feed(state, seq[:, -1:])
            with torch.no_grad():
                want = mods.llm(torch.from_numpy(seq)).logits[:, -1].numpy()
            for name, (a, z) in cfg.head_ranges().items():
                got = engine.session(f"head_{name}").run({"hidden": state.hidden})["logits"]
                _close(got, want[:, a:z], f"head_{name} len {length} step {step}")
            seq = np.concatenate([seq, rng.integers(0, 1000, (1, 1))], axis=1)


def test_vq_decoder_matches_torch_at_two_grids(built):
    from illume_edge.export.export_vision import reference_vq_decode

    engine, mods = built
    cfg = mods.cfg
    if cfg.vq_decoder is None:
        assert not engine.has("vq_decoder")
        return
    rng = np.random.default_rng(2)
    for h, w in ((256, 256), (384, 512)):
        maps = [rng.standard_normal((1, lv.code_dim, *cfg.level_grid(i, h, w))).astype(np.float32)
                for i, lv in enumerate(cfg.levels)]
        got = engine.session("vq_decoder").run({f"codes_level{i}": m for i, m in enumerate(maps)})["image"]
        want = reference_vq_decode(mods.post_quant_conv, mods.vq_decoder, [torch.from_numpy(m) for m in maps])
        _close(got, want, f"vq_decoder {h}x{w}")


def test_unet_and_vae_match_torch_at_two_sizes(built):
    from illume_edge.export.diffusion import time_ids_for, zero_text_conditioning

    engine, mods = built
    d = mods.cfg.diffusion
    rng = np.random.default_rng(3)
    for batch, (lh, lw) in ((2, (8, 8)), (1, (12, 16))):
        latent = rng.standard_normal((batch, d.unet.latent_channels, lh, lw)).astype(np.float32)
        codes = rng.standard_normal((batch, d.unet.code_channels, lh, lw)).astype(np.float32)
        t = np.full((batch,), 537.0, np.float32)
        time_ids = np.tile(np.asarray(time_ids_for(d.unet, 3), np.float32), (batch, 1))
        got = engine.session("unet").run({"latent": latent, "timestep": t, "code_map": codes,
                                          "time_ids": time_ids})["noise_pred"]
        with torch.no_grad():
            text, pooled = zero_text_conditioning(d.unet, batch, torch.zeros(1))
            want = mods.unet(torch.from_numpy(np.concatenate([latent, codes], 1)), torch.from_numpy(t),
                             encoder_hidden_states=text,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.from_numpy(time_ids)}).sample
        _close(got, want, f"unet {batch}x{lh}x{lw}")
        got = engine.session("vae_decoder").run({"latent": latent})["image"]
        with torch.no_grad():
            want = mods.vae.decode(torch.from_numpy(latent) / d.vae.scaling_factor).sample
        _close(got, want, f"vae_decoder {batch}x{lh}x{lw}")


# ----------------------------------------------------------------------------------------------------
# The manifest is strict and the files are checked before any session exists
# ----------------------------------------------------------------------------------------------------
@pytest.fixture()
def v1_copy(engine_copy):
    return engine_copy("tiny-v1")


def _edit_manifest(engine_dir, fn):
    path = engine_dir / "manifest.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_unknown_manifest_key(v1_copy):
    _edit_manifest(v1_copy, lambda d: d.update(extra=1))
    with pytest.raises(EngineError, match=r"unknown key\(s\) \['extra'\]"):
        read_manifest(v1_copy)
    _edit_manifest(v1_copy, lambda d: (d.pop("extra"), d["components"]["llm"].update(shards=2)))
    with pytest.raises(EngineError, match=r"components.llm: unknown key\(s\) \['shards'\]"):
        read_manifest(v1_copy)


def test_missing_key_and_wrong_version(v1_copy):
    _edit_manifest(v1_copy, lambda d: d.pop("producer"))
    with pytest.raises(EngineError, match="missing key 'producer'"):
        read_manifest(v1_copy)
    _edit_manifest(v1_copy, lambda d: d.update(format_version=99, producer={}))
    with pytest.raises(EngineError, match="format_version 99 is not supported"):
        read_manifest(v1_copy)


def test_sha_mismatch_truncation_lfs_and_missing_file(v1_copy):
    m = read_manifest(v1_copy)
    head = v1_copy / m.component("head_level0").path
    data = bytearray(head.read_bytes())
    data[-1] ^= 0xFF
    head.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="sha256 .* does not match"):
        verify_engine(v1_copy, m)
    head.write_bytes(bytes(data[:-10]))
    with pytest.raises(EngineError, match="truncated or was replaced"):
        verify_engine(v1_copy, m)
    head.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(EngineError, match="git-lfs pointer"):
        verify_engine(v1_copy, m)
    head.unlink()
    with pytest.raises(EngineError, match="head_level0.onnx: missing"):
        Engine.load(v1_copy)


def test_unlisted_graph_is_refused(v1_copy):
    shutil.copyfile(v1_copy / "head_level0.onnx", v1_copy / "rogue.onnx")
    with pytest.raises(EngineError, match="rogue.onnx: graph/plan not listed"):
        Engine.load(v1_copy)


def test_swapped_graph_is_caught_by_the_contract(v1_copy):
    m = read_manifest(v1_copy)
    a, b = v1_copy / m.component("head_text").path, v1_copy / m.component("vae_decoder").path
    _edit_manifest(v1_copy, lambda d: d["components"]["head_text"].update(
        files=[dict(d["components"]["vae_decoder"]["files"][0], path="head_text.onnx")]))
    (v1_copy / "head_text.onnx").unlink()
    (v1_copy / "head_text.onnx.data").unlink(missing_ok=True)
    shutil.copyfile(b, a)
    engine = Engine.load(v1_copy)
    with pytest.raises(EngineError, match="head_text: graph inputs .* differ from the manifest"):
        engine.session("head_text")


def test_info_prints_the_manifest(tiny_engine, capsys):
    from illume_edge.cli import main

    engine_dir, _ = tiny_engine("tiny-plus")
    assert main(["info", str(engine_dir)]) == 0
    out = capsys.readouterr().out
    assert "tiny-plus (format 1, fp32)" in out and "llm: qwen2, 2 layers" in out
    assert "output level1 pixel: 1536 codes" in out and "vq_decoder" in out and "dynamic: batch 1..8" in out
