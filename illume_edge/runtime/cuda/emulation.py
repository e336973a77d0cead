"""Pure-numpy emulation of ``sampling.cu``'s algorithm, step by step and in the kernel's summation order.

It exists so that the kernel's *algorithm* (radix selection, threshold bisection for top-p, ordered
block-wide scans for the draw) can be checked against :mod:`illume_edge.runtime.sampler` on a machine
without a GPU. Each function names the kernel stage it mirrors. ``acc="float32"`` swaps the float64
probabilities/accumulators for float32 ones to measure what a float32 kernel would lose (not what the
kernel does).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..sampler import SamplingParams
from .build import BLOCK, GREEDY_SLICE

WARP = 32
NWARPS = BLOCK // WARP


def fkey(x: np.ndarray) -> np.ndarray:
    """The kernel's order-preserving float32 -> uint32 key (-0 folded onto +0)."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).copy()
    b[(b << np.uint32(1)) == 0] = 0
    neg = (b & np.uint32(0x80000000)) != 0
    return np.where(neg, ~b, b | np.uint32(0x80000000)).astype(np.uint32)


def keyf(k: int) -> np.float32:
    k = int(k)
    b = (k & 0x7FFFFFFF) if k & 0x80000000 else (~k & 0xFFFFFFFF)
    return np.array([b], dtype=np.uint32).view(np.float32)[0]


def _warp_scan(v: np.ndarray) -> np.ndarray:
    """Kogge-Stone inclusive scan along the last axis (32 lanes), as __shfl_up_sync."""
    v = v.copy()
    o = 1
    while o < WARP:
        n = v.copy()
        n[..., o:] = v[..., o:] + v[..., :-o]
        v = n
        o <<= 1
    return v


def block_incl_scan(vals: np.ndarray) -> tuple[np.ndarray, float]:
    """block_incl_scan over BLOCK values: returns (inclusive per thread, block total)."""
    w = _warp_scan(vals.reshape(NWARPS, WARP))
    tot = np.zeros(WARP, dtype=vals.dtype)
    tot[:NWARPS] = w[:, -1]
    tot = _warp_scan(tot)[:NWARPS]
    w[1:] += tot[:-1, None]
    return w.reshape(-1), tot[-1]


def _warp_tree(v: np.ndarray) -> np.ndarray:
    """__shfl_down_sync tree (16, 8, 4, 2, 1) along the last axis; lane 0's value."""
    v = v.copy()
    o = 16
    while o:
        v[..., :o] = v[..., :o] + v[..., o:2 * o]
        o >>= 1
    return v[..., 0]


def block_sum(vals: np.ndarray, n: int) -> float:
    """block_sum of per-thread strided sequential sums over ``vals[:n]`` (thread t: t, t+BLOCK, ...)."""
    dt = vals.dtype
    acc = np.zeros(BLOCK, dtype=dt)
    for base in range(0, n, BLOCK):
        chunk = np.zeros(BLOCK, dtype=dt)
        m = min(BLOCK, n - base)
        chunk[:m] = vals[base:base + m]
        acc = acc + chunk
    ws = np.zeros(WARP, dtype=dt)
    ws[:NWARPS] = _warp_tree(acc.reshape(NWARPS, WARP))
    return _warp_tree(ws)


def _prob(v: np.ndarray, xmax: np.float32, t: float, acc: str) -> np.ndarray:
    if acc == "float32":
        return np.exp((v.astype(np.float32) - xmax) / np.float32(t)).astype(np.float32)
    return np.exp((v.astype(np.float64) - np.float64(xmax)) / t)


def radix_kth(keys: np.ndarray, k: int) -> tuple[int, int]:
    """Stage 3: (key of the k-th largest, how many entries equal to it to keep), 8-bit digits MSB first."""
    prefix, mask, kk = 0, 0, k
    for shift in (24, 16, 8, 0):
        sel = keys[(keys & np.uint32(mask)) == np.uint32(prefix)]
        hist = np.bincount(((sel >> np.uint32(shift)) & np.uint32(255)).astype(np.int64), minlength=256)
        cum, d = 0, 255
        while d > 0 and cum + hist[d] < kk:
            cum += int(hist[d])
            d -= 1
        kk -= cum
        prefix |= d << shift
        mask |= 255 << shift
    return prefix, kk


def combined_logits(cond: np.ndarray, uncond: np.ndarray | None, cfg: float, penalty: float,
                    pen_local: np.ndarray | None, bans_local: Sequence[tuple[int, int]] = ()) -> np.ndarray:
    """Stages 1 and 1b for one row (float32 exactly as the kernel's _rn intrinsics): CFG and the penalty,
    then the banned ranges (``[start, stop)`` within the row, clipped to it) at -inf."""
    c = np.asarray(cond, dtype=np.float32).copy()
    if pen_local is not None and penalty != 1.0 and pen_local.size:
        p = np.float32(penalty)
        s = c[pen_local]
        c[pen_local] = np.where(s < 0, s * p, s / p)
    if uncond is not None and np.float32(cfg) != np.float32(1.0):
        u = np.asarray(uncond, dtype=np.float32)
        c = u + np.float32(cfg) * (c - u)
    for lo, hi in bans_local:
        c[max(int(lo), 0):max(min(int(hi), c.size), 0)] = -np.inf
    return c


