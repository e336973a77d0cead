"""Image grammar: random walks over every anchor of three presets, illegal tokens, forced runs, whole-sequence
helpers and the text-mode bans."""
from __future__ import annotations

import numpy as np
import pytest

from illume_edge.config import preset
from illume_edge.runtime.grammar import (Forced, GrammarError, ImageGrammar, Sample, image_token_sequence,
                                         mask_text_logits, parse_image_tokens, text_banned_ranges)

PRESETS = ("tiny-plus", "tiny-v1", "illume-plus-3b")
CFGS = {name: preset(name) for name in PRESETS}
ALL_ANCHORS = [(name, hw) for name in PRESETS for hw in CFGS[name].anchors]


def walk(cfg, height, width, rng):
    """Drive a grammar to the end with random codes; check forced_run against the step-by-step sequence."""
    g = ImageGrammar(cfg, height, width)
    seq, codes = [], [[] for _ in cfg.levels]
    while not g.done:
        run = g.forced_run()
        nxt = g.next()
        if run:
            assert isinstance(nxt, Forced) and nxt.token_id == run[0]
            for tok in run:
                assert g.next() == Forced(tok)
                g.advance(tok)
                seq.append(tok)
            assert g.done or isinstance(g.next(), Sample)  # the run is maximal
        else:
            assert isinstance(nxt, Sample)
            assert (nxt.start, nxt.stop) == cfg.levels[nxt.level].token_range
            tok = int(rng.integers(nxt.start, nxt.stop))
            g.advance(tok)
            seq.append(tok)
            codes[nxt.level].append(tok - nxt.start)
    return g, seq, codes


@pytest.mark.parametrize("name,hw", ALL_ANCHORS, ids=[f"{n}-{h}x{w}" for n, (h, w) in ALL_ANCHORS])
def test_random_walk_is_well_formed(name, hw):
    cfg = CFGS[name]
    h, w = hw
    t = cfg.tokens
    for seed in range(3):
        rng = np.random.default_rng(seed)
        g, seq, codes = walk(cfg, h, w, rng)
        assert len(seq) == cfg.image_token_count(h, w) == g.length
        assert g.progress() == (g.length, g.length)
        # structure: SOI first, EOI last, per level SOL ... EOL_l, one EOL per row
        assert seq[0] == t.start_of_image and seq[-1] == t.end_of_image
        rows_total = sum(cfg.level_grid(lv, h, w)[0] for lv in range(cfg.num_levels))
        assert seq.count(t.end_of_line) == rows_total
        for lv in range(cfg.num_levels):
            assert seq.count(t.level_start(lv)) == 1 and seq.count(t.level_end(lv)) == 1
            assert seq.index(t.level_start(lv)) < seq.index(t.level_end(lv))
        n_struct = 2 + 2 * cfg.num_levels + rows_total
        assert sum(isinstance(x, int) and not cfg.levels[0].first_token_id <= x < cfg.tokenizer_len
                   for x in seq) == n_struct
        parsed = parse_image_tokens(cfg, seq, h, w)
        for lv, arr in enumerate(parsed):
            assert arr.shape == cfg.level_grid(lv, h, w) and arr.dtype == np.int64
            assert arr.reshape(-1).tolist() == codes[lv]
            np.testing.assert_array_equal(arr, g.codes()[lv])
        assert image_token_sequence(cfg, h, w, parsed) == seq
        assert image_token_sequence(cfg, h, w, [a.reshape(-1) for a in parsed]) == seq


@pytest.mark.parametrize("name", PRESETS)
def test_peek_names_each_position_before_its_tokens_are_known(name):
    """`peek(k)` is the step at position pos + k, fixed by the layout whatever the tokens before it (so a
    decode loop may queue the next step before it reads a token): the same before the walk as during it,
    None outside the image."""
    cfg = CFGS[name]
    h, w = cfg.anchors[0]
    rng = np.random.default_rng(0)
    g = ImageGrammar(cfg, h, w)
    ahead = [g.peek(k) for k in range(g.length)]
    assert g.peek(-1) is None and g.peek(g.length) is None and ahead[0] == Forced(cfg.tokens.start_of_image)
    while not g.done:
        assert g.peek(0) == g.next() == ahead[g.pos]
        assert g.peek(1) == (ahead[g.pos + 1] if g.pos + 1 < g.length else None)
        step = g.next()
        g.advance(step.token_id if isinstance(step, Forced) else int(rng.integers(step.start, step.stop)))
    assert g.peek(0) is None


