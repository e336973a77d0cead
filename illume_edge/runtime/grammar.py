"""The image-token grammar: which token may come next while the LLM writes (or reads) one image.

Layout of one image sequence over N levels (spec/illume.md, "Image sequence layout")::

    SOI  SOL0 (c0 x w0, EOL) x h0 EOL0  SOL1 (c1 x w1, EOL) x h1 EOL1 ...  EOI

with each level's grid ``(h_l, w_l) = cfg.level_grid(l, height, width)``: all of level 0's rows, then all of
level 1's, every row closed by ``<end_of_line>``. So each step is either ONE forced structural token or a
sample from exactly ONE contiguous code range (the level's codebook), which is what :class:`ImageGrammar`
returns. The reference's ``InterleavedLogitsProcessor`` enforces the same sequence by masking logits.

``<start_of_image>`` is the grammar's first token and it is *forced*: the prompts end with the resolution
tags (see prompts.py) and the loop feeds SOI without computing a head, as the reference demo does (its
``generation_eval`` path instead lets text mode sample SOI; the tags make it the overwhelming choice).

Text mode (understanding answers, or text around an image) must never emit codes, level tags or
``<end_of_line>``: :func:`text_banned_ranges` and :func:`mask_text_logits`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..config import ModelConfig


class GrammarError(ValueError):
    """A token that the image grammar does not allow at this position."""


@dataclass(frozen=True)
class Forced:
    """The next token is fixed: feed ``token_id`` (no head, no sampling)."""
    token_id: int


@dataclass(frozen=True)
class Sample:
    """The next token is a code of ``level``: sample from the contiguous ids ``[start, stop)``."""
    level: int
    start: int
    stop: int


@dataclass(frozen=True)
class _Segment:
    level: int
    offset: int  # position of <start_of_level{level}> in the sequence
    rows: int
    cols: int
    start: int  # first code id of the level
    stop: int


def _layout(cfg: ModelConfig, height: int, width: int) -> tuple[list[_Segment], int]:
    segs = []
    pos = 1  # after SOI
    for lv in range(cfg.num_levels):
        rows, cols = cfg.level_grid(lv, height, width)
        if rows < 1 or cols < 1:
            raise ValueError(f"image {height}x{width}: level {lv} has an empty code grid {rows}x{cols}; "
                             f"use a larger resolution (an anchor: {list(cfg.anchors)})")
        start, stop = cfg.levels[lv].token_range
        segs.append(_Segment(lv, pos, rows, cols, start, stop))
        pos += 2 + rows * (cols + 1)
    return segs, pos + 1  # + EOI


def _token_name(cfg: ModelConfig, token_id: int) -> str:
    t = cfg.tokens
    for name, i in t.structural_names(cfg.num_levels):
        if i == token_id:
            return name
    for lv, level in enumerate(cfg.levels):
        a, b = level.token_range
        if a <= token_id < b:
            return f"<|image_level{lv}_{token_id - a}|>"
    special = {t.endoftext: "<|endoftext|>", t.im_start: "<|im_start|>", t.im_end: "<|im_end|>"}
    if token_id in special:
        return special[token_id]
    return "a text token" if 0 <= token_id < t.text_vocab_size else "not a token of this vocabulary"


class ImageGrammar:
    """State machine over one image sequence of an LLM-side resolution ``(height, width)``.

    ``next()`` -> :class:`Forced` or :class:`Sample`; ``advance(token_id)`` checks and consumes a token;
    ``forced_run()`` lists the forced tokens from here up to the next sample (feed them in one step);
    ``done`` once EOI was consumed. The sampled codes are collected per level (``codes()``).
    """

    def __init__(self, cfg: ModelConfig, height: int, width: int):
        self.cfg = cfg
        self.height, self.width = int(height), int(width)
        self._segs, self.length = _layout(cfg, self.height, self.width)
        if self.length != cfg.image_token_count(self.height, self.width):
            raise AssertionError("grammar layout disagrees with cfg.image_token_count")  # config bug
        self.pos = 0  # tokens consumed so far
        self._codes = [np.zeros((s.rows, s.cols), dtype=np.int64) for s in self._segs]

    # --- what comes at a position ------------------------------------------------------------------
    def _expect(self, pos: int) -> Forced | Sample:
        t = self.cfg.tokens
        if pos == 0:
            return Forced(t.start_of_image)
        if pos == self.length - 1:
            return Forced(t.end_of_image)
        for s in self._segs:
            rel = pos - s.offset
            body = s.rows * (s.cols + 1)
            if rel == 0:
                return Forced(t.level_start(s.level))
            if 1 <= rel <= body:
                col = (rel - 1) % (s.cols + 1)
                return Forced(t.end_of_line) if col == s.cols else Sample(s.level, s.start, s.stop)
            if rel == body + 1:
                return Forced(t.level_end(s.level))
        raise AssertionError(f"position {pos} is outside the layout")  # unreachable

    def _where(self, pos: int) -> str:
        for s in self._segs:
            rel = pos - s.offset - 1
            if 0 <= rel < s.rows * (s.cols + 1):
                return f"level {s.level}, row {rel // (s.cols + 1)}, column {rel % (s.cols + 1)}"
        return "structure"

    # --- public API ---------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.pos >= self.length

    @property
    def remaining(self) -> int:
        return self.length - self.pos

    def next(self) -> Forced | Sample:
        if self.done:
            raise GrammarError(f"image grammar {self.height}x{self.width}: the image is complete "
                               f"({self.length} tokens); nothing comes next")
        return self._expect(self.pos)

    def peek(self, ahead: int = 1) -> Forced | Sample | None:
        """What comes `ahead` positions after the next one (`peek(0)` is `next()`), None past the end. Every
        position's kind is fixed by the layout, whatever the tokens before it, so a loop may queue the step at
        `pos + 1` before it knows the token at `pos`."""
        pos = self.pos + int(ahead)
        return self._expect(pos) if 0 <= pos < self.length else None

    def advance(self, token_id: int) -> None:
        """Consume ``token_id``; raises :class:`GrammarError` naming the position if it is not allowed."""
        token_id = int(token_id)
        exp = self.next()
        if isinstance(exp, Forced):
            if token_id != exp.token_id:
                raise GrammarError(
                    f"image token {self.pos} of {self.length} ({self._where(self.pos)}): expected "
                    f"{_token_name(self.cfg, exp.token_id)} ({exp.token_id}), got {token_id} "
                    f"({_token_name(self.cfg, token_id)})")
        else:
            if not exp.start <= token_id < exp.stop:
                raise GrammarError(
                    f"image token {self.pos} of {self.length} ({self._where(self.pos)}): expected a level-"
                    f"{exp.level} code in [{exp.start}, {exp.stop}), got {token_id} "
                    f"({_token_name(self.cfg, token_id)})")
            s = self._segs[exp.level]
            rel = self.pos - s.offset - 1
            self._codes[exp.level][rel // (s.cols + 1), rel % (s.cols + 1)] = token_id - exp.start
        self.pos += 1

    def forced_run(self) -> list[int]:
        """The forced tokens from the current position up to (not including) the next sample or the end.
        Empty when the next token is sampled. Does not advance."""
        out = []
        pos = self.pos
        while pos < self.length:
            exp = self._expect(pos)
            if not isinstance(exp, Forced):
                break
            out.append(exp.token_id)
            pos += 1
        return out

    def progress(self) -> tuple[int, int]:
        """(tokens consumed, total tokens) of this image."""
        return self.pos, self.length

    def codes(self) -> list[np.ndarray]:
        """Per level, int64 ``[h_l, w_l]`` code indices (within the level's codebook); complete once ``done``."""
        if not self.done:
            raise GrammarError(f"image grammar: codes requested after {self.pos} of {self.length} tokens; "
                               f"finish the image first")
        return [c.copy() for c in self._codes]


# ----------------------------------------------------------------------------------------------------
# Whole sequences
# ----------------------------------------------------------------------------------------------------
def image_token_sequence(cfg: ModelConfig, height: int, width: int,
                         codes_per_level: Sequence[np.ndarray]) -> list[int]:
    """The full id sequence (SOI ... EOI) of an image whose level ``l`` codes are ``codes_per_level[l]``
    (indices within the level's codebook, shape ``[h_l, w_l]`` or flat ``h_l * w_l`` in row-major order)."""
    g = ImageGrammar(cfg, height, width)
    if len(codes_per_level) != cfg.num_levels:
        raise ValueError(f"codes_per_level: expected {cfg.num_levels} arrays (one per level), got "
                         f"{len(codes_per_level)}")
    flat = []
    for lv, c in enumerate(codes_per_level):
        s = g._segs[lv]
        a = np.asarray(c)
        if a.size != s.rows * s.cols or (a.ndim == 2 and a.shape != (s.rows, s.cols)) or a.ndim > 2:
            raise ValueError(f"codes_per_level[{lv}]: expected shape ({s.rows}, {s.cols}) for {height}x{width}, "
                             f"got {a.shape}")
        a = a.reshape(-1).astype(np.int64)
        n = cfg.levels[lv].codebook_size
        if a.size and (a.min() < 0 or a.max() >= n):
            bad = int(np.flatnonzero((a < 0) | (a >= n))[0])
            raise ValueError(f"codes_per_level[{lv}]: code {int(a[bad])} at flat index {bad} is outside the "
                             f"level's codebook [0, {n})")
        flat.append(iter((a + s.start).tolist()))
    out = []
    while not g.done:
        exp = g.next()
        tok = exp.token_id if isinstance(exp, Forced) else next(flat[exp.level])
        g.advance(tok)
        out.append(tok)
    return out


def parse_image_tokens(cfg: ModelConfig, ids: Sequence[int] | np.ndarray, height: int,
                       width: int) -> list[np.ndarray]:
    """Validate a full image id sequence (SOI ... EOI) and return, per level, int64 ``[h_l, w_l]`` code
    indices within the level's codebook. Errors name the offending position."""
    seq = np.asarray(ids).reshape(-1)
    g = ImageGrammar(cfg, height, width)
    if seq.size != g.length:
        raise GrammarError(f"image sequence for {height}x{width}: expected {g.length} tokens, got {seq.size}")
    for tok in seq.tolist():
        g.advance(tok)
    return g.codes()


# ----------------------------------------------------------------------------------------------------
# Text mode
# ----------------------------------------------------------------------------------------------------
def text_banned_ranges(cfg: ModelConfig) -> list[tuple[int, int]]:
    """Sorted, merged ``[start, stop)`` id ranges that text decoding must never emit: ``<end_of_line>``,
    every level's start/end tags, every code, and the dead LM-head rows ``>= tokenizer_len``.
    (``<start_of_image>`` / ``<end_of_image>`` and the resolution tags stay allowed, as in the reference.)"""
    t = cfg.tokens
    raw = [(t.end_of_line, t.end_of_line + 1)]
    raw += [(t.level_start(lv), t.level_end(lv) + 1) for lv in range(cfg.num_levels)]
    raw += [lv.token_range for lv in cfg.levels]
    if cfg.tokenizer_len < cfg.llm.vocab_rows:
        raw.append((cfg.tokenizer_len, cfg.llm.vocab_rows))
    merged: list[tuple[int, int]] = []
    for a, b in sorted(raw):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def ban_ranges(logits: np.ndarray, ranges: Sequence[tuple[int, int]], range_start: int = 0) -> np.ndarray:
    """A float32 copy of ``logits [rows, V]`` (ids ``[range_start, range_start + V)``) with every id of the
    global ``[start, stop)`` ``ranges`` set to ``-inf`` (the sampling kernel's stage 1b does the same on the
    device)."""
    x = np.asarray(logits)
    if x.ndim != 2:
        raise ValueError(f"logits: expected shape [rows, V], got {x.shape}")
    out = x.astype(np.float32, copy=True)
    stop = range_start + x.shape[1]
    for a, b in ranges:
        lo, hi = max(a, range_start), min(b, stop)
        if lo < hi:
            out[:, lo - range_start:hi - range_start] = -np.inf
    return out


def mask_text_logits(logits_text_range: np.ndarray, cfg: ModelConfig, range_start: int = 0) -> np.ndarray:
    """A copy of text-head logits ``[rows, V]`` (ids ``[range_start, range_start + V)``, by default the
    ``text`` head range of ``cfg.head_ranges()``) with every banned id set to ``-inf``."""
    return ban_ranges(logits_text_range, text_banned_ranges(cfg), range_start)
