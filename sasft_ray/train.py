"""`sasft train`: DeepSpeed ZeRO fine-tuning (full, or LoRA) on Ray Train, then an HF export.

The driver tokenizes the mixed dataset with Ray Data (loss on assistant tokens only),
optionally packs it (`train.packing`, see `sasft_ray.packing`), checks everything that
can be checked before a worker starts, and launches a `TorchTrainer`. Each worker is thin
glue around `sasft_ray.loop` (the engine and the loop, which `jobs/check_gpu.py` runs
without Ray): its dataset shards, checkpoints (every rank writes its ZeRO shard; Ray Train
uploads them in the background and merges them in one folder), `ray.train.report`, and a
record every `train.log_every` steps in `<run_dir>/train-events.jsonl`. At the end rank 0
gathers the full weights (adapters merged in), writes `<run_dir>/model/` and the per-layer
weight drift `<run_dir>/model/drift.json` (`sasft_ray.export`), of the checkpoint
`train.select` chooses by the held-out losses (`sasft_ray.selection`; the last by default): every
rank loads that checkpoint first if it is not the last. Ray Train keeps the latest
`train.keep_checkpoints`; the checkpoints that are, or may become, the choice are copied aside
into `<run_dir>/train-kept/` before Ray Train could delete them. The checkpoints, which hold the
optimizer state, are then deleted unless `train.keep_checkpoints_after_export`, and the driver
writes the model card `<run_dir>/model/README.md` (`sasft_ray.card`, scores added by the eval).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from sasft_ray import loop, packing, selection
from sasft_ray.card import write_model_card
from sasft_ray.chat import encode, model_tokenizer, turn_format
from sasft_ray.config import Config, ModelConfig
from sasft_ray.export import export
from sasft_ray.layout import (
    DRIFT,
    EVENTS,
    FAILED_ONCE,
    KEPT_DIR,
    KEPT_MARK,
    KEPT_STEP,
    MIXED,
    MODEL,
    MONITOR,
    PARTIAL,
    RAY_TRAIN,
    TASK_HELDOUT,
    TRAIN_RESULT,
    kept,
)
from sasft_ray.rundir import MODEL_FILES, RunDir, fingerprints
from sasft_ray.session import bar, connect, progress
from sasft_ray.tracking import Tracker, check_backends, forwarded_env, train_metrics

IGNORE = packing.IGNORE


class TrainSetupError(ValueError):
    """A training config or dataset that cannot work, found before any worker starts."""


# --- tokenization: the model's own chat template, loss on assistant tokens only (`sasft_ray.chat`) -------

def _encode_batch(batch: dict, *, model: ModelConfig, max_length: int, strip_bos: str) -> dict:
    """A conversation's sequences (one but where the template is not prefix-stable, `chat.encode`), each a row
    of its conversation's `source`."""
    tokenizer = model_tokenizer(model)
    open_ends = batch.get("open_end", [False] * len(batch["messages"]))
    encoded = [encode(tokenizer, list(m), max_length, strip_bos, bool(o)) for m, o in zip(batch["messages"], open_ends)]
    rows = [e for sequences in encoded for e in sequences]
    return {"input_ids": _ragged([e["input_ids"] for e in rows]),
            "labels": _ragged([e["labels"] for e in rows]),
            "targets": np.array([sum(lab != IGNORE for lab in e["labels"]) for e in rows], dtype=np.int64),
            **({"source": [s for s, e in zip(batch["source"], encoded) for _ in e]} if "source" in batch else {})}


def _ragged(rows: list[list[int]]) -> np.ndarray:
    """An object array of int64 arrays of different lengths (numpy would try to make it 2-D)."""
    out = np.empty(len(rows), dtype=object)
    out[:] = [np.asarray(r, dtype=np.int64) for r in rows]
    return out


# rows a tokenizing task takes: 0.3 ms each for the demo's, after the ~12 s of CPU a fresh worker spends on its
# imports and the tokenizer (docs/benchmarks.md)
ROWS_PER_TASK = 20_000


