"""Torch custom ops that export as onnxruntime's fused contrib ops (the `fused` LLM graph).

The portable `llm` graph spells RMSNorm, RoPE and attention in standard ONNX ops: about 60 nodes per layer,
whose elementwise chains and per-node dispatch cost as much as the int4 GEMVs themselves on a 2-core CPU
(docs/performance.md). The fused graph expresses the same step with onnxruntime's com.microsoft kernels
(the ones its GenAI model builder emits), about 11 nodes per layer:

  rms_norm       -> SimplifiedLayerNormalization             (default domain, registered by onnxruntime)
  skip_rms_norm  -> com.microsoft.SkipSimplifiedLayerNormalization   residual add + RMSNorm in one kernel
  gqa            -> com.microsoft.GroupQueryAttention          RoPE + attention over a KV cache it updates in
                                                               place, from the packed q|k|v projection

Each op has an eager implementation with the portable graph's arithmetic, so `LLMStep(..., graph="fused")`
runs in torch and its parity with the transformers reference is tested like the portable step.

GroupQueryAttention's cache contract ("shared" KV layout): past_key / present_key are the *same* buffer of
`capacity` positions, [B, kv_heads, capacity, head_dim]; the step writes its S new keys at slots
[T - S, T) and attends over slots [0, T), where T - 1 is the newest real slot: the last 1 in attention_mask
(rows end together, left padding). onnxruntime takes the shared path when the two bound buffers have the
same address (the runtime binds them so); `gqa` below computes present = past with those slots replaced.

The attention mask [B, W] may be exactly the step's slots (W = T: prefill, runs of forced tokens) or span the
whole cache (W = capacity, zeros past T: a decode step). With W = capacity every decode step of a request has
the same input shapes, so it can be bound once and captured as a CUDA graph (onnxruntime's
`enable_cuda_graph`); the kernel gets total_sequence_length = W and attends over each row's seqlens_k + 1
slots only (measured on the CPU kernel: identical outputs, same time). onnxruntime's CPU kernel refuses
W > S for a batch > 1 prefill ("past context"), so prefills use W = T.

RoPE positions are the cache slots. GroupQueryAttention derives them from its own bookkeeping (slot T - S + s
for the step's token s; with position_ids it would use them on later steps but not on the first prompt,
measured with onnxruntime 1.32), so the graph rotates by slot index and ignores its position_ids input. That
is exact for the runtime's batches: a left-padded row's slots are its positions plus a constant (its padding),
and RoPE attention depends only on differences of positions, q(m)·k(n) = f(m - n). The cached keys of a padded
row are therefore rotated further, by its padding, than the portable graph's; the attention outputs are the same
(tested against transformers). Folding RoPE into the attention kernel saves a Split and two RoPE nodes per
layer (3% of the int4 decode step on 2 cores, docs/performance.md).
Limits of onnxruntime's CPU kernel, checked at export or in the runtime: head_dim a multiple of 16; a call
with batch > 1 and S > 1 on a non-empty cache is refused (the runtime feeds such runs a token at a time).

Not TensorRT-parsable: engines with this graph are `portable: false` in their manifest.
"""
from __future__ import annotations

import onnx.reference  # noqa: F401  imported before the schemas below are registered (see _register_schemas)
import onnxscript
import torch
from onnx import defs

MSFT = "com.microsoft"


