"""Shared ONNX export mechanics: dynamo export at a fixed opset, external data, portable-op check.

Every component exporter calls `export_onnx` with its own wrapper module; the returned `GraphInfo` goes
into the engine manifest as that component's I/O contract.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

OPSET = 18
# Graphs at or above this size keep their weights in a `<file>.data` sidecar (protobuf caps at 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 20

_DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT8: "int8",
}


class ExportError(RuntimeError):
    pass


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[int | str]  # ints are fixed, strings name a dynamic dimension

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class GraphInfo:
    path: Path
    files: list[Path]  # the .onnx file and its external-data sidecar, if any
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    opset: int
    ops: list[str] = field(default_factory=list)  # sorted distinct op types
    dynamic_ranges: dict[str, list[int | None]] = field(default_factory=dict)  # name -> [min, max|None]
    portable: bool = True  # default ONNX domain only; False when exported with contrib-op translations


def _bound(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError):  # sympy oo: unbounded
        return None


def dim_ranges(dynamic_shapes: Any) -> dict[str, list[int | None]]:
    """{name: [min, max]} of every torch.export.Dim in a (nested) dynamic_shapes structure; None = unbounded."""
    out: dict[str, list[int | None]] = {}

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif x is not None and hasattr(x, "min") and hasattr(x, "max") and hasattr(x, "__name__"):
            out[x.__name__] = [_bound(x.min) or 0, _bound(x.max)]

    walk(dynamic_shapes)
    return out


def _tensor_infos(values) -> list[TensorInfo]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims: list[int | str] = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append(TensorInfo(v.name, _DTYPES.get(t.elem_type, str(t.elem_type)), dims))
    return out


def graph_ops(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(domain, op_type) of every node, subgraphs and local functions included."""
    seen: set[tuple[str, str]] = set()

    def walk(graph):
        for node in graph.node:
            seen.add((node.domain or "ai.onnx", node.op_type))
            for attr in node.attribute:
                if attr.g is not None and attr.HasField("g"):
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    for fn in model.functions:
        for node in fn.node:
            seen.add((node.domain or "ai.onnx", node.op_type))
    return sorted(seen)


# Optional outputs of contrib ops that the fused graphs never read, by (domain, op_type) -> output indices.
# onnxscript names every output of a node it builds, and onnxruntime computes and allocates each named output
# whether or not anything reads it; an empty name tells the kernel to skip it.
# SkipSimplifiedLayerNormalization: mean, inv_std_var, and the residual sum (read by the next layer's norm,
# not after the final norm).
UNREAD_OPTIONAL_OUTPUTS = {("com.microsoft", "SkipSimplifiedLayerNormalization"): (1, 2, 3)}


def drop_unread_optional_outputs(model: onnx.ModelProto) -> int:
    """Blank the names of `UNREAD_OPTIONAL_OUTPUTS` that no node and no graph output reads (top-level graph;
    the fused graphs have no subgraphs). Returns how many outputs were dropped."""
    g = model.graph
    read = {name for node in g.node for name in node.input} | {o.name for o in g.output}
    dropped: set[str] = set()
    for node in g.node:
        for i in UNREAD_OPTIONAL_OUTPUTS.get((node.domain, node.op_type), ()):
            if i < len(node.output) and node.output[i] and node.output[i] not in read:
                dropped.add(node.output[i])
                node.output[i] = ""
    if dropped:  # their shape annotations would name values that no longer exist
        kept = [v for v in g.value_info if v.name not in dropped]
        del g.value_info[:]
        g.value_info.extend(kept)
    return len(dropped)


def check_portable(model: onnx.ModelProto, where: str) -> None:
    """Portable graphs use the default ONNX domain only: no com.microsoft contrib ops, no local functions."""
    bad = [f"{d}::{op}" for d, op in graph_ops(model) if d not in ("ai.onnx", "")]
    if model.functions:
        bad += [f"function {f.domain}::{f.name}" for f in model.functions]
    if bad:
        raise ExportError(f"{where}: non-standard ops in a portable graph: {bad}; inline them or rewrite the "
                          f"wrapper with standard ops")


class _HalfCompute(torch.nn.Module):
    """fp16 weights and compute behind an fp32 interface: float inputs are cast to half on entry, float
    outputs back to float32 on exit, so every engine keeps one I/O contract whatever its precision. Except
    the outputs at `half_outputs` (positions in the flat output tuple), which stay fp16, and inputs whose
    sample is already fp16 (the cast is then a no-op): the LLM's KV cache, which a decode step rewrites in
    place and must not be copied through a cast every step (export_llm)."""

    def __init__(self, module: torch.nn.Module, half_outputs: frozenset[int] = frozenset()):
        super().__init__()
        self.module = module
        self.half_outputs = half_outputs

    def forward(self, *args):
        from torch.utils._pytree import tree_map

        def cast(dtype):
            return lambda t: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t

        out = self.module(*tree_map(cast(torch.float16), args))  # nested inputs too (past K/V tuples)
        if not self.half_outputs:
            return tree_map(cast(torch.float32), out)
        return tuple(o if i in self.half_outputs else cast(torch.float32)(o) for i, o in enumerate(out))