def tokenized(cfg: Config, path: str, strip_bos: str, columns: tuple[str, ...] = ()):
    """Tokenized rows of a Parquet folder or file, materialized so the driver knows the counts; `columns`
    of the file are kept beside them (the mix's `source`)."""
    import ray

    encode_fn = functools.partial(_encode_batch, model=cfg.model, max_length=cfg.train.max_length,
                                  strip_bos=strip_bos)
    # Ray Data's V2 Parquet reader starts a pool of footer-reading actors on every read (~9 s on
    # 2 cores, twice per training run); a run's few Parquet files read as fast in V1's plain tasks.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    # a block per ROWS_PER_TASK rows: Ray Data would cut even a few thousand rows into 2 blocks per logical CPU,
    # and each task's first batch on a fresh worker costs ~12 s of CPU (transformers, the tokenizer)
    rows = ray.data.read_parquet(path).count()  # from the files' footers
    ds = ray.data.read_parquet(path, override_num_blocks=max(1, math.ceil(rows / ROWS_PER_TASK)))
    # rows in the file's order, whatever the cluster: each rank's share and its order by step follow from it
    ds.context.execution_options.preserve_order = True
    # held-out sets have no open_end (self-talk rows cut at their limit, `filters.truncated: keep`)
    wanted = [c for c in ("messages", *columns, "open_end") if c in ds.schema().names]
    return ds.select_columns(wanted).map_batches(encode_fn, batch_size=256, num_cpus=0.5).materialize()


def _source_sums(batch):
    return batch.group_by("source").aggregate([("targets", "count"), ("targets", "sum")])


def per_source(ds) -> dict[str, dict[str, int]]:
    """Rows and target tokens (what the loss weighs, after max_length cuts) of each source of the tokenized
    training rows, in the mix's order: task first."""
    out: dict[str, dict[str, int]] = {}
    sums = ds.select_columns(["source", "targets"]).map_batches(_source_sums, batch_format="pyarrow", num_cpus=0.5)
    for part in sums.take_all():  # a few rows a block
        counts = out.setdefault(part["source"], {"rows": 0, "target_tokens": 0})
        counts["rows"] += part["targets_count"]
        counts["target_tokens"] += part["targets_sum"]
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != "task", kv[0])))


def _pack_batch(batch: dict, *, max_length: int) -> dict:
    packed = packing.pack(list(batch["input_ids"]), list(batch["labels"]), max_length)
    return {**{k: _ragged(v) for k, v in packed.items()},
            "targets": np.array([int((lab != IGNORE).sum()) for lab in packed["labels"]], dtype=np.int64)}


def packed(ds, max_length: int):
    """Tokenized rows packed into sequences of at most `max_length` tokens (first-fit decreasing
    within batches of 1,024 rows), materialized."""
    return ds.map_batches(functools.partial(_pack_batch, max_length=max_length), batch_size=1024,
                          num_cpus=0.5).materialize()


# --- the worker: thin glue between Ray Train and `sasft_ray.loop` ---------------------------------

FAIL_ONCE_AT_STEP = "SASFT_FAIL_ONCE_AT_STEP"  # the tests' fault: the last worker exits once at this step
TRAIN_SHARD = "train_"  # + rank: the Ray Train dataset of each rank's share of the training rows
# record key -> Ray Train dataset of a held-out set: the task's, and the forgetting monitor's self-dialogues
HELDOUT = {"heldout_loss": "heldout", "selftalk_heldout_loss": "selftalk_heldout"}


