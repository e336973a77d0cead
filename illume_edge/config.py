"""One configuration for the whole ILLUME family.

Plain dataclasses, importable without torch: the export side builds torch modules from them and the
runtime reads them back out of an engine's manifest. Every id, size and level count used anywhere in the
project comes from here; presets at the bottom.

Conventions
- Resolutions are (height, width) in pixels on the LLM side (the "anchor" sizes of the spec).
- A *level* is one discrete output codebook (ILLUME+: level0 semantic, level1 pixel).
- A *branch* is one continuous input encoder + its projector (ILLUME+: semantic ViT, pixel CNN).
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1


class ConfigError(ValueError):
    """A configuration (preset, manifest or checkpoint config.json) is inconsistent."""


# ----------------------------------------------------------------------------------------------------
# LLM
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LLMConfig:
    arch: str  # "qwen2" | "llama"
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_rows: int  # rows of embed_tokens / lm_head after the vocabulary extension
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # Qwen2: q/k/v projections carry a bias; LLaMA: none
    max_position_embeddings: int = 32768
    max_batch: int = 8  # largest batch the llm / head graphs declare (CFG runs 2 rows per request)
    head_dim: int | None = None  # default hidden_size // num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def validate(self) -> None:
        if self.arch not in ("qwen2", "llama"):
            raise ConfigError(f"llm.arch: expected 'qwen2' or 'llama', got {self.arch!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"llm: num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"llm: hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")

    def weight_bytes(self, bytes_per_param: float = 4.0, include_embeddings: bool = False) -> float:
        """Bytes of weights read per decode step (embeddings are gathered, not read whole)."""
        h, f, d = self.hidden_size, self.intermediate_size, self.head_size
        attn = h * (self.num_heads * d) * 2 + h * (self.num_kv_heads * d) * 2
        per_layer = attn + 3 * h * f + 2 * h
        total = self.num_layers * per_layer + h
        if include_embeddings:
            total += self.vocab_rows * h
        return total * bytes_per_param


# ----------------------------------------------------------------------------------------------------
# Token ids
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenIds:
    """Special ids of the extended vocabulary (ILLUME+ values by default: see spec/illume.md)."""
    text_vocab_size: int = 151665  # first added token id; ids below are the base tokenizer's
    endoftext: int = 151643
    im_start: int = 151644
    im_end: int = 151645  # stop token of the chat template
    start_of_image: int = 151665
    end_of_image: int = 151666
    end_of_line: int = 151667
    first_level_tag: int = 151668  # <start_of_level0>; <end_of_levelL> = first + 2L + 1
    resolution_tag_step: int = 64  # <height_64> .. <height_1024>
    resolution_tag_max: int = 1024
    tokenizer_len: int | None = None  # len(tokenizer); LM-head rows past it are dead. None: derived

    def level_start(self, level: int) -> int:
        return self.first_level_tag + 2 * level

    def level_end(self, level: int) -> int:
        return self.first_level_tag + 2 * level + 1

    def first_height_tag(self, num_levels: int) -> int:
        return self.first_level_tag + 2 * num_levels

    @property
    def num_resolution_tags(self) -> int:
        return self.resolution_tag_max // self.resolution_tag_step

    def height_tag(self, pixels: int, num_levels: int) -> int:
        return self.first_height_tag(num_levels) + self._tag_index(pixels)

    def width_tag(self, pixels: int, num_levels: int) -> int:
        return self.first_height_tag(num_levels) + self.num_resolution_tags + self._tag_index(pixels)

    def first_code_id(self, num_levels: int) -> int:
        """First id after the structural tokens: where level0's codes start in the release layout."""
        return self.first_height_tag(num_levels) + 2 * self.num_resolution_tags

    def _tag_index(self, pixels: int) -> int:
        step = self.resolution_tag_step
        if pixels % step or not step <= pixels <= self.resolution_tag_max:
            raise ConfigError(f"resolution {pixels}: expected a multiple of {step} in [{step}, "
                              f"{self.resolution_tag_max}]")
        return pixels // step - 1

    def structural_names(self, num_levels: int) -> list[tuple[str, int]]:
        """(token text, id) of every added structural token, in id order."""
        out = [("<start_of_image>", self.start_of_image), ("<end_of_image>", self.end_of_image),
               ("<end_of_line>", self.end_of_line)]
        for level in range(num_levels):
            out += [(f"<start_of_level{level}>", self.level_start(level)),
                    (f"<end_of_level{level}>", self.level_end(level))]
        n = self.num_resolution_tags
        first = self.first_height_tag(num_levels)
        out += [(f"<height_{(i + 1) * self.resolution_tag_step}>", first + i) for i in range(n)]
        out += [(f"<width_{(i + 1) * self.resolution_tag_step}>", first + n + i) for i in range(n)]
        return out


