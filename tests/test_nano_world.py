"""ILLUME-nano shapes world and its evaluator: rendering round-trips, robust parsing, the held-out split, and
every text (QA, prompts, edits, self-assessment) true of its scene by construction. Pure numpy (and the shipped
tokenizer for the evidence's tokens), fast."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from illume_edge.config import preset
from illume_edge.nano import evaluator as ev
from illume_edge.nano.world import (COL_NAMES, COLORS, EDIT_KINDS, GEN_CATEGORIES, NEAR_MISS_KINDS, NUMBER_WORDS,
                                    QA_KINDS,
                                    RELATIONS, ROW_NAMES, SCAFFOLD_KINDS, SHAPES, QA, scaffold_qa,
                                    Edit, GenPrompt, Obj, Scene, WorldConfig, describe, describe_first, full_prompt,
                                    named_object, positions_first, winner_first, axis_first, named_axis, axis_name,
                                    gen_prompt_for,
                                    heldout_scenes, is_heldout, make_edit, make_qa, near_miss, position_name, qa_pairs,
                                    render, sample_edit, sample_gen_prompt, sample_scene, text_corpus, vocabulary,
                                    words)
from illume_edge.runtime.prompts import TextTokenizer

CFG = WorldConfig()
NANO = Path(__file__).resolve().parents[1] / "models" / "illume-nano"
THREE = Scene((Obj(0, 0, "circle", "red"), Obj(1, 1, "square", "blue"), Obj(2, 2, "triangle", "orange")))


def scenes(n: int, seed: int = 0, split: str = "train") -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, CFG, split) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------
# Scenes, rendering, parsing
# ----------------------------------------------------------------------------------------------------
def test_scene_is_canonical_and_texts_read_naturally():
    shuffled = Scene(tuple(reversed(THREE.objects)))
    assert shuffled == THREE and shuffled.key() == THREE.key() == "00:red circle;11:blue square;22:orange triangle"
    assert describe(THREE) == ("a red circle at the top left, a blue square in the center and an orange triangle "
                               "at the bottom right")
    assert describe(Scene((Obj(1, 0, "square", "green"),))) == "a green square on the left"
    names = [position_name(r, c) for r in range(3) for c in range(3)]
    assert names == ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
                     "bottom right"]
    assert THREE.count(color="red") == 1 and THREE.count(shape="circle", color="blue") == 0
    assert THREE.find(shape="square") == [Obj(1, 1, "square", "blue")]


def test_render_uses_exact_palette_colors():
    img = render(THREE, CFG)
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    colors = {tuple(int(v) for v in px) for px in img.reshape(-1, 3)}
    assert colors == {(255, 255, 255), COLORS["red"], COLORS["blue"], COLORS["orange"]}
    square = np.all(img == COLORS["blue"], axis=-1)
    assert square.sum() == 144 and square[18:30, 18:30].all()  # centered 12x12 in the middle 16x16 cell
    tri = np.all(img == COLORS["orange"], axis=-1)[34:46, 34:46]
    assert tri[-1].all() and tri[0].sum() <= 2  # apex up, base at the bottom


def test_parse_inverts_render_exactly():
    for seed in range(10):
        for i, scene in enumerate(scenes(50, seed, "heldout" if seed % 2 else "train")):
            assert ev.parse(render(scene, CFG), CFG) == scene, (seed, i, scene.key())


def _noise(img, rng):
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def _blur(img, rng):
    p = np.pad(img.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    return np.round(sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9).astype(np.uint8)


def _shift(img, rng):
    return np.clip(img.astype(int) + rng.choice([-15, 15], 3), 0, 255).astype(np.uint8)


def _antialias(scene, rng):
    """Rendered 4x larger and box-downsampled: soft, anti-aliased edges."""
    big = render(scene, WorldConfig(image_size=192, object_size=48)).astype(np.float32)
    return np.round(big.reshape(48, 4, 48, 4, 3).mean(axis=(1, 3))).astype(np.uint8)


@pytest.mark.parametrize("distort", ["noise", "blur", "shift", "antialias"])
def test_parse_is_robust_to_imperfect_images(distort):
    rng = np.random.default_rng(7)
    for scene in scenes(150, seed=3):
        img = render(scene, CFG)
        img = {"noise": _noise, "blur": _blur, "shift": _shift}[distort](img, rng) if distort != "antialias" \
            else _antialias(scene, rng)
        assert ev.parse(img, CFG) == scene, (distort, scene.key())


def test_speckles_do_not_create_objects_and_off_colors_still_parse():
    rng = np.random.default_rng(11)
    for scene in scenes(100, seed=4):
        img = render(scene, CFG)
        for _ in range(6):  # isolated speckles of palette colors anywhere
            img[rng.integers(48), rng.integers(48)] = COLORS[list(COLORS)[rng.integers(len(COLORS))]]
        assert ev.parse(img, CFG) == scene
    off = render(THREE, CFG).astype(int)
    off[np.all(off == COLORS["blue"], axis=-1)] = (60, 95, 200)  # a slightly wrong blue
    assert ev.parse(off.astype(np.uint8), CFG) == THREE


def test_two_components_in_one_cell_keep_the_larger():
    img = np.full((48, 48, 3), 255, np.uint8)
    img[16:24, 16:24] = COLORS["blue"]  # 64 px
    img[26:32, 26:32] = COLORS["red"]  # 36 px, apart from the blue one, same cell
    assert ev.parse(img, CFG) == Scene((Obj(1, 1, "square", "blue"),))


def test_touching_objects_of_different_colors_are_split():
    scene = Scene((Obj(1, 0, "square", "red"), Obj(1, 1, "square", "blue")))
    img = render(scene, CFG)
    img[23:25, 14:18] = COLORS["red"]  # a red bridge joins the two squares
    assert ev.parse(img, CFG) == scene


# ----------------------------------------------------------------------------------------------------
# Held-out split
# ----------------------------------------------------------------------------------------------------
def test_heldout_split_is_disjoint_and_deterministic():
    rng = np.random.default_rng(5)
    train = [sample_scene(rng, CFG, "train") for _ in range(2000)]
    assert not any(is_heldout(s, CFG) for s in train)
    held = heldout_scenes(50, CFG)
    assert held == heldout_scenes(50, CFG) and all(is_heldout(s, CFG) for s in held)
    assert held != heldout_scenes(50, CFG, seed=99)
    counts = {len(s.objects) for s in train}
    assert counts == {1, 2, 3}
    assert len(sample_scene(rng, CFG, "heldout", n_objects=2).objects) == 2
    assert all(not is_heldout(sample_edit(rng, CFG, "train").target, CFG) for _ in range(200))


# ----------------------------------------------------------------------------------------------------
# Question answering
# ----------------------------------------------------------------------------------------------------
def test_qa_answers_are_correct_by_construction():
    rng = np.random.default_rng(2)
    for scene in scenes(300, seed=6):
        for qa in qa_pairs(scene, rng):
            q = qa.question
            if qa.kind == "color":
                shape = q.removeprefix("what color is the ").removesuffix("?")
                assert [o.color for o in scene.find(shape=shape)] == [qa.answer]
            elif qa.kind == "shape":
                color = q.removeprefix("what shape is the ").removesuffix(" object?")
                assert [o.shape for o in scene.find(color=color)] == [qa.answer]
            elif qa.kind == "count":
                subject = q.removeprefix("how many ").removesuffix(" are there?")
                n = (len(scene.objects) if subject == "objects" else
                     scene.count(color=subject.removesuffix(" objects")) if subject.endswith(" objects") else
                     scene.count(shape=subject.removesuffix("s")))
                assert qa.answer == NUMBER_WORDS[n]
            elif qa.kind == "position":
                color, shape = q.removeprefix("where is the ").removesuffix("?").split()
                (o,) = scene.find(shape, color)
                assert qa.answer == position_name(o.row, o.col)
            elif qa.kind == "describe":
                assert qa.answer == describe(scene) and ev.parse(render(scene, CFG), CFG) == scene
            assert ev.answer_correct(qa, f"  {qa.answer.upper()}. ")


def test_describe_first_answers_end_with_the_answer_after_the_only_separator():
    """A describe-first answer is "<description>. <answer>"; no description contains the separator, so the final
    answer read back after its last ". " (runtime.prompts.final_answer, how the evaluation scores such a model)
    is the world's answer, for every kind; describe questions stay as they are."""
    from illume_edge.runtime.prompts import final_answer

    rng = np.random.default_rng(3)
    kinds = set()
    for scene in scenes(300, seed=8):
        for qa in qa_pairs(scene, rng):
            styled = describe_first(scene, qa)
            assert styled.kind == qa.kind and styled.question == qa.question
            if qa.kind == "describe":
                assert styled == qa and ". " not in qa.answer
                continue
            kinds.add(qa.kind)
            assert styled.answer == f"{describe(scene)}. {qa.answer}" and styled.answer.count(". ") == 1
            assert final_answer(styled.answer, ". ") == qa.answer and ev.answer_correct(qa, final_answer(
                styled.answer, ". "))
    assert kinds == set(QA_KINDS) - {"describe"}


