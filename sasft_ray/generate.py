"""`sasft generate`: task data -> self-talk -> filters -> mix, into the run directory.

Stages and what they write under `run_dir`:
  task      task/train.parquet, task/heldout.parquet (and external/ or replay/ for the methods that mix in
            general data, sources/<i>/ for mix.sources)
  selftalk  selftalk/*.parquet: every generated dialogue with its `drop_reason`; selftalk_heldout.parquet:
            the survivors held out as the forgetting monitor (every method: SFT generates only these)
  rewrite   rewrite/*.parquet (sdft only): each task training row with its replies rewritten by the base
            model, or its drop_reason (`sasft_ray.rewrite`)
  mix       mixed/*.parquet: task rows (sdft: the rewritten ones) and self (or external) rows at ratio λ
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from sasft_ray import data as task_data
from sasft_ray.chat import model_tokenizer, turn_format
from sasft_ray.config import Config, DataConfig
from sasft_ray.filters import KEPT, Deduplicator, mark_row
from sasft_ray.layout import MIXED, MONITOR, REWRITE, SELFTALK, SOURCES, TASK, source_folder, split_file
from sasft_ray.mix import mix_key, write_mix
from sasft_ray.rewrite import HASHED, write_rewrites
from sasft_ray.rundir import MODEL_FILES, RunDir, fingerprint, fingerprints
from sasft_ray.scorers import scorer_file
from sasft_ray.selftalk import LIGHT_CPUS, SelfTalkCut, Written, check_fits, selftalk_dataset
from sasft_ray.session import bar, connect, progress


class TooFewSurvivors(RuntimeError):
    pass


def write_canonical(cfg: DataConfig, rd: RunDir, folder: str, with_heldout: bool) -> dict:
    """Validate every row and write canonical Parquet, streaming in chunks."""
    report = task_data.LoadReport()
    splits = ("train", "heldout") if with_heldout else ("train",)
    rd.make_parent(split_file(folder, splits[0]))
    writers = {s: pq.ParquetWriter(rd.local(split_file(folder, s)), task_data.ROW_SCHEMA, filesystem=rd.fs)
               for s in splits}
    buffers: dict[str, list] = {s: [] for s in splits}
    counts = dict.fromkeys(splits, 0)

    def flush(split: str) -> None:
        if buffers[split]:
            writers[split].write_table(pa.Table.from_pylist(buffers[split], schema=task_data.ROW_SCHEMA))
            buffers[split].clear()

    try:
        for source_row, messages in task_data.iter_rows(cfg, report):
            split = "heldout" if with_heldout and task_data.is_heldout(messages, cfg.heldout_fraction) else "train"
            buffers[split].append({"messages": messages, "source_row": source_row})
            counts[split] += 1
            if len(buffers[split]) >= 4096:
                flush(split)
        for split in splits:
            flush(split)
    finally:
        for w in writers.values():
            w.close()
    if counts["train"] == 0:
        raise task_data.BadRow(cfg.path, "data.path", "no usable rows"
                               + (f" (skipped: {dict(report.skipped)})" if report.skipped else ""))
    for example in report.examples:
        print(f"  skipped {example}")
    return {"rows_in": report.rows_in, "rows_out": report.rows_out, "skipped": dict(report.skipped),
            **{f"{s}_rows": n for s, n in counts.items()}}


def task_stage(cfg: Config, rd: RunDir, force: bool) -> None:
    if rd.begin("task", cfg.section_hash("data"), force, outputs=(TASK,),
                inputs=fingerprints(cfg, "data.path")):
        counts = write_canonical(cfg.data, rd, TASK, with_heldout=True)
        if counts["heldout_rows"] == 0:  # the in-domain evaluation scores the held-out split
            rd.fail("task", counts, "no held-out rows")
            raise task_data.BadRow(cfg.data.path, "data.heldout_fraction", (
                f"data.heldout_fraction={cfg.data.heldout_fraction} leaves none of the {counts['train_rows']} rows "
                "held out, and the in-domain evaluation needs some; raise it (e.g. 0.1) or add rows"))
        rd.finish("task", counts)
    if cfg.mix.sources and rd.begin("sources", cfg.section_hash("mix.sources"), force, outputs=(SOURCES,),
                                    inputs={f"mix.sources.{i}": fingerprint(src.path)
                                            for i, src in enumerate(cfg.mix.sources)}):
        rd.finish("sources", {"train_rows": [
            write_canonical(src, rd, source_folder(i), with_heldout=False)["train_rows"]
            for i, src in enumerate(cfg.mix.sources)]})
    if (data := cfg.mixed_in_data) is not None:  # external-mix's, replay's general data
        stage, key = cfg.training_method.mixed_in.stage, f"mix.{cfg.training_method.mixed_in.data}"
        if rd.begin(stage, cfg.section_hash(key), force, outputs=(stage,), inputs=fingerprints(cfg, f"{key}.path")):
            rd.finish(stage, write_canonical(data, rd, stage, with_heldout=False))


def monitor_stage(cfg: Config, rd: RunDir, force: bool) -> None:
    """The forgetting monitor's dialogues of another run (`selftalk.monitor_from`), copied: a run that mixes
    in no self-talk is then measured on the very dialogues that run is, and starts no engine for them."""
    source = RunDir(cfg.selftalk.monitor_from)
    done = source.stage_info("selftalk")
    if done.get("status") != "done" or not done.get("heldout"):
        raise TooFewSurvivors(f"selftalk.monitor_from {source.root} has no forgetting-monitor dialogues "
                              f"({MONITOR} of a finished selftalk stage): run it first, or unset monitor_from")
    model = cfg.section_hash("model")
    made = f"{model}:from:{done['id']}"  # the dialogues by their stage's id, not their path: a copied run dir resumes
    legacy = f"{model}:from:{source.root}:{done['id']}"  # as runs before 2026-12-07 recorded it
    if rd.stage_info("selftalk").get("config_hash") == legacy:
        made = legacy
    if rd.begin("selftalk", made, force, outputs=(SELFTALK, MONITOR), inputs=fingerprints(cfg, *MODEL_FILES)):
        table = pq.read_table(source.local(MONITOR), filesystem=source.fs)
        pq.write_table(table, rd.local(MONITOR), filesystem=rd.fs)
        rd.finish("selftalk", {"rows_out": 0, "heldout": table.num_rows, "monitor_from": source.root})


def selftalk_stage(cfg: Config, rd: RunDir, force: bool, task_rows: int) -> None:
    """Generate, filter and write the self-dialogues; then set the forgetting monitor's slice apart
    (`selftalk_heldout.parquet`: `selftalk_wanted(...)[1]` survivors picked by a seeded hash, never mixed in)."""
    import ray

    mixed, monitor = cfg.selftalk_wanted(task_rows)
    if not rd.begin("selftalk", f"{cfg.section_hash('model', 'selftalk', 'filters')}:{mixed}:{monitor}", force,
                    outputs=(SELFTALK, MONITOR), inputs=fingerprints(cfg, *MODEL_FILES)):
        return
    tokenizer = model_tokenizer(cfg.model)
    fmt = turn_format(tokenizer)
    check_fits(cfg, tokenizer, fmt)
    connect(cfg)
    wanted = mixed + monitor
    generated = math.ceil(wanted * cfg.selftalk.oversample)
    written = ray.remote(num_cpus=0)(Written).remote()
    ds = selftalk_dataset(cfg, generated, fmt, written)
    ds = ds.map(functools.partial(mark_row, cfg=cfg.filters, markers=fmt.markers), num_cpus=LIGHT_CPUS)
    if cfg.filters.dedup != "none":  # one actor: it holds every survivor's signature
        ds = ds.map(Deduplicator, fn_constructor_kwargs=dict(mode=cfg.filters.dedup,
                                                             threshold=cfg.filters.minhash_threshold),
                    compute=ray.data.ActorPoolStrategy(size=1), num_cpus=LIGHT_CPUS)
    def finished() -> int:
        return ray.get(written.get.remote(), timeout=10)

    try:
        with progress(functools.partial(selftalk_progress, finished, generated, time.time())):
            ds.write_parquet(rd.path(SELFTALK))
    except Exception as e:
        if (cut := cut_message(e)) is None:
            raise
        rd.fail("selftalk", {"rows_in": generated}, "cut at a token limit")
        raise TooFewSurvivors(cut) from None
    finally:
        ray.kill(written)

    stats = selftalk_stats(rd)
    drops = stats.pop("drops")
    kept = drops.pop(KEPT, 0)
    held = write_monitor(cfg, rd, monitor)
    counts = {"rows_in": generated, "rows_out": min(kept - held, mixed), "survived": kept, "heldout": held,
              "drops": drops, **stats}
    if kept < wanted:
        message = (f"only {kept} of {wanted} wanted self-dialogues ({mixed} to mix in, {monitor} held out) survived "
                   f"the filters ({generated} generated; dropped: {drops}). Raise selftalk.oversample or the token "
                   "limits, or loosen filters")
        if kept < cfg.filters.min_survival * wanted:  # failed: the next run redoes it, it does not pass the gate
            rd.fail("selftalk", {**counts, "shortfall": wanted - kept}, "too few survivors")
            raise TooFewSurvivors(message + f" (below filters.min_survival={cfg.filters.min_survival})")
        print(f"[selftalk] WARNING: {message}")
        counts["shortfall"] = wanted - kept
    if held < monitor:  # the survivors were there, but too few of them complete
        print(f"[selftalk] WARNING: the forgetting monitor holds {held} of the {monitor} dialogues "
              f"selftalk.heldout_fraction asks for: it takes complete dialogues only, and {stats['open_ended']} of the "
              f"{kept} survivors were cut at max_assistant_tokens {cfg.selftalk.max_assistant_tokens} (kept open by "
              "filters.truncated: keep). Raise max_assistant_tokens for a monitor")
        counts["monitor_shortfall"] = monitor - held
    rd.finish("selftalk", counts)


def rewrite_stage(cfg: Config, rd: RunDir, force: bool, task_rows: int) -> None:
    """sdft: the task's training rows with their replies rewritten by the base model; fails, to be redone, if
    fewer than filters.min_survival of them are left to train on."""
    keep_if = {"sdft.keep_if": fingerprint(path)} if (path := scorer_file(cfg.sdft.keep_if)) else {}
    if not rd.begin("rewrite", rd.chained(cfg.section_hash(*HASHED), TASK), force, outputs=(REWRITE,),
                    inputs={**fingerprints(cfg, *MODEL_FILES), **keep_if}):  # a module:function scorer's file too
        return
    counts = write_rewrites(cfg, rd, task_rows)
    if counts["rows_out"] < cfg.filters.min_survival * counts["rows_in"]:
        rd.fail("rewrite", counts, "too few survivors")
        raise TooFewSurvivors(
            f"only {counts['rows_out']} of the {counts['rows_in']} task rows are left to train on after their "
            f"rewrites (dropped: {counts['drops']}), below filters.min_survival={cfg.filters.min_survival}: loosen "
            f"sdft.keep_if (or sdft.min_score, sdft.answer_pattern), or set sdft.on_lost: original")
    rd.finish("rewrite", counts)


def cut_message(error: BaseException) -> str | None:
    """The message of the `SelfTalkCut` an engine raised, if that is what stopped the stage: Ray Data hands
    the driver an exception of its own that holds the worker's traceback as text, not the original."""
    found = re.search(rf"{SelfTalkCut.__name__}: (.+)", str(error))
    return found.group(1).strip() if found else None


