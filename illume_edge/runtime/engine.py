"""Open an engine folder: strict manifest, verified files, compatible graphs, lazily created sessions."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..manifest import MANIFEST_NAME, EngineError, Manifest, read_manifest, verify_engine
from .provider_options import check_provider_options, from_environment, merge
from .session import Session, SessionOptions

# Highest ONNX opset / IR version each onnxruntime minor release executes (from its release notes).
_ORT_MAX_OPSET = ((1, 14, 18), (1, 16, 19), (1, 17, 20), (1, 18, 21), (1, 20, 22), (1, 22, 23))
_ORT_MAX_IR = ((1, 14, 8), (1, 15, 9), (1, 16, 9), (1, 17, 10), (1, 22, 11))


def require_onnxruntime() -> None:
    """onnxruntime comes from the `cpu` or the `gpu` extra (pyproject.toml): name both when neither is there."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise EngineError("onnxruntime is not installed: pip install 'illume-edge[cpu]' (onnxruntime), or "
                          "'illume-edge[gpu]' for CUDA / TensorRT (onnxruntime-gpu; never both)") from None


def _ort_version() -> tuple[int, int]:
    import onnxruntime as ort

    major, minor = ort.__version__.split(".")[:2]
    return int(major), int(minor)


def _max_for(table, version: tuple[int, int]) -> int:
    best = 0
    for major, minor, value in table:
        if version >= (major, minor):
            best = value
    return best


def check_graph_compat(path: Path, name: str) -> None:
    """IR version and opset of the graph header against the installed onnxruntime."""
    import onnx
    import onnxruntime as ort

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf decode errors
        raise EngineError(f"{name} ({path}): not a readable ONNX file ({str(e)[:200]}); re-export the engine") from None
    version = _ort_version()
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    max_opset, max_ir = _max_for(_ORT_MAX_OPSET, version), _max_for(_ORT_MAX_IR, version)
    if opset > max_opset:
        raise EngineError(f"{name}: opset {opset} is newer than onnxruntime {ort.__version__} runs (max {max_opset}); "
                          f"upgrade onnxruntime or re-export with an older opset")
    if model.ir_version > max_ir:
        raise EngineError(f"{name}: ONNX IR version {model.ir_version} is newer than onnxruntime {ort.__version__} "
                          f"reads (max {max_ir}); upgrade onnxruntime")


class Engine:
    """An opened engine folder. Sessions are created on first use, so loading is fast."""

    def __init__(self, engine_dir: str | Path, manifest: Manifest, options: SessionOptions):
        self.dir = Path(engine_dir)
        self.manifest = manifest
        # provider options: the manifest's, then the environment's, then the caller's (provider_options.py)
        where = f"{self.dir / MANIFEST_NAME}: provider_options"
        merged = merge(check_provider_options(manifest.provider_options, where), from_environment(),
                       check_provider_options(options.provider_options, "SessionOptions.provider_options"))
        self.options = dataclasses.replace(options, provider_options=merged)
        self.config: ModelConfig = manifest.model_config()
        self._sessions: dict[str, Session] = {}
        self._codebooks: dict[int, np.ndarray] = {}

    @classmethod
    def load(cls, engine_dir: str | Path, options: SessionOptions | None = None, check_hash: bool = True) -> "Engine":
        require_onnxruntime()
        manifest = read_manifest(engine_dir)
        verify_engine(engine_dir, manifest, check_hash=check_hash)
        engine = cls(engine_dir, manifest, options or SessionOptions())
        for name, comp in manifest.components.items():
            if comp.kind == "onnx":
                check_graph_compat(Path(engine_dir) / comp.path, name)
        return engine

    def has(self, component: str) -> bool:
        return component in self.manifest.components

    def session(self, component: str) -> Session:
        if component not in self._sessions:
            comp = self.manifest.component(component)
            if comp.kind != "onnx":
                raise EngineError(f"{component}: kind {comp.kind!r} needs the TensorRT backend (illume-edge[gpu])")
            self._sessions[component] = Session(component, str(self.dir / comp.path), comp, self.options)
        return self._sessions[component]

    def asset_path(self, name: str) -> Path:
        return self.dir / self.manifest.asset(name).path

    def codebook(self, level: int) -> np.ndarray:
        """Effective code table of a level, float32 [codebook_size, code_dim] (never unpickled)."""
        table = self._codebooks.get(level)
        if table is None:
            path = self.asset_path(f"codebook_level{level}")
            try:
                table = np.load(path, allow_pickle=False)
            except ValueError as e:
                raise EngineError(f"{path}: not a plain .npy table ({e}); re-export the engine") from None
            lv = self.config.levels[level]
            if table.shape != (lv.codebook_size, lv.code_dim) or table.dtype != np.float32:
                raise EngineError(f"{path}: table {table.shape} {table.dtype}, expected "
                                  f"({lv.codebook_size}, {lv.code_dim}) float32; re-export the engine")
            self._codebooks[level] = table
        return table

    def json_asset(self, name: str) -> dict:
        path = self.asset_path(name)
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise EngineError(f"{path}: invalid JSON ({e})") from None
