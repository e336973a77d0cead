"""Tokenizer factory (ids of the release layout), TextTokenizer / StreamDecoder, prompt builders and the input
image layout."""
from __future__ import annotations

import json

import numpy as np
import pytest

from illume_edge.config import preset
from illume_edge.export.tokenizer_factory import (QWEN25_SPECIALS, build_tokenizer, byte_symbols,
                                                  save_tokenizer_files)
from illume_edge.runtime.grammar import Forced, ImageGrammar
from illume_edge.runtime.prompts import (IMAGE_MARKER, ImageSlot, PromptIds, TextTokenizer, chat_text,
                                         edit_prompts, generate_prompts, image_input_layout, understand_prompt)

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
ASSISTANT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name in ("tiny-plus", "tiny-v1"):
        d = tmp_path_factory.mktemp(f"tok-{name}")
        save_tokenizer_files(preset(name), d)
        out[name] = d
    return out


@pytest.fixture(scope="module")
def tok(folders):
    return TextTokenizer.from_file(folders["tiny-plus"] / "tokenizer.json", preset("tiny-plus"))


def raw(tok, ids):
    """The exact text of ids, nothing skipped (structural tokens included)."""
    return tok.tok.decode(list(ids), skip_special_tokens=False)


# ----------------------------------------------------------------------------------------------------
# Tokenizer factory
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-plus", "tiny-v1"])
def test_every_added_token_encodes_to_its_id(folders, name):
    cfg = preset(name)
    t = TextTokenizer.from_file(folders[name] / "tokenizer.json", cfg)
    assert len(t) == cfg.tokenizer_len
    expected = [(n, cfg.tokens.endoftext + i) for i, (n, _) in enumerate(QWEN25_SPECIALS)]
    expected += cfg.tokens.structural_names(cfg.num_levels)
    for lv, level in enumerate(cfg.levels):
        expected += [(f"<|image_level{lv}_{i}|>", level.first_token_id + i) for i in range(level.codebook_size)]
    assert len(expected) == cfg.tokenizer_len - cfg.tokens.endoftext
    for name_, i in expected:
        assert t.encode(name_) == [i], name_
    # all at once, as one string
    assert t.encode("".join(n for n, _ in expected)) == [i for _, i in expected]
    assert (cfg.tokens.endoftext, cfg.tokens.im_start, cfg.tokens.im_end) == (151643, 151644, 151645)


def test_release_layout_ids():
    cfg = preset("illume-plus-3b")
    tok = build_tokenizer(cfg)
    assert tok.get_vocab_size(with_added_tokens=True) == cfg.tokenizer_len == 282776
    fixed = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|file_sep|>": 151664,
             "<start_of_image>": 151665, "<end_of_image>": 151666, "<end_of_line>": 151667,
             "<start_of_level0>": 151668, "<end_of_level0>": 151669, "<start_of_level1>": 151670,
             "<end_of_level1>": 151671, "<height_64>": 151672, "<height_1024>": 151687, "<width_64>": 151688,
             "<width_1024>": 151703, "<|image_level0_0|>": 151704, "<|image_level0_32767|>": 184471,
             "<|image_level1_0|>": 184472, "<|image_level1_98303|>": 282775}
    for name, i in fixed.items():
        assert tok.encode(name, add_special_tokens=False).ids == [i], name
    # a strided sample of every level's codes, encoded together
    names, ids = [], []
    for lv, level in enumerate(cfg.levels):
        for i in range(0, level.codebook_size, 997):
            names.append(f"<|image_level{lv}_{i}|>")
            ids.append(level.first_token_id + i)
    assert tok.encode("".join(names), add_special_tokens=False).ids == ids
    added = tok.get_added_tokens_decoder()
    assert added[151645].special and not added[151665].special and not added[200000].special
    assert added[151657].content == "<tool_call>" and not added[151657].special


def test_base_vocabulary(tok):
    assert [tok.tok.id_to_token(i) for i in range(256)] == byte_symbols()
    assert tok.tok.id_to_token(0) == "!" and tok.tok.id_to_token(220) == "Ġ"  # as in Qwen's vocabulary
    # filler ids can never be produced: any text encodes to byte ids (no merges) or added tokens
    rng = np.random.default_rng(0)
    text = "".join(chr(c) for c in rng.integers(32, 0x2FFF, 3000))
    ids = np.array(tok.encode(text))
    assert ids.max() < 256


