"""The `follows` scorer: verifiable instructions checked by code, each kind passing and failing."""

import pytest

from sasft_ray.instructions import CHECKS, check, follows, validate

CASES = [  # (spec, a reply that follows it, one that does not)
    ({"kind": "exact", "text": "hello"}, "Hello.", "Hello there!"),
    ({"kind": "max_words", "n": 5}, "The sea is wide.", "The sea is wide and deep and blue."),
    ({"kind": "min_words", "n": 5}, "Sleep lets the body repair itself.", "Sleep matters."),
    ({"kind": "include_word", "word": "river"}, "The River runs.", "The riverbank is green."),
    ({"kind": "no_word", "word": "the"}, "Cows eat grass.", "Cows eat the grass."),
    ({"kind": "no_text", "text": ","}, "Dogs bark. Dogs run.", "Dogs bark, dogs run."),
    ({"kind": "uppercase"}, "PARIS!", "Paris!"),
    ({"kind": "lowercase"}, "a dog is a pet.", "A dog is a pet."),
    ({"kind": "starts_with", "text": "Sure"}, "**Sure**, it is 7.", "It is 7. Sure."),
    ({"kind": "ends_with", "text": "done"}, "Blue. Done.", "Done: blue."),
    ({"kind": "ends_with", "text": "?"}, "Is the moon bright?", "The moon is bright."),
    ({"kind": "wrapped", "open": "<<", "close": ">>"}, "<<The Cat>>", "The Cat"),
    ({"kind": "bullets", "n": 2}, "- cat\n- dog", "- cat\n- dog\n- cow"),
    ({"kind": "json"}, '```json\n{"answer": "Rome"}\n```', "The answer is Rome."),
    ({"kind": "language", "language": "fr"}, "Bonjour, je suis content de vous voir.", "Hello, nice to see you."),
]


def test_every_kind_is_covered():
    assert {spec["kind"] for spec, _, _ in CASES} == set(CHECKS)


@pytest.mark.parametrize(("spec", "good", "bad"), CASES, ids=[f"{c[0]['kind']}-{i}" for i, c in enumerate(CASES)])
def test_a_check_tells_a_reply_that_follows_from_one_that_does_not(spec, good, bad):
    assert check(good, spec) and not check(bad, spec)


def test_follows_needs_every_instruction_and_an_empty_reply_follows_none():
    row = {"instructions": [{"kind": "include_word", "word": "snow"}, {"kind": "max_words", "n": 4}]}
    assert follows("Snow falls.", row) == 1.0
    assert follows("Snow falls on the quiet town.", row) == 0.0
    assert not any(check("", spec) for spec, _, _ in CASES)


@pytest.mark.parametrize(("specs", "message"), [
    ([{"kind": "shout"}], "kind 'shout' is not one of"),
    ([{"kind": "max_words"}], r"takes \['n'\], got \[\]"),
    ([{"kind": "json", "n": 1}], r"takes no arguments, got \['n'\]"),
    ([], "non-empty list"),
    (None, "non-empty list"),
])
def test_bad_instructions_are_refused_naming_the_row(specs, message):
    with pytest.raises(ValueError, match=message) as e:
        validate(specs, "probes.jsonl:3")
    assert "probes.jsonl:3" in str(e.value)
