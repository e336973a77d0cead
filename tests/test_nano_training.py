"""ILLUME-nano's training code: the pieces that must agree with the runtime and the exporters."""
from __future__ import annotations

import copy
import io
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from illume_edge.config import preset
from illume_edge.export.modules import build_modules
from illume_edge.export.tokenizer_factory import build_tokenizer
from illume_edge.export.vit import ViTFeatures
from illume_edge.nano import text_pretrain, world
from illume_edge.nano.decoder_train import images_to_tensor, normalize_latents
from illume_edge.nano.llm_train import LLMTrainer
from illume_edge.nano.progress import Progress
from illume_edge.nano.sequences import CODE_MARKER, IGNORE, SequenceBuilder
from illume_edge.nano.text import base_words
from illume_edge.nano.vision_train import (SemanticTokenizer, VisionTower, num_token_classes, pretrain_vit,
                                           token_classes, vit_batch, vit_forward)
from illume_edge.runtime.image_prep import preprocess_image, vit_inputs
from illume_edge.runtime.prompts import IMAGE_MARKER, TextTokenizer, edit_prompts, generate_prompts, understand_prompt

W = world.WorldConfig()


@pytest.fixture(scope="module")
def nano():
    cfg = preset("illume-nano")
    torch.manual_seed(0)
    mods = build_modules(cfg)
    tok = TextTokenizer(build_tokenizer(cfg, base_words(cfg, n_corpus=400)), cfg)
    return cfg, mods, tok


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, W) for _ in range(n)]
    return scenes, [world.render(s, W) for s in scenes]


def test_batched_vit_equals_the_exported_forward(nano):
    """The trainer's batched ViT is the export wrapper's computation (tolerance 1e-5 x scale)."""
    cfg, mods, _ = nano
    enc = cfg.branches[0].encoder
    _, images = _images(3)
    got = vit_forward(mods.encoders["semantic"], enc, *vit_batch(images, cfg))
    single = ViTFeatures(mods.encoders["semantic"], enc)
    for i, im in enumerate(images):
        ins = vit_inputs(preprocess_image(im, cfg), enc)
        want = single(torch.from_numpy(ins.pixel_values), torch.from_numpy(ins.rotary_cos),
                      torch.from_numpy(ins.rotary_sin))
        assert got[i].shape == want.shape == (36, enc.out_dim)
        torch.testing.assert_close(got[i], want, atol=1e-5 * float(want.abs().max()), rtol=0)


class _Record:
    """A Progress stand-in that keeps every update's metrics."""

    def __init__(self):
        self.metrics = []

    def update(self, step, **metrics):
        self.metrics.append(metrics)


def _pretrained_vit(cfg, position_weight, steps=3):
    torch.manual_seed(0)
    vit = build_modules(cfg).encoders["semantic"].train().requires_grad_(True)
    rec = _Record()
    pretrain_vit(cfg, vit, W, steps=steps, batch=2, lr=2e-3, seed=1, progress=rec, position_weight=position_weight)
    return vit, rec, torch.randn(())  # the generator's next draw: what later stages would see


def test_vit_position_targets_train_the_vit_and_leave_the_default_run_alone():
    """position_weight 0 (the shipped recipe) draws nothing more from torch's generator than the class probe's
    initialisation and logs no position metric, so `make nano` reproduces the shipped run; > 0 logs the position
    accuracy and changes the ViT."""
    cfg = preset("illume-nano")
    plain, rec0, draw0 = _pretrained_vit(cfg, 0.0)
    again, _, draw0b = _pretrained_vit(cfg, 0.0)
    placed, rec1, draw1 = _pretrained_vit(cfg, 1.0)
    assert all("position_acc" not in m for m in rec0.metrics)
    assert all(0.0 <= m["position_acc"] <= 1.0 for m in rec1.metrics) and len(rec1.metrics) == 3
    # weight 0 draws only the class probe's initialisation, as the recipe did before the position head existed
    torch.manual_seed(0)
    build_modules(cfg)
    torch.nn.Linear(cfg.branches[0].encoder.out_dim, num_token_classes(cfg.level_grid(0, *cfg.anchors[0]), W))
    assert torch.equal(draw0, torch.randn(())) and torch.equal(draw0, draw0b) and not torch.equal(draw0, draw1)
    for (name, a), b, c in zip(plain.state_dict().items(), again.state_dict().values(), placed.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(plain.state_dict().values(), placed.state_dict().values()))


def test_token_classes_mark_each_quarter_of_each_object():
    scene = world.Scene((world.Obj(0, 0, "circle", "red"), world.Obj(2, 1, "triangle", "blue")))
    cls = token_classes(scene, (6, 6), W).reshape(6, 6)
    assert (cls[0:2, 0:2].reshape(-1) == 1 + np.arange(4)).all()  # red circle = kind 0, quarters 0..3
    kind = world.SHAPES.index("triangle") * len(world.COLORS) + list(world.COLORS).index("blue")
    assert (cls[4:6, 2:4].reshape(-1) == 1 + kind * 4 + np.arange(4)).all()
    assert (cls == 0).sum() == 36 - 8
    assert cls.max() < num_token_classes((6, 6), W)


def test_sequences_are_the_runtime_prompts(nano):
    """Training sequences start with exactly the ids the runtime prefills, then the image grammar."""
    cfg, _, tok = nano
    b = SequenceBuilder(tok, cfg)
    _, (im,) = _images(1)
    t = cfg.tokens
    ex = b.generate("a red circle", im)
    cond, _ = generate_prompts(tok, cfg, "a red circle", 48, 48)
    n = len(cond.ids())
    assert ex.ids[:n] == cond.ids()
    assert ex.ids[n:n + 2] == [t.start_of_image, t.level_start(0)]
    assert ex.ids.count(CODE_MARKER) == 36 and ex.ids.count(t.end_of_line) == 6
    assert ex.ids[-3:] == [t.level_end(0), t.end_of_image, t.im_end]
    assert ex.labels[:n] == [IGNORE] * n and ex.labels[n:] == ex.ids[n:]
    ex = b.edit(im, None, im)  # unconditional edit = reconstruction prompt
    _, uncond = edit_prompts(tok, cfg, "x", 48, 48)
    assert ex.ids.count(IMAGE_MARKER) == 36 and len(ex.inputs) == 1 and len(ex.targets) == 1
    assert ex.ids[:len(uncond.ids())][:5] == uncond.ids()[:5]
    ex = b.assess(im, "a red circle", '{"score": "1.00"}', correction=im)
    assert ex.ids.count(CODE_MARKER) == 36 and ex.ids.count(IMAGE_MARKER) == 36