def _positional_shapes(module: torch.nn.Module, dynamic_shapes: Any) -> Any:
    """dynamic_shapes for `_HalfCompute.forward(*args)`: {"args": per-position specs} (a dict keyed by the
    wrapped forward's parameter names is reordered by its signature)."""
    import inspect

    if dynamic_shapes is None:
        return None
    params = inspect.signature(module.forward).parameters
    if not isinstance(dynamic_shapes, dict):  # positional: one spec per forward parameter
        dynamic_shapes = dict(zip(params, dynamic_shapes))
    specs: list[Any] = []
    for name, param in params.items():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:  # forward(*maps): its spec is a sequence
            specs.extend(dynamic_shapes.get(name) or ())
        else:
            specs.append(dynamic_shapes.get(name))
    return {"args": tuple(specs)}


def _has_half_weights(module: torch.nn.Module) -> bool:
    return any(p.dtype == torch.float16 for p in module.parameters())


def export_onnx(module: torch.nn.Module, args: tuple, path: str | os.PathLike, *, input_names: list[str],
                output_names: list[str], dynamic_shapes: Any = None, kwargs: dict | None = None,
                external_data: bool | None = None, translations: dict | None = None,
                half_outputs: tuple[str, ...] = ()) -> GraphInfo:
    """Export `module(*args)` to `path` with torch.onnx.export(dynamo=True), opset 18, then verify it.

    `dynamic_shapes` follows torch.export (a tuple/dict mirroring args, with torch.export.Dim values).
    Weights go to `<path>.data` when the model is large (or when `external_data` is True). A module with
    fp16 weights is exported with fp16 compute behind fp32 inputs and outputs (see `_HalfCompute`), except
    fp16 sample inputs and the outputs named in `half_outputs`, which stay fp16.
    `translations` maps torch custom ops to onnxscript functions that emit onnxruntime contrib ops (the
    fused LLM graph); without it the graph must be portable (default ONNX domain only). Every export also
    uses `portable_ops.PORTABLE_TRANSLATIONS` (faster default-domain forms of a few aten ops).
    """
    from .portable_ops import PORTABLE_TRANSLATIONS

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    if _has_half_weights(module):  # an fp16 export: same fp32 I/O contract, fp16 inside
        if kwargs:
            raise ExportError(f"{path.name}: fp16 export takes positional inputs only")
        dynamic_shapes = _positional_shapes(module, dynamic_shapes)
        unknown = set(half_outputs) - set(output_names)
        if unknown:
            raise ExportError(f"{path.name}: half_outputs {sorted(unknown)} are not among the outputs")
        module = _HalfCompute(module, frozenset(output_names.index(n) for n in half_outputs))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, kwargs=kwargs, dynamo=True, opset_version=OPSET,
                                    input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, external_data=False, optimize=True,
                                    verbose=False, report=False,
                                    custom_translation_table={**PORTABLE_TRANSLATIONS, **(translations or {})})
    if program is None:
        raise ExportError(f"{path.name}: torch.onnx.export returned no program")
    graph = program.model.graph
    # The exporter may prefix or rename graph outputs; enforce the contract's names.
    for value, name in zip(graph.outputs, output_names):
        value.name = name
    size = sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
    use_external = external_data if external_data is not None else size >= EXTERNAL_DATA_THRESHOLD
    data_path = path.with_name(path.name + ".data")
    for f in (path, data_path):
        if f.exists():
            f.unlink()
    # program.save streams each weight from torch to the sidecar: no second in-memory copy of the model.
    program.save(str(path), external_data=use_external)
    del program
    model = onnx.load(str(path), load_external_data=False)  # graph only
    if not translations:
        check_portable(model, path.name)
    elif drop_unread_optional_outputs(model):
        onnx.save(model, str(path))  # the graph file only: external-data references are kept as they are
    onnx.checker.check_model(str(path))  # by path: handles external data of any size
    files = [path] + ([data_path] if data_path.exists() else [])
    return GraphInfo(path=path, files=files, inputs=_tensor_infos(model.graph.input),
                     outputs=_tensor_infos(model.graph.output), opset=OPSET,
                     ops=sorted({op for _, op in graph_ops(model)}), dynamic_ranges=dim_ranges(dynamic_shapes),
                     portable=not translations)