def test_base_words_encode_to_single_low_ids(tmp_path):
    cfg = preset("tiny-v1")
    words = ["cat", " cat", "cats", "abab", " dog", "über", "42"[0]]
    t = build_tokenizer(cfg, base_words=words)
    for w in words:
        ids = t.encode(w, add_special_tokens=False).ids
        assert len(ids) == 1 and ids[0] < 300, (w, ids)
    assert t.encode(" cat cats abab", add_special_tokens=False).ids[0] == t.encode(" cat").ids[0]
    with pytest.raises(ValueError, match="non-empty strings"):
        build_tokenizer(cfg, base_words=[""])
    with pytest.raises(ValueError, match=r"'two words' encodes to \d+ tokens"):
        build_tokenizer(cfg, base_words=["two words"])


def test_hf_folder_loads_in_transformers(folders):
    transformers = pytest.importorskip("transformers")
    cfg = preset("tiny-plus")
    d = folders["tiny-plus"]
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    assert len(hf) == cfg.tokenizer_len
    assert (hf.eos_token_id, hf.pad_token_id, hf.padding_side) == (cfg.tokens.im_end, cfg.tokens.endoftext, "left")
    msg = "Describe <image> please"
    templ = hf.apply_chat_template([{"role": "user", "content": msg}], tokenize=False, add_generation_prompt=True)
    assert templ == chat_text(cfg, msg) == f"{SYSTEM}<|im_start|>user\n{msg}<|im_end|>\n{ASSISTANT}"
    text = "Generate an image of <height_256><width_512>, the content of image is ü 😀\n"
    tok = TextTokenizer.from_file(d / "tokenizer.json", cfg)
    assert hf(text, add_special_tokens=False).input_ids == tok.encode(text)
    conf = json.loads((d / "tokenizer_config.json").read_text())
    assert conf["eos_token"] == "<|im_end|>" and conf["padding_side"] == "left"


