"""The ILLUME+ diffusion decoder ("dualvitok-sdxl-decoder"): module builders and the torch parity oracle.

The release (`vision_tokenizer/tokenizer/sdxl_decoder_pipe.py`) is an SDXL pipeline whose UNet reads
`in_channels = latent + code channels`: the DualViTok code map (semantic codes bicubic-upsampled to the
pixel grid, concatenated with the pixel codes) is nearest-upsampled to the latent grid and concatenated to
the latent. Text conditioning is all zeros (`encoder_hidden_states` [B, 77, 2048] and the pooled
`text_embeds` [B, 1280]); the SDXL micro-conditioning `time_ids` is `[0, 0, 0, 0, 0, resolution_index]`.
Classifier-free guidance runs the unconditional row (code map zeroed) first, then the conditional row, and
combines `u + s * (c - u)`; it is on when `cfg_scale > 1`. The latent is decoded by an SDXL
`AutoencoderKL` after division by its `scaling_factor`.

This file holds:
- `unet_config_dict` / `vae_config_dict`: the diffusers `config.json` a real `unet/` / `vae/` folder carries,
  derived from `UNetConfig` / `VAEConfig`; `unet_cfg_from_diffusers` / `vae_cfg_from_diffusers` read such a
  file back into our config and reject anything our builders would not reproduce.
- `build_unet` / `build_vae`: random-init diffusers modules of that architecture.
- `reference_decode`: the whole decode in torch with diffusers' own scheduler (the parity oracle).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ConfigError, UNetConfig, VAEConfig

RGB_CHANNELS = 3

# diffusers config.json keys that describe a saved folder rather than the network's computation.
_METADATA_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
                            "sample_size"})
# Runtime precision hints of AutoencoderKL (fp16 overflow work-around): no effect on fp32 weights or graphs.
_VAE_HINT_KEYS = frozenset({"force_upcast"})

# The schedulers whose diffusers class the reference may instantiate (the numpy runtime mirrors both).
REFERENCE_SCHEDULERS = ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler")


# ----------------------------------------------------------------------------------------------------
# diffusers config dicts
# ----------------------------------------------------------------------------------------------------
def unet_config_dict(cfg: UNetConfig) -> dict[str, Any]:
    """The diffusers UNet2DConditionModel config (SDXL layout, `in_channels` = latent + code channels).

    Keys left out take diffusers' defaults, which are SDXL's.
    """
    return {
        "_class_name": "UNet2DConditionModel",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.latent_channels,
        "down_block_types": list(cfg.down_block_types),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": list(cfg.up_block_types),
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "transformer_layers_per_block": list(cfg.transformer_layers_per_block),
        # diffusers' historical naming: for SDXL this list is the number of heads per block
        "attention_head_dim": list(cfg.attention_head_dim),
        "cross_attention_dim": cfg.cross_attention_dim,
        "norm_num_groups": cfg.norm_num_groups,
        "norm_eps": 1e-5,
        "use_linear_projection": cfg.use_linear_projection,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "time_embedding_type": "positional",
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": cfg.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": cfg.projection_class_embeddings_input_dim,
    }


def vae_config_dict(cfg: VAEConfig) -> dict[str, Any]:
    """The diffusers AutoencoderKL config (SDXL VAE layout)."""
    n = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": RGB_CHANNELS,
        "out_channels": RGB_CHANNELS,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "scaling_factor": cfg.scaling_factor,
    }


def _init_defaults(cls) -> dict[str, Any]:
    sig = inspect.signature(cls.__init__)
    return {k: p.default for k, p in sig.parameters.items() if k != "self" and p.default is not p.empty}


def _same(a: Any, b: Any) -> bool:
    """Config value equality: lists == tuples, and None == False (both mean 'off' in diffusers configs)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a in (None, False) and b in (None, False)
    return a == b


def _check_against(d: dict[str, Any], ours: dict[str, Any], cls, where: str,
                   ignored: frozenset[str] = frozenset()) -> None:
    """Every key of a diffusers config `d` must equal what our builder uses (ours, else the class default)."""
    if d.get("_class_name", ours["_class_name"]) != ours["_class_name"]:
        raise ConfigError(f"{where}: _class_name is {d['_class_name']!r}, expected {ours['_class_name']!r}")
    defaults = _init_defaults(cls)
    for key, value in d.items():
        if key in _METADATA_KEYS or key in ignored:
            continue
        if key in ours:
            want = ours[key]
        elif key in defaults:
            want = defaults[key]
        else:
            raise ConfigError(f"{where}: unknown key {key!r} (not a {cls.__name__} argument in this diffusers "
                              f"version); remove it or upgrade the exporter")
        if not _same(value, want):
            raise ConfigError(f"{where}: {key} is {value!r}, but the decoder this exporter builds uses {want!r}; "
                              f"this architecture variant is not supported")
    for key, want in ours.items():  # an absent key means diffusers' default, which must then be ours
        if not key.startswith("_") and key not in d and not _same(defaults.get(key), want):
            raise ConfigError(f"{where}: missing key {key!r}: diffusers would default it to {defaults.get(key)!r}, "
                              f"the decoder this exporter builds uses {want!r}; add it to the file")


