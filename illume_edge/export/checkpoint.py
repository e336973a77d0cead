"""Strict loaders for the release checkpoint formats, and the writer of tiny random checkpoints in them.

A checkpoint directory as this project lays it out (the three release downloads side by side):

    DIR/
      illume_edge.json          optional: the ModelConfig (make-tiny writes it; else pass a preset)
      mllm/                     ILLUME+ "origin" MLLM folder: config.json, *.safetensors (+ index),
                                tokenizer.json, tokenizer_config.json, generation_config.json
      dualvitok/                pytorch_model.bin (torch.load, weights_only) or model.safetensors
      diffusion_decoder/        diffusers folder: unet/, vae/, scheduler/

Each part can also be given by its own path (`CheckpointPaths`). Loading is strict: every missing,
unexpected or mis-shaped key is reported by name; a truncated or corrupt file or a git-lfs pointer fails
with an error naming the file. Nothing here touches the network.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..config import ConfigError, ModelConfig, preset
from ..errors import CheckpointError
from ..manifest import is_lfs_pointer
from .modules import DUALVITOK_IGNORED, IllumeModules, build_modules, grouped_state_dict, tied_keys

CONFIG_NAME = "illume_edge.json"
MAX_KEYS_SHOWN = 12


@dataclass(frozen=True)
class CheckpointPaths:
    mllm: Path
    dualvitok: Path | None
    diffusion_decoder: Path | None

    @classmethod
    def from_dir(cls, root: str | os.PathLike) -> "CheckpointPaths":
        root = Path(root)
        if not root.is_dir():
            raise CheckpointError(f"checkpoint folder {root} does not exist")
        mllm = root / "mllm"
        if not mllm.is_dir():
            raise CheckpointError(f"{root}: no mllm/ folder (the ILLUME+ origin-format MLLM checkpoint)")
        dv = root / "dualvitok"
        dd = root / "diffusion_decoder"
        return cls(mllm, dv if dv.exists() else None, dd if dd.exists() else None)


# ----------------------------------------------------------------------------------------------------
# Reading tensors from files
# ----------------------------------------------------------------------------------------------------
def _check_not_pointer(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    if is_lfs_pointer(path):
        raise CheckpointError(f"{path}: is a git-lfs pointer file, not weights; run `git lfs pull` in its "
                              f"repository (or download the real file)")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_not_pointer(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); the file is truncated or "
                              f"corrupt: download it again") from None


def read_safetensors_folder(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    """`<stem>.safetensors`, or the shards listed by `<stem>.safetensors.index.json`."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors = read_safetensors(folder / shard)
            listed = {k for k, v in weight_map.items() if v == shard}
            if set(tensors) != listed:
                diff = sorted(set(tensors) ^ listed)[:MAX_KEYS_SHOWN]
                raise CheckpointError(f"{folder / shard}: keys disagree with {index.name}: {diff}")
            out.update(tensors)
        return out
    single = folder / f"{stem}.safetensors"
    if single.exists():
        return read_safetensors(single)
    raise CheckpointError(f"{folder}: neither {stem}.safetensors nor {stem}.safetensors.index.json found")


