"""Which checkpoint a training exports (`train.select`), chosen by the forgetting monitor.

Pure functions of the held-out losses recorded at the checkpoints, `{step: (task loss, self-talk
loss)}` (either may be None: a held-out set with no rows, or no monitor), so the workers, the driver
and the tests apply the one rule:

- `last`: the last checkpoint (the trained model as it ends).
- `best_task`: the lowest task held-out loss; ties: the later step.
- `balanced`: among the checkpoints whose task held-out loss is within (1 + tolerance) x the best
  one's, the lowest self-talk held-out loss (the model that forgot least at almost the best task
  loss); ties: the later step.

A rule that cannot apply falls back, and says so in `why`: no task loss recorded -> the last
checkpoint; no self-talk loss among the checkpoints within the tolerance -> `best_task`'s.

`keep` names the checkpoints that are the choice now or may become it as more checkpoints come:
only those need to outlive Ray Train's retention of the latest `train.keep_checkpoints`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal, get_args

Rule = Literal["last", "best_task", "balanced"]  # train.select's values
RULES: tuple[str, ...] = get_args(Rule)
Losses = tuple[float | None, float | None]  # (task held-out loss, self-talk held-out loss)


def selection(select: str, tolerance: float, by_step: Mapping[int, Losses]) -> dict:
    """The checkpoint `select` exports (see the module's docstring), as the train record names it:
    {rule, step, task_loss, selftalk_loss, why}."""
    step, why = _choose(select, tolerance, by_step)
    task, monitor = by_step[step]
    return {"rule": select, "step": step, "task_loss": task, "selftalk_loss": monitor, "why": why}


def keep(select: str, tolerance: float, by_step: Mapping[int, Losses]) -> set[int]:
    """The steps that are the choice, or may become it whatever later checkpoints record.

    The best task loss only falls as checkpoints come, so the tolerance window only narrows: a
    checkpoint outside it, or inside it beside one with no more task loss and less self-talk loss
    (equal: later), is never chosen again. `best_task`'s choice is kept under `balanced` too (its
    fallback)."""
    _check(select)
    if select == "last" or not by_step:
        return set()
    scored = _scored(by_step)
    if not scored:
        return set()
    best = _best_task(scored)
    if select == "best_task":
        return {best}
    window = _window(scored, tolerance)
    return {best} | {a for a in window if by_step[a][1] is not None
                     and not any(_dominates(by_step[b], b, by_step[a], a) for b in window)}


def losses_by_step(events: Iterable[dict], up_to: int | None = None) -> dict[int, Losses]:
    """{step: (task, self-talk held-out loss)} from train-events.jsonl's checkpoint records (a step
    redone after a restart: its last record), ignoring steps after `up_to`: records a restarted
    worker group has not reached again yet."""
    out: dict[int, Losses] = {}
    for e in events:
        if e.get("event") == "checkpoint" and (up_to is None or e["step"] <= up_to):
            out[int(e["step"])] = (e.get("heldout_loss"), e.get("selftalk_heldout_loss"))
    return dict(sorted(out.items()))


def _choose(select: str, tolerance: float, by_step: Mapping[int, Losses]) -> tuple[int, str]:
    _check(select)
    if not by_step:
        raise ValueError("no checkpoint to choose from")
    last = max(by_step)
    if select == "last":
        return last, "the last checkpoint"
    scored = _scored(by_step)
    if not scored:
        return last, f"no task held-out loss recorded: the last checkpoint, not {select}'s"
    best = _best_task(scored)
    if select == "best_task":
        return best, f"the lowest task held-out loss of {len(scored)} checkpoints"
    window = _window(scored, tolerance)
    monitored = {s: by_step[s][1] for s in window if by_step[s][1] is not None}
    if not monitored:
        return best, (f"no self-talk held-out loss where the task held-out loss is at most {1 + tolerance:g} x "
                      "the best: the lowest task held-out loss")
    low = min(monitored.values())
    return max(s for s, v in monitored.items() if v == low), (
        f"the lowest self-talk held-out loss of the {len(window)} checkpoints whose task held-out loss is at "
        f"most {1 + tolerance:g} x the best ({scored[best]:.4f} at step {best})")


def _check(select: str) -> None:
    if select not in RULES:
        raise ValueError(f"train.select {select!r} is none of {', '.join(RULES)}")


def _scored(by_step: Mapping[int, Losses]) -> dict[int, float]:
    return {s: task for s, (task, _) in by_step.items() if task is not None}


def _best_task(scored: Mapping[int, float]) -> int:
    low = min(scored.values())
    return max(s for s, v in scored.items() if v == low)


def _window(scored: Mapping[int, float], tolerance: float) -> list[int]:
    """The steps whose task loss is within (1 + tolerance) x the best (inclusive)."""
    limit = min(scored.values()) * (1 + tolerance)
    return [s for s, v in scored.items() if v <= limit]


def _dominates(b: Losses, b_step: int, a: Losses, a_step: int) -> bool:
    """Whether b, in the window whenever a is, is always chosen over a (a then never is)."""
    (task_b, st_b), (task_a, st_a) = b, a
    if st_b is None or st_a is None or b_step == a_step or task_b > task_a:
        return False
    return st_b < st_a or (st_b == st_a and b_step > a_step)
