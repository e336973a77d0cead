"""Continuous image input: run each branch's graph and lay its features into the prompt table.

An input image becomes the id sequence `SOI, per level (SOL_l, rows of [features, EOL], EOL_l), EOI`
(`image_input_layout`); each feature position holds an id >= vocab_rows that selects a row of the
`image_embeds` prompt table, which the `llm` graph splices in place of the token embedding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig, ViTEncoderConfig
from .decode_loops import Timings
from .engine import Engine
from .image_prep import pixel_inputs, vit_inputs
from .prompts import image_input_layout


@dataclass
class EncodedImage:
    features: list[np.ndarray]  # per level, float32 [h_l * w_l, hidden] (row-major over the grid)
    height: int  # size of the preprocessed image the grids derive from
    width: int


def encode_image(engine: Engine, image_m11: np.ndarray, timings: Timings | None = None) -> EncodedImage:
    """Run every input branch on a preprocessed image (float32 [3, H, W] in [-1, 1])."""
    cfg = engine.config
    timings = timings or Timings()
    _, h, w = image_m11.shape
    features: list[np.ndarray | None] = [None] * cfg.num_levels
    for branch in cfg.branches:
        name = f"vision_{branch.name}"
        with timings.timed(name):
            if isinstance(branch.encoder, ViTEncoderConfig):
                v = vit_inputs(image_m11, branch.encoder)
                feats = engine.session(name).run({"pixel_values": v.pixel_values, "rotary_cos": v.rotary_cos,
                                                  "rotary_sin": v.rotary_sin})["features"]
            else:
                feats = engine.session(name).run({"pixel_values": pixel_inputs(image_m11, branch.encoder)})["features"]
        rows, cols = cfg.level_grid(branch.level, h, w)
        if feats.shape != (rows * cols, cfg.llm.hidden_size):
            raise ValueError(f"{name}: features {feats.shape}, expected ({rows * cols}, {cfg.llm.hidden_size}) "
                             f"for a {h}x{w} image")
        features[branch.level] = feats
    return EncodedImage(features, h, w)  # type: ignore[arg-type]


class PromptTable:
    """Accumulates image features into one `image_embeds` table and hands out the ids that select them."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.parts: list[np.ndarray] = []
        self.rows = 0

    def add(self, image: EncodedImage) -> list[int]:
        """The input id sequence of `image`, its feature slots pointing into this table."""
        layout = image_input_layout(self.cfg, image.height, image.width)
        ids = layout.ids()
        for level, feats in enumerate(image.features):
            ids[layout.feature_positions[level]] = self.cfg.llm.vocab_rows + self.rows + np.arange(len(feats))
            self.parts.append(feats)
            self.rows += len(feats)
        return ids.tolist()

    def table(self) -> np.ndarray:
        if not self.parts:
            return np.zeros((0, self.cfg.llm.hidden_size), np.float32)
        return np.ascontiguousarray(np.concatenate(self.parts, axis=0), np.float32)  # [rows, hidden]