# ----------------------------------------------------------------------------------------------------
# Input branches (continuous features in)
# ----------------------------------------------------------------------------------------------------
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ViT-side resize of the anchor sizes (H, W) -> (H', W'), multiples of 28 (ILLUME+ RESOLUTION_MAPPING).
ILLUME_VIT_RESOLUTION_MAP: tuple[tuple[tuple[int, int], tuple[int, int]], ...] = (
    ((256, 256), (252, 252)), ((512, 512), (504, 504)), ((512, 384), (448, 336)),
    ((384, 512), (336, 448)), ((768, 384), (728, 364)), ((384, 768), (364, 728)),
    ((1024, 256), (1008, 252)), ((256, 1024), (252, 1008)), ((384, 576), (336, 504)),
    ((576, 384), (504, 336)), ((960, 320), (924, 308)), ((320, 960), (308, 924)),
)


@dataclass(frozen=True)
class ViTEncoderConfig:
    """Qwen2-VL vision transformer: 3-D patch embed (temporal x patch x patch), 2-D RoPE, 2x2 merger."""
    kind: str = "qwen2vit"
    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    out_dim: int = 3584  # merger output width (the projector's input)
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0  # base of the 2-D vision RoPE (h and w share one frequency table)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    resolution_map: tuple[tuple[tuple[int, int], tuple[int, int]], ...] = ILLUME_VIT_RESOLUTION_MAP

    @property
    def factor(self) -> int:
        """Pixels per merged token side (28 for Qwen2-VL)."""
        return self.patch_size * self.spatial_merge_size

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    def resize_for(self, height: int, width: int) -> tuple[int, int]:
        """The ViT's input size for an image already resized to (height, width) multiples of 16."""
        for src, dst in self.resolution_map:
            if src == (height, width):
                return dst
        f = self.factor
        return max(f, height // f * f), max(f, width // f * f)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Merged-token grid (rows, cols) for an image of (height, width) before the ViT resize."""
        h, w = self.resize_for(height, width)
        return h // self.factor, w // self.factor


@dataclass(frozen=True)
class MoVQConfig:
    """MoVQGAN-style CNN encoder/decoder (DualViTok pixel branch)."""
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (4,)  # LEVEL indices (0 = finest) whose blocks get attention (release)
    z_channels: int = 32
    embed_dim: int = 32
    in_channels: int = 3
    out_channels: int = 3
    double_z: bool = False
    dropout: float = 0.0
    use_dc_up_down_blocks: bool = True
    norm_groups: int = 32
    resolution: int = 256  # nominal training size; unused (attn_resolutions are level indices, see export/movq.py)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class CNNEncoderConfig:
    kind: str = "movq"
    movq: MoVQConfig = MoVQConfig()
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @property
    def out_dim(self) -> int:
        return self.movq.z_channels

    @property
    def factor(self) -> int:
        return self.movq.downsample

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.factor, width // self.factor


@dataclass(frozen=True)
class InputBranch:
    """One continuous input branch: encoder + 2-layer MLP projector (Linear, GELU, Linear)."""
    name: str  # "semantic" | "pixel"; the ONNX component is vision_<name>
    encoder: ViTEncoderConfig | CNNEncoderConfig
    weight_prefix: str  # encoder weights in the MLLM checkpoint
    projector_prefix: str  # projector weights in the MLLM checkpoint
    level: int  # the output level whose grid and structural tags this branch's features use

    @property
    def in_dim(self) -> int:
        return self.encoder.out_dim

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return self.encoder.grid(height, width)


# ----------------------------------------------------------------------------------------------------
# Output levels (discrete codes out)
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputLevel:
    name: str  # "semantic" | "pixel"
    codebook_size: int
    code_dim: int
    first_token_id: int
    quantizer_prefix: str  # DualViTok state-dict prefix of its SimVQ quantizer
    top_k_scale: float = 1.0  # this level's top-k relative to the request's (pixel: 3x semantic)

    @property
    def token_range(self) -> tuple[int, int]:
        """[start, stop) of this level's code ids."""
        return self.first_token_id, self.first_token_id + self.codebook_size


# ----------------------------------------------------------------------------------------------------
# Detokenizers
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VQDecoderConfig:
    """MoVQ pixel decoder fed by all levels' code maps (semantic upsampled bicubic to the pixel grid)."""
    movq: MoVQConfig = MoVQConfig(ch=384, z_channels=64, embed_dim=64)
    post_quant_prefix: str = "pixel_post_quant_conv"
    decoder_prefix: str = "pixel_decoder"


@dataclass(frozen=True)
class UNetConfig:
    """diffusers UNet2DConditionModel arguments (SDXL layout with a code-map channel concat)."""
    latent_channels: int = 4
    code_channels: int = 64
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    layers_per_block: int = 2
    transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)
    attention_head_dim: tuple[int, ...] = (5, 10, 20)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    cross_attention_dim: int = 2048
    text_seq_len: int = 77  # zero text conditioning: [1, text_seq_len, cross_attention_dim] of zeros
    addition_time_embed_dim: int = 256
    pooled_text_dim: int = 1280
    num_time_ids: int = 6
    norm_num_groups: int = 32
    use_linear_projection: bool = True

    @property
    def in_channels(self) -> int:
        return self.latent_channels + self.code_channels

    @property
    def projection_class_embeddings_input_dim(self) -> int:
        return self.addition_time_embed_dim * self.num_time_ids + self.pooled_text_dim


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    scaling_factor: float = 0.13025
    norm_num_groups: int = 32

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