_RELATION_QA = re.compile(r"is (the .+?) (to the left of|to the right of|above|below) (the .+)\?")


def styled_relations(style, seed: int) -> list[tuple[Scene, Obj, str, Obj, str, str]]:
    """Every relation question (conjunctive and scaffold names alike) of 400 scenes restyled by `style`, as
    (scene, first object, relation phrase, second object, styled answer, world's answer); the other kinds must come back
    unchanged, and every styled answer must keep the question and hold the world's answer after its only ". "."""
    from illume_edge.runtime.prompts import final_answer

    rng, out = np.random.default_rng(seed), []
    for scene in scenes(400, seed=seed + 5):
        for qa in [make_qa(scene, rng, k) for k in QA_KINDS] + [scaffold_qa(scene, rng, "relation")]:
            if qa is None:
                continue
            styled = style(scene, qa)
            if qa.kind != "relation":
                assert styled == qa
                continue
            assert styled.question == qa.question and styled.answer.count(". ") == 1
            assert final_answer(styled.answer, ". ") == qa.answer
            m = _RELATION_QA.fullmatch(qa.question)
            out.append((scene, named_object(scene, m.group(1)), m.group(2), named_object(scene, m.group(3)),
                        styled.answer, qa.answer))
    assert len(out) > 300
    return out


