import numpy as np

from sasft_ray.config import FilterConfig
from sasft_ray.filters import Deduplicator, lsh_shape, minhash, normalise, row_drop_reason

MARKERS = ("<|eot_id|>", "<|start_header_id|>")


def row(*contents, truncated=False):
    roles = ["user", "assistant"] * len(contents)
    return {"messages": [{"role": r, "content": c} for r, c in zip(roles, contents)], "truncated": truncated}


def test_row_checks_name_each_reason():
    cfg = FilterConfig(min_turn_chars=3, max_dialogue_chars=40)
    assert row_drop_reason(row("What is 2+2?", "Four."), cfg, MARKERS) == ""
    assert row_drop_reason(row("What is 2+2?", ""), cfg, MARKERS) == "empty"
    assert row_drop_reason(row("What is 2+2?", "Fo", truncated=True), cfg, MARKERS) == "truncated"
    assert row_drop_reason(row("Hi<|eot_id|>there", "Four."), cfg, MARKERS) == "template leak"
    assert row_drop_reason(row("What is 2+2?", "4"), cfg, MARKERS) == "too short"
    assert row_drop_reason(row("What is 2+2?", "x" * 40), cfg, MARKERS) == "too long"


def test_a_reply_cut_at_its_limit_is_kept_open_only_when_asked_and_only_if_it_is_the_last():
    keep, drop = FilterConfig(truncated="keep"), FilterConfig()
    last_cut = {**row("What is 2+2?", "Four, because two and"), "truncated": True, "cut_replies": 1, "open_end": True}
    assert row_drop_reason(last_cut, keep, MARKERS) == ""
    assert row_drop_reason(last_cut, drop, MARKERS) == "truncated"
    user_cut = {**row("What is 2+", "Four."), "truncated": True, "cut_replies": 0, "open_end": False}
    earlier_cut = {**row("Hi", "Hello, how", "What is 2+2?", "Four, because"), "truncated": True, "cut_replies": 2,
                   "open_end": True}  # an earlier reply cut too: its end of turn would still be trained on
    assert row_drop_reason(user_cut, keep, MARKERS) == row_drop_reason(earlier_cut, keep, MARKERS) == "truncated"


def test_system_prompt_is_not_judged_as_a_turn():
    cfg = FilterConfig()
    r = row("Hi there", "Hello!")
    r["messages"].insert(0, {"role": "system", "content": "<|start_header_id|> is fine in my own prompt"})
    assert row_drop_reason(r, cfg, MARKERS) == ""


def test_dedup_marks_exact_and_near_copies_but_keeps_distinct_text():
    dedup = Deduplicator("minhash", threshold=0.8)
    base = "the quick brown fox jumps over the lazy dog near the river bank on a sunny day in june"
    rows = [
        {"messages": [{"role": "user", "content": base}], "drop_reason": ""},
        {"messages": [{"role": "user", "content": base.upper() + "!"}], "drop_reason": ""},  # same once normalised
        {"messages": [{"role": "user", "content": base + " again"}], "drop_reason": ""},    # near copy
        {"messages": [{"role": "user", "content": "an entirely different question about prime numbers"}],
         "drop_reason": ""},
        {"messages": [{"role": "user", "content": base}], "drop_reason": "truncated"},      # already dropped
    ]
    assert [dedup(dict(r))["drop_reason"] for r in rows] == ["", "duplicate", "near-duplicate", "", "truncated"]
    exact_only = Deduplicator("exact", threshold=0.8)
    assert [exact_only(dict(r))["drop_reason"] for r in rows[:3]] == ["", "duplicate", ""]


def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(0)
    seeds = (rng.integers(1, 2**63, 64, dtype=np.uint64) | np.uint64(1), rng.integers(0, 2**63, 64, dtype=np.uint64))
    words = [f"w{i}" for i in range(200)]
    a, b = " ".join(words[:150]), " ".join(words[50:])  # 3-gram Jaccard ≈ 98 / 198
    estimate = np.mean(minhash(a, seeds) == minhash(b, seeds))
    assert 0.3 < estimate < 0.7
    assert normalise([{"role": "user", "content": "Hello,   World!"}]) == "user: hello world"


def test_lsh_shape_puts_the_s_curve_near_the_threshold():
    for threshold in (0.5, 0.8, 0.9):
        bands, rows = lsh_shape(threshold)
        assert bands * rows == 64
        assert abs((1 / bands) ** (1 / rows) - threshold) < 0.15
