"""The ONNX operators TensorRT 10's ONNX parser (onnx-tensorrt, release/10.x docs/operators.md) accepts.

Every exported graph is checked against this list (tests/test_tensorrt_ops.py) so that the same ONNX can
become a TensorRT plan on a Jetson or a datacenter GPU. The restrictions that matter to this project are
kept as notes; `check_graph_ops` reports unsupported ops by component name.
"""
from __future__ import annotations

from typing import Iterable

# op -> restriction note ("" = none that concerns us). From the onnx-tensorrt operator matrix (TensorRT 10.x):
# the 8.5 matrix plus the ops added since (LayerNormalization 8.6, GroupNormalization and bitwise ops 10.0,
# cubic Resize 8.6, Gelu at opset 20, IsInf 8.6).
SUPPORTED: dict[str, str] = {
    **{op: "" for op in (
        "Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization "
        "BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Cast Ceil Celu Clip Concat Constant ConstantOfShape Conv "
        "ConvTranspose Cos Cosh DepthToSpace Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor "
        "Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater "
        "GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish Identity If ImageScaler "
        "InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN "
        "LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg "
        "NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear "
        "DequantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal "
        "ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum "
        "ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter "
        "ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus "
        "Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu "
        "Unsqueeze Upsample Where Xor").split()},
    "Conv": "2-D or 3-D; weights must be initializers",
    "CumSum": "axis must be an initializer",
    "Resize": "modes nearest/linear/cubic; half_pixel, pytorch_half_pixel, asymmetric, align_corners",
    "Slice": "axes must be an initializer",
    "Squeeze": "axes must be an initializer",
    "TopK": "K must be an initializer",
    "Unsqueeze": "axes must be a constant",
}

# Explicitly unsupported ops that an exporter could plausibly emit.
UNSUPPORTED = frozenset(
    "Bernoulli BitShift BlackmanWindow Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear "
    "HammingWindow HannWindow Hardmax MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial "
    "NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul STFT "
    "SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength SequenceMap "
    "SoftmaxCrossEntropyLoss SplitToSequence StringNormalizer TfIdfVectorizer Unique".split())


def unsupported_ops(ops: Iterable[str]) -> list[str]:
    return sorted(op for op in set(ops) if op not in SUPPORTED)


def check_graph_ops(component: str, ops: Iterable[str]) -> None:
    bad = unsupported_ops(ops)
    if bad:
        raise ValueError(f"component {component}: ops {bad} are not supported by TensorRT's ONNX parser; "
                         f"rewrite the wrapper with supported ops (see illume_edge/tensorrt_ops.py)")