# Output sizes (width, height) of the SDXL decoder; time_ids = [0]*5 + [index of the output size].
ILLUME_DECODER_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (1024, 1024), (768, 1024), (1024, 768), (512, 2048), (2048, 512), (640, 1920), (1920, 640),
    (768, 1536), (1536, 768), (768, 1152), (1152, 768), (512, 512),
)

SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "sample_max_value": 1.0,
}


@dataclass(frozen=True)
class DiffusionDecoderConfig:
    unet: UNetConfig = UNetConfig()
    vae: VAEConfig = VAEConfig()
    upscale: int = 2  # output pixels per LLM-side pixel
    resolutions: tuple[tuple[int, int], ...] = ILLUME_DECODER_RESOLUTIONS  # (width, height) of the output
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SDXL_SCHEDULER))
    default_steps: int = 25
    default_cfg: float = 1.5
    max_batch: int = 4  # largest batch the unet / vae_decoder graphs declare (CFG runs 2 rows per image)

    def resolution_index(self, height: int, width: int) -> int:
        """Index of an LLM-side (height, width) in the decoder's output-size list (time id 5)."""
        out = (width * self.upscale, height * self.upscale)
        if out not in self.resolutions:
            raise ConfigError(f"decoder output {out[1]}x{out[0]} (HxW) is not one of the diffusion decoder's "
                              f"sizes {[f'{h}x{w}' for w, h in self.resolutions]}")
        return self.resolutions.index(out)


