"""The LLM diagnostics (illume_edge/nano/probes.py) on the shipped checkpoint: the teacher-forced score is the
greedy runtime's, the attention rows are well-formed shares, and a from-scratch variant runs every stage."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from illume_edge.nano import probes, recipe, world
from illume_edge.nano.sequences import IGNORE

NANO = Path(__file__).resolve().parents[1] / "models" / "illume-nano"


@pytest.fixture(scope="module")
def shipped():
    return probes.load_trainer(NANO)


def test_teacher_forced_right_is_greedy_runtime_right(shipped, tmp_path):
    """A question is teacher-forced right exactly when the runtime's greedy answer equals the truth, on the
    evaluation's held-out questions (4 per kind) through the exported fp32 engine."""
    from illume_edge.export.checkpoint import load_checkpoint
    from illume_edge.export.engine import export_engine
    from illume_edge.runtime.pipeline import Pipeline

    trainer, builder = shipped
    qas = probes.questions(4, "heldout")
    assert [q.kind for _, q in qas] == [k for k in world.QA_KINDS for _ in range(4)]
    export_engine(load_checkpoint(NANO), tmp_path / "e", NANO / "mllm" / "tokenizer.json", progress=lambda s: None)
    pipe = Pipeline.load(tmp_path / "e", threads=2)
    greedy = [pipe.understand(world.render(s, world.WorldConfig()), q.question, max_new_tokens=64).text.strip()
              == q.answer for s, q in qas]
    assert probes.answers_right(trainer, builder, qas) == greedy
    acc = probes.accuracy_by_kind(qas, greedy)
    assert set(acc) == set(world.QA_KINDS) | {"overall"}
    assert acc["overall"] == pytest.approx(np.mean([acc[k] for k in world.QA_KINDS]), abs=1e-3)


def test_training_split_questions_come_from_training_scenes():
    qas = probes.questions(3, "train")
    assert len(qas) == 3 * len(world.QA_KINDS) and not any(world.is_heldout(s) for s, _ in qas)


def test_attention_rows_are_shares_per_layer_and_head(shipped):
    trainer, builder = shipped
    qas = [(s, q) for s, q in probes.questions(6, "heldout") if q.kind in ("color", "shape")]
    for s, q in qas:
        target = probes.asked_object(s, q)
        assert target in s.objects and (target.shape in q.question if q.kind == "color" else target.color in q.question)
    impl = trainer.llm.config._attn_implementation
    rows = probes.attention_on_asked_object(trainer, builder, qas)
    assert trainer.llm.config._attn_implementation == impl  # eager only for the probe
    llm = trainer.cfg.llm
    assert [(r["layer"], r["head"]) for r in rows] == [(i, h) for i in range(llm.num_layers)
                                                       for h in range(llm.num_heads)]
    for r in rows:
        assert 0 <= r["image"] <= 1 + 1e-5 and 0 <= r["asked"] <= r["objects"] + 1e-5 <= 1 + 2e-5
        assert 0 < r["asked_uniform"] <= 1


def test_from_scratch_variant_runs_every_llm_stage():
    qas = probes.questions(1, "heldout")
    history = probes.from_scratch("factored", 1e6, recipe.SCHEDULES["smoke"], qas, log=lambda s: None)
    assert [h["stage"] for h in history] == [name for name, *_ in recipe.LLM_STAGES]
    assert all(0 <= h["overall"] <= 1 for h in history)
    text_first = probes.from_scratch("joint", None, recipe.SCHEDULES["smoke"], qas, log=lambda s: None,
                                     prompt_layout="text-first")
    assert [h["stage"] for h in text_first] == [h["stage"] for h in history]
    with pytest.raises(ValueError, match="vit-targets"):
        probes.from_scratch("joint-ish", None, recipe.SCHEDULES["smoke"], qas, log=lambda s: None)


def test_asked_object_names_the_object_of_every_supervised_question():
    """Over many scenes: color / shape / position questions and yes-exist questions name one object that has
    the question's attributes; no-exist, count, relation and describe questions name none."""
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(400):
        scene = world.sample_scene(rng, world.WorldConfig())
        q = world.make_qa(scene, rng, str(rng.choice(world.QA_KINDS)))
        if q is None:
            continue
        obj = probes.asked_object(scene, q, probes.SUPERVISED_KINDS)
        named = q.kind in ("color", "shape", "position") or (q.kind == "exist" and q.answer == "yes")
        assert (obj is not None) == named, q
        if obj is not None:
            seen.add(q.kind)
            assert obj in scene.objects
            words = q.question.rstrip("?").split()
            assert obj.shape in words or obj.color in words
            if q.kind == "color":
                assert q.answer == obj.color
            if q.kind == "shape":
                assert q.answer == obj.shape
    assert seen == set(probes.SUPERVISED_KINDS)


