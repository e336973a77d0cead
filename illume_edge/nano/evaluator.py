"""Programmatic evaluator of the shapes world: parse any RGB image back into a Scene, then score tasks.

Parsing (robust to noise, blur, slight color shifts, speckles and anti-aliasing)
1. Each pixel is background when it is closer to white than to every palette color, has low saturation
   (max - min channel < ``MIN_SATURATION``) or is farther than ``MAX_COLOR_DISTANCE`` from every palette
   color; otherwise it takes the nearest palette color.
2. Connected components (8-neighbour) by min-label propagation with pointer jumping (no scipy), once over
   all foreground and once per color. A foreground component is one object, of the majority color of its
   interior (edge pixels mixed with white, or stray pixels of a confusable color, do not count), unless its
   same-color components of the minimum area lie in different cells (touching objects of different colors):
   then each of those is one object.
3. Components under ``MIN_AREA_FRACTION`` of a full object's area (object_size**2) are dropped; each object
   goes to the grid cell of its centroid (the larger one wins a cell) and takes the shape whose template,
   fitted to the object's area and centroid, has the highest IoU with its mask.

Scoring follows GenEval: a prompt is judged on the aspects its spec tests ("object": required shapes
present, "count": exact count (counting), "color": the colored items exist, "spatial": the relation holds);
generation "overall" is the mean over GenEval categories. Self-assessment is a compact JSON verdict, e.g.
{"object": "yes", "count": "n/a", "color": "no", "spatial": "n/a", "score": "0.50", "analysis": "..."}.
"""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .world import (COLORS, GEN_CATEGORIES, RELATIONS, SHAPES, QA, Edit, GenPrompt, Obj, Scene, WorldConfig,
                    amount, axis_name, describe, position_phrase)

MIN_SATURATION = 50.0
MAX_COLOR_DISTANCE = 120.0
MIN_AREA_FRACTION = 0.2
ASPECTS = ("object", "count", "color", "spatial")
JSON_KEYS = ASPECTS + ("score", "analysis")
EVIDENCE_KEY = "shows"  # an assessment's optional first field: evidence()
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


# ----------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------
def classify_pixels(image: np.ndarray) -> np.ndarray:
    """int [H, W]: index into COLORS of each pixel, -1 for background."""
    px = image.astype(np.float32)
    dist = np.linalg.norm(px[:, :, None, :] - _PALETTE[None, None], axis=-1)  # [H, W, colors]
    nearest, best = dist.argmin(-1), dist.min(-1)
    to_white = np.linalg.norm(px - 255.0, axis=-1)
    saturation = px.max(-1) - px.min(-1)
    background = (to_white <= best) | (saturation < MIN_SATURATION) | (best > MAX_COLOR_DISTANCE)
    return np.where(background, -1, nearest)


def components(classes: np.ndarray) -> np.ndarray:
    """int [H, W]: a component label (flat index of one of its pixels) per pixel, -1 for background.
    Pixels are connected when 8-neighbours of the same class."""
    h, w = classes.shape
    fg = classes >= 0
    big = h * w
    labels = np.where(fg, np.arange(h * w).reshape(h, w), big)
    padded_classes = np.pad(classes, 1, constant_values=-1)
    same = [fg & (padded_classes[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] == classes) for dy, dx in _NEIGHBOURS]
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        new = labels
        for (dy, dx), s in zip(_NEIGHBOURS, same):
            new = np.where(s, np.minimum(new, padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]), new)
        new = np.where(fg, new.ravel()[np.minimum(new, big - 1)], big)  # pointer jumping: a label's label
        if np.array_equal(new, labels):
            return np.where(fg, labels, -1)
        labels = new


def fitted_template(shape: str, mask: np.ndarray) -> np.ndarray:
    """bool like mask: ``shape`` with the mask's area and centroid (continuous outline; a triangle's centroid
    lies 2/3 of the way down). Unlike a bounding box, this ignores a few stray pixels."""
    ys, xs = np.nonzero(mask)
    area, cy, cx = len(ys), ys.mean() + 0.5, xs.mean() + 0.5
    size = np.sqrt({"circle": 4 / np.pi, "square": 1.0, "triangle": 2.0}[shape] * area)
    top = cy - size * (2 / 3 if shape == "triangle" else 1 / 2)
    y = (np.arange(mask.shape[0])[:, None] + 0.5 - top) / size  # 0..1 inside the shape's box
    x = (np.arange(mask.shape[1])[None, :] + 0.5 - (cx - size / 2)) / size
    if shape == "circle":
        return (2 * x - 1) ** 2 + (2 * y - 1) ** 2 <= 1
    in_box = (0 <= y) & (y <= 1) & (0 <= x) & (x <= 1)
    return in_box if shape == "square" else in_box & (np.abs(x - 0.5) <= 0.5 * y)


