"""Packing (`train.packing`): several tokenized examples concatenated into one sequence of at
most `train.max_length` tokens, so a micro-batch carries fewer pad tokens.

Labels keep their assistant-only mask; the first label of every example is ignored (it would
otherwise be predicted from the previous example's last token). Position ids restart at 0 for
every example, and the training batch carries no 2-D attention mask: transformers (>= 4.54)
then reads the example boundaries from the position ids and builds a block-diagonal causal mask
(eager and SDPA attention) or variable-length kernels (FlashAttention), so no token attends to
another example. Padding at a row's end is one more "example" of its own, with ignored labels.

Examples are placed first-fit decreasing within each batch of rows the packer sees (not across
the whole dataset), which fills sequences well at a bounded memory.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped in bins whose lengths sum to at most `capacity`."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pack(input_ids: list, labels: list, max_length: int) -> dict[str, list[np.ndarray]]:
    """Packed `input_ids`, `labels`, `position_ids` (one int64 array per packed sequence)."""
    out: dict[str, list[np.ndarray]] = {"input_ids": [], "labels": [], "position_ids": []}
    for group in first_fit_decreasing([len(x) for x in input_ids], max_length):
        out["input_ids"].append(np.concatenate([np.asarray(input_ids[i], dtype=np.int64) for i in group]))
        parts = [np.asarray(labels[i], dtype=np.int64).copy() for i in group]
        for part in parts:
            part[:1] = IGNORE
        out["labels"].append(np.concatenate(parts))
        out["position_ids"].append(np.concatenate([np.arange(len(input_ids[i]), dtype=np.int64) for i in group]))
    return out