def train_loop(config):  # no default on `config`: Ray Train 2.60 would drop it silently
    import ray.train
    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn
    from ray.train import CheckpointUploadMode

    cfg = Config.model_validate(config["cfg"])
    t, total_steps = cfg.train, config["total_steps"]
    steps_per_epoch = config["steps_per_epoch"]
    rd = RunDir(cfg.run_dir)  # local, a shared mount, or s3:// / gs://: every node reaches it
    loop.init_deepspeed(cfg.resources.use_gpu)  # on Ray Train's process group
    rank = ray.train.get_context().get_world_rank()
    nodes = [None] * t.num_workers  # where each rank runs, logged at every (re)start
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    engine, _, n_trainable, n_total = loop.build_engine(cfg, total_steps, rank)

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with rank_files(checkpoint, rank) as folder:
            _, client = engine.load_checkpoint(folder, tag="ds")
            step = client["step"]
        if rank == 0:
            print(f"[train] resumed from step {step}")
    tracker = None
    if rank == 0:
        epoch, done = divmod(step, steps_per_epoch)  # where in the data: each rank's row of its share
        log_event(rd, event="resumed" if checkpoint else "started", step=step, nodes=nodes, epoch=epoch,
                  row=done * t.grad_accum * t.micro_batch_size)
        tracker = Tracker(cfg, rd, config=cfg.model_dump(mode="json")) if t.report_to else None

    # this rank's own share of the training rows, in order (the driver's split): an epoch's order follows from
    # the step alone (`loop.epoch_batches`), so a restarted run goes on where the data stopped
    shard = ray.train.get_dataset_shard(f"{TRAIN_SHARD}{rank}")
    batches = functools.partial(loop.epoch_batches, functools.partial(
        shard.iter_batches, batch_size=loop.WINDOW, batch_format="numpy"), cfg, steps_per_epoch, config["pad_id"])

    class Collate(NumpyBatchCollateFn):  # Ray Data then moves its tensors to this worker's device
        def __call__(self, batch: dict) -> dict:
            return loop.collate(batch, config["pad_id"])

    collate = Collate()

    def log(record: dict) -> None:
        saving = "heldout_loss" in record
        log_event(rd, event="checkpoint" if saving else "log", **record)  # the driver prints it from there
        if tracker:
            tracker.log(train_metrics(record), record["step"])

    def save(step: int, record: dict) -> None:
        # every rank writes its ZeRO shard; Ray Train uploads them in the background and merges them
        folder = tempfile.mkdtemp(prefix="sasft-ckpt-")
        engine.save_checkpoint(folder, tag="ds", client_state={"step": step})
        if rank == 0 and t.select != "last":  # before this report: Ray Train deletes old ones on registering it
            keep_for_selection(rd, t.select, t.select_tolerance, step)
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC)

    fail_at = int(os.environ.get(FAIL_ONCE_AT_STEP, 0)) if rank == t.num_workers - 1 else None

    def after_step(step: int) -> None:
        if step == fail_at and not rd.exists(FAILED_ONCE):
            rd.write_text("failed once", FAILED_ONCE)
            time.sleep(5)  # let the controller collect the last report (it polls every 2 s)
            os._exit(1)  # a real process death: Ray Train must restart from the checkpoint

    heldout = {key: functools.partial(ray.train.get_dataset_shard(name).iter_torch_batches,
                                      batch_size=t.micro_batch_size, collate_fn=collate)
               for key, name in HELDOUT.items() if name in config["heldout_sets"]}
    end = loop.run(engine, cfg, batches, heldout, total_steps=total_steps, step=step, log=log, checkpoint=save,
                   after_step=after_step if fail_at else None)

    # the checkpoint to export, by the record of every checkpoint (rank 0's reading of it, for all ranks)
    chosen = [selection.selection(t.select, t.select_tolerance, selection.losses_by_step(
        train_events(rd), up_to=end["step"])) if rank == 0 else None]
    torch.distributed.broadcast_object_list(chosen, src=0, device=engine.device)
    chosen = chosen[0]
    if chosen["step"] != end["step"]:
        if rank == 0:
            print(f"[train] exporting step {chosen['step']}, not {end['step']} (train.select {t.select}: "
                  f"{chosen['why']})")
        with rank_files(ray.train.Checkpoint(rd.path(kept(chosen["step"]))), rank) as folder:
            engine.load_checkpoint(folder, tag="ds", load_optimizer_states=False, load_lr_scheduler_states=False)
        # the exported model's own held-out losses: those recorded at its step, measured again
        end = {"step": chosen["step"], **{key: loop.heldout_loss(engine, held()) for key, held in heldout.items()}}

    # written aside and moved into place whole: a crash never leaves a model/ that looks finished
    with tempfile.TemporaryDirectory() as scratch:  # a remote run_dir gets the folder once it is whole
        out = scratch if rd.remote else rd.local(PARTIAL)
        export(engine, cfg, out, rank)
        if rank == 0:
            Path(out, TRAIN_RESULT).write_text(json.dumps(
                {**{key: end[key] for key in heldout}, "selected": chosen, "trainable_params": n_trainable,
                 "total_params": n_total}))
            if rd.remote:
                rd.upload(out, MODEL)
            else:
                os.replace(out, rd.local(MODEL))
    if tracker:
        tracker.close()


