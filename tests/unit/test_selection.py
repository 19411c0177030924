"""train.select's rule: which checkpoint a training exports, and which it must keep (no Ray needed)."""

import random

import pytest

from sasft_ray.selection import keep, losses_by_step, selection

# (task held-out loss, self-talk held-out loss) per checkpoint step: the task learnt, then overfit; the
# model's own text ever less likely (forgetting)
CURVE = {10: (2.0, 0.5), 20: (1.5, 0.7), 30: (1.25, 0.9), 40: (1.0, 1.2), 50: (1.125, 1.5)}


def test_last_is_the_last_step_whatever_the_losses():
    assert selection("last", 0.02, CURVE)["step"] == 50
    assert selection("last", 0.02, {5: (None, None), 10: (None, None)})["step"] == 10
    assert selection("last", 0.02, CURVE) == {"rule": "last", "step": 50, "task_loss": 1.125, "selftalk_loss": 1.5,
                                              "why": "the last checkpoint"}


def test_best_task_is_the_lowest_task_loss_ties_the_later_step():
    assert selection("best_task", 0.02, CURVE)["step"] == 40
    assert selection("best_task", 0.02, {10: (1.0, 0.1), 20: (1.0, 0.9), 30: (1.5, 0.0)})["step"] == 20
    chosen = selection("best_task", 0.02, CURVE)
    assert chosen["step"] == 40 and chosen["task_loss"] == 1.0 and chosen["selftalk_loss"] == 1.2
    assert chosen["why"] == "the lowest task held-out loss of 5 checkpoints"


def test_balanced_takes_the_least_forgetting_within_the_tolerance_inclusive():
    # best task loss 1.0 at step 40: within 0.125 -> up to 1.125 (step 50, exactly at the edge: in)
    assert selection("balanced", 0.0, CURVE)["step"] == 40  # no tolerance: best_task's choice
    assert selection("balanced", 0.125, CURVE)["step"] == 40  # 40 and 50 in; 40 forgot less
    assert selection("balanced", 0.25, CURVE)["step"] == 30  # 1.25 is exactly 1.25 x 1.0: in
    assert selection("balanced", 0.2499, CURVE)["step"] == 40  # ...and just out
    assert selection("balanced", 1.0, CURVE)["step"] == 10  # everything in: the least forgetting
    chosen = selection("balanced", 0.25, CURVE)
    assert chosen == {"rule": "balanced", "step": 30, "task_loss": 1.25, "selftalk_loss": 0.9,
                      "why": "the lowest self-talk held-out loss of the 3 checkpoints whose task held-out loss is "
                             "at most 1.25 x the best (1.0000 at step 40)"}


def test_balanced_ties_go_to_the_later_step():
    by_step = {10: (1.0, 0.5), 20: (1.01, 0.5), 30: (1.0, 0.75)}
    assert selection("balanced", 0.02, by_step)["step"] == 20
    assert selection("balanced", 0.005, by_step)["step"] == 10  # 20 out of the window: 10 and 30 left


def test_missing_losses_are_never_chosen_and_the_rule_falls_back():
    # no task loss at 20 (a held-out set with no rows there): never chosen, though it forgot least
    by_step = {10: (1.0, 0.5), 20: (None, 0.1), 30: (1.01, 0.8)}
    assert selection("best_task", 0.02, by_step)["step"] == 10
    assert selection("balanced", 0.02, by_step)["step"] == 10
    # no self-talk loss at 10: the window's others decide
    assert selection("balanced", 0.02, {10: (1.0, None), 20: (1.01, 0.8), 30: (1.5, 0.1)})["step"] == 20
    # no self-talk loss in the window at all: best_task's choice, said so
    no_monitor = {10: (1.0, None), 20: (1.01, None), 30: (1.5, 0.1)}
    chosen = selection("balanced", 0.02, no_monitor)
    assert chosen["step"] == 10
    assert chosen["why"].startswith("no self-talk held-out loss where the task held-out loss is at most 1.02 x")
    # no task loss anywhere: the last checkpoint, said so
    chosen = selection("best_task", 0.02, {10: (None, 0.5), 20: (None, 0.4)})
    assert chosen["step"] == 20 and chosen["why"] == "no task held-out loss recorded: the last checkpoint, not " \
                                                     "best_task's"
    with pytest.raises(ValueError, match="no checkpoint"):
        selection("best_task", 0.02, {})
    with pytest.raises(ValueError, match="none of last, best_task, balanced"):
        selection("best", 0.02, CURVE)


