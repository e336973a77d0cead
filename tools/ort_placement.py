"""Where onnxruntime's CUDA provider puts a graph's nodes, and the Memcpy nodes it inserts between host and
device. A graph with any Memcpy node cannot be captured as a CUDA graph ("This session cannot use the graph
capture feature ... all compute graph nodes have not been partitioned to the CUDAExecutionProvider").

    python tools/ort_placement.py ENGINE/llm.onnx     # needs onnxruntime-gpu and a GPU

Prints onnxruntime's own placement lines (its verbose log, filtered) and each Memcpy node of the optimized
graph with the node that feeds it and the nodes it feeds. Exit status 1 if there is a Memcpy node.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path


def optimized(path: str, out: str) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 0
    so.optimized_model_filepath = out
    ort.InferenceSession(path, so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def memcpy_report(out: str) -> list[str]:
    import onnx

    g = onnx.load(out, load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    lines = []
    for n in g.node:
        if n.op_type.startswith("Memcpy"):
            src = producer.get(n.input[0])
            fed = [f"{c.op_type} {c.name}" for c in consumers.get(n.output[0], [])]
            lines.append(f"{n.op_type} {n.input[0]!r} from {src.op_type + ' ' + src.name if src else 'graph input'}"
                         f" -> {', '.join(fed)}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--child":
        optimized(argv[1], argv[2])
        return 0
    if len(argv) != 1:
        print(__doc__)
        return 2
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "optimized.onnx")
        proc = subprocess.run([sys.executable, __file__, "--child", argv[0], out], capture_output=True, text=True)
        log = (proc.stdout + proc.stderr).splitlines()
        for i, line in enumerate(log):
            if "placed on" in line or "Memcpy" in line or "graph capture" in line:
                print(line[-300:])
                for follow in log[i + 1:i + 40]:  # the node names onnxruntime lists after a placement line
                    if "placed on" in follow or "[" in follow[:40]:
                        break
                    print("   ", follow.strip()[:200])
        if proc.returncode:
            print("\n".join(log[-20:]))
            return 2
        copies = memcpy_report(out)
    print(f"{len(copies)} Memcpy node(s)" + "".join(f"\n  {c}" for c in copies))
    return 1 if copies else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