@contextlib.contextmanager
def rank_files(checkpoint, rank: int):
    """A local folder of what `rank` loads from a checkpoint: its own ZeRO shards (`zero_pp_rank_<rank>_`) and
    the files every rank reads; a checkpoint on this node's own filesystem is read where it is. Ray's
    `as_directory` would download every rank's shards (~12 bytes a parameter in all: ~850 GB at 70B) to every
    node's temporary folder. DeepSpeed (non-elastic ZeRO) loads no other rank's shard."""
    fs, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    if isinstance(fs, pafs.LocalFileSystem):
        yield root
        return
    with tempfile.TemporaryDirectory(prefix="sasft-resume-") as local:
        for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
            name = info.base_name
            if info.type != pafs.FileType.File or ("zero_pp_rank_" in name and f"zero_pp_rank_{rank}_" not in name):
                continue
            target = Path(local, info.path[len(root) + 1:])
            target.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield local


def progress_line(record: dict, total_steps: int) -> str:
    heldout = record.get("heldout_loss")
    norm = record.get("grad_norm")
    return (f"[train] {bar(record['step'], total_steps)} step {record['step']}/{total_steps}: loss {record['loss']:.4f}"
            + (f", grad norm {norm:.3f}" if norm is not None else "")
            + f", lr {record['lr']:.2e}, {record['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, "
            f"ETA {record['eta_s'] / 60:.1f} min"
            + ("" if "heldout_loss" not in record else
               f", held-out loss {heldout:.4f}" if heldout is not None else ", held-out loss - (no rows)")
            + (f", self-talk held-out loss {record['selftalk_heldout_loss']:.4f}"
               if record.get("selftalk_heldout_loss") is not None else ""))


def log_event(rd: RunDir, **event) -> None:
    """One JSON line per event of the run (starts and resumes with the workers' nodes, log records,
    checkpoints with their held-out loss): its history."""
    rd.append_line(json.dumps({"time": round(time.time(), 3), **event}), EVENTS)


def train_events(rd: RunDir) -> list[dict]:
    return [json.loads(line) for line in rd.read_text(EVENTS).splitlines()]


def latest_progress(rd: RunDir, total_steps: int) -> str | None:
    """The driver's progress line: the last record the workers logged, or their last (re)start."""
    if not rd.exists(EVENTS):
        return None
    last = train_events(rd)[-1]
    if last["event"] in ("log", "checkpoint"):
        return progress_line(last, total_steps)
    return f"[train] {last['event']} at step {last['step']} on {len(set(last.get('nodes') or [None]))} node(s)"


