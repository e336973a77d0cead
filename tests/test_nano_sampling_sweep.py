"""The development-set sweep that chooses ILLUME-nano's sampling defaults (nano/sampling_sweep.py)."""
from __future__ import annotations

import numpy as np
import pytest

from illume_edge.nano import sampling_sweep, world
from illume_edge.nano.sampling_sweep import Setting


class _Result:
    def __init__(self, image):
        self.image = image


class FakePipe:
    """Draws the truth (the prompt's source scene, the edit's target) or a blank image, in the order the sweep
    asks (item by item, `samples` each); records every call."""

    def __init__(self, items, task: str, right: bool, samples: int = 1):
        w = world.WorldConfig()
        scenes = [s for _, s in items] if task == "generate" else [e.target for e in items]
        self.truth = [world.render(s, w) for s in scenes]
        self.right, self.samples, self.calls = right, samples, []

    def _draw(self, key, seed, kw):
        image = self.truth[len(self.calls) // self.samples % len(self.truth)]  # each setting starts over
        self.calls.append((key, seed, kw))
        return _Result(image if self.right else np.full((48, 48, 3), 255, np.uint8))

    def generate(self, prompt, *, seed, **kw):
        return self._draw(prompt, seed, kw)

    def edit(self, image, instruction, *, seed, **kw):
        return self._draw(instruction, seed, kw)


def test_dev_set_is_training_split_and_not_the_evaluation():
    w = world.WorldConfig()
    pairs = sampling_sweep.dev_tasks("generate", 8)
    assert len(pairs) == 8 * len(world.GEN_CATEGORIES)
    assert not any(world.is_heldout(scene, w) for _, scene in pairs)
    edits = sampling_sweep.dev_tasks("edit", 8)
    assert len(edits) == 8 * len(world.EDIT_KINDS)
    assert not any(world.is_heldout(e.source, w) or world.is_heldout(e.target, w) for e in edits)


@pytest.mark.parametrize("task", sampling_sweep.TASKS)
def test_scores_reach_one_for_the_truth_and_zero_for_blank_images(task):
    items = sampling_sweep.dev_tasks(task, 3)
    setting = Setting(temperature=0.4, cfg=2.0, decoder_cfg=3.0)
    good = FakePipe(items, task, right=True, samples=2)
    assert sampling_sweep.score_setting(good, task, items, setting, samples=2)["overall"] == 1.0
    # the setting reaches the pipeline unchanged; item i's sample s has seed 10 * i + s
    assert {kw["temperature"] for _, _, kw in good.calls} == {0.4}
    assert {kw["cfg"] for _, _, kw in good.calls} == {2.0} and {kw["decoder_cfg"] for _, _, kw in good.calls} == {3.0}
    assert [seed for _, seed, _ in good.calls] == [10 * i + s for i in range(len(items)) for s in range(2)]
    blank = FakePipe(items, task, right=False)
    scores = sampling_sweep.score_setting(blank, task, items, setting)
    assert scores["overall"] == 0.0
    if task == "generate":  # a blank image has none of the prompt's shapes
        assert set(scores["failures"]) == set(world.GEN_CATEGORIES)
        assert all(by["object"] == 1.0 for by in scores["failures"].values())


def test_sweep_rows_and_table_mark_the_best_setting():
    items = sampling_sweep.dev_tasks("generate", 2)

    class RightAtLowTemperature(FakePipe):
        def _draw(self, key, seed, kw):
            self.right = kw["temperature"] == 0.2
            return super()._draw(key, seed, kw)

    rows = sampling_sweep.sweep(RightAtLowTemperature(items, "generate", True), "generate",
                                [Setting(1.0, 2.0), Setting(0.2, 2.0)], per_kind=2)
    assert [r["overall"] for r in rows] == [0.0, 1.0]
    text = sampling_sweep.table(rows, "generate")
    assert "| 0.2 | 2 | default |" in text and "**1.000**" in text and "**0.000**" not in text


def test_bad_settings_and_arguments_fail_clearly():
    with pytest.raises(ValueError, match="temperature >= 0"):
        Setting(temperature=-0.1, cfg=2.0)
    with pytest.raises(ValueError, match="CFG scales > 0"):
        Setting(temperature=0.5, cfg=0.0)
    with pytest.raises(ValueError, match="task must be one of"):
        sampling_sweep.dev_tasks("understand", 2)
    with pytest.raises(SystemExit, match="--cfg: expected comma-separated numbers"):
        sampling_sweep.main(["--engine", "x", "--task", "edit", "--cfg", "1,two"])