def test_attention_supervision_trains_and_restores_the_model():
    trainer, builder = probes.load_trainer(NANO)
    before = [p.detach().clone() for p in trainer.llm.parameters()]
    impl = trainer.llm.config._attn_implementation
    probes.train_with_attention_supervision(trainer, builder, steps=2, lr=1e-3, layer=1, weight=1.0, seed=0, batch=4)
    assert trainer.llm.config._attn_implementation == impl and not trainer.llm.training
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.llm.parameters()))


def test_linear_probe_reads_separable_data_and_not_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 800)
    x = rng.normal(size=(800, 16))
    x[:, 0] += 8 * y  # class is a linear direction, 8 noise sds between classes
    assert probes._linear_probe_accuracy(x, y)["accuracy"] >= 0.98
    noise = probes._linear_probe_accuracy(rng.normal(size=(800, 16)), y)
    assert noise["accuracy"] <= noise["majority"] + 0.1 and noise["samples"] == 800


def test_linear_probes_cover_query_and_keys(shipped):
    trainer, builder = shipped
    qas = probes.questions(12, "train")
    asked = [(s, q) for s, q in qas if probes.asked_object(s, q) is not None]
    tokens = 4 * sum(len(s.objects) for s, _ in asked)  # 2 x 2 tokens per object cell
    out = probes.linear_probes(trainer, builder, qas, layer=1)
    assert out["query"]["samples"] == len(asked) == 24
    assert out["key_shape"]["samples"] == out["key_color"]["samples"] == tokens
    assert all(0 <= v["accuracy"] <= 1 and 0 < v["majority"] <= 1 for v in out.values())


def test_restyled_answers_restate_the_asked_object_or_describe_first():
    scene = world.Scene((world.Obj(0, 0, "circle", "red"), world.Obj(2, 2, "square", "blue")))
    qa = lambda kind, q, a: world.QA(kind, q, a)  # noqa: E731
    color = qa("color", "what color is the circle?", "red")
    shape = qa("shape", "what shape is the blue object?", "square")
    where = qa("position", "where is the red circle?", "top left")
    count = qa("count", "how many objects are there?", "two")
    assert probes.restyle(scene, color, "echo").answer == "the circle is red"
    assert probes.restyle(scene, shape, "echo").answer == "the blue object is a square"
    assert probes.restyle(scene, where, "echo").answer == "the red circle is at the top left"
    assert probes.restyle(scene, qa("position", "where is the square?", "center"), "echo").answer == \
        "the square is in the center"
    assert probes.restyle(scene, count, "echo") == count  # nothing to restate
    assert probes.restyle(scene, count, "describe-first").answer == \
        "a red circle at the top left and a blue square at the bottom right. two"
    describe = qa("describe", "describe the image.", world.describe(scene))
    assert probes.restyle(scene, describe, "describe-first") == describe
    assert probes.restyle(scene, color, "short") == color
    above = qa("relation", "is the red circle above the blue square?", "yes")
    assert probes.restyle(scene, above, "positions-first").answer == "top left, bottom right. yes"
    assert probes.restyle(scene, color, "positions-first") == color
    assert probes.restyle(scene, above, "winner-first").answer == "the red circle. yes"
    below = qa("relation", "is the red circle below the blue square?", "no")
    assert probes.restyle(scene, below, "winner-first").answer == "the blue square. no"
    assert probes.restyle(scene, color, "winner-first") == color
    with pytest.raises(ValueError, match="answer-style"):
        probes.restyle(scene, color, "verbose")
    with pytest.raises(ValueError, match="does not match"):
        probes.restyle(scene, qa("color", "which color has the circle?", "red"), "echo")


