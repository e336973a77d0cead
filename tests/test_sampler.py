"""Sampler: the intended distribution (chi-square), the exact inverse-CDF draw, top-k/top-p rules, CFG,
repetition penalty (against transformers), uniforms, parameters and bad inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from illume_edge.config import preset
from illume_edge.runtime import sampler as S
from illume_edge.runtime.sampler import (SamplingParams, Uniforms, apply_repetition_penalty, cfg_combine,
                                         draw_uniforms, guided_sample, level_params, sample)

P_THRESHOLD = 1e-3  # a chi-square test passes when its p-value is above this


# ----------------------------------------------------------------------------------------------------
# An independent, slow statement of the intended distribution
# ----------------------------------------------------------------------------------------------------
def intended_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Probability of each id after temperature, top-k (ties: lower id) and top-p (ties: lower id), by
    full sorts. float64 [V]."""
    x = np.asarray(logits, dtype=np.float64)
    v = x.size
    finite = np.flatnonzero(np.isfinite(x))
    order = finite[np.lexsort((finite, -x[finite]))]  # descending logit, then ascending id
    if 0 < top_k < v:
        order = order[:top_k]
    z = x[order] / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        by_p = np.lexsort((order, -p))  # descending prob, then ascending id
        cum = np.cumsum(p[by_p])
        n = int(np.argmax(cum >= top_p * cum[-1])) + 1
        keep = by_p[:n]
        order, p = order[keep], p[keep]
        p = p / p.sum()
    out = np.zeros(v)
    out[order] = p
    return out


def inverse_cdf(probs: np.ndarray, u: float) -> int:
    """The documented draw: ascending ids, first id whose cumulative probability exceeds u * total."""
    ids = np.flatnonzero(probs > 0)
    cdf = np.cumsum(probs[ids])
    j = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return int(ids[min(j, ids.size - 1)])