def test_dialogue_continues_the_runtime_prompt_and_supervises_every_answer(nano):
    cfg, _, tok = nano
    b = SequenceBuilder(tok, cfg)
    _, (im,) = _images(1)
    turns = [("what color is the circle?", "red"), ("is there a blue square?", "no"), ("describe the image.", "a red circle")]
    ex = b.dialogue(im, turns)
    first = b.understand(im, *turns[0])
    assert ex.ids[:len(first.ids)] == first.ids and ex.labels[:len(first.labels)] == first.labels
    assert ex.ids.count(IMAGE_MARKER) == 36 and len(ex.inputs) == 1
    supervised = [i for i, x in zip(ex.ids, ex.labels) if x != IGNORE]
    want = []
    for _, answer in turns:
        want += tok.encode(answer) + [cfg.tokens.im_end]
    assert supervised == want
    assert tok.decode(ex.ids[len(first.ids):]).count("user") == 2  # each follow-up is a user turn
    with pytest.raises(ValueError, match="at least one"):
        b.dialogue(im, [])


def test_grouped_micro_batches_give_the_full_batch_gradient(nano):
    """loss(batch) is the token mean (= the token-weighted mean of per-example losses), and the length-grouped
    micro-batches give the full batch's loss and gradient (tolerance 1e-5 relative)."""
    cfg, mods, tok = nano
    b = SequenceBuilder(tok, cfg)
    sem = SemanticTokenizer(mods.quantizers[0], cfg.branches[0].in_dim, num_token_classes((6, 6), W))
    trainer = LLMTrainer(cfg, mods.llm, mods.projectors["semantic"], VisionTower(cfg, mods.encoders["semantic"], sem))
    _, images = _images(4, seed=5)
    exs = [b.understand(images[0], "is there a red circle?", "yes"), b.generate("a red circle", images[1]),
           b.edit(images[2], "remove the red circle", images[3]), b.understand(images[3], "describe the image.", "nothing")]
    mods.llm.eval()
    with torch.no_grad():
        singles = [trainer.loss([e]) for e in exs]
        weighted = sum(loss * n for loss, n in singles) / sum(n for _, n in singles)
        full_loss, counted = trainer.loss(exs)
        assert counted == sum(n for _, n in singles) == sum(sum(x != IGNORE for x in e.labels[1:]) for e in exs)
        torch.testing.assert_close(full_loss, weighted, rtol=1e-5, atol=1e-6)
    params = [p for p in mods.llm.parameters()]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    trainer.loss(exs)[0].backward()
    full = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    grouped = trainer.grouped_loss(exs, groups=3)
    torch.testing.assert_close(grouped, full_loss, rtol=1e-5, atol=1e-6)
    for p, g in zip(params, full):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    mods.llm.requires_grad_(False)


def test_trainer_batch_fills_features_and_codes_in_order(nano):
    cfg, mods, tok = nano
    b = SequenceBuilder(tok, cfg)
    quant = mods.quantizers[0]
    sem = SemanticTokenizer(quant, cfg.branches[0].in_dim, num_token_classes((6, 6), W))
    tower = VisionTower(cfg, mods.encoders["semantic"], sem)
    trainer = LLMTrainer(cfg, mods.llm, mods.projectors["semantic"], tower)
    _, images = _images(3, seed=4)
    exs = [b.edit(images[0], "make it blue", images[1]), b.understand(images[2], "describe the image.", "nothing")]
    batch = trainer.batch(exs)
    codes = tower.codes([images[1]])[0] + cfg.levels[0].first_token_id
    lab = batch["labels"][0]
    got = lab[(lab >= cfg.levels[0].first_token_id)]
    assert torch.equal(got, codes)
    feats = mods.projectors["semantic"](tower.features([images[2]]))[0]  # [36, hidden]
    pos = torch.tensor(exs[1].ids) == IMAGE_MARKER
    torch.testing.assert_close(batch["inputs_embeds"][1, :len(exs[1].ids)][pos], feats)
    assert batch["attention_mask"][1].sum() == len(exs[1].ids)
    assert torch.isfinite(trainer.loss(exs)[0])
    exs[0].targets.append(images[0])  # one target image too many: the batch must refuse
    with pytest.raises(ValueError, match="code markers"):
        trainer.batch(exs)


def test_latent_normalisation_keeps_the_autoencoder(nano):
    _, mods, _ = nano
    vae = mods.vae
    _, images = _images(4, seed=2)
    x = images_to_tensor(images)
    with torch.no_grad():
        before = vae.decode(vae.encode(x).latent_dist.mean).sample
        s = normalize_latents(vae, W, seed=0, n=8)
        after = vae.decode(vae.encode(x).latent_dist.mean).sample
        lat = vae.encode(images_to_tensor(_images(8, seed=1)[1])).latent_dist.mean  # the same 8 images it measured
    assert s > 0
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert abs(float(lat.std()) - 1.0) < 0.3


def test_grounding_dialogues_end_with_a_conjunctive_yes_no_question(nano):
    """The curriculum's dialogues (recipe.Tasks.qa_grounding): one-attribute questions about one image, then a
    conjunctive exist / relation question where the scene poses one; every answer supervised, each a yes / no or a position."""
    from illume_edge.nano import recipe

    cfg, _, tok = nano
    tasks = recipe.Tasks(SequenceBuilder(tok, cfg), W)
    positions = {world.position_name(r, c) for r in range(3) for c in range(3)}
    rng = np.random.default_rng(0)
    lasts = []
    for _ in range(40):
        ex = tasks.qa_grounding(rng)
        assert ex.task == "qa_grounding" and len(ex.inputs) == 1
        supervised = [i for i, x in zip(ex.ids, ex.labels) if x != IGNORE]
        answers, cur = [], []
        for t in supervised:
            if t == cfg.tokens.im_end:
                answers.append(tok.decode(cur).strip())
                cur = []
            else:
                cur.append(t)
        assert 1 <= len(answers) <= 5 and not cur
        assert all(a in ("yes", "no") or a in positions for a in answers), answers
        lasts.append(answers[-1])
    # the conjunctive question is skipped where the scene cannot pose it (a relation needs two objects)
    assert {"yes", "no"} <= set(lasts) and sum(a in ("yes", "no") for a in lasts) >= 0.75 * len(lasts)