def selftalk_progress(finished: Callable[[], int], total: int, started: float) -> str:
    """Dialogues the engines have `finished` so far (each counts once it ends), their rate and the time left;
    a batch retried after an engine died is counted again, so the count is capped at the total."""
    done = min(total, finished())
    seconds = time.time() - started
    eta = f", ETA {(total - done) / done * seconds / 60:.1f} min" if done else ""
    return f"[selftalk] {bar(done, total)} {done}/{total} dialogues in {seconds:.0f} s{eta}"


def write_monitor(cfg: Config, rd: RunDir, count: int) -> int:
    """The `count` survivors with the smallest seeded keys, written to `MONITOR`; returns how many. Only
    complete dialogues: a reply kept open at its token limit (`filters.truncated: keep`) is no measure of
    how likely the model finds its own replies, end of turn included."""
    table = pads.dataset(rd.local(SELFTALK), filesystem=rd.fs, format="parquet").to_table(
        columns=["id", "messages"], filter=(pc.field("drop_reason") == KEPT) & ~pc.field("open_end"))
    ids = sorted(table["id"].to_pylist(), key=lambda i: mix_key(cfg.selftalk.seed, "monitor", i))[:count]
    pq.write_table(table.filter(pc.is_in(table["id"], pa.array(ids, pa.int64()))), rd.local(MONITOR),
                   filesystem=rd.fs)
    return len(ids)