def keep_for_selection(rd: RunDir, select: str, tolerance: float, step: int) -> None:
    """Rank 0, before reporting the checkpoint of `step` (its record logged): copy into run_dir/train-kept/
    every older checkpoint that is, or may become, the one `select` exports (Ray Train keeps only the
    latest `keep_checkpoints`, and deletes older ones as it registers a new one), and delete the copies
    that no longer may. The checkpoint of `step` itself is Ray Train's latest, kept until the next report."""
    import ray.train
    from ray.train import CheckpointConsistencyMode

    wanted = selection.keep(select, tolerance, selection.losses_by_step(train_events(rd), up_to=step))
    held = kept_steps(rd)
    for s in held - wanted:
        rd.remove(kept(s))
    missing = sorted(wanted - held - {step})
    if not missing:
        return
    # Ray Train's own record of its checkpoints (waits for the uploads in flight to be registered)
    reported = {int(r.metrics["step"]): r.checkpoint for r in ray.train.get_all_reported_checkpoints(
        consistency_mode=CheckpointConsistencyMode.COMMITTED)}
    for s in missing:
        if s not in reported:
            raise RuntimeError(f"train.select: the checkpoint of step {s} is no longer in Ray Train's storage")
        copy_checkpoint(reported[s], rd, kept(s))
        rd.write_text(json.dumps({"step": s}), kept(s), KEPT_MARK)
        print(f"[train] train.select {select}: step {s}'s checkpoint kept in {rd.path(kept(s))}")


def kept_steps(rd: RunDir) -> set[int]:
    """The steps whose copies in run_dir/train-kept/ are complete (an incomplete one, a crash's, is deleted)."""
    found = rd.fs.get_file_info(pafs.FileSelector(rd.local(KEPT_DIR), allow_not_found=True))
    steps = set()
    for info in found:
        if info.type == pafs.FileType.Directory and info.base_name.startswith(KEPT_STEP):
            if rd.exists(KEPT_DIR, info.base_name, KEPT_MARK):
                steps.add(int(info.base_name.removeprefix(KEPT_STEP)))
            else:
                rd.remove(KEPT_DIR, info.base_name)
    return steps


def copy_checkpoint(checkpoint, rd: RunDir, *parts: str) -> None:
    """Ray Train's checkpoint folder to `parts` of the run dir: hard links on one local filesystem (no
    bytes written; Ray Train deleting its folder later leaves them), else a copy."""
    target = rd.local(*parts)
    if not rd.remote and isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        shutil.copytree(checkpoint.path, target, copy_function=_link_or_copy)
    else:
        pafs.copy_files(checkpoint.path, target, source_filesystem=checkpoint.filesystem,
                        destination_filesystem=rd.fs)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


# --- the driver ---------------------------------------------------------------------------------

def check_before_work(cfg: Config, rows: int, rows_with_targets: int, sequences: int | None = None,
                      num_layers: int | None = None) -> int:
    """Everything that would fail late, checked now; returns the total optimizer steps.
    `sequences`: packed sequences (train.packing), `num_layers`: the model's blocks (for LoRA)."""
    t = cfg.train
    if rows_with_targets < rows:
        raise TrainSetupError(
            f"{rows - rows_with_targets} of {rows} training rows have no assistant token left after cutting "
            f"at train.max_length={t.max_length}; raise max_length or shorten the data")
    if t.lora and cfg.training_method.freezes and num_layers is not None and t.freeze_layers >= num_layers:
        raise TrainSetupError(
            f"train.method freeze with train.lora puts adapters only above the lowest freeze_layers blocks; "
            f"freeze_layers={t.freeze_layers} leaves none of the model's {num_layers} blocks to adapt")
    if t.attn_implementation.startswith("flash") and not cfg.resources.use_gpu:
        raise TrainSetupError(f"train.attn_implementation {t.attn_implementation} needs GPUs "
                              "(resources.use_gpu); use sdpa on CPU")
    units = rows if sequences is None else sequences
    if units < cfg.global_batch:
        raise TrainSetupError(
            f"{units} training {'rows' if sequences is None else 'packed sequences'} do not fill one global batch "
            f"of {cfg.global_batch} (micro_batch_size {t.micro_batch_size} x grad_accum {t.grad_accum} x "
            f"num_workers {t.num_workers})")
    return cfg.optimizer_steps(units)