def test_restyled_tasks_train_on_the_restyled_answers():
    """Every QA turn of a restyled dialogue is in the new format; the recipe's default keeps the world's."""
    from illume_edge.config import preset
    from illume_edge.runtime.prompts import TextTokenizer
    from illume_edge.nano.sequences import SequenceBuilder

    cfg = preset("illume-nano")
    builder = SequenceBuilder(TextTokenizer.from_file(NANO / "mllm" / "tokenizer.json", cfg), cfg)
    seen = []
    style = lambda s, q: (seen.append(q.kind), probes.restyle(s, q, "describe-first"))[1]  # noqa: E731
    tasks = recipe.Tasks(builder, world.WorldConfig(), answer_style=style)
    ex = tasks.qa(np.random.default_rng(0))
    text = builder.tok.decode([t for t, l in zip(ex.ids, ex.labels) if l >= 0])
    assert seen and text.count(". ") >= sum(k != "describe" for k in seen) >= 1
    plain = recipe.Tasks(builder, world.WorldConfig()).qa(np.random.default_rng(0))
    assert plain.ids != ex.ids and len(plain.ids) < len(ex.ids)


def test_text_lookup_trains_from_scratch_and_scores_every_kind():
    history = probes.text_lookup(probes.parse_phases("color:2,all:1"), per_kind=2, batch=4, every=2,
                                 log=lambda s: None)
    assert [h["steps"] for h in history] == [2, 3]
    assert set(history[-1]) >= set(world.QA_KINDS) | {"overall", "loss"}
    assert all(0.0 <= history[-1][k] <= 1.0 for k in world.QA_KINDS)
    one = probes.text_lookup([(("color",), 1)], per_kind=2, batch=2, log=lambda s: None)
    assert set(one[-1]) - {"steps", "seconds", "loss"} == {"color", "overall"}


def test_text_lookup_attention_variants(monkeypatch):
    """--heads / --kv-heads change the probe's LLM (nano: 4 query heads, 2 key/value heads) and nothing else."""
    from illume_edge.export import llm

    seen, real = [], llm.build_llm
    monkeypatch.setattr(llm, "build_llm", lambda cfg, **kw: seen.append(cfg.llm) or real(cfg, **kw))
    probes.text_lookup([(("color",), 1)], per_kind=1, batch=2, log=lambda s: None, kv_heads=4)
    probes.text_lookup([(("color",), 1)], per_kind=1, batch=2, log=lambda s: None, heads=8)
    assert [(c.num_heads, c.num_kv_heads, c.hidden_size) for c in seen] == [(4, 4, 128), (8, 2, 128)]


def test_lookup_pairs_in_both_layouts_supervise_only_the_answer():
    from illume_edge.config import preset
    from illume_edge.export.tokenizer_factory import build_tokenizer
    from illume_edge.nano import text_pretrain
    from illume_edge.nano.text import base_words
    from illume_edge.runtime.prompts import TextTokenizer

    cfg = preset("illume-nano")
    tok = TextTokenizer(build_tokenizer(cfg, base_words(cfg)), cfg)
    rng = np.random.default_rng(3)
    scene = world.sample_scene(rng, world.WorldConfig(), split="train")
    qa = world.make_qa(scene, rng, "count")
    end = cfg.tokens.im_end
    texts = {"scene-first": f"{world.describe(scene)}. {qa.question}",
             "question-first": f"{qa.question} {world.describe(scene)}."}
    for layout, text in texts.items():
        ids, labels = text_pretrain.lookup_pair(tok, end, scene, qa, layout)
        n = len(tok.encode(text))
        assert ids[:n] == tok.encode(text) and labels[:n] == [IGNORE] * n
        assert labels[n:] == ids[n:] == tok.encode(" " + qa.answer) + [end]
    with pytest.raises(ValueError, match="layout must be one of"):
        text_pretrain.lookup_pair(tok, end, scene, qa, "answer-first")


def test_text_lookup_phases_parse_and_refuse_bad_kinds():
    assert probes.parse_phases("color:40,all:15") == [(("color",), 40), (world.QA_KINDS, 15)]
    assert probes.parse_phases("color+shape:5") == [(("color", "shape"), 5)]
    for bad, match in (("colour:10", "QA kinds"), ("color", "KINDS:STEPS"), ("color:x", "KINDS:STEPS")):
        with pytest.raises(ValueError, match=match):
            probes.parse_phases(bad)


