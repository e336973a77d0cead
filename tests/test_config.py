"""The family config: presets hold the spec's numbers, round-trip strictly through JSON, reject bad values."""
import json

import pytest

from illume_edge.config import PRESETS, ConfigError, ModelConfig, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip(name):
    cfg = preset(name)
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_illume_plus_ids_match_the_release():
    for size, rows in (("3b", 283047), ("7b", 283175)):
        cfg = preset(f"illume-plus-{size}")
        t = cfg.tokens
        assert (t.start_of_image, t.end_of_image, t.end_of_line) == (151665, 151666, 151667)
        assert [t.level_start(0), t.level_end(0), t.level_start(1), t.level_end(1)] == [151668, 151669, 151670, 151671]
        assert t.height_tag(64, 2) == 151672 and t.height_tag(1024, 2) == 151687
        assert t.width_tag(64, 2) == 151688 and t.width_tag(1024, 2) == 151703
        assert cfg.levels[0].token_range == (151704, 151704 + 32768)
        assert cfg.levels[1].token_range == (184472, 184472 + 98304)
        assert cfg.tokenizer_len == 282776 and cfg.llm.vocab_rows == rows
        assert cfg.image_token_count(256, 256) == 368
        assert cfg.image_token_count(512, 512) == 1404
        assert cfg.level_grid(0, 256, 256) == (9, 9) and cfg.level_grid(1, 256, 256) == (16, 16)
        assert cfg.diffusion.resolution_index(256, 256) == 11  # (512, 512) output is the list's last entry
        assert cfg.diffusion.resolution_index(512, 512) == 0


def test_real_sizes():
    c3, c7 = preset("illume-plus-3b").llm, preset("illume-plus-7b").llm
    assert (c3.num_layers, c3.hidden_size, c3.num_heads, c3.num_kv_heads, c3.intermediate_size, c3.head_size) == \
        (36, 2048, 16, 2, 11008, 128)
    assert (c7.num_layers, c7.hidden_size, c7.num_heads, c7.num_kv_heads, c7.intermediate_size, c7.head_size) == \
        (28, 3584, 28, 4, 18944, 128)


def test_head_ranges_cover_the_tokenizer():
    for name in PRESETS:
        cfg = preset(name)
        ranges = sorted(cfg.head_ranges().values())
        assert ranges[0][0] == 0 and ranges[-1][1] == cfg.tokenizer_len
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_tiny_v1_has_one_branch_and_level():
    cfg = preset("tiny-v1")
    assert len(cfg.branches) == 1 and cfg.num_levels == 1 and cfg.llm.arch == "llama"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["llm"].update(foo=1), "unknown key(s) ['foo']"),
    (lambda d: d["llm"].pop("hidden_size"), "missing key 'hidden_size'"),
    (lambda d: d["llm"].update(hidden_size="64"), "expected int"),
    (lambda d: d["branches"][0]["encoder"].update(kind="clip"), "unknown kind 'clip'"),
    (lambda d: d["levels"][0].update(first_token_id=5), "first_token_id expected"),
    (lambda d: d["llm"].update(arch="gpt2"), "expected 'qwen2' or 'llama'"),
])
def test_bad_configs_fail_clearly(mutate, message):
    d = json.loads(preset("tiny-plus").to_json())
    mutate(d)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_dict(d)


def test_unknown_preset_and_bad_resolution():
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("illume-plus-13b")
    with pytest.raises(ConfigError, match="multiple of 64"):
        preset("illume-plus-3b").tokens.height_tag(100, 2)
    with pytest.raises(ConfigError, match="not one of the diffusion decoder's sizes"):
        preset("illume-plus-3b").diffusion.resolution_index(100, 100)
