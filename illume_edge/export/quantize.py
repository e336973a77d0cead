"""Weight-only quantization of an fp32 or fp16 engine folder: MatMul -> com.microsoft MatMulNBits (int8 / int4).

`quantize_engine(src, dst, "int4")` copies an fp32 or fp16 engine folder and rewrites the graphs whose decode
cost is their weight read: the `llm` graph (every projection of every layer) and the `head_*` range graphs.
Each constant MatMul weight [K, N] is quantized blockwise along K (blocks of `block_size`, symmetric, one
scale per block, in the weight's float type) by onnxruntime's `MatMulNBitsQuantizer`, with `accuracy_level=4`
(int8 activations in the CPU kernel; the CUDA kernel ignores it). Optionally (int4 only) the embedding Gather
of the `llm` graph becomes GatherBlockQuantized.

The source's float type stays the activations' type (`ACTIVATIONS`, recorded as
`source["quantization"]["activations"]`):
- an fp32 export gives the CPU engine: float32 activations and KV cache. On the 2-core VM (0.5B bench
  shape, int4 block 32, batch 1) it decodes 3-5% faster than the fp16-activation engine (20.9 / 22.2 vs
  21.6 / 23.4 ms per token in two alternating pairs of fresh processes, a scratch script not kept;
  docs/gpu.md);
- an fp16 export gives the GPU engine: float16 activations and KV cache, which onnxruntime's CUDA
  GroupQueryAttention requires (it is registered for float16 / bfloat16 only; session.check_cuda_attention)
  and which halves the cache's bytes. This is onnxruntime-genai's int4 CUDA layout too.

What this buys and costs
- Bytes read per decode step drop ~4x (int8) / ~7x (int4, 4 bits + a 4-byte scale per 32 weights), and
  decode on CPU is bandwidth bound, so time per token drops with them (docs/performance.md).
- Quantized graphs use com.microsoft contrib ops: onnxruntime runs them (CPU, CUDA), TensorRT's ONNX
  parser does not. Their manifest components say so (`portable: false`); fp32/fp16 engines stay portable.
- The vision graphs are compute bound, not bandwidth bound: their linear layers are Gemm(transB=1) run once
  per image over hundreds of tokens, so weight-only quantization would not make them faster. `vision="int8"`
  quantizes them *dynamically* instead (`quantize_dynamic_component`): weights int8 per output channel (7-bit
  range, so that CPUs without VNNI do not saturate), activations uint8 per tensor at run time
  (DynamicQuantizeLinear -> MatMulInteger), so the GEMMs run on the
  CPU's int8 dot-product units (AVX512-VNNI / AVX-VNNI / ARM dot product). On the bench's ViT (1280 wide, 768
  patches) that is 2.6x faster than fp32 in `make bench`, its features within 1.2e-2 of fp32 there.
  `unet="int8"` does the same to the diffusion UNet's attention and feed-forward layers (1.4x on the bench UNet).
  Convolutions stay fp32: onnxruntime's ConvInteger has no fast CPU kernel. Opt-in: it changes the features
  and images, so check the task accuracy (docs/nano.md measures both on ILLUME-nano).

Torch-free (onnx + onnxruntime only): it runs on an exported folder, not on the checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Callable, Iterable

from ..manifest import (MANIFEST_NAME, Component, EngineError, Manifest, file_entry, read_manifest, verify_engine,
                        write_manifest)

QUANT_BITS = {"int8": 8, "int4": 4}
# Source precision -> the quantized engine's activation (and KV cache) type: see the module docstring.
ACTIVATIONS = {"fp32": "float32", "fp16": "float16"}
DYNAMIC_SCHEMES = ("int8",)  # dynamic int8 of a compute-bound graph's MatMul / Gemm (module docstring)
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations x dequantized weights on CPU (the fast kernels)
EXTERNAL_DATA_THRESHOLD = 1 << 20  # same rule as export: graphs >= 1 MiB keep weights in <file>.data

Progress = Callable[[str], None]


def default_components(manifest: Manifest) -> list[str]:
    """The graphs whose per-token cost is a weight read: `llm` and every `head_*`."""
    return [n for n in sorted(manifest.components) if n == "llm" or n.startswith("head_")]


def _check_args(precision: str, block_size: int, embeddings: bool) -> int:
    if precision not in QUANT_BITS:
        raise ValueError(f"quantize: precision {precision!r} is not one of {sorted(QUANT_BITS)} (fp32/fp16 "
                         f"engines come from `illume-edge export --precision`)")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"quantize: block_size {block_size} is not one of {BLOCK_SIZES}")
    if embeddings and precision != "int4":
        raise ValueError("quantize: embedding quantization (GatherBlockQuantized) is int4 only")
    return QUANT_BITS[precision]


def _quantize_model(model, bits: int, block_size: int, embeddings: bool):
    """Quantize every constant-weight MatMul (and the constant-table Gather if `embeddings`) in place."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    op_types = ("MatMul", "Gather") if embeddings else ("MatMul",)
    quant_axes = (("MatMul", 0), ("Gather", 1))  # MatMul weights [K, N] along K; embedding rows along hidden
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL, op_types_to_quantize=op_types,
                                     quant_axes=quant_axes)
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = log.level
    log.setLevel(logging.ERROR)  # one INFO line per node, and a warning when an int4 table raises the opset
    try:
        quantizer.process()
    finally:
        log.setLevel(level)
    return quantizer.model.model


