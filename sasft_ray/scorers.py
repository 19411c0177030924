"""Scorers of the evaluation, `(prediction, row) -> score in [0, 1]`: the built-in ones by name, or a
`module:function` of the user's. The forgetting lab scores its base model with the same rules."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
from collections.abc import Callable

from sasft_ray import instructions


class ScorerError(ValueError):
    """A scorer name that names no built-in scorer, or a `module:function` that cannot be imported."""


def _norm(text: str) -> str:
    return " ".join(text.split())


def exact(prediction: str, row: dict) -> float:
    """The whole reply, whitespace-normalized, equals the reference: right content in the right style."""
    return float(_norm(prediction) == _norm(row["reference"]))


def contains(prediction: str, row: dict) -> float:
    """The answer (or the reference) appears in the reply as a whole token, in any style or case."""
    target = _norm(str(row.get("answer") or row["reference"])).lower()
    return float(bool(target) and re.search(rf"(?<!\w){re.escape(target)}(?!\w)", _norm(prediction).lower())
                 is not None)


@functools.cache
def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, row: dict) -> float:
    """ROUGE-L F1, the standard one (Google's `rouge_score`: lower-cased, punctuation dropped, Porter
    stemming), so a figure compares with the papers' (MedText's, say)."""
    return _rouge_scorer().score(row["reference"], prediction)["rougeL"].fmeasure


SCORERS: dict[str, Callable[[str, dict], float]] = {"exact": exact, "contains": contains, "rouge_l": rouge_l,
                                                    "follows": instructions.follows}


def scorer(name: str) -> Callable[[str, dict], float]:
    """A built-in scorer, or `module:function` taking (prediction, row) and returning a float."""
    if name in SCORERS:
        return SCORERS[name]
    module, sep, attr = name.partition(":")
    if not sep:
        raise ScorerError(f"unknown scorer {name!r}: use one of {sorted(SCORERS)} or module:function")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ScorerError(f"scorer {name!r} cannot be imported: {e}") from e


def scorer_file(name: str) -> str | None:
    """The source file of a `module:function` scorer's module, if it has one."""
    module, sep, _ = name.partition(":")
    if not sep:
        return None
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec and spec.has_location else None
