"""The `llm` graph (KV cache, left padding, prompt-table splicing) and the `head_<range>` graphs against
transformers, for a Qwen2 (tiny-plus) and a LLaMA (tiny-v1) model, in both graph flavours: "portable"
(standard ops, concat KV layout) and "fused" (onnxruntime contrib ops, one shared KV buffer). The tests
see one contract: `Bundle.step` adapts the fused graph's shared buffer to past [B,kvh,P,d] -> present
[B,kvh,P+S,d], and its right-padded rows (export/fused_ops.py) to transformers' left-padded ones, so every
assertion below holds for both.

Tolerances: fp32 throughout; the graph reorders a few float ops (scaled queries, grouped-head matmuls), so
hidden states and logits agree with transformers to LOGIT_ATOL absolute (observed ~1e-6 on these models).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from illume_edge.config import ConfigError, preset
from illume_edge.manifest import KV_CAPACITY_DIM, LLM_GRAPHS, ROW_SLOTS_DIM
from illume_edge.export.export_llm import (export_heads, export_llm, head_graph_name, lm_head_weight,
                                           llm_input_names, llm_output_names)
from illume_edge.export.llm import (LLMStep, build_llm, cache_tensors, hf_config, llm_config_from_hf,
                                    reference_step, splice_embeds)
from illume_edge.export.onnx_io import drop_unread_optional_outputs

LOGIT_ATOL = 1e-4
HIDDEN_ATOL = 1e-4
HEAD_ATOL = 1e-5
DECODE_STEPS = 8
ROW_LENGTHS = (7, 4)  # batch of 2: row 1 is left-padded by 3
PAD_ID = 0


QK_GAIN = 4.0  # random init gives near-uniform attention; scaling q and k makes masks and RoPE matter


@torch.no_grad()
def _sharpen_attention(model):
    """Scale every q/k projection by QK_GAIN: attention scores spread ~QK_GAIN^2 wider (std ~1.5 here)."""
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.weight.mul_(QK_GAIN)
            if proj.bias is not None:
                proj.bias.mul_(QK_GAIN)
    return model


class Bundle:
    """A tiny model, its exported llm + head graphs and onnxruntime sessions."""

    def __init__(self, name: str, graph: str, out_dir):
        self.cfg, self.graph = preset(name), graph
        self.model = _sharpen_attention(build_llm(self.cfg, seed=0))
        self.llm_info = export_llm(self.model, self.cfg, out_dir / "llm.onnx", graph=graph)
        self.head_infos = export_heads(self.model, self.cfg, out_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        self.llm = ort.InferenceSession(str(self.llm_info.path), opts, providers=["CPUExecutionProvider"])
        self.heads = {name: ort.InferenceSession(str(info.path), opts, providers=["CPUExecutionProvider"])
                      for name, info in self.head_infos.items()}

    @property
    def llm_cfg(self):
        return self.cfg.llm

    def empty_past(self, batch: int) -> list[np.ndarray]:
        llm = self.llm_cfg
        shape = (batch, llm.num_kv_heads, 0, llm.head_size)
        return [np.zeros(shape, np.float32) for _ in range(2 * llm.num_layers)]

    def table(self, rows: int, seed: int = 1) -> np.ndarray:
        g = np.random.default_rng(seed)
        return (g.standard_normal((rows, self.llm_cfg.hidden_size)) * 0.05).astype(np.float32)

    def step(self, ids, image_embeds, mask, positions, past) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"input_ids": np.asarray(ids, np.int64), "image_embeds": image_embeds,
                 "attention_mask": np.asarray(mask, np.int64), "position_ids": np.asarray(positions, np.int64)}
        if self.graph == "portable":
            feeds.update(zip(llm_input_names(self.cfg)[4:], past))
            out = self.llm.run(None, feeds)
            return out[0], out[1:]
        return self._shared_step(feeds, past)

    def _shared_step(self, feeds, past) -> tuple[np.ndarray, list[np.ndarray]]:
        """The fused graph: move the left-padded feeds and `past` into its right-padded layout (each row's
        tokens from slot 0) in buffers with spare capacity, bind each buffer as past and present (the
        runtime's shared layout), and return the presents left-padded again."""
        mask = feeds["attention_mask"]
        batch, total = mask.shape
        s = feeds["input_ids"].shape[1]
        _, kvh, p, d = past[0].shape
        pad = (mask == 0).sum(axis=1)  # [B]: left padding (all of it in front)
        past_pad, new_pad = (mask[:, :p] == 0).sum(axis=1), (mask[:, p:] == 0).sum(axis=1)
        ids = np.full_like(feeds["input_ids"], PAD_ID)
        right = np.zeros_like(mask)
        for b in range(batch):
            ids[b, :s - new_pad[b]] = feeds["input_ids"][b, new_pad[b]:]
            right[b, :total - pad[b]] = 1
        feeds = {**feeds, "input_ids": ids, "attention_mask": right}
        buffers = []
        for t in past:
            buf = np.full((batch, kvh, total + 3, d), np.nan, np.float32)  # NaN: slots past a row's end stay unread
            for b in range(batch):
                buf[b, :, :p - past_pad[b]] = t[b, :, past_pad[b]:]
            buffers.append(buf)
        io = self.llm.io_binding()
        for name, arr in feeds.items():
            io.bind_cpu_input(name, arr)
        hidden = np.empty((batch, self.llm_cfg.hidden_size), np.float32)
        io.bind_output("last_hidden", "cpu", 0, np.float32, list(hidden.shape), hidden.ctypes.data)
        for past_name, present_name, buf in zip(llm_input_names(self.cfg)[4:], llm_output_names(self.cfg)[1:],
                                                buffers):
            io.bind_cpu_input(past_name, buf)
            io.bind_output(present_name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        self.llm.run_with_iobinding(io)
        presents = []
        for buf in buffers:
            out = np.zeros((batch, kvh, total, d), np.float32)  # padded slots: zeros
            for b in range(batch):
                out[b, :, pad[b]:] = buf[b, :, :total - pad[b]]
            presents.append(out)
        return hidden, presents

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """[B, tokenizer_len]: the head graphs' outputs side by side, in range order."""
        parts = [self.heads[name].run(None, {"hidden": hidden})[0] for name in self.cfg.head_ranges()]
        return np.concatenate(parts, axis=1)


@pytest.fixture(scope="module", params=[(name, graph) for name in ("tiny-plus", "tiny-v1")
                                        for graph in LLM_GRAPHS], ids=lambda p: "-".join(p))
def bundle(request, tmp_path_factory) -> Bundle:
    name, graph = request.param
    return Bundle(name, graph, tmp_path_factory.mktemp(f"{name}-{graph}"))


def _left_padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, attention_mask, position_ids [B, S] for rows of unequal length (left padding, positions from 0)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), PAD_ID, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    pos = np.zeros((len(rows), width), np.int64)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
        pos[b, width - len(r):] = np.arange(len(r))
    return ids, mask, pos


def _right_padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fused graph's layout of the same rows: each from slot 0, padded at its end (positions = slots)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), PAD_ID, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = r
        mask[b, :len(r)] = 1
    return ids, mask, np.broadcast_to(np.arange(width), ids.shape).copy()


def _prompts(cfg, seed: int = 0) -> list[list[int]]:
    g = np.random.default_rng(seed)
    return [g.integers(0, cfg.tokenizer_len, size=n).tolist() for n in ROW_LENGTHS]


@torch.no_grad()
def _hf_last_logits(model, ids: list[int], vocab: int) -> np.ndarray:
    """transformers' own forward on one unpadded row, no cache: logits of the last position, [vocab]."""
    return model(torch.tensor([ids])).logits[0, -1, :vocab].numpy()


# ----------------------------------------------------------------------------------------------------
# Prefill + decode with a KV cache and left padding
# ----------------------------------------------------------------------------------------------------
def test_prefill_decode_matches_transformers_per_row(bundle):
    cfg, vocab = bundle.cfg, bundle.cfg.tokenizer_len
    prompts = _prompts(cfg)
    ids, mask, pos = _left_padded(prompts)
    table = bundle.table(0)

    hidden, past = bundle.step(ids, table, mask, pos, bundle.empty_past(len(prompts)))  # P = 0 prefill
    assert all(np.isfinite(p).all() for p in past), "padded query rows must not produce NaN/inf presents"
    seqs = [list(p) for p in prompts]  # transformers' own greedy continuation of each unpadded row
    worst = 0.0
    for step in range(DECODE_STEPS + 1):
        logits = bundle.logits(hidden)
        assert logits.shape == (len(prompts), vocab)
        ours = logits.argmax(axis=1)
        for b, seq in enumerate(seqs):
            ref = _hf_last_logits(bundle.model, seq, vocab)
            err = float(np.abs(logits[b] - ref).max())
            worst = max(worst, err)
            assert err < LOGIT_ATOL, f"{cfg.name} step {step} row {b}: logits differ by {err}"
            assert int(ours[b]) == int(ref.argmax()), f"{cfg.name} step {step} row {b}: greedy token differs"
            seq.append(int(ref.argmax()))
        if step == DECODE_STEPS:
            break
        # decode: one new token per row on top of the presents (P > 0, same graph)
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        positions = pos[:, -1:] + 1
        pos = np.concatenate([pos, positions], axis=1)
        hidden, past = bundle.step(ours[:, None], table, mask, positions, past)
        assert past[0].shape[2] == mask.shape[1]
    for b, n in enumerate(ROW_LENGTHS):
        assert len(seqs[b]) == n + DECODE_STEPS + 1
    print(f"{cfg.name}: max |logit diff| over {DECODE_STEPS + 1} steps = {worst:.2e}")


def test_reference_step_matches_graph_with_padding_and_cache(bundle):
    """The torch helper the reference pipeline uses (DynamicCache) agrees with the graph step by step."""
    cfg = bundle.cfg
    ids, mask, pos = _left_padded(_prompts(cfg, seed=3))
    table = bundle.table(0)
    hidden, past = bundle.step(ids, table, mask, pos, bundle.empty_past(ids.shape[0]))
    ref_hidden, cache = reference_step(bundle.model, torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                       position_ids=torch.from_numpy(pos))
    real = mask.astype(bool)  # presents only agree on real (unpadded) slots
    for step in range(4):
        np.testing.assert_allclose(hidden, ref_hidden.numpy(), atol=HIDDEN_ATOL, rtol=0,
                                   err_msg=f"{cfg.name} step {step}: last_hidden")
        for (k, v), (ok, ov) in zip(cache_tensors(cache), zip(past[0::2], past[1::2])):
            for b in range(ids.shape[0]):
                np.testing.assert_allclose(ok[b][:, real[b]], k.numpy()[b][:, real[b]], atol=HIDDEN_ATOL, rtol=0)
                np.testing.assert_allclose(ov[b][:, real[b]], v.numpy()[b][:, real[b]], atol=HIDDEN_ATOL, rtol=0)
        token = bundle.logits(hidden).argmax(axis=1)[:, None]
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        real = mask.astype(bool)
        positions = pos[:, -1:] + 1 + step
        hidden, past = bundle.step(token, table, mask, positions, past)
        ref_hidden, cache = reference_step(bundle.model, torch.from_numpy(token),
                                           attention_mask=torch.from_numpy(mask),
                                           position_ids=torch.from_numpy(positions), past=cache)


def test_decode_on_transformers_cache(bundle):
    """The graph's past/present layout is transformers' (post-RoPE keys): decode from an HF prefill cache."""
    ids, mask, pos = _left_padded(_prompts(bundle.cfg, seed=5))
    _, cache = reference_step(bundle.model, torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                              position_ids=torch.from_numpy(pos))
    past = [t.numpy().copy() for kv in cache_tensors(cache) for t in kv]
    token = np.array([[11], [12]], np.int64)
    mask = np.concatenate([mask, np.ones_like(token)], axis=1)
    positions = pos[:, -1:] + 1
    hidden, presents = bundle.step(token, bundle.table(0), mask, positions, past)
    ref, _ = reference_step(bundle.model, torch.from_numpy(token), attention_mask=torch.from_numpy(mask),
                            position_ids=torch.from_numpy(positions), past=cache)
    np.testing.assert_allclose(hidden, ref.numpy(), atol=HIDDEN_ATOL, rtol=0)
    assert presents[0].shape[2] == ids.shape[1] + 1


def test_fully_masked_rows_stay_finite(bundle):
    """A row whose every key is padding (all-zero attention_mask) gives finite outputs, not NaN."""
    ids = np.array([[5, 6, 7], [8, 9, 10]], np.int64)
    mask = np.array([[1, 1, 1], [0, 0, 0]], np.int64)
    pos = np.array([[0, 1, 2], [0, 0, 0]], np.int64)
    hidden, presents = bundle.step(ids, bundle.table(0), mask, pos, bundle.empty_past(2))
    assert np.isfinite(hidden).all() and all(np.isfinite(p).all() for p in presents)
    # row 0 is unaffected by its fully padded neighbour
    alone, _ = bundle.step(ids[:1], bundle.table(0), mask[:1], pos[:1], bundle.empty_past(1))
    np.testing.assert_allclose(hidden[:1], alone, atol=HIDDEN_ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Prompt-table splicing
# ----------------------------------------------------------------------------------------------------
def _image_prompt(cfg, rows: int) -> np.ndarray:
    v = cfg.llm.vocab_rows
    text = cfg.tokens
    return np.array([[text.im_start, text.start_of_image, v + 0, v + 1, v + 2, text.end_of_image, 42],
                     [text.start_of_image, v + 2, v + 1, 17, v + rows - 1, text.end_of_image, 43]], np.int64)


def test_splicing_matches_inputs_embeds(bundle):
    cfg, model = bundle.cfg, bundle.model
    n = 4
    table = bundle.table(n, seed=7)
    ids = _image_prompt(cfg, n)
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    hidden, _ = bundle.step(ids, table, mask, pos, bundle.empty_past(2))

    # splice_embeds against an explicit per-token construction
    embeds = splice_embeds(model, torch.from_numpy(ids), torch.from_numpy(table), cfg.llm.vocab_rows)
    weight = model.get_input_embeddings().weight.detach().numpy()
    manual = np.stack([[table[t - cfg.llm.vocab_rows] if t >= cfg.llm.vocab_rows else weight[t] for t in row]
                       for row in ids])
    np.testing.assert_array_equal(embeds.detach().numpy(), manual)

    with torch.no_grad():
        ref = model.model(inputs_embeds=embeds).last_hidden_state[:, -1].numpy()
    np.testing.assert_allclose(hidden, ref, atol=HIDDEN_ATOL, rtol=0)
    ref_step, _ = reference_step(model, None, inputs_embeds=embeds, attention_mask=torch.from_numpy(mask),
                                 position_ids=torch.from_numpy(pos))
    np.testing.assert_allclose(hidden, ref_step.numpy(), atol=HIDDEN_ATOL, rtol=0)
    # the table rows really matter: a different table changes the result
    other, _ = bundle.step(ids, table + 1.0, mask, pos, bundle.empty_past(2))
    assert np.abs(other - hidden).max() > 1e-3


def test_empty_image_table(bundle):
    """N = 0: a text-only prompt runs with an empty table and equals the same prompt with an unused table."""
    ids, mask, pos = _left_padded(_prompts(bundle.cfg, seed=9))
    empty, _ = bundle.step(ids, bundle.table(0), mask, pos, bundle.empty_past(2))
    unused, _ = bundle.step(ids, bundle.table(3), mask, pos, bundle.empty_past(2))
    np.testing.assert_array_equal(empty, unused)


def test_image_id_past_table_is_rejected(bundle):
    cfg = bundle.cfg
    ids = _image_prompt(cfg, 4)  # refers to table row 3
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, "):
        splice_embeds(bundle.model, torch.from_numpy(ids), torch.from_numpy(bundle.table(3)), cfg.llm.vocab_rows)
    with pytest.raises(Exception, match="out of data bounds"):  # the graph: an out-of-range gather
        bundle.step(ids, bundle.table(3), np.ones_like(ids), np.zeros_like(ids), bundle.empty_past(2))


# ----------------------------------------------------------------------------------------------------
# Graph contracts
# ----------------------------------------------------------------------------------------------------
def test_llm_graph_contract(bundle):
    cfg, info = bundle.cfg, bundle.llm_info
    llm = cfg.llm
    inputs = {t.name: t for t in info.inputs}
    outputs = {t.name: t for t in info.outputs}
    assert list(inputs) == llm_input_names(cfg) and list(outputs) == llm_output_names(cfg)
    assert (inputs["input_ids"].dtype, inputs["input_ids"].shape) == ("int64", ["batch", "seq"])
    assert (inputs["image_embeds"].dtype, inputs["image_embeds"].shape) == ("float32",
                                                                           ["image_rows", llm.hidden_size])
    mask_axis = "total" if bundle.graph == "portable" else ROW_SLOTS_DIM
    assert (inputs["attention_mask"].dtype, inputs["attention_mask"].shape) == ("int64", ["batch", mask_axis])
    assert (inputs["position_ids"].dtype, inputs["position_ids"].shape) == ("int64", ["batch", "seq"])
    past_axis = "past" if bundle.graph == "portable" else KV_CAPACITY_DIM
    kv = ["batch", llm.num_kv_heads, past_axis, llm.head_size]
    for i in range(llm.num_layers):
        for part in ("key", "value"):
            assert inputs[f"past_key_values.{i}.{part}"].shape == kv
            assert outputs[f"present.{i}.{part}"].dtype == "float32"
            assert outputs[f"present.{i}.{part}"].shape[:2] == ["batch", llm.num_kv_heads]
            if bundle.graph == "fused":  # one buffer in and out
                assert outputs[f"present.{i}.{part}"].shape == kv
    assert (outputs["last_hidden"].dtype, outputs["last_hidden"].shape) == ("float32", ["batch", llm.hidden_size])
    assert info.dynamic_ranges[past_axis][0] == (0 if bundle.graph == "portable" else 1)
    assert info.dynamic_ranges["image_rows"][0] == 0
    if bundle.graph == "portable":
        assert "MatMul" in info.ops and "Softmax" in info.ops and info.portable
    else:  # the fused kernels replace the attention, norm and RoPE chains
        assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= set(info.ops)
        assert "Softmax" not in info.ops and "Pow" not in info.ops and not info.portable


# ----------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------
def test_heads_equal_lm_head_rows_and_cover_tokenizer(bundle):
    cfg = bundle.cfg
    ranges = cfg.head_ranges()
    assert set(bundle.head_infos) == set(ranges)
    spans = sorted(ranges.values())
    assert spans[0][0] == 0 and spans[-1][1] == cfg.tokenizer_len
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), f"head ranges leave gaps or overlap: {spans}"

    weight = bundle.model.lm_head.weight.detach().numpy()
    hidden = np.random.default_rng(2).standard_normal((3, cfg.llm.hidden_size)).astype(np.float32)
    for name, (start, stop) in ranges.items():
        info = bundle.head_infos[name]
        assert info.path.name == f"{head_graph_name(name)}.onnx"
        assert [(t.name, t.dtype, t.shape) for t in info.inputs] == [("hidden", "float32",
                                                                      ["batch", cfg.llm.hidden_size])]
        assert [(t.name, t.dtype, t.shape) for t in info.outputs] == [("logits", "float32", ["batch", stop - start])]
        got = bundle.heads[name].run(None, {"hidden": hidden})[0]
        np.testing.assert_allclose(got, hidden @ weight[start:stop].T, atol=HEAD_ATOL, rtol=1e-5)


def test_tied_head_uses_input_embeddings():
    cfg = preset("tiny-v1")
    tied = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, tie_word_embeddings=True))
    model = build_llm(tied, seed=0)
    assert lm_head_weight(model, tied).data_ptr() == model.get_input_embeddings().weight.data_ptr()
    untied = build_llm(cfg, seed=0)
    assert lm_head_weight(untied, cfg).data_ptr() == untied.lm_head.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.get_input_embeddings().weight)


