"""Self-assessments: the JSON object a unified model writes when asked to judge an image against a prompt.

ILLUME's self-enhancing alignment teaches the model to answer ``cfg.prompts.assess`` with one JSON object of
string values, e.g. (the ILLUME-nano format, docs/nano.md)::

    {"object": "yes", "count": "n/a", "color": "no", "spatial": "n/a", "score": "0.50", "analysis": "..."}

A model trained with the evidence field (the recipe's ``Schedule.assess_evidence``) opens it with what the image
shows, e.g. ``{"shows": "circle: nothing; square: green", "object": "no", ...}``.
The runtime needs only two things from it: where the object ends (to stop decoding there) and its score (to
rank candidates in ``generate(..., best_of=N)``). Anything that is not such an object gives ``None``.
"""
from __future__ import annotations

import json


def complete_object(text: str) -> str | None:
    """The first complete top-level ``{...}`` in ``text`` (string-aware brace matching), or None."""
    start = text.find("{")
    if start < 0:
        return None
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    return None


def parse_assessment(text: str) -> dict | None:
    """The assessment in ``text`` as a dict with a float ``score`` in [0, 1], or None when there is none."""
    obj = complete_object(text)
    if obj is None:
        return None
    try:
        value = json.loads(obj)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or "score" not in value:
        return None
    try:
        score = float(value["score"])
    except (TypeError, ValueError):
        return None
    if not 0.0 <= score <= 1.0:
        return None
    return {**value, "score": score}
