"""The user-facing API: `Pipeline.load(engine_dir)`, then `understand`, `generate`, `edit`.

Each call returns its result with per-stage timings (seconds). `understand(..., stream=True)` returns a
`TextStream` that yields text pieces as tokens decode; its `.result` is filled when it is exhausted.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..config import ConfigError, ModelConfig
from .assessment import complete_object, parse_assessment
from .decode_loops import Timings, device_pick, host_pick, sample_image_tokens, stream_text
from .detokenize import code_maps, diffusion_decode, vq_decode
from .engine import Engine
from .image_prep import letterbox_to_anchor, load_image, preprocess_image, unletterbox
from .llm_runner import LLMRunner
from .prompts import (TextTokenizer, assess_prompt, edit_prompts, final_answer, generate_prompts,
                      understand_prompt)
from .sampler import SamplingParams
from .session import SessionOptions
from .vision import PromptTable, encode_image

ImageInput = bytes | str | Path | np.ndarray | object  # path, bytes, PIL image or uint8 array
ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)
DECODERS = ("auto", "diffusion", "vq")
# Pipeline.assess stops at the answer's closing brace; this only bounds a rambling one. 128: an assessment that
# opens with the evidence field reaches 123 tokens for a three-object caption (tests/test_nano_model.py)
ASSESS_MAX_NEW_TOKENS = 128


@dataclass
class UnderstandResult:
    text: str  # the whole reply
    timings: dict[str, float]
    answer: str  # its final answer (prompts.final_answer: the reply itself unless the model reasons first)


@dataclass
class AssessResult:
    text: str  # the model's answer, cut after its JSON object
    assessment: dict | None  # parsed (score as float), None when the answer held no valid assessment
    timings: dict[str, float]


@dataclass
class ImageResult:
    image: np.ndarray  # uint8 [H, W, 3]
    codes: list[np.ndarray]  # per level, int64 [h_l, w_l]
    resolution: tuple[int, int]  # LLM-side (height, width)
    decoder: str
    timings: dict[str, float]
    seed: int
    assessment: dict | None = field(default=None)  # best_of > 1: the model's assessment of this image
    candidates: list["ImageResult"] = field(default_factory=list)  # best_of > 1: every candidate, in seed order


class TextStream:
    """Iterate to receive text pieces; `.result` holds the full answer and timings afterwards."""

    def __init__(self, pieces: Iterator[str], timings: Timings, t0: float, answer_separator: str = ""):
        self._pieces, self._t0, self._separator = pieces, t0, answer_separator
        self.timings = timings  # per-stage seconds so far (complete once iteration ends)
        self._text: list[str] = []
        self.result: UnderstandResult | None = None

    def __iter__(self) -> Iterator[str]:
        for piece in self._pieces:
            self._text.append(piece)
            yield piece
        self.timings.add("total", time.perf_counter() - self._t0)
        text = "".join(self._text)
        self.result = UnderstandResult(text, dict(self.timings.stages), final_answer(text, self._separator))

    def close(self) -> None:
        """Stop decoding here: a GPU decode step queued ahead of the last read token is waited for
        (`decode_loops.text_tokens`), so the next request may reuse the buffers."""
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()


def to_rgb(image: ImageInput) -> np.ndarray:
    """uint8 [H, W, 3] from a path, bytes, a PIL image or an array (validated like a decoded file)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array: expected uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
        from PIL import Image

        image = Image.fromarray(image)  # one path for every input: size bounds and checks of load_image
    return load_image(image)


def parse_resolution(value: str | Sequence[int] | None, cfg: ModelConfig) -> tuple[int, int]:
    """'HxW' or (H, W) -> an anchor resolution of the model (default: its first anchor)."""
    if value is None:
        return cfg.anchors[0]
    if isinstance(value, str):
        try:
            h, w = (int(v) for v in value.lower().split("x"))
        except ValueError:
            raise ValueError(f"resolution {value!r}: expected HxW, e.g. 256x256") from None
    else:
        h, w = (int(v) for v in value)
    if (h, w) not in cfg.anchors:
        raise ValueError(f"resolution {h}x{w} is not supported by {cfg.name}; choose one of "
                         f"{', '.join(f'{a}x{b}' for a, b in cfg.anchors)}")
    return h, w


SAMPLERS = ("auto", "host", "device")