# ----------------------------------------------------------------------------------------------------
# Prompts and sampling defaults
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptTemplates:
    """Qwen chat template and the ILLUME+ task prompts. {h} / {w} are resolution tags, {image} the image."""
    system: str = "You are a helpful assistant."
    turn: str = "<|im_start|>{role}\n{content}<|im_end|>\n"
    assistant_header: str = "<|im_start|>assistant\n"
    image_placeholder: str = "<image>"
    understand: str = "<image>\n{question}"
    generate: str = "Generate an image of {h}{w}, the content of image is {caption}\n"
    generate_uncond: str = "Generate a random image of {h}{w}\n"
    edit: str = "{h}{w}<image>\nPlease edit the image according to the instruction: {instruction}\n"
    edit_uncond: str = "{h}{w}<image>\nReconstruct the image according to the given image\n"
    image_response_prefix: str = "{h}{w}"  # repeated after the assistant header for image outputs
    # Self-assessment (ILLUME's self-enhancing alignment): the answer is one JSON object (runtime/assessment.py)
    assess: str = "<image>\nassess the image for the prompt: {caption}\n"
    # How the model words an understanding answer: "" answers directly; a separator (". ") means it first
    # writes what it sees and its final answer follows the separator's last occurrence
    # (runtime/prompts.final_answer, UnderstandResult.answer). The release answers directly.
    answer_separator: str = ""

    def text_first(self) -> "PromptTemplates":
        """The same prompts with the user's text before the input image (understanding, assessment, editing).
        A causal LLM then reads each image token knowing what is asked of it (which object, which caption,
        which edit); the release's templates put the image first."""
        ph = self.image_placeholder
        return dataclasses.replace(
            self, understand=f"{{question}}\n{ph}",
            assess=f"assess the image for the prompt: {{caption}}\n{ph}\n",
            edit=f"{{h}}{{w}}Please edit the image according to the instruction: {{instruction}}\n{ph}\n")


PROMPT_LAYOUTS = {"image-first": lambda p: p, "text-first": PromptTemplates.text_first}


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = 1.0
    top_k: int = 2048
    top_p: float = 1.0
    cfg: float = 2.0


@dataclass(frozen=True)
class TaskDefaults:
    generate: SamplingDefaults = SamplingDefaults()
    edit: SamplingDefaults = SamplingDefaults(temperature=0.7, top_k=512, top_p=0.8, cfg=1.5)
    understand: SamplingDefaults = SamplingDefaults(temperature=0.0, top_k=128, top_p=1.0, cfg=1.0)
    repetition_penalty: float = 1.0  # overridden by the checkpoint's generation_config.json


ILLUME_ANCHORS: tuple[tuple[int, int], ...] = (
    (256, 256), (512, 512), (384, 512), (512, 384), (384, 768), (768, 384),
    (384, 576), (576, 384), (320, 960), (960, 320), (256, 1024), (1024, 256),
)


