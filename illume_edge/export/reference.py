"""The torch reference pipeline: understanding, generation and editing with the torch modules.

It is the parity oracle of the runtime (tests) and the "PyTorch eager" peer of the benchmarks. It is
written independently of the runtime's loop on purpose: no forced-token batching, no left padding (each
CFG row is its own batch-1 sequence with its own transformers DynamicCache), full-vocabulary LM head
then slicing. What it shares with the runtime is what *defines* the task, not how it runs: the host
preprocessing (numpy resize rules, patch order, rotary tables), the prompt builders, the grammar's
layout, and the numpy sampler (so that the same seed must pick the same tokens).
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import ViTEncoderConfig
from ..runtime.grammar import Forced, ImageGrammar, text_banned_ranges
from ..runtime.image_prep import letterbox_to_anchor, pixel_inputs, postprocess_image, \
    preprocess_image, vit_inputs
from ..runtime.pipeline import to_rgb
from ..runtime.prompts import TextTokenizer, edit_prompts, generate_prompts, image_input_layout, understand_prompt
from ..runtime.sampler import SamplingParams, Uniforms, guided_sample, level_params
from .diffusion import reference_decode
from .export_vision import merge_code_maps, reference_vq_decode
from .llm import reference_step
from .modules import IllumeModules


class ReferencePipeline:
    def __init__(self, mods: IllumeModules, tokenizer: TextTokenizer):
        self.mods, self.cfg, self.tokenizer = mods, mods.cfg, tokenizer

    # --- image input -------------------------------------------------------------------------------------
    @torch.no_grad()
    def branch_features(self, image_m11: np.ndarray) -> list[torch.Tensor]:
        """Per level, projected features [h_l*w_l, hidden] from the torch encoders (transformers' own ViT
        forward with grid_thw, not the export wrapper)."""
        feats: list[torch.Tensor | None] = [None] * self.cfg.num_levels
        for b in self.cfg.branches:
            enc, proj = self.mods.encoders[b.name], self.mods.projectors[b.name]
            if isinstance(b.encoder, ViTEncoderConfig):
                v = vit_inputs(image_m11, b.encoder)
                grid = torch.tensor([[1, v.grid[0], v.grid[1]]])
                out = enc(torch.from_numpy(v.pixel_values), grid_thw=grid)
                x = out.pooler_output if hasattr(out, "pooler_output") else out  # merged [N/4, out_dim]
            else:
                z = enc(torch.from_numpy(pixel_inputs(image_m11, b.encoder)))  # [1, C, h, w]
                x = z[0].flatten(1).transpose(0, 1)  # [h*w, C] row-major
            feats[b.level] = proj(x)
        return feats  # type: ignore[return-value]

    def image_embeddings(self, image_m11: np.ndarray) -> torch.Tensor:
        """[L, hidden]: the input image's sequence embeddings (structural tokens embedded, features spliced)."""
        _, h, w = image_m11.shape
        layout = image_input_layout(self.cfg, h, w)
        embed = self.mods.llm.get_input_embeddings()
        ids = torch.from_numpy(layout.ids(marker=0))
        seq = embed(ids).clone()  # [L, hidden]
        for level, f in enumerate(self.branch_features(image_m11)):
            seq[torch.from_numpy(layout.feature_positions[level])] = f
        return seq

    def prompt_embeddings(self, ids: list[int], image_seq: torch.Tensor | None, marker: int) -> torch.Tensor:
        """[1, S, hidden] from prompt ids with one `marker` standing for the whole image sequence."""
        embed = self.mods.llm.get_input_embeddings()
        parts, start = [], 0
        for i, t in enumerate(ids + [marker]):
            if t == marker:
                if i > start:
                    parts.append(embed(torch.tensor(ids[start:i])))
                if i < len(ids):
                    parts.append(image_seq)
                start = i + 1
        return torch.cat(parts)[None]

    # --- text -------------------------------------------------------------------------------------------
    def _logits(self, hidden: torch.Tensor, start: int, stop: int) -> np.ndarray:
        full = self.mods.llm.lm_head(hidden)  # [B, vocab_rows]: the whole head, then the range
        return full[:, start:stop].float().numpy()

    @torch.no_grad()
    def understand_ids(self, image, question: str, params: SamplingParams, seed: int, max_new_tokens: int) -> list[int]:
        pixels = preprocess_image(to_rgb(image), self.cfg)
        prompt = understand_prompt(self.tokenizer, self.cfg, question)
        marker = -1
        x = self.prompt_embeddings(prompt.ids(marker), self.image_embeddings(pixels), marker)
        text_stop = self.cfg.levels[0].first_token_id
        banned = text_banned_ranges(self.cfg)
        uniforms = Uniforms(seed, 1, max_new_tokens)
        hidden, cache = reference_step(self.mods.llm, None, inputs_embeds=x)
        out: list[int] = []
        for step in range(max_new_tokens):
            logits = self._logits(hidden, 0, text_stop)
            for a, b in banned:
                logits[:, a:min(b, text_stop)] = -np.inf
            token = int(guided_sample(logits, None, params, uniforms[step], generated_ids_per_row=[out])[0])
            if token in (self.cfg.tokens.im_end, self.cfg.tokens.endoftext):
                break
            out.append(token)
            hidden, cache = reference_step(self.mods.llm, torch.tensor([[token]]), past=cache)
        return out

    # --- images -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def image_codes(self, rows: list[torch.Tensor], h: int, w: int, params: SamplingParams,
                    seed: int) -> list[np.ndarray]:
        """rows: prompt embeddings [1, S_r, hidden] for the conditional (and unconditional) sequence."""
        grammar = ImageGrammar(self.cfg, h, w)
        use_cfg = len(rows) == 2 and params.cfg_scale != 1.0
        states = [reference_step(self.mods.llm, None, inputs_embeds=r) for r in rows[:2 if use_cfg else 1]]
        per_level = [level_params(params, lv) for lv in self.cfg.levels]
        n = sum(a * b for a, b in (self.cfg.level_grid(lv, h, w) for lv in range(self.cfg.num_levels)))
        uniforms = Uniforms(seed, 1, n)
        generated: list[int] = []
        sampled = 0
        while not grammar.done:
            step = grammar.next()
            if isinstance(step, Forced):
                token = step.token_id
            else:
                cond = self._logits(states[0][0], step.start, step.stop)
                uncond = self._logits(states[1][0], step.start, step.stop) if use_cfg else None
                idx = guided_sample(cond, uncond, per_level[step.level], uniforms[sampled], range_start=step.start,
                                    generated_ids_per_row=[generated])
                token = step.start + int(idx[0])
                sampled += 1
            grammar.advance(token)
            generated.append(token)
            if not grammar.done:
                states = [reference_step(self.mods.llm, torch.tensor([[token]]), past=c) for _, c in states]
        return grammar.codes()

    def _embed_rows(self, cond_ids, uncond_ids, image_seq, marker):
        return [self.prompt_embeddings(ids, image_seq, marker) for ids in (cond_ids, uncond_ids)]

    def generate_codes(self, caption: str, h: int, w: int, params: SamplingParams, seed: int) -> list[np.ndarray]:
        cond, uncond = generate_prompts(self.tokenizer, self.cfg, caption, h, w)
        return self.image_codes(self._embed_rows(cond.ids(), uncond.ids(), None, -1), h, w, params, seed)

    def edit_codes(self, image, instruction: str, params: SamplingParams, seed: int):
        source = to_rgb(image)
        boxed, (h, w), _ = letterbox_to_anchor(source, self.cfg.anchors)
        seq = self.image_embeddings(preprocess_image(boxed, self.cfg))
        cond, uncond = edit_prompts(self.tokenizer, self.cfg, instruction, h, w)
        codes = self.image_codes(self._embed_rows(cond.ids(-1), uncond.ids(-1), seq, -1), h, w, params, seed)
        return codes, (h, w), source.shape[:2]

    # --- detokenizers -----------------------------------------------------------------------------------
    @torch.no_grad()
    def code_maps(self, codes: list[np.ndarray]) -> list[torch.Tensor]:
        return [q.indices_to_codes(torch.from_numpy(c)[None]) for q, c in zip(self.mods.quantizers, codes)]

    def vq_image(self, codes: list[np.ndarray]) -> np.ndarray:
        out = reference_vq_decode(self.mods.post_quant_conv, self.mods.vq_decoder, self.code_maps(codes))
        return postprocess_image(out.numpy())

    @torch.no_grad()
    def diffusion_image(self, codes: list[np.ndarray], h: int, w: int, steps: int, cfg_scale: float, seed: int,
                        scheduler: dict | None = None) -> np.ndarray:
        from ..runtime.detokenize import initial_noise

        d = self.cfg.diffusion
        merged = merge_code_maps(self.code_maps(codes))  # bicubic to the last grid, concatenated
        lat = (1, d.unet.latent_channels, h * d.upscale // d.vae.downsample, w * d.upscale // d.vae.downsample)
        out = reference_decode(self.mods.unet, self.mods.vae, scheduler or self.mods.scheduler_config, merged,
                               d.resolution_index(h, w), steps, cfg_scale, torch.from_numpy(initial_noise(seed, lat)),
                               unet_cfg=d.unet)
        return postprocess_image(out.numpy())
