"""ONNX translations in the default domain for aten ops whose stock export is slow: applied to every graph.

`pixel_unshuffle` exports from torch as Reshape [B, C, H/f, f, W/f, f] + a 6-D Transpose + Reshape. The
transpose's innermost axis is strided, and onnxruntime's CPU Transpose runs it at about 1 GB/s: 80-107 ms for
a 128 x 336 x 448 map on 2 cores, 20-26 ms at 32 channels (the MoVQ encoder's DC downsamplers). Here it is
SpaceToDepth, whose channel order is (bh, bw, c), then a 5-D Transpose that moves the f*f block axis behind
the channels, (c, bh, bw) as pixel_unshuffle orders them. That transpose moves whole (H/f) x (W/f) planes:
28-32 ms and 7.5 ms for the same maps (`python -m benchmarks.layout_ops`), bit-identical. Both ops are in
TensorRT's ONNX parser's list.
(`pixel_shuffle` already exports as DepthToSpace, mode CRD, which is its exact order.)
"""
from __future__ import annotations

import torch
from onnxscript import opset18 as op


def _pixel_unshuffle(x, downscale_factor: int):
    f = downscale_factor
    blocks = op.SpaceToDepth(x, blocksize=f)  # [B, f*f*C, h, w], channels ordered (bh, bw, c)
    shape = op.Shape(blocks)
    batch, hw = op.Slice(shape, [0], [1]), op.Slice(shape, [2], [4])
    split = op.Reshape(blocks, op.Concat(batch, op.Constant(value_ints=[f * f, -1]), hw, axis=0))  # [B, f*f, C, h, w]
    ordered = op.Transpose(split, perm=[0, 2, 1, 3, 4])  # [B, C, f*f, h, w]: channels ordered (c, bh, bw)
    return op.Reshape(ordered, op.Concat(batch, op.Constant(value_ints=[-1]), hw, axis=0))  # [B, C*f*f, h, w]


PORTABLE_TRANSLATIONS = {torch.ops.aten.pixel_unshuffle.default: _pixel_unshuffle}