# ----------------------------------------------------------------------------------------------------
# The whole model
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    name: str
    llm: LLMConfig
    tokens: TokenIds
    branches: tuple[InputBranch, ...]
    levels: tuple[OutputLevel, ...]
    vq_decoder: VQDecoderConfig | None = None
    diffusion: DiffusionDecoderConfig | None = None
    prompts: PromptTemplates = PromptTemplates()
    defaults: TaskDefaults = TaskDefaults()
    anchors: tuple[tuple[int, int], ...] = ILLUME_ANCHORS
    min_pixels: int = 32 * 32
    max_pixels: int = 768 * 768
    resize_multiple: int = 16
    max_prompt_len: int = 4096

    # --- derived -----------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def tokenizer_len(self) -> int:
        if self.tokens.tokenizer_len is not None:
            return self.tokens.tokenizer_len
        last = self.levels[-1]
        return last.first_token_id + last.codebook_size

    def level_grid(self, level: int, height: int, width: int) -> tuple[int, int]:
        """Code grid (rows, cols) of an output level for an LLM-side resolution (height, width)."""
        for b in self.branches:
            if b.level == level:
                return b.grid(height, width)
        raise ConfigError(f"no input branch defines the grid of level {level}")

    def image_token_count(self, height: int, width: int) -> int:
        """Tokens of one image sequence: SOI, per level (tag, rows of codes + EOL, tag), EOI."""
        n = 2
        for lv in range(self.num_levels):
            rows, cols = self.level_grid(lv, height, width)
            n += 2 + rows * (cols + 1)
        return n

    def head_ranges(self) -> dict[str, tuple[int, int]]:
        """Contiguous vocabulary ranges, one head graph each: text (base + structural), then each level."""
        out = {"text": (0, self.levels[0].first_token_id)}
        for i, lv in enumerate(self.levels):
            out[f"level{i}"] = lv.token_range
        return out

    def validate(self) -> "ModelConfig":
        self.llm.validate()
        if not self.levels:
            raise ConfigError(f"{self.name}: at least one output level is required")
        expected = self.tokens.first_code_id(self.num_levels)
        for i, lv in enumerate(self.levels):
            if lv.first_token_id != expected:
                raise ConfigError(f"{self.name}: level{i} first_token_id expected {expected} (contiguous after "
                                  f"the structural tokens), got {lv.first_token_id}")
            expected += lv.codebook_size
        if self.tokenizer_len > self.llm.vocab_rows:
            raise ConfigError(f"{self.name}: tokenizer length {self.tokenizer_len} exceeds llm.vocab_rows "
                              f"{self.llm.vocab_rows}")
        levels_fed = sorted(b.level for b in self.branches)
        if levels_fed != list(range(self.num_levels)):
            raise ConfigError(f"{self.name}: branches must feed levels 0..{self.num_levels - 1} once each, "
                              f"got {levels_fed}")
        for h, w in self.anchors:
            if h % self.resize_multiple or w % self.resize_multiple:
                raise ConfigError(f"{self.name}: anchor {h}x{w} is not a multiple of {self.resize_multiple}")
            if self.diffusion is not None:
                self.diffusion.resolution_index(h, w)
        return self

    # --- serialisation (manifest.json / config files) ---------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return from_jsonable(cls, d, "config").validate()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _to_jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    return x


def _default_kind(tp: Any) -> str | None:
    f = {f.name: f for f in dataclasses.fields(tp)}.get("kind")
    return f.default if f is not None and isinstance(f.default, str) else None


