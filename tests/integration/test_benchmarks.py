"""Each `jobs/bench_*.py` at its smallest size (a few steps, dialogues or requests, on the session's tiny
model), as a user runs it: it finishes and prints its ratio line, so a benchmark cannot break unseen.
The figures mean nothing at this size; docs/benchmarks.md has the real ones."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import free_port

JOBS = Path(__file__).parents[2] / "jobs"


def _ratios(name: str, *args) -> list[str]:
    """Run the benchmark; what its ratio lines (`ratio A / B (what): 0.77`) compare."""
    out = subprocess.run([sys.executable, str(JOBS / f"bench_{name}.py"), *map(str, args)], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return re.findall(r"^(?:\w+: )?ratio ([^(:]+?)(?: \(.*\))?: \d+\.\d\d$", out.stdout, re.M)


def test_bench_train_prints_its_ratios(tiny_llama):
    ratios = _ratios("train", "--model", tiny_llama, "--steps", 2, "--micro-batch", 2)
    assert ratios == ["Ray Train / torchrun", "Ray Train / bare loop"]


def test_bench_generate_prints_its_ratios(tiny_llama):
    ratios = _ratios("generate", "--model", tiny_llama, "--dialogues", 16, "--batch-size", 4, "--max-tokens", 8)
    assert ratios == ["pipeline / bare", "writer without Ray / bare"]


def test_bench_serve_prints_its_ratio(tiny_llama):
    ratios = _ratios("serve", "--model", tiny_llama, "--requests", 4, "--concurrency", 2, "--max-tokens", 8,
                     "--max-num-seqs", 4)
    assert ratios == ["Ray Serve / bare"]


def test_bench_eval_prints_its_ratio(tiny_llama, tmp_path):
    from sasft_ray.tiny import write_demo_task

    write_demo_task(tmp_path / "task.jsonl", n=40)
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "model": {"path": tiny_llama, "dtype": "float32"},
        "data": {"path": str(tmp_path / "task.jsonl")}, "eval": {"max_tokens": 8},
        "serve": {"port": free_port(), "engine": {"max_model_len": 256, "max_num_seqs": 4}},
        "resources": {"use_gpu": False}}))
    assert _ratios("eval", "--config", config) == ["before / after"]
