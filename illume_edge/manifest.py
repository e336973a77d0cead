"""The engine folder's contract: `manifest.json`, parsed strictly, and the file checks done before loading.

An engine folder holds one ONNX graph per component (plus external-data sidecars), the tokenizer, the
codebook tables (.npy), the scheduler config and this manifest. Export writes it; the runtime refuses any
folder whose manifest has an unknown or missing key, whose files do not match their recorded size and
sha256, or whose files are git-lfs pointers. Torch-free: both sides import it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import FORMAT_VERSION, ConfigError, ModelConfig, from_jsonable

MANIFEST_NAME = "manifest.json"
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
PRECISIONS = ("fp32", "fp16", "int8", "int4")
# The `llm` graph comes in two forms with one contract (export/llm.py LLMStep): "fused" (onnxruntime contrib
# kernels, the export default) and "portable" (standard ops, for TensorRT).
LLM_GRAPHS = ("fused", "portable")
DEFAULT_LLM_GRAPH = "fused"
# The `llm` graph's past K/V axis when past and present share one preallocated buffer (the fused graph).
KV_CAPACITY_DIM = "kv_capacity"
# The fused `llm` graph's attention_mask axis: the mask may be exactly the step's slots or span the whole KV
# capacity (a decode step with the same shapes every step, which a CUDA graph needs); the graph reads each
# row's newest slot from the mask's content (export/fused_ops.py). Engines whose mask axis has another name
# ("total") take only the first form. Both are left-padded engines (a padding bias in the graph).
MASK_SLOTS_DIM = "mask_slots"
# The same for a fused graph whose rows are right-padded in the cache (each row's tokens from slot 0, no bias:
# the layout onnxruntime's CUDA attention kernel takes on its fast paths), the export's form now.
ROW_SLOTS_DIM = "row_slots"


class EngineError(RuntimeError):
    """An engine folder cannot be used as it is; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the engine folder
    sha256: str
    bytes: int


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # int = fixed, str = named dynamic dimension


@dataclass(frozen=True)
class Component:
    kind: str  # "onnx" | "tensorrt"
    files: tuple[FileEntry, ...]  # files[0] is the graph / plan; the rest are its sidecars
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dynamic_ranges: dict[str, Any]  # dim name -> [min, max]
    precision: str = "fp32"
    opset: int = 18
    ops: tuple[str, ...] = ()
    portable: bool = True  # default ONNX domain only (TensorRT-parsable); False: com.microsoft ops (quantized)

    @property
    def path(self) -> str:
        return self.files[0].path


@dataclass(frozen=True)
class Producer:
    illume_edge: str
    torch: str
    transformers: str
    diffusers: str
    onnx: str
    onnxruntime: str
    opset: int
    created: str


@dataclass(frozen=True)
class PlanEntry:
    """A TensorRT plan built from one component's ONNX for one GPU arch and TensorRT version."""
    component: str
    file: FileEntry  # the .plan
    sidecar: FileEntry  # its .json: what the plan was built from and for, checked before deserializing
    onnx_sha256: str
    precision: str
    sm: str  # e.g. "87"
    tensorrt: str  # TensorRT version that built it