# ----------------------------------------------------------------------------------------------------
# Checkpoint config.json
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-plus", "tiny-v1", "illume-plus-3b", "illume-plus-7b"])
def test_llm_config_from_hf_round_trip(name):
    cfg = preset(name)
    d = hf_config(cfg).to_dict()
    d["model_type"] = "illume_" + d["model_type"]  # the release's config class names
    assert llm_config_from_hf(d) == cfg.llm


def test_llm_config_from_hf_transformers4_layout():
    """rope_theta at the top level (transformers 4 config.json), as the released checkpoints carry."""
    cfg = preset("illume-plus-3b")
    d = hf_config(cfg).to_dict()
    d["rope_theta"] = d.pop("rope_parameters")["rope_theta"]
    d["rope_scaling"] = None
    assert llm_config_from_hf(d) == cfg.llm


@pytest.mark.parametrize("name,key", [
    ("tiny-plus", "hidden_size"), ("tiny-plus", "num_hidden_layers"), ("tiny-plus", "num_attention_heads"),
    ("tiny-plus", "intermediate_size"), ("tiny-plus", "vocab_size"), ("tiny-plus", "rms_norm_eps"),
    ("tiny-plus", "max_position_embeddings"), ("tiny-plus", "model_type"), ("tiny-plus", "rope_parameters"),
    ("tiny-v1", "attention_bias"),
])
def test_llm_config_from_hf_missing_key_is_named(name, key):
    d = hf_config(preset(name)).to_dict()
    del d[key]
    expect = "rope_theta" if key == "rope_parameters" else key  # no rope params at all: asks for rope_theta
    with pytest.raises(ConfigError, match=f"missing key '{expect}'"):
        llm_config_from_hf(d)


