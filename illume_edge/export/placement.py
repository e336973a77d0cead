"""Host values inside device ops: what keeps an exported graph from being captured as a CUDA graph.

onnxruntime's CUDA provider produces a shape on the host (Shape writes host memory), takes some inputs there
(Range's bounds, Reshape's and Expand's shapes, axes, GroupQueryAttention's total_sequence_length: HOST_INPUTS)
and runs the small integer nodes between the two on the CPU provider. A host value reaching any other input
of a node that also reads device data makes it insert a Memcpy node, and a session with a Memcpy node refuses
CUDA graph capture (seen on an H100 with onnxruntime-gpu 1.31.1, docs/gpu.md). `host_values_in_device_ops`
finds those inputs statically, so that a CPU test keeps the fused graph capturable.
"""
from __future__ import annotations

import onnx

# (op type -> input indices) the CUDA provider reads from host memory; the ops the exported graphs use
HOST_INPUTS: dict[str, tuple[int, ...]] = {
    "Range": (0, 1, 2), "Expand": (1,), "Reshape": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "Tile": (1,),
    "ReduceMax": (1,), "ReduceMin": (1,), "ReduceSum": (1,), "ReduceMean": (1,), "ConstantOfShape": (0,),
    "Slice": (1, 2, 3, 4), "TopK": (1,), "GroupQueryAttention": (6,),
}
SHAPE_OPS = ("Shape", "Size")


def host_values_in_device_ops(model: onnx.ModelProto) -> list[str]:
    """'node (op) input i: value' for each host value (a shape, or computed from shapes and constants alone)
    that a node reading device data takes outside HOST_INPUTS. Empty: no Memcpy node for these reasons."""
    g = model.graph
    constants = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    host: set[str] = set()
    found = []
    for n in g.node:  # topological order (ONNX requires it)
        cpu_slots = HOST_INPUTS.get(n.op_type, ())
        data = [i for k, i in enumerate(n.input) if i and k not in cpu_slots]
        # on the host: a shape, or arithmetic on shapes and constants (Squeeze(Shape(x)), Cast, Add...); a node
        # whose only host inputs are its host slots (Range, Expand of a constant) writes device memory
        if n.op_type in SHAPE_OPS or (data and all(i in host or i in constants for i in data)
                                      and any(i in host for i in data)):
            host.update(n.output)
            continue
        for k, name in enumerate(n.input):
            if name in host and k not in cpu_slots:
                found.append(f"{n.name} ({n.op_type}) input {k}: {name}")
    return found
