"""Export the `llm` graph (prefill + decode, KV cache, prompt-table splicing) and the LM-head range graphs.

`llm` graph contract (float32, opset 18, standard ops only):
  inputs
    input_ids                     int64   [batch, seq]          ids; id >= vocab_rows selects an image_embeds row
    image_embeds                  float32 [image_rows, hidden]  prompt table; image_rows may be 0 (empty table)
    attention_mask                int64   [batch, total]        total = past + seq; 1 real token, 0 left padding
    position_ids                  int64   [batch, seq]          explicit RoPE positions (left-padded rows start at 0)
    past_key_values.{i}.key/value float32 [batch, kv_heads, past, head_dim]  past may be 0 (prefill)
  outputs
    last_hidden                   float32 [batch, hidden]       final norm applied, last position only
    present.{i}.key/value         float32 [batch, kv_heads, past + seq, head_dim]  post-RoPE, past first
  An id in [vocab_rows, vocab_rows + image_rows) takes row id - vocab_rows of image_embeds; an id past that
  is an out-of-range gather (the runtime validates ids before running). Key slots whose attention_mask is 0
  are masked for every query; a query whose keys are all masked gives a finite (uniform-attention) row.
  That is the portable graph's contract. The fused graph (the export default) differs in its layout: one
  KV buffer bound as past and present ([batch, kv_heads, kv_capacity, head_dim]) and right-padded rows
  (row b's tokens at slots [0, T_b), its mask row 1 there and 0 after; the mask [batch, row_slots] is the
  step's slots or the whole capacity), so its mask's zeros are at row ends (export/fused_ops.py).
  An fp16 engine (`--precision fp16`) keeps this contract except the KV cache: past / present are float16
  there (the compute dtype), so that the fused graph hands the bound cache to GroupQueryAttention as it is
  and a step appends to it in place (a float32 cache would be cast whole, twice, every step).

`head_<name>` graph contract: hidden float32 [batch, hidden] -> logits float32 [batch, stop - start],
  logits = hidden @ lm_head.weight[start:stop].T for each range of `cfg.head_ranges()`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from illume_edge.config import ConfigError, ModelConfig
from illume_edge.manifest import DEFAULT_LLM_GRAPH, KV_CAPACITY_DIM, ROW_SLOTS_DIM
from illume_edge.export.llm import LLMStep
from illume_edge.export.onnx_io import GraphInfo, export_onnx

# Sample sizes used while tracing. Each dynamic dimension is traced at a value >= 2 so torch.export does not
# specialise it to 0/1; the declared minimums (past 0, image_rows 0) are proven by the tests.
_SAMPLE_BATCH, _SAMPLE_SEQ, _SAMPLE_PAST, _SAMPLE_IMAGE_ROWS = 2, 3, 4, 2


def llm_input_names(cfg: ModelConfig) -> list[str]:
    names = ["input_ids", "image_embeds", "attention_mask", "position_ids"]
    for i in range(cfg.llm.num_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def llm_output_names(cfg: ModelConfig) -> list[str]:
    names = ["last_hidden"]
    for i in range(cfg.llm.num_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


def head_graph_name(name: str) -> str:
    return f"head_{name}"


def export_llm(model: nn.Module, cfg: ModelConfig, path: str | os.PathLike,
               graph: str = DEFAULT_LLM_GRAPH) -> GraphInfo:
    """Export the one-graph LLM step (see the module docstring for the I/O contract) to `path`.

    graph "portable": standard ops, concat KV layout, left padding. graph "fused": onnxruntime contrib ops,
    shared KV layout (past_key_values.* and present.* are [batch, kv_heads, kv_capacity, head_dim], one
    buffer), rows right-padded (attention_mask [batch, row_slots]: the step's slots or the whole capacity,
    see export/fused_ops.py).
    """
    llm = cfg.llm
    step = LLMStep(model, cfg, graph)
    b, s, p, n = _SAMPLE_BATCH, _SAMPLE_SEQ, _SAMPLE_PAST, _SAMPLE_IMAGE_ROWS
    fused = graph == "fused"
    kv_len = p + s + 2 if fused else p  # shared layout: a buffer with room to spare
    kv_shape = (b, llm.num_kv_heads, kv_len, llm.head_size)
    # The KV cache in the compute dtype: an fp16 export keeps past / present fp16 (the other inputs and outputs
    # stay fp32), so that a step appends to the cache in place instead of casting the whole cache twice
    kv_dtype = next(model.parameters()).dtype
    past = tuple((torch.zeros(kv_shape, dtype=kv_dtype), torch.zeros(kv_shape, dtype=kv_dtype))
                 for _ in range(llm.num_layers))
    ids = torch.tensor([[1, llm.vocab_rows, 2], [3, 4, llm.vocab_rows + 1]], dtype=torch.int64)[:b, :s]
    args = (ids, torch.zeros(n, llm.hidden_size), torch.ones(b, p + s, dtype=torch.int64),
            torch.arange(p, p + s).expand(b, s).contiguous(), past)

    ctx = llm.max_position_embeddings
    batch = Dim("batch", min=1, max=llm.max_batch)
    seq = Dim("seq", min=1, max=ctx)
    past_len = Dim("past", min=0, max=ctx)
    total = Dim(ROW_SLOTS_DIM if fused else "total", min=1, max=ctx)  # fused: [B, W] or [B, capacity]
    image_rows = Dim("image_rows", min=0, max=ctx)
    kv = {0: batch, 2: Dim(KV_CAPACITY_DIM, min=1, max=ctx) if fused else past_len}
    dynamic_shapes = (
        {0: batch, 1: seq},
        {0: image_rows},
        {0: batch, 1: total},
        {0: batch, 1: seq},
        tuple((kv, kv) for _ in range(llm.num_layers)),
    )
    translations = None
    if fused:
        from .fused_ops import TRANSLATIONS as translations
    outputs = llm_output_names(cfg)
    return export_onnx(step, args, path, input_names=llm_input_names(cfg), output_names=outputs,
                       dynamic_shapes=dynamic_shapes, translations=translations,
                       half_outputs=tuple(n for n in outputs if n.startswith("present.")))


class HeadSlice(nn.Module):
    """hidden [B, H] -> logits [B, stop - start] for rows [start, stop) of the LM head."""

    def __init__(self, weight: torch.Tensor, start: int, stop: int):
        super().__init__()
        # Stored transposed so the graph is one MatMul with a [H, stop - start] initializer.
        self.weight_t = nn.Parameter(weight[start:stop].detach().t().contiguous(), requires_grad=False)  # model dtype

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.matmul(hidden, self.weight_t)


def lm_head_weight(model: nn.Module, cfg: ModelConfig) -> torch.Tensor:
    """[vocab_rows, H] output projection; the input embedding when the config ties them."""
    if cfg.llm.tie_word_embeddings:
        return model.get_input_embeddings().weight
    return model.get_output_embeddings().weight


def export_head(model: nn.Module, cfg: ModelConfig, name: str, token_range: tuple[int, int],
                path: str | os.PathLike) -> GraphInfo:
    """Export `hidden -> logits` for LM-head rows [start, stop) to `path`."""
    start, stop = token_range
    weight = lm_head_weight(model, cfg)
    if not 0 <= start < stop <= weight.shape[0]:
        raise ConfigError(f"head {name!r}: range [{start}, {stop}) is not inside the LM head's "
                          f"{weight.shape[0]} rows")
    batch = Dim("batch", min=1, max=cfg.llm.max_batch)
    sample = torch.zeros(2, cfg.llm.hidden_size)
    return export_onnx(HeadSlice(weight, start, stop), (sample,), path, input_names=["hidden"],
                       output_names=["logits"], dynamic_shapes=({0: batch},))


def export_heads(model: nn.Module, cfg: ModelConfig, out_dir: str | os.PathLike) -> dict[str, GraphInfo]:
    """One `head_<name>.onnx` per range of `cfg.head_ranges()` in `out_dir`."""
    out_dir = Path(out_dir)
    return {name: export_head(model, cfg, name, rng, out_dir / f"{head_graph_name(name)}.onnx")
            for name, rng in cfg.head_ranges().items()}
