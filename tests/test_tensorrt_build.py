"""The TensorRT builder's logic with a fake `tensorrt` module: profiles, plan names, sidecars, the timing
cache, manifest listing and the checks done before a plan is deserialized. (Real builds need a GPU.)"""
import dataclasses
import json
import types

import pytest

from illume_edge.manifest import EngineError, read_manifest
from illume_edge.runtime.engine import Engine
from illume_edge.tensorrt_build import BuildOptions, build_engines, load_plan, plan_stem, profiles


def fake_tensorrt(version="10.3.0", reject=None):
    """Just enough of the TensorRT 10 Python API to record what the builder asks for."""
    log = types.SimpleNamespace(profiles={}, flags=set(), caches_in=[], parsed=[])

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), (name, lo, opt, hi)
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+"

    class Config:
        def __init__(self):
            self.profiles, self.cache = [], None

        def set_memory_pool_limit(self, pool, size):
            self.workspace = size

        def set_flag(self, flag):
            log.flags.add(flag)

        def create_timing_cache(self, data):
            log.caches_in.append(bytes(data))
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, p):
            self.profiles.append(p.shapes)

    class Parser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            log.parsed.append(path)
            self.network.path = path
            if reject and reject in path:
                self.num_errors = 1
                return False
            return True

        def get_error(self, i):
            return "Unsupported operator FancyOp"

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return types.SimpleNamespace(path=None)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            log.profiles[network.path] = config.profiles
            return b"PLAN:" + network.path.encode()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return types.SimpleNamespace(data=data)

    trt = types.SimpleNamespace(__version__=version, Logger=Logger, Builder=Builder, OnnxParser=Parser,
                                Runtime=Runtime, MemoryPoolType=types.SimpleNamespace(WORKSPACE="ws"),
                                BuilderFlag=types.SimpleNamespace(FP16="fp16", INT8="int8"))
    return trt, log


@pytest.fixture()
def engine_dir(engine_copy):
    return engine_copy("tiny-plus", "portable")  # TensorRT plans come from the portable graphs


def test_profiles_cover_the_anchors(tiny_engine):
    _, mods = tiny_engine("tiny-plus")
    cfg = mods.cfg
    (pix,) = profiles("vision_pixel", cfg)
    assert pix["pixel_values"] == ((1, 3, 256, 256), (1, 3, 256, 256), (1, 3, 512, 512))
    (vq,) = profiles("vq_decoder", cfg)
    assert vq["codes_level1"][0] == (1, 8, 16, 16) and vq["codes_level1"][2] == (1, 8, 32, 32)
    (unet,) = profiles("unet", cfg)
    assert unet["latent"] == ((1, 4, 64, 64), (2, 4, 64, 64), (2, 4, 128, 128))
    prefill, decode = profiles("llm", cfg)
    assert prefill["past_key_values.0.key"][2][2] == 0 and decode["input_ids"][0] == (1, 1)
    assert decode["attention_mask"][2][1] == cfg.max_prompt_len + cfg.image_token_count(512, 512)
    with pytest.raises(EngineError, match="no TensorRT profile rule"):
        profiles("mystery", cfg)


def test_build_lists_plans_and_reuses_the_timing_cache(engine_dir):
    trt, log = fake_tensorrt()
    manifest = build_engines(engine_dir, BuildOptions(precision="fp16"), trt=trt, sm="87", progress=lambda s: None)
    comps = {p.component for p in manifest.plans.values()}
    assert comps == set(manifest.components)
    unet = next(p for p in manifest.plans.values() if p.component == "unet")
    stem = plan_stem("unet", manifest.component("unet").files[0].sha256, "fp16", "87", "10.3.0")
    assert unet.file.path == stem + ".plan" and unet.sidecar.path == stem + ".json"
    side = json.loads((engine_dir / unet.sidecar.path).read_text())
    assert side["sm"] == "87" and side["tensorrt"] == "10.3.0" and side["onnx_sha256"] == unet.onnx_sha256
    assert log.flags == {"fp16"} and log.caches_in[0] == b"" and log.caches_in[1] == b"+"  # cache carried over
    assert (engine_dir / "tensorrt.timing_cache").read_bytes() == b"+" * len(manifest.plans)
    assert len(log.profiles[str(engine_dir / "llm.onnx")]) == 2  # prefill and decode
    Engine.load(engine_dir)  # plans are listed: the folder still verifies
    engine = load_plan(engine_dir, read_manifest(engine_dir), "unet", "fp16", trt=trt, sm="87")
    assert engine.data.startswith(b"PLAN:")
    _, log2 = fake_tensorrt()
    build_engines(engine_dir, BuildOptions(components=("head_text",)), trt=fake_tensorrt()[0], sm="87",
                  progress=lambda s: None)
    assert (engine_dir / "tensorrt.timing_cache").read_bytes().startswith(b"+" * len(manifest.plans))