def test_winner_first_names_the_object_further_the_asked_way_then_the_same_answer():
    """A relation answer in the winner-first style is "<the object further along the asked direction>. <answer>":
    the first object named when the relation holds, the second when it does not (they always differ along the
    axis)."""
    further = {"to the left of": lambda o: -o.col, "to the right of": lambda o: o.col,
               "above": lambda o: -o.row, "below": lambda o: o.row}
    for scene, a, phrase, b, styled, answer in styled_relations(winner_first, seed=5):
        key = further[phrase]
        assert key(a) != key(b)
        named, said = styled.split(". ")
        assert named_object(scene, named) == (a if key(a) > key(b) else b) and said == answer
    with pytest.raises(ValueError, match="does not match"):
        winner_first(THREE, QA("relation", "is the red circle near the blue square?", "yes"))
    with pytest.raises(ValueError, match="names 0 objects"):
        winner_first(THREE, QA("relation", "is the green circle above the red circle?", "yes"))


def test_axis_first_states_both_places_along_the_asked_axis_then_the_same_answer():
    """A relation answer in the axis-first style is "<a's place on the axis>, <b's>. <answer>": row names for above /
    below, column names for left / right; the answer follows from the two words alone."""
    order = {"above": ROW_NAMES, "below": ROW_NAMES[::-1], "to the left of": COL_NAMES,
             "to the right of": COL_NAMES[::-1]}
    for _, a, phrase, b, styled, answer in styled_relations(axis_first, seed=7):
        places, said = styled.split(". ")
        wa, wb = places.split(", ")
        rows = phrase in ("above", "below")
        assert (wa, wb) == tuple(ROW_NAMES[o.row] if rows else COL_NAMES[o.col] for o in (a, b))
        assert said == ("yes" if order[phrase].index(wa) < order[phrase].index(wb) else "no") == answer
    with pytest.raises(ValueError, match="does not match"):
        axis_first(THREE, QA("relation", "is the red circle near the blue square?", "yes"))


def test_named_axis_is_axis_first_with_each_place_after_its_objects_name():
    """A relation answer in the named-axis style is "<a's name> <a's place>, <b's name> <b's place>. <answer>",
    the names as the question words them and the places those of axis_first."""
    for scene, a, phrase, b, styled, answer in styled_relations(named_axis, seed=8):
        named, said = styled.split(". ")
        first, second = named.split(", ")
        (name_a, wa), (name_b, wb) = first.rsplit(" ", 1), second.rsplit(" ", 1)
        assert (named_object(scene, name_a), named_object(scene, name_b)) == (a, b)
        assert (wa, wb) == (axis_name(a, _RELATION_KEY[phrase]), axis_name(b, _RELATION_KEY[phrase]))
        question = f"is {name_a} {phrase} {name_b}?"
        assert axis_first(scene, QA("relation", question, answer)).answer == f"{wa}, {wb}. {said}"
    with pytest.raises(ValueError, match="does not match"):
        named_axis(THREE, QA("relation", "is the red circle near the blue square?", "yes"))


_RELATION_KEY = {phrase: relation for relation, (phrase, _) in RELATIONS.items()}  # "to the left of" -> "left"


def test_positions_first_states_both_places_then_the_same_answer():
    """A relation answer in the positions-first style is "<place of a>, <place of b>. <answer>"."""
    for _, a, _, b, styled, answer in styled_relations(positions_first, seed=4):
        assert styled == f"{position_name(a.row, a.col)}, {position_name(b.row, b.col)}. {answer}"
    with pytest.raises(ValueError, match="does not match"):
        positions_first(THREE, QA("relation", "is the red circle near the blue square?", "yes"))
    with pytest.raises(ValueError, match="names 0 objects"):
        named_object(THREE, "the green circle")
    with pytest.raises(ValueError, match="expected 'the <color> <shape>'"):
        named_object(THREE, "a red circle")
