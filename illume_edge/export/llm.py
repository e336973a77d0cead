"""The LLM of an ILLUME-family model: transformers reference, checkpoint config, and the exportable step.

- `hf_config` / `build_llm`: a transformers Qwen2 or LLaMA causal LM from `cfg.llm` (random init, eval).
- `llm_config_from_hf`: `LLMConfig` from a real checkpoint's config.json (strict: a missing key is named).
- `splice_embeds`: token embeddings with a *prompt table* spliced in: an id >= vocab_rows selects row
  `id - vocab_rows` of `image_embeds` instead of the embedding table (how continuous image features enter).
- `reference_step`: one torch forward with a transformers DynamicCache (the reference pipeline's oracle).
- `LLMStep`: the module exported as the single `llm` graph (prefill and decode alike, see export_llm.py).
  It runs its own layer loop on the transformers modules' weights: MatMul attention with grouped KV heads,
  the causal + left-padding mask built in-graph from `attention_mask`, the final norm on the last position.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from illume_edge.config import ConfigError, LLMConfig, ModelConfig
from illume_edge.manifest import LLM_GRAPHS

# Additive mask value for disallowed (future or padded) keys: the most negative finite float32, as
# transformers uses. Added to a finite score it stays finite, so a query row whose keys are all masked
# (a left-padding query) softmaxes to a uniform row instead of NaN.
MASK_VALUE = torch.finfo(torch.float32).min

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
# onnxruntime's CPU GroupQueryAttention (the fused graph) requires head_dim % 16 == 0.
GQA_HEAD_MULTIPLE = 16


# ----------------------------------------------------------------------------------------------------
# transformers configs and models
# ----------------------------------------------------------------------------------------------------
def hf_config(cfg: ModelConfig, attn_implementation: str = "eager") -> Qwen2Config | LlamaConfig:
    """The transformers config of `cfg.llm` (Qwen2Config for arch 'qwen2', LlamaConfig for 'llama')."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"hf_config: attn_implementation expected one of {ATTN_IMPLEMENTATIONS}, "
                          f"got {attn_implementation!r}")
    llm = cfg.llm
    llm.validate()
    common: dict[str, Any] = dict(
        vocab_size=llm.vocab_rows,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_kv_heads,
        head_dim=llm.head_size,
        hidden_act="silu",
        max_position_embeddings=llm.max_position_embeddings,
        rms_norm_eps=llm.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(llm.rope_theta)},
        tie_word_embeddings=llm.tie_word_embeddings,
        attention_dropout=0.0,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=cfg.tokens.im_end,
        attn_implementation=attn_implementation,
    )
    if llm.arch == "qwen2":
        if not llm.attention_bias:
            raise ConfigError(f"{cfg.name}: llm.attention_bias=False is not expressible with Qwen2 (its q/k/v "
                              f"projections always carry a bias); use arch 'llama' or attention_bias=True")
        return Qwen2Config(use_sliding_window=False, **common)
    return LlamaConfig(attention_bias=llm.attention_bias, mlp_bias=False, **common)


def build_llm(cfg: ModelConfig, attn_implementation: str = "eager",
              seed: int | None = None) -> Qwen2ForCausalLM | LlamaForCausalLM:
    """A randomly initialised float32 causal LM of `cfg.llm`, in eval mode. `seed` fixes the init."""
    config = hf_config(cfg, attn_implementation)
    cls = Qwen2ForCausalLM if cfg.llm.arch == "qwen2" else LlamaForCausalLM
    if seed is None:
        model = _randomize_constant_init(cls(config))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _randomize_constant_init(cls(config))
    return model.float().eval()


# transformers initialises biases to 0 and RMSNorm weights to 1; random tiny models perturb them (biases
# ~ N(0, initializer_range), norm weights ~ 1 + N(0, NORM_WEIGHT_JITTER)) so parity tests exercise them.
NORM_WEIGHT_JITTER = 0.1


