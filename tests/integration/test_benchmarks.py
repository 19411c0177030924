"""Each `jobs/bench_*.py` at its smallest size (a few steps, dialogues or requests, on the session's tiny
model), as a user runs it: it finishes and prints its ratio line, so a benchmark cannot break unseen.
`bench_serve` and `bench_eval` measure `test_serve.py`'s endpoint (`--url`) instead of starting one of their
own. The figures mean nothing at this size; docs/benchmarks.md has the real ones."""

from tests.conftest import bench_ratios


def test_bench_train_prints_its_ratios(tiny_llama):
    assert bench_ratios("train", "--model", tiny_llama, "--steps", 2, "--micro-batch", 2) == [
        "Ray Train / torchrun", "Ray Train / bare loop"]


def test_bench_generate_prints_its_ratios(tiny_llama):
    assert bench_ratios("generate", "--model", tiny_llama, "--dialogues", 16, "--batch-size", 4,
                        "--max-tokens", 8) == ["pipeline / bare", "writer without Ray / bare"]
