"""Verifiable instructions, checked by code (as IFEval checks its own): the `follows` scorer.

A benchmark row lists its checks, e.g. `"instructions": [{"kind": "max_words", "n": 10}]`; the reply
scores 1 when every check passes. The kinds are a small, self-contained subset of IFEval's (word counts,
a required or forbidden word, letter case, how the reply starts, ends or is wrapped, bullets, JSON,
language): lm-eval's own IFEval checkers fetch NLTK data from the network when imported, which a
cluster can do (run `ifeval` through `eval.lm_eval`) and an offline machine cannot.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?")
# The commonest short words of each language: the language with most of them in a reply is its language.
STOPWORDS = {
    "en": "the and is are of to in it you that this for with on was be have not what your my".split(),
    "fr": "le la les et est un une des de du je tu il elle nous vous pas que qui pour dans bonjour avec "
          "sur mon ma ce c'est suis".split(),
    "es": "el la los las y es un una de del que en yo tu mi se por para con no hola soy llamo como está".split(),
    "de": "der die das und ist ein eine nicht ich du er sie wir mit von zu den dem hallo bin mein".split(),
}


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def _strip(text: str) -> str:
    return text.strip().strip("\"'`*").strip()


def _language(text: str) -> str | None:
    counts = {lang: sum(w in set(stop) for w in words(text)) for lang, stop in STOPWORDS.items()}
    best = max(counts, key=counts.get)
    return best if counts[best] else None


def _json(text: str) -> bool:
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        return isinstance(json.loads(body), dict)
    except json.JSONDecodeError:
        return False


CHECKS: dict[str, Callable[..., bool]] = {
    "exact": lambda r, text: _strip(r).rstrip(".!").lower() == text.lower(),
    "max_words": lambda r, n: 0 < len(words(r)) <= n,
    "min_words": lambda r, n: len(words(r)) >= n,
    "include_word": lambda r, word: word.lower() in words(r),
    "no_word": lambda r, word: bool(r.strip()) and word.lower() not in words(r),
    "no_text": lambda r, text: bool(r.strip()) and text not in r,
    "uppercase": lambda r: any(c.isalpha() for c in r) and r == r.upper(),
    "lowercase": lambda r: any(c.isalpha() for c in r) and r == r.lower(),
    "starts_with": lambda r, text: _strip(r).lower().startswith(text.lower()),
    "ends_with": lambda r, text: r.strip().rstrip("\"'*").lower().endswith(text.lower())
                 or (text.isalpha() and _strip(r).rstrip(".!").lower().endswith(text.lower())),
    "wrapped": lambda r, open, close: len(r.strip()) > len(open) + len(close)
               and r.strip().startswith(open) and r.strip().endswith(close),
    "bullets": lambda r, n: sum(bool(re.match(r"\s*[-*] \S", line)) for line in r.splitlines()) == n,
    "json": _json,
    "language": lambda r, language: _language(r) == language,
}


def check(reply: str, spec: dict) -> bool:
    """One instruction: `spec` is {"kind": ..., **its arguments}."""
    args = {k: v for k, v in spec.items() if k != "kind"}
    return CHECKS[spec["kind"]](reply, **args)


def follows(prediction: str, row: dict) -> float:
    """1 when the reply follows every instruction of the row (IFEval's strict, prompt-level accuracy)."""
    return float(all(check(prediction, spec) for spec in row["instructions"]))


def validate(specs: object, where: str) -> None:
    """Refuse a row's `instructions` that name an unknown kind or miss an argument, before any request."""
    import inspect

    if not (isinstance(specs, list) and specs and all(isinstance(s, dict) for s in specs)):
        raise ValueError(f"{where}: field 'instructions' must be a non-empty list of {{kind, ...}}")
    for spec in specs:
        kind = spec.get("kind")
        if kind not in CHECKS:
            raise ValueError(f"{where}: instruction kind {kind!r} is not one of {sorted(CHECKS)}")
        wanted = set(list(inspect.signature(CHECKS[kind]).parameters)[1:])
        if wanted != set(spec) - {"kind"}:
            raise ValueError(f"{where}: instruction {kind!r} takes {sorted(wanted) or 'no arguments'}, "
                             f"got {sorted(set(spec) - {'kind'})}")