def test_lookup_phase_asks_single_questions_of_its_kinds(nano, tmp_path):
    """The optional lookup phase after stage 1 (Schedule.lookup): one question per image, of the schedule's
    kinds only, laid out as the runtime's single-turn prompt; a kind outside the world's is refused."""
    from illume_edge.nano import recipe

    cfg, _, tok = nano
    builder = SequenceBuilder(tok, cfg)
    sample = recipe.stage_mixtures(recipe.Tasks(builder, W), ("color",))["lookup"]
    colors = set(world.COLORS)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ex = sample(rng)
        assert ex.task == "qa_lookup" and len(ex.inputs) == 1 and not ex.targets
        answer = [t for t, x in zip(ex.ids, ex.labels) if x != IGNORE]
        assert answer[-1] == cfg.tokens.im_end and answer.count(cfg.tokens.im_end) == 1  # a single turn
        assert tok.decode(answer[:-1]).strip() in colors
    assert recipe.SCHEDULES["full"].lookup == 0 and recipe.SCHEDULES["lookup-first"].lookup > 0
    with pytest.raises(ValueError, match="lookup_kinds"):
        recipe.run(tmp_path / "out", tmp_path / "work", recipe.Schedule(lookup=1, lookup_kinds=("colour",)))
    assert not (tmp_path / "work").exists()  # refused before any stage ran


def test_later_lookup_phases_each_ask_their_own_kinds_under_their_own_stage_and_seed(nano, tmp_path):
    """Schedule.lookup_then: after the first lookup phase, one phase per (kinds, steps), named for its kinds in
    the log and the timings, each with its own seed; an unknown or empty kind list is refused by position."""
    from illume_edge.nano import recipe

    cfg, _, tok = nano
    tasks = recipe.Tasks(SequenceBuilder(tok, cfg), W)
    phases = recipe.lookup_then_phases(tasks, ((("exist",), 3), (("position", "count"), 5)))
    assert [(name, steps, offset) for name, _, steps, offset in phases] == [
        ("lookup_exist", 3, recipe.LOOKUP_THEN_SEED), ("lookup_position+count", 5, recipe.LOOKUP_THEN_SEED + 1)]
    used = {offset for *_, offset in recipe.LLM_STAGES} | set(recipe.SEED_OFFSETS.values())
    assert not used & {offset for *_, offset in phases}  # no other stage's seed
    positions = {world.position_name(r, c) for r in range(3) for c in range(3)}
    rng = np.random.default_rng(0)
    for (_, sample, _, _), answers in zip(phases, ({"yes", "no"}, positions | {str(n) for n in range(4)}
                                                    | set(world.NUMBER_WORDS))):
        seen = set()
        for _ in range(30):
            ex = sample(rng)
            assert ex.task == "qa_lookup" and len(ex.inputs) == 1
            seen.add(tok.decode([t for t, x in zip(ex.ids, ex.labels) if x != IGNORE][:-1]).strip())
        assert seen <= answers and len(seen) > 1
    assert recipe.SCHEDULES["judge-lookups"].lookup_then
    for bad in (((("colour",), 1),), (((), 1),)):
        with pytest.raises(ValueError, match=r"lookup_then\[0\]"):
            recipe.run(tmp_path / "out", tmp_path / "work", recipe.Schedule(lookup_then=bad))
    assert not (tmp_path / "work").exists()


def test_describe_first_schedule_answers_after_the_description(nano):
    """Schedule.answer_style "describe-first" (the "reasoned" schedule): every QA answer of the dialogues is the
    scene's description, ". ", then the answer, and the checkpoint's prompts say so (answer_separator); an
    unknown style is refused before anything trains."""

    from illume_edge.nano import recipe

    cfg, _, tok = nano
    separator, restyle = recipe.ANSWER_STYLES["describe-first"]
    assert separator == ". " and recipe.ANSWER_STYLES["short"] == ("", None)
    reasoned = recipe.SCHEDULES["reasoned"]
    assert (reasoned.answer_style, reasoned.stage0_layout) == ("describe-first", "question-first")
    assert reasoned.stage0 > 0 and reasoned.stage0_layout in text_pretrain.LAYOUTS
    tasks = recipe.Tasks(SequenceBuilder(tok, cfg), W, answer_style=restyle)
    rng = np.random.default_rng(1)
    replies = []
    for _ in range(20):
        ex = tasks.qa(rng)
        cur = []
        for t, label in zip(ex.ids, ex.labels):
            if label == IGNORE:
                continue
            if t == cfg.tokens.im_end:
                replies.append(tok.decode(cur).strip())
                cur = []
            else:
                cur.append(t)
    described = [r for r in replies if ". " in r]
    assert len(described) >= 0.7 * len(replies)  # every kind but describe
    assert all(r.count(". ") == 1 and r.split(". ")[1] for r in described)
    with pytest.raises(ValueError, match="answer_style"):
        recipe.run(Path("unused"), Path("unused"), recipe.Schedule(answer_style="chatty"))


def test_answer_after_supervises_only_the_answer_after_the_given_reasoning(nano):
    """SequenceBuilder.answer_after: the runtime's understanding prompt without an image, the reply tokenized whole
    (as the model writes it), and only the answer and <|im_end|> supervised; a `given` that is not a token prefix
    of the reply is refused."""
    cfg, _, tok = nano
    b = SequenceBuilder(tok, cfg)
    ex = b.answer_after("is the red circle above the blue square?", "top, bottom.", "yes")
    prompt = understand_prompt(tok, cfg, "is the red circle above the blue square?", n_images=0).ids()
    assert ex.ids == prompt + tok.encode("top, bottom. yes") + [cfg.tokens.im_end]
    assert IMAGE_MARKER not in ex.ids and not ex.inputs and not ex.targets
    assert [i for i, x in zip(ex.ids, ex.labels) if x != IGNORE] == tok.encode("top, bottom. yes")[-1:] + [
        cfg.tokens.im_end]
    with pytest.raises(ValueError, match="expected an answer after 'top, bottom.'"):
        b.answer_after("q?", "top, bottom.", " ")


PLACE = r"(top|middle|bottom|left|center|right)"


