"""Drive the `llm` graph: batched prefill, decode steps, preallocated KV cache, head graphs.

Rows of unequal length are padded to one width: on the left for the portable graph and for fused engines
exported before right padding (their graph masks padding with a bias), on the right for the fused graph
(`right_padded`: mask axis ROW_SLOTS_DIM; each row's tokens from slot 0, its mask row 1 there and 0 after,
each row appending at its own end; export/fused_ops.py).

The KV cache, the last hidden state and each head's logits are preallocated per request on the sessions'
device (`device_buffer`: numpy memory on the CPU, OrtValues on a GPU) and bound by address, so no step
allocates them or copies them through the host. The KV layout follows the graph (`kv_layout`):
- "concat" (the portable graph): two buffers used ping-pong; a step reads `past` from one and ORT writes
  `present` (past + new) into the other. Each layer's K and V occupy a fixed region of a buffer; the view
  for length L is the region's first B*kv*L*hd floats reshaped to [B, kv, L, hd] (contiguous).
- "shared" (the fused graph): one buffer; each layer's K and V are [B, kv, capacity, hd] views bound as
  both `past` and `present`, and the step writes only its new slots (GroupQueryAttention's shared-buffer
  mode). onnxruntime's kernel refuses batch > 1 with several new tokens on a non-empty cache, so such
  runs (forced tokens in a CFG batch) are fed a token at a time.

Static decode steps (the fused graph, mask axis `row_slots` or `mask_slots`, `LLMRunner.static_decode`):
every single-token step of a request binds the same inputs, `StepBuffers` at fixed addresses with fixed
shapes (ids and positions [B, 1], the mask over the whole capacity [B, capacity]), rewritten in place between
steps. Nothing is rebound or re-validated from step to step, and the step is what onnxruntime's CUDA graphs
need: the same shapes and addresses on every replay. A device sampler can write the next token straight into
the ids buffer (`StepBuffers.ids`) and advance the positions and mask for it (`step_to_advance`), so that the
step writes none of its inputs from the host. Prefills and runs of several tokens bind their own inputs.

CUDA graphs (`SessionOptions.cuda_graph`, static decode only): the static step runs under a CUDA graph id
(onnxruntime's `gpu_graph_id`: captured on first use, replayed after), every other run outside any graph
(-1). A replay reads and writes the addresses it was captured with, so the runner keeps a finished request's
buffers (KV cache, hidden state, step inputs) for the next request of the same shape, (batch, capacity),
with capacities rounded up to CUDA_GRAPH_CAPACITY_STEP slots; each shape has its own graph id. A request
whose shape's buffers are still in use by a live request gets fresh ones and runs without a graph.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numpy as np

from ..config import ModelConfig
from ..manifest import KV_CAPACITY_DIM, MASK_SLOTS_DIM, ROW_SLOTS_DIM, Component, EngineError
from .device_buffer import DeviceArray
from .engine import Engine
from .session import Binding, Session


def kv_layout(component: Component) -> str:
    """"shared" if the graph's past K/V axis is the cache capacity (fused graph), else "concat"."""
    past = next((t for t in component.inputs if t.name == "past_key_values.0.key"), None)
    return "shared" if past is not None and past.shape[2] == KV_CAPACITY_DIM else "concat"


# CUDA graphs: request capacities are rounded up to a multiple of this, so that requests of similar length
# share one set of buffers and one captured graph (module docstring).
CUDA_GRAPH_CAPACITY_STEP = 256


def _mask_axis(component: Component) -> str | int | None:
    mask = next((t for t in component.inputs if t.name == "attention_mask"), None)
    return None if mask is None else mask.shape[1]


def takes_capacity_mask(component: Component) -> bool:
    """True if the graph's attention_mask may span the KV capacity (module docstring: static decode)."""
    return _mask_axis(component) in (MASK_SLOTS_DIM, ROW_SLOTS_DIM)


def takes_right_padding(component: Component) -> bool:
    """True if the graph's rows are right-padded in the cache (module docstring)."""
    return _mask_axis(component) == ROW_SLOTS_DIM