@torch.no_grad()
def _randomize_constant_init(model: nn.Module) -> nn.Module:
    std = model.config.initializer_range
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.normal_(0.0, std)
        elif name.endswith("norm.weight"):
            param.normal_(1.0, NORM_WEIGHT_JITTER)
    return model


def _key(config_json: dict, key: str, where: str, types: tuple[type, ...]) -> Any:
    if key not in config_json:
        raise ConfigError(f"{where}: missing key {key!r}; the checkpoint's config.json must define it")
    value = config_json[key]
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise ConfigError(f"{where}: key {key!r} expected {'/'.join(t.__name__ for t in types)}, got {value!r}")
    return value


def _rope_theta(config_json: dict, where: str) -> float:
    """rope theta from either the transformers 4 layout (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`)."""
    params = config_json.get("rope_parameters")
    scaling = config_json.get("rope_scaling")
    if isinstance(params, dict):
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", config_json.get("rope_theta"))
        if theta is None:
            raise ConfigError(f"{where}: missing key 'rope_parameters.rope_theta' (or 'rope_theta')")
    else:
        theta = _key(config_json, "rope_theta", where, (int, float))
        rope_type = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
    if rope_type != "default":
        raise ConfigError(f"{where}: rope type {rope_type!r} is not supported (plain 1-D RoPE only); "
                          f"remove the rope scaling or extend export/llm.py")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ConfigError(f"{where}: rope theta expected a number, got {theta!r}")
    return float(theta)


