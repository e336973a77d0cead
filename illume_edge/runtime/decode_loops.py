"""The two decode loops on top of `LLMRunner`: image tokens (grammar + CFG) and text (streamed).

Image loop, per image: the grammar says whether the next token is forced or sampled. Forced tokens are
queued and fed together with the last sampled token in one LLM call (a row's last code, its EOL and the
next level's tags go in as one step); a sampled position runs only its level's head on the last hidden
state, combines the CFG rows (row 0 conditional, row 1 unconditional) and draws with the request's
pre-drawn uniform. The draw is a `Pick`: `host_pick` (the numpy sampler on the host's copy of the logits)
or `DevicePick` (the CUDA sampling kernel on the logits where the head wrote them; only the token id
comes back). Text loop: the text head through the same `Pick`, codes, level tags and dead head rows banned
(`grammar.text_banned_ranges`: -inf on the host, the kernel's ban ranges on the device), stop ids end it.

With a `DevicePick` both loops read each token one step late: the kernel writes token t into the next
step's input ids, so the step that feeds it and the draw of token t + 1 are queued on the device before
the host waits for token t (docs/gpu.md, "Reading a token one step late"). The image loop does so within a
row of codes (each row ends with a forced `<end_of_line>`, which the host feeds with the row's last code);
the text loop throughout, one step queued past a stop token.
"""
from __future__ import annotations

import time
from contextlib import closing
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


@dataclass
class Ticket:
    """A token a `DevicePick.launch` draws on the device, not read yet (`DevicePick.wait` reads it)."""
    read: int  # the sampler's read_async ticket
    state: DecodeState
    head: str
    into_step: bool  # written into the state's step ids (static decode), not the sampler's scratch
    launch: int  # the pick's launch number


