"""The two decode loops on top of `LLMRunner`: image tokens (grammar + CFG) and text (streamed).

Image loop, per image: the grammar says whether the next token is forced or sampled. Forced tokens are
queued and fed together with the last sampled token in one LLM call (a row's last code, its EOL and the
next level's tags go in as one step); a sampled position runs only its level's head on the last hidden
state, combines the CFG rows (row 0 conditional, row 1 unconditional) and draws with the request's
pre-drawn uniform. The draw is a `Pick`: `host_pick` (the numpy sampler on the host's copy of the logits)
or `device_pick` (the CUDA sampling kernel on the logits where the head wrote them; only the token id
comes back). Text loop: the text head, codes and level tags banned, stop ids end it (on the host: the
kernel takes an allowed id range, not a ban list).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..config import ModelConfig
from ..manifest import EngineError
from .grammar import Forced, ImageGrammar, mask_text_logits
from .llm_runner import DecodeState, LLMRunner
from .sampler import SamplingParams, Uniforms, guided_sample, level_params

ProgressFn = Callable[[int, int], None]  # (done, total)
# (runner, state, head, params, uniforms [1], range_start, use_cfg) -> the sampled token's id
Pick = Callable[[LLMRunner, DecodeState, str, SamplingParams, np.ndarray, int, bool], int]


def host_pick(runner: LLMRunner, state: DecodeState, head: str, params: SamplingParams, uniforms: np.ndarray,
              range_start: int, use_cfg: bool) -> int:
    """Run `head`, then `guided_sample` on its logits on the host: row 0 conditional, row 1 unconditional."""
    logits = runner.logits(head, state=state)  # [B, range]
    idx = guided_sample(logits[:1], logits[1:2] if use_cfg else None, params, uniforms, range_start=range_start,
                        generated_ids_per_row=state.fed[:1])
    return range_start + int(idx[0])


def device_pick(sampler) -> Pick:
    """A `Pick` on the CUDA sampling kernel (`cuda.GpuSampler`, or anything with its `sample_device` and
    `binding`): one launch per step reads the head's [cond; uncond] logits in place on the device
    (`runner.head_logits`), with the same semantics and uniforms as `guided_sample`, and writes the id
    straight into the next decode step's input ids, every row of the batch (`runner.step_ids`, static
    decode), else into an 8-byte device buffer of the sampler's. Only that id is copied to the host (the
    grammar needs it)."""
    from .cuda.kernel import pack_launch

    scratch = sampler.binding.alloc(8)  # int64, for engines without static decode steps
    host = np.zeros(1, np.int64)

    def pick(runner: LLMRunner, state: DecodeState, head: str, params: SamplingParams, uniforms: np.ndarray,
             range_start: int, use_cfg: bool) -> int:
        logits = runner.head_logits(head, state)  # DeviceArray [B, range]
        rows, v = logits.shape
        if logits.dtype not in (np.float32, np.float16):
            raise EngineError(f"head_{head}: the sampling kernel reads float32 or float16 logits, got {logits.dtype}")
        la = pack_launch(1, params, uniforms, v=v, range_start=range_start, has_uncond=use_cfg and rows > 1,
                         generated_ids_per_row=state.fed[:1])
        ids = runner.step_ids(state)  # [B, 1]: the token goes to every row (a CFG pair takes the same token)
        if ids is None:
            sampler.sample_device(logits.address, str(logits.dtype), v, 0, la, sampler.binding.ptr(scratch), 1)
            sampler.binding.dtoh(host, scratch)
        else:
            sampler.sample_device(logits.address, str(logits.dtype), v, 0, la, ids.address, state.batch,
                                  state.batch)
            sampler.binding.dtoh(host, ids.address)
        if host[0] < 0:
            raise EngineError(f"head_{head}: the sampling kernel found NaN/+inf or no finite logit in row 0")
        if ids is not None:
            runner.ids_written(state, int(host[0]))
        return int(host[0])

    return pick


@dataclass
class Timings:
    """Seconds per stage, accumulated."""
    stages: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds

    def timed(self, name: str):
        return _Timer(self, name)

    def merge(self, other: "Timings") -> None:
        for k, v in other.stages.items():
            self.add(k, v)

    def __str__(self) -> str:
        return ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in self.stages.items())


class _Timer:
    def __init__(self, timings: Timings, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.timings.add(self.name, time.perf_counter() - self.t0)


@dataclass
class ImageTokens:
    codes: list[np.ndarray]  # per level, int64 [h_l, w_l] indices into the level's codebook
    height: int
    width: int
    llm_calls: int
    sampled: int


def sample_image_tokens(runner: LLMRunner, rows: list[list[int]], image_embeds: np.ndarray | None,
                        height: int, width: int, params: SamplingParams, seed: int,
                        timings: Timings | None = None, progress: ProgressFn | None = None,
                        pick: Pick = host_pick) -> ImageTokens:
    """Generate one image's tokens. `rows` = [conditional] or [conditional, unconditional] prompt ids."""
    cfg = runner.cfg
    timings = timings or Timings()
    grammar = ImageGrammar(cfg, height, width)
    n_samples = sum(h * w for h, w in (cfg.level_grid(lv, height, width) for lv in range(cfg.num_levels)))
    uniforms = Uniforms(seed, rows=1, steps=n_samples)
    per_level = [level_params(params, lv) for lv in cfg.levels]
    use_cfg = len(rows) == 2 and params.cfg_scale != 1.0
    if not use_cfg:
        rows = rows[:1]
    with timings.timed("prefill"):
        state = runner.prefill(rows, image_embeds, max_new_tokens=grammar.length)
    pending: list[int] = []
    calls, sampled = 1, 0
    with timings.timed("image_tokens"):
        while not grammar.done:
            step = grammar.next()
            if isinstance(step, Forced):
                run = grammar.forced_run()
                for t in run:
                    grammar.advance(t)
                pending += run
                if progress is not None:  # forced runs close rows (EOL) and levels: progress per row
                    progress(grammar.pos, grammar.length)
                continue
            if pending:
                runner.feed(state, np.tile(np.asarray(pending, np.int64), (state.batch, 1)))  # [B, S]
                pending, calls = [], calls + 1
            token = pick(runner, state, f"level{step.level}", per_level[step.level], uniforms[sampled], step.start,
                         use_cfg)
            grammar.advance(token)
            pending.append(token)
            sampled += 1
    return ImageTokens(grammar.codes(), height, width, calls, sampled)