def _as_tuple(v: Any, n: int, key: str, where: str) -> tuple:
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ConfigError(f"{where}: {key} has {len(v)} entries, expected one per block ({n})")
        return tuple(v)
    return (v,) * n


def unet_cfg_from_diffusers(d: dict[str, Any], *, text_seq_len: int = UNetConfig.text_seq_len,
                            num_time_ids: int = UNetConfig.num_time_ids,
                            where: str = "unet/config.json") -> UNetConfig:
    """Read a diffusers UNet config.json into a UNetConfig; anything build_unet would not reproduce is an error.

    `text_seq_len` / `num_time_ids` belong to the pipeline, not the UNet file (the release: 77 and 6).
    """
    from diffusers import UNet2DConditionModel

    try:
        n = len(d["block_out_channels"])
        out_ch = int(d.get("out_channels", 4))
        time_dim = int(d["addition_time_embed_dim"])
        proj = int(d["projection_class_embeddings_input_dim"])
        cfg = UNetConfig(
            latent_channels=out_ch,
            code_channels=int(d["in_channels"]) - out_ch,
            block_out_channels=tuple(d["block_out_channels"]),
            layers_per_block=int(d.get("layers_per_block", 2)),
            transformer_layers_per_block=_as_tuple(d.get("transformer_layers_per_block", 1), n,
                                                   "transformer_layers_per_block", where),
            attention_head_dim=_as_tuple(d.get("attention_head_dim", 8), n, "attention_head_dim", where),
            down_block_types=tuple(d["down_block_types"]),
            up_block_types=tuple(d["up_block_types"]),
            cross_attention_dim=int(d["cross_attention_dim"]),
            text_seq_len=text_seq_len,
            addition_time_embed_dim=time_dim,
            pooled_text_dim=proj - time_dim * num_time_ids,
            num_time_ids=num_time_ids,
            norm_num_groups=int(d.get("norm_num_groups", 32)),
            use_linear_projection=bool(d.get("use_linear_projection", False)),
        )
    except KeyError as e:
        raise ConfigError(f"{where}: missing key {e.args[0]!r} (an SDXL-style text_time UNet config needs it)") \
            from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: malformed value ({e})") from None
    if cfg.code_channels <= 0 or cfg.pooled_text_dim <= 0:
        raise ConfigError(f"{where}: in_channels {d['in_channels']} / projection_class_embeddings_input_dim {proj} "
                          f"leave code_channels {cfg.code_channels}, pooled_text_dim {cfg.pooled_text_dim}; "
                          f"expected a UNet fed latent + code map with {num_time_ids} time ids")
    _check_against(d, unet_config_dict(cfg), UNet2DConditionModel, where)
    return cfg


def vae_cfg_from_diffusers(d: dict[str, Any], where: str = "vae/config.json") -> VAEConfig:
    """Read a diffusers AutoencoderKL config.json into a VAEConfig (strictly, like unet_cfg_from_diffusers)."""
    from diffusers import AutoencoderKL

    try:
        cfg = VAEConfig(block_out_channels=tuple(d["block_out_channels"]),
                        layers_per_block=int(d.get("layers_per_block", 1)),
                        latent_channels=int(d.get("latent_channels", 4)),
                        scaling_factor=float(d["scaling_factor"]),
                        norm_num_groups=int(d.get("norm_num_groups", 32)))
    except KeyError as e:
        raise ConfigError(f"{where}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: malformed value ({e})") from None
    _check_against(d, vae_config_dict(cfg), AutoencoderKL, where, ignored=_VAE_HINT_KEYS)
    return cfg