def selftalk_stats(rd: RunDir) -> dict:
    """Drop counts, tokens and topic coverage, from three small columns (no dialogue text in the driver)."""
    table = pads.dataset(rd.local(SELFTALK), filesystem=rd.fs, format="parquet").to_table(
        columns=["drop_reason", "num_tokens", "first_words", "open_end"])
    drops = {d["values"]: d["counts"] for d in pc.value_counts(table["drop_reason"]).to_pylist()}
    kept = table.filter(pc.equal(table["drop_reason"], KEPT))
    firsts = sorted(pc.value_counts(kept["first_words"]).to_pylist(), key=lambda d: -d["counts"])
    total = max(1, len(kept))
    entropy = -sum(d["counts"] / total * math.log2(d["counts"] / total) for d in firsts)
    return {"drops": drops, "generated_tokens": int(pc.sum(table["num_tokens"]).as_py() or 0),
            # kept with the last reply cut at its token limit (`filters.truncated: keep`), trained open
            "open_ended": int(pc.sum(kept["open_end"]).as_py() or 0),
            "coverage": {"distinct_first_words": len(firsts), "first_words_entropy_bits": round(entropy, 3),
                         "top_first_words": {d["values"]: d["counts"] for d in firsts[:10]}}}


def mix_hash(cfg: Config, rd: RunDir) -> str:
    """The mix's settings and the runs of the stages it reads (the task's, and the self-talk's or the
    external data's): after any of them is redone, the mix is stale."""
    reads = cfg.training_method.reads
    return rd.chained(cfg.section_hash("mix", "train.method"), *reads, *(("sources",) if cfg.mix.sources else ()))