def stream_text(runner: LLMRunner, tokenizer, prompt: list[int], image_embeds: np.ndarray | None,
                params: SamplingParams, seed: int, max_new_tokens: int,
                timings: Timings | None = None, ignore_eos: bool = False) -> Iterator[str]:
    """Yield decoded text pieces as tokens are generated; stops at the stop ids or `max_new_tokens`
    (`ignore_eos`: always `max_new_tokens` tokens, for benchmarks)."""
    cfg: ModelConfig = runner.cfg
    timings = timings or Timings()
    stops = set() if ignore_eos else {cfg.tokens.im_end, cfg.tokens.endoftext}
    uniforms = Uniforms(seed, rows=1, steps=max_new_tokens)
    decoder = tokenizer.stream()
    t0 = time.perf_counter()
    state = runner.prefill([prompt], image_embeds, max_new_tokens=max_new_tokens)
    timings.add("prefill", time.perf_counter() - t0)
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        logits = mask_text_logits(runner.logits("text", state=state), cfg)  # [1, text range]
        token = int(guided_sample(logits, None, params, uniforms[step], range_start=0,
                                  generated_ids_per_row=state.fed)[0])
        if token in stops:
            break
        piece = decoder.push(token)
        if piece:
            timings.add("decode", time.perf_counter() - t0)
            yield piece
            t0 = time.perf_counter()
        if step + 1 < max_new_tokens:
            runner.feed(state, np.array([[token]], np.int64))
        else:
            state.fed[0].append(token)
    timings.add("decode", time.perf_counter() - t0)
    tail = decoder.flush()
    if tail:
        yield tail