def test_llm_config_from_hf_qwen2_implies_bias_and_rejects_unsupported():
    d = hf_config(preset("tiny-plus")).to_dict()
    d.pop("attention_bias", None)
    assert llm_config_from_hf(d).attention_bias is True
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        llm_config_from_hf({**d, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}})
    with pytest.raises(ConfigError, match="model_type 'mistral'"):
        llm_config_from_hf({**d, "model_type": "mistral"})
    with pytest.raises(ConfigError, match="'hidden_size' expected int"):
        llm_config_from_hf({**d, "hidden_size": "64"})


def test_hf_config_attention_implementations():
    cfg = preset("tiny-plus")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        eager = build_llm(cfg, "eager", seed=4)(ids).logits
        sdpa = build_llm(cfg, "sdpa", seed=4)(ids).logits
    torch.testing.assert_close(sdpa, eager, atol=LOGIT_ATOL, rtol=0)
    with pytest.raises(ConfigError, match="attn_implementation expected one of"):
        hf_config(cfg, "flash_attention_2")


# ----------------------------------------------------------------------------------------------------
# The fused graph's own contract
# ----------------------------------------------------------------------------------------------------
def test_fused_step_equals_portable_step_in_torch():
    """The custom ops' eager arithmetic is the portable step's: the same outputs in torch, the portable step
    on left-padded rows, the fused one on the same rows right-padded. Row b's cache (keys and values) holds
    at slots [0, T_b) what the portable cache holds at its last T_b slots; slots past the batch's width stay
    untouched."""
    cfg = preset("tiny-plus")
    model = _sharpen_attention(build_llm(cfg, seed=1))
    portable, fused = LLMStep(model, cfg, "portable"), LLMStep(model, cfg, "fused")
    prompts = _prompts(cfg, seed=11)
    left = [torch.from_numpy(a) for a in _left_padded(prompts)]
    right = [torch.from_numpy(a) for a in _right_padded(prompts)]
    llm, (b, t) = cfg.llm, left[0].shape
    empty = tuple((torch.zeros(b, llm.num_kv_heads, 0, llm.head_size),) * 2 for _ in range(llm.num_layers))
    shared = tuple((torch.zeros(b, llm.num_kv_heads, t + 4, llm.head_size),) * 2 for _ in range(llm.num_layers))
    table = torch.zeros(0, llm.hidden_size)
    with torch.no_grad():
        want, got = portable(left[0], table, *left[1:], empty), fused(right[0], table, *right[1:], shared)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    assert len({len(p) for p in prompts}) > 1, "the prompts must have unequal lengths"
    for w, g in zip(want[1:], got[1:]):
        assert g.shape[2] == t + 4
        for row, p in enumerate(prompts):
            n = len(p)
            torch.testing.assert_close(g[row, :, :n], w[row, :, t - n:], atol=1e-5, rtol=0)
        assert not g[:, :, t:].any(), "slots past the batch's width must stay untouched"