class DevicePick:
    """A `Pick` on the CUDA sampling kernel (`cuda.GpuSampler`, or anything with its `sample_device`,
    `read_async`, `wait` and `binding`): one launch per step reads the head's [cond; uncond] logits in place
    on the device (`runner.head_logits`), with the same semantics and uniforms as `guided_sample`, and writes
    the id straight into the next decode step's input ids, every row of the batch (`runner.step_ids`, static
    decode), and advances those rows' positions and attention mask there (`runner.step_to_advance`), so that
    the step that feeds the token writes none of its inputs from the host; without static decode the id goes
    into an 8-byte device buffer of the sampler's. Only that id is copied to the host (the grammar, streaming
    and stop checks need it), and that read is the step's one wait for the device where the engine's sessions
    run on the sampler's stream (`SessionOptions.compute_stream` = its `stream_handle`): their decode-step and
    head runs then return unsynchronized (`LLMRunner.order_on_stream`). `banned` ranges go to the kernel's
    stage 1b.

    Called, it launches and reads (`wait(launch(...))`). A decode loop may instead queue the token's read
    (`launch`), queue the step that feeds it (`LLMRunner.feed_written`) and the next token's launch, and only
    then `wait` for the first token, so that the device has the next step queued while the host reads
    (docs/gpu.md, "Reading a token one step late"): `chains` says where that holds."""

    def __init__(self, sampler):
        from .cuda.kernel import StepAdvance, pack_launch

        self.sampler, self._advance, self._pack = sampler, StepAdvance, pack_launch
        self._scratch = sampler.binding.alloc(8)  # int64, for engines without static decode steps
        self.memory = getattr(sampler, "memory", "cuda")  # where the buffers it takes by address must be
        self.stream = getattr(sampler, "stream_handle", None)  # the CUDA stream the engine's sessions may share
        self.launches = 0

    def __call__(self, runner: LLMRunner, state: DecodeState, head: str, params: SamplingParams,
                 uniforms: np.ndarray, range_start: int, use_cfg: bool, banned: Ranges = ()) -> int:
        return self.wait(self.launch(runner, state, head, params, uniforms, range_start, use_cfg, banned))

    @staticmethod
    def chains(runner: LLMRunner, state: DecodeState, params: SamplingParams) -> bool:
        """Whether the next step may be queued before this one's token is read: the token goes into the
        step's ids (static decode) and the next launch's arguments do not depend on it (no repetition
        penalty, which lists the tokens fed so far)."""
        return runner.step_ids(state) is not None and params.repetition_penalty == 1.0

    def launch(self, runner: LLMRunner, state: DecodeState, head: str, params: SamplingParams,
               uniforms: np.ndarray, range_start: int, use_cfg: bool, banned: Ranges = ()) -> Ticket:
        """Run `head` and the kernel on `state`, and queue the token's read; `wait` returns the token."""
        if self.stream is not None and not state.ordered_by_caller:  # from here on the runs need not synchronize
            runner.order_on_stream(state, self.stream)
        logits = runner.head_logits(head, state)  # DeviceArray [B, range]
        rows, v = logits.shape
        if logits.dtype not in (np.float32, np.float16):
            raise EngineError(f"head_{head}: the sampling kernel reads float32 or float16 logits, got {logits.dtype}")
        ids = runner.step_ids(state)  # [B, 1]: the token goes to every row (a CFG pair takes the same token)
        for name, buf in (("logits", logits), ("input ids", ids)):
            if buf is not None and buf.device != self.memory:  # a host address on the GPU: an illegal address
                raise EngineError(f"head_{head}: the sampling kernel reads and writes {self.memory} memory, the "
                                  f"{name} are on {buf.device!r}; load the engine with device='cuda' (--device "
                                  f"cuda) or sample on the host (sampler='host')")
        la = self._pack(1, params, uniforms, v=v, range_start=range_start, has_uncond=use_cfg and rows > 1,
                        generated_ids_per_row=state.fed[:1], banned=banned)
        sampler = self.sampler
        if ids is None:
            out = sampler.binding.ptr(self._scratch)
            sampler.sample_device(logits.address, str(logits.dtype), v, 0, la, out, 1)
        else:  # the token into every row's next input id, and (static steps) their positions and mask
            target = runner.step_to_advance(state)
            advance = None if target is None else self._advance(target[0].address, target[1].address,
                                                                target[1].shape[1], target[2])
            out = ids.address
            sampler.sample_device(logits.address, str(logits.dtype), v, 0, la, out, state.batch, state.batch,
                                  advance)
            if advance is not None:  # (a bad row advances nothing, and its wait raises: the request ends)
                runner.step_advanced(state)
            runner.ids_unread(state)
        self.launches += 1
        return Ticket(sampler.read_async(out), state, head, ids is not None, self.launches)

    def wait(self, ticket: Ticket) -> int:
        """`ticket`'s token, read back (the host waits for its launch and what was queued before it)."""
        token = self.sampler.wait(ticket.read)
        if token < 0:
            raise EngineError(f"head_{ticket.head}: the sampling kernel found NaN/+inf or no finite logit in row 0")
        if ticket.into_step and ticket.launch == self.launches:  # the step ids still hold it: the host knows them
            LLMRunner.ids_written(ticket.state, token)
        return token


def device_pick(sampler) -> DevicePick:
    """`DevicePick` on `sampler`."""
    return DevicePick(sampler)


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
            head, lv_params = f"level{step.level}", per_level[step.level]
            if not _chains(pick, runner, state, lv_params):
                token = pick(runner, state, head, lv_params, uniforms[sampled], step.start, use_cfg)
            else:  # the rest of the row's codes, each step queued before the last token is read (DevicePick)
                queued = [pick.launch(runner, state, head, lv_params, uniforms[sampled], step.start, use_cfg)]
                try:
                    while grammar.peek(1) == step:  # the next position samples the same level: queue it now
                        index = runner.feed_written(state)
                        queued.append(pick.launch(runner, state, head, lv_params, uniforms[sampled + 1],
                                                  step.start, use_cfg))
                        token = pick.wait(queued.pop(0))
                        runner.fill_written(state, index, token)
                        grammar.advance(token)
                        sampled, calls = sampled + 1, calls + 1
                    token = pick.wait(queued.pop(0))
                finally:
                    _drain(pick, queued)  # after an error: the device finishes before the buffers are reused
            grammar.advance(token)
            pending.append(token)
            sampled += 1
    return ImageTokens(grammar.codes(), height, width, calls, sampled)