def check_resources(cfg: Config) -> None:
    import ray

    t = cfg.train
    have = ray.cluster_resources()
    need = {"CPU": t.num_workers * t.cpus_per_worker}
    if cfg.resources.use_gpu:
        need["GPU"] = t.num_workers * t.gpus_per_worker
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if have.get(k, 0) < v}
    if short and not cfg.resources.address:  # a cluster may autoscale; a local Ray will not
        raise TrainSetupError("not enough resources for train.num_workers: " + ", ".join(
            f"{k} needs {v:g}, Ray has {h:g}" for k, (v, h) in short.items()))


def num_layers(cfg: Config) -> int | None:
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    return getattr(model_config, "num_hidden_layers", None)


def scaling_config(cfg: Config):
    """The training workers' resources: one GPU each (of `resources.accelerator_type`, if set) or CPUs."""
    from ray.train import ScalingConfig

    t, gpu = cfg.train, cfg.resources.use_gpu
    return ScalingConfig(num_workers=t.num_workers, use_gpu=gpu, placement_strategy=t.placement_strategy,
                         resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if gpu else {})},
                         accelerator_type=cfg.resources.accelerator_type if gpu else None)


def train_outputs(rd: RunDir, config_hash: str, force: bool) -> tuple[str, ...]:
    """What a training run deletes as it begins. Ray Train resumes from its own snapshot in run_dir/train/
    (even in a new fit()): only a run of this very config that did not finish may resume there (and
    keep its events); any other starts from a clean folder."""
    prior = rd.stage_info("train")
    resuming = not force and prior.get("status") == "running" and prior.get("config_hash") == config_hash
    return (MODEL, PARTIAL, FAILED_ONCE) + (() if resuming else (EVENTS, RAY_TRAIN, KEPT_DIR))


def train_hash(cfg: Config, rd: RunDir) -> str:
    """What a trained model depends on: the training settings that change its weights (`Config.as_trained`),
    the base model, the mix it read (and the self-talk stage, whose held-out slice it measures)."""
    monitor = ("selftalk",) if cfg.selftalk.heldout_fraction else ()  # the forgetting monitor's slice is read too
    return rd.chained(cfg.as_trained().section_hash("train", "model", "mix"), "mix", *monitor)


def trained(cfg: Config, rd: RunDir) -> bool:
    """Whether the run's model in `rd` is the finished training of this very config (an error if of another)."""
    return rd.finished("train", train_hash(cfg, rd), fingerprints(cfg, *MODEL_FILES))


def train(cfg: Config, rd: RunDir, force: bool = False) -> dict | None:
    """Train unless done under this config, then write `export.interpolate`'s models unless done; returns the
    train stage's record (None if skipped)."""
    from sasft_ray.interpolate import interpolate

    with rd.locked():
        record = _train(cfg, rd, force)
        interpolate(cfg, rd)  # export.interpolate's models, from the training just made or found
        return record