def test_slot_scenes_put_each_objects_words_on_its_cell_tokens():
    cfg, tok, model = probes._fresh_llm()
    slots = probes.SlotScenes(cfg, tok)
    scene = world.Scene((world.Obj(0, 2, "circle", "red"), world.Obj(2, 0, "triangle", "blue")))
    color, shape = slots.word_grid(scene)
    color, shape = color.reshape(6, 6), shape.reshape(6, 6)
    assert (color[0:2, 4:6] == tok.encode(" red")[0]).all() and (shape[0:2, 4:6] == tok.encode(" circle")[0]).all()
    assert (color[4:6, 0:2] == tok.encode(" blue")[0]).all() and (shape[4:6, 0:2] == tok.encode(" triangle")[0]).all()
    assert ((color == slots.pad).sum(), (shape == slots.pad).sum()) == (36 - 8, 36 - 8)
    qa = world.make_qa(scene, np.random.default_rng(0), "color")
    embed = model.get_input_embeddings()
    x, y, m = slots.batch(embed, [(scene, qa)])
    with torch.no_grad():
        assert torch.allclose(x[0, 4], embed.weight[tok.encode(" red")[0]] + embed.weight[tok.encode(" circle")[0]])
        assert torch.allclose(x[0, 0], embed.weight[slots.pad])  # an empty cell: the padding embedding alone
    answer = tok.encode(" " + qa.answer) + [cfg.tokens.im_end]
    assert y[0][y[0] != IGNORE].tolist() == answer
    assert int(m.sum()) == 36 + len(tok.encode(" " + qa.question)) + len(answer)


def test_placed_slot_scenes_add_each_cells_row_and_column_words():
    cfg, tok, model = probes._fresh_llm()
    slots = probes.SlotScenes(cfg, tok, placed=True)
    scene = world.Scene((world.Obj(0, 2, "circle", "red"),))
    qa = world.make_qa(scene, np.random.default_rng(0), "color")
    embed = model.get_input_embeddings()
    x, _, _ = slots.batch(embed, [(scene, qa)])
    word = {w: embed.weight[tok.encode(" " + w)[0]] for w in ("red", "circle", "top", "right", "bottom", "left")}
    with torch.no_grad():
        assert torch.allclose(x[0, 4], word["red"] + word["circle"] + word["top"] + word["right"])
        # token (5, 1): an empty token of the bottom-left cell
        assert torch.allclose(x[0, 5 * 6 + 1], embed.weight[slots.pad] + word["bottom"] + word["left"])
    unplaced, _, _ = probes.SlotScenes(cfg, tok).batch(embed, [(scene, qa)])
    assert torch.allclose(unplaced[0, 4], word["red"] + word["circle"])


def test_fresh_llm_variants_change_only_what_they_name():
    base, _, model = probes._fresh_llm()
    deep, _, deep_model = probes._fresh_llm(layers=6)
    assert (deep.llm.num_layers, len(deep_model.model.layers)) == (6, 6)
    assert len(model.model.layers) == base.llm.num_layers
    assert dataclasses.replace(deep.llm, num_layers=base.llm.num_layers) == base.llm
    wide = probes._variant_config(base, hidden=64, heads=2)
    assert (wide.llm.hidden_size, wide.llm.intermediate_size, wide.llm.num_heads, wide.llm.num_kv_heads) == (
        64, 192, 2, min(base.llm.num_kv_heads, 2))


def test_slot_lookup_trains_in_an_answer_style():
    history = probes.slot_lookup(probes.parse_phases("relation:1"), per_kind=2, batch=2, every=1, log=lambda s: None,
                                 placed=True, answer_style="positions-first", layers=2)
    assert [h["steps"] for h in history] == [1] and 0.0 <= history[0]["relation"] <= 1.0
    assert all(0.0 <= history[0][k] <= 1.0 for k in ("relation_reasoning", "relation_final"))