def test_exist_and_relation_answers_are_balanced_and_true():
    rng = np.random.default_rng(3)
    answers = {"exist": [], "relation": []}
    for scene in scenes(600, seed=8):
        for kind in answers:
            qa = make_qa(scene, rng, kind)
            if qa is None:
                continue
            answers[kind].append(qa.answer == "yes")
            if kind == "exist":
                label = qa.question.removeprefix("is there ").removesuffix("?").split()[1:]
                assert (scene.count(label[1], label[0]) > 0) == (qa.answer == "yes")
    for kind, yes in answers.items():
        assert len(yes) > 100 and 0.4 < np.mean(yes) < 0.6, (kind, len(yes), np.mean(yes))
    relation = make_qa(Scene((Obj(0, 0, "circle", "red"), Obj(0, 2, "square", "blue"))), rng, "relation")
    truth = {"is the red circle to the left of the blue square?": "yes",
             "is the blue square to the left of the red circle?": "no",
             "is the red circle to the right of the blue square?": "no",
             "is the blue square to the right of the red circle?": "yes"}
    assert truth[relation.question] == relation.answer  # same row: above/below are never asked


def test_scaffold_questions_are_true_balanced_and_name_one_object():
    """The one-attribute exist / relation / position questions of the training curriculum."""
    rng = np.random.default_rng(12)
    vocab = set(vocabulary())
    yes = {"exist": [], "relation": []}
    for scene in scenes(500, seed=13):
        for kind in SCAFFOLD_KINDS:
            qa = scaffold_qa(scene, rng, kind)
            if qa is None:
                continue
            assert set(words(qa.question)) <= vocab and qa.kind == kind
            q = qa.question.removesuffix("?")
            if kind == "exist":
                what = q.removeprefix("is there ").split()[1:]
                n = scene.count(color=what[0]) if what[-1] == "object" else scene.count(shape=what[0])
                assert (n > 0) == (qa.answer == "yes")
            elif kind == "position":
                name = q.removeprefix("where is the ").split()
                found = scene.find(color=name[0]) if name[-1] == "object" else scene.find(shape=name[0])
                assert len(found) == 1 and qa.answer == position_name(found[0].row, found[0].col)
            else:
                phrase = next(r for r, (text, _) in RELATIONS.items() if f" {text} " in q)
                a, b = q.removeprefix("is ").split(f" {RELATIONS[phrase][0]} ")

                def one(name):
                    w = name.removeprefix("the ").split()
                    (o,) = scene.find(color=w[0]) if w[-1] == "object" else scene.find(shape=w[0])
                    return o
                assert RELATIONS[phrase][1](one(a), one(b)) == (qa.answer == "yes")
            if kind in yes:
                yes[kind].append(qa.answer == "yes")
    for kind, got in yes.items():
        assert len(got) > 100 and 0.4 < np.mean(got) < 0.6, (kind, len(got), np.mean(got))
    with pytest.raises(ValueError, match="unknown kind 'count'"):
        scaffold_qa(THREE, rng, "count")


def test_unaskable_questions_are_skipped():
    twins = Scene((Obj(0, 0, "circle", "red"), Obj(0, 1, "circle", "red")))
    rng = np.random.default_rng(0)
    for kind in ("shape", "color", "position", "relation"):
        assert make_qa(twins, rng, kind) is None
    assert {qa.kind for qa in qa_pairs(THREE, rng)} == set(QA_KINDS)


# ----------------------------------------------------------------------------------------------------
# Generation prompts
# ----------------------------------------------------------------------------------------------------
def test_every_prompt_is_true_of_its_scene():
    rng = np.random.default_rng(4)
    seen = {c: 0 for c in GEN_CATEGORIES}
    for scene in scenes(300, seed=9):
        for category in GEN_CATEGORIES + ("full",):
            prompt = gen_prompt_for(scene, rng, category)
            if prompt is None:
                continue
            seen[category] = seen.get(category, 0) + 1
            verdicts = ev.check_prompt(prompt, scene)
            assert all(v is not False for v in verdicts.values()) and ev.prompt_satisfied(prompt, scene), prompt
            assert ev.assess(prompt, scene).good and hash(prompt.spec) is not None
    assert all(n > 50 for n in seen.values()), seen
    for category in GEN_CATEGORIES:
        prompt, scene = sample_gen_prompt(rng, CFG, category, "heldout")
        assert prompt.category == category and is_heldout(scene, CFG) and ev.prompt_satisfied(prompt, scene)


