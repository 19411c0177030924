"""Benchmark: the Ray Serve LLM endpoint against vLLM's own OpenAI server, on the same requests, in one run.

Both serve the same model with the same engine settings; the same client sends the same chat
requests (greedy, fixed max_tokens) with `--concurrency` in flight, over HTTP, through the
`openai` client:
  bare vLLM:  `python -m vllm.entrypoints.openai.api_server` in a subprocess
  Ray Serve:  `sasft_ray.serve.start` (the OpenAI router + one LLMServer deployment)
Printed: requests/s, p50 and p99 latency, and the ratio Ray Serve / bare for requests/s.
A warm-up round on each side comes first, so start-up is left out (and reported apart).
Two model sizes by default: a 4-layer model whose requests cost the engine little (the hops through
Serve's proxy, router and replica weigh as much), and a 12-layer one whose requests cost it well over
100 ms each (what a real model's do): the ratio that matters in practice.

    python jobs/bench_serve.py                   # builds both local models
    python jobs/bench_serve.py --sizes large     # the larger one only
    python jobs/bench_serve.py --model PATH --requests 512 --concurrency 32
    python jobs/bench_serve.py --model runs/smollm2/model --requests 128   # a real model
    python jobs/bench_serve.py --model PATH --url http://HOST:8000/v1 --model-id finetuned --api-key-env KEY
        # a Ray Serve endpoint already up (`sasft serve`, a RayService) against a bare server of its model
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_WAIT_POLICY": "PASSIVE", "VLLM_LOGGING_LEVEL": "WARNING"}


def load(url: str, model_id: str, prompts: list[str], max_tokens: int, concurrency: int,
         key: str | None = None) -> dict:
    import openai

    api = openai.OpenAI(base_url=url, api_key=key or "unused", max_retries=0, timeout=600)

    def one(prompt: str) -> float:
        start = time.perf_counter()
        api.chat.completions.create(model=model_id, messages=[{"role": "user", "content": prompt}],
                                    max_tokens=max_tokens, temperature=0.0)
        return time.perf_counter() - start

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, prompts[:concurrency]))  # warm-up
        start = time.perf_counter()
        latencies = sorted(pool.map(one, prompts))
        seconds = time.perf_counter() - start
    return {"rps": len(prompts) / seconds, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def bare_vllm(model: str, port: int, args) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
           "bench", "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "float32",
           "--max-model-len", "512", "--max-num-seqs", str(args.max_num_seqs)]
    start = time.perf_counter()
    # the same threads as the Ray Serve engine, which gets Ray's OMP_NUM_THREADS of its one-CPU bundle
    env = {**os.environ, **CPU_ENV, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        from sasft_ray.serve import wait_until_ready

        wait_until_ready(f"http://127.0.0.1:{port}/v1", ["bench"], None, timeout_s=600)
        startup = time.perf_counter() - start
        return load(f"http://127.0.0.1:{port}/v1", "bench", args.prompts, args.max_tokens, args.concurrency), startup
    finally:
        server.terminate()
        server.wait(60)


def ray_serve(model: str, port: int, args) -> tuple[dict, float]:
    import ray

    from sasft_ray import serve
    from sasft_ray.config import validate_config

    cfg = validate_config({"run_dir": tempfile.mkdtemp(), "model": {"path": model, "dtype": "float32"},
                           "data": {"path": "unused"},
                           "serve": {"port": port, "engine": {"max_model_len": 512, "max_num_seqs": args.max_num_seqs,
                                                              "cpus_per_engine": 1}}})
    ray.init(num_cpus=4, include_dashboard=False)
    start = time.perf_counter()
    url = serve.start(cfg, serve.Models({"bench": model}))
    startup = time.perf_counter() - start
    try:
        return load(url, "bench", args.prompts, args.max_tokens, args.concurrency), startup
    finally:
        serve.stop()
        ray.shutdown()


# (layers, hidden, warm-up steps): the large one untrained, so every reply runs to max_tokens
SIZES = {"small": (4, 256, 150), "large": (12, 768, 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="HF model folder; default: build the local models of --sizes")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["small", "large"])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--url", help="measure this Ray Serve endpoint instead of starting one (its engine should "
                                      "have --max-num-seqs and --model's weights; start-up is then not measured)")
    parser.add_argument("--model-id", default="finetuned", help="with --url: the model id to request")
    parser.add_argument("--api-key-env", help="with --url: the variable holding the endpoint's API key")
    args = parser.parse_args()
    if args.url and not args.model:
        parser.error("--url needs --model: the folder the bare server serves")
    if args.api_key_env and not os.environ.get(args.api_key_env):
        parser.error(f"--api-key-env {args.api_key_env}: that variable is not set")

    from sasft_ray.tiny import build_tiny_model, warmup_dialogues

    models = {"given": args.model} if args.model else {
        size: str(build_tiny_model(f"{tempfile.mkdtemp()}/bench-{size}", "llama", layers=SIZES[size][0],
                                   hidden=SIZES[size][1], warmup_steps=SIZES[size][2])) for size in args.sizes}
    args.prompts = [d[0]["content"] for d in warmup_dialogues(args.requests, seed=3)]
    rows = []
    for size, model in models.items():
        bare, bare_start = bare_vllm(model, 8210, args)
        if args.url:
            key = os.environ[args.api_key_env] if args.api_key_env else None
            ours, ours_start = load(args.url, args.model_id, args.prompts, args.max_tokens, args.concurrency,
                                    key), None  # not measured
        else:
            ours, ours_start = ray_serve(model, 8211, args)
        rows.append((size, bare, bare_start, ours, ours_start))

    print(f"\nchat completions, {args.requests} requests, {args.concurrency} in flight, max {args.max_tokens} tokens,"
          f" on {os.cpu_count()} CPU cores")
    print(f"{'':34}{'requests/s':>11}{'p50 s':>8}{'p99 s':>8}{'start-up s':>12}")
    for size, bare, bare_start, ours, ours_start in rows:
        for name, r, s in ((f"{size}: bare vLLM OpenAI server", bare, bare_start),
                           (f"{size}: Ray Serve LLM", ours, ours_start)):
            print(f"{name:34}{r['rps']:11.1f}{r['p50']:8.2f}{r['p99']:8.2f}{'-' if s is None else f'{s:.1f}':>12}")
        print(f"{size}: ratio Ray Serve / bare (requests/s): {ours['rps'] / bare['rps']:.2f}")


if __name__ == "__main__":
    main()
