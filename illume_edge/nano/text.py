"""The nano tokenizer's word list: every pre-token the world's texts and the prompt templates produce.

The tokenizer keeps the release's id layout (tokenizer_factory): byte-level BPE below ``<|endoftext|>``, so
any text still encodes. Passing these words as ``base_words`` makes each of them ONE token at a low id, which
is the word-level vocabulary the nano LLM is trained on.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
from tokenizers import Regex, pre_tokenizers

from ..config import ModelConfig
from ..export.tokenizer_factory import QWEN2_SPLIT_PATTERN
from ..runtime.prompts import chat_text, resolution_tags
from . import world

_SPLIT = pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False)


def template_texts(cfg: ModelConfig) -> list[str]:
    """The fixed text of every task prompt, rendered through the chat template."""
    p = cfg.prompts
    h, w = resolution_tags(cfg, *cfg.anchors[0])
    messages = [p.understand.format(question="x"), p.generate.format(h=h, w=w, caption="x"),
                p.generate_uncond.format(h=h, w=w), p.edit.format(h=h, w=w, instruction="x"),
                p.edit_uncond.format(h=h, w=w), p.assess.format(caption="x")]
    return [chat_text(cfg, m.replace(p.image_placeholder, " ")) for m in messages]


def base_words(cfg: ModelConfig, n_corpus: int = 4000, seed: int = 0) -> list[str]:
    """Pre-tokens of the templates and of a corpus covering every world template, most frequent first."""
    texts = template_texts(cfg) + world.text_corpus(np.random.default_rng(seed), world.WorldConfig(), n_corpus)
    texts += [f" {w}" for w in world.vocabulary()] + list(world.vocabulary())
    counts: Counter[str] = Counter()
    for text in texts:
        for special in ("<|im_start|>", "<|im_end|>"):
            text = text.replace(special, "\n")
        counts.update(piece for piece, _ in _SPLIT.pre_tokenize_str(text))
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if not w.startswith("<")]