def _prompt(scene: Scene, category: str, text: str) -> GenPrompt:
    """A prompt of ``category`` with exactly this text (drawn until it comes up)."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = gen_prompt_for(scene, rng, category)
        if p.text == text:
            return p
    raise AssertionError(f"no {category} prompt {text!r}")


def test_wrong_scenes_fail_the_right_aspect():
    two_circles = Scene((Obj(0, 0, "circle", "red"), Obj(2, 2, "circle", "red"), Obj(1, 1, "square", "blue")))
    counting = _prompt(two_circles, "counting", "two circles")
    one_left = Scene(two_circles.objects[1:])
    assert ev.check_prompt(counting, one_left) == {"object": True, "count": False, "color": None, "spatial": None}
    none_left = Scene((Obj(1, 1, "square", "blue"),))
    assert ev.check_prompt(counting, none_left)["object"] is False

    colors = _prompt(THREE, "colors", "a red circle")
    recolored = Scene((Obj(0, 0, "circle", "green"),) + THREE.objects[1:])
    assert ev.check_prompt(colors, recolored) == {"object": True, "count": None, "color": False, "spatial": None}

    position = _prompt(THREE, "position", "a circle to the left of a square")
    swapped = Scene((Obj(0, 0, "square", "blue"), Obj(1, 1, "circle", "red"), THREE.objects[2]))
    assert ev.check_prompt(position, swapped) == {"object": True, "count": None, "color": None, "spatial": False}

    two = _prompt(THREE, "two_object", "a circle and a triangle")
    assert ev.check_prompt(two, Scene(THREE.objects[:2]))["object"] is False
    attr = _prompt(THREE, "color_attr", "a blue square and an orange triangle")
    assert ev.check_prompt(attr, recolored)["color"] is True and ev.check_prompt(attr, none_left)["object"] is False

    full = full_prompt(THREE)
    assert full.text == describe(THREE) and ev.prompt_satisfied(full, THREE)
    assert ev.check_prompt(full, recolored) == {"object": True, "count": True, "color": False, "spatial": False}


# ----------------------------------------------------------------------------------------------------
# Edits
# ----------------------------------------------------------------------------------------------------
def test_edits_change_exactly_what_they_say():
    rng = np.random.default_rng(12)
    seen = set()
    for _ in range(300):
        edit = sample_edit(rng, CFG, "train")
        src, tgt = set(edit.source.objects), set(edit.target.objects)
        gone, new = src - tgt, tgt - src
        seen.add(edit.kind)
        if edit.kind == "recolor":
            ((a,), (b,)) = gone, new
            assert (a.row, a.col, a.shape) == (b.row, b.col, b.shape) and a.color != b.color
            assert edit.instruction == f"make the {a.color} {a.shape} {b.color}"
        elif edit.kind == "remove":
            ((a,),) = (gone,)
            assert not new and edit.instruction == f"remove the {a.color} {a.shape}"
        elif edit.kind == "add":
            ((b,),) = (new,)
            assert not gone and len(edit.target.objects) <= CFG.max_objects
            assert edit.instruction.startswith("add ") and position_name(b.row, b.col) in edit.instruction
        else:
            ((a,), (b,)) = gone, new
            assert (a.shape, a.color) == (b.shape, b.color) and (a.row, a.col) != (b.row, b.col)
            assert edit.instruction == f"move the {a.color} {a.shape} to the {position_name(b.row, b.col)}"
        if edit.kind != "add":  # the instruction names a referable object
            assert edit.source.count(a.shape, a.color) == 1
        assert ev.parse(render(edit.target, CFG), CFG) == edit.target and ev.edit_correct(edit, edit.target)
        assert not ev.edit_correct(edit, edit.source)
    assert seen == set(EDIT_KINDS)
    crowded = Scene(tuple(Obj(r, 0, "circle", "red") for r in range(3)))  # max_objects, none referable
    assert make_edit(crowded, rng, "add", CFG) is None and make_edit(crowded, rng, "recolor", CFG) is None


def test_near_misses_change_one_object_once():
    """world.near_miss: one object recolored, removed, added, moved or reshaped; every kind occurs."""
    rng = np.random.default_rng(5)
    seen = set()
    for _ in range(500):
        scene = sample_scene(rng, CFG, "train")
        miss = near_miss(scene, rng, CFG)
        if miss is None:
            continue
        gone, new = set(scene.objects) - set(miss.objects), set(miss.objects) - set(scene.objects)
        assert len(gone) + len(new) in (1, 2) and len(gone) <= 1 and len(new) <= 1, (scene, miss)
        if gone and new:
            ((a,), (b,)) = gone, new
            changed = [f for f in ("row", "col", "shape", "color") if getattr(a, f) != getattr(b, f)]
            assert changed in (["color"], ["shape"], ["row"], ["col"], ["row", "col"]), changed
            seen.add("reshape" if changed == ["shape"] else "recolor" if changed == ["color"] else "move")
        else:
            seen.add("remove" if gone else "add")
    assert seen == set(NEAR_MISS_KINDS)


# ----------------------------------------------------------------------------------------------------
# Self-assessment and scores
# ----------------------------------------------------------------------------------------------------
def test_assessment_json_round_trips_and_reads_clearly():
    rng = np.random.default_rng(13)
    for _ in range(200):
        prompt, _ = sample_gen_prompt(rng, CFG, GEN_CATEGORIES[rng.integers(len(GEN_CATEGORIES))])
        a = ev.assess(prompt, sample_scene(rng, CFG))
        text = ev.assessment_to_json(a)
        assert ev.assessment_from_json(text) == a and list(json.loads(text)) == list(ev.JSON_KEYS)
        assert ev.assessment_agreement(ev.assessment_from_json(text), a)
    counting = _prompt(Scene(THREE.objects + (Obj(0, 1, "circle", "red"),)), "counting", "two circles")
    assert ev.assessment_to_json(ev.assess(counting, THREE)) == (
        '{"object": "yes", "count": "no", "color": "n/a", "spatial": "n/a", "score": "0.50", '
        '"analysis": "the image shows one circle, the prompt asks for two circles."}')
    good = ev.assess(counting, Scene(THREE.objects + (Obj(0, 1, "circle", "red"),)))
    assert good.good and good.score == 1.0 and good.analysis.startswith("the image shows a red circle at the top")


def test_malformed_assessments_give_none_and_disagree():
    a = ev.Assessment(True, None, False, None, "x")
    text = ev.assessment_to_json(a)
    bad = ["", "{", "null", "[1]", '{"object": "yes"}', text.replace('"0.50"', '"0.75"'),
           text.replace('"yes"', '"maybe"'), text.replace('"score": "0.50"', '"score": 0.5'),
           '{"count": "n/a", "object": "yes", "color": "no", "spatial": "n/a", "score": "0.50", "analysis": "x"}',
           "[" * 100000, text + " trailing"]
    for t in bad + [None, 42]:
        assert ev.assessment_from_json(t) is None, t
    assert not ev.assessment_agreement(None, a)
    assert not ev.assessment_agreement(ev.Assessment(True, False, False, None, "x"), a)
    assert ev.assessment_agreement(ev.Assessment(True, None, False, None, "other words"), a)
    scores = ev.assessment_scores([(text, a), ("junk", a)])
    assert (scores["valid"], scores["agreement"]) == (0.5, 0.5)
    assert scores["by_aspect"]["color"] == {"agree": 1.0, "missed": 0.0, "false_alarm": 0.0}  # junk not counted


def test_agreement_by_aspect_says_which_way_each_verdict_goes_wrong():
    truth = ev.Assessment(True, None, False, True, "x")  # object right, no count asked, color wrong, spatial right
    said = [ev.Assessment(True, None, True, True, "x"),    # passes the wrong color
            ev.Assessment(True, None, False, False, "x"),  # sees the color fault, invents a spatial one
            ev.Assessment(True, True, False, True, "x")]   # a count verdict where none applies
    scores = ev.assessment_scores([(ev.assessment_to_json(m), truth) for m in said])
    by = scores["by_aspect"]
    assert scores["agreement"] == 0.0 and by["object"]["agree"] == 1.0
    assert by["color"] == {"agree": 2 / 3, "missed": 1 / 3, "false_alarm": 0.0}
    assert by["spatial"] == {"agree": 2 / 3, "missed": 0.0, "false_alarm": 1 / 3}
    assert by["count"] == {"agree": 2 / 3, "missed": 0.0, "false_alarm": 0.0}  # an n/a confusion is neither
    assert ev.assessment_scores([]) == {} and "by_aspect" not in ev.assessment_scores([("junk", truth)])
    from illume_edge.nano.evaluate import results_table

    base = {"backend": "b", "understanding": {}, "generation_single": {}, "generation_best_of_4": {}, "editing": {},
            "seconds": 1.0}
    table = results_table([{**base, "self_assessment": scores}, {**base, "self_assessment": {"agreement": 0.5}}])
    assert "|   color verdict agrees / passes a fault | 0.667 / 0.333 | - |" in table  # older results: no breakdown


def test_evidence_axis_gives_places_along_the_relations_axis_for_position_prompts():
    """evaluator.evidence(axis=True): for a position prompt, where each object of each named shape lies along the
    relation's axis (rows for above / below, columns for left / right), in the prompt's order; other prompts
    keep their colors. The spatial verdict follows from those words: some place of the first shape lies the
    asked way of some place of the second. One token per word for the nano tokenizer."""
    scene = Scene((Obj(0, 0, "circle", "red"), Obj(2, 1, "circle", "blue"), Obj(1, 2, "square", "green")))
    above = GenPrompt("position", "a circle above a square", ((("circle", None, 1), ("square", None, 1)), "above"))
    left = GenPrompt("position", "a square to the left of a circle",
                     ((("square", None, 1), ("circle", None, 1)), "left"))
    assert ev.evidence(above, scene, axis=True) == "circle: top, bottom; square: middle"
    assert ev.evidence(left, scene, axis=True) == "square: right; circle: left, center"
    assert ev.evidence(above, scene) == "circle: red, blue; square: green"
    two = GenPrompt("two_object", "a circle and a square", ((("circle", None, 1), ("square", None, 1)), None))
    assert ev.evidence(two, scene, axis=True) == ev.evidence(two, scene)
    assert ev.evidence(full_prompt(scene), scene, axis=True) == ev.evidence(full_prompt(scene), scene)
    order = {"above": ROW_NAMES, "below": ROW_NAMES[::-1], "left": COL_NAMES, "right": COL_NAMES[::-1]}
    tok = TextTokenizer.from_file(NANO / "mllm" / "tokenizer.json", preset("illume-nano"))
    rng = np.random.default_rng(6)
    for _ in range(300):
        prompt, source = sample_gen_prompt(rng, CFG, "position", "train")
        scene = near_miss(source, rng, CFG) or source
        text = ev.evidence(prompt, scene, axis=True)
        assert len(tok.encode(text)) == len(words(text)), text
        relation = prompt.spec[1]
        first, second = ([order[relation].index(w) for w in part.split(": ")[1].split(", ") if w != "nothing"]
                         for part in text.split("; "))
        assert any(a < b for a in first for b in second) == ev.check_prompt(prompt, scene)["spatial"]
    with pytest.raises(ValueError, match="expected a relation"):
        axis_name(Obj(0, 0, "circle", "red"), "near")


def test_evidence_states_what_the_image_shows_of_each_shape_the_prompt_names():
    """evaluator.evidence: the colors of each named shape in the scene (or "nothing"), in the prompt's order, then
    whether each colored object asked for is there; one token per word or mark for the nano tokenizer; as the
    assessment's optional first field it round-trips, and anywhere else it makes the text malformed."""
    scene = Scene((Obj(0, 0, "circle", "red"), Obj(1, 1, "circle", "blue"), Obj(2, 2, "square", "green")))
    two = GenPrompt("color_attr", "a green triangle and a red circle",
                    ((("triangle", "green", 1), ("circle", "red", 1)), None))
    assert ev.evidence(two, scene) == "triangle: nothing; circle: red, blue; green triangle: no; red circle: yes"
    assert ev.evidence(full_prompt(scene), scene) == ("circle: red, blue; square: green; red circle: yes; "
                                                      "blue circle: yes; green square: yes")
    tok = TextTokenizer.from_file(NANO / "mllm" / "tokenizer.json", preset("illume-nano"))
    rng = np.random.default_rng(5)
    for category in GEN_CATEGORIES + ("full",):
        for _ in range(20):
            prompt, source = sample_gen_prompt(rng, CFG, category, "train")
            text = ev.evidence(prompt, near_miss(source, rng, CFG) or source)
            assert len(tok.encode(text)) == len(words(text)), text  # one token per word or mark
    a = ev.assess(two, scene)
    text = ev.assessment_to_json(a, ev.evidence(two, scene))
    assert list(json.loads(text)) == [ev.EVIDENCE_KEY, *ev.JSON_KEYS]
    assert text.startswith('{"shows": "triangle: nothing; circle: red, blue; green triangle: no; red circle: yes", '
                           '"object": "no", ')
    assert ev.assessment_from_json(text) == a
    doc = json.loads(text)
    moved = {k: doc[k] for k in ev.JSON_KEYS[:2]} | {ev.EVIDENCE_KEY: doc[ev.EVIDENCE_KEY]} | \
        {k: doc[k] for k in ev.JSON_KEYS[2:]}
    for bad in (json.dumps(moved), text.replace(f'"shows": "{doc[ev.EVIDENCE_KEY]}"', '"shows": 3'),
                text.replace('"shows"', '"saw"')):
        assert ev.assessment_from_json(bad) is None, bad