class KVBuffers:
    """K and V of every layer for up to `capacity` positions, in the graph's layout (module docstring) and
    dtype (float32, or float16 for an fp16 engine): two flat buffers used ping-pong for "concat", one for
    "shared", on `session`'s device."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 session: Session, layout: str = "concat", dtype=np.float32):
        self.shape = (batch, kv_heads, head_dim)
        self.capacity = capacity
        self.layout = layout
        self.region = batch * kv_heads * capacity * head_dim  # floats per (layer, K|V) region
        self.count = 2 * num_layers
        # zeros, not empty: slots past the valid length are never read, but stay finite if a kernel touches them
        n = (self.count * self.region,)
        self._buf = [session.allocate(n, dtype) for _ in range(1 if layout == "shared" else 2)]
        self.current = 0  # the buffer holding the valid past
        # shared: the same full-capacity views every step, made once
        self._shared = self.views(0, capacity) if layout == "shared" else None

    def bindings(self, past_len: int, new_len: int) -> tuple[list[DeviceArray], list[DeviceArray]]:
        """(past, present) views for a step appending `new_len` positions to `past_len`; `advance()` after
        the step has run."""
        if self._shared is not None:  # one buffer, bound as past and present alike
            return self._shared, self._shared
        # ping-pong: read past (P slots), write past + new (P + S) into the other buffer
        return self.views(self.current, past_len), self.views(1 - self.current, past_len + new_len)

    def advance(self) -> None:
        """The step has run: for "concat" the buffer just written holds the valid past."""
        if self._shared is None:
            self.current = 1 - self.current

    def views(self, which: int, length: int) -> list[DeviceArray]:
        """[K0, V0, K1, V1, ...] of buffer `which`, each [B, kv, length, hd] over the region's start
        (`.host()` reads one)."""
        b, kv, hd = self.shape
        return [self._buf[which].view(i * self.region, (b, kv, length, hd)) for i in range(self.count)]

    @property
    def fixed(self) -> bool:
        """True if every step binds the same buffers (the shared layout): bind them once."""
        return self._shared is not None

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buf)


@dataclass
class StepBuffers:
    """A request's decode-step inputs at fixed addresses and shapes on the llm session's device (static
    decode, module docstring): bound once, rewritten in place every step."""
    ids: DeviceArray  # int64 [B, 1]
    positions: DeviceArray  # int64 [B, 1]
    mask: DeviceArray  # int64 [B, capacity]: the request's mask itself when numpy owns it (`on_host`)
    table: DeviceArray  # float32 [1, hidden]: the image-row table of a decode step (its ids never index it)
    ids_written: int | None = None  # a token a device sampler wrote into `ids` for every row (skip the write)
    unread: bool = False  # `ids` holds a token the device sampler wrote that the host has not read yet
    current: bool = False  # positions and mask hold the last run's inputs (it was a static step)
    advanced: bool = False  # a device sampler advanced positions and mask for the next step (skip both writes)


@dataclass
class RequestBuffers:
    """What a request allocates on the device: kept for the next request of the same shape under CUDA graphs."""
    kv: KVBuffers
    hidden: DeviceArray
    step: StepBuffers | None
    graph_id: int | None = None  # the static step's CUDA graph id (>= 1), -1: no graph, None: graphs off
    owner: weakref.ref | None = None  # the DecodeState using them


@dataclass
class DecodeState:
    """One batch of sequences being decoded together (e.g. the CFG cond/uncond pair)."""
    kv: KVBuffers
    mask: np.ndarray  # int64 [B, capacity]; 1 = real token
    next_pos: np.ndarray  # int64 [B]: RoPE position of each row's next token
    hidden_buffer: DeviceArray  # float32 [B, hidden]: last position's final hidden state, rewritten every run
    length: int = 0  # slots filled in the longest row (prompt incl. padding + fed tokens)
    fed: list[list[int]] = field(default_factory=list)  # ids fed after the prompt, per row
    binding: Binding | None = None  # the llm session's IO binding, kept across steps
    step: StepBuffers | None = None  # static decode steps' inputs (LLMRunner.static_decode), else None
    graph_id: int | None = None  # the static step's CUDA graph id (RequestBuffers.graph_id)
    heads: dict[str, tuple[Binding, DeviceArray]] = field(default_factory=dict)  # head -> (binding, logits)
    # The caller orders everything after this state's decode-step and head runs on the sessions' stream and
    # waits for that stream before reading anything back (LLMRunner.order_on_stream): those runs return
    # without synchronizing the host
    ordered_by_caller: bool = False

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def hidden(self) -> np.ndarray:
        """The last hidden state on the host: on the CPU the buffer itself (rewritten by the next run), on a
        GPU a copy."""
        return self.hidden_buffer.host()


class LLMRunner:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.cfg: ModelConfig = engine.config
        self.session = engine.session("llm")
        self.kv_layout = kv_layout(self.session.component)
        # single-token steps with fixed shapes and addresses, replayed as CUDA graphs if asked (module docstring)
        self.static_decode = self.kv_layout == "shared" and takes_capacity_mask(self.session.component)
        self.right_padded = self.kv_layout == "shared" and takes_right_padding(self.session.component)
        self.cuda_graph = self.static_decode and self.session.cuda_graph
        # a device sampler may advance the static step's positions and mask with its token (step_to_advance);
        # False: the host writes them every step (the GPU bench's A/B, benchmarks/gpu_decode.py --step-ab)
        self.device_advance = True
        self._pool: dict[tuple[int, int], RequestBuffers] = {}  # (batch, capacity) -> buffers (CUDA graphs)
        self.runs = 0  # llm graph runs so far (benchmarks count them)
        llm = self.cfg.llm
        self.num_layers, self.hidden = llm.num_layers, llm.hidden_size
        self.kv_heads, self.head_dim = llm.num_kv_heads, llm.head_size
        self.pad_id = self.cfg.tokens.endoftext
        self._empty_table = np.zeros((0, self.hidden), np.float32)
        self._past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self._present_names = [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        # the cache's dtype is the graph's (float16 in an fp16 engine, float32 otherwise): its present outputs
        self.kv_dtype = self.session.output_dtype(self._present_names[0])

    # --- prefill ------------------------------------------------------------------------------------------
    def prefill(self, rows: list[list[int]], image_embeds: np.ndarray | None = None,
                max_new_tokens: int = 0) -> DecodeState:
        """Pad `rows` to one length (module docstring: which side), run them in one call, keep room for
        `max_new_tokens` more."""
        if not rows or any(len(r) == 0 for r in rows):
            raise EngineError("llm: every prompt row needs at least one token")
        table = self._empty_table if image_embeds is None else np.ascontiguousarray(image_embeds, np.float32)
        if table.ndim != 2 or table.shape[1] != self.hidden:
            raise EngineError(f"llm: image_embeds must be [N, {self.hidden}], got {list(table.shape)}")
        width = max(len(r) for r in rows)
        limit = self.cfg.max_prompt_len
        if width > limit:
            raise EngineError(f"llm: prompt of {width} tokens exceeds the model's limit of {limit}")
        capacity = width + max_new_tokens
        context = self.cfg.llm.max_position_embeddings
        if capacity > context:
            raise EngineError(f"llm: prompt {width} + {max_new_tokens} new tokens exceeds the context of {context}")
        if self.cuda_graph:  # shapes shared by requests of similar length (module docstring)
            capacity = min(-(-capacity // CUDA_GRAPH_CAPACITY_STEP) * CUDA_GRAPH_CAPACITY_STEP, context)
        batch = len(rows)
        ids = np.full((batch, width), self.pad_id, np.int64)
        bufs = self._request_buffers(batch, capacity)
        step = bufs.step
        mask = step.mask.host() if step is not None and step.mask.on_host else np.zeros((batch, capacity), np.int64)
        for b, r in enumerate(rows):  # right padding: each row from slot 0; left: rows end at the same column
            start = 0 if self.right_padded else width - len(r)
            ids[b, start:start + len(r)] = r
            mask[b, start:start + len(r)] = 1
        self._check_ids(ids, table.shape[0])
        # each real token's position; padded slots get their neighbour's (unread: masked, or ignored by the
        # fused graph, whose RoPE positions are its slots)
        positions = np.maximum(np.cumsum(mask[:, :width], axis=1) - 1, 0)
        state = DecodeState(kv=bufs.kv, mask=mask, next_pos=mask[:, :width].sum(axis=1), hidden_buffer=bufs.hidden,
                            fed=[[] for _ in rows], step=step, graph_id=bufs.graph_id)
        bufs.owner = weakref.ref(state)
        self._run(state, ids, positions, table)
        return state

    def _request_buffers(self, batch: int, capacity: int) -> RequestBuffers:
        """A new request's device buffers: fresh ones; under CUDA graphs the buffers of the last request of
        this shape when it has finished (no live DecodeState holds them), whose addresses its graph replays."""
        key = (batch, capacity)
        kept = self._pool.get(key)
        if kept is not None and (kept.owner is None or kept.owner() is None):
            kept.step.ids_written, kept.step.current, kept.step.advanced, kept.step.unread = None, False, False, False
            if kept.step.mask.on_host:  # the request's mask itself: it holds the last request's
                kept.step.mask.host()[:] = 0
            return kept
        alloc = self.session.allocate
        step = None
        if self.static_decode:
            step = StepBuffers(ids=alloc((batch, 1), np.int64), positions=alloc((batch, 1), np.int64),
                               mask=alloc((batch, capacity), np.int64), table=alloc((1, self.hidden), np.float32))
        bufs = RequestBuffers(KVBuffers(self.num_layers, batch, self.kv_heads, self.head_dim, capacity,
                                        self.session, self.kv_layout, self.kv_dtype),
                              alloc((batch, self.hidden), np.float32), step)
        if self.cuda_graph:
            bufs.graph_id = -1  # the shape's buffers are in use: this request runs without a graph
            if kept is None:  # the first request of this shape: its buffers and graph id are the shape's
                bufs.graph_id = len(self._pool) + 1
                self._pool[key] = bufs
        return bufs

    def release_buffers(self) -> None:
        """Drop the buffers kept for CUDA graphs (the captured graphs stay with the session)."""
        self._pool.clear()

    # --- decode -------------------------------------------------------------------------------------------
    def feed(self, state: DecodeState, tokens: np.ndarray) -> None:
        """Append tokens [B, S] (S >= 1: a sampled token and/or a run of forced ones). The last position's
        hidden state is then in `state.hidden_buffer` (on the host: `state.hidden`, a copy on a GPU, which is
        why it is not returned)."""
        tokens = np.asarray(tokens, np.int64)
        if tokens.ndim == 1:
            tokens = tokens[:, None]
        if tokens.shape[0] != state.batch:
            raise EngineError(f"llm: feed got {tokens.shape[0]} rows, the state has {state.batch}")
        s = tokens.shape[1]
        if state.length + s > state.kv.capacity:
            raise EngineError(f"llm: KV cache full ({state.kv.capacity} positions); raise max_new_tokens")
        self._check_ids(tokens, 0)
        if self.kv_layout == "shared" and s > 1 and state.batch > 1 and state.length > 0:
            for j in range(s):  # the fused kernel's limit (module docstring)
                self._append(state, tokens[:, j:j + 1])
        else:
            self._append(state, tokens)

    def feed_written(self, state: DecodeState) -> int:
        """Append the token a device sampler wrote into `step_ids(state)` and has not read back yet
        (`ids_unread`), as one static decode step: its run is queued before the host knows the token
        (docs/gpu.md, "Reading a token one step late"). Returns the token's index in each row of
        `state.fed`, which holds -1 there until `fill_written` puts the token in."""
        step = state.step
        if step is None or not step.unread:
            raise EngineError("llm: feed_written feeds a token the device sampler wrote into the step's input ids "
                              "and has not read yet; there is none (feed the token with feed instead)")
        if state.length + 1 > state.kv.capacity:
            raise EngineError(f"llm: KV cache full ({state.kv.capacity} positions); raise max_new_tokens")
        index = len(state.fed[0])
        self._append(state, None)
        return index

    @staticmethod
    def fill_written(state: DecodeState, index: int, token: int) -> None:
        """The token `feed_written` fed at `index`, read back: into every row of `state.fed`."""
        for row in state.fed:
            row[index] = int(token)

    def _append(self, state: DecodeState, tokens: np.ndarray | None) -> None:
        """Append `tokens` [B, S], or (None) the one token already in the step's ids buffer (feed_written)."""
        s = 1 if tokens is None else tokens.shape[1]
        positions = state.next_pos[:, None] + np.arange(s)[None, :]  # [B, S]
        if self.right_padded:  # each row appends at its own end (its positions are its slots)
            np.put_along_axis(state.mask, positions, 1, axis=1)
        else:  # rows end together
            state.mask[:, state.length:state.length + s] = 1
        for b, row in enumerate(state.fed):
            row.extend([-1] if tokens is None else tokens[b].tolist())
        state.next_pos = state.next_pos + s
        self._run(state, tokens, positions, self._empty_table)

    def _run(self, state: DecodeState, ids: np.ndarray | None, positions: np.ndarray, table: np.ndarray) -> None:
        """One llm run on `ids` [B, S] (None: the unread token in the step's ids buffer, a static step)."""
        p, s = state.length, 1 if ids is None else ids.shape[1]
        binding, first = state.binding, state.binding is None
        if first:
            binding = state.binding = self.session.binding()
            binding.bind_outputs({"last_hidden": state.hidden_buffer})  # the same buffer for every run
        if first or not state.kv.fixed:  # K/V buffers: once for the shared layout, else every step
            past, present = state.kv.bindings(p, s)
            binding.bind_inputs(dict(zip(self._past_names, past)))
            binding.bind_outputs(dict(zip(self._present_names, present)))
        step, graph = state.step, None
        step_run = step is not None and s == 1 and p > 0
        if step_run:  # a static decode step: the request's fixed buffers
            self._write_step(state, ids, positions)
            if binding.feeds.get("input_ids") is not step.ids:  # first step, or after a prefill / multi-token run
                binding.bind_inputs({"input_ids": step.ids, "image_embeds": step.table,
                                     "attention_mask": step.mask, "position_ids": step.positions})
            graph = state.graph_id
            step.current = True
        else:
            binding.bind_inputs({"input_ids": ids, "image_embeds": table, "attention_mask": state.mask[:, :p + s],
                                 "position_ids": positions.astype(np.int64)})
            graph = -1 if state.graph_id is not None else None  # prefills and multi-token runs: no graph
            if step is not None:
                step.current = step.advanced = False
        # a static step's inputs and outputs are all device buffers: it may return before the device is done
        binding.run(self.session.run_options(graph, synchronize=not (step_run and state.ordered_by_caller)))
        self.runs += 1
        state.kv.advance()
        state.length = p + s

    @staticmethod
    def step_ids(state: DecodeState) -> DeviceArray | None:
        """The static decode step's input ids buffer, int64 [B, 1] on the llm session's device (None without
        static decode). A device sampler may write the next token there for every row and then call
        `ids_written`; the step that feeds that token does not write the buffer again."""
        return None if state.step is None else state.step.ids

    @staticmethod
    def ids_written(state: DecodeState, token: int) -> None:
        """`step_ids(state)` now holds `token` in every row (written on the device)."""
        state.step.ids_written, state.step.unread = int(token), False

    @staticmethod
    def ids_unread(state: DecodeState) -> None:
        """A device sampler's launch will write a token into `step_ids(state)` for every row, which the host
        has not read yet: `feed_written` may feed it (or, once read, `ids_written`)."""
        state.step.ids_written, state.step.unread = None, True

    def step_to_advance(self, state: DecodeState) -> tuple[DeviceArray, DeviceArray, int] | None:
        """What a device sampler may advance for the next decode step along with its token: (positions [B, 1],
        mask [B, capacity], the mask slot every row takes, or -1 for each row's new position), when the last run
        was a static step (the buffers hold its inputs) and the mask is a device copy the host would otherwise
        rewrite whole; else None. After advancing, call `step_advanced`."""
        step = state.step
        if not self.device_advance or step is None or not step.current or step.advanced or step.mask.on_host:
            return None  # (advanced: already done for the next token; a second pick must not do it again)
        return step.positions, step.mask, -1 if self.right_padded else state.length

    @staticmethod
    def step_advanced(state: DecodeState) -> None:
        """The device advanced `step_to_advance(state)`'s positions and mask for the next token: the step that
        feeds it writes neither (StepBuffers.advanced)."""
        state.step.advanced = True

    @staticmethod
    def _write_step(state: DecodeState, ids: np.ndarray | None, positions: np.ndarray) -> None:
        """This step's ids (None: the device sampler's unread token is there already), positions and (unless it
        is the request's mask itself) mask into the step buffers."""
        step = state.step
        if ids is not None and (step.ids_written is None or not (ids == step.ids_written).all()):
            step.ids.write(ids)
        if not step.advanced:  # else the device sampler advanced them with its token (any token's are the same)
            step.positions.write(positions)
            if not step.mask.on_host:  # an OrtValue is written whole: B x capacity int64 (32 KB at 2 x 2048)
                step.mask.write(state.mask)
        step.ids_written, step.advanced, step.unread = None, False, False

    def _check_ids(self, ids: np.ndarray, table_rows: int) -> None:
        hi = self.cfg.llm.vocab_rows + table_rows
        if ids.size and (ids.min() < 0 or ids.max() >= hi):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise EngineError(f"llm: token id {bad} outside [0, {hi}) (vocab rows {self.cfg.llm.vocab_rows} + "
                              f"{table_rows} image rows)")

    # --- heads --------------------------------------------------------------------------------------------
    def logits(self, head: str, hidden: np.ndarray | None = None, state: DecodeState | None = None) -> np.ndarray:
        """Logits of one contiguous vocabulary range ('text', 'level0', ...) on the host: for `hidden`
        [B, hidden], or for a decode `state`'s last hidden state (`head_logits`; on the CPU the returned
        array is the state's logits buffer, rewritten by the next call for the same head: copy it to keep it)."""
        if state is None:
            if hidden is None:
                raise EngineError(f"head_{head}: give hidden [B, {self.hidden}] or a decode state")
            return self.engine.session(f"head_{head}").run({"hidden": hidden})["logits"]
        if hidden is not None and hidden is not state.hidden:
            raise EngineError(f"head_{head}: with a decode state the head reads that state's hidden buffer; "
                              f"pass no hidden")
        return self.head_logits(head, state).host()

    def head_logits(self, head: str, state: DecodeState) -> DeviceArray:
        """Run head `head` on `state`'s hidden buffer, through an IO binding kept in the state: its input and
        its output (one logits buffer per head, [B, range]) are bound once per request and stay on the
        device; a GPU sampler reads the logits there by address."""
        if head not in state.heads:
            session = self.engine.session(f"head_{head}")
            binding = session.binding()
            start, stop = self.cfg.head_ranges()[head]
            out = session.allocate((state.batch, stop - start), session.output_dtype("logits"))
            binding.bind_inputs({"hidden": state.hidden_buffer})
            binding.bind_outputs({"logits": out})
            state.heads[head] = (binding, out)
        binding, out = state.heads[head]
        binding.run(binding.session.run_options(None, synchronize=not state.ordered_by_caller))
        return out

    def order_on_stream(self, state: DecodeState, stream: int) -> bool:
        """Let `state`'s decode-step and head runs return before the device finishes them, where the engine's
        sessions run on CUDA stream `stream` (SessionOptions.compute_stream): for a caller that puts what
        reads their outputs on that stream and waits for it before the host reads anything (`DevicePick`:
        the kernel, then the token's copy back). Returns whether they now do; False (runs synchronized as
        before) where the sessions have their own streams."""
        state.ordered_by_caller = self.session.shares_stream and self.session.compute_stream == int(stream)
        return state.ordered_by_caller
