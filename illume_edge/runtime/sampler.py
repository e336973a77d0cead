"""Host-side sampling for one contiguous vocabulary range: CFG, repetition penalty, temperature/top-k/top-p.

Plain numpy functions over float32 logits ``[rows, V]`` that cover ONE contiguous id range (the text head,
or one level's code range); returned indices are *within that range* (add the range start for a token id).
A CUDA kernel reproduces exactly this math, so it is kept simple and spelled out here.

Order of one image step (what :func:`guided_sample` does, mirroring the reference):

1. **Repetition penalty** (Hugging Face semantics) on the *conditional* logits only: every token of this
   range that the row already generated gets ``l * penalty`` if ``l < 0`` else ``l / penalty``, once per
   distinct token. The reference gets it from the checkpoint's ``generation_config.json``
   (``repetition_penalty: 1.05``): transformers' ``RepetitionPenaltyLogitsProcessor`` runs *before* the
   custom image logits processor, on the raw logits. The reference generates from ``inputs_embeds``, so the
   ``input_ids`` that processor sees hold the generated tokens only, never the prompt; and the
   unconditional logits are computed inside the CFG processor, so they are never penalised.
2. **CFG**: ``u + s * (c - u)``. The reference combines log-probabilities
   (``log_softmax(c)``, ``log_softmax(u)``); since ``log_softmax(x) = x - lse(x)`` with one constant per
   row, the combination on raw logits differs from it by the per-row constant ``lse(u) + s*(lse(c) -
   lse(u))`` only, which no softmax, top-k or top-p can see. That also makes the combination independent of
   which vocabulary range the head computed.
3. **Temperature 0** -> greedy ``argmax`` (lowest id on ties).
4. Otherwise **top-k** on the logits: keep the ``k`` largest, ties at the k-th value resolved in favour of
   the lower id (the k-th largest value ``v`` is found by selection, not a sort: all entries ``> v`` are
   kept, then entries ``== v`` in ascending id order until there are ``k``). ``top_k <= 0`` or ``>= V``
   disables it. ``-inf`` entries are never kept.
5. ``p_i ∝ exp((l_i - l_max) / T)`` over the kept set (float64), i.e. softmax(logits / T) renormalised
   over the top-k set.
6. **top-p** (only when ``top_p < 1``): order the kept tokens by descending probability (ties: lower id
   first) and keep the shortest prefix whose cumulative probability is ``>= top_p`` (at least one token).
7. **Draw**: renormalise, take the kept tokens in ASCENDING TOKEN-ID order, and return the first one whose
   cumulative probability exceeds ``u * total`` (inverse CDF) for the row's uniform ``u`` in [0, 1).

Uniforms come from :func:`draw_uniforms` (numpy ``Philox``), drawn up front: row ``r`` owns the stream
``Philox(seed)`` jumped ``r`` times, and step ``t`` is its ``t``-th double. So step ``t`` of row ``r`` gets
the same number however the loop runs, however many steps were drawn and however many rows there are.

Where this deliberately differs from the reference code
- ``generation_eval`` (``InterleavedLogitsProcessor`` in ``models/inference_utils.py``) applies the
  per-level temperature, top-k and top-p inside the processor, and ``model.generate(do_sample=True,
  temperature=T, top_k=K, top_p=P)`` then appends transformers' own ``TemperatureLogitsWarper``,
  ``TopKLogitsWarper`` and ``TopPLogitsWarper`` with the *request's* values after it. The warpers run a
  second time on already-warped scores: the effective temperature is ``T_level * T`` (0.7 * 0.7 = 0.49
  with the editing defaults), the effective top-k is ``min(k_level, K)`` (so the pixel level's 3x top-k
  collapses back to ``K``: 2048, not 6144, with the generation defaults), and top-p is applied twice (the
  second time on the re-tempered distribution). That path also samples ``<start_of_image>`` freely in text
  mode, with the text-mode parameters and without CFG.
- The demo (``app.py``: ``CFGLogits`` + ``DualVQImageTokenProcessor`` + ``DynamicSamplingProcessor``) passes
  ``temperature=1.0, top_k=0, top_p=1.0`` to ``generate`` so each parameter applies once, and forces
  ``<start_of_image>`` as the first token. This module follows that: every parameter is applied exactly
  once, with the per-level values of :func:`level_params` (pixel top-k = 3x).
- Ties: the reference keeps every token tied with the k-th value (``scores < kth`` removed) and sorts with
  an unstable ``torch.sort`` for top-p; here ties are broken by token id so that results are reproducible.
- top-p boundary: the reference keeps token ``i`` (descending order) iff the cumulative probability of the
  tokens before it is ``<= top_p``; here iff it is ``< top_p``. They differ only when a partial sum equals
  ``top_p`` exactly.
- The reference draws with ``torch.multinomial``; here the draw is the inverse CDF above, so that a CUDA
  kernel fed the same uniforms picks the same token (up to float rounding at a CDF boundary).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..config import OutputLevel, SamplingDefaults

# A subsample of about this many logits estimates a threshold below the k-th largest value, so that the
# exact selection runs over a few thousand candidates instead of the whole range (speed only: the result
# is the same as a full selection, which is the fallback).
_SUBSAMPLE = 4096


# ----------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling parameters. ``top_k <= 0`` disables top-k; ``top_p >= 1`` disables top-p;
    ``temperature == 0`` is greedy; ``cfg_scale == 1`` disables CFG; ``repetition_penalty == 1`` disables it."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)):
            raise ValueError(f"top_k: expected an int (0 disables top-k), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p: expected a number in (0, 1] (1 disables top-p), got {self.top_p}")
        if not np.isfinite(self.cfg_scale):
            raise ValueError(f"cfg_scale: expected a finite number (1 disables CFG), got {self.cfg_scale}")
        if not (np.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty: expected a finite number > 0 (1 disables it), got "
                             f"{self.repetition_penalty}")

    @classmethod
    def from_defaults(cls, d: SamplingDefaults, repetition_penalty: float = 1.0) -> "SamplingParams":
        """From a task's :class:`~illume_edge.config.SamplingDefaults` (``cfg.defaults.generate`` etc.)."""
        return cls(temperature=d.temperature, top_k=d.top_k, top_p=d.top_p, cfg_scale=d.cfg,
                   repetition_penalty=repetition_penalty)