def test_release_token_counts():
    cfg = CFGS["illume-plus-3b"]
    assert ImageGrammar(cfg, 256, 256).length == 368  # 9x9 + 16x16
    assert ImageGrammar(cfg, 512, 512).length == 1404  # 18x18 + 32x32
    g = ImageGrammar(cfg, 256, 256)
    assert g.next() == Forced(151665)
    g.advance(151665)
    g.advance(151668)
    assert g.next() == Sample(0, 151704, 184472)


def _advance_to_first_sample_of_level(g, cfg, level):
    while True:
        nxt = g.next()
        if isinstance(nxt, Sample) and nxt.level == level:
            return
        g.advance(nxt.token_id if isinstance(nxt, Forced) else nxt.start)


@pytest.mark.parametrize("name", PRESETS)
def test_forced_run_lengths(name):
    cfg = CFGS[name]
    h, w = cfg.anchors[0]
    g = ImageGrammar(cfg, h, w)
    t = cfg.tokens
    assert g.forced_run() == [t.start_of_image, t.level_start(0)]
    g.advance(t.start_of_image)
    assert g.forced_run() == [t.level_start(0)]
    g.advance(t.level_start(0))
    rows0, cols0 = cfg.level_grid(0, h, w)
    for _ in range(cols0):
        assert g.forced_run() == []
        g.advance(cfg.levels[0].first_token_id)
    assert g.forced_run() == [t.end_of_line]  # end of the first row
    g.advance(t.end_of_line)
    for _ in range((rows0 - 1) * (cols0 + 1) - 2):  # up to the last code of level 0
        nxt = g.next()
        g.advance(nxt.token_id if isinstance(nxt, Forced) else nxt.start)
    assert isinstance(g.next(), Sample)
    g.advance(cfg.levels[0].first_token_id)
    if cfg.num_levels == 2:
        assert g.forced_run() == [t.end_of_line, t.level_end(0), t.level_start(1)]
        _advance_to_first_sample_of_level(g, cfg, 1)
        while g.remaining > 4:
            nxt = g.next()
            g.advance(nxt.token_id if isinstance(nxt, Forced) else nxt.start)
        g.advance(cfg.levels[1].first_token_id)
        assert g.forced_run() == [t.end_of_line, t.level_end(1), t.end_of_image]
    else:
        assert g.forced_run() == [t.end_of_line, t.level_end(0), t.end_of_image]
    for tok in g.forced_run():
        g.advance(tok)
    assert g.done and g.forced_run() == []


@pytest.mark.parametrize("name", PRESETS)
def test_illegal_tokens_raise(name):
    cfg = CFGS[name]
    h, w = cfg.anchors[0]
    t = cfg.tokens
    g = ImageGrammar(cfg, h, w)
    with pytest.raises(GrammarError, match=r"image token 0 of \d+.*expected <start_of_image>"):
        g.advance(cfg.levels[0].first_token_id)
    g.advance(t.start_of_image)
    with pytest.raises(GrammarError, match="expected <start_of_level0>"):
        g.advance(t.end_of_line)
    g.advance(t.level_start(0))
    a, b = cfg.levels[0].token_range
    for bad in (t.end_of_line, b, a - 1, t.im_end, 5, -1):
        with pytest.raises(GrammarError, match=r"level 0, row 0, column 0\): expected a level-0 code"):
            g.advance(bad)
    assert g.pos == 2  # failed advances do not move
    for _ in range(cfg.level_grid(0, h, w)[1]):
        g.advance(b - 1)
    with pytest.raises(GrammarError, match=r"expected <end_of_line> \(\d+\), got \d+ \(<\|image_level0_0\|>\)"):
        g.advance(a)


