"""Benchmark: our Ray Train + DeepSpeed ZeRO-3 job against what a user would run instead.

Same model, same tokenized data (the assistant-only labels of `sasft_ray.chat.encode`), same
global batch, same optimizer, in one run.
  bare loop:  one process, plain AdamW, global batch = micro_batch x workers
  torchrun:   the very loop every Ray Train worker runs (`sasft_ray.loop`: same engine, ZeRO-3 config,
              checkpoints) in `--workers` gloo processes launched by `torchrun`, rows read into memory
  ours:       `sasft_ray.train.train`: Ray Train workers fed by Ray Data, checkpoints uploaded by Ray
Steady-state tokens/s leaves out start-up: for the bare loop it skips the first steps; for torchrun
and ours it is measured between the first and the last checkpoint record (checkpoint saving included).

    python jobs/bench_train.py
    python jobs/bench_train.py --steps 80 --layers 4 --hidden 256
    python jobs/bench_train.py --model runs/smollm2/model --steps 12 --micro-batch 4 --no-bare   # a real model
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import PeakMemory


def encoded_rows(cfg, path: str) -> list[dict]:
    import pyarrow.parquet as pq

    from sasft_ray.chat import encode, load_tokenizer, turn_format

    tokenizer = load_tokenizer(cfg.model.path)
    strip_bos = turn_format(tokenizer).strip_bos
    rows = pq.read_table(path).column("messages").to_pylist()
    return [seq for m in rows for seq in encode(tokenizer, m, cfg.train.max_length, strip_bos)]


def bare_loop(cfg, rd, steps: int, warmup_steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from sasft_ray.chat import load_tokenizer
    from sasft_ray.layout import MIXED
    from sasft_ray.loop import collate

    t = cfg.train
    with PeakMemory() as mem:
        start = time.perf_counter()
        encoded = encoded_rows(cfg, rd.local(MIXED))
        pad_id = load_tokenizer(cfg.model.path).pad_token_id
        model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr)
        startup = time.perf_counter() - start
        batch_size = t.micro_batch_size * t.num_workers
        tokens, timed_from = 0, None
        for step in range(steps):
            if step == warmup_steps:
                tokens, timed_from = 0, time.perf_counter()
            chunk = [encoded[(step * batch_size + i) % len(encoded)] for i in range(batch_size)]
            batch = collate({"input_ids": [e["input_ids"] for e in chunk], "labels": [e["labels"] for e in chunk]},
                            pad_id=pad_id)
            batch.pop("num_tokens")
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            tokens += int(batch["attention_mask"].sum())
        seconds = time.perf_counter() - timed_from
    return {"tokens_per_s": tokens / seconds, "startup_s": startup, "peak_gib": mem.total / 2**30}


def steady(records: list[dict], wall: float) -> dict:
    """Tokens/s between the first and the last checkpoint record; start-up (and export) is the wall
    time that this rate does not explain."""
    reports = [e for e in records if e["event"] == "checkpoint"]
    tokens = sum(e["tokens"] for e in reports[1:])
    seconds = reports[-1]["time"] - reports[0]["time"]
    per_step = seconds / (reports[-1]["step"] - reports[0]["step"])
    return {"tokens_per_s": tokens / seconds, "startup_s": wall - reports[-1]["step"] * per_step}


def peer_worker(cfg_json: str, events: str) -> None:
    """One `torchrun` process: the library's loop on this rank's share of the rows, measuring the
    held-out loss and checkpointing where Ray Train's workers do, its records (rank 0) in `events`."""
    import torch.distributed as dist

    from sasft_ray import loop
    from sasft_ray.chat import load_tokenizer
    from sasft_ray.config import Config
    from sasft_ray.layout import MIXED, MONITOR, TASK_HELDOUT
    from sasft_ray.rundir import RunDir

    cfg = Config.model_validate_json(Path(cfg_json).read_text())
    t = cfg.train
    loop.init_process_group(gpu=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    rd = RunDir(cfg.run_dir)
    rows = encoded_rows(cfg, rd.local(MIXED))
    # the held-out sets the Ray Train side measures: the task's, and the forgetting monitor's if generated
    sets = {"heldout_loss": rd.local(TASK_HELDOUT), "selftalk_heldout_loss": rd.local(MONITOR)}
    heldout = {key: encoded_rows(cfg, path) for key, path in sets.items() if Path(path).exists()}
    pad_id = load_tokenizer(cfg.model.path).pad_token_id
    engine, *_ = loop.build_engine(cfg, t.max_steps, rank)
    scratch = tempfile.mkdtemp(prefix="bench-ckpt-")

    def log(record: dict) -> None:
        event = "checkpoint" if "heldout_loss" in record else "log"
        with open(events, "a") as f:
            f.write(json.dumps({"time": time.time(), "event": event, **record}) + "\n")

    # the training rows as a Ray Train worker reads its share (`loop.epoch_batches`)
    batches = functools.partial(loop.epoch_batches, loop.in_windows(rows, rank, world), cfg,
                                len(rows) // cfg.global_batch, pad_id)
    loop.run(engine, cfg, batches,
             {key: functools.partial(loop.device_batches, held, t.micro_batch_size, pad_id, engine.device, rank=rank,
                                     world=world, drop_last=False) for key, held in heldout.items()},
             total_steps=t.max_steps, log=log,
             checkpoint=lambda step, record: engine.save_checkpoint(scratch, tag="ds", client_state={"step": step}))


def torchrun(cfg, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, PeakMemory(worker_tag="--peer-worker") as mem:
        cfg_json, events = Path(tmp, "cfg.json"), Path(tmp, "events.jsonl")
        cfg_json.write_text(cfg.model_dump_json())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={workers}",
                        f"--master_port={port}", __file__, "--peer-worker", str(cfg_json), str(events)],
                       check=True, cwd=Path(__file__).parent)
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in events.read_text().splitlines()]
    return {**steady(records, wall), "peak_gib": mem.per_worker / 2**30}


