"""Text tokenizer wrapper and the ILLUME prompts (torch-free).

Prompts follow the reference (``ILLUME/generation_eval/models/illume.py``, ``ILLUME/app.py``): the Qwen chat
template with its system turn (``conversation.py``'s ``conv_qwen2``), the task text of ``cfg.prompts``, and
for image outputs the resolution tags ``<height_H><width_W>`` appended after the assistant header. The
image-start token is NOT part of the prompt: it is the first token of :class:`~.grammar.ImageGrammar`
(forced), and the unconditional branch receives it like every later image token.

``<image>`` in a message becomes an :class:`ImageSlot`; the reference splits the prompt string on it and
tokenizes the pieces separately (``tokenizer_image_token``), and so do we, so token boundaries match. The
pipeline replaces each slot with that image's input sequence (:func:`image_input_layout`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer

from ..config import ModelConfig

IMAGE_MARKER = -200  # stands for an image in a flat id list (the reference's IMAGE_TOKEN_INDEX)


# ----------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------
class TextTokenizer:
    """``tokenizers.Tokenizer`` plus the model config: encode plain text, decode model output as text."""

    def __init__(self, tokenizer: Tokenizer, cfg: ModelConfig, source: str = "tokenizer"):
        self.tok = tokenizer
        self.cfg = cfg
        self._check(source)

    @classmethod
    def from_file(cls, tokenizer_json_path: str | os.PathLike, cfg: ModelConfig) -> "TextTokenizer":
        path = os.fspath(tokenizer_json_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer: {path} does not exist (expected the model's tokenizer.json)")
        return cls(Tokenizer.from_file(path), cfg, source=path)

    def _check(self, source: str) -> None:
        t, cfg = self.cfg.tokens, self.cfg
        n = self.tok.get_vocab_size(with_added_tokens=True)
        if n != cfg.tokenizer_len:
            raise ValueError(f"{source}: {n} tokens, but config {cfg.name!r} expects tokenizer_len "
                             f"{cfg.tokenizer_len}; use the tokenizer of this model")
        want = [("<|im_start|>", t.im_start), ("<|im_end|>", t.im_end)] + t.structural_names(cfg.num_levels)
        for lv, level in enumerate(cfg.levels):
            want.append((f"<|image_level{lv}_0|>", level.first_token_id))
        for name, i in want:
            got = self.tok.token_to_id(name)
            if got != i:
                raise ValueError(f"{source}: token {name} has id {got}, config {cfg.name!r} expects {i}")

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """The id of one exact token string (e.g. ``"<height_256>"``)."""
        i = self.tok.token_to_id(token)
        if i is None:
            raise KeyError(f"tokenizer: no token {token!r}")
        return i

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without any added BOS/EOS (special-token strings in it do become their ids)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def is_text(self, token_id: int, skip_special: bool = True) -> bool:
        """Whether ``decode`` shows this id: base tokens, and Qwen's specials unless ``skip_special``."""
        t = self.cfg.tokens
        if token_id < 0 or token_id >= t.text_vocab_size:
            return False  # structural tokens, codes, dead LM-head rows
        return not (skip_special and token_id >= t.endoftext)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``; structural tokens, codes and dead rows are always dropped, Qwen's special tokens
        (``<|im_end|>`` ...) unless ``skip_special`` is False."""
        keep = [int(i) for i in ids if self.is_text(int(i), skip_special)]
        return self.tok.decode(keep, skip_special_tokens=False)

    def stream(self, skip_special: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)


class StreamDecoder:
    """Incremental decoding: ``push(id)`` returns the new text (possibly ""), never a broken character.

    A byte-level token can end in the middle of a multi-byte UTF-8 character; the decoded text then ends in
    U+FFFD and is held back until the character completes (at most 3 more tokens: after that the bytes are
    really invalid and are emitted as U+FFFD). ``flush()`` returns whatever is still held back.
    """

    _MAX_PENDING = 4  # a UTF-8 character has at most 4 bytes, each token carries at least one

    def __init__(self, tokenizer: TextTokenizer, skip_special: bool = True):
        self._tok = tokenizer
        self._skip_special = skip_special
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window re-decoded each time
        self._read = 0  # ids before this were already emitted

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if not self._tok.is_text(token_id, self._skip_special):
            return ""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True) if self._read < len(self._ids) else ""

    def _emit(self, final: bool) -> str:
        decode = self._tok.tok.decode
        text = decode(self._ids[self._prefix:], skip_special_tokens=False)
        if not final and text.endswith("\ufffd") and len(self._ids) - self._read < self._MAX_PENDING:
            return ""
        done = decode(self._ids[self._prefix:self._read], skip_special_tokens=False)
        new = text[len(done):]
        self._ids = self._ids[self._read:]
        self._prefix, self._read = 0, len(self._ids)
        return new


# ----------------------------------------------------------------------------------------------------
# Prompt ids
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageSlot:
    """Where input image ``index`` (0-based, in prompt order) goes."""
    index: int


@dataclass(frozen=True)
class PromptIds:
    """A prompt as segments: tuples of text ids and :class:`ImageSlot` s, in order."""
    segments: tuple[tuple[int, ...] | ImageSlot, ...]

    @property
    def n_images(self) -> int:
        return sum(isinstance(s, ImageSlot) for s in self.segments)

    @property
    def num_text_ids(self) -> int:
        return sum(len(s) for s in self.segments if not isinstance(s, ImageSlot))

    def ids(self, marker: int = IMAGE_MARKER) -> list[int]:
        """Flat ids with one ``marker`` per image slot."""
        out: list[int] = []
        for s in self.segments:
            if isinstance(s, ImageSlot):
                out.append(marker)
            else:
                out.extend(s)
        return out

    def expand(self, image_ids: Sequence[Sequence[int]]) -> list[int]:
        """Flat ids with image slot ``i`` replaced by ``image_ids[i]`` (e.g. an input layout's ``ids()``)."""
        if len(image_ids) != self.n_images:
            raise ValueError(f"expand: the prompt has {self.n_images} image slots, got {len(image_ids)} "
                             f"image id lists")
        out: list[int] = []
        for s in self.segments:
            out.extend(image_ids[s.index] if isinstance(s, ImageSlot) else s)
        return out


def _encode_with_images(tok: TextTokenizer, cfg: ModelConfig, text: str) -> PromptIds:
    segments: list[tuple[int, ...] | ImageSlot] = []
    for i, chunk in enumerate(text.split(cfg.prompts.image_placeholder)):
        if i:
            segments.append(ImageSlot(i - 1))
        if chunk:
            segments.append(tuple(tok.encode(chunk)))
    return PromptIds(tuple(segments))


def chat_text(cfg: ModelConfig, message: str) -> str:
    """One user turn in the chat template, with the system turn, ending with the assistant header."""
    p = cfg.prompts
    system = p.turn.format(role="system", content=p.system) if p.system else ""
    return system + p.turn.format(role="user", content=message) + p.assistant_header


def _require_text(name: str, value: str, cfg: ModelConfig, allow_image: bool = False) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
    if not allow_image and cfg.prompts.image_placeholder in value:
        raise ValueError(f"{name}: must not contain the image placeholder {cfg.prompts.image_placeholder!r} "
                         f"(the task prompt places the image itself)")


def resolution_tags(cfg: ModelConfig, height: int, width: int) -> tuple[str, str]:
    """``("<height_H>", "<width_W>")`` for an anchor resolution; ValueError listing the anchors otherwise."""
    if (height, width) not in cfg.anchors:
        raise ValueError(f"resolution {height}x{width} (HxW) is not supported by {cfg.name!r}; choose one of "
                         f"{', '.join(f'{h}x{w}' for h, w in cfg.anchors)}")
    names = {i: n for n, i in cfg.tokens.structural_names(cfg.num_levels)}
    return (names[cfg.tokens.height_tag(height, cfg.num_levels)],
            names[cfg.tokens.width_tag(width, cfg.num_levels)])


def understand_prompt(tok: TextTokenizer, cfg: ModelConfig, question: str, n_images: int = 1) -> PromptIds:
    """An understanding prompt. Without ``<image>`` in ``question``, ``cfg.prompts.understand`` places the
    image(s) before it (n images: the placeholder repeated, one per line); with placeholders in ``question``
    it is used verbatim and must hold exactly ``n_images`` of them."""
    _require_text("question", question, cfg, allow_image=True)
    if n_images < 0:
        raise ValueError(f"n_images: expected >= 0, got {n_images}")
    ph = cfg.prompts.image_placeholder
    found = question.count(ph)
    if found:
        if found != n_images:
            raise ValueError(f"question: contains {found} {ph!r} placeholders but n_images={n_images}")
        message = question
    elif n_images == 0:
        message = question
    else:
        template = cfg.prompts.understand.replace(ph, "\n".join([ph] * n_images))
        message = template.format(question=question)
    return _encode_with_images(tok, cfg, chat_text(cfg, message))


def assess_prompt(tok: TextTokenizer, cfg: ModelConfig, caption: str) -> PromptIds:
    """The self-assessment prompt (``cfg.prompts.assess``): one image slot, then the caption it is judged
    against; the answer is one JSON assessment (runtime/assessment.py)."""
    _require_text("caption", caption, cfg)
    return understand_prompt(tok, cfg, cfg.prompts.assess.format(caption=caption), n_images=1)


def generate_prompts(tok: TextTokenizer, cfg: ModelConfig, caption: str, height: int,
                     width: int) -> tuple[PromptIds, PromptIds]:
    """(conditional, unconditional) text-to-image prompts, each ending with the assistant header and the
    resolution tags; the image (starting with the forced SOI) follows."""
    _require_text("caption", caption, cfg)
    h, w = resolution_tags(cfg, height, width)
    p = cfg.prompts
    tail = p.image_response_prefix.format(h=h, w=w)
    cond = chat_text(cfg, p.generate.format(h=h, w=w, caption=caption)) + tail
    uncond = chat_text(cfg, p.generate_uncond.format(h=h, w=w)) + tail
    return _encode_with_images(tok, cfg, cond), _encode_with_images(tok, cfg, uncond)


def edit_prompts(tok: TextTokenizer, cfg: ModelConfig, instruction: str, height: int,
                 width: int) -> tuple[PromptIds, PromptIds]:
    """(conditional, unconditional) editing prompts with one image slot each (the source image,
    letterboxed to the anchor ``height x width``), ending with the assistant header and resolution tags."""
    _require_text("instruction", instruction, cfg)
    h, w = resolution_tags(cfg, height, width)
    p = cfg.prompts
    tail = p.image_response_prefix.format(h=h, w=w)
    cond = chat_text(cfg, p.edit.format(h=h, w=w, instruction=instruction)) + tail
    uncond = chat_text(cfg, p.edit_uncond.format(h=h, w=w)) + tail
    out = _encode_with_images(tok, cfg, cond), _encode_with_images(tok, cfg, uncond)
    for name, pr in zip(("edit", "edit_uncond"), out):
        if pr.n_images != 1:
            raise ValueError(f"cfg.prompts.{name}: expected exactly one image placeholder, found {pr.n_images}")
    return out


# ----------------------------------------------------------------------------------------------------
# Input image layout
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageInputLayout:
    """The input sequence of one image: ``SOI, per level (SOL_l, rows of [features x w_l, EOL], EOL_l), EOI``.

    ``items``: ``("token", id)`` for a structural token or ``("features", (level, row))`` for the ``w_l``
    consecutive positions holding feature row ``row`` of that level's grid.
    ``feature_positions[l]``: int64 ``[h_l * w_l]``; entry ``i`` is the position (0 = SOI) that receives row
    ``i`` of the level-``l`` branch's projected features ``[h_l * w_l, hidden]`` (row-major over the grid).
    """
    items: tuple[tuple[str, object], ...]
    length: int
    grids: tuple[tuple[int, int], ...]  # per level (h_l, w_l)
    feature_positions: tuple[np.ndarray, ...]

    def ids(self, marker: int = IMAGE_MARKER) -> np.ndarray:
        """int64 ``[length]``: structural ids, ``marker`` at every feature position."""
        out = np.full(self.length, marker, dtype=np.int64)
        pos = 0
        for kind, value in self.items:
            if kind == "token":
                out[pos] = value
                pos += 1
            else:
                pos += self.grids[value[0]][1]
        return out


def image_input_layout(cfg: ModelConfig, height: int, width: int) -> ImageInputLayout:
    """Layout of an input image of (preprocessed) size ``height x width``; level grids from
    ``cfg.level_grid`` (the branch feeding level ``l`` supplies its features)."""
    t = cfg.tokens
    items: list[tuple[str, object]] = [("token", t.start_of_image)]
    positions = []
    grids = []
    pos = 1
    for lv in range(cfg.num_levels):
        rows, cols = cfg.level_grid(lv, height, width)
        if rows < 1 or cols < 1:
            raise ValueError(f"input image {height}x{width}: level {lv} grid is empty ({rows}x{cols})")
        grids.append((rows, cols))
        items.append(("token", t.level_start(lv)))
        pos += 1
        # position of grid cell (r, c) = start of row r + c; each row is cols features then EOL.
        row_starts = pos + np.arange(rows, dtype=np.int64) * (cols + 1)  # [rows]
        positions.append((row_starts[:, None] + np.arange(cols, dtype=np.int64)[None, :]).reshape(-1))  # [rows*cols]
        for r in range(rows):
            items += [("features", (lv, r)), ("token", t.end_of_line)]
        pos += rows * (cols + 1)
        items.append(("token", t.level_end(lv)))
        pos += 1
    items.append(("token", t.end_of_image))
    pos += 1
    return ImageInputLayout(tuple(items), pos, tuple(grids), tuple(positions))


def final_answer(text: str, separator: str) -> str:
    """The final answer of an understanding reply: the text after the last `separator` (cfg.prompts.
    answer_separator; the reply's reasoning comes before it), or the whole reply when the model answers
    directly (separator "") or wrote no separator."""
    if separator and separator in text:
        return text.rsplit(separator, 1)[1].strip()
    return text.strip()