def test_fused_graph_layers_are_fused_kernels(bundle):
    """What makes it fast: per layer one RoPE + attention kernel on the packed q|k|v projection and two
    add+norm kernels replace the portable graph's RoPE arithmetic, softmax, power/mean/sqrt norm chains and
    KV concats."""
    model = onnx.load(str(bundle.llm_info.path), load_external_data=False)
    count = lambda op: sum(n.op_type == op for n in model.graph.node)  # noqa: E731
    layers = bundle.llm_cfg.num_layers
    if bundle.graph == "portable":  # one softmax per layer, standard domain only
        assert count("Softmax") == layers and {n.domain for n in model.graph.node} <= {""}
        return
    assert count("GroupQueryAttention") == layers and count("RotaryEmbedding") == 0
    # no Split: q|k|v enters the attention kernel packed, gate and up are two MatMuls (one GEMV each)
    assert count("Split") == 0 and count("MatMul") == 5 * layers
    # layer 0's input norm has no residual to add; every other norm (and the final one) does
    assert count("SimplifiedLayerNormalization") == 1 and count("SkipSimplifiedLayerNormalization") == 2 * layers
    assert count("Softmax") == count("Pow") == count("Sqrt") == 0
    assert {n.domain for n in model.graph.node if n.op_type == "GroupQueryAttention"} == {"com.microsoft"}
    # outputs nothing reads are unnamed, so onnxruntime neither computes nor allocates them: every norm's
    # mean / inv_std_var, and the final norm's residual sum
    skip_norms = [n for n in model.graph.node if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert all(n.output[1] == n.output[2] == "" and n.output[0] for n in skip_norms)
    assert [bool(n.output[3]) for n in skip_norms] == [True] * (len(skip_norms) - 1) + [False]


def test_unread_optional_outputs_are_dropped_and_read_ones_kept():
    """Optional outputs that a node or the graph reads keep their names; unread ones lose theirs, with their
    value_info; a required output (the norm's result) is never touched."""
    h = onnx.helper
    norm = lambda i, x: h.make_node("SkipSimplifiedLayerNormalization", [x, "skip", "g"],  # noqa: E731
                                    [f"y{i}", f"mean{i}", f"inv{i}", f"sum{i}"], domain="com.microsoft")
    nodes = [norm(0, "x"), norm(1, "sum0"), h.make_node("Identity", ["mean1"], ["m"])]
    f = lambda n: h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2])  # noqa: E731
    graph = h.make_graph(nodes, "g", [f("x"), f("skip"), f("g")], [f("y1"), f("m"), f("inv0")],
                         value_info=[f("mean0"), f("mean1"), f("sum0")])
    model = h.make_model(graph)
    assert drop_unread_optional_outputs(model) == 3  # mean0, inv1, sum1 (inv0 is a graph output, y0 required)
    assert list(model.graph.node[0].output) == ["y0", "", "inv0", "sum0"]
    assert list(model.graph.node[1].output) == ["y1", "mean1", "", ""]
    assert [v.name for v in model.graph.value_info] == ["mean1", "sum0"]


