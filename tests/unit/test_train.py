"""Training's decisions made before any worker: schedules, frozen and whole-kept tensors, the epoch order a
resume follows, when a restarted run resumes, the optimizer, the shards a rank fetches (training through
real Ray Train workers is in tests/integration/test_train.py)."""

from pathlib import Path

import pytest
import torch

from sasft_ray.layout import EVENTS, KEPT_DIR, RAY_TRAIN
from sasft_ray.loop import frozen_prefixes, lr_lambda, with_persistence_threshold
from sasft_ray.train import IGNORE, train_hash
from tests.conftest import make_config


def test_schedules_and_freeze_selection():
    assert lr_lambda(0, warmup=4, total=10, schedule="cosine") == 0.25
    assert lr_lambda(10, warmup=4, total=10, schedule="cosine") == pytest.approx(0.0)
    assert lr_lambda(7, warmup=4, total=10, schedule="linear") == pytest.approx(0.5)
    assert frozen_prefixes(2) == ("embed_tokens.", "layers.0.", "layers.1.")


def test_zero3_keeps_whole_only_tensors_of_up_to_ten_hidden_sizes_unless_told():
    ds = {"train_batch_size": 8, "zero_optimization": {"stage": 3}}
    assert with_persistence_threshold(ds, 128) == {
        "train_batch_size": 8, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1280}}
    assert ds == {"train_batch_size": 8, "zero_optimization": {"stage": 3}}  # not changed in place
    told = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    assert with_persistence_threshold(told, 128) == told


def test_each_epoch_is_an_order_fixed_by_the_step_so_a_resumed_epoch_goes_on_where_it_stopped(monkeypatch):
    """`loop.epoch_batches`, what every Ray Train worker iterates: from any step, a rank's micro-batches are
    the rest of that step's epoch, as an uninterrupted run would have them; an epoch holds each row of the
    rank's share once; ranks share no row; each epoch has an order of its own."""
    from sasft_ray import loop

    monkeypatch.setattr(loop, "WINDOW", 8)  # several windows of a shard in a small test
    rows = [{"input_ids": [i, 0], "labels": [IGNORE, 0]} for i in range(70)]
    cfg = make_config(Path("/tmp/unused"), train={"num_workers": 2, "micro_batch_size": 2, "grad_accum": 2})
    per_epoch = len(rows) // cfg.global_batch  # 8 steps of 4 rows a rank: 32 of its 35 rows

    def seen(rank: int, step: int) -> list[int]:
        windows = loop.in_windows(rows, rank, world=2)
        return [int(i) for b in loop.epoch_batches(windows, cfg, per_epoch, 0, step) for i in b["input_ids"][:, 0]]

    epochs = {}
    for rank in (0, 1):
        for epoch in (0, 1, 2):
            whole = seen(rank, epoch * per_epoch)
            assert len(whole) == len(set(whole)) == 32 and set(whole) <= set(range(35 * rank, 35 * (rank + 1)))
            for done in range(1, per_epoch):  # resumed after `done` steps of the epoch
                assert seen(rank, epoch * per_epoch + done) == whole[done * 4:]
            epochs[rank, epoch] = whole
        assert epochs[rank, 0] != epochs[rank, 1] != epochs[rank, 2]


