"""Benchmark: the demo's evaluation, models one after another with 16 requests in flight (how it ran
before) against all models at once with the served engines' `max_num_seqs` in flight (how it runs now),
on the same endpoint, in one run.

The endpoint serves the demo's three models (base, SA-SFT, SFT: `runs/demo`'s exports when a demo has
run, else the lab's base model under each id), each its own engine, as `sasft run demo` does; the task's
held-out split and the lab's eight general suites are scored with the demo's scorers. Printed: wall time
of each way and the ratio before / after.

    python jobs/bench_eval.py                    # needs the lab (runs/lab: `sasft run demo` builds it)
    python jobs/bench_eval.py --config demo --set serve.engine.max_num_seqs=64
    python jobs/bench_eval.py --url http://127.0.0.1:8000/v1   # an endpoint already serving the models
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--url", help="an endpoint already serving the config's models under their ids "
                                      "(`sasft serve`); default: start one, then stop it")
    args = parser.parse_args()

    import ray

    from sasft_ray import serve
    from sasft_ray.config import load_config
    from sasft_ray.evaluate import evaluate_models
    from sasft_ray.generate import task_stage
    from sasft_ray.layout import MODEL
    from sasft_ray.rundir import RunDir
    from sasft_ray.session import connect

    cfg = load_config(args.config, args.overrides)
    if not args.url and not Path(cfg.model.path).is_dir():
        raise SystemExit(f"no model at {cfg.model.path}: run `sasft run demo` once to build the lab")
    scratch = tempfile.mkdtemp(prefix="bench-eval-")
    trained = RunDir(cfg.run_dir)
    exports = {cfg.serve.model_id: Path(trained.path(MODEL)),
               **{m: Path(trained.compare(m).path(MODEL)) for m in cfg.compare}}
    models = {model_id: str(path) if (path / "config.json").exists() else cfg.model.path
              for model_id, path in exports.items()}
    models[cfg.serve.base_model_id] = cfg.model.path
    cfg = cfg.model_copy(update={"run_dir": f"{scratch}/run"})
    rd = RunDir(cfg.run_dir)
    task_stage(cfg, rd, force=False)  # the held-out split the in-domain score reads

    def with_eval(**update):  # a base cache of its own per way: neither reads the other's scores
        return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={
            "base_cache": tempfile.mkdtemp(dir=scratch), **update})})

    url = args.url
    if not url:
        connect(cfg)  # CPU slots for every served model, as `sasft run` asks for them
        url = serve.start(cfg, serve.Models(models))
    ids, key = {m: m for m in models}, serve.api_key(cfg)
    try:
        before = with_eval(concurrency=16)
        start = time.perf_counter()
        for model_id in ids:
            evaluate_models(before, rd, url, {model_id: model_id}, key)
        sequential = time.perf_counter() - start

        now = with_eval()
        start = time.perf_counter()
        evaluate_models(now, rd, url, ids, key)
        concurrent = time.perf_counter() - start
    finally:
        if not args.url:
            serve.stop()
            ray.shutdown()

    print(f"\nthe {args.config} evaluation: {len(ids)} models ({', '.join(ids)}), in-domain + "
          f"{len(cfg.eval.suites)} suite group(s), on {os.cpu_count()} CPU cores")
    print(f"  one model after another, 16 requests in flight:      {sequential:7.1f} s")
    print(f"  all models at once, {now.eval_concurrency} in flight each (max_num_seqs): {concurrent:7.1f} s")
    print(f"ratio before / after (wall time): {sequential / concurrent:.2f}")


if __name__ == "__main__":
    main()