@pytest.mark.parametrize("style", ["axis-first", "named-axis"])
def test_placed_relation_styles_answer_after_both_places_and_learn_the_comparison_in_text(nano, style):
    """Schedule "judge-axis" and the named-axis style: relation answers in the dialogues are "<place>, <place>.
    <yes/no>" ("<name> <place>, <name> <place>. <yes/no>"; the checkpoint's separator ". "), other kinds short;
    Tasks.compare is a relation question in text whose supervised yes / no is the world's answer for the two
    places it is handed; compare without such a style is refused before anything trains."""
    from illume_edge.nano import recipe

    cfg, _, tok = nano
    s = recipe.SCHEDULES["judge-axis"]
    assert (s.answer_style, s.compare > 0, s.evidence_axis) == ("axis-first", True, True)
    assert recipe.ANSWER_STYLES["axis-first"] == (". ", world.axis_first)
    assert recipe.ANSWER_STYLES["named-axis"] == (". ", world.named_axis)
    tasks = recipe.Tasks.for_schedule(SequenceBuilder(tok, cfg), W, replace(s, answer_style=style))
    rng = np.random.default_rng(3)
    order = {"above": world.ROW_NAMES, "below": world.ROW_NAMES[::-1], "to the left of": world.COL_NAMES,
             "to the right of": world.COL_NAMES[::-1]}
    for _ in range(40):
        ex = tasks.compare(rng)
        assert ex.task == "compare" and not ex.inputs
        text = tok.decode(ex.ids)
        question = text.split("user\n")[1].split("\n")[0].strip()
        places = text.rsplit("assistant\n", 1)[1]
        supervised = tok.decode([i for i, x in zip(ex.ids, ex.labels) if x != IGNORE][:-1]).strip()
        relation = next(p for p in order if f" {p} " in question)
        first, second = places.split(". ")[0].split(", ")  # "top" or "the red circle top"
        if style == "named-axis":  # each place after its object's name as the question words it
            assert question.startswith(f"is {first.rsplit(' ', 1)[0].strip()} ")
            assert question.endswith(f" {second.rsplit(' ', 1)[0]}?")
        a, b = first.split()[-1], second.split()[-1]
        assert supervised == ("yes" if order[relation].index(a) < order[relation].index(b) else "no")
    name = "" if style == "axis-first" else r"the( \w+)? \w+ "
    for ex in [tasks.qa_single(rng, ("relation",)) for _ in range(10)]:
        reply = tok.decode([i for i, x in zip(ex.ids, ex.labels) if x != IGNORE][:-1]).strip()
        assert re.fullmatch(rf"{name}{PLACE}, {name}{PLACE}\. (yes|no)", reply), reply
    with pytest.raises(ValueError, match="set answer_style to one of"):
        recipe.run(Path("unused"), Path("unused"), recipe.Schedule(compare=10))
    with pytest.raises(ValueError, match="needs the axis-first or named-axis answer style"):
        recipe.Tasks(SequenceBuilder(tok, cfg), W).compare(rng)


def test_stage0_pairs_supervise_only_the_answer(nano):
    cfg, _, tok = nano
    scene = world.sample_scene(np.random.default_rng(3), W)
    qa = world.make_qa(scene, np.random.default_rng(4), "count")
    ids, labels = text_pretrain.lookup_pair(tok, cfg.tokens.im_end, scene, qa)
    n_prompt = sum(label == IGNORE for label in labels)
    assert len(ids) == len(labels) and labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[:n_prompt]) == f"{world.describe(scene)}. {qa.question}"
    assert ids[-1] == cfg.tokens.im_end and tok.decode(ids[n_prompt:-1]).strip() == qa.answer
    batch_ids, batch_labels, mask = text_pretrain.pad_batch([(ids, labels), (ids[:3], labels[:3])], pad=0)
    assert batch_ids.shape == (2, len(ids)) and mask[1].tolist() == [1] * 3 + [0] * (len(ids) - 3)
    assert (batch_labels[1, 3:] == IGNORE).all()


def test_stage0_runs_its_phases_in_order_with_one_schedule(nano, monkeypatch):
    cfg, mods, tok = nano
    llm = copy.deepcopy(mods.llm)
    before = [p.detach().clone() for p in llm.parameters()]
    asked, schedules, seen = [], [], []
    make_qa, optimizer = world.make_qa, LLMTrainer.optimizer
    monkeypatch.setattr(world, "make_qa", lambda s, rng, kind: (asked.append(kind), make_qa(s, rng, kind))[1])
    monkeypatch.setattr(LLMTrainer, "optimizer", staticmethod(
        lambda params, *, lr, steps, **k: (schedules.append(steps), optimizer(params, lr=lr, steps=steps, **k))[1]))
    quiet = Progress("stage0", 3, stream=io.StringIO())
    loss = text_pretrain.pretrain_text(llm, tok, cfg.tokens.im_end, W, [(("color",), 2), (("count",), 1)],
                                       batch=2, lr=1e-3, seed=0, progress=quiet, every=2,
                                       evaluate=lambda step, loss: seen.append((step, llm.training)))
    # 2 steps x batch 2 of color questions, then 1 x 2 of count (a scene that cannot pose one is redrawn)
    n = asked.index("count")
    assert asked == ["color"] * n + ["count"] * (len(asked) - n) and n >= 4 and len(asked) - n >= 2
    assert schedules == [3]  # one optimizer and schedule over both phases
    assert np.isfinite(loss) and seen == [(2, False), (3, False)] and llm.training
    assert all(not torch.equal(a, b) for a, b in zip(before, llm.parameters()))  # every parameter trains
    for bad, match in (([(("colour",), 1)], "QA kinds"), ([((), 1)], "QA kinds"), ([(("color",), -1)], "steps")):
        with pytest.raises(ValueError, match=match):
            text_pretrain.pretrain_text(llm, tok, cfg.tokens.im_end, W, bad, batch=2, lr=1e-3, seed=0,
                                        progress=quiet)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """(out, work, summary) of `recipe.run` on the smoke schedule (every stage, stage 0 included, ~30 s)."""
    from illume_edge.nano import recipe

    root = tmp_path_factory.mktemp("smoke")
    out, work = root / "out", root / "work"
    return out, work, recipe.run(out, work, recipe.SCHEDULES["smoke"], threads=2)