def test_keep_holds_the_choice_and_only_what_may_become_it():
    assert keep("last", 0.02, CURVE) == set()
    assert keep("best_task", 0.02, CURVE) == {40}
    # the loss falling at every checkpoint: only the latest is ever kept (Ray Train's latest anyway)
    falling = {10: (2.0, 0.5), 20: (1.5, 0.7), 30: (1.25, 0.9)}
    assert keep("best_task", 0.02, falling) == {30} == keep("balanced", 0.02, falling)
    # in the window 30, 40 and 50; 50 has more task loss and forgot more than 40: never chosen
    assert keep("balanced", 0.25, CURVE) == {30, 40}
    # no self-talk loss at 20: it can only be chosen as the best task loss, which it is not
    assert keep("balanced", 0.5, {10: (1.4, 0.5), 20: (1.2, None), 30: (1.0, 0.9)}) == {10, 30}


@pytest.mark.parametrize("select", ["best_task", "balanced"])
def test_whatever_comes_later_the_choice_was_kept(select):
    """At each checkpoint the steps kept (`keep`) plus the newest include every step the rule chooses
    at any later checkpoint, so copying `keep`'s older steps aside is enough."""
    rng, older = random.Random(0), 0
    for _ in range(300):
        tolerance = rng.choice([0.0, 0.02, 0.1, 0.5])
        by_step: dict[int, tuple] = {}
        kept: set[int] = set()  # what the worker holds: its copies, and (for a step) Ray Train's latest
        for step in range(1, 13):
            task = None if rng.random() < 0.1 else rng.choice([1.0, 1.01, 1.05, 1.2, 1.5, 2.0]) * rng.choice([1, 0.9])
            monitor = None if rng.random() < 0.15 else rng.choice([0.5, 0.6, 0.7, 0.8])
            by_step[step] = (task, monitor)
            chosen = selection(select, tolerance, by_step)["step"]
            assert chosen == step or chosen in kept, (by_step, tolerance, kept)
            older += chosen != step
            wanted = keep(select, tolerance, by_step)
            assert chosen in wanted or (chosen == step and _no_task_loss(by_step))
            assert wanted <= kept | {step}  # nothing wanted that was let go earlier
            kept = wanted
    assert older > 1000  # the choice was mostly an older checkpoint than the newest: the case that matters


def _no_task_loss(by_step) -> bool:
    return all(task is None for task, _ in by_step.values())


def test_losses_come_from_the_events_the_last_record_of_a_redone_step():
    events = [{"event": "started", "step": 0},
              {"event": "checkpoint", "step": 10, "heldout_loss": 2.0, "selftalk_heldout_loss": 0.5},
              {"event": "log", "step": 15, "loss": 1.0},
              {"event": "checkpoint", "step": 20, "heldout_loss": 1.5},  # the worker died before Ray registered it
              {"event": "resumed", "step": 10},
              {"event": "checkpoint", "step": 20, "heldout_loss": 1.4, "selftalk_heldout_loss": 0.6},
              {"event": "checkpoint", "step": 30, "heldout_loss": 1.3, "selftalk_heldout_loss": 0.7}]
    assert losses_by_step(events) == {10: (2.0, 0.5), 20: (1.4, 0.6), 30: (1.3, 0.7)}
    assert losses_by_step(events[:4]) == {10: (2.0, 0.5), 20: (1.5, None)}
    # a restarted group at step 10 has not reached 20 again: the dead group's record of it is ignored
    assert losses_by_step(events[:5], up_to=10) == {10: (2.0, 0.5)}