def classify_shape(mask: np.ndarray) -> str:
    """The shape whose fitted template overlaps the mask best (IoU)."""

    def iou(shape: str) -> float:
        t = fitted_template(shape, mask)
        return (t & mask).sum() / (t | mask).sum()

    return max(SHAPES, key=iou)


def _check_image(image, cfg: WorldConfig) -> None:
    want = (cfg.image_size, cfg.image_size, 3)
    if not isinstance(image, np.ndarray):
        raise ValueError(f"parse: expected a numpy uint8 array of shape {want}, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.shape != want:
        raise ValueError(f"parse: expected a uint8 array of shape {want}, got {image.dtype} {image.shape}")


def _cell(mask: np.ndarray, cfg: WorldConfig) -> tuple[int, int]:
    """The grid cell of the mask's centroid."""
    ys, xs = np.nonzero(mask)
    return min(int(ys.mean() // cfg.cell), cfg.grid - 1), min(int(xs.mean() // cfg.cell), cfg.grid - 1)


def object_masks(classes: np.ndarray, cfg: WorldConfig) -> list[tuple[np.ndarray, int]]:
    """(mask, color index) of each object. A foreground component (any colors) is one object of its majority
    color, unless its same-color components of the minimum area lie in different cells (touching objects of
    different colors): then each of those is one. Smaller components are dropped."""
    min_area = MIN_AREA_FRACTION * cfg.object_size ** 2
    fg_labels = components(np.where(classes >= 0, 0, -1))
    color_labels = components(classes)
    out = []
    for label in np.unique(fg_labels[fg_labels >= 0]):
        mask = fg_labels == label
        if mask.sum() < min_area:
            continue
        cores, areas = np.unique(color_labels[mask], return_counts=True)
        cores = [color_labels == c for c in cores[areas >= min_area]]
        if len({_cell(c, cfg) for c in cores}) > 1:
            out += [(c, int(classes[c][0])) for c in cores]
        else:
            out.append((mask, _majority_color(classes, mask)))
    return out


def _majority_color(classes: np.ndarray, mask: np.ndarray) -> int:
    """The most common class in the mask's interior (its pixels with all 8 neighbours in it, when there are
    any): blurred or anti-aliased edges, mixed with white, drift toward lighter palette colors."""
    h, w = mask.shape
    padded = np.pad(mask, 1)
    interior = mask.copy()
    for dy, dx in _NEIGHBOURS:
        interior &= padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
    return int(np.bincount(classes[interior if interior.any() else mask]).argmax())


def parse(image: np.ndarray, cfg: WorldConfig = WorldConfig()) -> Scene:
    """The scene an RGB image shows (see the module docstring for the method)."""
    _check_image(image, cfg)
    best: dict[tuple[int, int], tuple[int, Obj]] = {}
    for mask, color in object_masks(classify_pixels(image), cfg):
        cell, area = _cell(mask, cfg), int(mask.sum())
        if cell not in best or area > best[cell][0]:
            best[cell] = (area, Obj(*cell, classify_shape(mask), list(COLORS)[color]))
    return Scene(tuple(obj for _, obj in best.values()))


# ----------------------------------------------------------------------------------------------------
# Checking prompts, answers and edits
# ----------------------------------------------------------------------------------------------------
def _relation_holds(scene: Scene, relation: str, shape_a: str, shape_b: str) -> bool:
    holds = RELATIONS[relation][1]
    return any(holds(a, b) for a in scene.find(shape=shape_a) for b in scene.find(shape=shape_b) if a != b)


def check_prompt(prompt: GenPrompt, scene: Scene) -> dict[str, bool | None]:
    """aspect -> verdict (None: the prompt does not test it). See GenPrompt for the spec format."""
    if prompt.category == "full":
        want = Scene(prompt.spec)
        shapes = lambda s: Counter(o.shape for o in s.objects)  # noqa: E731
        labels = lambda s: Counter(o.label for o in s.objects)  # noqa: E731
        return {"object": shapes(scene) == shapes(want), "count": len(scene.objects) == len(want.objects),
                "color": labels(scene) == labels(want), "spatial": scene == want}
    items, relation = prompt.spec
    need = Counter()
    for shape, _, n in items:
        need[shape] += 1 if prompt.category == "counting" else n
    colored = [(s, c, n) for s, c, n in items if c is not None]
    return {
        "object": all(scene.count(shape=s) >= n for s, n in need.items()),
        "count": all(scene.count(shape=s) == n for s, _, n in items) if prompt.category == "counting" else None,
        "color": all(scene.count(s, c) >= n for s, c, n in colored) if colored else None,
        "spatial": _relation_holds(scene, relation, items[0][0], items[1][0]) if relation else None,
    }


def prompt_satisfied(prompt: GenPrompt, scene: Scene) -> bool:
    return all(v is not False for v in check_prompt(prompt, scene).values())


def normalize_answer(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".").strip()


def answer_correct(qa: QA, answer: str) -> bool:
    return normalize_answer(answer) == normalize_answer(qa.answer)


def edit_correct(edit: Edit, scene: Scene) -> bool:
    return scene == edit.target


# ----------------------------------------------------------------------------------------------------
# Self-assessment
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Assessment:
    object: bool | None
    count: bool | None
    color: bool | None
    spatial: bool | None
    analysis: str

    def verdicts(self) -> tuple[bool | None, ...]:
        return tuple(getattr(self, a) for a in ASPECTS)

    @property
    def score(self) -> float:
        applicable = [v for v in self.verdicts() if v is not None]
        return sum(applicable) / len(applicable) if applicable else 1.0

    @property
    def good(self) -> bool:
        return all(v is not False for v in self.verdicts())


def _shows(objs: list[Obj], shape: str, with_color: bool = False, with_position: bool = False) -> str:
    """What the image shows of one shape: "no circles", "two circles", "a red circle and a blue circle"."""
    if not objs or not (with_color or with_position):
        return amount(len(objs), shape, numeral=True)
    return " and ".join(f"{amount(1, o.shape, o.color if with_color else None)}"
                        + (f" {position_phrase(o.row, o.col)}" if with_position else "") for o in objs)


def _analysis(prompt: GenPrompt, scene: Scene, verdicts: dict[str, bool | None]) -> str:
    if all(v is not False for v in verdicts.values()):
        return f"the image shows {describe(scene)}."
    if prompt.category == "full":
        return f"the image shows {describe(scene)}, the prompt asks for {describe(Scene(prompt.spec))}."
    items, relation = prompt.spec
    counting = prompt.category == "counting"
    problems = []
    for shape, color, n in items:
        have = scene.find(shape=shape)
        asked = amount(n, shape, color, numeral=counting)
        if not have or (counting and len(have) != n):
            problems.append(f"the image shows {_shows(have, shape)}, the prompt asks for {asked}.")
        elif color and scene.count(shape, color) < n:
            problems.append(f"the image shows {_shows(have, shape, with_color=True)}, the prompt asks for {asked}.")
    if not problems and relation and not verdicts["spatial"]:
        (a, _, _), (b, _, _) = items
        shown = " and ".join(_shows(scene.find(shape=s), s, with_position=True) for s in (a, b))
        problems.append(f"the image shows {shown}, the prompt asks for "
                        f"{amount(1, a)} {RELATIONS[relation][0]} {amount(1, b)}.")
    return " ".join(problems)


def assess(prompt: GenPrompt, scene: Scene) -> Assessment:
    """The evaluator's verdict on ``scene`` (usually parse(generated image)) for ``prompt``."""
    verdicts = check_prompt(prompt, scene)
    return Assessment(**verdicts, analysis=_analysis(prompt, scene, verdicts))


_WORD = {True: "yes", False: "no", None: "n/a"}
_VERDICT = {v: k for k, v in _WORD.items()}


def evidence(prompt: GenPrompt, scene: Scene, axis: bool = False) -> str:
    """What ``scene`` holds of what ``prompt`` names, e.g. "circle: red, blue; square: nothing; green square: no":
    the optional first field ("shows") of an assessment. First the colors of each shape the prompt names, in the
    prompt's order ("nothing" where it is absent); then, for each colored object the prompt asks for, whether
    the scene has one ("yes" / "no"). Each part is a lookup the model already does for questions ("what color is
    the circle?", "is there a green square?"), and the verdicts can then be read off the text before them
    (docs/nano.md, "Stating the evidence first"). Without the second part the color verdict had to compare the
    prompt's color word with the stated one, and stayed at 0.55-0.60 on wrong images. Every word is one token
    of the nano vocabulary ("none" was not: it encoded as "no" "n" "e", its first token the verdict "no").

    With ``axis``, a prompt that places its objects ("a circle above a square") gets, instead of each shape's
    colors, where each object of that shape lies along the relation's axis (world.axis_name), e.g. "circle:
    top; square: middle, bottom": the spatial verdict then compares words of its own evidence, the comparison
    the axis-first relation answers teach (world.axis_first)."""
    items = [(o.shape, o.color) for o in prompt.spec] if prompt.category == "full" else \
        [(s, c) for s, c, _ in prompt.spec[0]]
    relation = prompt.spec[1] if axis and prompt.category != "full" else None
    word = (lambda o: axis_name(o, relation)) if relation else (lambda o: o.color)
    shapes = [f"{s}: " + (", ".join(word(o) for o in scene.find(shape=s)) or "nothing")
              for s in dict.fromkeys(s for s, _ in items)]
    colored = [f"{c} {s}: {'yes' if scene.count(s, c) else 'no'}" for s, c in dict.fromkeys(items) if c]
    return "; ".join(shapes + colored)


def assessment_to_json(a: Assessment, shows: str | None = None) -> str:
    """The assessment as JSON; with ``shows`` (``evidence(...)``) that field comes first."""
    doc = {k: _WORD[v] for k, v in zip(ASPECTS, a.verdicts())}
    head = {} if shows is None else {EVIDENCE_KEY: shows}
    return json.dumps({**head, **doc, "score": f"{a.score:.2f}", "analysis": a.analysis})


def assessment_from_json(text: str) -> Assessment | None:
    """The Assessment a JSON text states, or None unless it has exactly the keys of ``assessment_to_json``
    in order (the evidence field first or not at all), string values, verdicts yes/no/n/a and the score those
    verdicts give. Never raises."""
    try:
        doc = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
        return None
    keys = tuple(doc)
    if keys[1:] == JSON_KEYS and keys[0] == EVIDENCE_KEY:
        keys = keys[1:]
    if keys != JSON_KEYS:
        return None
    if not all(doc[k] in _VERDICT for k in ASPECTS) or not re.fullmatch(r"[01]\.\d\d", doc["score"]):
        return None
    a = Assessment(*(_VERDICT[doc[k]] for k in ASPECTS), analysis=doc["analysis"])
    return a if f"{a.score:.2f}" == doc["score"] else None


def assessment_agreement(model: Assessment | None, truth: Assessment) -> bool:
    """The four aspect verdicts agree ("n/a" must match "n/a"); an unparsable model verdict (None) never agrees."""
    return model is not None and model.verdicts() == truth.verdicts()


# ----------------------------------------------------------------------------------------------------
# Aggregates
# ----------------------------------------------------------------------------------------------------
def accuracy_by(kinds_correct: Iterable[tuple[str, bool]], macro: bool = False,
                overall_over: tuple[str, ...] | None = None) -> dict[str, float]:
    """kind -> accuracy, plus "overall": over all items (micro) or the mean over kinds (macro), the kinds
    restricted to ``overall_over`` where given."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for kind, ok in kinds_correct:
        hits[kind].append(bool(ok))
    out = {k: float(np.mean(v)) for k, v in hits.items()}
    kinds = [k for k in hits if overall_over is None or k in overall_over]
    if kinds:
        out["overall"] = (float(np.mean([out[k] for k in kinds])) if macro
                          else float(np.mean([ok for k in kinds for ok in hits[k]])))
    return out


def understanding_scores(results: Iterable[tuple[QA, str]]) -> dict[str, float]:
    """(question, model answer) pairs -> accuracy per QA kind and overall (over all questions)."""
    return accuracy_by((qa.kind, answer_correct(qa, ans)) for qa, ans in results)


def generation_scores(results: Iterable[tuple[GenPrompt, Scene]]) -> dict[str, float]:
    """(prompt, parsed generated scene) pairs -> accuracy per category; "overall" is the mean over the
    GenEval categories present (as GenEval reports it), "full" prompts scored but left out of it."""
    return accuracy_by(((p.category, prompt_satisfied(p, s)) for p, s in results), macro=True,
                       overall_over=GEN_CATEGORIES)


def generation_failures(results: Iterable[tuple[GenPrompt, Scene]]) -> dict[str, dict[str, float]]:
    """(prompt, parsed generated scene) pairs -> per GenEval category, the share of samples whose check_prompt
    verdict on each aspect the category tests is False. "object": a shape the prompt names is missing (e.g. one
    object drawn for a two-object position prompt); "spatial": the pair is not in place, a missing shape included,
    so spatial - object is the share drawn both and misplaced them."""
    fails: dict[str, dict[str, list[bool]]] = {}
    for p, s in results:
        if p.category == "full":
            continue
        for aspect, verdict in check_prompt(p, s).items():
            if verdict is not None:
                fails.setdefault(p.category, {}).setdefault(aspect, []).append(verdict is False)
    return {c: {a: float(np.mean(v)) for a, v in by.items()} for c, by in sorted(fails.items())}


def editing_scores(results: Iterable[tuple[Edit, Scene]]) -> dict[str, float]:
    """(edit, parsed edited scene) pairs -> accuracy per edit kind and overall (over all edits)."""
    return accuracy_by((e.kind, edit_correct(e, s)) for e, s in results)


def editing_failures(results: Iterable[tuple[Edit, Scene]]) -> dict[str, dict[str, float]]:
    """(edit, parsed edited scene) pairs -> per edit kind, the share of edits whose output
    "unchanged": is the source scene itself; "missed": lacks what the edit makes (the recolored, moved or added
    object) or still holds what it takes away (the removed object, the old color or place); "collateral": lost or
    changed an object the edit leaves alone. An output can miss and be collateral at once (the wrong object
    recolored); an unchanged one misses."""
    fails: dict[str, dict[str, list[bool]]] = {}
    for e, out in results:
        src, tgt, got = set(e.source.objects), set(e.target.objects), set(out.objects)
        made, taken, kept = tgt - src, src - tgt, src & tgt
        by = fails.setdefault(e.kind, {"unchanged": [], "missed": [], "collateral": []})
        by["unchanged"].append(out == e.source)
        by["missed"].append(bool(made - got or taken & got))
        by["collateral"].append(bool(kept - got))
    return {k: {a: float(np.mean(v)) for a, v in by.items()} for k, by in sorted(fails.items())}


def assessment_scores(results: Iterable[tuple[str, Assessment]]) -> dict:
    """(model's assessment text, evaluator's Assessment) -> "valid" (parsable rate), "agreement" (all four
    verdicts agree) and "by_aspect": per aspect, over the valid assessments, "agree" (the verdicts match, "n/a"
    included), "missed" (the evaluator says no, the model yes or n/a: a fault passed) and "false_alarm" (the
    evaluator says yes or n/a, the model no), each a share of the valid assessments, so that agree + missed +
    false_alarm + the n/a confusions = 1."""
    parsed = [(assessment_from_json(text), truth) for text, truth in results]
    if not parsed:
        return {}
    out: dict = {"valid": float(np.mean([m is not None for m, _ in parsed])),
                 "agreement": float(np.mean([assessment_agreement(m, t) for m, t in parsed]))}
    valid = [(m, t) for m, t in parsed if m is not None]
    if valid:
        out["by_aspect"] = {a: {"agree": float(np.mean([getattr(m, a) == getattr(t, a) for m, t in valid])),
                                "missed": float(np.mean([getattr(t, a) is False and getattr(m, a) is not False
                                                         for m, t in valid])),
                                "false_alarm": float(np.mean([getattr(t, a) is not False and getattr(m, a) is False
                                                              for m, t in valid]))}
                            for a in ASPECTS}
    return out
