"""What both tiers share: the environment (nothing reaches a hub), a validated config, a free port, a
benchmark's ratio lines.

tests/unit/ starts no Ray, vLLM engine, DeepSpeed or Serve and builds no model or lab (`pytest tests/unit`, the
inner loop, about a minute). tests/integration/ does, with the fixtures of tests/integration/conftest.py, so a
unit test cannot ask for them."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Nothing here may reach a model or dataset hub: lm-eval's local tasks and the tiny models are local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_report_header() -> str:
    """The machine's speed as the run starts, a fixed amount of work: this 2-core machine runs 1-3 x slower
    from day to day, so a suite's time says little about the code without it."""
    import time

    import torch

    a = torch.randn(1024, 1024)
    a @ a
    start, n = time.perf_counter(), 20
    for _ in range(n):
        a @ a
    rate = 2 * 1024**3 * n / (time.perf_counter() - start) / 1e9
    return (f"machine: {os.cpu_count()} cores; a 1,024² float32 matmul at {rate:.0f} GFLOP/s "
            f"on {torch.get_num_threads()} threads")


def make_config(tmp_path, model_path="unused", data_path=None, **sections):
    """A validated config for tests; `sections` override whole sections or top-level keys."""
    from sasft_ray.config import validate_config

    # no forgetting monitor unless a test asks for it (`selftalk.heldout_fraction`): an SFT run then needs
    # no self-talk engine, and the tests that are not about the monitor stay fast
    raw = {"run_dir": str(tmp_path / "run"), "model": {"path": model_path, "dtype": "float32"},
           "data": {"path": str(data_path or tmp_path / "task.jsonl")}, "selftalk": {"heldout_fraction": 0.0}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    return validate_config(raw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


JOBS = Path(__file__).parents[1] / "jobs"


def bench_ratios(name: str, *args) -> list[str]:
    """Run the benchmark; what its ratio lines (`ratio A / B (what): 0.77`) compare."""
    out = subprocess.run([sys.executable, str(JOBS / f"bench_{name}.py"), *map(str, args)], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return re.findall(r"^(?:\w+: )?ratio ([^(:]+?)(?: \(.*\))?: \d+\.\d\d$", out.stdout, re.M)