def chi2_sf(stat: float, df: int) -> float:
    """Survival function of the chi-square distribution (regularised upper incomplete gamma Q(df/2, x/2))."""
    a, x = df / 2.0, stat / 2.0
    if x <= 0:
        return 1.0
    log_pre = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:  # series for the lower function P
        term = total = 1.0 / a
        n = 1
        while abs(term) > 1e-15 * abs(total):
            term *= x / (a + n)
            total += term
            n += 1
        return max(0.0, 1.0 - total * math.exp(log_pre))
    # continued fraction for Q (modified Lentz)
    b = x + 1.0 - a
    c = 1e300
    d = 1.0 / b
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1.0 / d
        h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h * math.exp(log_pre)


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square p-value; bins with expected count < 5 are pooled into one."""
    n = counts.sum()
    exp = probs * n
    small = exp < 5
    obs_b = np.append(counts[~small], counts[small].sum())
    exp_b = np.append(exp[~small], exp[small].sum())
    if exp_b[-1] == 0:
        obs_b, exp_b = obs_b[:-1], exp_b[:-1]
    assert counts[probs == 0].sum() == 0, "drew a token of probability 0"
    stat = float(((obs_b - exp_b) ** 2 / exp_b).sum())
    return chi2_sf(stat, len(exp_b) - 1)


def test_chi2_sf_known_quantiles():
    # 95% and 99.9% quantiles of chi-square tables
    assert chi2_sf(18.307, 10) == pytest.approx(0.05, abs=2e-4)
    assert chi2_sf(3.841, 1) == pytest.approx(0.05, abs=2e-4)
    assert chi2_sf(29.588, 10) == pytest.approx(0.001, abs=2e-5)
    assert chi2_sf(124.342, 100) == pytest.approx(0.05, abs=2e-4)


# ----------------------------------------------------------------------------------------------------
# Distribution
# ----------------------------------------------------------------------------------------------------
CASES = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0),
    (0.7, 10, 1.0),
    (1.5, 0, 0.8),
    (1.0, 12, 0.6),
    (2.0, 5, 1.0),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature,top_k,top_p", CASES)
def test_chi_square_matches_intended_distribution(seed, temperature, top_k, top_p):
    """4000 Philox-driven draws per case: empirical frequencies vs the intended distribution, p > 1e-3."""
    rng = np.random.default_rng(100 + seed)
    v = 40
    logits = rng.normal(0, 1.5, v).astype(np.float32)
    logits[[3, 17, 29]] = logits[5]  # ties
    n = 4000
    u = draw_uniforms(seed, 1, n)[:, 0]
    drawn = sample(np.tile(logits, (n, 1)), temperature=temperature, top_k=top_k, top_p=top_p, uniforms=u)
    probs = intended_probs(logits, temperature, top_k, top_p)
    counts = np.bincount(drawn, minlength=v)
    assert chi_square_p(counts, probs) > P_THRESHOLD


def test_chi_square_detects_a_wrong_distribution():
    """Negative control: the same draws are rejected (p < 1e-6) against the distribution without top-k."""
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 1.0, 30).astype(np.float32)
    n = 4000
    drawn = sample(np.tile(logits, (n, 1)), temperature=1.0, top_k=8, top_p=1.0,
                   uniforms=draw_uniforms(3, 1, n)[:, 0])
    counts = np.bincount(drawn, minlength=30)
    assert chi_square_p(counts, intended_probs(logits, 1.0, 8, 1.0)) > P_THRESHOLD
    assert chi_square_p(counts, intended_probs(logits, 1.0, 0, 1.0)) < 1e-6


@pytest.mark.parametrize("seed", range(20))
def test_draw_is_the_documented_inverse_cdf(seed):
    """For 64 uniforms (incl. 0 and 0.999999) the token is exactly the inverse CDF over ascending
    ids of the intended distribution."""
    rng = np.random.default_rng(seed)
    v = int(rng.integers(2, 300))
    logits = rng.normal(0, 2, v).astype(np.float32)
    logits[rng.integers(0, v, v // 4)] = logits[0]  # ties
    if seed % 3 == 0:
        logits[rng.integers(0, v, v // 5)] = -np.inf
        logits[0] = 0.0
    t = float(rng.choice([0.5, 1.0, 1.7]))
    k = int(rng.choice([0, 1, 3, v // 2, v, v + 5]))
    p = float(rng.choice([1.0, 0.9, 0.5, 0.05]))
    us = np.concatenate([[0.0, 0.999999], rng.random(62)])
    got = sample(np.tile(logits, (us.size, 1)), temperature=t, top_k=k, top_p=p, uniforms=us)
    probs = intended_probs(logits, t, k, p)
    assert got.tolist() == [inverse_cdf(probs, u) for u in us]


@pytest.mark.parametrize("case", ["random", "quantised", "ascending", "descending", "few_finite"])
def test_large_range_top_k_is_exact(case):
    """The subsampled-threshold fast path returns exactly the k largest (ties: lower id) on 98,304 logits,
    including inputs that defeat its estimate (sorted logits, heavy ties, fewer finite values than k)."""
    rng = np.random.default_rng(11)
    v, k = 98304, 6144
    x = rng.normal(0, 3, v).astype(np.float32)
    if case == "quantised":
        x = np.round(x).astype(np.float32)  # ~20 distinct values: huge ties at the k-th value
    elif case == "ascending":
        x = np.sort(x)
    elif case == "descending":
        x = np.sort(x)[::-1].copy()
    elif case == "few_finite":
        x[rng.random(v) < 0.97] = -np.inf
    got = S._top_k_indices(x, k)
    finite = np.flatnonzero(np.isfinite(x))
    want = np.sort(finite[np.lexsort((finite, -x[finite]))][:k])
    assert np.array_equal(got, want)
    assert np.all(np.diff(got) > 0)


def test_large_range_sample_matches_inverse_cdf():
    rng = np.random.default_rng(5)
    x = rng.normal(0, 2, (2, 98304)).astype(np.float32)
    us = np.array([0.123, 0.987])
    got = sample(x, temperature=0.9, top_k=6144, top_p=0.8, uniforms=us)
    want = [inverse_cdf(intended_probs(x[r], 0.9, 6144, 0.8), us[r]) for r in range(2)]
    assert got.tolist() == want


# ----------------------------------------------------------------------------------------------------
# Greedy, top-k and top-p rules
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(30))
def test_top_k_1_equals_greedy(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (3, 500)).astype(np.float32)
    x[0, [10, 200, 400]] = x[0].max() + 1  # tie at the maximum: lowest id wins
    greedy = sample(x, temperature=0, top_k=0, top_p=1.0)
    assert greedy[0] == 10
    assert np.array_equal(greedy, np.argmax(x, axis=1))
    for temperature in (0.3, 1.0, 5.0):
        got = sample(x, temperature=temperature, top_k=1, top_p=1.0, uniforms=rng.random(3))
        assert np.array_equal(got, greedy)


def test_greedy_ignores_uniforms_and_params():
    x = np.array([[0.0, 2.0, 2.0, -1.0]], dtype=np.float32)
    assert sample(x, temperature=0, top_k=3, top_p=0.1).tolist() == [1]


def test_top_k_ties_keep_lower_ids():
    x = np.array([[1.0, 5.0, 3.0, 3.0, 3.0, 3.0, 0.0]], dtype=np.float32)
    # k = 3: 5.0 then the two lowest ids among the four 3.0 values -> {1, 2, 3}
    probs = intended_probs(x[0], 1.0, 3, 1.0)
    assert set(np.flatnonzero(probs)) == {1, 2, 3}
    reached = {int(sample(x, temperature=50.0, top_k=3, top_p=1.0, uniforms=[u])[0]) for u in np.linspace(0, .999, 300)}
    assert reached == {1, 2, 3}


def test_top_p_edge_cases():
    x = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    grid = np.linspace(0, 0.999, 400)

    def reached(p):
        return {int(sample(x, temperature=1.0, top_k=0, top_p=p, uniforms=[u])[0]) for u in grid}

    assert reached(1.0) == {0, 1, 2, 3}  # disabled
    assert reached(1e-6) == {0}  # tiny top-p: the most likely token only
    assert reached(0.49) == {0}  # the first token alone reaches 0.49
    assert reached(0.51) == {0, 1}
    assert reached(0.79) == {0, 1}
    assert reached(0.81) == {0, 1, 2}
    assert reached(0.96) == {0, 1, 2, 3}
    # equal probabilities: descending order puts lower ids first
    flat = np.zeros((1, 4), dtype=np.float32)
    got = [int(sample(flat, temperature=1.0, top_p=0.4, uniforms=[u])[0]) for u in (0.0, 0.49, 0.51, 0.99)]
    assert got == [0, 0, 1, 1]


def test_top_p_after_top_k_renormalises_within_the_kept_set():
    x = np.log(np.array([[0.4, 0.3, 0.2, 0.1]], dtype=np.float32))
    # top-k 2 -> {0.4, 0.3} renormalised to {0.571, 0.429}; top-p 0.5 keeps only id 0
    grid = np.linspace(0, 0.999, 200)
    assert {int(sample(x, temperature=1.0, top_k=2, top_p=0.5, uniforms=[u])[0]) for u in grid} == {0}
    assert {int(sample(x, temperature=1.0, top_k=2, top_p=0.6, uniforms=[u])[0]) for u in grid} == {0, 1}


def test_masked_logits_are_never_drawn():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (1, 64)).astype(np.float32)
    x[0, ::2] = -np.inf
    drawn = sample(np.repeat(x, 2000, 0), temperature=3.0, top_k=0, top_p=1.0, uniforms=draw_uniforms(1, 1, 2000)[:, 0])
    assert np.all(drawn % 2 == 1)


def test_rows_are_independent():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (4, 100)).astype(np.float32)
    u = rng.random(4)
    together = sample(x, temperature=0.8, top_k=20, top_p=0.9, uniforms=u)
    alone = [int(sample(x[r:r + 1], temperature=0.8, top_k=20, top_p=0.9, uniforms=u[r:r + 1])[0]) for r in range(4)]
    assert together.tolist() == alone
    assert together.dtype == np.int64


# ----------------------------------------------------------------------------------------------------
# CFG and repetition penalty
# ----------------------------------------------------------------------------------------------------
def _log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("scale", [0.0, 1.5, 2.0, 4.0])
def test_cfg_combine_matches_direct_and_log_prob_form(scale):
    rng = np.random.default_rng(int(scale * 10))
    c = rng.normal(0, 2, (2, 257)).astype(np.float32)
    u = rng.normal(0, 2, (2, 257)).astype(np.float32) + 3.0  # a different per-row offset
    got = cfg_combine(c, u, scale)
    assert got.dtype == np.float32
    direct = u.astype(np.float64) + scale * (c.astype(np.float64) - u)
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-4)
    # the reference combines log-probs; the distributions agree
    ref = _log_softmax(u) + scale * (_log_softmax(c) - _log_softmax(u))
    np.testing.assert_allclose(np.exp(_log_softmax(got)), np.exp(_log_softmax(ref)), rtol=1e-4, atol=1e-7)


def test_cfg_combine_scale_one_is_cond_and_shapes_checked():
    c = np.ones((1, 5), np.float32)
    assert cfg_combine(c, np.zeros((1, 5), np.float32), 1.0) is c
    with pytest.raises(ValueError, match="same shape"):
        cfg_combine(c, np.zeros((1, 6), np.float32), 2.0)


def _hf_penalty(row: np.ndarray, ids, penalty: float) -> np.ndarray:
    out = row.astype(np.float32).copy()
    for i in set(int(i) for i in ids):
        out[i] = out[i] * penalty if out[i] < 0 else out[i] / penalty
    return out


@pytest.mark.parametrize("penalty", [1.05, 1.3, 0.8])
def test_repetition_penalty_matches_direct_hf_rule(penalty):
    rng = np.random.default_rng(0)
    full = rng.normal(0, 2, (2, 1000)).astype(np.float32)
    start, stop = 300, 700
    ids = [rng.integers(0, 1000, 50), rng.integers(250, 750, 80)]  # in and out of the range, duplicates
    got = apply_repetition_penalty(full[:, start:stop], start, ids, penalty)
    for r in range(2):
        want = _hf_penalty(full[r], ids[r], penalty)[start:stop]
        np.testing.assert_array_equal(got[r], want)
    # input untouched; penalty 1 is the identity
    np.testing.assert_array_equal(apply_repetition_penalty(full, 0, [[1, 2], [3]], 1.0), full)


def test_repetition_penalty_matches_transformers():
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(1)
    full = rng.normal(0, 2, (2, 2000)).astype(np.float32)
    generated = rng.integers(0, 2000, (2, 120))
    hf = lp.RepetitionPenaltyLogitsProcessor(penalty=1.05)(torch.from_numpy(generated),
                                                           torch.from_numpy(full.copy())).numpy()
    start, stop = 512, 1536
    got = apply_repetition_penalty(full[:, start:stop], start, list(generated), 1.05)
    np.testing.assert_array_equal(got, hf[:, start:stop])


def test_guided_sample_applies_penalty_to_cond_before_cfg():
    rng = np.random.default_rng(2)
    c = rng.normal(0, 1, (1, 50)).astype(np.float32)
    u = rng.normal(0, 1, (1, 50)).astype(np.float32)
    gen = [[100 + int(np.argmax(c))]]  # the cond favourite, in range [100, 150)
    params = SamplingParams(temperature=0.0, cfg_scale=3.0, repetition_penalty=2.0)
    want = np.argmax(cfg_combine(apply_repetition_penalty(c, 100, gen, 2.0), u, 3.0), axis=1)
    got = guided_sample(c, u, params, None, range_start=100, generated_ids_per_row=gen)
    assert got.tolist() == want.tolist()
    # without uncond / with scale 1 it is plain sampling of the (penalised) cond
    assert guided_sample(c, None, SamplingParams(temperature=0.0), None).tolist() == [int(np.argmax(c))]


# ----------------------------------------------------------------------------------------------------
# Uniforms and parameters
# ----------------------------------------------------------------------------------------------------
def test_uniforms_reproducible_and_independent_of_shape():
    a = draw_uniforms(42, 3, 100)
    assert a.shape == (100, 3) and a.dtype == np.float64
    assert np.array_equal(a, draw_uniforms(42, 3, 100))
    assert np.array_equal(a[:10], draw_uniforms(42, 3, 10))  # fewer steps: same prefix
    assert np.array_equal(a[:, :1], draw_uniforms(42, 1, 100))  # fewer rows: same columns
    assert np.array_equal(a[:, 0], np.random.Generator(np.random.Philox(42)).random(100))
    assert not np.array_equal(a, draw_uniforms(43, 3, 100))
    assert not np.array_equal(a[:, 0], a[:, 1])
    assert a.min() >= 0 and a.max() < 1
    u = Uniforms(42, 3, 100)
    assert np.array_equal(u[7], a[7])
    with pytest.raises(IndexError, match="outside the 100 steps"):
        u[100]


def test_same_seed_same_tokens():
    rng = np.random.default_rng(9)
    x = rng.normal(0, 1, (2, 5000)).astype(np.float32)
    runs = []
    for _ in range(2):
        u = Uniforms(1234, 2, 20)
        runs.append([sample(x, temperature=1.0, top_k=100, top_p=0.9, uniforms=u[t]).tolist() for t in range(20)])
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs[0]}) > 5  # and the steps differ


def test_level_params_scale_top_k():
    cfg = preset("illume-plus-3b")
    base = SamplingParams.from_defaults(cfg.defaults.generate, repetition_penalty=1.05)
    assert (base.temperature, base.top_k, base.top_p, base.cfg_scale) == (1.0, 2048, 1.0, 2.0)
    assert level_params(base, cfg.levels[0]) == base
    pixel = level_params(base, cfg.levels[1])
    assert pixel.top_k == 6144 and pixel.temperature == base.temperature and pixel.repetition_penalty == 1.05
    assert level_params(SamplingParams(top_k=0), cfg.levels[1]).top_k == 0  # disabled stays disabled


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=2.5), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(cfg_scale=float("nan")), "cfg_scale"),
])
def test_bad_params_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_inputs_fail_clearly():
    x = np.zeros((2, 10), np.float32)
    with pytest.raises(ValueError, match=r"shape \[rows, V\]"):
        sample(np.zeros(10, np.float32), temperature=1.0, uniforms=[0.5])
    bad = x.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="row 1 contains NaN"):
        sample(bad, temperature=1.0, uniforms=[0.1, 0.2])
    masked = x.copy()
    masked[0] = -np.inf
    with pytest.raises(ValueError, match="row 0 has every logit masked"):
        sample(masked, temperature=1.0, uniforms=[0.1, 0.2])
    with pytest.raises(ValueError, match="uniforms: required"):
        sample(x, temperature=1.0)
    with pytest.raises(ValueError, match="expected 2 values"):
        sample(x, temperature=1.0, uniforms=[0.1])
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        sample(x, temperature=1.0, uniforms=[0.1, 1.0])
    with pytest.raises(ValueError, match="temperature"):
        sample(x, temperature=-0.5, uniforms=[0.1, 0.2])
    with pytest.raises(ValueError, match="one id list per logits row"):
        apply_repetition_penalty(x, 0, [[1]], 1.1)
    with pytest.raises(ValueError, match="seed"):
        draw_uniforms(-1, 1, 1)