def test_recipe_smoke_run_writes_every_stage_and_a_strict_checkpoint(smoke_run):
    """The checkpoint loads strictly, its checksums cover every file, and every stage is timed and logged."""
    from illume_edge.export.checkpoint import load_checkpoint
    from illume_edge.nano import recipe

    out, work, summary = smoke_run
    llm = [name for name, *_ in recipe.LLM_STAGES]
    llm[llm.index("lookup") + 1:llm.index("lookup") + 1] = ["lookup_exist"]  # the smoke schedule's lookup_then
    stages = ["vit", "tokenizer", "vae", "unet", "stage0"] + llm + ["self_assess", "stage4", "stage4_ablation"]
    assert list(summary["stage_seconds"]) == stages
    logged = {json.loads(line)["stage"] for line in (out / "train_log.jsonl").read_text().splitlines()}
    assert set(stages) - {"self_assess"} <= logged
    assert json.loads((out / "recipe.json").read_text())["schedule"]["stage0"] == 1
    listed = {line.split("  ", 1)[1] for line in (out / recipe.CHECKSUMS).read_text().splitlines()}
    assert listed == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {recipe.CHECKSUMS}
    load_checkpoint(out)
    load_checkpoint(work / "ablation_checkpoint")


def _weight_bytes(root: Path) -> dict[str, bytes]:
    """Every file of a checkpoint folder but its run record (recipe.json, the log, the checksums)."""
    skip = {"recipe.json", "train_log.jsonl", "SHA256SUMS", "snapshot.json"}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip}


def test_stage4_alone_on_saved_stage3_weights_writes_the_runs_weights_again(smoke_run, tmp_path):
    """`run_stage4` with the run's own schedule rewrites the run's checkpoint and ablation byte for byte; a
    stage-4 field may change (and changes the weights), a field of an earlier stage may not."""
    from illume_edge.nano import recipe

    out, work, _ = smoke_run
    smoke = recipe.SCHEDULES["smoke"]
    again = recipe.run_stage4(tmp_path / "out", tmp_path / "work", work, smoke, threads=2)
    assert list(again["stage_seconds"]) == ["self_assess", "stage4", "stage4_ablation"]
    assert again["stage3_from"] == str(work)
    assert _weight_bytes(tmp_path / "out") == _weight_bytes(out)
    assert _weight_bytes(tmp_path / "work" / "ablation_checkpoint") == _weight_bytes(work / "ablation_checkpoint")

    more_gen = replace(smoke, stage4_gen=0.5)
    recipe.run_stage4(tmp_path / "gen", tmp_path / "work-gen", work, more_gen, threads=2)
    assert _weight_bytes(tmp_path / "gen") != _weight_bytes(out)

    with pytest.raises(ValueError, match=r"before stage 4 in \['stage3'\]"):
        recipe.run_stage4(tmp_path / "bad", tmp_path / "w", work, replace(smoke, stage3=2))
    with pytest.raises(ValueError, match="pass --seed"):
        recipe.run_stage4(tmp_path / "bad", tmp_path / "w", work, smoke, seed=recipe.SEED + 1)
    with pytest.raises(FileNotFoundError, match="stage3_checkpoint is missing"):
        recipe.run_stage4(tmp_path / "bad", tmp_path / "w", tmp_path / "nowhere", smoke)


def test_experiment_run_copies_decoders_snapshots_and_stops_with_the_runs_own_weights(smoke_run, tmp_path):
    """An experiment run (decoders copied from a checkpoint, snapshots, stopped after the last LLM phase) trains
    the same vision and LLM weights as the whole run, byte for byte: only the decoders differ, and they are the
    source's."""
    from illume_edge.nano import recipe

    out, work, _ = smoke_run
    smoke = recipe.SCHEDULES["smoke"]
    source = work / "ablation_checkpoint"  # fp16 decoders, other bytes than the run's own fp32 ones
    exp = recipe.Experiment(decoders_from=source, snapshots=("lookup_exist", "judge"), stop_after="judge")
    summary = recipe.run(tmp_path / "out", tmp_path / "work", smoke, threads=2, experiment=exp)
    assert summary["stopped_after"] == "judge" and "vae" not in summary["stage_seconds"]
    assert "self_assess" not in summary["stage_seconds"] and not (tmp_path / "out").exists()
    snap = _weight_bytes(tmp_path / "work" / "after_judge")  # the smoke schedule's last LLM phase
    mine = _weight_bytes(work / "stage3_checkpoint")
    decoders = {k for k in mine if k.startswith("diffusion_decoder/") and k.endswith(".safetensors")}
    assert len(decoders) == 2 and set(snap) == set(mine)
    assert all(snap[k] == mine[k] for k in set(mine) - decoders)
    assert all(snap[k] != mine[k] for k in decoders)
    copied = recipe.load_modules(tmp_path / "work" / "after_judge")[0]
    src = recipe.load_modules(source)[0]
    pairs = zip(copied.unet.state_dict().values(), src.unet.state_dict().values())
    assert all(torch.equal(a, b.float()) for a, b in pairs)
    assert (tmp_path / "work" / "after_lookup_exist" / "mllm").is_dir()
    record = json.loads((tmp_path / "work" / recipe.EXPERIMENT_RECORD).read_text())
    assert record["experiment"]["decoders_from"] == str(source) and record["schedule"]["stage3"] == smoke.stage3

    with pytest.raises(ValueError, match=r"no LLM phase 'judge_x'.*'lookup_exist'"):
        recipe.run(tmp_path / "o", tmp_path / "w", smoke, experiment=recipe.Experiment(stop_after="judge_x"))
    assert recipe.llm_phase_names(recipe.SCHEDULES["judge-edit-light"]) == [
        "stage1", "lookup", "stage2", "stage3_curriculum", "stage3", "judge"]


def test_schedule_settings_change_only_their_fields_with_their_types():
    from illume_edge.nano import recipe

    base = recipe.SCHEDULES["judge-edit-light"]
    s = recipe.schedule_overrides(base, ["stage4_gen=0.1", "stage4=200", "assess_poor_share=none"])
    assert (s.stage4_gen, s.stage4, s.assess_poor_share) == (0.1, 200, None)
    assert replace(s, stage4_gen=base.stage4_gen, stage4=base.stage4) == base
    assert recipe.schedule_overrides(base, ["assess_poor_share=0.5"]).assess_poor_share == 0.5
    for bad, match in (("stage3=10", "FIELD one of"), ("stage4_gen", "FIELD=VALUE"), ("stage4=1.5", "not of type int")):
        with pytest.raises(ValueError, match=match):
            recipe.schedule_overrides(base, [bad])
    run = recipe.schedule_overrides(base, ["vit_position=0.5", "answer_style=axis-first", "evidence_axis=true"],
                                    recipe.RUN_FIELDS, "--set")
    assert (run.vit_position, run.answer_style, run.evidence_axis) == (0.5, "axis-first", True)
    assert "lookup_then" not in recipe.RUN_FIELDS and recipe.RUN_FIELDS["stage3"] is int
    with pytest.raises(ValueError, match="--set 'evidence_axis=maybe': 'maybe' is not of type bool"):
        recipe.schedule_overrides(base, ["evidence_axis=maybe"], recipe.RUN_FIELDS, "--set")