def _graph_ops(model) -> list[tuple[str, str]]:
    from .onnx_io import graph_ops

    return graph_ops(model)


def _save(model, path: Path) -> list[Path]:
    """Write `model` to `path` (+ `<path>.data` when large); return the files written."""
    import onnx

    data = path.with_name(path.name + ".data")
    for f in (path, data):
        if f.exists():
            f.unlink()
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    external = size >= EXTERNAL_DATA_THRESHOLD
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024, convert_attribute=False)
    return [path] + ([data] if data.exists() else [])


def quantize_component(src_dir: Path, dst_dir: Path, name: str, comp: Component, precision: str,
                       block_size: int = 32, embeddings: bool = False) -> Component:
    """Quantize one component's graph from `src_dir` into `dst_dir`; return its new manifest entry."""
    import onnx

    bits = _check_args(precision, block_size, embeddings)
    if comp.kind != "onnx":
        raise EngineError(f"quantize: component {name} is {comp.kind!r}, only ONNX graphs can be quantized")
    if comp.precision not in ACTIVATIONS:
        raise EngineError(f"quantize: component {name} is {comp.precision}; quantize an fp32 (CPU) or fp16 (GPU) "
                          f"export")
    model = onnx.load(str(src_dir / comp.path), load_external_data=True)
    before = {n.op_type for n in model.graph.node}
    io_before = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    model = _quantize_model(model, bits, block_size, embeddings and name == "llm")
    ops = _graph_ops(model)
    if not any(op in ("MatMulNBits", "GatherBlockQuantized") for _, op in ops):
        raise EngineError(f"quantize: {name} has no constant-weight MatMul to quantize (ops {sorted(before)})")
    if ([i.name for i in model.graph.input], [o.name for o in model.graph.output]) != io_before:
        raise EngineError(f"quantize: {name}: the quantizer changed the graph's inputs/outputs")
    files = _save(model, dst_dir / comp.path)
    portable = all(d in ("", "ai.onnx") for d, _ in ops)
    # An int4 Gather table needs opset 21 (the quantizer raises the import); record what the graph says.
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=comp.opset)
    return dataclasses.replace(comp, files=tuple(file_entry(dst_dir, f) for f in files), precision=precision,
                               ops=tuple(sorted({op for _, op in ops})), portable=portable, opset=opset)


def vision_components(manifest: Manifest) -> list[str]:
    """The input branches' encoder graphs (`vision_*`)."""
    return [n for n in sorted(manifest.components) if n.startswith("vision_")]


