"""TensorRT plans from an engine folder's ONNX graphs (`illume-edge build-engines`), and their safe loading.

A plan is only valid for the ONNX it came from, its precision, the GPU architecture and the TensorRT
version that built it. All four go into the plan's file name and into a sidecar JSON; `load_plan`
checks the manifest entry and the sidecar *before* deserializing and names the rebuild command on any
mismatch, and never loads a plan the manifest does not list. Optimization profiles cover the model's
anchor resolutions (vision, VQ decoder, UNet, VAE) and the LLM's prefill and decode ranges. The timing
cache is kept next to the plans and reused by later builds.

`tensorrt` is imported lazily (or injected: the tests use a fake module), so this file imports on a CPU
machine without it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from .config import ModelConfig, ViTEncoderConfig
from .manifest import (EngineError, Manifest, PlanEntry, file_entry, read_manifest, verify_engine, verify_file,
                       write_manifest)

TIMING_CACHE = "tensorrt.timing_cache"
PLAN_PRECISIONS = ("fp16", "fp32")
Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


# ----------------------------------------------------------------------------------------------------
# Names and sidecars
# ----------------------------------------------------------------------------------------------------
def plan_stem(component: str, onnx_sha256: str, precision: str, sm: str, trt_version: str) -> str:
    """Everything that invalidates a plan, in its name: `unet.3f2a9c1d04be.fp16.sm87.trt10.3.0`."""
    return f"{component}.{onnx_sha256[:12]}.{precision}.sm{sm}.trt{trt_version}"


def rebuild_command(engine_dir: Path, precision: str, int8: bool) -> str:
    return f"illume-edge build-engines --engine {engine_dir} --precision {precision}" + (" --int8" if int8 else "")


# ----------------------------------------------------------------------------------------------------
# Optimization profiles
# ----------------------------------------------------------------------------------------------------
def _span(values: list[Shape]) -> tuple[Shape, Shape, Shape]:
    """(min, opt, max) over per-anchor shapes: element-wise min and max, opt = the first anchor's."""
    lo = tuple(min(v[i] for v in values) for i in range(len(values[0])))
    hi = tuple(max(v[i] for v in values) for i in range(len(values[0])))
    return lo, values[0], hi