def test_final_word_right_splits_the_answer_before_its_last_word():
    # rows: [prompt, prompt, w1, w2, last, end]; labels IGNORE on the prompt
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, 7, 1]] * 3)
    predicted = torch.tensor([[0, 5, 6, 7, 1],    # position t predicts token t+1: all right
                              [0, 5, 9, 7, 1],    # a word before the last one wrong
                              [0, 5, 6, 8, 1]])   # the last word wrong
    logits = torch.nn.functional.one_hot(predicted, 10).float()
    logits = torch.cat([logits, torch.zeros(3, 1, 10)], 1)  # [B, L, V]: the last position predicts nothing
    assert probes.final_word_right(logits, labels) == [(True, True), (False, True), (True, False)]
    assert probes.teacher_forced_right(logits, labels) == [True, False, False]
    scene = world.Scene((world.Obj(0, 0, "circle", "red"),))
    qas = [(scene, world.QA("relation", "q", "a")), (scene, world.QA("color", "q", "a")),
           (scene, world.QA("relation", "q", "a"))]
    assert probes.relation_parts(qas, [(True, False), (False, False), (False, True)]) == {
        "relation_reasoning": 0.5, "relation_final": 0.5}
    assert probes.relation_parts(qas[1:2], [(True, True)]) == {}
    with pytest.raises(ValueError, match="row 0 has 1 supervised tokens"):
        probes.final_word_right(logits[:1], torch.tensor([[IGNORE] * 5 + [1]]))


def test_slot_lookup_trains_from_scratch_and_scores_the_kinds_it_trains():
    history = probes.slot_lookup(probes.parse_phases("color:2,all:1"), per_kind=2, batch=4, every=2, log=lambda s: None)
    assert [h["steps"] for h in history] == [2, 3]
    assert set(history[-1]) >= set(world.QA_KINDS) | {"overall", "loss"}
    assert all(0.0 <= history[-1][k] <= 1.0 for k in world.QA_KINDS)


def test_image_lookup_trains_a_fresh_llm_on_the_checkpoints_vision_tower(monkeypatch):
    from illume_edge.export import llm

    built, real = [], llm.build_llm
    monkeypatch.setattr(llm, "build_llm", lambda cfg, **kw: built.append((cfg.llm.num_layers, kw)) or real(cfg, **kw))
    history = probes.image_lookup(NANO, probes.parse_phases("color:1,color+shape:1"), per_kind=2, batch=2,
                                  log=lambda s: None)
    styled = probes.image_lookup(NANO, probes.parse_phases("relation:1"), per_kind=2, batch=2, log=lambda s: None,
                                 answer_style="positions-first")
    assert [(h["steps"], h["kinds"]) for h in styled] == [(1, "relation")] and 0 <= styled[0]["relation"] <= 1
    assert all(0.0 <= styled[0][k] <= 1.0 for k in ("relation_reasoning", "relation_final"))
    assert built[-1] == (4, {"seed": 0})  # after the checkpoint's loader, a fresh LLM replaces its weights
    deep = probes.image_lookup(NANO, probes.parse_phases("color:1"), per_kind=2, batch=2, log=lambda s: None,
                               layers=2)
    assert deep[0]["kinds"] == "color" and built[-1] == (2, {"seed": 0})
    assert [(h["steps"], h["kinds"]) for h in history] == [(1, "color"), (2, "color+shape")]
    assert set(history[-1]) >= {"color", "shape", "overall"} and "count" not in history[-1]
    assert all(0.0 <= history[-1][k] <= 1.0 for k in ("color", "shape"))


