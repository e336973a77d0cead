"""The MoVQ DC blocks' layout ops in onnxruntime, each form the exporter could emit (docs/performance.md).

    python -m benchmarks.layout_ops        # ~30 s on 2 cores

For a 32- and a 128-channel 336 x 448 map (the bench encoder's first level) and the decoder-side maps: the
downsampler's pixel_unshuffle as torch exports it (Reshape + 6-D Transpose) against SpaceToDepth + a 5-D
Transpose (export/portable_ops.py); its shortcut (unshuffle + mean of 4 channels) against AveragePool; the
upsampler's shortcut (channel repeat + DepthToSpace) against a nearest Resize. Median of 7 runs after one
warm-up, `intra_op_num_threads` = cores; each pair's largest output difference is printed (0 for the data
movements; float rounding for mean vs AveragePool, which sum in another order).
"""
from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from benchmarks.machine import cores


def _session(nodes, inits, shape):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    so = ort.SessionOptions()
    so.intra_op_num_threads = cores()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _time(sess, x, reps: int = 7) -> tuple[float, np.ndarray]:
    y = sess.run(None, {"x": x})[0]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times)), y


def _ints(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def pairs(c: int, h: int, w: int):
    """(what, torch's form, the exported form) sessions for a [1, c, h, w] map."""
    unshuffled = [1, c, h // 2, 2, w // 2, 2]
    down_torch = [helper.make_node("Reshape", ["x", "s1"], ["r"]),
                  helper.make_node("Transpose", ["r"], ["t"], perm=[0, 1, 3, 5, 2, 4]),
                  helper.make_node("Reshape", ["t", "s2"], ["y"])]
    down_ours = [helper.make_node("SpaceToDepth", ["x"], ["d"], blocksize=2),  # channels (bh, bw, c)
                 helper.make_node("Reshape", ["d", "s1"], ["r"]),  # [1, 4, c, h/2, w/2]
                 helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3, 4]),  # channels (c, bh, bw)
                 helper.make_node("Reshape", ["t", "s2"], ["y"])]
    flat = _ints("s2", [1, 4 * c, h // 2, w // 2])
    mean = down_torch[:2] + [helper.make_node("Reshape", ["t", "s3"], ["g"]),
                             helper.make_node("ReduceMean", ["g", "ax"], ["y"], keepdims=0)]
    pool = [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    repeat = [helper.make_node("Unsqueeze", ["x", "ax"], ["u"]), helper.make_node("Expand", ["u", "sh"], ["e"]),
              helper.make_node("Reshape", ["e", "s4"], ["r"]),
              helper.make_node("DepthToSpace", ["r"], ["y"], blocksize=2, mode="CRD")]
    resize = [helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="nearest")]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")
    shape = [1, c, h, w]
    return [
        ("pixel_unshuffle", _session(down_torch, [_ints("s1", unshuffled), flat], shape),
         _session(down_ours, [_ints("s1", [1, 4, c, h // 2, w // 2]), flat], shape)),
        ("down shortcut: unshuffle + mean / AveragePool",
         _session(mean, [_ints("s1", unshuffled), _ints("s3", [1, c, 4, h // 2, w // 2]), _ints("ax", [2])], shape),
         _session(pool, [], shape)),
        ("up shortcut: repeat + DepthToSpace / nearest Resize",
         _session(repeat, [_ints("ax", [2]), _ints("sh", [1, c, 4, h, w]), _ints("s4", [1, 4 * c, h, w])], shape),
         _session(resize, [scales], shape)),
    ]


def main() -> int:
    print("| op | map | torch's export (ms) | exported form (ms) | max abs diff |")
    print("|---|---|---|---|---|")
    for c, h, w in ((32, 336, 448), (128, 336, 448), (128, 84, 112)):
        x = np.random.default_rng(0).standard_normal((1, c, h, w)).astype(np.float32)
        for what, torch_form, ours in pairs(c, h, w):
            (ta, ya), (tb, yb) = _time(torch_form, x), _time(ours, x)
            print(f"| {what} | {c} x {h} x {w} | {ta:.1f} | {tb:.1f} | {float(np.abs(ya - yb).max()):.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