class Pipeline:
    def __init__(self, engine: Engine, sampler: str = "auto", gpu_sampler=None):
        """`sampler` draws the image and text tokens: "host" (numpy, `decode_loops.host_pick`), "device" (the CUDA
        kernel on the logits in device memory, `decode_loops.device_pick`; needs pycuda or cuda-python),
        "auto": "device" when the engine's sessions bind to a CUDA device (then a missing binding is an error
        that names both; pass "host" to sample on the host), else "host" (also where the runtime moved
        only the llm's buffers to the GPU itself, `session.buffer_device`: the heads' logits stay on the
        host). `gpu_sampler`: the `cuda.GpuSampler` to draw with (`load` makes it before the sessions, which
        then run on its stream), else one is made here."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
        self.engine = engine
        self.cfg = engine.config
        self.tokenizer = TextTokenizer.from_file(engine.asset_path("tokenizer"), self.cfg)
        self.runner = LLMRunner(engine)
        gen = engine.json_asset("generation_config")
        self.repetition_penalty = float(gen.get("repetition_penalty", self.cfg.defaults.repetition_penalty))
        session = self.runner.session
        if sampler == "auto":  # the kernel where the caller put every buffer on the GPU
            sampler = "device" if session.device == "cuda" and session.device_requested else "host"
        self.pick = host_pick
        if sampler == "device":
            if gpu_sampler is None:
                from .cuda import GpuSampler

                gpu_sampler = GpuSampler()
            self.pick = device_pick(gpu_sampler)

    @classmethod
    def load(cls, engine_dir: str | Path, *, providers: list[str] | None = None, threads: int | None = None,
             check_hash: bool = True, device: str = "cpu", sampler: str = "auto",
             cuda_graph: bool | None = None, provider_options: dict | None = None) -> "Pipeline":
        """`device` "cuda" keeps the request's buffers (KV cache, hidden state, logits) in GPU memory (with
        onnxruntime-gpu's CUDA or TensorRT provider); `cuda_graph` replays the decode step as a CUDA graph
        (SessionOptions.cuda_graph); `provider_options` go to onnxruntime's providers
        (runtime/provider_options.py); see `__init__` for `sampler`. With `device` "cuda" the CUDA sampling
        kernel is made first, and the sessions run on its stream (SessionOptions.compute_stream), so that a
        decode step waits for the device once (docs/gpu.md, "One stream for the decode step")."""
        gpu_sampler = None
        if device == "cuda" and sampler in ("auto", "device"):
            from .cuda import CudaUnavailableError, GpuSampler

            try:
                gpu_sampler = GpuSampler()
            except CudaUnavailableError:
                if sampler == "device":
                    raise
                # "auto": __init__ decides from the sessions, and names what is missing if it needs the kernel
        opts = SessionOptions(providers=providers, threads=threads, device=device, cuda_graph=cuda_graph,
                              provider_options=provider_options,
                              compute_stream=None if gpu_sampler is None else gpu_sampler.stream_handle)
        return cls(Engine.load(engine_dir, opts, check_hash), sampler, gpu_sampler)

    # --- parameters ---------------------------------------------------------------------------------------
    def _params(self, task: str, temperature, top_k, top_p, cfg_scale, repetition_penalty) -> SamplingParams:
        """The task's defaults (and the checkpoint's repetition penalty), overridden by what the call sets."""
        base = SamplingParams.from_defaults(getattr(self.cfg.defaults, task), self.repetition_penalty)
        given = dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                     repetition_penalty=repetition_penalty)
        return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})

    def _decoder(self, decoder: str) -> str:
        if decoder not in DECODERS:
            raise ValueError(f"decoder {decoder!r}: choose one of {DECODERS}")
        if decoder == "auto":
            return "diffusion" if self.engine.has("unet") else "vq"
        if not self.engine.has("unet" if decoder == "diffusion" else "vq_decoder"):
            raise ConfigError(f"{self.cfg.name}: this engine has no {decoder} decoder")
        return decoder

    # --- understanding ------------------------------------------------------------------------------------
    def understand(self, image: ImageInput, question: str, *, max_new_tokens: int = 256,
                   temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                   repetition_penalty: float | None = None, seed: int = 0,
                   stream: bool = False) -> UnderstandResult | TextStream:
        prompt = understand_prompt(self.tokenizer, self.cfg, question)
        params = self._params("understand", temperature, top_k, top_p, 1.0, repetition_penalty)
        out = self._stream(image, prompt, params, seed, max_new_tokens)
        if stream:
            return out
        for _ in out:
            pass
        return out.result

    def assess(self, image: ImageInput, prompt: str, *, max_new_tokens: int = ASSESS_MAX_NEW_TOKENS,
               seed: int = 0) -> AssessResult:
        """The model's own judgement of `image` against the generation `prompt` (cfg.prompts.assess), greedy;
        decoding stops as soon as the answer's JSON object is complete."""
        t0 = time.perf_counter()
        params = self._params("understand", None, None, None, 1.0, None)
        stream = self._stream(image, assess_prompt(self.tokenizer, self.cfg, prompt), params, seed, max_new_tokens)
        text, obj = "", None
        for piece in stream:
            text += piece
            if "}" in piece and (obj := complete_object(text)) is not None:
                break
        stream.close()
        timings = dict(stream.timings.stages, total=time.perf_counter() - t0)
        return AssessResult(obj or text, parse_assessment(obj or text), timings)

    def _stream(self, image: ImageInput, prompt, params: SamplingParams, seed: int, max_new_tokens: int) -> TextStream:
        t0 = time.perf_counter()
        timings = Timings()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        with timings.timed("preprocess"):
            pixels = preprocess_image(to_rgb(image), self.cfg)
        table = PromptTable(self.cfg)
        image_ids = table.add(encode_image(self.engine, pixels, timings))
        pieces = stream_text(self.runner, self.tokenizer, prompt.expand([image_ids]), table.table(), params, seed,
                             max_new_tokens, timings, pick=self.pick)
        return TextStream(pieces, timings, t0, self.cfg.prompts.answer_separator)

    # --- generation ---------------------------------------------------------------------------------------
    def generate(self, prompt: str, *, resolution: str | Sequence[int] | None = None, seed: int = 0,
                 cfg: float | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float | None = None, decoder: str = "auto",
                 steps: int | None = None, decoder_cfg: float | None = None,
                 progress: ProgressFn | None = None, best_of: int = 1) -> ImageResult:
        """Text to image. `best_of=N` > 1: N candidates (seeds seed .. seed+N-1), each assessed by the model
        itself against `prompt` (`assess`); the best score wins (ties: the earlier seed). The winner carries its
        `assessment` and the list of all `candidates`."""
        if not isinstance(best_of, int) or best_of < 1:
            raise ValueError(f"best_of must be a positive integer, got {best_of!r}")
        if best_of > 1:
            return self._best_of(prompt, best_of, seed, dict(resolution=resolution, cfg=cfg, temperature=temperature,
                                 top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, decoder=decoder,
                                 steps=steps, decoder_cfg=decoder_cfg, progress=progress))
        t0 = time.perf_counter()
        h, w = parse_resolution(resolution, self.cfg)
        cond, uncond = generate_prompts(self.tokenizer, self.cfg, prompt, h, w)
        params = self._params("generate", temperature, top_k, top_p, cfg, repetition_penalty)
        result = self._image(Timings(), [cond.ids(), uncond.ids()], None, h, w, params, seed, decoder, steps,
                             decoder_cfg, progress)
        result.timings["total"] = time.perf_counter() - t0
        return result

    def _best_of(self, prompt: str, n: int, seed: int, kwargs: dict) -> ImageResult:
        t0 = time.perf_counter()
        candidates = []
        for i in range(n):
            result = self.generate(prompt, seed=seed + i, **kwargs)
            judged = self.assess(result.image, prompt)
            result.assessment = judged.assessment
            result.timings["assess"] = judged.timings["total"]
            candidates.append(result)
        scores = [c.assessment["score"] if c.assessment is not None else -1.0 for c in candidates]
        best = candidates[int(np.argmax(scores))]  # argmax: first of equal scores
        return dataclasses.replace(best, candidates=candidates,
                                   timings={**best.timings, "total": time.perf_counter() - t0})

    def edit(self, image: ImageInput, instruction: str, *, seed: int = 0, cfg: float | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float | None = None, decoder: str = "auto", steps: int | None = None,
             decoder_cfg: float | None = None, keep_size: bool = True,
             progress: ProgressFn | None = None) -> ImageResult:
        """Edit `image`: letterboxed (white) to the nearest anchor, fed to both CFG rows as continuous
        features; the result is cropped back to the source's aspect (and size, when `keep_size`)."""
        t0 = time.perf_counter()
        timings = Timings()
        with timings.timed("preprocess"):
            source = to_rgb(image)
            boxed, (h, w), _ = letterbox_to_anchor(source, self.cfg.anchors)
            pixels = preprocess_image(boxed, self.cfg)
        cond, uncond = edit_prompts(self.tokenizer, self.cfg, instruction, h, w)
        params = self._params("edit", temperature, top_k, top_p, cfg, repetition_penalty)
        table = PromptTable(self.cfg)
        image_ids = table.add(encode_image(self.engine, pixels, timings))
        result = self._image(timings, [cond.expand([image_ids]), uncond.expand([image_ids])], table.table(), h, w,
                             params, seed, decoder, steps, decoder_cfg, progress)
        if keep_size:
            with timings.timed("postprocess"):
                result.image = unletterbox(result.image, source.shape[:2])
        result.timings = dict(timings.stages, total=time.perf_counter() - t0)
        return result

    def _image(self, timings: Timings, rows: list[list[int]], table: np.ndarray | None, h: int, w: int,
               params: SamplingParams, seed: int, decoder: str, steps: int | None, decoder_cfg: float | None,
               progress: ProgressFn | None) -> ImageResult:
        decoder = self._decoder(decoder)

        def report(stage):
            return None if progress is None else (lambda done, total: progress(stage, done, total))

        tokens = sample_image_tokens(self.runner, rows, table, h, w, params, seed, timings, report("tokens"),
                                     self.pick)
        maps = code_maps(self.engine, tokens.codes)
        if decoder == "vq":
            image = vq_decode(self.engine, maps, timings)
        else:
            dcfg = self.cfg.diffusion
            image = diffusion_decode(self.engine, maps, h, w, steps=steps or dcfg.default_steps,
                                     cfg_scale=dcfg.default_cfg if decoder_cfg is None else decoder_cfg, seed=seed,
                                     timings=timings, progress=report("diffusion"))
        return ImageResult(image, tokens.codes, (h, w), decoder, dict(timings.stages), seed)
