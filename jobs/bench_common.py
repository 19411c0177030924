"""What the benchmarks share: peak memory of this process and of the Ray workers it drives."""

from __future__ import annotations

import os
import threading


class PeakMemory:
    """Samples RSS every 0.2 s: `total` sums this process and every Ray process, `per_worker` is the
    largest single process whose command line contains `worker_tag` (e.g. "RayTrainWorker")."""

    def __init__(self, worker_tag: str | None = None):
        import psutil

        self.psutil, self.worker_tag = psutil, worker_tag
        self.total = self.per_worker = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        total = 0
        for proc in self.psutil.process_iter(["pid", "cmdline", "memory_info"]):
            cmd, mem = " ".join(proc.info["cmdline"] or []), proc.info["memory_info"]
            rss = mem.rss if mem else 0
            if proc.info["pid"] == os.getpid() or "ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd:
                total += rss
            if self.worker_tag and self.worker_tag in cmd:
                self.per_worker = max(self.per_worker, rss)
        self.total = max(self.total, total)

    def __enter__(self):
        def loop():
            while not self._stop.wait(0.2):
                self._sample()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
