"""The "shapes" world of ILLUME-nano: scene graphs, rendering and every text the model reads or writes.

Conventions
- A scene is a 3x3 grid of cells with at most one object per cell; an object is a (shape, color) drawn
  centered in its cell, ``object_size`` px wide and tall, with hard edges and exact palette colors on a
  white background (no anti-aliasing), so the truth of any rendered image is known exactly.
- Rows 0..2 are top/middle/bottom, cols 0..2 left/center/right; ``Scene.objects`` is kept sorted by
  (row, col). Triangles are isosceles, apex up, base at the bottom of the object's box.
- An object is *referable* ("the red circle") only when its color+shape is unique in the scene; questions,
  prompts and edits only ever refer to referable objects, so every sentence is unambiguous.
- "left"/"right" compare columns and "above"/"below" compare rows, strictly. Position names ("top left",
  "left", "center", ...) always name a cell of the grid, never a relative direction.
- Held-out split: a scene is held out when crc32(scene.key()) % heldout_mod == 0 (stable across runs);
  "train" samplers never return one (edits: neither the source nor the target).
- Texts: lowercase words, digits and the punctuation in ``PUNCTUATION``. ``words(text)`` splits a text into
  the units ``vocabulary()`` lists (letter runs, single digits, single punctuation characters). The
  evaluator's self-assessment JSON (``{"count": "n/a", "score": "0.50", ...}``) also needs "/".
- Randomness always comes from a ``numpy.random.Generator`` passed in (``np.random.default_rng(seed)``).
"""
from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (140, 60, 190), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "center", "right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# relation -> (phrase, holds(a, b)) ; strict comparisons of grid cells
RELATIONS = {
    "left": ("to the left of", lambda a, b: a.col < b.col),
    "right": ("to the right of", lambda a, b: a.col > b.col),
    "above": ("above", lambda a, b: a.row < b.row),
    "below": ("below", lambda a, b: a.row > b.row),
}
SPLITS = ("train", "heldout")
QA_KINDS = ("color", "shape", "count", "exist", "position", "relation", "describe")
GEN_CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
EDIT_KINDS = ("recolor", "remove", "add", "move")
PUNCTUATION = ',.?:"{}-/'
MAX_SAMPLING_TRIES = 10_000
# every word a template can produce, besides colors, shapes, plurals, number words and position words
TEMPLATE_WORDS = (
    "a an and at the in on nothing what color is shape object objects how many are there where to of "
    "above below yes no describe image make remove add move "
    # the evaluator's self-assessment: JSON keys, "n/a" and its analysis sentences
    "count spatial score analysis n shows prompt asks for"
).split()


@dataclass(frozen=True)
class WorldConfig:
    image_size: int = 48
    grid: int = 3
    object_size: int = 12
    min_objects: int = 1
    max_objects: int = 3
    heldout_mod: int = 10

    def __post_init__(self):
        if self.grid != len(ROW_NAMES):
            raise ValueError(f"grid: positions are named for a {len(ROW_NAMES)}x{len(ROW_NAMES)} grid, got {self.grid}")
        if not 4 <= self.object_size <= self.cell:
            raise ValueError(f"object_size: expected 4..{self.cell} (the cell size), got {self.object_size}")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid ** 2:
            raise ValueError(f"expected 1 <= min_objects <= max_objects <= {self.grid ** 2}, "
                             f"got {self.min_objects}, {self.max_objects}")
        if self.heldout_mod < 2:
            raise ValueError(f"heldout_mod: expected >= 2, got {self.heldout_mod}")

    @property
    def cell(self) -> int:
        return self.image_size // self.grid


def position_name(row: int, col: int) -> str:
    """(0, 0) "top left", (0, 1) "top", (1, 1) "center", (1, 0) "left", (2, 2) "bottom right", ..."""
    if row == 1 and col == 1:
        return "center"
    return " ".join(n for n in (ROW_NAMES[row] if row != 1 else "", COL_NAMES[col] if col != 1 else "") if n)


