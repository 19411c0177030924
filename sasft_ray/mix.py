"""Mix task rows with self-talk (or external) rows at ratio λ, deterministically.

Which rows: the other source contributes exactly round(λ · task rows) rows (fewer only
if fewer survived the filters, with a warning), those whose key hashed from (seed, source, id) is smallest: a
seeded sample, the same on every run. With `mix.max_distinct` it contributes as
many rows from fewer distinct ones: the sample is repeated, reshuffled each pass.

In what order: every source streams in windows, each window shuffled with a seeded
generator. What a window holds depends on the rows, not on how the stage that wrote them was
scheduled: the files are read in the order of their first row id, a window sorted by id before
its shuffle. The streams are merged by fractional position (row i of n sits at
(i + ½) / n), so every stretch of the output holds the sources in their ratio (λ),
not only the whole. Only a window of rows is ever in memory. `mix.sources` adds
further datasets by the same rule, at their weights, for every method.

Methods differ only in what is mixed in (`sasft_ray.methods`): `sa-sft` self-talk, `external-mix` and
`replay` their general dataset, `sft-matched` the task rows again, `sft` and `freeze` nothing; `sdft` mixes
nothing in but takes its task rows from the rewrite stage (`sasft_ray.rewrite`: the replies in the base
model's words), the kept ones. The self-dialogues held out as the forgetting monitor
(`selftalk_heldout.parquet`) are never mixed in.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections.abc import Iterator, Sequence
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from sasft_ray.config import Config
from sasft_ray.data import MESSAGE_TYPE
from sasft_ray.filters import KEPT
from sasft_ray.layout import MIXED_PART, MONITOR, REWRITE, TASK_TRAIN, source_folder, split_file
from sasft_ray.methods import SELF_DIALOGUES
from sasft_ray.rundir import RunDir

# source: task, self, external, replay, repeat, or source<i> (the i-th of mix.sources)
# open_end: a self-dialogue whose last reply was cut at its token limit (`filters.truncated: keep`), trained
# without an end of turn
MIXED_SCHEMA = pa.schema([("messages", MESSAGE_TYPE), ("source", pa.string()), ("id", pa.int64()),
                          ("open_end", pa.bool_())])
WINDOW = 4096


def mix_key(seed: int, source: str, row_id: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{source}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Source:
    """One input of the mix: a Parquet dataset, the id column that names its rows, a filter."""

    def __init__(self, rd: RunDir, name: str, folder: str, id_column: str, only_kept: bool = False,
                 excluded: Sequence[int] = ()):
        self.name, self.id_column = name, id_column
        files = pads.dataset(rd.local(folder), filesystem=rd.fs, format="parquet").files
        # Ray Data numbers a stage's files in the order its blocks finished: read them by their first row
        # instead, so the same rows mix in the same order however the stage that wrote them was scheduled
        self.dataset = pads.dataset(sorted(files, key=lambda f: self._first_id(f, rd)), filesystem=rd.fs,
                                    format="parquet")
        self.filter = pc.field("drop_reason") == KEPT if only_kept else None
        if excluded:
            out = ~pc.field(id_column).isin(pa.array(list(excluded), pa.int64()))
            self.filter = out if self.filter is None else self.filter & out

    def _first_id(self, file: str, rd: RunDir) -> int:
        ids = pq.read_table(file, columns=[self.id_column], filesystem=rd.fs)[self.id_column]
        return pc.min(ids).as_py() if len(ids) else -1

    def ids(self) -> np.ndarray:
        table = self.dataset.to_table(columns=[self.id_column], filter=self.filter)
        return table[self.id_column].to_numpy()

    def sample(self, seed: int, count: int) -> int:
        """Keep only the `count` rows with the smallest keys; returns how many rows are kept."""
        ids = self.ids()
        if count < len(ids):
            chosen = heapq.nsmallest(count, ids.tolist(), key=lambda i: mix_key(seed, self.name, i))
            only = pc.field(self.id_column).isin(pa.array(chosen, pa.int64()))
            self.filter = only if self.filter is None else self.filter & only
        return min(count, len(ids))

    def rows(self, seed: int, count: int) -> Iterator[dict]:
        """`count` selected rows: all of them in file order shuffled within windows (each window's rows
        by id first: the files' own order does not count), then again, shuffled anew, while more are wanted."""
        passes = (self._one_pass(seed + n) for n in itertools.count())
        return itertools.islice(itertools.chain.from_iterable(passes), count)

    def _one_pass(self, seed: int) -> Iterator[dict]:
        rng = np.random.default_rng(mix_key(seed, self.name, -1))
        window: list[dict] = []
        open_end = "open_end" in self.dataset.schema.names  # self-talk rows carry it
        columns = ["messages", self.id_column] + (["open_end"] if open_end else [])
        for batch in self.dataset.scanner(columns=columns, filter=self.filter).to_batches():
            for row in batch.to_pylist():
                window.append({"messages": row["messages"], "source": self.name, "id": row[self.id_column],
                               "open_end": bool(row.get("open_end"))})
                if len(window) == WINDOW:
                    yield from _shuffled(window, rng)
                    window = []
        yield from _shuffled(window, rng)


def _shuffled(window: list[dict], rng: np.random.Generator) -> Iterator[dict]:
    window.sort(key=lambda row: row["id"])
    return (window[i] for i in rng.permutation(len(window)))


def interleave(*streams: tuple[Iterator[dict], int]) -> Iterator[dict]:
    """Merge (rows, count) streams by fractional position: row i of n goes to (i + ½) / n (ties: the
    earlier stream first)."""
    heap = [(Fraction(1, 2 * n), k, 0) for k, (_, n) in enumerate(streams) if n]  # exact: ties stay ties
    heapq.heapify(heap)
    while heap:
        _, k, i = heapq.heappop(heap)
        yield next(streams[k][0])
        n = streams[k][1]
        if i + 1 < n:
            heapq.heappush(heap, (Fraction(2 * i + 3, 2 * n), k, i + 1))


def write_mix(cfg: Config, rd: RunDir) -> dict:
    """Write `MIXED_PART`; returns the counts for the manifest."""
    seed = cfg.mix.seed
    if cfg.training_method.rewrites:  # sdft: the task rows as the base model rewrote them, those kept
        task = Source(rd, "task", REWRITE, "source_row", only_kept=True)
        task_rows = rd.stage_info("rewrite")["rows_out"]
    else:
        task = Source(rd, "task", TASK_TRAIN, "source_row")
        task_rows = rd.stage_info("task")["train_rows"]
    counts = {"task_rows": task_rows, "self_ratio": cfg.mix.self_ratio, "method": cfg.train.method}
    mixed_in = cfg.training_method.mixed_in
    got = 0
    streams: list[tuple[Iterator[dict], int]] = [(task.rows(seed, task_rows), task_rows)]
    if mixed_in is not None:
        other_name = mixed_in.source
        wanted = cfg.mixed_in_rows(task_rows)  # never capped by a setting: `check_dialogues` refused a short pool
        if mixed_in is SELF_DIALOGUES:
            # the forgetting monitor's dialogues are never trained on
            monitor = pq.read_table(rd.local(MONITOR), columns=["id"], filesystem=rd.fs)["id"].to_pylist() \
                if rd.exists(MONITOR) else []
            other = Source(rd, other_name, mixed_in.stage, "id", only_kept=True, excluded=monitor)
        else:
            other = Source(rd, other_name, split_file(mixed_in.stage, "train"), "source_row")
        distinct = other.sample(seed, min(wanted, cfg.mix.max_distinct or wanted))
        got = wanted if (cfg.mix.max_distinct or mixed_in.repeats) and distinct else distinct
        if got < wanted:
            print(f"[mix] WARNING: wanted {wanted} {other_name} rows for self_ratio={cfg.mix.self_ratio}, "
                  f"only {got} available: the achieved ratio is {got / task_rows:.3f}")
        streams.append((other.rows(seed, got), got))
        counts.update(mixed_in_source=other_name, achieved_ratio=round(got / task_rows, 4),
                      mixed_in_distinct=distinct)
    if cfg.mix.sources:  # each further source at its weight, repeated in turn if it has fewer rows
        wanted = cfg.source_rows(task_rows)
        for i, n in enumerate(wanted):
            source = Source(rd, f"source{i}", split_file(source_folder(i), "train"), "source_row")
            source.sample(seed, n)
            streams.append((source.rows(seed, n), n))
        counts["source_rows"] = wanted
    rows = interleave(*streams)

    rd.make_parent(MIXED_PART)
    with pq.ParquetWriter(rd.local(MIXED_PART), MIXED_SCHEMA, filesystem=rd.fs) as writer:
        chunk: list[dict] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == WINDOW:
                writer.write_table(pa.Table.from_pylist(chunk, schema=MIXED_SCHEMA))
                chunk = []
        writer.write_table(pa.Table.from_pylist(chunk, schema=MIXED_SCHEMA))
    counts.update(rows_out=sum(n for _, n in streams), mixed_in_rows=got)
    return counts