def read_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A torch state dict (`torch.load(weights_only=True)`), unwrapping {'model'|'state_dict': ...} nesting."""
    _check_not_pointer(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for truncated zips and bad pickles
        raise CheckpointError(f"{path}: cannot be read by torch.load(weights_only=True) ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); the file is truncated or corrupt") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return obj


def read_dualvitok(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        for name in ("pytorch_model.bin", "model.safetensors"):
            if (path / name).exists():
                return read_dualvitok(path / name)
        raise CheckpointError(f"{path}: no pytorch_model.bin or model.safetensors")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch_state_dict(path)


# ----------------------------------------------------------------------------------------------------
# Strict state-dict matching
# ----------------------------------------------------------------------------------------------------
def _listing(keys: list[str]) -> str:
    more = f" ... and {len(keys) - MAX_KEYS_SHOWN} more" if len(keys) > MAX_KEYS_SHOWN else ""
    return ", ".join(keys[:MAX_KEYS_SHOWN]) + more


def check_keys(where: str, expected: Mapping[str, tuple], got: Mapping[str, torch.Tensor],
               ignored_prefixes: tuple[str, ...] = ()) -> None:
    """Raise naming every missing, unexpected or mis-shaped key."""
    problems = []
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(k for k in set(got) - set(expected) if not k.startswith(ignored_prefixes))
    shapes = sorted(f"{k}: expected {tuple(expected[k])}, got {tuple(got[k].shape)}"
                    for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k].shape))
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes ({len(shapes)}): {_listing(shapes)}")
    if problems:
        raise CheckpointError(f"{where}: does not match the model config: " + "; ".join(problems) +
                              ". Check that the config (illume_edge.json or --preset) describes this checkpoint")


def _expected(groups, skip=frozenset()) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in grouped_state_dict(groups, skip).items()}


def assign_groups(groups: list[tuple[str, nn.Module]], tensors: Mapping[str, torch.Tensor],
                  dtype: torch.dtype = torch.float32) -> None:
    """Assign `tensors` (floats cast to `dtype`) to the modules of `groups`; a key goes to its longest prefix."""
    prefixes = sorted((p for p, _ in groups), key=len, reverse=True)
    per_group: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prefixes}
    for k, t in tensors.items():
        owner = next(p for p in prefixes if k.startswith(p))  # '' matches everything
        per_group[owner][k[len(owner):]] = t.to(dtype) if t.is_floating_point() else t
    for prefix, module in groups:
        missing, unexpected = module.load_state_dict(per_group[prefix], strict=False, assign=True)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied: re-tied by the caller
        if missing or unexpected:
            raise CheckpointError(f"internal: module {prefix or 'llm'} missing {missing[:5]}, unexpected "
                                  f"{unexpected[:5]}")


# ----------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------
def resolve_config(root: Path | None, preset_name: str | None) -> ModelConfig:
    if preset_name:
        return preset(preset_name)
    if root is not None and (root / CONFIG_NAME).is_file():
        try:
            return ModelConfig.from_dict(json.loads((root / CONFIG_NAME).read_text()))
        except (json.JSONDecodeError, ConfigError) as e:
            raise CheckpointError(f"{root / CONFIG_NAME}: {e}") from None
    raise CheckpointError(f"{root}: no {CONFIG_NAME}; pass --preset (e.g. illume-plus-3b) to say which model "
                          f"this checkpoint is")


def check_llm_config(cfg: ModelConfig, config_json: Path) -> None:
    """The MLLM's config.json must describe the same LLM as the model config."""
    from .llm import llm_config_from_hf

    data = _read_json(config_json)
    try:
        got = llm_config_from_hf(data, where=str(config_json))
    except (KeyError, ValueError, ConfigError) as e:
        raise CheckpointError(str(e)) from None
    want = cfg.llm
    for name in ("arch", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size",
                 "vocab_rows", "rope_theta", "tie_word_embeddings", "head_size"):
        a, b = getattr(want, name), getattr(got, name)
        if a != b:
            raise CheckpointError(f"{config_json}: llm {name} is {b}, the model config {cfg.name!r} says {a}; "
                                  f"use the preset that matches this checkpoint")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def check_diffusion_configs(cfg: ModelConfig, folder: Path) -> None:
    """unet/ and vae/ config.json must describe exactly the decoder of the model config."""
    from .diffusion import unet_cfg_from_diffusers, vae_cfg_from_diffusers

    d = cfg.diffusion
    try:
        unet = unet_cfg_from_diffusers(_read_json(folder / "unet" / "config.json"), text_seq_len=d.unet.text_seq_len,
                                       num_time_ids=d.unet.num_time_ids, where=str(folder / "unet" / "config.json"))
        vae = vae_cfg_from_diffusers(_read_json(folder / "vae" / "config.json"), where=str(folder / "vae" / "config.json"))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    for sub, got, want in (("unet", unet, d.unet), ("vae", vae, d.vae)):
        for name in want.__dataclass_fields__:
            if getattr(got, name) != getattr(want, name):
                raise CheckpointError(f"{folder / sub / 'config.json'}: {name} is {getattr(got, name)!r}, the model "
                                      f"config {cfg.name!r} expects {getattr(want, name)!r}")


# ----------------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------------
def load_checkpoint(paths: CheckpointPaths | str | os.PathLike, cfg: ModelConfig | None = None,
                    preset_name: str | None = None, with_diffusion: bool = True,
                    dtype: torch.dtype = torch.float32) -> IllumeModules:
    """Load every component strictly into torch modules of `dtype` (fp32, or fp16 to halve the memory of a
    real-size export); the weights are held once."""
    root = None
    if not isinstance(paths, CheckpointPaths):
        root = Path(paths)
        paths = CheckpointPaths.from_dir(root)
    cfg = cfg or resolve_config(root, preset_name)
    check_llm_config(cfg, paths.mllm / "config.json")
    mods = build_modules(cfg, empty=True, with_diffusion=with_diffusion)

    tensors = read_safetensors_folder(paths.mllm, "model")
    check_keys(str(paths.mllm), _expected(mods.mllm_modules(), tied_keys(cfg)), tensors)
    assign_groups(list(mods.mllm_modules()), tensors, dtype)
    if cfg.llm.tie_word_embeddings:
        mods.llm.tie_weights()
    del tensors

    if paths.dualvitok is None:
        raise CheckpointError(f"no DualViTok checkpoint given: the code tables of {cfg.num_levels} level(s) "
                              f"live there")
    tensors = read_dualvitok(paths.dualvitok)
    check_keys(str(paths.dualvitok), _expected(mods.dualvitok_modules()), tensors, DUALVITOK_IGNORED)
    assign_groups(list(mods.dualvitok_modules()),
                  {k: v for k, v in tensors.items() if not k.startswith(DUALVITOK_IGNORED)}, dtype)
    del tensors

    if cfg.diffusion is not None and with_diffusion:
        if paths.diffusion_decoder is None:
            raise CheckpointError(f"model {cfg.name!r} has a diffusion decoder but no diffusion_decoder/ folder "
                                  f"was given")
        _load_diffusion(mods, paths.diffusion_decoder, dtype)
    gen = paths.mllm / "generation_config.json"
    if gen.is_file():
        mods.generation_config = _read_json(gen)
    return mods.eval()