def position_phrase(row: int, col: int) -> str:
    """"at the top left", "on the left", "in the center", "at the bottom", ..."""
    name = position_name(row, col)
    prep = "in" if name == "center" else "on" if name in ("left", "right") else "at"
    return f"{prep} the {name}"


@dataclass(frozen=True, order=True)
class Obj:
    row: int
    col: int
    shape: str
    color: str

    def __post_init__(self):
        for field, value in (("row", self.row), ("col", self.col)):
            if not isinstance(value, (int, np.integer)) or not 0 <= value < len(ROW_NAMES):
                raise ValueError(f"{field}: expected an int in 0..{len(ROW_NAMES) - 1}, got {value!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}: expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}: expected one of {tuple(COLORS)}")
        object.__setattr__(self, "row", int(self.row))
        object.__setattr__(self, "col", int(self.col))

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]

    def __post_init__(self):
        for o in self.objects:
            if not isinstance(o, Obj):
                raise ValueError(f"Scene.objects: expected Obj items, got {type(o).__name__}")
        objects = tuple(sorted(self.objects))
        cells = [(o.row, o.col) for o in objects]
        if len(set(cells)) != len(cells):
            dup = next(c for c in cells if cells.count(c) > 1)
            raise ValueError(f"two objects in cell {dup}: expected at most one object per cell")
        object.__setattr__(self, "objects", objects)

    def key(self) -> str:
        """Canonical string, e.g. "00:red circle;11:blue square" ("" for an empty scene)."""
        return ";".join(f"{o.row}{o.col}:{o.label}" for o in self.objects)

    def find(self, shape: str | None = None, color: str | None = None) -> list[Obj]:
        return [o for o in self.objects if shape in (None, o.shape) and color in (None, o.color)]

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        return len(self.find(shape, color))

    def referable(self) -> list[Obj]:
        """Objects whose color+shape is unique in the scene (those "the {color} {shape}" names)."""
        return [o for o in self.objects if self.count(o.shape, o.color) == 1]

    def free_cells(self) -> list[tuple[int, int]]:
        taken = {(o.row, o.col) for o in self.objects}
        n = len(ROW_NAMES)
        return [(r, c) for r in range(n) for c in range(n) if (r, c) not in taken]


# ----------------------------------------------------------------------------------------------------
# Sampling and the held-out split
# ----------------------------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, seq):
    seq = list(seq)
    return seq[int(rng.integers(len(seq)))]


def is_heldout(scene: Scene, cfg: WorldConfig = WorldConfig()) -> bool:
    return zlib.crc32(scene.key().encode()) % cfg.heldout_mod == 0


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")


def _random_scene(rng: np.random.Generator, cfg: WorldConfig, n: int) -> Scene:
    cells = rng.choice(cfg.grid ** 2, size=n, replace=False)
    return Scene(tuple(Obj(int(i) // cfg.grid, int(i) % cfg.grid, _pick(rng, SHAPES), _pick(rng, COLORS))
                       for i in cells))


def sample_scene(rng: np.random.Generator, cfg: WorldConfig = WorldConfig(), split: str = "train",
                 n_objects: int | None = None) -> Scene:
    """A random scene of ``split``: uniform object count (unless given), distinct cells, uniform shape/color."""
    _check_split(split)
    if n_objects is not None and not 1 <= n_objects <= cfg.grid ** 2:
        raise ValueError(f"n_objects: expected 1..{cfg.grid ** 2}, got {n_objects}")
    for _ in range(MAX_SAMPLING_TRIES):
        n = n_objects if n_objects is not None else int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        scene = _random_scene(rng, cfg, n)
        if is_heldout(scene, cfg) == (split == "heldout"):
            return scene
    raise RuntimeError(f"no {split} scene with n_objects={n_objects} in {MAX_SAMPLING_TRIES} draws")


def heldout_scenes(n: int, cfg: WorldConfig = WorldConfig(), seed: int = 1234) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, cfg, "heldout") for _ in range(n)]


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------
def shape_mask(shape: str, height: int, width: int | None = None) -> np.ndarray:
    """bool [height, width]: the shape filling its box (pixel centers inside the ideal outline)."""
    width = height if width is None else width
    y = (np.arange(height)[:, None] + 0.5) / height  # 0..1, top to bottom
    x = (np.arange(width)[None, :] + 0.5) / width
    if shape == "circle":
        return (2 * x - 1) ** 2 + (2 * y - 1) ** 2 <= 1.0
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "triangle":  # half-width grows linearly from the apex (top) to the full base (bottom row)
        row_end = (np.arange(height)[:, None] + 1) / height
        return np.abs(x - 0.5) <= 0.5 * row_end
    raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES}")