def _train(cfg: Config, rd: RunDir, force: bool) -> dict | None:
    from ray.data.expressions import col
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer


    if not Path(cfg.model.path).exists() and cfg.model.path.startswith((".", "/")):
        raise TrainSetupError(f"model.path {cfg.model.path} does not exist")
    if rd.stage_info("mix").get("status") != "done":
        raise TrainSetupError(f"{rd.root} has no finished mix; run `sasft generate` first")
    config_hash, inputs = train_hash(cfg, rd), fingerprints(cfg, *MODEL_FILES)
    if not force and rd.done("train", config_hash, inputs):
        return None
    try:
        check_backends(cfg)
    except ValueError as e:
        raise TrainSetupError(str(e)) from None
    connect(cfg)
    check_resources(cfg)
    tokenizer = model_tokenizer(cfg.model)
    strip_bos = turn_format(tokenizer).strip_bos
    train_ds = tokenized(cfg, rd.path(MIXED), strip_bos, columns=("source",))
    rows = train_ds.count()
    sources = per_source(train_ds)
    with_targets = train_ds.filter(expr=col("targets") > 0).count()
    sequences = None
    if cfg.train.packing:
        train_ds = packed(train_ds, cfg.train.max_length)
        sequences = train_ds.count()
    total_steps = check_before_work(cfg, rows, with_targets, sequences, num_layers(cfg))
    units, world = sequences or rows, cfg.train.num_workers
    # each rank an equal, contiguous share of the rows (the remainder, under one global batch, is left out)
    share = units // world
    shards = train_ds.split_at_indices([share * (i + 1) for i in range(world)])[:world]
    heldout_sets = {"heldout": tokenized(cfg, rd.path(TASK_HELDOUT), strip_bos)}
    if rd.stage_info("selftalk").get("heldout") and rd.exists(MONITOR):
        heldout_sets["selftalk_heldout"] = tokenized(cfg, rd.path(MONITOR), strip_bos)
    rd.begin("train", config_hash, force=True, inputs=inputs, outputs=train_outputs(rd, config_hash, force))

    t = cfg.train
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(Path.home() / ".cache" / "torch_extensions")),
           **forwarded_env(),  # the tracking tools' settings (not their keys)
           **{k: v for k, v in os.environ.items() if k == FAIL_ONCE_AT_STEP}}
    if cfg.resources.use_gpu:  # measured on one H200 (jobs/check_gpu.py): the allocator then holds 1.5-3 GiB
        # over the peak allocated instead of 8-12 GiB (1 row a step), within `sasft plan`'s overhead
        env["PYTORCH_CUDA_ALLOC_CONF"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "total_steps": total_steps,
                           "steps_per_epoch": units // cfg.global_batch,
                           "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                           else tokenizer.eos_token_id, "heldout_sets": list(heldout_sets)},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=RAY_TRAIN, storage_path=rd.path(),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=t.max_failures),
            worker_runtime_env={"env_vars": env}),
        datasets={**{f"{TRAIN_SHARD}{i}": shard for i, shard in enumerate(shards)}, **heldout_sets},
        dataset_config=DataConfig(datasets_to_split=list(heldout_sets)),  # the training rows are split above
    )
    with progress(functools.partial(latest_progress, rd, total_steps)):
        result = trainer.fit()
    out, drift = rd.read_json(MODEL, TRAIN_RESULT), rd.read_json(MODEL, DRIFT)
    selected = out["selected"]
    checkpoint = result.checkpoint.path if result.checkpoint else None  # the last one
    if selected["step"] != total_steps:
        checkpoint = rd.path(kept(selected["step"]))
    if not t.keep_checkpoints_after_export:  # the export is written: drop the optimizer state (~12 bytes a param)
        rd.remove(RAY_TRAIN)
        rd.remove(KEPT_DIR)
        checkpoint = None
    print(f"[train] exported step {selected['step']} (train.select {selected['rule']}: {selected['why']})")
    counts = {"rows_in": rows, "sources": sources, "sequences": sequences or rows, "steps": total_steps,
              "final_loss": result.metrics.get("loss"), "selected": selected, "heldout_loss": out["heldout_loss"],
              # the forgetting curve: the task's and the monitor's held-out losses at each checkpoint
              "curve": [{"step": step, "heldout_loss": task, "selftalk_heldout_loss": monitor}
                        for step, (task, monitor) in selection.losses_by_step(train_events(rd)).items()],
              **({"selftalk_heldout_loss": out["selftalk_heldout_loss"]} if "selftalk_heldout_loss" in out else {}),
              "trainable_params": out["trainable_params"], "total_params": out["total_params"],
              "drift_total": drift.get("total"), **({"drift_unavailable": drift["unavailable"]}
                                                    if "unavailable" in drift else {}),
              "checkpoint": checkpoint}  # the exported one's (kept: train.keep_checkpoints_after_export)
    record = rd.finish("train", counts)
    rd.save_config(cfg)
    write_model_card(cfg, rd)  # without scores: the evaluation rewrites it with them
    return record
