"""Training sequences for ILLUME-nano, built with the runtime's own prompt code (torch-free).

Every example is laid out exactly as the runtime will later see it: the chat template, the task prompts of
``cfg.prompts``, the input-image layout (continuous features between structural tokens) and the output image
sequence (``SOI, SOL0, rows of codes + EOL, EOL0, EOI``). Two placeholders are filled per batch by the
trainer, because they need the vision tower:

- ``IMAGE_MARKER`` in ``ids``: one input-feature position; the markers of an example take, in order, the
  projected features of ``inputs[0]`` (row-major over its grid), then ``inputs[1]``, ...
- ``CODE_MARKER`` in ``ids`` and ``labels``: one output code; filled (as ``first_token_id + index``) with the
  codes of ``targets[0]``, then ``targets[1]``, ...

``labels`` is -100 wherever no loss is taken (the prompt), the token id elsewhere (the answer, ``<|im_end|>``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import ModelConfig
from ..runtime.prompts import (IMAGE_MARKER, TextTokenizer, assess_prompt, edit_prompts, generate_prompts,
                               image_input_layout, resolution_tags, understand_prompt)

CODE_MARKER = -300
IGNORE = -100


@dataclass
class Example:
    ids: list[int]
    labels: list[int]
    inputs: list[np.ndarray] = field(default_factory=list)  # uint8 [H, W, 3] images fed as features
    targets: list[np.ndarray] = field(default_factory=list)  # uint8 [H, W, 3] images whose codes are output
    task: str = ""

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.labels):
            raise ValueError(f"Example: {len(self.ids)} ids but {len(self.labels)} labels")


class SequenceBuilder:
    """Examples of every task at the model's single anchor resolution."""

    def __init__(self, tok: TextTokenizer, cfg: ModelConfig):
        if len(cfg.anchors) != 1 or cfg.num_levels != 1:
            raise ValueError(f"SequenceBuilder: expected one anchor and one level (the nano layout), got "
                             f"{len(cfg.anchors)} anchors and {cfg.num_levels} levels")
        self.tok, self.cfg = tok, cfg
        self.height, self.width = cfg.anchors[0]
        self.layout = image_input_layout(cfg, self.height, self.width)
        self.input_ids = self.layout.ids(IMAGE_MARKER).tolist()
        self.n_features = int(sum(len(p) for p in self.layout.feature_positions))
        rows, cols = self.layout.grids[0]
        t = cfg.tokens
        out = [t.start_of_image, t.level_start(0)]
        for _ in range(rows):
            out += [CODE_MARKER] * cols + [t.end_of_line]
        out += [t.level_end(0), t.end_of_image]
        self.output_ids = out  # the image the LLM writes (codes as markers)
        h, w = resolution_tags(cfg, self.height, self.width)
        self.tags = tok.encode(cfg.prompts.image_response_prefix.format(h=h, w=w))
        self.im_end = t.im_end

    # --- pieces ---------------------------------------------------------------------------------------
    def _answer(self, prompt: list[int], answer: list[int], inputs, targets, task: str) -> Example:
        answer = answer + [self.im_end]
        return Example(prompt + answer, [IGNORE] * len(prompt) + answer, list(inputs), list(targets), task)

    def _text(self, text: str) -> list[int]:
        return self.tok.encode(text)

    # --- tasks ----------------------------------------------------------------------------------------
    def understand(self, image: np.ndarray, question: str, answer: str, task: str = "understand") -> Example:
        prompt = understand_prompt(self.tok, self.cfg, question).expand([self.input_ids])
        return self._answer(prompt, self._text(answer), [image], [], task)

    def answer_after(self, question: str, given: str, answer: str, task: str = "answer_after") -> Example:
        """A text-only question whose reply is ``given`` then ``answer`` ("top, bottom." then "yes"): the reply
        is tokenized whole, as in :meth:`understand`, and only ``answer``'s tokens and ``<|im_end|>`` are
        supervised, so the model learns the last step of a reasoned answer from steps handed to it."""
        if not answer.strip():
            raise ValueError(f"answer_after: expected an answer after {given!r}, got {answer!r}")
        prompt = understand_prompt(self.tok, self.cfg, question, n_images=0).expand([])
        head, reply = self._text(given), self._text(f"{given} {answer}")
        if reply[:len(head)] != head:
            raise ValueError(f"answer_after: {given!r} does not tokenize as a prefix of {given + ' ' + answer!r}")
        return self._answer(prompt + head, reply[len(head):], [], [], task)

    def dialogue(self, image: np.ndarray, turns: list[tuple[str, str]], task: str = "dialogue") -> Example:
        """Several question/answer turns about one image (multi-turn SFT, as in LLaVA-style data).

        The first turn is laid out exactly as :meth:`understand` (the runtime's single-turn prompt); each
        later turn continues the chat (``\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n``).
        Every answer and its ``<|im_end|>`` is supervised, so one image's features serve several answers."""
        if not turns:
            raise ValueError("dialogue: expected at least one (question, answer) turn, got none")
        (question, answer), rest = turns[0], turns[1:]
        ex = self.understand(image, question, answer, task)
        p = self.cfg.prompts
        for question, answer in rest:
            follow = self._text("\n" + p.turn.format(role="user", content=question) + p.assistant_header)
            reply = self._text(answer) + [self.im_end]
            ex.ids += follow + reply
            ex.labels += [IGNORE] * len(follow) + reply
        return ex

    def generate(self, caption: str | None, image: np.ndarray, task: str = "generate") -> Example:
        """Text to image; ``caption=None`` gives the unconditional prompt (trained for CFG)."""
        cond, uncond = generate_prompts(self.tok, self.cfg, caption or "x", self.height, self.width)
        prompt = (cond if caption is not None else uncond).ids()
        return self._answer(prompt, list(self.output_ids), [], [image], task)

    def edit(self, source: np.ndarray, instruction: str | None, target: np.ndarray, task: str = "edit") -> Example:
        """Editing; ``instruction=None`` gives the unconditional prompt, which is image reconstruction."""
        cond, uncond = edit_prompts(self.tok, self.cfg, instruction or "x", self.height, self.width)
        prompt = (cond if instruction is not None else uncond).expand([self.input_ids])
        return self._answer(prompt, list(self.output_ids), [source], [target], task)

    def assess(self, image: np.ndarray, caption: str, assessment: str, correction: np.ndarray | None = None,
               task: str = "assess") -> Example:
        """Self-assessment of ``image`` against ``caption``: the JSON ``assessment``; for a poor sample the
        answer goes on with a corrected image (resolution tags, then its codes)."""
        prompt = assess_prompt(self.tok, self.cfg, caption).expand([self.input_ids])
        answer = self._text(assessment)
        targets = []
        if correction is not None:
            answer = answer + self._text("\n") + self.tags + self.output_ids
            targets = [correction]
        return self._answer(prompt, answer, [image], targets, task)