def _register_schemas() -> None:
    """Make the contrib ops known to onnx (the exporter builds nodes through their schemas).

    onnxruntime registers them in its own runtime, not in the `onnx` package the exporter consults. Runs
    after `onnx.reference` is imported (onnxscript imports it): that module indexes every schema by name
    once and refuses two domains defining the same name (it broke on com.microsoft.RotaryEmbedding, which
    an earlier version of this graph used, against ONNX opset 23's RotaryEmbedding).
    """
    FP = defs.OpSchema.FormalParameter
    single, optional = defs.OpSchema.FormalParameterOption.Single, defs.OpSchema.FormalParameterOption.Optional
    floats = ("T", ["tensor(float)", "tensor(float16)"], "float tensors")
    stats = ("U", ["tensor(float)"], "float32 statistics (mean, inverse std)")
    ints = ("M", ["tensor(int64)", "tensor(int32)"], "integer tensors")
    INT, FLOAT = defs.OpSchema.AttrType.INT, defs.OpSchema.AttrType.FLOAT

    def param(spec: str) -> FP:
        name, typ = spec.rstrip("?").split(":")
        return FP(name, typ, param_option=optional if spec.endswith("?") else single)

    table = {
        ("SimplifiedLayerNormalization", ""): (["X:T", "scale:T"], ["Y:T"], [("epsilon", FLOAT)]),
        ("SkipSimplifiedLayerNormalization", MSFT): (
            ["input:T", "skip:T", "gamma:T"], ["output:T", "mean:U?", "inv_std_var:U?", "input_skip_bias_sum:T?"],
            [("epsilon", FLOAT)]),
        ("GroupQueryAttention", MSFT): (
            ["query:T", "key:T?", "value:T?", "past_key:T?", "past_value:T?", "seqlens_k:M",
             "total_sequence_length:M", "cos_cache:T?", "sin_cache:T?", "position_ids:M?", "attention_bias:T?"],
            ["output:T", "present_key:T", "present_value:T"],
            [("num_heads", INT), ("kv_num_heads", INT), ("scale", FLOAT), ("do_rotary", INT),
             ("rotary_interleaved", INT)]),
    }
    for (name, domain), (inputs, outputs, attrs) in table.items():
        if defs.has(name, domain):
            continue
        constraints = [floats, ints] + ([stats] if any(":U" in s for s in outputs) else [])
        defs.register_schema(defs.OpSchema(
            name, domain, 1, inputs=[param(s) for s in inputs], outputs=[param(s) for s in outputs],
            type_constraints=constraints, attributes=[defs.OpSchema.Attribute(a, t, "") for a, t in attrs]))


_register_schemas()
_msft = onnxscript.values.Opset(MSFT, 1)
_ort = onnxscript.values.Opset("", 1)  # onnxruntime's default-domain additions (SimplifiedLayerNormalization)


# ----------------------------------------------------------------------------------------------------
# Eager implementations (the arithmetic of the portable graph)
# ----------------------------------------------------------------------------------------------------
def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen2/LLaMA RMSNorm: fp32 statistics, result in the input dtype times the weight."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