def test_reproducible_training_gives_the_same_bytes_twice(nano):
    """Under `recipe.reproducible`, two runs of the tokenizer stage at the recipe's batch end byte-identical.
    Without it they differ within a few steps: the backward of `table[labels]` (index_put_ with accumulation)
    adds in thread order."""
    from illume_edge.nano import recipe
    from illume_edge.nano.vision_train import train_tokenizer

    cfg, mods, _ = nano
    grid = cfg.level_grid(0, *cfg.anchors[0])

    def trained() -> list[torch.Tensor]:
        torch.manual_seed(0)
        quant = copy.deepcopy(mods.quantizers[0]).train().requires_grad_(True)
        tok = SemanticTokenizer(quant, cfg.branches[0].in_dim, num_token_classes(grid, W))
        train_tokenizer(cfg, mods.encoders["semantic"], tok, W, steps=8, batch=64, lr=3e-3, seed=1,
                        progress=Progress("tokenizer", 8, stream=io.StringIO()))
        return [p.detach().clone() for p in tok.parameters()]

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with recipe.reproducible(2):
        assert torch.get_num_threads() == 2 and torch.are_deterministic_algorithms_enabled()
        first, second = trained(), trained()
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
    differing = [i for i, (a, b) in enumerate(zip(first, second)) if not torch.equal(a, b)]
    assert not differing, f"parameters {differing} of {len(first)} differ between two runs of one seed"


def test_assessment_examples_draw_poor_samples_at_the_asked_share():
    """Stage 4's self-assessment data: uniformly from the pool by default (a quarter poor in the shipped run),
    or poor samples at `assess_poor_share` ("assess-balanced": 0.5). Poor ones carry the corrected image."""
    from illume_edge.nano import evaluator
    from illume_edge.nano.recipe import AssessedSample, assessment_examples

    rng = np.random.default_rng(0)
    pool = []
    for i in range(8):  # 2 poor, 6 good
        prompt, scene = world.sample_gen_prompt(rng, W, "single_object", "train")
        good = i >= 2
        verdict = evaluator.Assessment(object=good, count=None, color=True, spatial=None, analysis="x")
        pool.append(AssessedSample(prompt, scene, np.zeros((8, 8, 3), np.uint8), verdict))
    assert sum(not s.assessment.good for s in pool) == 2

    class Builder:  # records what each example was made of
        def assess(self, image, text, answer, correction, task):
            return correction is not None

    for share, want in ((None, 2 / 8), (0.5, 0.5), (0.9, 0.9)):
        draw = assessment_examples(pool, Builder(), W, share)
        got = np.mean([draw(rng) for _ in range(4000)])
        assert abs(got - want) < 0.03, (share, got)
    assert not any(assessment_examples(pool, Builder(), W, 0.9, corrections=False)(rng) for _ in range(200))
    with pytest.raises(ValueError, match=r"assess_poor_share 0.5: .*pool: 6 good, 0 poor"):
        assessment_examples(pool[2:], Builder(), W, 0.5)
    with pytest.raises(ValueError, match="assess_poor_share 1.5"):
        assessment_examples(pool, Builder(), W, 1.5)


def test_rendered_assessments_are_balanced_exact_and_never_heldout(monkeypatch):
    """Tasks.assess_rendered: half right, half wrong; the answer is the evaluator's verdict on the scene drawn
    (which parses back from the image it shows); wrong ones carry the prompt's own scene as the correction;
    every aspect's "no" occurs; prompts vary; no held-out scene."""
    from illume_edge.nano import evaluator
    from illume_edge.nano.recipe import Tasks

    seen = []

    class Builder:  # records what each example was made of
        def assess(self, image, text, answer, correction, task):
            seen.append((image, text, answer, correction, task))

    held = []
    monkeypatch.setattr(world, "is_heldout", lambda s, cfg=W: held.append(s) or False)
    tasks, rng = Tasks(Builder(), W), np.random.default_rng(3)
    for _ in range(400):
        tasks.assess_rendered(rng)
    verdicts = [evaluator.assessment_from_json(answer) for _, _, answer, _, _ in seen]
    assert all(v is not None for v in verdicts)
    good = np.array([v.good for v in verdicts])
    assert abs(good.mean() - 0.5) < 0.07, good.mean()
    for (image, text, answer, correction, task), v in zip(seen, verdicts):
        assert task == "assess_rendered" and (correction is None) == v.good
        assert evaluator.parse(image, W) in held  # the image's scene was checked against the split
    no = {a for v in verdicts for a, x in zip(evaluator.ASPECTS, v.verdicts()) if x is False}
    assert no == set(evaluator.ASPECTS)
    by_text = {t for _, t, _, _, _ in seen}
    assert len(by_text) > 100  # prompts vary (the partial categories have few texts)


def test_judge_phase_mixes_rendered_assessments_with_a_replay_of_stage3():
    """Schedule.judge's mixture: JUDGE_RENDERED_SHARE rendered assessments, the rest stage 3's own tasks."""
    from collections import Counter

    from illume_edge.nano import recipe

    class Builder:  # every SequenceBuilder method returns the task it was asked to build
        def __getattr__(self, name):
            return lambda *args, task=name, **kwargs: task

    sample, rng = recipe.stage_mixtures(recipe.Tasks(Builder(), W))["judge"], np.random.default_rng(6)
    tasks = Counter(sample(rng) for _ in range(400))
    assert abs(tasks["assess_rendered"] / 400 - recipe.JUDGE_RENDERED_SHARE) < 0.06, tasks
    assert {"qa", "t2i_geneval"} <= set(tasks)  # the replay


