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
`capacity` positions, [B, kv_heads, capacity, head_dim]. Rows are **right-padded** in the cache: row b holds
its T_b tokens at slots [0, T_b), and T_b - 1 is the last 1 in its attention_mask row (`gqa_lengths`, the
kernel's seqlens_k). A step appends its S new tokens at each row's own slots [T_b - S, T_b) and each row
attends over its own [0, T_b), causally; the first prompt (total_sequence_length = S) starts every row at
slot 0, and a row shorter than S is padded at its end. So the kernel masks padding by itself and the graph
passes no attention bias, which onnxruntime's CUDA kernel does not take on its fast paths (docs/gpu.md).
onnxruntime takes the shared path when the two bound buffers have the same address (the runtime binds them
so); `gqa` below computes present = past with the new slots replaced. (Engines exported before this layout,
whose mask axis is not ROW_SLOTS_DIM, are left-padded and pass a padding bias; the runtime still drives them.)

The attention mask [B, W] may be exactly the step's slots (W = max T_b: prefill, runs of forced tokens) or
span the whole cache (W = capacity, zeros past each T_b: a decode step). With W = capacity every decode step
of a request has the same input shapes, so it can be bound once and captured as a CUDA graph (onnxruntime's
`enable_cuda_graph`); the kernel gets total_sequence_length = W and attends over each row's seqlens_k + 1
slots only (measured on the CPU kernel: identical outputs, same time). onnxruntime's CPU kernel refuses
W > S for a batch > 1 prefill ("past context"), so prefills use W = S.

RoPE positions are the cache slots, which for right-padded rows are the tokens' positions: GroupQueryAttention
derives them from its own bookkeeping (slot T_b - S + s for the step's token s), and the graph ignores its
position_ids input. The cached keys are rotated as transformers' are (tested against it). Folding RoPE into
the attention kernel saves a Split and two RoPE nodes per layer (3% of the int4 decode step on 2 cores,
docs/performance.md).
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
        total: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor, num_heads: int, kv_heads: int,
        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE at the cache slots, then grouped-query attention over a shared-buffer cache (module docstring).

    qkv [B, S, (h + 2*kvh)*d] (the packed projection, pre-RoPE), past_key / past_value [B, kvh, C, d],
    seqlens_k int32 [B] = T_b - 1 and total int32 [] = W (the kernel's bookkeeping; see `gqa_lengths`),
    cos_cache / sin_cache [max_positions, d/2]. Rows are right-padded: row b writes its new tokens at slots
    [T_b - S, T_b), or [0, S) on the first prompt (total == S), and attends causally over its own [0, T_b).
    Returns (out [B, S, h*d], present_key, present_value [B, kvh, C, d]).
    """
    b, s, _ = qkv.shape
    d = past_key.shape[-1]
    group = num_heads // kv_heads
    q, k, v = qkv.split([num_heads * d, kv_heads * d, kv_heads * d], dim=-1)
    ends = seqlens_k.long() + 1  # [B]: T_b per row
    first = int(total) == s  # onnxruntime's first prompt: every row starts at slot 0
    starts = torch.zeros_like(ends) if first else ends - s  # [B]: each row's first new slot
    slots = starts[:, None] + torch.arange(s, device=qkv.device)  # [B, S]: the new tokens' slots (RoPE positions)
    q, k = _rope(q, slots, cos_cache, sin_cache, num_heads), _rope(k, slots, cos_cache, sin_cache, kv_heads)
    present_key, present_value = past_key.clone(), past_value.clone()
    new_k, new_v = (x.view(b, s, kv_heads, d).transpose(1, 2) for x in (k, v))  # [B, kvh, S, d]
    for row in range(b):
        present_key[row, :, slots[row]] = new_k[row]
        present_value[row, :, slots[row]] = new_v[row]
    c = past_key.shape[2]  # every slot, masked to each row's own causal window over its valid slots
    key_slot = torch.arange(c, device=qkv.device)
    allowed = (key_slot <= slots[:, :, None]) & (key_slot < ends[:, None, None])  # [B, S, C]
    bias = torch.where(allowed, 0.0, torch.finfo(qkv.dtype).min).to(qkv.dtype)[:, None]  # [B, 1, S, C]
    qg = q.view(b, s, num_heads, d).transpose(1, 2).reshape(b, kv_heads, group * s, d)  # [B, kvh, g*S, d]
    scores = torch.matmul(qg, present_key.transpose(2, 3)) * scale  # [B, kvh, g*S, C]
    scores = scores.view(b, num_heads, s, c) + bias  # [B, h, S, C]
    probs = torch.softmax(scores.float(), dim=-1).to(present_value.dtype)
    ctx = torch.matmul(probs.view(b, kv_heads, group * s, c), present_value)  # [B, kvh, g*S, d]
    out = ctx.view(b, num_heads, s, d).transpose(1, 2).reshape(b, s, num_heads * d)  # [B, S, h*d]
    return out, present_key, present_value


@gqa.register_fake
def _(qkv, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, num_heads, kv_heads, scale):
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


def _gqa_onnx(qkv, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, num_heads: int, kv_heads: int,
              scale: float):
    out, present_key, present_value = _msft.GroupQueryAttention(
        qkv, None, None, past_key, past_value, seqlens_k, total, cos_cache, sin_cache,
        num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, do_rotary=1, rotary_interleaved=0)
    return out, present_key, present_value


def gqa_lengths(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupQueryAttention's seqlens_k (int32 [B]: T_b - 1, row b's last 1) and total_sequence_length (int32 []:
    W) for an attention mask [B, W] of right-padded rows (W = the step's slots, or the cache capacity with
    zeros past each row's end; module docstring). A row with no 1 at all counts as T_b = W. Computed once per
    step, shared by every layer."""
    # Two copies of W, one per memory. total_sequence_length from the mask's shape (Shape -> Cast): onnxruntime's
    # CUDA kernel reads it on the host, and a shape needs no copy. The W that meets device data comes from the
    # slot numbers (Range runs on the device and takes its bounds on the host): a host scalar inside a device
    # op makes onnxruntime insert a host-to-device Memcpy node, and a graph with any Memcpy node cannot be
    # captured as a CUDA graph (docs/gpu.md, "On an H100", Found 1).
    width = torch.full((), attention_mask.shape[1], dtype=torch.int64, device=attention_mask.device)
    slots = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)  # [W]: slot + 1
    end = ((attention_mask != 0) * slots).amax(dim=1)  # [B]: T_b, one past the row's last real slot
    end = torch.where(end > 0, end, slots[-1])  # slots[-1] = W, on the device
    return (end - 1).to(torch.int32), width.to(torch.int32)


TRANSLATIONS = {
    torch.ops.illume_edge.rms_norm.default: _rms_norm_onnx,
    torch.ops.illume_edge.skip_rms_norm.default: _skip_rms_norm_onnx,
    torch.ops.illume_edge.gqa.default: _gqa_onnx,
}