@torch.library.custom_op("illume_edge::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("illume_edge::skip_rms_norm", mutates_args=())
def skip_rms_norm(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + skip), x + skip): a residual add and the next norm."""
    total = x + skip
    return _rms(total, weight, eps), total.clone()


@skip_rms_norm.register_fake
def _(x, skip, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


def _rope(x: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
          num_heads: int) -> torch.Tensor:
    """Half-rotation RoPE on x [B, S, n*d] at positions [B, S]; caches [max_positions, d/2]. The portable
    step's arithmetic (LLMStep.attention): x * cos + rotate_half(x) * sin."""
    from .llm import _rotate_half

    b, s, width = x.shape
    heads = x.view(b, s, num_heads, width // num_heads)  # [B, S, n, d]
    cos = cos_cache[positions].unsqueeze(2)  # [B, S, 1, d/2]
    sin = sin_cache[positions].unsqueeze(2)
    out = heads * torch.cat([cos, cos], dim=-1) + _rotate_half(heads) * torch.cat([sin, sin], dim=-1)
    return out.reshape(b, s, width)


@torch.library.custom_op("illume_edge::gqa", mutates_args=())
def gqa(qkv: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor, seqlens_k: torch.Tensor,
        total: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor, bias: torch.Tensor,
        num_heads: int, kv_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE at the cache slots, then grouped-query attention over a shared-buffer cache (module docstring).

    qkv [B, S, (h + 2*kvh)*d] (the packed projection, pre-RoPE), past_key / past_value [B, kvh, C, d] (slots
    [0, T - S) valid), seqlens_k int32 [B] = T - 1 and total int32 [] = W (the kernel's bookkeeping; see
    `gqa_lengths`), cos_cache / sin_cache [max_positions, d/2], bias [B, 1, S, W] additive (causal +
    padding; W = T, or the capacity with slots past T masked). Returns (out [B, S, h*d], present_key,
    present_value [B, kvh, C, d]).
    """
    b, s, _ = qkv.shape
    w = bias.shape[-1]  # W: the slots attended over (the eager body reads it from the bias)
    d = past_key.shape[-1]
    group = num_heads // kv_heads
    q, k, v = qkv.split([num_heads * d, kv_heads * d, kv_heads * d], dim=-1)
    ends = seqlens_k.long() + 1  # [B]: T per row
    slots = ends[:, None] - s + torch.arange(s, device=qkv.device)  # [B, S]: the new tokens' slots (RoPE positions)
    q, k = _rope(q, slots, cos_cache, sin_cache, num_heads), _rope(k, slots, cos_cache, sin_cache, kv_heads)
    present_key, present_value = past_key.clone(), past_value.clone()
    new_k, new_v = (x.view(b, s, kv_heads, d).transpose(1, 2) for x in (k, v))  # [B, kvh, S, d]
    for row in range(b):
        present_key[row, :, slots[row]] = new_k[row]
        present_value[row, :, slots[row]] = new_v[row]
    key, value = present_key[:, :, :w], present_value[:, :, :w]  # [B, kvh, W, d]
    qg = q.view(b, s, num_heads, d).transpose(1, 2).reshape(b, kv_heads, group * s, d)  # [B, kvh, g*S, d]
    scores = torch.matmul(qg, key.transpose(2, 3)) * scale  # [B, kvh, g*S, W]
    scores = scores.view(b, num_heads, s, w) + bias  # [B, h, S, W]
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    ctx = torch.matmul(probs.view(b, kv_heads, group * s, w), value)  # [B, kvh, g*S, d]
    out = ctx.view(b, num_heads, s, d).transpose(1, 2).reshape(b, s, num_heads * d)  # [B, S, h*d]
    return out, present_key, present_value


@gqa.register_fake
def _(qkv, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, bias, num_heads, kv_heads, scale):
    b, s, _ = qkv.shape
    out = qkv.new_empty(b, s, num_heads * past_key.shape[-1])
    return out, torch.empty_like(past_key), torch.empty_like(past_value)


# ----------------------------------------------------------------------------------------------------
# ONNX translations (onnxscript, traced by torch.onnx's dynamo exporter)
# ----------------------------------------------------------------------------------------------------
def _rms_norm_onnx(x, weight, eps: float):
    return _ort.SimplifiedLayerNormalization(x, weight, epsilon=eps)


def _skip_rms_norm_onnx(x, skip, weight, eps: float):
    out, _, _, total = _msft.SkipSimplifiedLayerNormalization(x, skip, weight, epsilon=eps)
    return out, total


def _gqa_onnx(qkv, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, bias, num_heads: int,
              kv_heads: int, scale: float):
    out, present_key, present_value = _msft.GroupQueryAttention(
        qkv, None, None, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, None, bias,
        num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, do_rotary=1, rotary_interleaved=0)
    return out, present_key, present_value


def gqa_lengths(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupQueryAttention's seqlens_k (int32 [B]: T - 1 for every row) and total_sequence_length (int32 []: W)
    for an attention mask [B, W] (W = T, or the cache capacity with zeros past T; module docstring). T - 1 is
    the batch's newest real slot: rows end together (left padding, masked by the bias), and a row that is all
    padding follows the others; a mask with no 1 at all means T = W. Computed once per step, shared by every
    layer."""
    # W from the mask's shape (Shape -> Cast in the graph): onnxruntime's CUDA kernel reads total_sequence_length
    # on the host, and a shape needs no device-to-host copy (none is allowed inside a captured CUDA graph)
    width = torch.full((), attention_mask.shape[1], dtype=torch.int64, device=attention_mask.device)
    slots = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)  # [W]: slot + 1
    end = ((attention_mask != 0) * slots).amax(dim=(0, 1))  # T: one past the newest real slot of any row
    end = torch.where(end > 0, end, width)
    seqlens = torch.zeros_like(attention_mask[:, 0]) + (end - 1)  # [B]
    return seqlens.to(torch.int32), width.to(torch.int32)


TRANSLATIONS = {
    torch.ops.illume_edge.rms_norm.default: _rms_norm_onnx,
    torch.ops.illume_edge.skip_rms_norm.default: _skip_rms_norm_onnx,
    torch.ops.illume_edge.gqa.default: _gqa_onnx,
}
