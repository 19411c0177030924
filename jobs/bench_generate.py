"""Benchmark: the Ray Data self-talk pipeline against bare vLLM on the same work, in one run.

Both sides write the same number of self-dialogues from the same model with the same
sampling and engine settings: template-only user turn, then the assistant reply, for `--turns`
exchanges, on one engine each (`selftalk.engine.concurrency` 1).
  bare vLLM:  one in-process `LLM.generate` per turn and role, over all dialogues at once, as a
              user would script it
  pipeline:   `sasft_ray.selftalk.selftalk_dataset` (one `DialogueWriter` actor in Ray Data writing
              batches of whole dialogues), consumed to the end
  alone:      the same `DialogueWriter` driven in this process with no Ray, batch after batch: what
              Ray itself costs
Steady-state tokens/s of the pipeline is measured over the middle 60% of finished dialogues (each
row carries its finishing time), so that actor start-up is left out; start-up is reported apart as
the wall time the steady rate does not explain.
Peak memory is the highest total RSS of this process and its Ray / vLLM workers.

    python jobs/bench_generate.py                  # builds a small local model
    python jobs/bench_generate.py --model PATH --dialogues 4096
    python jobs/bench_generate.py --model runs/smollm2/model --dialogues 64 --batch-size 32   # a real model
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from bench_common import PeakMemory

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def bare_vllm(cfg, fmt, n: int) -> dict:
    from vllm import LLM, SamplingParams

    from sasft_ray.chat import load_tokenizer, render_prompt
    from sasft_ray.engines import engine_kwargs

    tokenizer = load_tokenizer(cfg.model.path)
    with PeakMemory() as mem:
        start = time.perf_counter()
        llm = LLM(cfg.model.path, **engine_kwargs(cfg, cfg.selftalk.engine, seed=cfg.selftalk.seed,
                                                  enable_prefix_caching=True))
        startup = time.perf_counter() - start
        histories: list[list[dict]] = [[] for _ in range(n)]
        tokens, start = 0, time.perf_counter()
        for _ in range(cfg.selftalk.turns):
            for role in ("user", "assistant"):
                stop = fmt.stop_user if role == "user" else fmt.stop_assistant
                params = SamplingParams(**cfg.selftalk.sampling(role), stop_token_ids=list(stop),
                                        skip_special_tokens=False)
                prompts = [render_prompt(tokenizer, fmt, h, role) for h in histories]
                for h, out in zip(histories, llm.generate(prompts, params, use_tqdm=False)):
                    h.append({"role": role, "content": out.outputs[0].text.strip()})
                    tokens += len(out.outputs[0].token_ids)
        seconds = time.perf_counter() - start
    del llm
    return {"startup_s": startup, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_gib": mem.total / 2**30}


def writer_alone(cfg, fmt, n: int) -> dict:
    """The pipeline's engine actor (`DialogueWriter`) driven in this process, batch after batch, no Ray:
    what the pipeline would reach if Ray cost nothing."""
    from sasft_ray.selftalk import DialogueWriter

    with PeakMemory() as mem:
        start = time.perf_counter()
        writer = DialogueWriter(cfg.model_dump_json(), fmt, n)
        startup, start = time.perf_counter() - start, time.perf_counter()
        size = cfg.selftalk.engine.batch_size
        rows = [r for b in range(-(-n // size)) for r in writer.write(b, list(range(b * size, min(n, (b + 1) * size))))]
        seconds = time.perf_counter() - start
    tokens = sum(r["num_tokens"] for r in rows)
    del writer
    return {"startup_s": startup, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_gib": mem.total / 2**30}


def pipeline(cfg, fmt, n: int) -> dict:
    """Steady state: tokens of the dialogues finished between the 20th and 80th percentile of
    finishing times, over that span; the actors' start-up lies before it."""
    import numpy as np

    from sasft_ray.selftalk import selftalk_dataset

    with PeakMemory() as mem:
        start = time.time()
        batches = list(selftalk_dataset(cfg, n, fmt).select_columns(["num_tokens", "finished_at"]).iter_batches(
            batch_size=None, batch_format="numpy"))
        end = time.time()
    tokens = np.concatenate([b["num_tokens"] for b in batches])
    finished = np.concatenate([b["finished_at"] for b in batches])
    lo, hi = np.percentile(finished, [20, 80])
    window = (finished > lo) & (finished <= hi)
    steady = tokens[window].sum() / (hi - lo)
    return {"startup_s": (end - start) - tokens.sum() / steady, "tokens": int(tokens.sum()), "seconds": end - start,
            "tokens_per_s": steady, "peak_gib": mem.total / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="HF model folder; default: build a small local one")
    parser.add_argument("--dialogues", type=int, default=1024)
    parser.add_argument("--turns", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    import ray
    import torch

    from sasft_ray.chat import load_tokenizer, turn_format
    from sasft_ray.config import validate_config
    from sasft_ray.session import connect
    from sasft_ray.tiny import build_tiny_model

    model = args.model or str(build_tiny_model(tempfile.mkdtemp() + "/bench-model", "llama", layers=4,
                                               hidden=256, warmup_steps=150))
    cfg = validate_config({
        "run_dir": tempfile.mkdtemp(), "model": {"path": model, "dtype": "float32"}, "data": {"path": "unused"},
        "selftalk": {"turns": args.turns, "max_user_tokens": args.max_tokens,
                     "max_assistant_tokens": args.max_tokens,
                     "engine": {"batch_size": args.batch_size, "max_model_len": 1024}},
        # throughput only: replies cut at --max-tokens are no reason to stop (a real model's mostly are)
        "filters": {"min_survival": 0.0},
    })
    fmt = turn_format(load_tokenizer(model))
    # Equal threads on every side: the pipeline's engine actor gets Ray's OMP_NUM_THREADS of its CPU bundle
    # (the machine's cores, `engine_cpus`); vLLM in this process would drop to one thread unless told.
    threads = int(cfg.engine_cpus(serving=False))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    bare = bare_vllm(cfg, fmt, args.dialogues)
    alone = writer_alone(cfg, fmt, args.dialogues)
    connect(cfg)
    ours = pipeline(cfg, fmt, args.dialogues)
    ray.shutdown()

    print(f"\nself-talk generation, {args.dialogues} dialogues x {args.turns} turn(s), "
          f"max {args.max_tokens} tokens per message, on {os.cpu_count()} CPU cores, {threads} thread(s) per engine")
    print(f"{'':24}{'tokens/s':>10}{'start-up s':>12}{'peak GiB':>10}{'engines':>9}")
    for name, r, engines in (("bare vLLM LLM.generate", bare, 1), ("DialogueWriter, no Ray", alone, 1),
                             ("Ray Data pipeline", ours, cfg.selftalk.engine.concurrency)):
        print(f"{name:24}{r['tokens_per_s']:10.0f}{r['startup_s']:12.1f}{r['peak_gib']:10.2f}{engines:9d}")
    print(f"ratio pipeline / bare (steady state tokens/s): {ours['tokens_per_s'] / bare['tokens_per_s']:.2f}")
    print(f"ratio writer without Ray / bare: {alone['tokens_per_s'] / bare['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