def quantize_dynamic_component(src_dir: Path, dst_dir: Path, name: str, comp: Component) -> Component:
    """Dynamic int8 of one compute-bound graph's constant-weight MatMul / Gemm nodes (a vision encoder, the
    UNet): int8 weights per output channel in a 7-bit range, uint8 activations quantized per tensor at run time
    (MatMulInteger). Returns the new entry."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ..tensorrt_ops import unsupported_ops

    if comp.kind != "onnx" or comp.precision != "fp32":
        raise EngineError(f"quantize: component {name} is {comp.kind} {comp.precision}; quantize an fp32 ONNX "
                          f"export")
    with tempfile.TemporaryDirectory(dir=dst_dir) as tmp:
        out = Path(tmp) / comp.path
        log = logging.getLogger()
        level = log.level
        log.setLevel(logging.ERROR)  # the quantizer warns that no pre-processing pass ran (none is needed)
        try:
            # reduce_range: 7-bit weights. An engine is built once and run on whatever CPU it is copied to; on
            # x86 CPUs without VNNI (AVX2 only) onnxruntime's u8 x s8 kernel sums pairs of products in int16,
            # which 8-bit weights can saturate. Measured on an AVX2-only VM: the test ViT's features fell to
            # cosine 0.988 of fp32 and the UNet's prediction to 0.13 relative error with 8-bit weights
            # (tests/test_quantize.py; the same tests pass with AVX512-VNNI)
            quantize_dynamic(str(src_dir / comp.path), str(out), weight_type=QuantType.QInt8, per_channel=True,
                             reduce_range=True, op_types_to_quantize=["MatMul", "Gemm"],
                             use_external_data_format=True)
        finally:
            log.setLevel(level)
        model = onnx.load(str(out), load_external_data=True)
    ops = _graph_ops(model)
    if not any(op == "MatMulInteger" for _, op in ops):
        raise EngineError(f"quantize: {name} has no constant-weight MatMul / Gemm to quantize")
    files = _save(model, dst_dir / comp.path)
    op_names = sorted({op for _, op in ops})
    portable = all(d in ("", "ai.onnx") for d, _ in ops) and not unsupported_ops(op_names)
    return dataclasses.replace(comp, files=tuple(file_entry(dst_dir, f) for f in files), precision="int8",
                               ops=tuple(op_names), portable=portable)


def quantize_engine(src_dir: str | Path, dst_dir: str | Path, precision: str, block_size: int = 32,
                    components: Iterable[str] | None = None, *, embeddings: bool = False,
                    vision: str | None = None, unet: str | None = None, progress: Progress = print) -> Manifest:
    """Copy the fp32 or fp16 engine `src_dir` to `dst_dir` with `components` (default: llm + heads) quantized.

    precision   "int8" | "int4": MatMulNBits bits, symmetric blocks of `block_size` along K, accuracy_level 4
    embeddings  int4 only: also store the llm's embedding table as GatherBlockQuantized (smaller file and
                resident memory; no effect on decode speed, one row per token is gathered either way)
    vision      "int8": also quantize every `vision_*` graph dynamically (`quantize_dynamic_component`;
                fp32 sources only: a CPU scheme)
    unet        "int8": also quantize the `unet` graph dynamically (fp32 sources only)
    The new manifest records each quantized component's precision, files (sha256, bytes), op list and
    `portable: false`; the engine precision becomes `precision`; the producer is kept and
    `source["quantization"]` records the recipe, the activations' type included. Everything else is copied
    unchanged.
    """
    import onnxruntime as ort

    bits = _check_args(precision, block_size, embeddings)
    for what, scheme in (("vision", vision), ("unet", unet)):
        if scheme is not None and scheme not in DYNAMIC_SCHEMES:
            raise ValueError(f"quantize: {what} {scheme!r} is not one of {DYNAMIC_SCHEMES} (or None: fp32)")
    src, dst = Path(src_dir), Path(dst_dir)
    manifest = read_manifest(src)
    verify_engine(src, manifest, check_hash=False)
    if manifest.precision not in ACTIVATIONS:
        raise EngineError(f"quantize: {src} is a {manifest.precision} engine; quantize an fp32 (CPU) or fp16 (GPU) "
                          f"export")
    if manifest.precision != "fp32" and (vision or unet):
        raise EngineError(f"quantize: {src} is {manifest.precision}: dynamic int8 (vision / unet) is a CPU scheme "
                          f"for fp32 graphs (uint8 activations quantized from float32); quantize the fp32 export, "
                          f"or drop --vision / --unet")
    names = list(components) if components is not None else default_components(manifest)
    unknown = [n for n in names if n not in manifest.components]
    if unknown or not names:
        raise EngineError(f"quantize: unknown component(s) {unknown or names} (engine has "
                          f"{sorted(manifest.components)})")
    dynamic_names = (vision_components(manifest) if vision else []) + (["unet"] if unet else [])
    if vision and not vision_components(manifest):
        raise EngineError(f"quantize: {src} has no vision_* component to quantize")
    if unet and "unet" not in manifest.components:
        raise EngineError(f"quantize: {src} has no unet component (a VQ-decoder engine); drop unet='int8'")
    if set(dynamic_names) & set(names):
        raise EngineError(f"quantize: {sorted(set(dynamic_names) & set(names))} are compute-bound graphs: quantize "
                          f"them with vision='int8' / unet='int8', not as weight-only components")
    if dst.resolve() == src.resolve():
        raise EngineError("quantize: the output folder must differ from the fp32 engine folder")
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)

    rewritten = {f.path for n in names + dynamic_names for f in manifest.components[n].files}
    for entry in manifest.all_files():
        if entry.path not in rewritten:
            (dst / entry.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / entry.path, dst / entry.path)
    comps = dict(manifest.components)
    for name in names:
        progress(f"quantize {name} -> {precision} (block {block_size})")
        comps[name] = quantize_component(src, dst, name, comps[name], precision, block_size, embeddings)
    for name in dynamic_names:
        progress(f"quantize {name} -> dynamic int8")
        comps[name] = quantize_dynamic_component(src, dst, name, comps[name])
    source = dict(manifest.source)
    source["quantization"] = {
        "from": str(src), "precision": precision, "bits": bits, "block_size": block_size, "symmetric": True,
        "accuracy_level": ACCURACY_LEVEL, "components": names, "embeddings": bool(embeddings),
        "activations": ACTIVATIONS[manifest.precision],
        "tool": f"onnxruntime {ort.__version__} MatMulNBitsQuantizer",
    }
    if dynamic_names:
        source["quantization"]["dynamic"] = {
            "scheme": "dynamic int8: weights per output channel (int8), activations per tensor at run time "
                      "(uint8), MatMulInteger", "components": dynamic_names,
            "tool": f"onnxruntime {ort.__version__} quantize_dynamic"}
    out = dataclasses.replace(manifest, precision=precision, components=comps, source=source)
    write_manifest(dst, out)
    return read_manifest(dst)  # round-trip through the strict parser


# ---------------------------------------------------------------------------------------------------------
# CLI hook: `illume-edge quantize --engine engines/tiny-plus --out engines/tiny-plus-int4 --precision int4`
# ---------------------------------------------------------------------------------------------------------
def add_quantize_parser(sub) -> None:
    """Add the `quantize` sub-command to the `illume-edge` sub-parsers."""
    p = sub.add_parser("quantize", help="weight-only int8/int4 copy of an fp32 or fp16 engine (llm + heads; "
                                        "onnxruntime only, not TensorRT-portable)")
    p.add_argument("--engine", required=True,
                   help="fp32 engine folder (CPU), or fp16 (GPU: fp16 activations and KV cache, as onnxruntime's "
                        "CUDA attention requires)")
    p.add_argument("--out", required=True, help="new engine folder")
    p.add_argument("--precision", required=True, choices=sorted(QUANT_BITS))
    p.add_argument("--block-size", dest="block_size", type=int, default=32, choices=BLOCK_SIZES)
    p.add_argument("--components", default=None,
                   help="comma-separated component names (default: llm and every head_*)")
    p.add_argument("--embeddings", action="store_true",
                   help="int4 only: also quantize the llm's embedding table (GatherBlockQuantized)")
    p.add_argument("--vision", default=None, choices=DYNAMIC_SCHEMES,
                   help="also quantize the vision encoders: int8 = dynamic int8 GEMMs (2-3x faster encoders on "
                        "CPUs with int8 dot products; changes the features, check your task accuracy)")
    p.add_argument("--unet", default=None, choices=DYNAMIC_SCHEMES,
                   help="also quantize the diffusion UNet's attention / feed-forward GEMMs: int8 = dynamic int8 "
                        "(~1.4x faster UNet steps; changes the images, check your task accuracy)")
    p.set_defaults(fn=cmd_quantize)


def cmd_quantize(args) -> int:
    comps = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    m = quantize_engine(args.engine, args.out, args.precision, args.block_size, comps, embeddings=args.embeddings,
                        vision=args.vision, unet=args.unet, progress=lambda s: print(f"[quantize] {s}", flush=True))
    src = read_manifest(args.engine)
    for name, c in sorted(m.components.items()):
        if c.precision != "fp32" or name in (comps or []):
            old = sum(f.bytes for f in src.components[name].files)
            new = sum(f.bytes for f in c.files)
            print(f"  {name:<14} {old / 1e6:9.1f} MB -> {new / 1e6:8.1f} MB ({c.precision}, "
                  f"{'portable' if c.portable else 'onnxruntime only'})")
    print(f"engine written to {args.out} ({MANIFEST_NAME} precision {m.precision}, "
          f"{m.source['quantization']['activations']} activations)")
    return 0