# ----------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------
def _kwargs(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def build_unet(cfg: UNetConfig):
    """Random-init diffusers UNet2DConditionModel of the decoder's architecture (eval mode)."""
    from diffusers import UNet2DConditionModel

    if len(cfg.block_out_channels) != len(cfg.down_block_types) or len(cfg.up_block_types) != len(cfg.down_block_types):
        raise ConfigError(f"UNetConfig: {len(cfg.block_out_channels)} block_out_channels, "
                          f"{len(cfg.down_block_types)} down blocks and {len(cfg.up_block_types)} up blocks must agree")
    return UNet2DConditionModel(**_kwargs(unet_config_dict(cfg))).eval()


def build_vae(cfg: VAEConfig):
    """Random-init diffusers AutoencoderKL of the decoder's architecture (eval mode)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**_kwargs(vae_config_dict(cfg))).eval()


# ----------------------------------------------------------------------------------------------------
# Zero text conditioning and time ids (shared with the exporter)
# ----------------------------------------------------------------------------------------------------
def zero_text_conditioning(cfg: UNetConfig, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder_hidden_states [B, text_seq_len, cross_attention_dim], text_embeds [B, pooled_text_dim]), zeros."""
    text = like.new_zeros((batch, cfg.text_seq_len, cfg.cross_attention_dim))
    pooled = like.new_zeros((batch, cfg.pooled_text_dim))
    return text, pooled


def time_ids_for(cfg: UNetConfig, resolution_index: int) -> list[float]:
    """The release's SDXL micro-conditioning: zeros, then the output size's index in the decoder's list."""
    return [0.0] * (cfg.num_time_ids - 1) + [float(resolution_index)]


# ----------------------------------------------------------------------------------------------------
# The parity oracle
# ----------------------------------------------------------------------------------------------------
def make_reference_scheduler(scheduler_config: dict[str, Any]):
    """diffusers' scheduler named by `_class_name` (Euler discrete or DPM-Solver multistep)."""
    import diffusers

    name = scheduler_config.get("_class_name")
    if name not in REFERENCE_SCHEDULERS:
        raise ConfigError(f"scheduler_config: _class_name {name!r} is not supported; expected one of "
                          f"{list(REFERENCE_SCHEDULERS)}")
    return getattr(diffusers, name).from_config(scheduler_config)


@torch.no_grad()
def reference_decode(unet, vae, scheduler_config: dict[str, Any], code_map: torch.Tensor, resolution_index: int,
                     steps: int, cfg_scale: float, init_noise: torch.Tensor, *,
                     unet_cfg: UNetConfig | None = None) -> torch.Tensor:
    """Decode a code map to pixels the way the release pipeline does, in fp32 torch.

    code_map: [1, code_channels, h, w] at the token grid of the last level (all levels merged, as the release's
    `merge_quants`); init_noise: [1, latent_channels, H/f, W/f] standard normal (f = the VAE's downsampling);
    returns the VAE output [1, 3, H, W] float32, nominally in [-1, 1] (not clamped: the host post-processes).
    `unet_cfg` supplies the zero text conditioning's sequence length (default: read from `unet.config`).
    """
    cfg = unet_cfg or unet_cfg_from_diffusers(dict(unet.config))
    if code_map.ndim != 4 or code_map.shape[0] != 1 or code_map.shape[1] != cfg.code_channels:
        raise ValueError(f"reference_decode: code_map must be [1, {cfg.code_channels}, h, w], got "
                         f"{tuple(code_map.shape)}")
    if init_noise.ndim != 4 or init_noise.shape[:2] != (1, cfg.latent_channels):
        raise ValueError(f"reference_decode: init_noise must be [1, {cfg.latent_channels}, H/8, W/8], got "
                         f"{tuple(init_noise.shape)}")
    if steps < 1:
        raise ValueError(f"reference_decode: steps must be >= 1, got {steps}")

    scheduler = make_reference_scheduler(scheduler_config)
    scheduler.set_timesteps(steps)
    latents = init_noise.float() * scheduler.init_noise_sigma
    codes = code_map.float()
    if codes.shape[-2:] != latents.shape[-2:]:
        codes = F.interpolate(codes, size=latents.shape[-2:], mode="nearest")  # [1, C, h_lat, w_lat]
    guided = cfg_scale > 1.0
    if guided:
        codes = torch.cat([torch.zeros_like(codes), codes])  # uncond row first, as the release
    batch = codes.shape[0]
    text, pooled = zero_text_conditioning(cfg, batch, latents)
    time_ids = torch.tensor([time_ids_for(cfg, resolution_index)], dtype=torch.float32).repeat(batch, 1)

    for t in scheduler.timesteps:
        model_in = torch.cat([latents] * batch) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        noise = unet(torch.cat([model_in, codes], dim=1), t, encoder_hidden_states=text,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]
        if guided:
            uncond, cond = noise.chunk(2)
            noise = uncond + cfg_scale * (cond - uncond)
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
    return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0].float()
