"""`sasft diagnose`'s verdict from the ratio of the two costs (the costs themselves, on the lab's model,
are in tests/integration/test_diagnose.py)."""

from sasft_ray.diagnose import verdict


def test_verdicts_by_ratio():
    assert verdict(3.0).startswith("far") and verdict(0.5).startswith("somewhat") and verdict(0.1).startswith("close")
    assert verdict(-0.2).startswith("close")  # the task more likely than its own replies
