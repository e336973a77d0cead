"""All torch modules of one ILLUME-family model, built from its config, and how they map onto checkpoint files.

`IllumeModules` is the torch side's single handle on a model: the loaders fill it, the tiny-checkpoint
factory writes it out, the exporters and the torch reference pipeline read it.

Checkpoint files (release layouts, spec/illume.md):
- MLLM "origin" folder: the LLM (`model.*`, `lm_head.*`), each branch's encoder under `branch.weight_prefix`
  and projector under `branch.projector_prefix`.
- DualViTok state dict: each level's SimVQ quantizer under `level.quantizer_prefix`, the VQ decoder's
  post-quant conv and MoVQ decoder; tokenizer-training parts are known and ignored (DUALVITOK_IGNORED).
- Diffusion decoder: a diffusers folder (unet/, vae/, scheduler/).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..config import CNNEncoderConfig, ModelConfig, ViTEncoderConfig

# DualViTok parts that only the tokenizer's own training uses: present in the release file, never loaded.
DUALVITOK_IGNORED = ("semantic_encoder.", "semantic_decoder.", "pixel_encoder.", "pixel_quant_conv.")


@dataclass
class IllumeModules:
    cfg: ModelConfig
    llm: nn.Module
    encoders: dict[str, nn.Module]  # branch name -> encoder
    projectors: dict[str, nn.Module]  # branch name -> projector
    quantizers: list[nn.Module]  # one SimVQ per level
    post_quant_conv: nn.Module | None = None
    vq_decoder: nn.Module | None = None
    unet: nn.Module | None = None
    vae: nn.Module | None = None
    scheduler_config: dict = field(default_factory=dict)
    generation_config: dict = field(default_factory=dict)

    # --- state-dict groups, keyed exactly as in the release files --------------------------------------
    def mllm_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """(key prefix, module) pairs making up the MLLM checkpoint; '' is the LLM itself."""
        yield "", self.llm
        for b in self.cfg.branches:
            yield b.weight_prefix + ".", self.encoders[b.name]
            yield b.projector_prefix + ".", self.projectors[b.name]

    def dualvitok_modules(self) -> Iterator[tuple[str, nn.Module]]:
        for level, q in zip(self.cfg.levels, self.quantizers):
            yield level.quantizer_prefix + ".", q
        if self.cfg.vq_decoder is not None:
            yield self.cfg.vq_decoder.post_quant_prefix + ".", self.post_quant_conv
            yield self.cfg.vq_decoder.decoder_prefix + ".", self.vq_decoder

    def eval(self) -> "IllumeModules":
        for m in self.all_modules():
            m.eval().requires_grad_(False)
        return self

    def all_modules(self) -> list[nn.Module]:
        mods = [self.llm, *self.encoders.values(), *self.projectors.values(), *self.quantizers]
        return mods + [m for m in (self.post_quant_conv, self.vq_decoder, self.unet, self.vae) if m is not None]


def tied_keys(cfg: ModelConfig) -> set[str]:
    """Keys a release file omits because they alias another tensor."""
    return {"lm_head.weight"} if cfg.llm.tie_word_embeddings else set()


def grouped_state_dict(groups: Iterator[tuple[str, nn.Module]], skip: set[str] = frozenset()) -> dict:
    out = {}
    for prefix, module in groups:
        for k, v in module.state_dict().items():
            if prefix + k not in skip:
                out[prefix + k] = v
    return out


@contextlib.contextmanager
def empty_weights(enabled: bool = True):
    """Build parameters on the meta device (buffers stay real) so loading real sizes holds one copy."""
    if not enabled:
        yield
        return
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def build_encoder(enc: ViTEncoderConfig | CNNEncoderConfig) -> nn.Module:
    if isinstance(enc, ViTEncoderConfig):
        from .vit import build_vit

        return build_vit(enc)
    from .movq import build_movq_encoder

    return build_movq_encoder(enc.movq)


def build_modules(cfg: ModelConfig, *, empty: bool = False, with_diffusion: bool = True) -> IllumeModules:
    """Every module of `cfg` (random init, or meta-device parameters when `empty` for a later assign-load)."""
    from .codebook import SimVQ
    from .diffusion import build_unet, build_vae
    from .llm import build_llm
    from .projector import build_projector

    with empty_weights(empty):
        llm = build_llm(cfg)
        encoders = {b.name: build_encoder(b.encoder) for b in cfg.branches}
        projectors = {b.name: build_projector(b.in_dim, cfg.llm.hidden_size) for b in cfg.branches}
        quantizers = [SimVQ(lv.codebook_size, lv.code_dim) for lv in cfg.levels]
        post_quant = decoder = unet = vae = None
        if cfg.vq_decoder is not None:
            from .movq import build_movq_decoder

            m = cfg.vq_decoder.movq
            post_quant = nn.Conv2d(m.embed_dim, m.z_channels, 1)
            decoder = build_movq_decoder(m)
        if cfg.diffusion is not None and with_diffusion:
            unet = build_unet(cfg.diffusion.unet)
            vae = build_vae(cfg.diffusion.vae)
    sched = dict(cfg.diffusion.scheduler) if cfg.diffusion is not None else {}
    return IllumeModules(cfg, llm, encoders, projectors, quantizers, post_quant, decoder, unet, vae, sched,
                         {"repetition_penalty": cfg.defaults.repetition_penalty}).eval()