@dataclass(frozen=True)
class Manifest:
    format_version: int
    name: str
    config: dict[str, Any]
    producer: Producer
    precision: str
    components: dict[str, Any]  # name -> Component (parsed in __post_init__ of the loader)
    assets: dict[str, Any]  # name -> FileEntry: tokenizer, codebook_level{i}, scheduler, generation_config
    source: dict[str, Any] = field(default_factory=dict)  # where the weights came from (checkpoint paths, preset)
    plans: dict[str, Any] = field(default_factory=dict)  # plan name -> PlanEntry (illume-edge build-engines)
    # onnxruntime provider options for this engine's sessions, provider -> {option: value}; written by whoever
    # deploys the folder (not by export), read and checked by the runtime (runtime/provider_options.py)
    provider_options: dict[str, Any] = field(default_factory=dict)

    def model_config(self) -> ModelConfig:
        try:
            return ModelConfig.from_dict(self.config)
        except ConfigError as e:
            raise EngineError(f"{MANIFEST_NAME}: invalid model config: {e}; re-export the engine") from None

    def component(self, name: str) -> Component:
        try:
            return self.components[name]
        except KeyError:
            raise EngineError(f"{MANIFEST_NAME}: no component {name!r} (has {sorted(self.components)}); "
                              f"re-export with a checkpoint that provides it") from None

    def asset(self, name: str) -> FileEntry:
        try:
            return self.assets[name]
        except KeyError:
            raise EngineError(f"{MANIFEST_NAME}: no asset {name!r} (has {sorted(self.assets)})") from None

    def all_files(self) -> list[FileEntry]:
        out = [f for c in self.components.values() for f in c.files]
        return out + list(self.assets.values()) + [f for p in self.plans.values() for f in (p.file, p.sidecar)]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def parse_manifest(data: dict[str, Any], where: str = MANIFEST_NAME) -> Manifest:
    try:
        if not isinstance(data, dict):
            raise ConfigError(f"expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise EngineError(f"{where}: format_version {version!r} is not supported (this illume-edge reads "
                              f"{FORMAT_VERSION}); re-export the engine with this version")
        m = from_jsonable(Manifest, data, "manifest")
        comps = {k: from_jsonable(Component, v, f"manifest.components.{k}") for k, v in m.components.items()}
        assets = {k: from_jsonable(FileEntry, v, f"manifest.assets.{k}") for k, v in m.assets.items()}
        plans = {k: from_jsonable(PlanEntry, v, f"manifest.plans.{k}") for k, v in m.plans.items()}
    except ConfigError as e:
        raise EngineError(f"{where}: {e}; re-export the engine") from None
    for name, c in comps.items():
        if c.kind not in ("onnx", "tensorrt"):
            raise EngineError(f"{where}: component {name}: unknown kind {c.kind!r}")
        if c.precision not in PRECISIONS:
            raise EngineError(f"{where}: component {name}: precision {c.precision!r} not in {PRECISIONS}")
        if not c.files:
            raise EngineError(f"{where}: component {name} lists no files")
    if m.precision not in PRECISIONS:
        raise EngineError(f"{where}: precision {m.precision!r} not in {PRECISIONS}")
    for name, p in plans.items():
        if p.component not in comps:
            raise EngineError(f"{where}: plan {name} was built from component {p.component!r}, which the manifest "
                              f"does not list")
    return dataclasses.replace(m, components=comps, assets=assets, plans=plans)


def read_manifest(engine_dir: str | os.PathLike) -> Manifest:
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST_NAME
    if not engine_dir.is_dir():
        raise EngineError(f"engine folder {engine_dir} does not exist; build it with "
                          f"`illume-edge export --checkpoint DIR --out {engine_dir}`")
    if not path.is_file():
        raise EngineError(f"{path}: missing; {engine_dir} is not an engine folder (re-export it)")
    raw = path.read_bytes()
    if raw.startswith(LFS_POINTER_PREFIX):
        raise EngineError(f"{path}: is a git-lfs pointer, not the file; run `git lfs pull`")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise EngineError(f"{path}: not valid JSON ({e}); re-export the engine") from None
    return parse_manifest(data, str(path))


def write_manifest(engine_dir: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(engine_dir) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(engine_dir: str | os.PathLike, path: str | os.PathLike) -> FileEntry:
    """The manifest entry of a file inside `engine_dir`; `path` may be relative to the engine folder, relative
    to the working directory, or absolute (the engine folder itself may be given relative or absolute)."""
    root = Path(engine_dir).resolve()
    path = Path(path)
    for candidate in ([path] if path.is_absolute() else [Path.cwd() / path, root / path]):
        full = candidate.resolve()
        if root in full.parents and full.is_file():
            return FileEntry(path=full.relative_to(root).as_posix(), sha256=sha256_file(full),
                             bytes=full.stat().st_size)
    raise EngineError(f"{path}: not a file inside the engine folder {engine_dir}")


def is_lfs_pointer(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX


def verify_file(engine_dir: str | os.PathLike, entry: FileEntry, check_hash: bool = True) -> Path:
    """Check one listed file: present, not an LFS pointer, recorded size, recorded sha256."""
    engine_dir = Path(engine_dir)
    full = (engine_dir / entry.path).resolve()
    if engine_dir.resolve() not in full.parents:
        raise EngineError(f"{MANIFEST_NAME}: file {entry.path!r} lies outside the engine folder")
    if not full.is_file():
        raise EngineError(f"{full}: missing (listed in {MANIFEST_NAME}); re-export the engine")
    size = full.stat().st_size
    if size != entry.bytes:
        hint = " and is a git-lfs pointer: run `git lfs pull`" if is_lfs_pointer(full) else \
            "; the file is truncated or was replaced: re-export the engine"
        raise EngineError(f"{full}: {size} bytes, manifest says {entry.bytes}{hint}")
    if check_hash:
        digest = sha256_file(full)
        if digest != entry.sha256:
            raise EngineError(f"{full}: sha256 {digest[:16]}... does not match the manifest's "
                              f"{entry.sha256[:16]}...; the file was modified: re-export the engine")
    return full


def verify_engine(engine_dir: str | os.PathLike, manifest: Manifest, check_hash: bool = True) -> None:
    """Verify every listed file and refuse unlisted graphs/plans lying in the folder."""
    for entry in manifest.all_files():
        verify_file(engine_dir, entry, check_hash)
    listed = {Path(e.path).as_posix() for e in manifest.all_files()}
    for p in Path(engine_dir).rglob("*"):
        rel = p.relative_to(engine_dir).as_posix()
        if p.suffix in (".onnx", ".plan", ".engine") and rel not in listed:
            raise EngineError(f"{p}: graph/plan not listed in {MANIFEST_NAME}; refusing to use an engine folder "
                              f"with unlisted graphs (delete it or re-export)")