def test_score_aggregates():
    qa = QA("count", "how many objects are there?", "two")
    und = ev.understanding_scores([(qa, "two"), (qa, "three"), (QA("exist", "is there a red circle?", "yes"), "yes")])
    assert und == {"count": 0.5, "exist": 1.0, "overall": 2 / 3}
    rng = np.random.default_rng(0)
    single = gen_prompt_for(THREE, rng, "single_object")
    colors = _prompt(THREE, "colors", "a red circle")
    wrong = Scene(THREE.objects[1:])
    gen = ev.generation_scores([(single, THREE), (colors, THREE), (colors, wrong), (colors, wrong),
                                (full_prompt(THREE), wrong)])
    assert gen["single_object"] == 1.0 and gen["colors"] == 1 / 3 and gen["overall"] == (1 + 1 / 3) / 2
    assert gen["full"] == 0.0
    edit = make_edit(THREE, rng, "remove", CFG)
    assert ev.editing_scores([(edit, edit.target), (edit, THREE)]) == {"remove": 0.5, "overall": 0.5}


def test_generation_failures_say_which_aspect_of_a_prompt_broke():
    """A position prompt fails by a missing shape ("object") or a misplaced pair ("spatial", which a missing
    shape fails too); aspects a category does not test are absent, and so are "full" prompts."""
    above = _prompt(THREE, "position", "a circle above a square")
    one = Scene(THREE.objects[:1])  # the circle alone
    flipped = Scene((Obj(2, 0, "circle", "red"), Obj(0, 1, "square", "blue")))
    fails = ev.generation_failures([(above, THREE), (above, one), (above, flipped), (above, flipped),
                                    (full_prompt(THREE), one)])
    assert fails == {"position": {"object": 0.25, "spatial": 0.75}}  # "full" prompts left out
    colors = _prompt(THREE, "colors", "a red circle")
    assert ev.generation_failures([(colors, THREE), (colors, Scene(THREE.objects[1:]))]) == {
        "colors": {"object": 0.5, "color": 0.5}}


