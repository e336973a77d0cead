"""The two decode loops on top of `LLMRunner`: image tokens (grammar + CFG) and text (streamed).

Image loop, per image: the grammar says whether the next token is forced or sampled. Forced tokens are
queued and fed together with the last sampled token in one LLM call (a row's last code, its EOL and the
next level's tags go in as one step); a sampled position runs only its level's head on the last hidden
state, combines the CFG rows (row 0 conditional, row 1 unconditional) and draws with the request's
pre-drawn uniform. The draw is a `Pick`: `host_pick` (the numpy sampler on the host's copy of the logits)
or `device_pick` (the CUDA sampling kernel on the logits where the head wrote them; only the token id
comes back). Text loop: the text head through the same `Pick`, codes, level tags and dead head rows banned
(`grammar.text_banned_ranges`: -inf on the host, the kernel's ban ranges on the device), stop ids end it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from ..config import ModelConfig
from ..manifest import EngineError
from .grammar import Forced, ImageGrammar, ban_ranges, text_banned_ranges
from .llm_runner import DecodeState, LLMRunner
from .sampler import SamplingParams, Uniforms, guided_sample, level_params

ProgressFn = Callable[[int, int], None]  # (done, total)
Ranges = Sequence[tuple[int, int]]  # global [start, stop) id ranges
# (runner, state, head, params, uniforms [1], range_start, use_cfg, banned) -> the sampled token's id
Pick = Callable[[LLMRunner, DecodeState, str, SamplingParams, np.ndarray, int, bool, Ranges], int]


def host_pick(runner: LLMRunner, state: DecodeState, head: str, params: SamplingParams, uniforms: np.ndarray,
              range_start: int, use_cfg: bool, banned: Ranges = ()) -> int:
    """Run `head`, then `guided_sample` on its logits on the host: row 0 conditional, row 1 unconditional;
    the `banned` ids at -inf."""
    logits = runner.logits(head, state=state)  # [B, range]
    if banned:
        logits = ban_ranges(logits, banned, range_start)
    idx = guided_sample(logits[:1], logits[1:2] if use_cfg else None, params, uniforms, range_start=range_start,
                        generated_ids_per_row=state.fed[:1])
    return range_start + int(idx[0])


def device_pick(sampler) -> Pick:
    """A `Pick` on the CUDA sampling kernel (`cuda.GpuSampler`, or anything with its `sample_device` and
    `binding`): one launch per step reads the head's [cond; uncond] logits in place on the device
    (`runner.head_logits`), with the same semantics and uniforms as `guided_sample`, and writes the id
    straight into the next decode step's input ids, every row of the batch (`runner.step_ids`, static
    decode), and advances those rows' positions and attention mask there (`runner.step_to_advance`), so that
    the step that feeds the token writes none of its inputs from the host; without static decode the id goes
    into an 8-byte device buffer of the sampler's. Only that id is copied to the host (the grammar, streaming
    and stop checks need it), and that read is the step's one wait for the device where the engine's sessions
    run on the sampler's stream (`SessionOptions.compute_stream` = its `stream_handle`): their decode-step and
    head runs then return unsynchronized (`LLMRunner.order_on_stream`). `banned` ranges go to the kernel's
    stage 1b."""
    from .cuda.kernel import StepAdvance, pack_launch

    scratch = sampler.binding.alloc(8)  # int64, for engines without static decode steps
    memory = getattr(sampler, "memory", "cuda")  # where the buffers it takes by address must be
    host = np.zeros(1, np.int64)
    stream = getattr(sampler, "stream_handle", None)  # the CUDA stream the engine's sessions may share

    def pick(runner: LLMRunner, state: DecodeState, head: str, params: SamplingParams, uniforms: np.ndarray,
             range_start: int, use_cfg: bool, banned: Ranges = ()) -> int:
        if stream is not None and not state.ordered_by_caller:  # from here on the runs need not synchronize
            runner.order_on_stream(state, stream)
        logits = runner.head_logits(head, state)  # DeviceArray [B, range]
        rows, v = logits.shape
        if logits.dtype not in (np.float32, np.float16):
            raise EngineError(f"head_{head}: the sampling kernel reads float32 or float16 logits, got {logits.dtype}")
        ids = runner.step_ids(state)  # [B, 1]: the token goes to every row (a CFG pair takes the same token)
        for name, buf in (("logits", logits), ("input ids", ids)):
            if buf is not None and buf.device != memory:  # a host address on the GPU: an illegal address
                raise EngineError(f"head_{head}: the sampling kernel reads and writes {memory} memory, the {name} "
                                  f"are on {buf.device!r}; load the engine with device='cuda' (--device cuda) "
                                  f"or sample on the host (sampler='host')")
        la = pack_launch(1, params, uniforms, v=v, range_start=range_start, has_uncond=use_cfg and rows > 1,
                         generated_ids_per_row=state.fed[:1], banned=banned)
        if ids is None:
            sampler.sample_device(logits.address, str(logits.dtype), v, 0, la, sampler.binding.ptr(scratch), 1)
            sampler.read(host, scratch)
        else:  # the token into every row's next input id, and (static steps) their positions and mask
            target = runner.step_to_advance(state)
            advance = None if target is None else StepAdvance(target[0].address, target[1].address,
                                                              target[1].shape[1], target[2])
            sampler.sample_device(logits.address, str(logits.dtype), v, 0, la, ids.address, state.batch,
                                  state.batch, advance)
            sampler.read(host, ids.address)
            if advance is not None and host[0] >= 0:
                runner.step_advanced(state)
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
                timings: Timings | None = None, ignore_eos: bool = False, pick: Pick = host_pick
                ) -> Iterator[str]:
    """Yield decoded text pieces as tokens are generated; stops at the stop ids or `max_new_tokens`
    (`ignore_eos`: always `max_new_tokens` tokens, for benchmarks). `pick` draws each token (`host_pick`, or
    `device_pick`: the kernel writes it into the next step's input ids)."""
    cfg: ModelConfig = runner.cfg
    timings = timings or Timings()
    stops = set() if ignore_eos else {cfg.tokens.im_end, cfg.tokens.endoftext}
    banned, text_start = text_banned_ranges(cfg), cfg.head_ranges()["text"][0]
    uniforms = Uniforms(seed, rows=1, steps=max_new_tokens)
    decoder = tokenizer.stream()
    t0 = time.perf_counter()
    state = runner.prefill([prompt], image_embeds, max_new_tokens=max_new_tokens)
    timings.add("prefill", time.perf_counter() - t0)
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        token = pick(runner, state, "text", params, uniforms[step], text_start, False, banned)
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
