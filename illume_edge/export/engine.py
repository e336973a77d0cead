"""Build an engine folder from loaded modules: one ONNX graph per component, tables, tokenizer, manifest."""
from __future__ import annotations

import datetime as _dt
import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import __version__
from ..config import FORMAT_VERSION, ViTEncoderConfig
from ..manifest import (DEFAULT_LLM_GRAPH, Component, FileEntry, Manifest, Producer, TensorSpec, file_entry,
                        write_manifest)
from ..tensorrt_ops import check_graph_ops
from .modules import IllumeModules
from .onnx_io import OPSET, GraphInfo

Progress = Callable[[str], None]


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "absent"


def producer() -> Producer:
    return Producer(illume_edge=__version__, torch=_version("torch"), transformers=_version("transformers"),
                    diffusers=_version("diffusers"), onnx=_version("onnx"), onnxruntime=_version("onnxruntime"),
                    opset=OPSET, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def _component(out_dir: Path, info: GraphInfo, precision: str) -> Component:
    def specs(ts):
        return tuple(TensorSpec(t.name, t.dtype, tuple(t.shape)) for t in ts)

    return Component(kind="onnx", files=tuple(file_entry(out_dir, f) for f in info.files),
                     inputs=specs(info.inputs), outputs=specs(info.outputs),
                     dynamic_ranges={k: list(v) for k, v in info.dynamic_ranges.items()},
                     precision=precision, opset=info.opset, ops=tuple(info.ops), portable=info.portable)


def export_graphs(mods: IllumeModules, out_dir: Path, progress: Progress = print,
                  llm_graph: str = DEFAULT_LLM_GRAPH) -> dict[str, GraphInfo]:
    """Every component's ONNX graph, named as design.md's contracts. `llm_graph`: see LLMStep."""
    from .export_diffusion import export_unet, export_vae_decoder
    from .export_llm import export_heads, export_llm
    from .export_vision import export_vision_pixel, export_vision_semantic, export_vq_decoder

    cfg = mods.cfg
    graphs: dict[str, GraphInfo] = {}
    for b in cfg.branches:
        progress(f"export vision_{b.name}")
        fn = export_vision_semantic if isinstance(b.encoder, ViTEncoderConfig) else export_vision_pixel
        graphs[f"vision_{b.name}"] = fn(mods.encoders[b.name], mods.projectors[b.name], b,
                                        out_dir / f"vision_{b.name}.onnx")
    progress("export llm")
    graphs["llm"] = export_llm(mods.llm, cfg, out_dir / "llm.onnx", graph=llm_graph)
    progress("export heads")
    graphs.update({f"head_{k}": v for k, v in export_heads(mods.llm, cfg, out_dir).items()})
    if mods.vq_decoder is not None:
        progress("export vq_decoder")
        graphs["vq_decoder"] = export_vq_decoder(mods.post_quant_conv, mods.vq_decoder, cfg,
                                                 out_dir / "vq_decoder.onnx")
    if mods.unet is not None:
        progress("export unet")
        graphs["unet"] = export_unet(mods.unet, cfg.diffusion, out_dir / "unet.onnx")
        progress("export vae_decoder")
        graphs["vae_decoder"] = export_vae_decoder(mods.vae, cfg.diffusion, out_dir / "vae_decoder.onnx")
    return graphs


EXPORT_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}


def set_precision(mods: IllumeModules, precision: str) -> None:
    """Cast the modules for an export. fp16 keeps the SimVQ tables and the VAE in fp32: the tables are
    host data, and the SDXL VAE overflows in fp16."""
    if precision not in EXPORT_PRECISIONS:
        raise ValueError(f"precision {precision!r}: export writes {sorted(EXPORT_PRECISIONS)} graphs (int8/int4 "
                         f"engines are quantized from an fp32 export)")
    dtype = EXPORT_PRECISIONS[precision]
    keep_fp32 = {id(m) for m in [*mods.quantizers, mods.vae] if m is not None}
    for m in mods.all_modules():
        _cast_weights(m, torch.float32 if id(m) in keep_fp32 else dtype)


def _cast_weights(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters and persistent buffers; non-persistent ones (rotary frequency tables) keep fp32."""
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in sub.named_buffers(recurse=False):
            if b.is_floating_point() and name not in sub._non_persistent_buffers_set:
                setattr(sub, name, b.to(dtype))


def _precision_of(path: Path) -> str:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    half = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    return "fp16" if half else "fp32"


def export_engine(mods: IllumeModules, out_dir: str | Path, tokenizer_json: str | Path, *,
                  precision: str = "fp32", source: dict | None = None, progress: Progress = print,
                  llm_graph: str = DEFAULT_LLM_GRAPH) -> Manifest:
    set_precision(mods, precision)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    cfg = mods.cfg
    graphs = export_graphs(mods, out_dir, progress, llm_graph)
    for name, info in graphs.items():  # a portable ONNX must become a TensorRT plan on a GPU target
        if info.portable:
            check_graph_ops(name, info.ops)
    components = {name: _component(out_dir, info, _precision_of(info.path)) for name, info in graphs.items()}

    assets: dict[str, FileEntry] = {}
    shutil.copyfile(tokenizer_json, out_dir / "tokenizer.json")
    assets["tokenizer"] = file_entry(out_dir, "tokenizer.json")
    for i, q in enumerate(mods.quantizers):
        table = q.effective_table().detach().float().numpy().astype(np.float32)  # [codebook_size, code_dim]
        np.save(out_dir / f"codebook_level{i}.npy", table, allow_pickle=False)
        assets[f"codebook_level{i}"] = file_entry(out_dir, f"codebook_level{i}.npy")
    if mods.unet is not None:
        (out_dir / "scheduler_config.json").write_text(json.dumps(mods.scheduler_config, indent=2) + "\n")
        assets["scheduler"] = file_entry(out_dir, "scheduler_config.json")
    (out_dir / "generation_config.json").write_text(json.dumps(mods.generation_config, indent=2) + "\n")
    assets["generation_config"] = file_entry(out_dir, "generation_config.json")

    manifest = Manifest(format_version=FORMAT_VERSION, name=cfg.name, config=cfg.to_dict(), producer=producer(),
                        precision=precision, components=components, assets=assets, source=source or {})
    write_manifest(out_dir, manifest)
    return manifest
