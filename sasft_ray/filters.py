"""Quality filters for self-dialogues.

A filter never deletes a row: it writes the reason into `drop_reason`, so the
self-talk folder keeps every generated dialogue, the manifest counts each
reason, and the mix reads only rows whose reason is empty. Row checks are
stateless and run in parallel; deduplication needs one global view, so it runs
in a single actor (exact hashes plus MinHash LSH over word 3-grams).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from sasft_ray.config import FilterConfig

KEPT = ""
EMPTY, TRUNCATED, LEAK = "empty", "truncated", "template leak"  # drop reasons the rewrites (sdft) share
NUM_PERM = 64


def cut_off(row: dict, cfg: FilterConfig) -> bool:
    """Whether a token limit cost the row: a message was cut, unless only the last reply was and
    `filters.truncated` keeps such rows (trained without an end of turn: the reply stays open)."""
    open_end = row.get("open_end", False) and row.get("cut_replies", 0) == 1
    return row["truncated"] and not (cfg.truncated == "keep" and open_end)


def leaks(text: str, markers: tuple[str, ...]) -> bool:
    """Whether the text holds a chat-template marker (one-character markers are ordinary text)."""
    return any(marker in text for marker in markers if len(marker) > 1)


def row_drop_reason(row: dict, cfg: FilterConfig, markers: tuple[str, ...]) -> str:
    turns = [m for m in row["messages"] if m["role"] != "system"]
    contents = [m["content"] for m in turns]
    if not contents or any(not c.strip() for c in contents):
        return EMPTY
    if cut_off(row, cfg):
        return TRUNCATED
    if any(leaks(c, markers) for c in contents):
        return LEAK
    if any(len(c.strip()) < cfg.min_turn_chars for c in contents):
        return "too short"
    if sum(map(len, contents)) > cfg.max_dialogue_chars:
        return "too long"
    return KEPT


def mark_row(row: dict, *, cfg: FilterConfig, markers: tuple[str, ...]) -> dict:
    """The row with its drop reason: one the writer gave it (over max_model_len, engine error), or the filters'."""
    return {**row, "drop_reason": row.get("drop_reason") or row_drop_reason(row, cfg, markers)}


def normalise(messages) -> str:
    text = " ".join(f"{m['role']}: {m['content']}" for m in messages)
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s:]", "", text.lower())).strip()


def _hash64(items: list[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
                     for s in items], dtype=np.uint64)


def minhash(text: str, seeds: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    words = text.split()
    shingles = [" ".join(words[i:i + 3]) for i in range(max(1, len(words) - 2))]
    x = _hash64(shingles)
    a, b = seeds
    with np.errstate(over="ignore"):  # multiply-add modulo 2**64 is the point
        return (a[:, None] * x[None, :] + b[:, None]).min(axis=1)


def lsh_shape(threshold: float) -> tuple[int, int]:
    """(bands, rows) with bands*rows = NUM_PERM whose S-curve midpoint is closest to the threshold."""
    shapes = [(b, NUM_PERM // b) for b in (1, 2, 4, 8, 16, 32, 64)]
    return min(shapes, key=lambda s: abs((1 / s[0]) ** (1 / s[1]) - threshold))


class Deduplicator:
    """Stateful Ray Data actor: marks later copies of a dialogue seen before."""

    def __init__(self, mode: str, threshold: float):
        self.mode, self.threshold = mode, threshold
        self.exact: set[bytes] = set()
        rng = np.random.default_rng(12345)
        self.seeds = (rng.integers(1, 2**63, NUM_PERM, dtype=np.uint64) | np.uint64(1),
                      rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64))
        self.bands, self.rows = lsh_shape(threshold)
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.signatures: list[np.ndarray] = []

    def __call__(self, row: dict) -> dict:
        if row["drop_reason"] == KEPT:
            row["drop_reason"] = self.check(normalise(row["messages"]))
        return row

    def check(self, text: str) -> str:
        key = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if key in self.exact:
            return "duplicate"
        self.exact.add(key)
        if self.mode != "minhash":
            return KEPT
        sig = minhash(text, self.seeds)
        band_keys = [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
        candidates = {j for band, k in zip(self.buckets, band_keys) for j in band.get(k, ())}
        if any(np.mean(self.signatures[j] == sig) >= self.threshold for j in candidates):
            return "near-duplicate"
        for band, k in zip(self.buckets, band_keys):
            band.setdefault(k, []).append(len(self.signatures))
        self.signatures.append(sig)
        return KEPT