def mix_stage(cfg: Config, rd: RunDir, force: bool) -> None:
    if rd.begin("mix", mix_hash(cfg, rd), force, outputs=(MIXED,)):
        rd.finish("mix", write_mix(cfg, rd))


STAGES = ("task", "selftalk", "rewrite", "mix")  # rewrite after selftalk: `--redo rewrite` keeps the self-talk


def build_assets(cfg: Config) -> None:
    """The lab a demo config points at, built on first use (`bootstrap`); cached afterwards. The task
    file is checked first when it exists already: bad input is named before a long build."""
    if not cfg.bootstrap:
        return
    if Path(cfg.data.path).is_file():
        for _ in task_data.iter_rows(cfg.data, task_data.LoadReport()):
            pass
    if cfg.bootstrap == "smollm2":
        from sasft_ray import realdemo
        realdemo.build(Path(cfg.model.path).parent)
        return
    from sasft_ray.lab import build_lab, lab_folder
    build_lab(lab_folder(cfg), preset="full" if cfg.bootstrap == "lab" else "small")


def generate(cfg: Config, rd: RunDir, redo: str | None = None) -> None:
    """Run the data stages into `rd`; `redo` names the first stage to redo even if done ("all": every one)."""
    first = 0 if redo == "all" else STAGES.index(redo) if redo else len(STAGES)
    force = {name: i >= first for i, name in enumerate(STAGES)}
    with rd.locked():
        build_assets(cfg)
        task_stage(cfg, rd, force["task"])
        task_rows = rd.stage_info("task")["train_rows"]
        cfg.check_dialogues(task_rows)  # the task's size is known now: before any self-talk is paid for
        mixed, monitor = cfg.selftalk_wanted(task_rows)
        if monitor and not mixed and cfg.selftalk.monitor_from:  # another run's monitor, for this one too
            monitor_stage(cfg, rd, force["selftalk"])
        elif mixed or monitor:  # SA-SFT's self-talk, or the forgetting monitor's slice of it
            selftalk_stage(cfg, rd, force["selftalk"], task_rows)
        if cfg.training_method.rewrites:
            rewrite_stage(cfg, rd, force["rewrite"], task_rows)
        mix_stage(cfg, rd, force["mix"])
        rd.save_config(cfg)  # after the checks: a refused run does not relabel the old results