def test_advance_after_done_and_codes_before_done():
    cfg = CFGS["tiny-v1"]
    g = ImageGrammar(cfg, 256, 256)
    with pytest.raises(GrammarError, match="finish the image first"):
        g.codes()
    _, seq, _ = walk(cfg, 256, 256, np.random.default_rng(0))
    g = ImageGrammar(cfg, 256, 256)
    for tok in seq:
        g.advance(tok)
    with pytest.raises(GrammarError, match="the image is complete"):
        g.advance(cfg.tokens.end_of_image)


def test_parse_rejects_bad_sequences():
    cfg = CFGS["tiny-plus"]
    _, seq, _ = walk(cfg, 256, 256, np.random.default_rng(1))
    with pytest.raises(GrammarError, match="expected 368 tokens, got 367"):
        parse_image_tokens(cfg, seq[:-1], 256, 256)
    bad = list(seq)
    bad[12] = cfg.levels[1].first_token_id  # a pixel code inside the semantic level
    with pytest.raises(GrammarError, match="image token 12 of 368"):
        parse_image_tokens(cfg, bad, 256, 256)
    bad = list(seq)
    bad[11] = cfg.levels[0].first_token_id  # a code where the first <end_of_line> belongs
    with pytest.raises(GrammarError, match=r"image token 11 of 368 \(level 0, row 0, column 9\)"):
        parse_image_tokens(cfg, bad, 256, 256)


def test_image_token_sequence_validates_codes():
    cfg = CFGS["tiny-plus"]
    good = [np.zeros(cfg.level_grid(lv, 256, 256), np.int64) for lv in range(2)]
    with pytest.raises(ValueError, match="expected 2 arrays"):
        image_token_sequence(cfg, 256, 256, good[:1])
    with pytest.raises(ValueError, match=r"codes_per_level\[1\]: expected shape \(16, 16\)"):
        image_token_sequence(cfg, 256, 256, [good[0], np.zeros((16, 15), np.int64)])
    bad = [good[0], good[1].copy()]
    bad[1][3, 4] = cfg.levels[1].codebook_size
    with pytest.raises(ValueError, match=r"code 1536 at flat index 52 is outside"):
        image_token_sequence(cfg, 256, 256, bad)


def test_text_banned_ranges_release():
    cfg = CFGS["illume-plus-3b"]
    t = cfg.tokens
    banned = text_banned_ranges(cfg)
    assert banned == [(151667, 151672), (151704, 283047)]

    def is_banned(i):
        return any(a <= i < b for a, b in banned)

    for i in (t.end_of_line, t.level_start(0), t.level_end(0), t.level_start(1), t.level_end(1), 151704,
              184471, 184472, 282775, 282776, 283046):
        assert is_banned(i), i
    for i in (t.start_of_image, t.end_of_image, t.im_end, t.endoftext, 151672, 151703, 0, 151664):
        assert not is_banned(i), i


@pytest.mark.parametrize("name", PRESETS)
def test_mask_text_logits(name):
    cfg = CFGS[name]
    lo, hi = cfg.head_ranges()["text"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, hi - lo)).astype(np.float32)
    out = mask_text_logits(x, cfg)
    banned = np.zeros(hi - lo, bool)
    for a, b in text_banned_ranges(cfg):
        banned[max(a, lo) - lo:max(min(b, hi) - lo, 0)] = True
    assert banned.sum() == 1 + 2 * cfg.num_levels  # the EOL and level tags sit inside the text head
    assert np.all(np.isneginf(out[:, banned]))
    np.testing.assert_array_equal(out[:, ~banned], x[:, ~banned])
    assert not np.isneginf(x).any()  # the input is untouched
    # a slice starting elsewhere: the level-0 head range is entirely banned
    a, b = cfg.levels[0].token_range
    assert np.all(np.isneginf(mask_text_logits(np.zeros((1, b - a), np.float32), cfg, range_start=a)))