def _load_diffusion(mods: IllumeModules, folder: Path, dtype: torch.dtype) -> None:
    check_diffusion_configs(mods.cfg, folder)
    for sub, module in (("unet", mods.unet), ("vae", mods.vae)):
        tensors = read_safetensors_folder(folder / sub, "diffusion_pytorch_model")
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        check_keys(str(folder / sub), expected, tensors)
        module.load_state_dict({k: t.to(dtype) for k, t in tensors.items()}, strict=True, assign=True)
    sched = folder / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        raise CheckpointError(f"{sched}: missing (the diffusion decoder's scheduler config)")
    mods.scheduler_config = _read_json(sched)


# ----------------------------------------------------------------------------------------------------
# Write (tiny random checkpoints in the release layout; also the nano model's trained weights)
# ----------------------------------------------------------------------------------------------------
def mllm_config_json(cfg: ModelConfig) -> dict[str, Any]:
    """The MLLM config.json: the HF LLM config plus the ILLUME keys the release carries."""
    from .llm import hf_config

    d = hf_config(cfg).to_dict()
    d["architectures"] = ["IllumeQwen2ForCausalLM" if cfg.llm.arch == "qwen2" else "IllumeLlamaForCausalLM"]
    d["special_tokens_ids"] = [t for _, t in cfg.tokens.structural_names(cfg.num_levels)][:3 + 2 * cfg.num_levels]
    d["vision_tokenizer_levels"] = cfg.num_levels
    d["text_token_num"] = cfg.tokens.text_vocab_size
    d["mm_hidden_size"] = [b.in_dim for b in cfg.branches]
    return d


def save_checkpoint(mods: IllumeModules, root: str | os.PathLike, shards: int = 2, *,
                    base_words: list[str] | None = None,
                    dualvitok_extra: Mapping[str, torch.Tensor] | None = None) -> CheckpointPaths:
    """Write `mods` in the release layout under `root` (see the module docstring).

    `base_words`: words the tokenizer encodes as single low ids (tokenizer_factory); `dualvitok_extra`: tensors
    of the tokenizer's own training parts (keys under DUALVITOK_IGNORED prefixes), stored as the release does
    and never loaded."""
    extra = dict(dualvitok_extra or {})
    stray = sorted(k for k in extra if not k.startswith(DUALVITOK_IGNORED))
    if stray:
        raise CheckpointError(f"dualvitok_extra: keys {stray[:5]} are not under the tokenizer-training prefixes "
                              f"{DUALVITOK_IGNORED}")
    from safetensors.torch import save_file

    from .tokenizer_factory import save_tokenizer_files

    cfg = mods.cfg
    root = Path(root)
    mllm = root / "mllm"
    mllm.mkdir(parents=True, exist_ok=True)
    (root / CONFIG_NAME).write_text(cfg.to_json() + "\n")
    (mllm / "config.json").write_text(json.dumps(mllm_config_json(cfg), indent=2) + "\n")
    (mllm / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.tokens.endoftext, "eos_token_id": [cfg.tokens.im_end, cfg.tokens.endoftext],
         "pad_token_id": cfg.tokens.endoftext, **mods.generation_config}, indent=2) + "\n")
    save_tokenizer_files(cfg, mllm, base_words)

    sd = {k: v.contiguous() for k, v in grouped_state_dict(mods.mllm_modules(), tied_keys(cfg)).items()}
    keys = list(sd)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(mllm / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (mllm / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")

    dv = root / "dualvitok"
    dv.mkdir(exist_ok=True)
    dsd = {k: v.contiguous() for k, v in grouped_state_dict(mods.dualvitok_modules()).items()}
    dsd.update({k: v.detach().contiguous() for k, v in extra.items()})
    torch.save(dsd, dv / "pytorch_model.bin")

    dd = None
    if mods.unet is not None:
        dd = root / "diffusion_decoder"
        mods.unet.save_pretrained(dd / "unet", safe_serialization=True)
        mods.vae.save_pretrained(dd / "vae", safe_serialization=True)
        (dd / "scheduler").mkdir(parents=True, exist_ok=True)
        (dd / "scheduler" / "scheduler_config.json").write_text(json.dumps(mods.scheduler_config, indent=2) + "\n")
    return CheckpointPaths(mllm, dv, dd)


def make_tiny(preset_name: str, out: str | os.PathLike, seed: int = 0) -> CheckpointPaths:
    """A random checkpoint of a preset, laid out exactly like the release (for tests; nothing downloads)."""
    cfg = preset(preset_name)
    torch.manual_seed(seed)
    mods = build_modules(cfg)
    _spread_random_weights(mods)
    return save_checkpoint(mods, out)


def _spread_random_weights(mods: IllumeModules) -> None:
    """Default inits leave norms at 1 and biases at 0; perturb everything so parity tests see every weight."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for m in mods.all_modules():
            for name, p in m.named_parameters():
                if name.endswith("bias") or p.dim() == 1:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