def render(scene: Scene, cfg: WorldConfig = WorldConfig()) -> np.ndarray:
    """uint8 [image_size, image_size, 3]: exact palette colors on white, hard edges."""
    s, cell = cfg.object_size, cfg.cell
    img = np.empty((cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for o in scene.objects:
        y0, x0 = o.row * cell + (cell - s) // 2, o.col * cell + (cell - s) // 2
        img[y0:y0 + s, x0:x0 + s][shape_mask(o.shape, s)] = COLORS[o.color]
    return img


# ----------------------------------------------------------------------------------------------------
# Texts
# ----------------------------------------------------------------------------------------------------
def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    return shape + "s"


def amount(n: int, noun: str, color: str | None = None, numeral: bool = False) -> str:
    """"a circle", "an orange square", "two red circles", "no triangles"; numeral: "one circle"."""
    words = f"{color} {noun}" if color else noun
    if n == 1:
        return f"{'one' if numeral else article(words)} {words}"
    return f"{'no' if n == 0 else NUMBER_WORDS[n]} {words}s"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe_first(scene: Scene, qa: QA) -> QA:
    """`qa` answered after the scene's description: "<description>. <answer>" (the model writes what it sees,
    then answers from its own words; PromptTemplates.answer_separator ". "); a describe question as it is."""
    if qa.kind == "describe":
        return qa
    return QA(qa.kind, qa.question, f"{describe(scene)}. {qa.answer}")


def named_object(scene: Scene, name: str) -> Obj:
    """The one object of `scene` that `name` refers to, as the questions name objects: "the red circle",
    "the circle" (the only circle), "the red object" (the only red one)."""
    words = name.split()
    if len(words) == 3 and words[0] == "the":
        found = scene.find(shape=None if words[2] == "object" else words[2], color=words[1])
    elif len(words) == 2 and words[0] == "the":
        found = scene.find(shape=words[1])
    else:
        raise ValueError(f"named_object: expected 'the <color> <shape>', 'the <shape>' or 'the <color> object', "
                         f"got {name!r}")
    if len(found) != 1:
        raise ValueError(f"named_object: {name!r} names {len(found)} objects of scene {scene.key()!r}, expected 1")
    return found[0]


_RELATION_QUESTION = re.compile(r"is (the .+?) (%s) (the .+)\?" % "|".join(re.escape(p) for p, _ in RELATIONS.values()))


def _relation_match(qa: QA, caller: str) -> re.Match:
    """A relation question's parts: group 1 the first object's name, 2 the relation's phrase, 3 the second's."""
    m = _RELATION_QUESTION.fullmatch(qa.question)
    if m is None:
        raise ValueError(f"{caller}: relation question {qa.question!r} does not match {_RELATION_QUESTION.pattern!r}")
    return m


def positions_first(scene: Scene, qa: QA) -> QA:
    """A relation question answered after the two objects' positions: "is the red circle above the blue
    square?" -> "top left, bottom. yes" (PromptTemplates.answer_separator ". "). The model writes where each
    object is, the skill of the position questions, then compares its own two words. Other kinds as they are."""
    if qa.kind != "relation":
        return qa
    m = _relation_match(qa, "positions_first")
    a, b = named_object(scene, m.group(1)), named_object(scene, m.group(3))
    return QA(qa.kind, qa.question, f"{position_name(a.row, a.col)}, {position_name(b.row, b.col)}. {qa.answer}")


def winner_first(scene: Scene, qa: QA) -> QA:
    """A relation question answered after naming which of its two objects lies further the asked way: "is the
    red circle above the blue square?" -> "the red circle. yes" (the blue square, were it higher: "the blue
    square. no"); the yes / no then says whether the named object is the first one asked about. Meant as a
    first step the model could take alone (pick, among the two, the object further along the axis); measured,
    it copies both names from the question and picks at chance (docs/nano.md, "Relation, one axis at a
    time"). Other kinds as they are."""
    if qa.kind != "relation":
        return qa
    m = _relation_match(qa, "winner_first")
    named_object(scene, m.group(1)), named_object(scene, m.group(3))  # both must name one object of the scene
    return QA(qa.kind, qa.question, f"{m.group(1) if qa.answer == 'yes' else m.group(3)}. {qa.answer}")


def axis_first(scene: Scene, qa: QA) -> QA:
    """A relation question answered after where its two objects lie along the asked axis: "is the red circle
    above the blue square?" -> "top, bottom. yes"; "... to the left of ..." -> "left, center. no" (ROW_NAMES for
    above / below, COL_NAMES for left / right). Each word is a copy of one coordinate of one looked-up object,
    and the yes / no then compares two words from a three-word order right before it. Other kinds as they are."""
    return _placed_relation(scene, qa, "axis_first", named=False)


def named_axis(scene: Scene, qa: QA) -> QA:
    """`axis_first` with each place after the name of its object, as the question words it: "is the red circle
    above the blue square?" -> "the red circle top, the blue square bottom. yes". Each place is then predicted
    right after the words that say which object to look up (copied from the question), as in a position
    question's "where is the red circle?" -> "top left", instead of after the other object's place. Other kinds
    as they are."""
    return _placed_relation(scene, qa, "named_axis", named=True)


_RELATION_OF_PHRASE = {phrase: relation for relation, (phrase, _) in RELATIONS.items()}  # "above" -> "above"


def _placed_relation(scene: Scene, qa: QA, caller: str, named: bool) -> QA:
    """A relation answer after both objects' places along the asked axis, each after its name if `named`."""
    if qa.kind != "relation":
        return qa
    m = _relation_match(qa, caller)
    relation = _RELATION_OF_PHRASE[m.group(2)]
    places = [axis_name(named_object(scene, m.group(g)), relation) for g in (1, 3)]
    if named:
        places = [f"{m.group(g)} {place}" for g, place in zip((1, 3), places)]
    return QA(qa.kind, qa.question, f"{places[0]}, {places[1]}. {qa.answer}")


def axis_name(o: Obj, relation: str) -> str:
    """Where ``o`` lies along ``relation``'s axis (a RELATIONS key): its row's name for above / below ("top"), its
    column's for left / right ("center")."""
    if relation not in RELATIONS:
        raise ValueError(f"axis_name: expected a relation among {list(RELATIONS)}, got {relation!r}")
    return ROW_NAMES[o.row] if relation in ("above", "below") else COL_NAMES[o.col]


def describe(scene: Scene) -> str:
    """"a red circle at the top left, a blue square in the center and a green triangle at the bottom right"."""
    if not scene.objects:
        return "nothing"
    return _join([f"{amount(1, o.shape, o.color)} {position_phrase(o.row, o.col)}" for o in scene.objects])


DESCRIBE_QUESTION = "describe the image."


_PHRASE_CELLS = {position_phrase(r, c): (r, c) for r in range(len(ROW_NAMES)) for c in range(len(COL_NAMES))}
# "a|an <color> <shape> <position phrase>", the longest phrase first ("at the top left" before "at the top")
_OBJECT_PHRASE = re.compile(r"\b(?:a|an) (" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r") ("
                            + "|".join(sorted(map(re.escape, _PHRASE_CELLS), key=len, reverse=True)) + r")\b")


def parse_description(text: str) -> Scene | None:
    """The scene a `describe` text states ("a red circle at the top left, ... and a green triangle in the
    center"): the inverse of `describe`. None when no object phrase is found or two share a cell."""
    objects = [Obj(*_PHRASE_CELLS[where], shape, color) for color, shape, where in _OBJECT_PHRASE.findall(text)]
    if not objects:
        return None
    try:
        return Scene(tuple(objects))
    except ValueError:  # two objects in one cell
        return None


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str


def _relation_question(scene: Scene, rng: np.random.Generator) -> QA | None:
    """Pairs of referable objects that differ along the relation's axis; yes/no drawn 50/50 first."""
    refs = scene.referable()
    cands = [(a, b, r) for a in refs for b in refs if a != b for r in RELATIONS
             if (a.col != b.col if r in ("left", "right") else a.row != b.row)]
    if not cands:
        return None
    want = bool(rng.random() < 0.5)  # the two orders of a pair always give one yes and one no
    a, b, r = _pick(rng, [c for c in cands if RELATIONS[c[2]][1](c[0], c[1]) == want])
    return QA("relation", f"is the {a.label} {RELATIONS[r][0]} the {b.label}?", "yes" if want else "no")


def make_qa(scene: Scene, rng: np.random.Generator, kind: str) -> QA | None:
    """One question of ``kind`` about ``scene`` with its answer; None if it cannot be asked unambiguously."""
    if kind == "color":
        shapes = [s for s in SHAPES if scene.count(shape=s) == 1]
        if not shapes:
            return None
        s = _pick(rng, shapes)
        return QA(kind, f"what color is the {s}?", scene.find(shape=s)[0].color)
    if kind == "shape":
        colors = [c for c in COLORS if scene.count(color=c) == 1]
        if not colors:
            return None
        c = _pick(rng, colors)
        return QA(kind, f"what shape is the {c} object?", scene.find(color=c)[0].shape)
    if kind == "count":
        variant = int(rng.integers(3))
        if variant == 0:
            return QA(kind, "how many objects are there?", NUMBER_WORDS[len(scene.objects)])
        present = bool(scene.objects) and rng.random() < 0.5  # half the time ask about something in the image
        if variant == 1:
            c = _pick(rng, [o.color for o in scene.objects] if present else COLORS)
            return QA(kind, f"how many {c} objects are there?", NUMBER_WORDS[scene.count(color=c)])
        s = _pick(rng, [o.shape for o in scene.objects] if present else SHAPES)
        return QA(kind, f"how many {plural(s)} are there?", NUMBER_WORDS[scene.count(shape=s)])
    if kind == "exist":
        present = {(o.shape, o.color) for o in scene.objects}
        absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
        yes = bool(present) and (not absent or rng.random() < 0.5)
        s, c = _pick(rng, sorted(present) if yes else absent)
        return QA(kind, f"is there {amount(1, s, c)}?", "yes" if yes else "no")
    if kind == "position":
        refs = scene.referable()
        if not refs:
            return None
        o = _pick(rng, refs)
        return QA(kind, f"where is the {o.label}?", position_name(o.row, o.col))
    if kind == "relation":
        return _relation_question(scene, rng)
    if kind == "describe":
        return QA(kind, DESCRIBE_QUESTION, describe(scene)) if scene.objects else None
    raise ValueError(f"unknown QA kind {kind!r}: expected one of {QA_KINDS}")


SCAFFOLD_KINDS = ("exist", "relation", "position")


def scaffold_qa(scene: Scene, rng: np.random.Generator, kind: str) -> QA | None:
    """A one-attribute version of an exist / relation / position question (training curriculum, never
    evaluated): "is there a red object?", "is there a circle?", "is the circle above the square?",
    "where is the red object?". Objects are named by one attribute only where that names one object.
    The conjunctive questions of `make_qa` ("is there a red circle?") carry no signal that either the
    question or the image alone predicts; these do, and the model learns the conjunction from them."""
    if kind == "exist":
        attr = "color" if rng.random() < 0.5 else "shape"
        pool = COLORS if attr == "color" else SHAPES
        present = sorted({getattr(o, attr) for o in scene.objects})
        yes = bool(present) and rng.random() < 0.5
        absent = [v for v in pool if v not in present]
        if not yes and not absent:
            return None
        v = _pick(rng, present if yes else absent)
        text = amount(1, "object", v) if attr == "color" else amount(1, v)
        return QA(kind, f"is there {text}?", "yes" if yes else "no")
    unique = [(o, f"the {o.shape}") for o in scene.objects if scene.count(shape=o.shape) == 1] + \
             [(o, f"the {o.color} object") for o in scene.objects if scene.count(color=o.color) == 1]
    if kind == "position":
        if not unique:
            return None
        o, name = unique[int(rng.integers(len(unique)))]
        return QA(kind, f"where is {name}?", position_name(o.row, o.col))
    if kind == "relation":
        cands = [(a, na, b, nb, r) for a, na in unique for b, nb in unique if a != b for r in RELATIONS
                 if (a.col != b.col if r in ("left", "right") else a.row != b.row)]
        if not cands:
            return None
        want = bool(rng.random() < 0.5)
        a, na, b, nb, r = _pick(rng, [c for c in cands if RELATIONS[c[4]][1](c[0], c[2]) == want])
        return QA(kind, f"is {na} {RELATIONS[r][0]} {nb}?", "yes" if want else "no")
    raise ValueError(f"scaffold_qa: unknown kind {kind!r}: expected one of {SCAFFOLD_KINDS}")


def qa_pairs(scene: Scene, rng: np.random.Generator) -> list[QA]:
    return [qa for qa in (make_qa(scene, rng, k) for k in QA_KINDS) if qa is not None]


@dataclass(frozen=True)
class GenPrompt:
    """A text-to-image prompt. ``spec`` for the GenEval categories is ``(items, relation)``:
    items = ((shape, color | None, n), ...), each "at least n objects of that shape (and color)", except
    "counting" where n is the exact number of that shape; relation = None or "left" | "right" | "above" |
    "below", meaning "some items[0] object <relation> some items[1] object". For "full", spec is the exact
    scene's ``objects`` tuple."""
    category: str
    text: str
    spec: tuple


def full_prompt(scene: Scene) -> GenPrompt:
    return GenPrompt("full", describe(scene), scene.objects)


def _unique_shape_objects(scene: Scene) -> list[Obj]:
    return [o for o in scene.objects if scene.count(shape=o.shape) == 1]


def gen_prompt_for(scene: Scene, rng: np.random.Generator, category: str) -> GenPrompt | None:
    """A prompt of ``category`` that is true of ``scene`` (None if the scene cannot support one)."""
    shapes = sorted({o.shape for o in scene.objects})
    if category == "full":
        return full_prompt(scene)
    if not scene.objects:
        return None
    if category == "single_object":
        s = _pick(rng, shapes)
        return GenPrompt(category, amount(1, s), (((s, None, 1),), None))
    if category == "counting":
        s = _pick(rng, shapes)
        n = scene.count(shape=s)
        return GenPrompt(category, amount(n, s, numeral=True),
                         (((s, None, n),), None))
    if category == "colors":
        o = _pick(rng, scene.objects)
        return GenPrompt(category, amount(1, o.shape, o.color), (((o.shape, o.color, 1),), None))
    if category == "two_object":
        if len(shapes) < 2:
            return None
        s1, s2 = (shapes[i] for i in rng.permutation(len(shapes))[:2])
        return GenPrompt(category, f"{amount(1, s1)} and {amount(1, s2)}", (((s1, None, 1), (s2, None, 1)), None))
    if category == "position":
        cands = [(a, b, r) for a in _unique_shape_objects(scene) for b in _unique_shape_objects(scene)
                 if a != b for r in RELATIONS if RELATIONS[r][1](a, b)]
        if not cands:
            return None
        a, b, r = _pick(rng, cands)
        return GenPrompt(category, f"{amount(1, a.shape)} {RELATIONS[r][0]} {amount(1, b.shape)}",
                         (((a.shape, None, 1), (b.shape, None, 1)), r))
    if category == "color_attr":
        if len(shapes) < 2:
            return None
        a = _pick(rng, scene.objects)
        b = _pick(rng, [o for o in scene.objects if o.shape != a.shape])
        return GenPrompt(category, f"{amount(1, a.shape, a.color)} and {amount(1, b.shape, b.color)}",
                         (((a.shape, a.color, 1), (b.shape, b.color, 1)), None))
    raise ValueError(f"unknown generation category {category!r}: expected one of {GEN_CATEGORIES} or 'full'")


def sample_gen_prompt(rng: np.random.Generator, cfg: WorldConfig = WorldConfig(), category: str = "full",
                      split: str = "train") -> tuple[GenPrompt, Scene]:
    """A scene of ``split`` and a prompt of ``category`` true of it (extra objects allowed, as in GenEval)."""
    for _ in range(MAX_SAMPLING_TRIES):
        scene = sample_scene(rng, cfg, split)
        prompt = gen_prompt_for(scene, rng, category)
        if prompt is not None:
            return prompt, scene
    raise RuntimeError(f"no {category} prompt for {split} scenes in {MAX_SAMPLING_TRIES} draws")


def sample_qa(rng: np.random.Generator, cfg: WorldConfig = WorldConfig(), kinds: Sequence[str] = QA_KINDS,
              split: str = "train") -> tuple[Scene, QA]:
    """A ``split`` scene and a question about it, its kind drawn from ``kinds`` on each try (a scene that cannot
    pose the kind drawn, e.g. a relation with one object, is drawn again)."""
    for _ in range(MAX_SAMPLING_TRIES):
        scene = sample_scene(rng, cfg, split)
        qa = make_qa(scene, rng, str(rng.choice(kinds)))
        if qa is not None:
            return scene, qa
    raise RuntimeError(f"no {split} scene posing a question of {list(kinds)} in {MAX_SAMPLING_TRIES} draws")


@dataclass(frozen=True)
class Edit:
    kind: str
    instruction: str
    source: Scene
    target: Scene


def _swap(scene: Scene, old: Obj, new: Obj | None) -> Scene:
    return Scene(tuple(o for o in scene.objects if o != old) + ((new,) if new else ()))


def make_edit(scene: Scene, rng: np.random.Generator, kind: str, cfg: WorldConfig = WorldConfig()) -> Edit | None:
    """An instruction of ``kind`` on ``scene`` and the exact target scene; None where it cannot apply."""
    refs, free = scene.referable(), scene.free_cells()
    if kind == "add":
        if len(scene.objects) >= cfg.max_objects or not free:
            return None
        new = Obj(*_pick(rng, free), _pick(rng, SHAPES), _pick(rng, COLORS))
        text = f"add {amount(1, new.shape, new.color)} {position_phrase(new.row, new.col)}"
        return Edit(kind, text, scene, Scene(scene.objects + (new,)))
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}: expected one of {EDIT_KINDS}")
    too_few = kind == "remove" and len(scene.objects) <= max(1, cfg.min_objects)
    if not refs or too_few or (kind == "move" and not free):
        return None
    o = _pick(rng, refs)
    if kind == "recolor":
        color = _pick(rng, [c for c in COLORS if c != o.color])
        return Edit(kind, f"make the {o.label} {color}", scene, _swap(scene, o, replace(o, color=color)))
    if kind == "remove":
        return Edit(kind, f"remove the {o.label}", scene, _swap(scene, o, None))
    row, col = _pick(rng, free)
    return Edit(kind, f"move the {o.label} to the {position_name(row, col)}", scene,
                _swap(scene, o, replace(o, row=row, col=col)))


def sample_edit(rng: np.random.Generator, cfg: WorldConfig = WorldConfig(), split: str = "train",
                kind: str | None = None) -> Edit:
    """An edit of a ``split`` source scene (kind uniform unless given); for "train" the target is train too."""
    for _ in range(MAX_SAMPLING_TRIES):
        edit = make_edit(sample_scene(rng, cfg, split), rng, kind or _pick(rng, EDIT_KINDS), cfg)
        if edit is not None and not (split == "train" and is_heldout(edit.target, cfg)):
            return edit
    raise RuntimeError(f"no {kind or 'any'} edit of {split} scenes in {MAX_SAMPLING_TRIES} draws")


NEAR_MISS_KINDS = EDIT_KINDS + ("reshape",)


def near_miss(scene: Scene, rng: np.random.Generator, cfg: WorldConfig = WorldConfig()) -> Scene | None:
    """``scene`` with one mistake of the kinds a generator makes: an object recolored, removed, added, moved or
    drawn as another shape (kind uniform); None where the kind drawn cannot apply."""
    kind = _pick(rng, NEAR_MISS_KINDS)
    if kind != "reshape":
        edit = make_edit(scene, rng, kind, cfg)
        return None if edit is None else edit.target
    if not scene.objects:
        return None
    o = _pick(rng, scene.objects)
    return _swap(scene, o, replace(o, shape=_pick(rng, [s for s in SHAPES if s != o.shape])))


# ----------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    """The units of ``vocabulary()``: letter runs, single digits and single punctuation characters."""
    return re.findall(r"[a-z]+|[0-9]|\S", text)


def vocabulary() -> list[str]:
    """Every unit any template (or the evaluator's assessment JSON) can produce, sorted."""
    vocab = set(TEMPLATE_WORDS) | set(COLORS) | set(SHAPES) | {plural(s) for s in SHAPES}
    vocab |= set(NUMBER_WORDS) | set(ROW_NAMES) | set(COL_NAMES) | set("0123456789") | set(PUNCTUATION)
    return sorted(vocab)


def text_corpus(rng: np.random.Generator, cfg: WorldConfig = WorldConfig(), n: int = 1000) -> list[str]:
    """``n`` example texts cycling over every template: captions, question+answer of each QA kind, prompts of
    each generation category, instructions of each edit kind and self-assessment JSON (a kind this cfg cannot
    produce, e.g. "remove" with max_objects=1, is skipped)."""
    from . import evaluator  # the assessment texts live there; imported lazily (it imports this module)

    producers = ["caption"] + [f"qa:{k}" for k in QA_KINDS] + [f"gen:{c}" for c in GEN_CATEGORIES]
    producers += [f"edit:{k}" for k in EDIT_KINDS] + ["assessment"]
    out: list[str] = []
    for i in range(n * MAX_SAMPLING_TRIES):
        if len(out) == n:
            break
        what, _, kind = producers[i % len(producers)].partition(":")
        scene = sample_scene(rng, cfg, "train")
        if what == "caption":
            out.append(describe(scene))
        elif what == "qa" and (qa := make_qa(scene, rng, kind)):
            out.append(f"{qa.question} {qa.answer}")
        elif what == "gen" and (p := gen_prompt_for(scene, rng, kind)):
            out.append(p.text)
        elif what == "edit" and (e := make_edit(scene, rng, kind, cfg)):
            out.append(e.instruction)
        elif what == "assessment":  # judge the prompt of a random scene against another random scene
            prompt = gen_prompt_for(scene, rng, _pick(rng, GEN_CATEGORIES + ("full",)))
            if prompt:
                out.append(evaluator.assessment_to_json(evaluator.assess(prompt, sample_scene(rng, cfg))))
    return out