def sample_row(x: np.ndarray, temperature: float, top_k: int, top_p: float, u: float, acc: str = "float64") -> int:
    """Stages 2-6 for one row of combined float32 logits; index within the range, -1 for an invalid row."""
    x = np.asarray(x, dtype=np.float32)
    v = x.size
    if np.isnan(x).any() or np.isposinf(x).any():
        return -1
    finite = x > -np.inf
    nfin = int(finite.sum())
    if nfin == 0:
        return -1
    if temperature == 0:
        return int(np.argmax(x))
    xmax = x.max()
    keys = fkey(x)
    topk = 0 < top_k < v and nfin > top_k
    if topk:
        kth, need = radix_kth(keys, top_k)
        eq = keys == np.uint32(kth)
        keep = (keys > np.uint32(kth)) | (eq & (np.cumsum(eq) - 1 < need))
    else:
        keep = finite
    idx = np.flatnonzero(keep)          # ascending id: the compacted kept set
    val = x[idx]
    n = idx.size
    vkeys = keys[idx]
    p = _prob(val, xmax, temperature, acc)
    dt = p.dtype

    thr, need_p = 0, None
    if top_p < 1.0 and n > 1:
        carry = dt.type(0)
        for base in range(0, n, BLOCK):
            chunk = np.zeros(BLOCK, dtype=dt)
            chunk[:min(BLOCK, n - base)] = p[base:base + BLOCK]
            carry = carry + block_incl_scan(chunk)[1]
        big_p = dt.type(top_p) * carry
        lo, hi, mass_hi = 0, 1 << 32, dt.type(0)
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            m = block_sum(np.where(vkeys.astype(np.int64) >= mid, p, dt.type(0)), n)
            if m >= big_p:
                lo = mid
            else:
                hi, mass_hi = mid, m
        thr = lo
        ties = int((vkeys == np.uint32(thr)).sum())
        pv = _prob(np.array([keyf(thr)], dtype=np.float32), xmax, temperature, acc)[0]
        m = 1
        if pv > 0:
            q = np.ceil((big_p - mass_hi) / pv)
            m = 1 if q < 1 else (ties if q > ties else int(q))
            while m > 1 and mass_hi + dt.type(m - 1) * pv >= big_p:
                m -= 1
            while m < ties and mass_hi + dt.type(m) * pv < big_p:
                m += 1
        need_p = max(m, 1)
    if need_p is None:
        keep2 = np.ones(n, dtype=bool)
    else:
        eq = vkeys == np.uint32(thr)
        keep2 = (vkeys > np.uint32(thr)) | (eq & (np.cumsum(eq) - 1 < need_p))
    q = np.where(keep2, p, dt.type(0))

    # Stage 6: two ordered passes; total = final carry, then first carry + incl > u * total.
    chunks = []
    carry = dt.type(0)
    for base in range(0, n, BLOCK):
        chunk = np.zeros(BLOCK, dtype=dt)
        chunk[:min(BLOCK, n - base)] = q[base:base + BLOCK]
        incl, tot = block_incl_scan(chunk)
        chunks.append((base, carry, incl))
        carry = carry + tot
    target = np.float64(u) * carry if dt == np.float64 else dt.type(np.float64(u) * np.float64(carry))
    for base, c0, incl in chunks:
        m = min(BLOCK, n - base)
        hit = np.flatnonzero(keep2[base:base + m] & ((c0 + incl[:m]) > target))
        if hit.size:
            return int(idx[base + hit[0]])
    return int(idx[np.flatnonzero(keep2)[-1]])


def emulate_guided_sample(cond: np.ndarray, uncond: np.ndarray | None, params: SamplingParams,
                          uniforms: Sequence[float] | np.ndarray | None, *, range_start: int = 0,
                          generated_ids_per_row: Sequence[Sequence[int]] | None = None,
                          acc: str = "float64", banned: Sequence[tuple[int, int]] = ()) -> np.ndarray:
    """What the kernel computes for ``guided_sample``'s arguments (indices within the range), with
    ``banned`` global id ranges at -inf."""
    cond = np.asarray(cond, dtype=np.float32)
    rows, v = cond.shape
    us = np.zeros(rows) if uniforms is None else np.asarray(uniforms, dtype=np.float64).reshape(-1)
    out = np.empty(rows, dtype=np.int64)
    for r in range(rows):
        pen = None
        if generated_ids_per_row is not None:
            loc = np.asarray(generated_ids_per_row[r], dtype=np.int64).reshape(-1) - range_start
            pen = loc[(loc >= 0) & (loc < v)]
        x = combined_logits(cond[r], None if uncond is None else uncond[r], params.cfg_scale,
                            params.repetition_penalty, pen, [(a - range_start, b - range_start) for a, b in banned])
        out[r] = sample_row(x, params.temperature, params.top_k, params.top_p, float(us[r]), acc)
    return out


def greedy_by_slices(x: np.ndarray, slice_len: int = GREEDY_SLICE) -> int:
    """The greedy entry points (``illume_greedy_*``) for one row of combined float32 logits: per slice of
    ``slice_len`` (one block each) the largest value with the lowest index on ties (a slice of only -inf gives
    its first index, NaN never wins), the NaN/+inf flag and the finite count; then the row's last block
    reduces the slices in id order. Index within the range, -1 for a bad row (as ``sample_row``)."""
    x = np.asarray(x, dtype=np.float32)
    best, best_i, bad, fin = np.float32(-np.inf), 2 ** 31 - 1, False, 0
    for lo in range(0, x.size, slice_len):
        s = x[lo:lo + slice_len]
        bad |= bool(np.isnan(s).any() or np.isposinf(s).any())
        fin += int((s > -np.inf).sum())
        ok = ~np.isnan(s)
        if not ok.any():
            continue  # the block's (-inf, INT_MAX): never wins
        v = s[ok].max()
        i = lo + int(np.flatnonzero(s == v)[0])
        if v > best or (v == best and i < best_i):
            best, best_i = v, i
    return -1 if bad or fin == 0 else best_i
