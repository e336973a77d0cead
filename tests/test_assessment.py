"""Self-assessment parsing and `generate(..., best_of=N)` (runtime, torch-free)."""
from __future__ import annotations

import numpy as np
import pytest

from illume_edge.runtime.assessment import complete_object, parse_assessment
from illume_edge.runtime.pipeline import AssessResult, Pipeline

GOOD = '{"object": "yes", "count": "n/a", "color": "no", "spatial": "n/a", "score": "0.50", "analysis": "a {b} c."}'


def test_complete_object_is_string_aware():
    assert complete_object("noise " + GOOD + " trailing {") == GOOD  # braces inside strings do not count
    assert complete_object('{"a": {"b": 1}} x') == '{"a": {"b": 1}}'
    assert complete_object('{"a": "unterminated }') is None
    assert complete_object("no object here") is None
    assert complete_object('{"a": "esc \\" }"}') == '{"a": "esc \\" }"}'


@pytest.mark.parametrize("text,score", [(GOOD, 0.5), ('{"score": 1}', 1.0), ('x {"score": "0.25"} y', 0.25)])
def test_parse_assessment_reads_the_score(text, score):
    got = parse_assessment(text)
    assert got is not None and got["score"] == score


@pytest.mark.parametrize("text", ["", "{}", '{"score": "high"}', '{"score": 1.5}', '{"score": -0.1}',
                                  '{"score": "0.5"', '["score", 1]', '{"score": null}'])
def test_parse_assessment_rejects_what_is_not_an_assessment(text):
    assert parse_assessment(text) is None


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return Pipeline.load(tiny_engine("tiny-plus")[0])


def test_best_of_ranks_candidates_by_the_models_own_score(pipe, monkeypatch):
    scores = iter([0.25, 1.0, 1.0])  # ties go to the earlier seed
    monkeypatch.setattr(pipe, "assess", lambda image, prompt: AssessResult(
        "{}", {"score": next(scores)}, {"total": 0.0}))
    out = pipe.generate("a red circle", seed=7, best_of=3, steps=1)
    assert [c.seed for c in out.candidates] == [7, 8, 9]
    assert out.seed == 8 and out.assessment == {"score": 1.0}
    assert np.array_equal(out.image, out.candidates[1].image)
    single = pipe.generate("a red circle", seed=8, steps=1)
    assert np.array_equal(single.image, out.image)  # a candidate is exactly the single sample of its seed


def test_best_of_keeps_the_first_when_no_answer_parses(pipe):
    out = pipe.generate("a red circle", seed=0, best_of=2, steps=1)  # random weights: no valid JSON
    assert out.seed == 0 and len(out.candidates) == 2
    assert all("assess" in c.timings for c in out.candidates)


def test_assess_stops_and_returns_text(pipe):
    res = pipe.assess(np.full((64, 64, 3), 255, np.uint8), "a red circle", max_new_tokens=4)
    assert isinstance(res.text, str) and res.assessment is None and res.timings["total"] > 0


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_best_of_must_be_a_positive_integer(pipe, bad):
    with pytest.raises(ValueError, match="best_of"):
        pipe.generate("a red circle", best_of=bad)
