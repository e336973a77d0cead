"""Build a tokenizer whose ids equal the ILLUME+ release layout (torch-free: uses only `tokenizers`).

Tests and tiny checkpoints need a real ``tokenizer.json`` but cannot download Qwen's. This builds one with
the same *id layout* as the extended Qwen2.5 tokenizer of the release:

- ids ``[0, endoftext)``: a byte-level BPE base vocabulary. Ids 0..255 are the 256 byte symbols (GPT-2's
  byte-to-unicode order, as in Qwen's vocabulary); then, if ``base_words`` is given, each word and the
  intermediate pieces its merges need (so a word-level model can use real words at low ids); the rest are
  filler entries that no merge produces, so they can never be emitted by encoding.
- ids ``[endoftext, text_vocab_size)``: Qwen2.5's special tokens at their real ids (``<|endoftext|>``
  151643, ``<|im_start|>`` 151644, ``<|im_end|>`` 151645, ... ``<|file_sep|>`` 151664).
- then the ILLUME structural tokens (``cfg.tokens.structural_names``) and the code tokens
  ``<|image_level{L}_{i}|>`` at ``cfg.levels[L].first_token_id + i``: added as *plain* (non-special,
  normalized) added tokens, which is what ``tokenizer.add_tokens([...])`` does in
  ``prepare_llm_with_extended_vision_tokenizer.py``.

``build_tokenizer`` checks that the length equals ``cfg.tokenizer_len`` and that every added token
encodes to exactly its own id (one encode of all of them: ~1 s for the release's 131k added tokens, whose
construction takes ~1.2 s; the tiny presets' ~2k take milliseconds).

Normalizer (NFC), pre-tokenizer (Qwen2's split regex + byte level), decoder and post-processor follow the
Qwen2 ``tokenizer.json``. ``save_tokenizer_files`` writes a ``save_pretrained``-like folder:
tokenizer.json, tokenizer_config.json (chat template, eos ``<|im_end|>``, pad ``<|endoftext|>``, padding
side left) and special_tokens_map.json.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..config import ModelConfig

# Qwen2.5's special tokens, in id order from <|endoftext|>; the flag is their `special` attribute.
QWEN25_SPECIALS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True),
    ("<|vision_end|>", True), ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)

# Qwen2's pre-tokenizer split pattern (contractions, letters, single digits, punctuation runs, newlines,
# whitespace).
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+")

FILLER_FORMAT = "<|illume_edge_filler_{}|>"


def code_token_name(level: int, index: int) -> str:
    return f"<|image_level{level}_{index}|>"


@functools.lru_cache(maxsize=1)
def _byte_table() -> tuple[tuple[int, ...], dict[int, str]]:
    """(bytes in id order, byte -> symbol): printable Latin-1 bytes map to themselves and come first; the
    others map to U+0100 upwards in byte order (the GPT-2 / Qwen byte-level convention)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in set(printable)]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(rest)})
    return tuple(printable + rest), table


def byte_symbols() -> list[str]:
    """The 256 byte-level symbols in id order (ids 0..255 of the base vocabulary)."""
    order, table = _byte_table()
    return [table[b] for b in order]