def ray_zero3(cfg, rd) -> dict:
    from sasft_ray.train import train, train_events

    with PeakMemory(worker_tag="RayTrainWorker") as mem:
        start = time.perf_counter()
        train(cfg, rd, force=True)
        wall = time.perf_counter() - start
    return {**steady(train_events(rd), wall), "peak_gib": mem.per_worker / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--model", help="HF model folder (a real one: `sasft model smollm2 DIR`); default: build a "
                        "random one of --layers and --hidden")
    parser.add_argument("--no-bare", action="store_true", help="leave out the one-process loop (a real model's "
                        "whole global batch in one process is slow on a laptop)")
    parser.add_argument("--peer-worker", nargs=2, metavar=("CFG_JSON", "EVENTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_worker:
        return peer_worker(*args.peer_worker)

    import ray
    from safetensors.torch import load_file

    from sasft_ray.config import absolute_paths, validate_config
    from sasft_ray.generate import generate
    from sasft_ray.rundir import RunDir
    from sasft_ray.tiny import build_tiny_model, write_demo_task

    tmp = Path(tempfile.mkdtemp())
    model = Path(args.model) if args.model else build_tiny_model(tmp / "model", "llama", layers=args.layers,
                                                                  hidden=args.hidden, warmup_steps=0)
    write_demo_task(tmp / "task.jsonl", n=2000)
    every = max(1, args.steps // 6)
    cfg = validate_config({
        "run_dir": str(tmp / "run"), "model": {"path": str(model), "dtype": "float32"},
        "data": {"path": str(tmp / "task.jsonl")},
        "selftalk": {"heldout_fraction": 0.0},  # no forgetting monitor: no self-talk engine to start
        "train": {"method": "sft", "num_workers": args.workers, "micro_batch_size": args.micro_batch,
                  "max_steps": args.steps, "checkpoint_every": every, "log_every": every, "lr": 1e-3,
                  "max_length": 128},
    })
    rd = RunDir(cfg.run_dir)
    generate(cfg, rd)
    bare = None if args.no_bare else bare_loop(cfg, rd, args.steps, warmup_steps=every)
    peer = torchrun(absolute_paths(cfg), args.workers)
    ours = ray_zero3(cfg, rd)
    ray.shutdown()

    params = sum(p.numel() for p in load_file(str(model / "model.safetensors")).values())
    print(f"\ntraining, {params / 1e6:.1f}M-parameter Llama, {args.steps} steps of "
          f"{args.micro_batch * args.workers} dialogues, on {os.cpu_count()} CPU cores")
    print(f"{'':36}{'tokens/s':>10}{'start-up s':>12}{'peak GiB':>10}")
    for name, r, note in (("bare PyTorch loop (1 process)", bare, ""),
                          (f"torchrun + ZeRO-3 ({args.workers} processes)", peer, "  (peak per process)"),
                          (f"Ray Train + ZeRO-3 ({args.workers} workers)", ours, "  (peak per worker)")):
        if r:
            print(f"{name:36}{r['tokens_per_s']:10.1f}{r['startup_s']:12.1f}{r['peak_gib']:10.2f}{note}")
    print(f"ratio Ray Train / torchrun (the same loop and ZeRO-3 config, {args.workers} gloo processes; steady-state "
          f"tokens/s): {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}")
    if bare:
        print(f"ratio Ray Train / bare loop (steady-state tokens/s): {ours['tokens_per_s'] / bare['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