def llm_config_from_hf(config_json: dict, where: str = "config.json") -> LLMConfig:
    """`LLMConfig` from a checkpoint's config.json (a flat Qwen2 / LLaMA-style transformers config).

    The architecture comes from `model_type` ('qwen2', 'illume_qwen2', 'llama', 'illume_llama', ...).
    Qwen2 implies q/k/v biases; LLaMA reads `attention_bias`. `num_key_value_heads` defaults to the
    query heads (transformers' rule), `tie_word_embeddings` to False, `head_dim` to hidden/heads; every
    other field is required and a missing one raises ConfigError naming the key.
    """
    if not isinstance(config_json, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(config_json).__name__}")
    model_type = str(_key(config_json, "model_type", where, (str,)))
    if "qwen2" in model_type:
        arch = "qwen2"
    elif "llama" in model_type:
        arch = "llama"
    else:
        raise ConfigError(f"{where}: model_type {model_type!r} is neither a Qwen2 nor a LLaMA variant")
    act = config_json.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
    if config_json.get("use_sliding_window"):
        raise ConfigError(f"{where}: use_sliding_window=true is not supported (full attention only)")
    if config_json.get("mlp_bias"):
        raise ConfigError(f"{where}: mlp_bias=true is not supported")
    hidden = _key(config_json, "hidden_size", where, (int,))
    num_heads = _key(config_json, "num_attention_heads", where, (int,))
    if num_heads <= 0 or hidden <= 0:
        raise ConfigError(f"{where}: hidden_size {hidden} and num_attention_heads {num_heads} must be positive")
    kv_heads = config_json.get("num_key_value_heads") or num_heads  # transformers: absent/null = MHA
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int):
        raise ConfigError(f"{where}: key 'num_key_value_heads' expected int, got {kv_heads!r}")
    head_dim = config_json.get("head_dim")  # absent/null: hidden_size // num_attention_heads
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int)):
        raise ConfigError(f"{where}: key 'head_dim' expected int, got {head_dim!r}")
    llm = LLMConfig(
        arch=arch,
        num_layers=_key(config_json, "num_hidden_layers", where, (int,)),
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=kv_heads,
        intermediate_size=_key(config_json, "intermediate_size", where, (int,)),
        vocab_rows=_key(config_json, "vocab_size", where, (int,)),
        rope_theta=_rope_theta(config_json, where),
        rms_norm_eps=float(_key(config_json, "rms_norm_eps", where, (int, float))),
        tie_word_embeddings=bool(config_json.get("tie_word_embeddings", False)),
        attention_bias=True if arch == "qwen2" else _key(config_json, "attention_bias", where, (bool,)),
        max_position_embeddings=_key(config_json, "max_position_embeddings", where, (int,)),
        head_dim=None if head_dim in (None, hidden // num_heads) else head_dim,
    )
    llm.validate()
    return llm


# ----------------------------------------------------------------------------------------------------
# Prompt-table splicing
# ----------------------------------------------------------------------------------------------------
def splice_rows(embed_weight: torch.Tensor, input_ids: torch.Tensor, image_embeds: torch.Tensor,
                vocab_rows: int) -> torch.Tensor:
    """[B, S] ids -> [B, S, H] embeddings; ids >= vocab_rows take row `id - vocab_rows` of image_embeds.

    Trace-friendly (no data-dependent checks): the image table gets a zero row in front, so text ids gather
    that row (an empty table still works) and an image id past the table's end is an out-of-range gather.
    """
    is_image = input_ids >= vocab_rows  # [B, S]
    text_ids = torch.where(is_image, torch.zeros_like(input_ids), input_ids)
    # table row 0 is the zero row; image id v + k -> row k + 1
    table_ids = torch.where(is_image, input_ids - (vocab_rows - 1), torch.zeros_like(input_ids))
    zero_row = torch.zeros_like(embed_weight[:1])  # [1, H]
    table = torch.cat([zero_row, image_embeds.to(embed_weight.dtype)], dim=0)  # [N + 1, H]
    text = nn.functional.embedding(text_ids, embed_weight)  # [B, S, H]
    image = nn.functional.embedding(table_ids, table)  # [B, S, H]
    return torch.where(is_image.unsqueeze(-1), image, text)


def splice_embeds(model: Qwen2ForCausalLM | LlamaForCausalLM, input_ids: torch.Tensor,
                  image_embeds: torch.Tensor, vocab_rows: int) -> torch.Tensor:
    """The embeddings the `llm` graph builds: [B, S] ids + [N, H] prompt table -> [B, S, H] (torch)."""
    weight = model.get_input_embeddings().weight
    if weight.shape[0] != vocab_rows:
        raise ConfigError(f"splice_embeds: vocab_rows {vocab_rows} does not match the model's embedding rows "
                          f"{weight.shape[0]}")
    if image_embeds.dim() != 2 or image_embeds.shape[1] != weight.shape[1]:
        raise ValueError(f"splice_embeds: image_embeds expected [N, {weight.shape[1]}], "
                         f"got {list(image_embeds.shape)}")
    n = image_embeds.shape[0]
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_rows + n):
        raise ValueError(f"splice_embeds: input_ids must lie in [0, {vocab_rows + n}) (vocab_rows {vocab_rows} + "
                         f"{n} image rows), got [{int(input_ids.min())}, {int(input_ids.max())}]")
    return splice_rows(weight, input_ids, image_embeds, vocab_rows)


# ----------------------------------------------------------------------------------------------------
# Torch reference step (transformers forward with a DynamicCache)
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_step(model: Qwen2ForCausalLM | LlamaForCausalLM, input_ids: torch.Tensor | None,
                   inputs_embeds: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None,
                   past: DynamicCache | None = None) -> tuple[torch.Tensor, DynamicCache]:
    """One transformers forward: new tokens [B, S] (or their embeddings [B, S, H]) on top of `past`.

    attention_mask [B, P+S] (1 real, 0 left padding) and position_ids [B, S] follow the `llm` graph's
    contract. Returns the final-normed hidden state of the last position [B, H] and the updated cache
    (`past` itself when given, a new DynamicCache otherwise).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("reference_step: pass exactly one of input_ids and inputs_embeds")
    if past is None:
        past = DynamicCache(config=model.config)
    out = model.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                      position_ids=position_ids, cache=past, use_cache=True)
    return out.last_hidden_state[:, -1], out.cache


def cache_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer of a DynamicCache, each [B, kv_heads, P, head_dim]."""
    return [(layer.keys, layer.values) for layer in cache.layers]