def test_fused_graph_needs_head_dim_multiple_of_16():
    cfg = preset("tiny-plus")
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, hidden_size=96, num_heads=4, head_dim=24))
    with pytest.raises(ConfigError, match=r"head_dim % 16 == 0.*--llm-graph portable"):
        LLMStep(build_llm(cfg, seed=0), cfg, "fused")
    with pytest.raises(ConfigError, match="graph expected one of"):
        LLMStep(build_llm(preset("tiny-plus"), seed=0), preset("tiny-plus"), "flash")


def _shared_buffers(bundle, batch: int, capacity: int) -> list[np.ndarray]:
    llm = bundle.llm_cfg
    return [np.zeros((batch, llm.num_kv_heads, capacity, llm.head_size), np.float32)
            for _ in range(2 * llm.num_layers)]


def _run_shared(bundle, buffers, ids, mask, pos) -> np.ndarray:
    """One run of the fused graph on preallocated shared K/V buffers (bound as past and present)."""
    io = bundle.llm.io_binding()
    for name, arr in {"input_ids": ids, "image_embeds": bundle.table(0), "attention_mask": mask,
                      "position_ids": pos}.items():
        io.bind_cpu_input(name, np.ascontiguousarray(arr, dtype=arr.dtype))
    hidden = np.empty((ids.shape[0], bundle.llm_cfg.hidden_size), np.float32)
    io.bind_output("last_hidden", "cpu", 0, np.float32, list(hidden.shape), hidden.ctypes.data)
    for past, present, buf in zip(llm_input_names(bundle.cfg)[4:], llm_output_names(bundle.cfg)[1:], buffers):
        io.bind_cpu_input(past, buf)
        io.bind_output(present, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
    bundle.llm.run_with_iobinding(io)
    return hidden


FUSED_BUNDLES = [(name, "fused") for name in ("tiny-plus", "tiny-v1")]


@pytest.mark.parametrize("bundle", FUSED_BUNDLES, indirect=True, ids=lambda p: "-".join(p))
def test_fused_decode_with_capacity_mask_equals_exact_mask(bundle):
    """A decode step may bind the mask over the whole KV capacity (zeros past each row's end: the same
    shapes every step, what a CUDA graph needs): the same hidden states and cache as the mask cut to the
    longest row, on a batch of unequal rows each appending at its own end, step after step (onnxruntime;
    atol 1e-6)."""
    prompts = _prompts(bundle.cfg, seed=5)
    ids, mask, pos = _right_padded(prompts)
    batch, width = ids.shape
    capacity = width + DECODE_STEPS + 3
    full = np.zeros((batch, capacity), np.int64)
    full[:, :width] = mask
    exact, wide = _shared_buffers(bundle, batch, capacity), _shared_buffers(bundle, batch, capacity)
    for bufs in (exact, wide):  # the prefill binds the mask cut to its slots (the CPU kernel's rule)
        _run_shared(bundle, bufs, ids, mask, pos)
    g = np.random.default_rng(6)
    ends = mask.sum(axis=1)  # [B]: each row's next slot
    for _ in range(DECODE_STEPS):
        tok = g.integers(0, bundle.cfg.tokenizer_len, size=(batch, 1))
        full[np.arange(batch), ends] = 1
        want = _run_shared(bundle, exact, tok, full[:, :ends.max() + 1], ends[:, None])
        got = _run_shared(bundle, wide, tok, full, ends[:, None])
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
        ends = ends + 1
    for a, b in zip(wide, exact):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    for row, end in enumerate(ends):  # nothing written past a row's end (nor past the prefill's width)
        assert not np.concatenate([a[row, :, max(end, width):] for a in wide]).any(), f"row {row}"


def test_fused_step_in_torch_reads_each_rows_end_from_the_mask():
    """The custom op's eager body (the export's reference) follows the same rule: a decode step with the
    mask over the whole capacity equals the step with the mask cut to the longest row, and each row writes
    its own next slot."""
    cfg = preset("tiny-plus")
    model = _sharpen_attention(build_llm(cfg, seed=2))
    step = LLMStep(model, cfg, "fused")
    prompts = _prompts(cfg, seed=12)
    ids, mask, pos = (torch.from_numpy(a) for a in _right_padded(prompts))
    llm, (b, t) = cfg.llm, ids.shape
    capacity = t + 5
    past = tuple((torch.zeros(b, llm.num_kv_heads, capacity, llm.head_size),) * 2 for _ in range(llm.num_layers))
    table = torch.zeros(0, llm.hidden_size)
    ends = mask.sum(dim=1)  # [B]
    with torch.no_grad():
        out = step(ids, table, mask, pos, past)
        cache = tuple((out[1 + 2 * i], out[2 + 2 * i]) for i in range(llm.num_layers))
        full = torch.zeros(b, capacity, dtype=torch.int64)
        full[:, :t] = mask
        full[torch.arange(b), ends] = 1
        tok = torch.tensor([[3], [4]])
        want = step(tok, table, full[:, :int(ends.max()) + 1], ends[:, None], cache)
        got = step(tok, table, full, ends[:, None], cache)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)
    for row, end in enumerate(ends.tolist()):
        assert not torch.equal(got[1][row, :, end], cache[0][0][row, :, end]), f"row {row}: slot {end} written"
        assert not got[1][row, :, max(end + 1, t):].any(), f"row {row}: nothing past its new end"
