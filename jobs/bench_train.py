"""Benchmark: our Ray Train + DeepSpeed ZeRO-3 job against a bare single-process PyTorch loop.

Same model, same tokenized data (the assistant-only labels of `sasft_ray.train.encode`), same
global batch, same optimizer, in one run.
  bare loop:  one process, plain AdamW, global batch = micro_batch x workers
  ours:       `sasft_ray.train.train` with ZeRO-3 on `--workers` CPU workers (gloo)
Steady-state tokens/s leaves out start-up: for the bare loop it skips the first steps, for ours
it is measured between the first and the last checkpoint reports (checkpoint saving included).

    python jobs/bench_train.py
    python jobs/bench_train.py --steps 80 --layers 4 --hidden 256
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench_common import PeakMemory


def bare_loop(cfg, rd, steps: int, warmup_steps: int) -> dict:
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from sasft_ray.selftalk import load_tokenizer, turn_format
    from sasft_ray.train import _collate, encode

    t = cfg.train
    with PeakMemory() as mem:
        start = time.perf_counter()
        tokenizer = load_tokenizer(cfg.model.path)
        strip_bos = turn_format(tokenizer).strip_bos
        rows = pq.read_table(rd.local("mixed")).column("messages").to_pylist()
        encoded = [encode(tokenizer, m, t.max_length, strip_bos) for m in rows]
        model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr)
        startup = time.perf_counter() - start
        batch_size = t.micro_batch_size * t.num_workers
        tokens, timed_from = 0, None
        for step in range(steps):
            if step == warmup_steps:
                tokens, timed_from = 0, time.perf_counter()
            chunk = [encoded[(step * batch_size + i) % len(encoded)] for i in range(batch_size)]
            batch = _collate({"input_ids": [e["input_ids"] for e in chunk], "labels": [e["labels"] for e in chunk]},
                             pad_id=tokenizer.pad_token_id)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            tokens += int(batch["attention_mask"].sum())
        seconds = time.perf_counter() - timed_from
    return {"tokens_per_s": tokens / seconds, "startup_s": startup, "peak_gib": mem.total / 2**30}


def ray_zero3(cfg, rd) -> dict:
    from sasft_ray.train import train, train_events

    with PeakMemory(worker_tag="RayTrainWorker") as mem:
        start = time.perf_counter()
        train(cfg, rd, force=True)
        wall = time.perf_counter() - start
    reports = [e for e in train_events(rd) if e["event"] == "checkpoint"]
    tokens = sum(e["tokens"] for e in reports[1:])
    seconds = reports[-1]["time"] - reports[0]["time"]
    per_step = seconds / (reports[-1]["step"] - reports[0]["step"])
    # start-up (and export) is the wall time that the steady rate does not explain
    return {"tokens_per_s": tokens / seconds, "startup_s": wall - reports[-1]["step"] * per_step,
            "peak_gib": mem.per_worker / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args()

    import ray
    from safetensors.torch import load_file

    from sasft_ray.config import validate_config
    from sasft_ray.generate import generate
    from sasft_ray.tiny import build_tiny_model, write_demo_task

    tmp = Path(tempfile.mkdtemp())
    model = build_tiny_model(tmp / "model", "llama", layers=args.layers, hidden=args.hidden, warmup_steps=0)
    write_demo_task(tmp / "task.jsonl", n=2000)
    every = max(1, args.steps // 6)
    cfg = validate_config({
        "run_dir": str(tmp / "run"), "model": {"path": str(model), "dtype": "float32"},
        "data": {"path": str(tmp / "task.jsonl")},
        "train": {"method": "sft", "num_workers": args.workers, "micro_batch_size": args.micro_batch,
                  "max_steps": args.steps, "checkpoint_every": every, "lr": 1e-3, "max_length": 128},
    })
    rd = generate(cfg)
    bare = bare_loop(cfg, rd, args.steps, warmup_steps=every)
    ours = ray_zero3(cfg, rd)
    ray.shutdown()

    params = sum(p.numel() for p in load_file(str(model / "model.safetensors")).values())
    print(f"\ntraining, {params / 1e6:.1f}M-parameter Llama, {args.steps} steps of "
          f"{args.micro_batch * args.workers} dialogues, on {os.cpu_count()} CPU cores")
    print(f"{'':34}{'tokens/s':>10}{'start-up s':>12}{'peak GiB':>10}")
    print(f"{'bare PyTorch loop (1 process)':34}{bare['tokens_per_s']:10.0f}{bare['startup_s']:12.1f}"
          f"{bare['peak_gib']:10.2f}")
    print(f"{f'Ray Train + ZeRO-3 ({args.workers} workers)':34}{ours['tokens_per_s']:10.0f}"
          f"{ours['startup_s']:12.1f}{ours['peak_gib']:10.2f}  (peak per worker)")
    print(f"ratio ours / bare (steady state tokens/s): {ours['tokens_per_s'] / bare['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