# ----------------------------------------------------------------------------------------------------
# The exported step
# ----------------------------------------------------------------------------------------------------
def causal_padding_bias(attention_mask: torch.Tensor, new_len: int | torch.SymInt,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, T] 1/0 mask over past + new keys (left padding) -> additive bias [B, 1, S, T] for the S newest
    queries (the portable graph's attention mask).

    Query i sits at slot T - S + i and may see key slot j iff j <= T - S + i and mask[b, j] == 1. Disallowed
    keys get `dtype`'s most negative finite value (MASK_VALUE for float32).
    """
    total = attention_mask.shape[1]
    key_slot = torch.arange(total, device=attention_mask.device)  # [T]
    new_slot = torch.arange(new_len, device=attention_mask.device)  # [S]
    causal = (key_slot.unsqueeze(0) <= (new_slot + (total - new_len)).unsqueeze(1)).unsqueeze(0)  # [1, S, T]
    allowed = causal & (attention_mask != 0).unsqueeze(1)  # [B, S, T]
    masked = torch.full((), torch.finfo(dtype).min, dtype=dtype)
    bias = torch.where(allowed, torch.zeros((), dtype=dtype), masked)
    return bias.unsqueeze(1)  # [B, 1, S, W]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class FusedLinear(nn.Module):
    """Several Linear layers over the same input as one MatMul (their rows stacked), split by the caller.

    At batch 1 a decode step is a chain of GEMVs bound by memory bandwidth; one [H, q+k+v] or [H, 2F] GEMV
    keeps both cores streaming where three narrow ones (k and v are kv_heads*d wide) leave them idle. The
    originals are re-pointed at views of the stacked weight, so the weights stay held once.
    """

    def __init__(self, *linears: nn.Linear):
        super().__init__()
        weight = torch.cat([lin.weight.detach() for lin in linears])  # [sum(out), in]
        self.sizes = [lin.out_features for lin in linears]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None
        if any(lin.bias is not None for lin in linears):
            bias = torch.cat([lin.bias.detach() if lin.bias is not None else weight.new_zeros(lin.out_features)
                              for lin in linears])
            self.bias = nn.Parameter(bias, requires_grad=False)
        start = 0
        for lin, n in zip(linears, self.sizes):
            lin.weight = nn.Parameter(self.weight.data[start:start + n], requires_grad=False)
            if lin.bias is not None:
                lin.bias = nn.Parameter(self.bias.data[start:start + n], requires_grad=False)
            start += n

    def packed(self, x: torch.Tensor) -> torch.Tensor:
        """The stacked outputs, unsplit: [..., sum(out)]."""
        return nn.functional.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(self.packed(x), self.sizes, dim=-1)


class LLMStep(nn.Module):
    """One LLM forward on explicit tensors: the body of the `llm` ONNX graph.

    forward(input_ids [B,S] int64, image_embeds [N,H] f32, attention_mask [B,T] int64 (T = P+S),
            position_ids [B,S] int64, past ((key, value) per layer))
      -> (last_hidden [B,H], key_0, value_0, key_1, ...), keys/values post-RoPE like transformers' cache.

    graph "portable" (standard ONNX ops): past [B,kvh,P,d] -> present [B,kvh,P+S,d] (the "concat" KV layout).
    graph "fused" (onnxruntime contrib ops, export/fused_ops.py): past and present are one buffer of
    capacity C, [B,kvh,C,d], and rows are **right-padded**: row b holds its T_b tokens at slots [0, T_b),
    T_b - 1 being the last 1 in its attention_mask row, which may be [B,W] (W = the longest row) or span the
    capacity, [B,C] (zeros past each row's end: a decode step with static shapes). The step writes each
    row's new tokens at its own slots [T_b - S, T_b) (the "shared" KV layout; on the first prompt every row
    starts at slot 0, a short row padded at its end) and returns each row's last real position. RoPE rotates
    by cache slot, which is the position in this layout; the graph keeps position_ids, unused.
    """

    def __init__(self, model: Qwen2ForCausalLM | LlamaForCausalLM, cfg: ModelConfig, graph: str = "portable"):
        super().__init__()
        if graph not in LLM_GRAPHS:
            raise ConfigError(f"LLMStep: graph expected one of {LLM_GRAPHS}, got {graph!r}")
        if graph == "fused" and cfg.llm.head_size % GQA_HEAD_MULTIPLE:
            raise ConfigError(f"{cfg.name}: the fused llm graph needs head_dim % {GQA_HEAD_MULTIPLE} == 0 "
                              f"(onnxruntime's GroupQueryAttention), got {cfg.llm.head_size}; export with "
                              f"--llm-graph portable")
        self.graph = graph
        self.model = model.eval()
        self.vocab_rows = cfg.llm.vocab_rows
        self.num_heads = cfg.llm.num_heads
        self.num_kv_heads = cfg.llm.num_kv_heads
        self.head_dim = cfg.llm.head_size
        self.scale = self.head_dim ** -0.5
        rotary = model.model.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.rope_scaling = float(rotary.attention_scaling)
        if model.get_input_embeddings().weight.shape[0] != self.vocab_rows:
            raise ConfigError(f"LLMStep: model has {model.get_input_embeddings().weight.shape[0]} embedding rows, "
                              f"cfg.llm.vocab_rows is {self.vocab_rows}")
        layers = model.model.layers
        self.qkv = nn.ModuleList(FusedLinear(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj)
                                 for l in layers)
        if graph == "portable":  # gate|up stacked; the fused graph keeps them apart (forward_fused)
            self.gate_up = nn.ModuleList(FusedLinear(l.mlp.gate_proj, l.mlp.up_proj) for l in layers)
        if graph == "fused":  # RoPE tables for every position, [max_positions, d/2], as RotaryEmbedding takes
            freqs = torch.arange(cfg.llm.max_position_embeddings).float().unsqueeze(1) * self.inv_freq
            self.register_buffer("cos_cache", freqs.cos() * self.rope_scaling)
            self.register_buffer("sin_cache", freqs.sin() * self.rope_scaling)

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S] positions -> cos, sin [B, 1, S, d] (broadcast over heads)."""
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq  # [B, S, d/2]
        angles = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)  # [B, 1, S, d]
        return angles.cos() * self.rope_scaling, angles.sin() * self.rope_scaling

    def attention(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  bias: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor):
        attn = self.model.model.layers[i].self_attn
        b, s, _ = x.shape
        kvh, d = self.num_kv_heads, self.head_dim
        group = self.num_heads // kvh
        q, k, v = self.qkv[i](x)  # one MatMul for the three projections
        q = q.view(b, s, self.num_heads, d).transpose(1, 2)  # [B, h, S, d]
        k = k.view(b, s, kvh, d).transpose(1, 2)  # [B, kvh, S, d]
        v = v.view(b, s, kvh, d).transpose(1, 2)  # [B, kvh, S, d]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        key = torch.cat([past_key, k], dim=2)  # [B, kvh, T, d]
        value = torch.cat([past_value, v], dim=2)  # [B, kvh, T, d]
        # Grouped-query attention without repeating K/V: the `group` query heads sharing one KV head are
        # stacked along the query axis. [B, h, S, d] -> [B, kvh, group*S, d]
        qg = q.reshape(b, kvh, group * s, d)
        scores = torch.matmul(qg, key.transpose(2, 3)) * self.scale  # [B, kvh, group*S, T]
        scores = scores.view(b, self.num_heads, s, -1) + bias  # [B, h, S, T]
        probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)  # fp32 softmax, then the model's dtype
        ctx = torch.matmul(probs.view(b, kvh, group * s, -1), value)  # [B, kvh, group*S, d]
        ctx = ctx.view(b, self.num_heads, s, d).transpose(1, 2).reshape(b, s, self.num_heads * d)  # [B, S, h*d]
        return attn.o_proj(ctx), key, value

    def forward(self, input_ids: torch.Tensor, image_embeds: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past: tuple[tuple[torch.Tensor, torch.Tensor], ...]):
        if self.graph == "fused":
            return self.forward_fused(input_ids, image_embeds, attention_mask, position_ids, past)
        inner = self.model.model
        x = splice_rows(inner.embed_tokens.weight, input_ids, image_embeds, self.vocab_rows)  # [B, S, H]
        bias = causal_padding_bias(attention_mask, input_ids.shape[1])  # [B, 1, S, T]
        cos, sin = (t.to(x.dtype) for t in self.rope(position_ids))  # fp32 angles, model-dtype tables
        presents: list[torch.Tensor] = []
        for i, (layer, (past_key, past_value)) in enumerate(zip(inner.layers, past)):
            h, key, value = self.attention(i, layer.input_layernorm(x), cos, sin, bias, past_key, past_value)
            x = x + h
            gate, up = self.gate_up[i](layer.post_attention_layernorm(x))  # one MatMul for gate and up
            x = x + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
            presents += [key, value]
        last = inner.norm(x[:, -1])  # [B, H]
        return (last, *presents)

    def forward_fused(self, input_ids: torch.Tensor, image_embeds: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor, past: tuple[tuple[torch.Tensor, torch.Tensor], ...]):
        """The same step through the contrib-op custom ops (export/fused_ops.py), shared KV layout; RoPE at the
        cache slots (position_ids unused, see the class docstring)."""
        from .fused_ops import gqa, gqa_lengths, rms_norm, skip_rms_norm

        inner = self.model.model
        x = splice_rows(inner.embed_tokens.weight, input_ids, image_embeds, self.vocab_rows)  # [B, S, H]
        seqlens, total = gqa_lengths(attention_mask)  # right-padded rows; the mask may span the cache (fused_ops.py)
        cos, sin = self.cos_cache.to(x.dtype), self.sin_cache.to(x.dtype)
        eps = float(inner.norm.variance_epsilon)
        presents: list[torch.Tensor] = []
        residual, branch = x, None  # the residual stream, and the last sublayer's output not yet added to it
        for i, (layer, (past_key, past_value)) in enumerate(zip(inner.layers, past)):
            if branch is None:
                h = rms_norm(residual, layer.input_layernorm.weight, eps)
            else:
                h, residual = skip_rms_norm(branch, residual, layer.input_layernorm.weight, eps)
            qkv = self.qkv[i].packed(h)  # [B, S, (h + 2*kvh)*d]: one MatMul, RoPE'd inside the kernel
            ctx, key, value = gqa(qkv, past_key, past_value, seqlens, total, cos, sin, self.num_heads,
                                  self.num_kv_heads, self.scale)
            h, residual = skip_rms_norm(layer.self_attn.o_proj(ctx), residual,
                                        layer.post_attention_layernorm.weight, eps)
            # gate and up as two MatMuls, as onnxruntime-genai's graphs have them: the stacked form and its
            # Split over [B, S, 2F] measured slower (int4 decode 17.6 -> 15.9 ms/token on the 0.5B bench,
            # interleaved A/B; fp32 the same within the spread; docs/performance.md)
            mlp = layer.mlp
            branch = mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
            presents += [key, value]
        # each row's last real position: S - 1, or its own end in a right-padded first prompt (T_b - 1 < S - 1).
        # S - 1 as the last of the step's slot numbers, on the device (fused_ops.gqa_lengths: no host scalar
        # may meet device data in a graph captured as a CUDA graph)
        last_slot = torch.arange(input_ids.shape[1], device=input_ids.device)[-1]  # [] = S - 1
        at = torch.minimum(seqlens.long(), last_slot)  # [B]
        rows = torch.arange(at.shape[0], device=at.device)
        last, _ = skip_rms_norm(branch[rows, at], residual[rows, at], inner.norm.weight, eps)  # [B, H]
        return (last, *presents)
