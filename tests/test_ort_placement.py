"""tools/ort_placement.py: the Memcpy nodes of onnxruntime's optimized graph, each with what feeds it and what
it feeds (the report that says why a graph cannot be captured as a CUDA graph), and the whole run on this
machine's onnxruntime (no CUDA provider: every node on the CPU, no Memcpy, exit 0)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "ort_placement.py"
_spec = importlib.util.spec_from_file_location("ort_placement", TOOL)
placement = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(placement)


def test_memcpy_nodes_are_reported_with_their_neighbours(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.INT64, ["B", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["B", "W"])
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("MemcpyFromHost", ["shape"], ["shape_dev"], name="copy"),
             helper.make_node("Add", ["x", "shape_dev"], ["y"], name="add")]
    path = tmp_path / "optimized.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y])), str(path))
    assert placement.memcpy_report(str(path)) == ["MemcpyFromHost 'shape' from Shape shape -> Add add"]
    nodes[1] = helper.make_node("Identity", ["shape"], ["shape_dev"], name="copy")
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y])), str(path))
    assert placement.memcpy_report(str(path)) == []


def test_a_run_on_the_cpu_finds_no_memcpy(tiny_engine):
    llm = tiny_engine("tiny-plus")[0] / "llm.onnx"
    proc = subprocess.run([sys.executable, str(TOOL), str(llm)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "0 Memcpy node(s)" in proc.stdout and "placed on [CPUExecutionProvider]" in proc.stdout