def level_params(base: SamplingParams, level: OutputLevel) -> SamplingParams:
    """The parameters used while sampling ``level``'s codes: top-k scaled by ``level.top_k_scale``
    (the pixel level samples with 3x the request's top-k, as the reference's ``image_pixel_top_k``)."""
    if base.top_k <= 0 or level.top_k_scale == 1.0:
        return base
    return dataclasses.replace(base, top_k=max(1, int(round(base.top_k * level.top_k_scale))))


# ----------------------------------------------------------------------------------------------------
# Uniform random numbers
# ----------------------------------------------------------------------------------------------------
def draw_uniforms(seed: int, rows: int, steps: int) -> np.ndarray:
    """float64 ``[steps, rows]`` in [0, 1): column ``r`` is the stream ``Philox(seed).jumped(r)``
    (row 0 is plain ``Generator(Philox(seed))``), so entry ``[t, r]`` depends on ``(seed, t, r)`` only."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    if rows < 1 or steps < 0:
        raise ValueError(f"draw_uniforms: expected rows >= 1 and steps >= 0, got rows={rows}, steps={steps}")
    out = np.empty((steps, rows), dtype=np.float64)
    for r in range(rows):
        bits = np.random.Philox(int(seed))
        if r:
            bits = bits.jumped(r)
        out[:, r] = np.random.Generator(bits).random(steps)
    return out


class Uniforms:
    """Pre-drawn uniforms for a request: ``u[step]`` -> float64 ``[rows]``."""

    def __init__(self, seed: int, rows: int, steps: int):
        self.seed = seed
        self.table = draw_uniforms(seed, rows, steps)  # [steps, rows]

    @property
    def rows(self) -> int:
        return self.table.shape[1]

    @property
    def steps(self) -> int:
        return self.table.shape[0]

    def __getitem__(self, step: int) -> np.ndarray:
        if not 0 <= step < self.steps:
            raise IndexError(f"uniforms: step {step} is outside the {self.steps} steps drawn for seed "
                             f"{self.seed}; draw more steps (the request's max new tokens)")
        return self.table[step]


# ----------------------------------------------------------------------------------------------------
# Logit transforms
# ----------------------------------------------------------------------------------------------------
def _check_logits(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected logits of shape [rows, V], got shape {x.shape}")
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    return x


def cfg_combine(cond: np.ndarray, uncond: np.ndarray, scale: float) -> np.ndarray:
    """Classifier-free guidance on raw logits: ``u + scale * (c - u)`` (float32 ``[rows, V]``).

    Equal to the reference's combination of log-probabilities up to a per-row constant (see the module
    docstring), so sampling from either gives the same distribution. ``scale == 1`` returns ``cond``.
    """
    c = _check_logits("cond", cond)
    u = _check_logits("uncond", uncond)
    if c.shape != u.shape:
        raise ValueError(f"cfg_combine: cond and uncond must have the same shape, got {c.shape} and {u.shape}")
    if scale == 1.0:
        return c
    return u + np.float32(scale) * (c - u)


def apply_repetition_penalty(logits: np.ndarray, range_start: int,
                             generated_ids_per_row: Sequence[Sequence[int] | np.ndarray],
                             penalty: float) -> np.ndarray:
    """Hugging Face repetition penalty on logits of the id range ``[range_start, range_start + V)``.

    For every distinct token id of ``generated_ids_per_row[r]`` inside the range: ``l * penalty`` if
    ``l < 0`` else ``l / penalty``. Ids outside the range are ignored (they have no logit here). Returns a
    new array; apply it to the conditional row(s) before :func:`cfg_combine` (the reference's order).
    """
    x = _check_logits("logits", logits)
    if not (np.isfinite(penalty) and penalty > 0):
        raise ValueError(f"repetition penalty: expected a finite number > 0, got {penalty}")
    if len(generated_ids_per_row) != x.shape[0]:
        raise ValueError(f"generated_ids_per_row: expected one id list per logits row ({x.shape[0]}), got "
                         f"{len(generated_ids_per_row)}")
    out = x.copy()
    if penalty == 1.0:
        return out
    v = x.shape[1]
    p = np.float32(penalty)
    for r, ids in enumerate(generated_ids_per_row):
        local = np.asarray(ids, dtype=np.int64).reshape(-1) - int(range_start)
        local = np.unique(local[(local >= 0) & (local < v)])
        if local.size:
            s = out[r, local]
            out[r, local] = np.where(s < 0, s * p, s / p)
    return out


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------
def _top_k_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Ascending ids of the k largest finite entries of a 1-D row (ties at the k-th value: lower id wins)."""
    v = x.size
    # 1) candidates: every entry >= a threshold that is, with high probability, <= the k-th largest.
    cand = None
    if v > 4 * _SUBSAMPLE and k * 4 <= v:
        sub = x[::v // _SUBSAMPLE]
        m = sub.size
        kk = min(m, int(m * k / v * 1.5) + 32)
        t = np.partition(sub, m - kk)[m - kk]
        if t > -np.inf:
            idx = np.flatnonzero(x >= t)
            if idx.size >= k:
                cand = idx
    if cand is None:
        cand = np.flatnonzero(x > -np.inf)
        if cand.size <= k:
            return cand
    vals = x[cand]
    n = cand.size
    # 2) the exact k-th largest value among the candidates, and the tie rule.
    kth = np.partition(vals, n - k)[n - k]
    keep = vals > kth
    need = k - int(np.count_nonzero(keep))
    if need > 0:
        keep[np.flatnonzero(vals == kth)[:need]] = True
    return cand[keep]


def _sample_row(x: np.ndarray, temperature: float, top_k: int, top_p: float, u: float) -> int:
    v = x.size
    if 0 < top_k < v:
        idx = _top_k_indices(x, top_k)
    else:
        idx = np.flatnonzero(x > -np.inf)
    z = x[idx].astype(np.float64)
    prob = np.exp((z - z.max()) / temperature)
    if top_p < 1.0 and idx.size > 1:
        order = np.argsort(-prob, kind="stable")  # descending probability, lower id first on ties
        cum = np.cumsum(prob[order])
        n = min(int(np.searchsorted(cum, top_p * cum[-1], side="left")) + 1, order.size)
        sel = np.sort(order[:n])
        idx, prob = idx[sel], prob[sel]
    cdf = np.cumsum(prob)
    j = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return int(idx[min(j, idx.size - 1)])


def sample(logits: np.ndarray, *, temperature: float, top_k: int = 0, top_p: float = 1.0,
           uniforms: np.ndarray | Sequence[float] | None = None) -> np.ndarray:
    """Sample one index per row of float32 ``logits [rows, V]``; int64 ``[rows]`` indices in ``[0, V)``.

    ``temperature == 0``: greedy (``uniforms`` unused). Otherwise ``uniforms`` (float ``[rows]`` in [0, 1),
    one per row, e.g. ``Uniforms(seed, rows, steps)[step]``) drives the inverse-CDF draw described in the
    module docstring. ``-inf`` logits are masked out; NaN or ``+inf`` logits, or a row with no finite logit,
    are errors.
    """
    x = _check_logits("logits", logits)
    rows, v = x.shape
    if v == 0:
        raise ValueError("logits: the vocabulary range is empty (V = 0)")
    row_max = x.max(axis=1)
    if np.isnan(row_max).any() or np.isposinf(row_max).any():
        bad = int(np.flatnonzero(np.isnan(row_max) | np.isposinf(row_max))[0])
        raise ValueError(f"logits: row {bad} contains NaN or +inf; expected finite logits (-inf = masked)")
    if np.isneginf(row_max).any():
        bad = int(np.flatnonzero(np.isneginf(row_max))[0])
        raise ValueError(f"logits: row {bad} has every logit masked (-inf); at least one must be finite")
    if not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {temperature}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p}")
    if temperature == 0:
        return np.argmax(x, axis=1).astype(np.int64)
    if uniforms is None:
        raise ValueError("uniforms: required when temperature > 0 (one float in [0, 1) per row)")
    us = np.asarray(uniforms, dtype=np.float64).reshape(-1)
    if us.shape != (rows,):
        raise ValueError(f"uniforms: expected {rows} values (one per logits row), got shape "
                         f"{np.asarray(uniforms).shape}")
    if not ((us >= 0) & (us < 1)).all():
        raise ValueError(f"uniforms: expected values in [0, 1), got {us}")
    k = int(top_k)
    return np.array([_sample_row(x[r], float(temperature), k, float(top_p), float(us[r])) for r in range(rows)],
                    dtype=np.int64)


def guided_sample(cond: np.ndarray, uncond: np.ndarray | None, params: SamplingParams,
                  uniforms: np.ndarray | Sequence[float] | None, *, range_start: int = 0,
                  generated_ids_per_row: Sequence[Sequence[int] | np.ndarray] | None = None) -> np.ndarray:
    """One sampling step over a range, in the reference's order: repetition penalty on ``cond``, CFG with
    ``uncond`` (skipped when ``uncond`` is None or ``cfg_scale == 1``), then :func:`sample` with ``params``
    (already specialised with :func:`level_params` for image levels). Returns indices within the range."""
    x = cond
    if params.repetition_penalty != 1.0 and generated_ids_per_row is not None:
        x = apply_repetition_penalty(x, range_start, generated_ids_per_row, params.repetition_penalty)
    if uncond is not None and params.cfg_scale != 1.0:
        x = cfg_combine(x, uncond, params.cfg_scale)
    return sample(x, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, uniforms=uniforms)