def _chains(pick: Pick, runner: LLMRunner, state: DecodeState, params: SamplingParams) -> bool:
    """Whether `pick` can queue a step before reading the last token (`DevicePick.chains`)."""
    chains = getattr(pick, "chains", None)
    return chains is not None and chains(runner, state, params)


def _drain(pick: Pick, queued: list) -> None:
    """Wait for the launches whose tokens are no longer wanted (the device must be done with the request's
    buffers before the next request reuses them); a bad row there changes nothing now."""
    while queued:
        try:
            pick.wait(queued.pop(0))
        except EngineError:
            pass


def stream_text(runner: LLMRunner, tokenizer, prompt: list[int], image_embeds: np.ndarray | None,
                params: SamplingParams, seed: int, max_new_tokens: int,
                timings: Timings | None = None, ignore_eos: bool = False, pick: Pick = host_pick
                ) -> Iterator[str]:
    """Yield decoded text pieces as tokens are generated; stops at the stop ids or `max_new_tokens`
    (`ignore_eos`: always `max_new_tokens` tokens, for benchmarks). `pick` draws each token (`host_pick`, or
    `DevicePick`: the kernel writes it into the next step's input ids, and the loop reads each token one
    step late, `text_tokens`)."""
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
    with closing(text_tokens(runner, state, pick, params, uniforms, text_start, banned, max_new_tokens)) as tokens:
        for token in tokens:
            if token in stops:
                break
            piece = decoder.push(token)
            if piece:
                timings.add("decode", time.perf_counter() - t0)
                yield piece
                t0 = time.perf_counter()
    timings.add("decode", time.perf_counter() - t0)
    tail = decoder.flush()
    if tail:
        yield tail


def text_tokens(runner: LLMRunner, state: DecodeState, pick: Pick, params: SamplingParams, uniforms: Uniforms,
                text_start: int, banned: Ranges, max_new_tokens: int) -> Iterator[int]:
    """The text head's tokens for a prefilled `state`, each fed before the next is drawn (the last one only
    recorded in `state.fed`). With a pick that chains (`DevicePick`), the step that feeds token t and the
    draw of token t + 1 are queued before token t is read, so a consumer that stops at token t leaves one
    step queued, which closing the iterator waits for (use it in `contextlib.closing`)."""
    if not _chains(pick, runner, state, params):
        for step in range(max_new_tokens):
            token = pick(runner, state, "text", params, uniforms[step], text_start, False, banned)
            yield token  # (a consumer that stops here feeds nothing more)
            if step + 1 < max_new_tokens:
                runner.feed(state, np.array([[token]], np.int64))
            else:
                state.fed[0].append(token)
        return
    queued = [pick.launch(runner, state, "text", params, uniforms[0], text_start, False, banned)]
    try:
        for step in range(max_new_tokens):
            index = None
            if step + 1 < max_new_tokens:  # queue the step that feeds this token, and the next draw
                index = runner.feed_written(state)
                queued.append(pick.launch(runner, state, "text", params, uniforms[step + 1], text_start, False,
                                          banned))
            token = pick.wait(queued.pop(0))
            if index is None:
                state.fed[0].append(token)
            else:
                runner.fill_written(state, index, token)
            yield token
    finally:
        _drain(pick, queued)  # stopped early (or failed): the queued step finishes before buffers are reused
