"""The Ray session every stage runs in: joining it, what of its output reaches the user, progress lines.

By default `sasft` prints its own lines only: each stage's start and result, and every ~30 s a
progress line of the long stages (rows or steps done, tokens/s, ETA), read from what the stage
writes in the run dir, so it works the same for a local run, a `ray job submit` and a remote run
dir. Ray's, Ray Data's, vLLM's and torch's own logs and warnings are left in Ray's log files
(`/tmp/ray/session_latest/logs` on each node) unless `--verbose` or SASFT_VERBOSE=1. A failure still
shows its cause: a worker's exception reaches the driver as it is raised.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sasft_ray.config import Config

VERBOSE = "SASFT_VERBOSE"
PROGRESS_EVERY_S = 30.0
# Their INFO logs and the warnings they raise are noise to a user unless asked for.
LIBRARIES = ("ray", "vllm", "torch", "transformers", "deepspeed", "lm_eval", "datasets", "huggingface_hub",
             "urllib3", "httpx", "httpx2", "httpcore", "openai", "absl", "filelock", "mlflow", "alembic",
             "matplotlib")
# Ray's libraries set levels of their own, below the "ray" logger's
LOGGERS = (*LIBRARIES, "ray.data", "ray.train", "ray.tune", "ray.serve", "ray.llm", "lm-eval", "DeepSpeed")


def verbose() -> bool:
    return os.environ.get(VERBOSE, "").lower() not in ("", "0", "false", "no")


def quiet() -> None:
    """Unless verbose: the libraries' loggers quiet, their warnings off (Ray Data's progress bars go off in
    `connect`). Called once by the CLI, before Ray starts."""
    if verbose():
        return
    quiet_loggers()
    warnings.filterwarnings("ignore", module=rf"({'|'.join(LIBRARIES)})(\.|$)")
    # tqdm stays on (TQDM_DISABLE would break vLLM's LLM.generate, which divides by a disabled bar's time)


def quiet_loggers() -> None:
    """The libraries' loggers at WARNING (vLLM's and DeepSpeed's at ERROR: their warnings are about their
    builds); again after Ray Data's import and Serve's start, which set theirs to INFO."""
    if verbose():
        return
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if name in ("vllm", "DeepSpeed") else logging.WARNING)


def connect(cfg: Config) -> None:
    """Join the cluster at resources.address (or RAY_ADDRESS, set inside `ray job submit`), or start an
    embedded local Ray. Workers' output reaches this driver only when verbose."""
    import ray

    if ray.is_initialized():
        return
    logs = {"log_to_driver": True} if verbose() else {
        "log_to_driver": False, "logging_config": ray.LoggingConfig(log_level="WARNING")}
    address = cfg.resources.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **logs)
    else:
        # Locally, CPU "slots" are logical: give every engine its bundle even on 2 cores, so that
        # the self-talk engines and the light maps beside them stream, and every endpoint's models fit,
        # all of them or an evaluation's wave (a Serve LLM replica holds one CPU besides its engine's bundle).
        endpoint = max(n * (1 + cfg.engine_cpus(serving=True, engines=n)) for n in range(1, cfg.served_engines + 1))
        wanted = 2 + math.ceil(max(cfg.selftalk.engine.concurrency * cfg.engine_cpus(serving=False), endpoint,
                                   cfg.train.num_workers * cfg.train.cpus_per_worker))
        ray.init(num_cpus=cfg.resources.num_cpus or max(os.cpu_count() or 1, wanted), include_dashboard=False,
                 **logs)
    if not verbose():
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = ctx.print_on_execution_start = False
        # its high-memory warning repeats every 30 s while an engine holds a real model: expected, not news
        ctx.issue_detectors_config.detectors = []
        quiet_loggers()


def bar(done: float, total: float, width: int = 20) -> str:
    filled = round(width * min(1.0, done / total)) if total else 0
    return "#" * filled + "." * (width - filled)


@contextmanager
def progress(line: Callable[[], str | None], every: float = PROGRESS_EVERY_S) -> Iterator[None]:
    """While the block runs, print `line()` every `every` seconds when it says something new: a new line
    each time in a log, one line rewritten in place in a terminal. A failing `line` is skipped (the
    progress of a stage is never why it fails)."""
    stop, shown, tty = threading.Event(), [None], sys.stdout.isatty()

    def tick() -> None:
        while not stop.wait(every):
            try:
                text = line()
            except Exception:
                continue
            if text and text != shown[0]:
                shown[0] = text
                print(f"\r\033[K{text}" if tty else text, end="" if tty else "\n", flush=True)

    thread = threading.Thread(target=tick, daemon=True, name="sasft-progress")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if tty and shown[0]:
            print(flush=True)