def test_editing_failures_tell_an_unchanged_output_from_a_wrong_object_edited():
    """Recoloring the circle of THREE: the source back is "unchanged" (and so "missed"); the square recolored in
    its place is "missed" and "collateral"; the circle recolored and the triangle lost is "collateral" only."""
    recolor = Edit("recolor", "make the red circle green", THREE,
                   Scene((Obj(0, 0, "circle", "green"), *THREE.objects[1:])))
    wrong_object = Scene((THREE.objects[0], Obj(1, 1, "square", "green"), THREE.objects[2]))
    lost_one = Scene(recolor.target.objects[:2])
    fails = ev.editing_failures([(recolor, recolor.target), (recolor, THREE), (recolor, wrong_object),
                                 (recolor, lost_one)])
    assert fails == {"recolor": {"unchanged": 0.25, "missed": 0.5, "collateral": 0.5}}
    remove = make_edit(THREE, np.random.default_rng(0), "remove", CFG)
    assert ev.editing_failures([(remove, THREE), (remove, remove.target)]) == {
        "remove": {"unchanged": 0.5, "missed": 0.5, "collateral": 0.0}}


# ----------------------------------------------------------------------------------------------------
# Vocabulary and invalid inputs
# ----------------------------------------------------------------------------------------------------
def test_corpus_words_are_in_the_vocabulary():
    corpus = text_corpus(np.random.default_rng(14), CFG, 600)
    vocab = set(vocabulary())
    assert len(corpus) == 600 and set(w for t in corpus for w in words(t)) <= vocab
    assert all(t == t.lower() for t in corpus)
    for needed in ("triangles", "three", "bottom", "above", "an", "spatial", "/", "{", "describe", "move"):
        assert needed in vocab
    texts = " ".join(corpus)
    for template in ("what color is", "what shape is", "how many", "is there", "where is", "to the right of",
                     "describe the image.", "make the", "remove the", "add a", "move the", '"score"'):
        assert template in texts, template