def test_tokenizer_mismatch_fails_clearly(folders):
    with pytest.raises(ValueError, match="expects tokenizer_len"):
        TextTokenizer.from_file(folders["tiny-v1"] / "tokenizer.json", preset("tiny-plus"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextTokenizer.from_file(folders["tiny-v1"] / "nope.json", preset("tiny-v1"))


# ----------------------------------------------------------------------------------------------------
# Text round trip and streaming
# ----------------------------------------------------------------------------------------------------
TEXTS = ["Hello, world!", "  leading and trailing  ", "line1\nline2\r\n\ttab", "naïve café — 東京 😀👍🏽",
         "don't stop 1234 <tags> {braces}", "Ünïcödé\n\n"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_skips_structural_codes_and_specials(tok):
    cfg = tok.cfg
    ids = [cfg.tokens.im_start] + tok.encode("hi") + [cfg.tokens.start_of_image, cfg.levels[0].first_token_id,
                                                       cfg.tokens.end_of_line, cfg.tokens.im_end]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special=False) == "<|im_start|>hi<|im_end|>"
    assert tok.decode([cfg.llm.vocab_rows - 1]) == ""  # a dead row


@pytest.mark.parametrize("text", TEXTS + ["€€€", "😀", "a😀b"])
def test_stream_decoder_multibyte(tok, text):
    ids = tok.encode(text)
    s = tok.stream()
    pieces = [s.push(i) for i in ids]
    assert "".join(pieces) + s.flush() == text
    assert not any("\ufffd" in p for p in pieces)
    if any(ord(c) > 127 for c in text):
        assert "" in pieces  # a split character was held back


def test_stream_decoder_ignores_image_tokens_and_flushes_invalid_bytes(tok):
    cfg = tok.cfg
    s = tok.stream()
    out = ""
    for i in tok.encode("ab") + [cfg.tokens.start_of_image, cfg.levels[1].first_token_id, cfg.tokens.im_end]:
        out += s.push(i)
    assert out == "ab"
    lone = tok.encode("😀")[:2]  # the first two bytes of a 4-byte character
    s = tok.stream()
    assert [s.push(i) for i in lone] == ["", ""]
    assert s.flush() == "\ufffd"


# ----------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------
def test_generate_prompts_exact(tok):
    cfg = tok.cfg
    cond, uncond = generate_prompts(tok, cfg, "a red {cat}", 384, 512)
    tags = "<height_384><width_512>"
    want_c = (f"{SYSTEM}<|im_start|>user\nGenerate an image of {tags}, the content of image is a red {{cat}}\n"
              f"<|im_end|>\n{ASSISTANT}{tags}")
    want_u = f"{SYSTEM}<|im_start|>user\nGenerate a random image of {tags}\n<|im_end|>\n{ASSISTANT}{tags}"
    for p, want in ((cond, want_c), (uncond, want_u)):
        assert p.n_images == 0 and len(p.segments) == 1
        assert raw(tok, p.ids()) == want
        assert p.ids() == tok.encode(want)
        h, w = cfg.tokens.height_tag(384, 2), cfg.tokens.width_tag(512, 2)
        assert p.ids()[-2:] == [h, w] and p.ids()[0] == cfg.tokens.im_start
        assert p.ids().count(h) == 2 and p.ids().count(cfg.tokens.start_of_image) == 0  # SOI is not in the prompt


def test_edit_prompts_exact(tok):
    cfg = tok.cfg
    cond, uncond = edit_prompts(tok, cfg, "make it blue", 256, 256)
    tags = "<height_256><width_256>"
    head = f"{SYSTEM}<|im_start|>user\n{tags}"
    want_c = ("\nPlease edit the image according to the instruction: make it blue\n<|im_end|>\n"
              f"{ASSISTANT}{tags}")
    want_u = f"\nReconstruct the image according to the given image\n<|im_end|>\n{ASSISTANT}{tags}"
    for p, tail in ((cond, want_c), (uncond, want_u)):
        assert p.n_images == 1
        a, slot, b = p.segments
        assert slot == ImageSlot(0)
        assert raw(tok, a) == head and list(a) == tok.encode(head)
        assert raw(tok, b) == tail and list(b) == tok.encode(tail)
        assert p.ids() == list(a) + [IMAGE_MARKER] + list(b)


def test_understand_prompt_exact(tok):
    cfg = tok.cfg
    p = understand_prompt(tok, cfg, "What is this?")
    a, slot, b = p.segments
    assert raw(tok, a) == f"{SYSTEM}<|im_start|>user\n" and slot == ImageSlot(0)
    assert raw(tok, b) == f"\nWhat is this?<|im_end|>\n{ASSISTANT}"
    two = understand_prompt(tok, cfg, "Compare.", n_images=2)
    assert [type(s).__name__ for s in two.segments] == ["tuple", "ImageSlot", "tuple", "ImageSlot", "tuple"]
    assert raw(tok, two.segments[2]) == "\n" and two.segments[3] == ImageSlot(1)
    verbatim = understand_prompt(tok, cfg, "Left <image> right <image>?", n_images=2)
    assert raw(tok, verbatim.segments[2]) == " right "
    text_only = understand_prompt(tok, cfg, "Hi", n_images=0)
    assert raw(tok, text_only.ids()) == f"{SYSTEM}<|im_start|>user\nHi<|im_end|>\n{ASSISTANT}"
    # expanding slots with image sequences
    assert p.expand([[7, 8]]) == list(a) + [7, 8] + list(b)
    with pytest.raises(ValueError, match="1 image slots, got 2"):
        p.expand([[1], [2]])


def test_text_first_layout_puts_the_text_before_the_image(tok):
    """PromptTemplates.text_first (config.PROMPT_LAYOUTS): understanding, assessment and editing prompts with the
    user's text first and the image slot after it; everything else as the release's templates."""
    import dataclasses

    from illume_edge.config import PROMPT_LAYOUTS
    from illume_edge.runtime.prompts import assess_prompt

    cfg = dataclasses.replace(tok.cfg, prompts=PROMPT_LAYOUTS["text-first"](tok.cfg.prompts))
    assert PROMPT_LAYOUTS["image-first"](tok.cfg.prompts) == tok.cfg.prompts
    user = f"{SYSTEM}<|im_start|>user\n"
    a, slot, b = understand_prompt(tok, cfg, "What is this?").segments
    assert (raw(tok, a), slot, raw(tok, b)) == (f"{user}What is this?\n", ImageSlot(0), f"<|im_end|>\n{ASSISTANT}")
    a, slot, b = assess_prompt(tok, cfg, "a red circle").segments
    assert raw(tok, a) == f"{user}assess the image for the prompt: a red circle\n" and slot == ImageSlot(0)
    tags = "<height_256><width_256>"
    cond, uncond = edit_prompts(tok, cfg, "make it blue", 256, 256)
    a, slot, b = cond.segments
    assert raw(tok, a) == f"{user}{tags}Please edit the image according to the instruction: make it blue\n"
    assert raw(tok, b) == f"\n<|im_end|>\n{ASSISTANT}{tags}"
    assert uncond.ids() == edit_prompts(tok, tok.cfg, "make it blue", 256, 256)[1].ids()  # reconstruction as is
    same = (generate_prompts(t, c, "cat", 256, 256)[0].ids() for t, c in ((tok, cfg), (tok, tok.cfg)))
    assert next(same) == next(same)  # no input image: generation prompts as the release's


@pytest.mark.parametrize("call,match", [
    (lambda t, c: generate_prompts(t, c, "", 256, 256), "caption: expected a non-empty string"),
    (lambda t, c: generate_prompts(t, c, "   ", 256, 256), "caption"),
    (lambda t, c: generate_prompts(t, c, "a <image> cat", 256, 256), "caption: must not contain"),
    (lambda t, c: edit_prompts(t, c, "", 256, 256), "instruction: expected a non-empty string"),
    (lambda t, c: understand_prompt(t, c, ""), "question: expected a non-empty string"),
    (lambda t, c: understand_prompt(t, c, "<image> a", n_images=2), "1 '<image>' placeholders but n_images=2"),
    (lambda t, c: generate_prompts(t, c, "cat", 256, 320), r"256x320 \(HxW\) is not supported.*256x256, 384x512"),
    (lambda t, c: edit_prompts(t, c, "blue", 768, 384), r"768x384 .*not supported"),
])
def test_bad_prompt_inputs_fail_clearly(tok, call, match):
    with pytest.raises(ValueError, match=match):
        call(tok, tok.cfg)


def test_release_resolutions_accepted(tok):
    cfg = preset("illume-plus-3b")
    from illume_edge.runtime.prompts import resolution_tags
    assert resolution_tags(cfg, 768, 384) == ("<height_768>", "<width_384>")
    assert len({resolution_tags(cfg, h, w) for h, w in cfg.anchors}) == 12


def test_prompt_ids_flatten():
    p = PromptIds(((1, 2), ImageSlot(0), (3,), ImageSlot(1)))
    assert p.ids() == [1, 2, IMAGE_MARKER, 3, IMAGE_MARKER] and p.n_images == 2 and p.num_text_ids == 3
    assert p.ids(marker=-1) == [1, 2, -1, 3, -1]


# ----------------------------------------------------------------------------------------------------
# Input image layout
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-plus", "tiny-v1", "illume-plus-3b"])
def test_image_input_layout_matches_grammar(name):
    cfg = preset(name)
    for h, w in list(cfg.anchors) + [(336, 448)]:  # anchors and an understanding size
        lay = image_input_layout(cfg, h, w)
        assert lay.length == cfg.image_token_count(h, w)
        ids = lay.ids()
        g = ImageGrammar(cfg, h, w)
        for pos in range(lay.length):  # structural tokens where the grammar forces them, features elsewhere
            exp = g._expect(pos)
            assert ids[pos] == (exp.token_id if isinstance(exp, Forced) else IMAGE_MARKER)
        all_pos = np.concatenate(lay.feature_positions)
        assert np.array_equal(np.sort(all_pos), np.flatnonzero(ids == IMAGE_MARKER))
        for lv, p in enumerate(lay.feature_positions):
            rows, cols = cfg.level_grid(lv, h, w)
            assert p.shape == (rows * cols,) and lay.grids[lv] == (rows, cols)
            assert np.all(np.diff(p) > 0)
            # row r's features end right before an <end_of_line>
            ends = p.reshape(rows, cols)[:, -1] + 1
            assert np.all(ids[ends] == cfg.tokens.end_of_line)
        n_feature_items = sum(k == "features" for k, _ in lay.items)
        assert n_feature_items == sum(cfg.level_grid(lv, h, w)[0] for lv in range(cfg.num_levels))


def test_final_answer_is_what_follows_the_last_separator():
    from illume_edge.runtime.pipeline import TextStream
    from illume_edge.runtime.decode_loops import Timings
    from illume_edge.runtime.prompts import final_answer

    assert final_answer(" red ", "") == "red"  # a model that answers directly: the whole reply
    assert final_answer("a red circle at the top. red", ". ") == "red"
    assert final_answer("a red circle. a blue square. two", ". ") == "two"
    assert final_answer("no separator written", ". ") == "no separator written"
    stream = TextStream(iter(["a red circle", " at the top", ". ", "red"]), Timings(), 0.0, ". ")
    assert "".join(stream) == "a red circle at the top. red"
    assert stream.result.text == "a red circle at the top. red" and stream.result.answer == "red"
    direct = TextStream(iter(["red"]), Timings(), 0.0)
    list(direct)
    assert direct.result.answer == direct.result.text == "red"