def _to_byte_level(text: str) -> str:
    table = _byte_table()[1]
    return "".join(table[b] for b in text.encode("utf-8"))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: repeatedly merge the adjacent pair of lowest rank."""
    pieces = list(symbols)
    while len(pieces) > 1:
        best, at = None, -1
        for i in range(len(pieces) - 1):
            r = ranks.get((pieces[i], pieces[i + 1]))
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        pair = (pieces[at], pieces[at + 1])
        out, i = [], 0
        while i < len(pieces):
            if i < len(pieces) - 1 and (pieces[i], pieces[i + 1]) == pair:
                out.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                out.append(pieces[i])
                i += 1
        pieces = out
    return pieces


def _base_vocab(base_words: Sequence[str] | None, size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = {s: i for i, s in enumerate(byte_symbols())}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in base_words or ():
        if not isinstance(word, str) or not word:
            raise ValueError(f"base_words: expected non-empty strings, got {word!r}")
        pieces = _bpe(list(_to_byte_level(word)), ranks)
        # Each new merge has the lowest priority so far, so words added earlier keep encoding to themselves.
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = _bpe(pieces, ranks)
    if len(vocab) > size:
        raise ValueError(f"base_words: {len(base_words or ())} words need {len(vocab)} base ids, more than the "
                         f"{size} ids below <|endoftext|>; pass fewer words")
    for i in range(len(vocab), size):
        vocab[FILLER_FORMAT.format(i)] = i
    return vocab, merges


def build_tokenizer(cfg: ModelConfig, base_words: list[str] | None = None) -> Tokenizer:
    """A `tokenizers.Tokenizer` with the ILLUME+ id layout for ``cfg`` (see the module docstring).

    ``base_words`` (optional): strings that must each encode to ONE token, placed at low ids. Each must be a
    single pre-token of Qwen2's split regex (e.g. ``"cat"`` or ``" cat"``, not ``"two words"``).
    """
    t = cfg.tokens
    if (t.im_start, t.im_end) != (t.endoftext + 1, t.endoftext + 2):
        raise ValueError(f"tokens: Qwen layout needs im_start = endoftext + 1 and im_end = endoftext + 2, got "
                         f"endoftext={t.endoftext}, im_start={t.im_start}, im_end={t.im_end}")
    n_special = len(QWEN25_SPECIALS)
    if t.endoftext + n_special > t.text_vocab_size:
        raise ValueError(f"tokens: the {n_special} Qwen2.5 special tokens from endoftext={t.endoftext} overrun "
                         f"text_vocab_size={t.text_vocab_size}")
    vocab, merges = _base_vocab(base_words, t.endoftext)
    bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                     end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)

    # Specials (Qwen's own; padded with inert specials should text_vocab_size leave a gap).
    specials = list(QWEN25_SPECIALS)
    specials += [(FILLER_FORMAT.format(i), True) for i in range(t.endoftext + n_special, t.text_vocab_size)]
    tok.add_tokens([AddedToken(name, single_word=False, lstrip=False, rstrip=False, normalized=False,
                               special=special) for name, special in specials])

    # ILLUME's additions: plain added tokens, as transformers' `add_tokens([...])` makes them.
    def plain(name: str) -> AddedToken:
        return AddedToken(name, single_word=False, lstrip=False, rstrip=False, normalized=True, special=False)

    structural = t.structural_names(cfg.num_levels)
    _expect_next(tok, structural[0][1], structural[0][0])
    tok.add_tokens([plain(name) for name, _ in structural])
    for lv, level in enumerate(cfg.levels):
        _expect_next(tok, level.first_token_id, code_token_name(lv, 0))
        tok.add_tokens([plain(code_token_name(lv, i)) for i in range(level.codebook_size)])

    _verify(tok, cfg)
    for word in base_words or ():
        ids = tok.encode(word, add_special_tokens=False).ids
        if len(ids) != 1:
            raise ValueError(f"base_words: {word!r} encodes to {len(ids)} tokens {ids}, not one; Qwen2's "
                             f"pre-tokenizer splits it (use single words, optionally with one leading space)")
    return tok


def _expect_next(tok: Tokenizer, want: int, name: str) -> None:
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != want:
        raise ValueError(f"tokens: {name} would get id {got}, but the config puts it at {want}; the config's "
                         f"ids must be contiguous (specials, structural tokens, then each level's codes)")


def _verify(tok: Tokenizer, cfg: ModelConfig) -> None:
    t = cfg.tokens
    n = tok.get_vocab_size(with_added_tokens=True)
    if n != cfg.tokenizer_len:
        raise ValueError(f"tokenizer: length {n} != cfg.tokenizer_len {cfg.tokenizer_len}")
    checks = [("<|endoftext|>", t.endoftext), ("<|im_start|>", t.im_start), ("<|im_end|>", t.im_end)]
    checks += t.structural_names(cfg.num_levels)
    for lv, level in enumerate(cfg.levels):
        checks += [(code_token_name(lv, 0), level.first_token_id),
                   (code_token_name(lv, level.codebook_size - 1), level.first_token_id + level.codebook_size - 1)]
    for name, want in checks:
        got = tok.token_to_id(name)
        if got != want:
            raise ValueError(f"tokenizer: {name} has id {got}, expected {want}")
    # Every added token, encoded in one pass (about 1 s for the release's 131k tokens), gives its own id.
    added = sorted(tok.get_added_tokens_decoder().items())
    got_ids = tok.encode("".join(a.content for _, a in added), add_special_tokens=False).ids
    want_ids = [i for i, _ in added]
    if got_ids != want_ids:
        k = next((j for j, (a, b) in enumerate(zip(got_ids, want_ids)) if a != b), min(len(got_ids), len(want_ids)))
        raise ValueError(f"tokenizer: added tokens do not encode to their own ids; first mismatch at added token "
                         f"{k} ({added[min(k, len(added) - 1)][1].content!r})")


# ----------------------------------------------------------------------------------------------------
# save_pretrained-like folder
# ----------------------------------------------------------------------------------------------------
def _jinja_literal(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is also a valid Jinja string literal


def chat_template(cfg: ModelConfig) -> str:
    """A Jinja chat template rendering ``cfg.prompts`` (a system turn with the default system message
    unless the conversation starts with one; ``add_generation_prompt`` appends the assistant header)."""
    p = cfg.prompts
    head, rest = p.turn.split("{role}")
    mid, tail = rest.split("{content}")
    lit = _jinja_literal
    system = ""
    if p.system:
        system = ("{%- if messages[0]['role'] != 'system' -%}"
                  f"{{{{- {lit(head + 'system' + mid + p.system + tail)} -}}}}"
                  "{%- endif -%}")
    return (system +
            "{%- for message in messages -%}"
            f"{{{{- {lit(head)} + message['role'] + {lit(mid)} + message['content'] + {lit(tail)} -}}}}"
            "{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{- {lit(p.assistant_header)} -}}}}{{%- endif -%}}")


def _added_entry(content: str, special: bool, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": special}


def save_tokenizer_files(cfg: ModelConfig, out_dir: str | os.PathLike,
                         base_words: list[str] | None = None) -> Tokenizer:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(cfg, base_words)
    tok.save(str(out / "tokenizer.json"))
    decoder = {str(i): _added_entry(tok.id_to_token(i), special=bool(at.special), normalized=bool(at.normalized))
               for i, at in sorted(tok.get_added_tokens_decoder().items())}
    additional = [name for name, special in QWEN25_SPECIALS[1:14] if special]
    eos = tok.id_to_token(cfg.tokens.im_end)
    pad = tok.id_to_token(cfg.tokens.endoftext)
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": additional,
        "bos_token": None,
        "chat_template": chat_template(cfg),
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "errors": "replace",
        "model_max_length": cfg.llm.max_position_embeddings,
        "pad_token": pad,
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {
        "additional_special_tokens": additional,
        "eos_token": {k: v for k, v in _added_entry(eos, True, False).items() if k != "special"},
        "pad_token": {k: v for k, v in _added_entry(pad, True, False).items() if k != "special"},
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return tok