def test_curriculum_mixes_grounding_dialogues_and_stage3_with_or_without_its_edits():
    """The stage-3 curriculum: Schedule.curriculum_grounding of grounding dialogues, the rest stage 3's mixture,
    whose edits Schedule.curriculum_edits can leave out."""
    from collections import Counter

    from illume_edge.nano import recipe

    class Builder:  # every SequenceBuilder method returns the task it was asked to build
        def __getattr__(self, name):
            return lambda *args, task=name, **kwargs: task

    def tasks(**kwargs):
        sample, rng = recipe.stage_mixtures(recipe.Tasks(Builder(), W), **kwargs)["stage3_curriculum"], \
            np.random.default_rng(8)
        return Counter(sample(rng) for _ in range(600))

    default = tasks()
    assert abs(default["qa_grounding"] / 600 - recipe.Schedule.curriculum_grounding) < 0.06, default
    edits = sum(n for t, n in default.items() if t.startswith("edit_")) / 600
    assert abs(edits - 0.25 * (1 - recipe.Schedule.curriculum_grounding)) < 0.05, default
    bare = tasks(curriculum_grounding=0.0, curriculum_edits=False)
    assert "qa_grounding" not in bare and not any(t.startswith("edit_") for t in bare), bare
    assert {"qa", "t2i_geneval", "reconstruct"} <= set(bare)
    assert recipe.RUN_FIELDS["curriculum_edits"]("false") is False


def test_generation_phase_mixes_geneval_prompts_with_a_replay_of_stage3():
    """Schedule.gen_phase's mixture: GEN_PHASE_SHARE GenEval-style text-to-image, the rest stage 3's own tasks; it
    runs after stage 3's mixture and before the judge phase, with a seed of its own."""
    from collections import Counter

    from illume_edge.nano import recipe

    class Builder:  # every SequenceBuilder method returns the task it was asked to build
        def __getattr__(self, name):
            return lambda *args, task=name, **kwargs: task

    sample, rng = recipe.stage_mixtures(recipe.Tasks(Builder(), W))["gen_phase"], np.random.default_rng(7)
    tasks = Counter(sample(rng) for _ in range(600))
    geneval_in_replay = 0.2 / 1.0  # stage 3's own share of t2i_geneval (no rendered assessments here)
    want = recipe.GEN_PHASE_SHARE + (1 - recipe.GEN_PHASE_SHARE) * geneval_in_replay
    assert abs(tasks["t2i_geneval"] / 600 - want) < 0.06, tasks
    assert {"qa", "t2i_uncond"} <= set(tasks) and any(t.startswith("edit_") for t in tasks)  # the replay, with
    # the unconditional rows CFG needs
    names = [name for name, *_ in recipe.LLM_STAGES]
    assert names.index("stage3") + 1 == names.index("gen_phase") == names.index("judge") - 1
    offsets = [offset for *_, offset in recipe.LLM_STAGES]
    assert len(set(offsets)) == len(offsets)
    assert recipe.Schedule().gen_phase == 0 and recipe.SCHEDULES["judge-lookups-gen"].gen_phase > 0


def test_stage4_mixture_adds_edits_to_both_the_fine_tune_and_its_ablation():
    """Schedule.stage4_edit: stage 4 keeps STAGE4_ASSESS_SHARE of assessments and moves that share of its examples
    from the stage-3 replay to edits; the ablation trains on the same replay; 0 leaves stage 3's mixture as it is
    (the recipe's stage 4 before the option); a share that leaves no replay is refused."""
    from collections import Counter

    from illume_edge.nano import recipe

    sft = recipe.mixture([(0.75, lambda rng: "qa"), (0.25, lambda rng: "edit")])  # stage 3's editing share
    n = 4000

    def shares(sample, seed=3):
        rng = np.random.default_rng(seed)
        c = Counter(sample(rng) for _ in range(n))
        return {k: v / n for k, v in c.items()}

    for edit_share in (0.0, 0.2):
        with_assess, replay = recipe.stage4_mixtures(sft, lambda rng: "edit", lambda rng: "assess", edit_share)
        got = shares(with_assess)
        want_edit = (1 - recipe.STAGE4_ASSESS_SHARE - edit_share) * 0.25 + edit_share  # the replay's + the added
        assert abs(got["assess"] - recipe.STAGE4_ASSESS_SHARE) < 0.025, got
        assert abs(got["edit"] - want_edit) < 0.025, (edit_share, got)
        ablation = shares(replay)
        assert "assess" not in ablation and abs(ablation["edit"] - want_edit / 0.7) < 0.03, ablation
    assert recipe.stage4_mixtures(sft, None, None, 0.0)[1] is sft
    with pytest.raises(ValueError, match=r"stage4_edit 0.7: expected a share in \[0, 0.7"):
        recipe.stage4_mixtures(sft, None, None, 0.7)
    assert recipe.SCHEDULES["judge-edit"].stage4_edit == 0.2 and recipe.SCHEDULES["full"].stage4_edit == 0.0
    # "judge-edit-light" is "judge-edit" but for the share; make nano runs the shipped checkpoint's schedule
    light = recipe.SCHEDULES["judge-edit-light"]
    assert light.stage4_edit == 0.1 and replace(light, stage4_edit=0.2) == recipe.SCHEDULES["judge-edit"]
    assert recipe.SCHEDULES[recipe.DEFAULT_SCHEDULE] == light


def test_stage4_mixture_adds_geneval_prompts_beside_the_edits():
    """Schedule.stage4_gen: that share of stage 4's examples moves from the stage-3 replay to GenEval-style
    text-to-image, in the fine-tune and in its ablation alike; with the edits it must leave some replay; without
    it the mixture draws what it drew before (the shipped schedules' runs stay reproducible)."""
    from collections import Counter

    from illume_edge.nano import recipe

    sft = recipe.mixture([(0.8, lambda rng: "qa"), (0.2, lambda rng: "gen")])  # stage 3's generation share
    gen, edit, assess = (lambda rng: "gen"), (lambda rng: "edit"), (lambda rng: "assess")
    n = 4000
    with_assess, replay = recipe.stage4_mixtures(sft, edit, assess, 0.1, gen, 0.2)
    rng = np.random.default_rng(5)
    got = Counter(with_assess(rng) for _ in range(n))
    want_gen = (1 - recipe.STAGE4_ASSESS_SHARE - 0.1 - 0.2) * 0.2 + 0.2
    assert abs(got["gen"] / n - want_gen) < 0.025 and abs(got["edit"] / n - 0.1) < 0.02, got
    rng = np.random.default_rng(5)
    ablation = Counter(replay(rng) for _ in range(n))
    assert "assess" not in ablation and abs(ablation["gen"] / n - want_gen / 0.7) < 0.03, ablation
    before, _ = recipe.stage4_mixtures(sft, edit, assess, 0.1)
    after, _ = recipe.stage4_mixtures(sft, edit, assess, 0.1, gen, 0.0)
    r1, r2 = np.random.default_rng(9), np.random.default_rng(9)
    assert [before(r1) for _ in range(300)] == [after(r2) for _ in range(300)]
    with pytest.raises(ValueError, match=r"stage4_edit \+ stage4_gen = 0.7: expected less than 0.7"):
        recipe.stage4_mixtures(sft, edit, assess, 0.3, gen, 0.4)
    with pytest.raises(ValueError, match=r"stage4_gen -0.1: expected a share in \[0, 0.7"):
        recipe.stage4_mixtures(sft, edit, assess, 0.0, gen, -0.1)


