"""Build an engine folder from loaded modules: one ONNX graph per component, tables, tokenizer, manifest."""
from __future__ import annotations

import datetime as _dt
import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..config import FORMAT_VERSION, ViTEncoderConfig
from ..manifest import Component, FileEntry, Manifest, Producer, TensorSpec, file_entry, write_manifest
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
                     precision=precision, opset=info.opset, ops=tuple(info.ops))


def export_graphs(mods: IllumeModules, out_dir: Path, progress: Progress = print) -> dict[str, GraphInfo]:
    """Every component's ONNX graph, named as design.md's contracts."""
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
    graphs["llm"] = export_llm(mods.llm, cfg, out_dir / "llm.onnx")
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


def export_engine(mods: IllumeModules, out_dir: str | Path, tokenizer_json: str | Path, *,
                  precision: str = "fp32", source: dict | None = None, progress: Progress = print) -> Manifest:
    if precision != "fp32":
        raise ValueError(f"precision {precision!r}: this exporter writes fp32 graphs; quantized engines are "
                         f"produced from them by `illume-edge quantize` (not available yet)")
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    cfg = mods.cfg
    graphs = export_graphs(mods, out_dir, progress)
    components = {name: _component(out_dir, info, precision) for name, info in graphs.items()}

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