def profiles(component: str, cfg: ModelConfig, max_batch: int = 2, decode_steps: int = 64) -> list[Profile]:
    """Optimization profiles of one component (one per regime; the LLM gets prefill and decode)."""
    anchors = list(cfg.anchors)
    hidden = cfg.llm.hidden_size
    if component.startswith("vision_"):
        branch = next(b for b in cfg.branches if f"vision_{b.name}" == component)
        if isinstance(branch.encoder, ViTEncoderConfig):
            enc = branch.encoder
            n = [enc.grid(h, w)[0] * enc.grid(h, w)[1] * enc.spatial_merge_size ** 2 for h, w in anchors]
            head = enc.embed_dim // enc.num_heads
            return [{"pixel_values": _span([(k, enc.patch_dim) for k in n]),
                     "rotary_cos": _span([(k, head) for k in n]), "rotary_sin": _span([(k, head) for k in n])}]
        return [{"pixel_values": _span([(1, 3, h, w) for h, w in anchors])}]
    if component.startswith("head_"):
        return [{"hidden": ((1, hidden), (max_batch, hidden), (max_batch, hidden))}]
    if component == "vq_decoder":
        return [{f"codes_level{i}": _span([(1, lv.code_dim, *cfg.level_grid(i, h, w)) for h, w in anchors])
                 for i, lv in enumerate(cfg.levels)}]
    if component in ("unet", "vae_decoder"):
        d = cfg.diffusion
        lat = [(h * d.upscale // d.vae.downsample, w * d.upscale // d.vae.downsample) for h, w in anchors]
        if component == "vae_decoder":
            return [{"latent": _span([(1, d.unet.latent_channels, *s) for s in lat])}]
        batch = lambda shapes: (((1,) + shapes[0][1:]), ((max_batch,) + shapes[1][1:]), ((max_batch,) + shapes[2][1:]))  # noqa: E731
        return [{"latent": batch(_span([(1, d.unet.latent_channels, *s) for s in lat])),
                 "code_map": batch(_span([(1, d.unet.code_channels, *s) for s in lat])),
                 "timestep": ((1,), (max_batch,), (max_batch,)),
                 "time_ids": ((1, d.unet.num_time_ids), (max_batch, d.unet.num_time_ids),
                              (max_batch, d.unet.num_time_ids))}]
    if component == "llm":
        llm = cfg.llm
        prompt = cfg.max_prompt_len
        ctx = prompt + max(cfg.image_token_count(h, w) for h, w in anchors)
        table = max(cfg.image_token_count(h, w) for h, w in anchors)  # one input image's features at most

        def regime(seq, past, rows):
            total = tuple((s + p) for s, p in zip(seq, past))
            kv = {f"past_key_values.{i}.{k}": tuple((b, llm.num_kv_heads, p, llm.head_size)
                                                    for b, p in zip((1, max_batch, max_batch), past))
                  for i in range(llm.num_layers) for k in ("key", "value")}
            return {"input_ids": tuple((b, s) for b, s in zip((1, max_batch, max_batch), seq)),
                    "position_ids": tuple((b, s) for b, s in zip((1, max_batch, max_batch), seq)),
                    "attention_mask": tuple((b, t) for b, t in zip((1, max_batch, max_batch), total)),
                    "image_embeds": tuple((r, hidden) for r in rows), **kv}

        prefill = regime((1, 256, prompt), (0, 0, 0), (0, table, table))
        decode = regime((1, 1, decode_steps), (1, prompt, ctx - decode_steps), (0, 0, 0))
        return [prefill, decode]
    raise EngineError(f"no TensorRT profile rule for component {component!r}")


# ----------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BuildOptions:
    precision: str = "fp16"
    int8: bool = False
    workspace_gb: float = 4.0
    components: tuple[str, ...] | None = None  # default: every ONNX component with a profile rule


def _import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise EngineError("TensorRT is not installed: `pip install illume-edge[gpu]` on a machine with an NVIDIA "
                          "GPU (JetPack ships it on Jetson)") from None
    return tensorrt


def device_sm() -> str:
    """Compute capability of GPU 0 as 'MAJORMINOR' via pycuda, else cuda-python."""
    try:
        import pycuda.driver as cuda

        cuda.init()
        major, minor = cuda.Device(0).compute_capability()
        return f"{major}{minor}"
    except ImportError:
        pass
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise EngineError("neither pycuda nor cuda-python is installed: cannot read the GPU's architecture") from None
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise EngineError(f"cudaGetDeviceProperties failed ({err}): no usable NVIDIA GPU")
    return f"{props.major}{props.minor}"


def build_engines(engine_dir: str | Path, options: BuildOptions | None = None, *, trt: Any = None,
                  sm: str | None = None, progress: Callable[[str], None] = print) -> Manifest:
    """Build a plan per component from the engine's ONNX, record them in the manifest, keep the timing cache."""
    engine_dir = Path(engine_dir)
    options = options or BuildOptions()
    if options.precision not in PLAN_PRECISIONS:
        raise EngineError(f"precision {options.precision!r}: plans are built as {PLAN_PRECISIONS} (+ --int8)")
    trt = trt or _import_tensorrt()
    sm = sm or device_sm()
    manifest = read_manifest(engine_dir)
    verify_engine(engine_dir, manifest)
    cfg = manifest.model_config()
    names = options.components or tuple(n for n, c in manifest.components.items()
                                        if c.kind == "onnx" and c.portable)
    not_portable = [n for n in names if not manifest.component(n).portable]
    if not_portable:
        raise EngineError(f"{engine_dir}: components {not_portable} use onnxruntime contrib ops (a quantized or "
                          f"fused graph) that TensorRT's parser does not take; build plans from an fp32/fp16 "
                          f"export with --llm-graph portable, or leave them to onnxruntime")
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = engine_dir / TIMING_CACHE
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    plans = dict(manifest.plans)
    for name in names:
        comp = manifest.component(name)
        onnx_sha = comp.files[0].sha256
        stem = plan_stem(name, onnx_sha, options.precision + ("-int8" if options.int8 else ""), sm, trt.__version__)
        progress(f"build {stem}")
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(engine_dir / comp.path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"{name}: TensorRT's ONNX parser rejected {comp.path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
        if options.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        if options.int8:
            config.set_flag(trt.BuilderFlag.INT8)
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, False)
        for prof in profiles(name, cfg):
            p = builder.create_optimization_profile()
            for tensor, (lo, opt, hi) in prof.items():
                p.set_shape(tensor, lo, opt, hi)
            config.add_optimization_profile(p)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError(f"{name}: TensorRT failed to build a plan (see the log above)")
        cache_bytes = bytes(config.get_timing_cache().serialize())
        cache_path.write_bytes(cache_bytes)
        plan_path, sidecar_path = engine_dir / f"{stem}.plan", engine_dir / f"{stem}.json"
        plan_path.write_bytes(bytes(plan))
        meta = {"component": name, "onnx_sha256": onnx_sha, "precision": options.precision, "int8": options.int8,
                "sm": sm, "tensorrt": trt.__version__, "profiles": profiles(name, cfg)}
        sidecar_path.write_text(json.dumps(meta, indent=2) + "\n")
        plans[stem] = PlanEntry(component=name, file=file_entry(engine_dir, plan_path),
                                sidecar=file_entry(engine_dir, sidecar_path), onnx_sha256=onnx_sha,
                                precision=options.precision, sm=sm, tensorrt=trt.__version__)
        manifest = dataclasses.replace(manifest, plans=dict(plans))
        write_manifest(engine_dir, manifest)  # after every plan: an interrupted build leaves no unlisted plan
    return manifest


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------
def find_plan(manifest: Manifest, component: str, precision: str, sm: str, trt_version: str) -> PlanEntry | None:
    for p in manifest.plans.values():
        if (p.component, p.precision, p.sm, p.tensorrt) == (component, precision, sm, trt_version):
            return p
    return None


def load_plan(engine_dir: str | Path, manifest: Manifest, component: str, precision: str, *, trt: Any = None,
              sm: str | None = None) -> Any:
    """Deserialize the listed plan for this GPU and TensorRT, after checking file, sidecar and ONNX hash."""
    engine_dir = Path(engine_dir)
    trt = trt or _import_tensorrt()
    sm = sm or device_sm()
    plan = find_plan(manifest, component, precision, sm, trt.__version__)
    fix = rebuild_command(engine_dir, precision, False)
    if plan is None:
        have = [f"{p.component} {p.precision} sm{p.sm} trt{p.tensorrt}" for p in manifest.plans.values()
                if p.component == component]
        raise EngineError(f"{component}: no TensorRT plan listed for {precision} on sm{sm} with TensorRT "
                          f"{trt.__version__} (listed: {have or 'none'}); run `{fix}`")
    verify_file(engine_dir, plan.sidecar)
    side = json.loads((engine_dir / plan.sidecar.path).read_text())
    comp = manifest.component(component)
    checks = {"component": component, "onnx_sha256": comp.files[0].sha256, "precision": precision, "sm": sm,
              "tensorrt": trt.__version__}
    for key, want in checks.items():
        if side.get(key) != want:
            raise EngineError(f"{plan.sidecar.path}: {key} is {side.get(key)!r}, this machine needs {want!r}; "
                              f"the plan is stale: run `{fix}`")
    verify_file(engine_dir, plan.file)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine((engine_dir / plan.file.path).read_bytes())
    if engine is None:
        raise EngineError(f"{plan.file.path}: TensorRT could not deserialize it; run `{fix}`")
    return engine