def test_fused_llm_graph_is_left_to_onnxruntime(engine_copy):
    """The default export's llm graph uses contrib ops: plans are built for every other component, and
    asking for the llm by name is refused with the fix."""
    engine_dir = engine_copy("tiny-plus", "fused")
    manifest = build_engines(engine_dir, BuildOptions(), trt=fake_tensorrt()[0], sm="87", progress=lambda s: None)
    assert {p.component for p in manifest.plans.values()} == set(manifest.components) - {"llm"}
    with pytest.raises(EngineError, match=r"\['llm'\] use onnxruntime contrib ops.*--llm-graph portable"):
        build_engines(engine_dir, BuildOptions(components=("llm",)), trt=fake_tensorrt()[0], sm="87",
                      progress=lambda s: None)


def test_stale_or_unlisted_plans_are_refused(engine_dir):
    trt, _ = fake_tensorrt()
    manifest = build_engines(engine_dir, BuildOptions(components=("unet",)), trt=trt, sm="87",
                             progress=lambda s: None)
    with pytest.raises(EngineError, match="no TensorRT plan listed for fp16 on sm89 .* build-engines --engine"):
        load_plan(engine_dir, manifest, "unet", "fp16", trt=trt, sm="89")
    newer, _ = fake_tensorrt(version="10.4.0")
    with pytest.raises(EngineError, match="TensorRT 10.4.0"):
        load_plan(engine_dir, manifest, "unet", "fp16", trt=newer, sm="87")
    plan = next(iter(manifest.plans.values()))
    # The ONNX was re-exported since the build: the listed plan's sidecar names the old graph.
    comp = manifest.component("unet")
    reexported = dataclasses.replace(comp, files=(dataclasses.replace(comp.files[0], sha256="f" * 64),
                                                  *comp.files[1:]))
    stale = dataclasses.replace(manifest, components={**manifest.components, "unet": reexported})
    with pytest.raises(EngineError, match="onnx_sha256 .* the plan is stale: run `illume-edge build-engines"):
        load_plan(engine_dir, stale, "unet", "fp16", trt=trt, sm="87")
    side_path = engine_dir / plan.sidecar.path
    original = side_path.read_text()
    side_path.write_text(original.replace('"sm": "87"', '"sm": "86"'))  # same size, other bytes
    with pytest.raises(EngineError, match="sha256 .* does not match"):
        load_plan(engine_dir, manifest, "unet", "fp16", trt=trt, sm="87")
    side_path.write_text(original)
    (engine_dir / "stray.plan").write_bytes(b"x")
    with pytest.raises(EngineError, match="stray.plan: graph/plan not listed"):
        Engine.load(engine_dir)


def test_parser_rejection_names_the_component(engine_dir):
    trt, _ = fake_tensorrt(reject="vq_decoder")
    with pytest.raises(EngineError, match="vq_decoder: TensorRT's ONNX parser rejected .*FancyOp"):
        build_engines(engine_dir, BuildOptions(), trt=trt, sm="87", progress=lambda s: None)
    with pytest.raises(EngineError, match="precision 'int4'"):
        build_engines(engine_dir, BuildOptions(precision="int4"), trt=trt, sm="87")


def test_relative_engine_paths(engine_dir, monkeypatch):
    """`make` passes engines/NAME relative to the repository: entries must still be engine-relative."""
    from illume_edge.manifest import file_entry

    monkeypatch.chdir(engine_dir.parent)
    rel = engine_dir.name
    assert file_entry(rel, f"{rel}/llm.onnx").path == "llm.onnx"  # cwd-relative
    assert file_entry(rel, "llm.onnx").path == "llm.onnx"  # engine-relative
    assert file_entry(rel, engine_dir / "llm.onnx").path == "llm.onnx"  # absolute
    with pytest.raises(EngineError, match="not a file inside the engine folder"):
        file_entry(rel, "../elsewhere.onnx")
    trt, _ = fake_tensorrt()
    manifest = build_engines(rel, BuildOptions(components=("head_level0",)), trt=trt, sm="87",
                             progress=lambda s: None)
    (plan,) = manifest.plans.values()
    assert "/" not in plan.file.path and (engine_dir / plan.file.path).is_file()
    Engine.load(rel)