def test_image_lookup_with_a_placed_vit_swaps_the_tower_and_scores_per_object_count(monkeypatch):
    """`placed_vit` replaces the checkpoint's ViT by one pretrained with its own-position targets (the recipe's
    pretrain_vit with position_weight 1, its seed), frozen, before the fresh LLM trains; every phase's scores
    also come per number of objects in the scene."""
    from illume_edge.nano import vision_train

    calls = []
    real = vision_train.pretrain_vit
    monkeypatch.setattr(vision_train, "pretrain_vit", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    logged = []
    history = probes.image_lookup(NANO, probes.parse_phases("position:1"), per_kind=4, batch=2, log=logged.append,
                                  placed_vit=2)
    assert [(c["steps"], c["position_weight"], c["seed"]) for c in calls] == [(2, 1.0, recipe._seed("vit"))]
    assert json.loads(logged[0]) == {"placed_vit_steps": 2, "seconds": json.loads(logged[0])["seconds"]}
    by = history[-1]["by_objects"]
    assert by and all(k.startswith("position_") and 0.0 <= v <= 1.0 for k, v in by.items())


def test_accuracy_by_objects_groups_by_kind_and_object_count():
    red, blue = world.Obj(0, 0, "circle", "red"), world.Obj(2, 2, "square", "blue")
    one, two = world.Scene((red,)), world.Scene((red, blue))
    q = world.QA("position", "where is the red circle?", "top left")
    qas = [(one, q), (two, q), (two, q), (one, world.QA("color", "what color is the circle?", "red"))]
    assert probes.accuracy_by_objects(qas, [True, True, False, False]) == {"color_1": 0.0, "position_1": 1.0,
                                                                           "position_2": 0.5}
    assert probes.accuracy_by_objects(qas, [True, True, False, False], kinds=("exist",)) == {}


class _PlacedTower:
    """A vision tower whose features are each token's one-hot index (`placed`) or the same vector everywhere."""

    def __init__(self, cfg, placed: bool):
        self.cfg, self.placed = cfg, placed
        rows, cols = cfg.level_grid(0, *cfg.anchors[0])
        self.tokens = rows * cols

    def features(self, images):
        one = torch.eye(self.tokens) if self.placed else torch.ones(self.tokens, self.tokens)
        return one.expand(len(images), -1, -1)


def test_vit_position_probe_reads_place_only_where_the_features_carry_it(shipped):
    """A tower that encodes each token's index gives the cell's row and column exactly; one whose features are
    the same everywhere gives the majority share; the shipped ViT (content targets only) stays near chance."""
    cfg = shipped[0].cfg
    placed = probes.vit_position(_PlacedTower(cfg, True), scenes=200)
    blind = probes.vit_position(_PlacedTower(cfg, False), scenes=200)
    for part in ("object_tokens", "empty_tokens"):
        for axis in ("row", "column"):
            assert placed[part][axis]["accuracy"] == 1.0
            assert blind[part][axis]["accuracy"] <= blind[part][axis]["majority"] + 1e-9
    real = probes.vit_position(shipped[0].tower, scenes=100)["object_tokens"]
    assert all(real[a]["accuracy"] < real[a]["majority"] + 0.15 for a in ("row", "column"))


class _Oracle:
    """A stand-in for LLMTrainer whose LLM predicts the batch's next label everywhere, except that where the
    next label is a token of `swap` it predicts `swap`'s value instead (a judge with one blind spot)."""

    def __init__(self, trainer, swap: dict[int, int] | None = None):
        self.inner, self.swap, self.labels = trainer, swap or {}, None
        self.llm = self

    def batch(self, examples):
        b = self.inner.batch(examples)
        self.labels = b["labels"]
        return b

    def eval(self):
        return self

    def __call__(self, inputs_embeds, attention_mask):
        nxt = torch.cat([self.labels[:, 1:], torch.full_like(self.labels[:, :1], IGNORE)], 1)  # [B, L]
        for a, b in self.swap.items():
            nxt = torch.where(nxt == a, torch.full_like(nxt, b), nxt)
        logits = torch.zeros(*nxt.shape, self.inner.llm.config.vocab_size)
        logits.scatter_(-1, nxt.clamp(min=0).unsqueeze(-1), 10.0)  # IGNORE rows predict token 0: never scored
        return type("Out", (), {"logits": logits})()


def test_judge_scores_the_verdicts_and_evidence_of_rendered_heldout_pairs(shipped):
    """probes.judge: a perfect teacher-forced judge scores 1.0 everywhere, with its object margin positive on
    right images; one that writes "yes" wherever the truth is "no" keeps every right image and its evidence
    and loses every wrong one, aspect by aspect (so the scored positions are the verdicts'); the shipped model,
    in the format it was trained in (evidence first), keeps right images and rejects most wrong ones (measured
    on these 8 pairs: verdicts 1.0 / 0.75, evidence 0.875; the previous checkpoint said "yes" to every image)."""
    trainer, builder = shipped
    yes, no = (builder.tok.encode(w)[0] for w in ("yes", "no"))
    perfect = probes.judge(_Oracle(trainer), builder, pairs=24, evidence=True)
    assert perfect["verdicts_right"] == perfect["verdicts_wrong"] == perfect["evidence_right"] == 1.0
    assert set(perfect["wrong_by_aspect"].values()) == {1.0}
    assert perfect["object_margin_right"][0] == 10.0
    blind = probes.judge(_Oracle(trainer, {no: yes}), builder, pairs=24, evidence=True)
    assert blind["verdicts_right"] == blind["evidence_right"] == 1.0
    assert blind["verdicts_wrong"] == 0.0 and set(blind["wrong_by_aspect"].values()) == {0.0}
    placed = probes.judge(_Oracle(trainer), builder, pairs=48, evidence=True, evidence_axis=True)
    assert placed["evidence_right"] == 1.0 and placed["wrong_by_aspect"].get("spatial") == 1.0  # the axis form scored
    real = probes.judge(trainer, builder, pairs=8, evidence=True)
    assert real["verdicts_right"] == 1.0 and real["verdicts_wrong"] >= 0.5 and real["evidence_right"] >= 0.75
    assert real["object_margin_right"][0] > 0


def test_continue_on_rendered_assessments_is_scored_by_the_judge(shipped):
    """--continue rendered --judge: the steps train on rendered assessments (with the evidence field when asked)
    and every chunk is scored by probes.judge; an unknown mixture is refused."""
    import copy

    trainer, builder = copy.deepcopy(shipped[0]), shipped[1]
    drawn, train = [], trainer.train

    def recording_train(sampler, **kwargs):
        ex = sampler(np.random.default_rng(0))
        drawn.append((ex.task, builder.tok.decode([t for t in ex.labels if t != IGNORE][:3])))
        return train(sampler, **kwargs)

    trainer.train = recording_train
    history = probes.continue_training(trainer, builder, "rendered", steps=1, chunks=1, lr=1e-3, log=lambda s: None,
                                       score=lambda: probes.judge(trainer, builder, pairs=4, evidence=True),
                                       assess_evidence=True)
    assert [h["steps"] for h in history] == [0, 1] and all("evidence_right" in h for h in history)
    assert drawn[0][0] == "assess_rendered" and '"shows"' in drawn[0][1].replace(" ", ""), drawn
    with pytest.raises(ValueError, match="--continue: expected one of"):
        probes.continue_training(trainer, builder, "bogus", 1, 1, 1e-3, score=dict)


def test_extra_phase_specs_parse_and_refuse_bad_ones():
    assert probes.parse_extra_phase("edit=0.3,geneval=0.3:300") == ({"edit": 0.3, "geneval": 0.3}, 300)
    assert probes.parse_extra_phase("edit=1:5") == ({"edit": 1.0}, 5)
    for bad in ("edit=0.3", "edit=0.3:0", "caption=0.3:10", "edit=0.7,geneval=0.5:10", "edit=0:10", "edit:10",
                "edit=x:10"):
        with pytest.raises(ValueError, match="TASK=SHARE"):
            probes.parse_extra_phase(bad)


def test_extra_phase_saves_a_work_folder_that_stage4_takes(tmp_path):
    """The phase trains the checkpoint's LLM (its weights change, its vision tower does not) and writes the
    stage-3 checkpoint and engine that `recipe.run_stage4` reads."""
    from illume_edge.export.checkpoint import load_checkpoint

    probes.extra_phase(NANO, tmp_path, {"edit": 0.5}, steps=1, schedule="judge-edit-light")
    before, after = load_checkpoint(NANO), load_checkpoint(tmp_path / "stage3_checkpoint")
    assert (tmp_path / "stage3_engine" / "manifest.json").is_file()
    changed = [k for k, v in after.llm.state_dict().items() if not torch.equal(v, before.llm.state_dict()[k].float())]
    assert changed
    vit_before, vit_after = before.encoders["semantic"].state_dict(), after.encoders["semantic"].state_dict()
    assert all(torch.equal(vit_after[k], v.float()) for k, v in vit_before.items())


def test_checkpoint_scoring_splits_reasoned_relation_answers(capsys):
    """`probes --checkpoint CKPT --answer-style axis-first`: teacher-forced accuracy per kind, plus the relation
    answers' two parts (the places; the yes / no after the true places), each a share; a short style prints no
    parts; every scoring also per number of objects in the scene."""
    assert probes.main(["--checkpoint", str(NANO), "--answer-style", "axis-first", "--per-kind", "2"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(row) >= set(world.QA_KINDS) | {"overall", "relation_reasoning", "relation_final"}
    assert all(0.0 <= row[k] <= 1.0 for k in ("relation", "relation_reasoning", "relation_final"))
    assert probes.main(["--checkpoint", str(NANO), "--per-kind", "2"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "relation_final" not in row and row["by_objects"]
    assert all(k.split("_")[0] in ("color", "exist", "position", "relation") for k in row["by_objects"])