def from_jsonable(tp: Any, value: Any, where: str) -> Any:
    """Strictly rebuild a (nested) dataclass from JSON: unknown or missing keys are errors."""

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}")
        kwargs = {}
        for name, f in fields.items():
            if name not in value:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ConfigError(f"{where}: missing key {name!r}")
                continue
            kwargs[name] = from_jsonable(hints[name], value[name], f"{where}.{name}")
        return tp(**kwargs)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if isinstance(value, dict) and "kind" in value:  # tagged dataclass union (encoder kinds)
            options = [a for a in options if dataclasses.is_dataclass(a) and _default_kind(a) == value["kind"]]
            if not options:
                raise ConfigError(f"{where}: unknown kind {value['kind']!r}")
        errors = []
        for a in options:
            try:
                return from_jsonable(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {'; '.join(errors)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_jsonable(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(from_jsonable(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


# ----------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------
def _plus_branches(vit: ViTEncoderConfig, cnn: CNNEncoderConfig) -> tuple[InputBranch, ...]:
    return (
        InputBranch("semantic", vit, "model.vision_tower.semantic_encoder", "model.mm_projector.projector_1", 0),
        InputBranch("pixel", cnn, "model.vision_tower.pixel_encoder", "model.mm_projector.projector_2", 1),
    )


def _plus_levels(tokens: TokenIds, semantic: int, pixel: int, code_dim: int = 32) -> tuple[OutputLevel, ...]:
    first = tokens.first_code_id(2)
    return (
        OutputLevel("semantic", semantic, code_dim, first, "semantic_quantizer"),
        OutputLevel("pixel", pixel, code_dim, first + semantic, "pixel_quantizer", top_k_scale=3.0),
    )


def illume_plus(size: str) -> ModelConfig:
    """The released ILLUME+ checkpoints (Qwen2.5-3B / 7B + DualViTok + SDXL diffusion decoder)."""
    llm = {
        "3b": LLMConfig("qwen2", 36, 2048, 16, 2, 11008, vocab_rows=283047),
        "7b": LLMConfig("qwen2", 28, 3584, 28, 4, 18944, vocab_rows=283175),
    }[size]
    tokens = TokenIds(tokenizer_len=282776)
    return ModelConfig(
        name=f"illume-plus-{size}", llm=llm, tokens=tokens,
        branches=_plus_branches(ViTEncoderConfig(), CNNEncoderConfig()),
        levels=_plus_levels(tokens, 32768, 98304),
        vq_decoder=VQDecoderConfig(), diffusion=DiffusionDecoderConfig(),
    ).validate()


_TINY_VIT = ViTEncoderConfig(depth=2, embed_dim=32, num_heads=2, out_dim=48)
_TINY_MOVQ = MoVQConfig(ch=16, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(4,),
                        z_channels=8, embed_dim=8, norm_groups=8)
_TINY_UNET = UNetConfig(code_channels=16, block_out_channels=(32, 64), layers_per_block=1,
                        transformer_layers_per_block=(1, 1), attention_head_dim=(2, 4),
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                        cross_attention_dim=32, text_seq_len=4, addition_time_embed_dim=8,
                        pooled_text_dim=16, norm_num_groups=8)
_TINY_VAE = VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8)  # SDXL-like 8x
_TINY_ANCHORS = ((256, 256), (384, 512), (512, 384), (512, 512))


def tiny_plus() -> ModelConfig:
    """ILLUME+ layout (2 branches, 2 levels, both detokenizers) at toy width: random, seconds to build."""
    tokens = TokenIds(tokenizer_len=None)
    levels = _plus_levels(tokens, 512, 1536, code_dim=8)
    n_vocab = levels[-1].first_token_id + levels[-1].codebook_size
    return ModelConfig(
        name="tiny-plus",
        llm=LLMConfig("qwen2", 2, 64, 4, 2, 128, vocab_rows=n_vocab + 64, max_position_embeddings=4096),
        tokens=tokens,
        branches=_plus_branches(_TINY_VIT, CNNEncoderConfig(movq=_TINY_MOVQ)),
        levels=levels,
        vq_decoder=VQDecoderConfig(movq=MoVQConfig(ch=16, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1,
                                                   attn_resolutions=(4,), z_channels=16, embed_dim=16,
                                                   norm_groups=8)),
        diffusion=DiffusionDecoderConfig(unet=_TINY_UNET, vae=_TINY_VAE, default_steps=4),
        anchors=_TINY_ANCHORS,
    ).validate()


def tiny_v1() -> ModelConfig:
    """ILLUME v1 layout: one semantic branch and one semantic level, LLaMA LLM, diffusion decoder."""
    tokens = TokenIds(tokenizer_len=None)
    first = tokens.first_code_id(1)
    levels = (OutputLevel("semantic", 512, 8, first, "semantic_quantizer"),)
    n_vocab = first + 512
    return ModelConfig(
        name="tiny-v1",
        llm=LLMConfig("llama", 2, 64, 4, 4, 128, vocab_rows=n_vocab, rope_theta=10000.0,
                      attention_bias=False, rms_norm_eps=1e-5, max_position_embeddings=4096),
        tokens=tokens,
        branches=(InputBranch("semantic", _TINY_VIT, "model.vision_tower.semantic_encoder",
                              "model.mm_projector", 0),),
        levels=levels,
        vq_decoder=None,
        diffusion=DiffusionDecoderConfig(unet=dataclasses.replace(_TINY_UNET, code_channels=8), vae=_TINY_VAE,
                                         default_steps=4),
        anchors=_TINY_ANCHORS,
    ).validate()


# ILLUME-nano: the project's own trained member of the family (docs/nano.md). 48x48 images of the shapes world,
# one semantic level (6x6 codes), a word-level base vocabulary below <|endoftext|>, a pixel-space-sized
# diffusion decoder with a 4x VAE. Ids are laid out exactly like the release (Qwen specials, structural tokens,
# codes), only shifted down to a small text vocabulary.
NANO_TEXT_IDS = 1024  # byte symbols + the world's words and their BPE pieces + filler (see nano/tokenizer)


def illume_nano() -> ModelConfig:
    eot = NANO_TEXT_IDS
    text_vocab = eot + 22  # Qwen2.5's 22 special tokens from <|endoftext|>
    tokens = TokenIds(text_vocab_size=text_vocab, endoftext=eot, im_start=eot + 1, im_end=eot + 2,
                      start_of_image=text_vocab, end_of_image=text_vocab + 1, end_of_line=text_vocab + 2,
                      first_level_tag=text_vocab + 3, resolution_tag_step=16, resolution_tag_max=64)
    first = tokens.first_code_id(1)
    codebook = 128
    n_vocab = first + codebook
    vit = ViTEncoderConfig(depth=3, embed_dim=64, num_heads=4, mlp_ratio=2.0, patch_size=4, out_dim=96,
                           resolution_map=())
    unet = UNetConfig(latent_channels=4, code_channels=16, block_out_channels=(48, 96), layers_per_block=1,
                      transformer_layers_per_block=(1, 1), attention_head_dim=(2, 4),
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      cross_attention_dim=32, text_seq_len=1, addition_time_embed_dim=8, pooled_text_dim=16,
                      norm_num_groups=16)
    vae = VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, scaling_factor=1.0,
                    norm_num_groups=16)
    return ModelConfig(
        name="illume-nano",
        llm=LLMConfig("qwen2", 4, 128, 4, 2, 384, vocab_rows=-(-n_vocab // 64) * 64, rope_theta=10000.0,
                      max_position_embeddings=512, max_batch=8),
        tokens=tokens,
        branches=(InputBranch("semantic", vit, "model.vision_tower.semantic_encoder", "model.mm_projector", 0),),
        levels=(OutputLevel("semantic", codebook, 16, first, "semantic_quantizer"),),
        vq_decoder=None,
        # x0 ("sample") prediction: at this scale the code map nearly determines the image, and predicting it
        # directly decoded 3x more images faithfully than epsilon prediction for the same training steps
        # decoder CFG 3 (was 1.5): chosen with the sampling defaults below; it draws the code map's colors more
        # faithfully (two objects 0.86 -> 0.97 on the development set)
        diffusion=DiffusionDecoderConfig(unet=unet, vae=vae, upscale=1, resolutions=((48, 48),), default_steps=10,
                                         default_cfg=3.0, max_batch=8,
                                         scheduler=dict(SDXL_SCHEDULER, prediction_type="sample")),
        # chosen on a development set of training-split prompts and edits (nano.sampling_sweep; docs/nano.md,
        # "Sampling defaults"): at temperature 1 this small model samples its own mistakes, and editing's
        # unconditional row is the source's reconstruction, so CFG above 1 redraws the objects left alone
        defaults=TaskDefaults(generate=SamplingDefaults(temperature=0.4, top_k=8, top_p=1.0, cfg=2.0),
                              edit=SamplingDefaults(temperature=0.2, top_k=8, top_p=1.0, cfg=1.0),
                              understand=SamplingDefaults(temperature=0.0, top_k=1, top_p=1.0, cfg=1.0)),
        anchors=((48, 48),),
        min_pixels=48 * 48,
        max_pixels=48 * 48,
        max_prompt_len=448,
    ).validate()


PRESETS = {
    "illume-nano": illume_nano,
    "illume-plus-3b": lambda: illume_plus("3b"),
    "illume-plus-7b": lambda: illume_plus("7b"),
    "tiny-plus": tiny_plus,
    "tiny-v1": tiny_v1,
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