def test_rendered_assessments_fail_clearly_when_no_wrong_image_can_be_drawn(monkeypatch):
    from illume_edge.nano.recipe import Tasks

    monkeypatch.setattr(world, "near_miss", lambda scene, rng, cfg=W: None)  # nothing but the prompt's own scene
    monkeypatch.setattr(world, "MAX_SAMPLING_TRIES", 5)

    class Builder:
        def assess(self, *args, **kwargs):
            return "a right image"

    tasks, rng = Tasks(Builder(), W), np.random.default_rng(0)
    with pytest.raises(RuntimeError, match=r"no wrong rendered image for a prompt of the train split in 5 prompts x 8"):
        for _ in range(20):  # half the draws ask for a right image, which the prompt's own scene gives
            tasks.assess_rendered(rng)


def test_evidence_opens_every_trained_assessment_when_the_schedule_asks():
    """Schedule.assess_evidence: rendered assessments and stage 4's own-sample ones open with the evidence of
    the scene the image shows (the parsed one for own samples); a pool without parsed scenes is refused."""
    from illume_edge.nano import evaluator
    from illume_edge.nano import recipe
    from illume_edge.nano.recipe import AssessedSample, Tasks, assessment_examples

    class Builder:
        def assess(self, image, text, answer, correction, task):
            return json.loads(answer)

    rng = np.random.default_rng(4)
    for evidence in (False, True):
        doc = Tasks(Builder(), W, assess_evidence=evidence).assess_rendered(rng)
        assert (next(iter(doc)) == evaluator.EVIDENCE_KEY) == evidence
    prompt, scene = world.sample_gen_prompt(rng, W, "two_object", "train")
    shown = world.Scene(scene.objects[:1])
    sample = AssessedSample(prompt, scene, world.render(shown, W), evaluator.assess(prompt, shown), shown)
    doc = assessment_examples([sample], Builder(), W, evidence=True)(rng)
    assert doc[evaluator.EVIDENCE_KEY] == evaluator.evidence(prompt, shown)
    assert evaluator.EVIDENCE_KEY not in assessment_examples([sample], Builder(), W)(rng)
    with pytest.raises(ValueError, match=r"AssessedSample.shown.*self_assess_pool"):
        assessment_examples([replace(sample, shown=None)], Builder(), W, evidence=True)
    placed, scene = world.sample_gen_prompt(rng, W, "position", "train")
    sample = AssessedSample(placed, scene, world.render(scene, W), evaluator.assess(placed, scene), scene)
    doc = assessment_examples([sample], Builder(), W, evidence=True, evidence_axis=True)(rng)
    assert doc[evaluator.EVIDENCE_KEY] == evaluator.evidence(placed, scene, axis=True) != \
        evaluator.evidence(placed, scene)
    axis_tasks = Tasks.for_schedule(Builder(), W, replace(recipe.SCHEDULES["judge-edit-light"], evidence_axis=True))
    assert axis_tasks.evidence_axis and axis_tasks.assess_evidence


def test_a_run_resumed_from_a_snapshot_trains_the_whole_runs_later_phases(smoke_run, tmp_path):
    """Resumed from the snapshot after stage 2, a run trains the whole run's stage-3 weights byte for byte; a
    field of a later phase changes them and is recorded; a phase the snapshot already holds cannot be asked."""
    from illume_edge.nano import recipe

    out, work, _ = smoke_run
    smoke = recipe.SCHEDULES["smoke"]
    first = recipe.run(tmp_path / "o1", tmp_path / "w1", smoke, threads=2,
                       experiment=recipe.Experiment(snapshots=("stage2",), stop_after="stage2"))
    assert first["resumed_from"] == {}
    snapshot = tmp_path / "w1" / "after_stage2"
    record = json.loads((snapshot / recipe.SNAPSHOT_RECORD).read_text())
    assert record["phase"] == "stage2" and record["schedule"]["stage2"] == smoke.stage2
    exp = recipe.Experiment(snapshots=("judge",), stop_after="judge", resume_from=snapshot)
    again = recipe.run(tmp_path / "o2", tmp_path / "w2", smoke, threads=2, experiment=exp)
    assert list(again["stage_seconds"]) == ["stage3_curriculum", "stage3", "gen_phase", "judge"]
    assert again["resumed_from"]["phase"] == "stage2" and again["resumed_from"]["schedule_differences"] == {}
    assert _weight_bytes(tmp_path / "w2" / "after_judge") == _weight_bytes(work / "stage3_checkpoint")

    changed = replace(smoke, curriculum_grounding=0.0)
    other = recipe.run(tmp_path / "o3", tmp_path / "w3", changed, threads=2,
                       experiment=recipe.Experiment(snapshots=("judge",), stop_after="judge", resume_from=snapshot))
    assert other["resumed_from"]["schedule_differences"] == {"curriculum_grounding": [0.5, 0.0]}
    assert _weight_bytes(tmp_path / "w3" / "after_judge") != _weight_bytes(work / "stage3_checkpoint")

    with pytest.raises(ValueError, match=r"'lookup_exist' comes before the end of the snapshot"):
        recipe.run(tmp_path / "o", tmp_path / "w", smoke,
                   experiment=recipe.Experiment(stop_after="lookup_exist", resume_from=snapshot))
    with pytest.raises(FileNotFoundError, match="snapshot.json is missing"):
        recipe.run(tmp_path / "o", tmp_path / "w", smoke, experiment=recipe.Experiment(resume_from=work))
    with pytest.raises(ValueError, match=r"model config differs from this run's in \{'prompts.answer_separator': "):
        recipe.run(tmp_path / "o", tmp_path / "w", replace(smoke, answer_style="short", compare=0),
                   experiment=recipe.Experiment(resume_from=snapshot))
    with pytest.raises(ValueError, match="takes the snapshot's decoders"):
        recipe.run(tmp_path / "o", tmp_path / "w", smoke,
                   experiment=recipe.Experiment(resume_from=snapshot, decoders_from=snapshot))