def test_invalid_inputs_fail_clearly():
    with pytest.raises(ValueError, match="unknown color 'pink'"):
        Obj(0, 0, "circle", "pink")
    with pytest.raises(ValueError, match="unknown shape 'star'"):
        Obj(0, 0, "star", "red")
    with pytest.raises(ValueError, match="row: expected an int in 0..2, got 3"):
        Obj(3, 0, "circle", "red")
    with pytest.raises(ValueError, match=r"two objects in cell \(1, 1\)"):
        Scene((Obj(1, 1, "circle", "red"), Obj(1, 1, "square", "blue")))
    with pytest.raises(ValueError, match="expected a uint8 array of shape \\(48, 48, 3\\), got uint8 \\(32, 32, 3\\)"):
        ev.parse(np.zeros((32, 32, 3), np.uint8), CFG)
    with pytest.raises(ValueError, match="got float32"):
        ev.parse(np.zeros((48, 48, 3), np.float32), CFG)
    with pytest.raises(ValueError, match="got list"):
        ev.parse([[0]], CFG)
    with pytest.raises(ValueError, match="split"):
        sample_scene(np.random.default_rng(0), CFG, "test")
    with pytest.raises(ValueError, match="unknown QA kind"):
        make_qa(THREE, np.random.default_rng(0), "why")
    with pytest.raises(ValueError, match="object_size"):
        WorldConfig(object_size=20)
    assert ev.parse(np.full((48, 48, 3), 255, np.uint8), CFG) == Scene(())
    assert set(SHAPES) == {"circle", "square", "triangle"}


def test_parse_description_inverts_describe():
    """`parse_description(describe(scene)) == scene` for every scene (the self-described best-of-N ranking of
    `make eval-nano` reads the model's descriptions with it), text after the description included; nothing
    to read, or two objects in one cell, is None."""
    from illume_edge.nano import world

    rng = np.random.default_rng(7)
    for _ in range(1000):
        scene = world.sample_scene(rng, split=str(rng.choice(["train", "heldout"])))
        assert world.parse_description(world.describe(scene)) == scene, world.describe(scene)
        assert world.parse_description(world.describe(scene) + ". yes") == scene
    assert world.parse_description("nothing") is None and world.parse_description("") is None
    assert world.parse_description("a red circle at the top and a blue square at the top") is None
    assert world.parse_description("a red circle at the top left") == world.Scene((world.Obj(0, 0, "circle", "red"),))
    assert world.parse_description("a red circle at the top") == world.Scene((world.Obj(0, 1, "circle", "red"),))


def test_sample_qa_draws_a_question_of_the_asked_kinds_from_the_split():
    from illume_edge.nano.world import sample_qa

    w = WorldConfig()
    rng = np.random.default_rng(5)
    for split in ("train", "heldout"):
        for _ in range(30):
            scene, q = sample_qa(rng, w, ("relation", "exist"), split)
            assert q.kind in ("relation", "exist") and is_heldout(scene, w) == (split == "heldout")
            assert len(scene.objects) >= 2 or q.kind == "exist"  # a relation needs two objects: redrawn until so