@pytest.mark.parametrize("change, resumes", [
    ({"log_every": 1}, True), ({"report_to": ["tensorboard"]}, True), ({"run_name": "again"}, True),
    ({"keep_checkpoints_after_export": True}, True), ({"keep_checkpoints": 5}, True), ({"max_failures": 9}, True),
    ({"cpus_per_worker": 4}, True), ({"placement_strategy": "SPREAD"}, True), ({"gradient_checkpointing": True}, True),
    ({"lr": 2e-5}, False), ({"micro_batch_size": 8}, False), ({"seed": 1}, False), ({"checkpoint_every": 7}, False),
    ({"select": "best_task"}, False), ({"num_workers": 4}, False),
])
def test_a_crashed_run_restarted_with_other_settings_resumes_only_if_they_leave_the_weights_alone(tmp_path, change,
                                                                                                  resumes):
    """A training that did not finish (its stage `running`), started again with one train setting changed:
    a setting that does not change the weights (logging, tracking, checkpoints kept, restarts, placement,
    recomputed activations) keeps its hash, so the run resumes from its checkpoints; any other starts clean."""
    from sasft_ray.report import variants
    from sasft_ray.rundir import RunDir
    from sasft_ray.train import train_outputs

    cfg = make_config(tmp_path, data={"path": "task.jsonl", "heldout_fraction": 0.1})
    rd = RunDir(cfg.run_dir)
    rd.begin("mix", "mixed")
    rd.finish("mix", {})
    rd.begin("train", train_hash(cfg, rd))  # crashed: still running
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update=change)})
    wiped = set(train_outputs(rd, train_hash(other, rd), force=False)) & {EVENTS, RAY_TRAIN, KEPT_DIR}
    assert (train_hash(other, rd) == train_hash(cfg, rd)) is resumes
    assert wiped == (set() if resumes else {EVENTS, RAY_TRAIN, KEPT_DIR})
    if resumes:  # nor do such settings tell runs apart in a pooled report
        assert variants([cfg.model_dump(mode="json"), other.model_dump(mode="json")]) == ["", ""]


def test_an_offloaded_optimizer_steps_with_deepspeeds_cpu_adam_on_gpu_nodes_and_torch_adamw_on_cpu(tmp_path):
    """On GPU nodes an offloaded optimizer is DeepSpeed's fused CPU Adam (JIT-built; no torch AdamW let through
    with zero_force_ds_cpu_optimizer off), as `sasft plan` says; CPU-only runs keep torch's AdamW (no compiler)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from sasft_ray.loop import deepspeed_config, optimizer_class

    def cfg(gpu: bool, offload: bool):
        return make_config(tmp_path, resources={"use_gpu": gpu}, train={"offload_optimizer": offload})

    assert optimizer_class(cfg(True, True)) is DeepSpeedCPUAdam
    assert "zero_force_ds_cpu_optimizer" not in deepspeed_config(cfg(True, True))
    assert deepspeed_config(cfg(True, True))["zero_optimization"]["offload_optimizer"] == {"device": "cpu",
                                                                                          "pin_memory": True}
    assert optimizer_class(cfg(False, True)) is torch.optim.AdamW
    assert deepspeed_config(cfg(False, True))["zero_force_ds_cpu_optimizer"] is False
    assert optimizer_class(cfg(True, False)) is torch.optim.AdamW


def test_a_rank_fetches_its_own_zero_shards_and_the_shared_files_only(tmp_path):
    """A resumed rank reads from a bucket (a filesystem other than this node's; here a pyarrow SubTree over a
    folder) only its own ZeRO shards and what every rank reads, not the ~12 bytes a parameter of all ranks;
    a checkpoint on this node's filesystem is read in place."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from sasft_ray.train import rank_files

    stored = tmp_path / "bucket" / "checkpoint_000001"
    (stored / "ds").mkdir(parents=True)
    shared = ["latest", "zero_to_fp32.py", "ds/mp_rank_00_model_states.pt"]
    for name in shared + [f"ds/{kind}zero_pp_rank_{r}_mp_rank_00_{what}_states.pt" for r in range(12)
                          for kind, what in (("", "model"), ("bf16_", "optim"))]:
        (stored / name).write_text(name)
    bucket = Checkpoint("checkpoint_000001", filesystem=pafs.SubTreeFileSystem(str(tmp_path / "bucket"),
                                                                                pafs.LocalFileSystem()))
    with rank_files(bucket, 1) as folder:
        got = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
        assert got == sorted(shared + ["ds/zero_pp_rank_1_mp_rank_00_model_states.pt",
                                       "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"])
        assert Path(folder, "latest").read_text() == "latest"
    assert not Path(folder).exists()  # the node's scratch is given back
    with rank_files(Checkpoint(str(stored)), 1) as folder:
        assert folder == str(stored)
