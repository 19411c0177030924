"""What every training worker runs, with no Ray in it: the engine and the loop.

`sasft_ray.train` drives this from Ray Train (dataset shards, checkpoints, `ray.train.report`);
`jobs/check_gpu.py` and `jobs/bench_train.py` drive the very same functions from a bare process
or `torchrun`, fed their rows as a worker reads its share (`epoch_batches` over `in_windows`) in a
process group made as Ray Train makes it (`init_process_group`). What the loop holds for counting,
logging and collectives lives on the engine's device: under Ray Train's NCCL-only process group a
CPU tensor in a collective fails, and Ray Data hands a GPU worker its held-out batches already on
the GPU.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import random
import socket
import time
from collections.abc import Callable, Iterable, Iterator

from sasft_ray import lora
from sasft_ray.config import Config
from sasft_ray.packing import IGNORE

# --- the engine ----------------------------------------------------------------------------------

def deepspeed_config(cfg: Config) -> dict:
    t, gpu = cfg.train, cfg.resources.use_gpu
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    # DeepSpeed lets a client torch AdamW have its state offloaded only so (CPU-only runs: `optimizer_class`)
    extra = {"zero_force_ds_cpu_optimizer": False} if t.offload_optimizer and not gpu else {}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.global_batch,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.bf16},
        "steps_per_print": 10**9,
        **extra,
    }


def import_deepspeed():
    """`import deepspeed` without the MLflow import its autotuner makes at import time, for autotuning runs this
    project never starts: 3-4 s of every training process's start on 2 cores (`python -X importtime -c "import
    deepspeed"`), a Ray Train worker's and each restart's. MLflow stays importable for `train.report_to`."""
    import sys

    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError, which the autotuner expects
        try:
            import deepspeed
        finally:
            del sys.modules["mlflow"]
    import deepspeed

    return deepspeed


def optimizer_class(cfg: Config):
    """AdamW, as `build_engine` makes it. With the optimizer offloaded on GPU nodes: DeepSpeed's fused CPU Adam
    (vectorized over every core, several times faster than torch's multi-pass step over a rank's CPU partition
    of ~4.4 B parameters at 70B on 16 GPUs; built just in time on first use: the image needs a C++ compiler).
    CPU-only runs keep torch's AdamW: no compiler needed, and nothing to overlap with anyway."""
    import torch

    if cfg.train.offload_optimizer and cfg.resources.use_gpu:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam
    return torch.optim.AdamW


def with_persistence_threshold(ds_config: dict, hidden_size: int) -> dict:
    """ZeRO-3 keeps whole ("persistent") every parameter of at most `stage3_param_persistence_threshold`
    elements, and gathers each again, one collective per tensor, after every optimizer step. DeepSpeed's
    default of 1e5 makes every matrix of a small model persistent (hidden 128: 39 all-gathers a step);
    10 x hidden size, transformers' own `auto`, keeps only the norms and biases whole. On a 7B or 70B
    model both pick the same tensors (norms of 4,096-8,192 elements; matrices of millions)."""
    zero = {"stage3_param_persistence_threshold": 10 * hidden_size, **ds_config["zero_optimization"]}
    return {**ds_config, "zero_optimization": zero}


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def frozen_prefixes(k: int) -> tuple[str, ...]:
    """Parameter-name pieces frozen by method `freeze`: the embeddings and the lowest k blocks."""
    return ("embed_tokens.",) + tuple(f"layers.{i}." for i in range(k))


def build_engine(cfg: Config, total_steps: int, rank: int):
    """The model in a DeepSpeed engine, as the method trains it: loaded sharded under ZeRO-3,
    gradient checkpointing if asked, LoRA adapters or frozen lower blocks, AdamW with the lr
    schedule. Needs torch.distributed up (`init_process_group`, or Ray Train's). Returns (engine,
    scheduler, trainable parameters, all parameters)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed = import_deepspeed()
    t, ds_config = cfg.train, deepspeed_config(cfg)
    torch.manual_seed(t.seed)  # LoRA's initial adapters: the same on every rank and in every driver
    # transformers holds this by weak reference and loads sharded while it lives; it must live as
    # long as the engine (the export reads it too), so the engine keeps it
    hf_ds_config = HfDeepSpeedConfig(ds_config) if t.zero_stage == 3 else None
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype, attn_implementation=t.attn_implementation,
                                                 trust_remote_code=cfg.model.trust_remote_code)
    model.config.use_cache = False  # a cache is useless in training and would hide packed boundaries
    if t.gradient_checkpointing:  # keep each block's input only, recompute the block in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if t.lora:  # base frozen, adapters only (above the frozen blocks for method freeze)
        model = lora.apply_lora(model, t.lora.r, t.lora.alpha, t.lora.dropout, t.lora.target_modules,
                                first_layer=t.freeze_layers if cfg.training_method.freezes else 0)
    elif cfg.training_method.freezes:
        frozen = frozen_prefixes(t.freeze_layers)
        for name, p in model.named_parameters():
            if any(piece in name for piece in frozen):
                p.requires_grad_(False)
    if t.zero_stage == 3 and getattr(model.config, "hidden_size", None):
        ds_config = with_persistence_threshold(ds_config, model.config.hidden_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = lora.parameter_counts(model)
    if rank == 0:
        print(f"[train] trainable parameters: {n_trainable:,} of {n_total:,} ({n_trainable / n_total:.2%})")
    optimizer = optimizer_class(cfg)(trainable, lr=t.lr, weight_decay=t.weight_decay)  # AdamW's betas, eps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_lambda, warmup=round(t.warmup_ratio * total_steps), total=total_steps, schedule=t.schedule))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, model_parameters=trainable)
    engine.hf_ds_config = hf_ds_config
    return engine, scheduler, n_trainable, n_total


# --- batches -------------------------------------------------------------------------------------

def collate(batch: dict, pad_id: int) -> dict:
    """Right-padded tensors, and `num_tokens` (not a model input). Packed rows carry position ids
    instead of an attention mask (transformers then keeps their examples apart); their padding gets
    positions 0, 1, ... of its own, so it is one more isolated segment with ignored labels."""
    import torch

    width = max(len(x) for x in batch["input_ids"])
    ids = torch.full((len(batch["input_ids"]), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for i, (x, y) in enumerate(zip(batch["input_ids"], batch["labels"])):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    out = {"input_ids": ids, "labels": labels, "num_tokens": mask.sum()}
    if "position_ids" not in batch:
        return {**out, "attention_mask": mask}
    positions = torch.arange(width).repeat(len(ids), 1)
    for i, p in enumerate(batch["position_ids"]):
        positions[i, : len(p)] = torch.tensor(p)
        positions[i, len(p):] = torch.arange(width - len(p))
    return {**out, "position_ids": positions}


def device_batches(rows: list[dict], batch_size: int, pad_id: int, device, *, rank: int = 0, world: int = 1,
                   seed: int | None = None, drop_last: bool = True) -> Iterator[dict]:
    """Micro-batches of this rank's share of `rows` (dicts of token lists: every world-th row), shuffled by
    `seed` if given, collated, every tensor already on `device` (as a held-out set reaches a Ray Train
    worker)."""
    order = list(range(rank, len(rows), world))
    if seed is not None:
        random.Random(seed).shuffle(order)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        chunk = [rows[i] for i in order[start: start + batch_size]]
        batch = collate({k: [r[k] for r in chunk] for k in chunk[0]}, pad_id)
        yield {k: v.to(device) for k, v in batch.items()}


WINDOW = 4096  # consecutive rows of a rank's shard reshuffled together each epoch


def epoch_rows(windows: Iterable[dict], epoch: int, seed: int, start: int = 0) -> Iterator[dict]:
    """This rank's rows of one epoch, in the epoch's order, from its row `start` on. `windows`: the rank's
    shard in order, in batches of `WINDOW` consecutive rows (column -> values; the last may be shorter), as
    `iter_batches(batch_size=WINDOW)` gives them; each is permuted by (seed, epoch, its index). The order
    follows from the data and the step alone, so a run resumed at any step goes on with exactly the rows
    the interrupted one had not reached (windows before `start` are read, not used)."""
    import numpy as np

    offset = 0
    for index, window in enumerate(windows):
        n = len(next(iter(window.values())))
        if offset + n > start:
            order = np.random.default_rng([seed, epoch, index]).permutation(n)
            for i in order[max(0, start - offset):]:
                yield {k: v[i] for k, v in window.items()}
        offset += n


def epoch_batches(windows: Callable[[], Iterable[dict]], cfg: Config, steps_per_epoch: int, pad_id: int,
                  step: int) -> Iterator[dict]:
    """`run`'s `batches(step)` for a rank whose shard `windows()` reads (see `epoch_rows`): its collated
    micro-batches from optimizer step `step` to the end of that step's epoch (the rows of the steps before
    it in the epoch skipped: a resumed run neither repeats nor skips data)."""
    t = cfg.train
    epoch, done = divmod(step, steps_per_epoch)
    per_step = t.grad_accum * t.micro_batch_size  # rows of this rank a step
    rows = itertools.islice(epoch_rows(windows(), epoch, t.seed, start=done * per_step),
                            (steps_per_epoch - done) * per_step)  # a share's last rows, under a step, left out
    while len(chunk := list(itertools.islice(rows, t.micro_batch_size))) == t.micro_batch_size:
        yield collate({k: [r[k] for r in chunk] for k in chunk[0]}, pad_id)


def in_windows(rows: list[dict], rank: int = 0, world: int = 1) -> Callable[[], Iterator[dict]]:
    """A rank's shard of `rows` (an equal, contiguous share, as the driver splits the training set), read in
    windows as a Ray Train worker reads its own: `epoch_batches` without Ray."""
    share = len(rows) // world
    mine = rows[rank * share: (rank + 1) * share]

    def windows() -> Iterator[dict]:
        for start in range(0, len(mine), WINDOW):
            chunk = mine[start: start + WINDOW]
            yield {k: [r[k] for r in chunk] for k in chunk[0]}
    return windows


def init_process_group(gpu: bool) -> None:
    """torch.distributed as Ray Train makes it: NCCL alone on GPU (so a CPU tensor in a collective
    fails here as it would there), gloo on CPU. Under `torchrun` its environment says who is who;
    alone, a one-process group on a free port."""
    import torch

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    if gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    init_deepspeed(gpu)


def init_deepspeed(gpu: bool) -> None:
    """DeepSpeed's communication on the process group there is: NCCL on GPUs, gloo on CPU. On CPU,
    DeepSpeed would first compile its shared-memory all-reduce (about a minute on 2 cores, once per
    machine), which only its inference tensor parallelism calls: marked unavailable, it is not built."""
    deepspeed = import_deepspeed()
    if not gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")


# --- the loop ------------------------------------------------------------------------------------

def run(engine, cfg: Config, batches: Callable[[int], Iterable[dict]],
        heldout: dict[str, Callable[[], Iterable[dict]]], *,
        total_steps: int, step: int = 0, log: Callable[[dict], None] | None = None,
        checkpoint: Callable[[int, dict], None] | None = None,
        after_step: Callable[[int], None] | None = None) -> dict:
    """Train from optimizer step `step` to `total_steps`.

    `batches(step)`: one pass over this rank's training micro-batches, started at `step` (its shuffle
    seed); `heldout`: record key -> this rank's micro-batches of a held-out set (`heldout_loss`: the
    task's; `selftalk_heldout_loss`: the forgetting monitor's self-dialogues). Every `train.log_every`
    steps and at every checkpoint the ranks' loss, tokens and time are reduced into one record (loss per
    target token, grad norm, lr, tokens/s per GPU, ETA; each held-out loss at checkpoints) passed to `log` on
    rank 0; each optimizer step weighs every target token of its global batch the same (`optimizer_step`);
    at every `train.checkpoint_every` steps and the last, every rank calls `checkpoint(step, record)`.
    Returns the last step and its held-out losses."""
    import torch
    import torch.distributed as dist

    t, device = cfg.train, engine.device
    rank, world = dist.get_rank(), dist.get_world_size()
    # since the last record, this rank: the sum of its target tokens' losses, its target tokens, its tokens
    window = torch.zeros(3, dtype=torch.float64, device=device)
    since = started = time.perf_counter()
    start_step = step
    measured: dict[str, float | None] = {}
    measured_step = None
    # train mode from the first step: `from_pretrained` hands the model over in eval mode, where transformers
    # skips gradient checkpointing (and dropout); only the first held-out pass used to switch it
    engine.train()

    def measure() -> dict[str, float | None]:
        return {key: heldout_loss(engine, held()) for key, held in heldout.items()}

    while step < total_steps:
        stepped = False
        micro_batches = iter(batches(step))
        # the grad_accum micro-batches of one optimizer step, together: their target tokens are counted first
        # (a pass's last, incomplete group is left out, as DeepSpeed would have stepped on it otherwise)
        while step < total_steps and len(group := list(itertools.islice(micro_batches, t.grad_accum))) == t.grad_accum:
            window += optimizer_step(engine, group, world)
            step, stepped = step + 1, True
            if after_step:
                after_step(step)
            saving = step % t.checkpoint_every == 0 or step == total_steps
            if saving or step % t.log_every == 0:
                dist.all_reduce(window)  # every rank, every record: collectives stay in step
                now = time.perf_counter()
                loss_sum, targets, tokens_sum = window.tolist()
                record = {"step": step, "loss": loss_sum / max(targets, 1),
                          "grad_norm": _grad_norm(engine), "lr": engine.get_lr()[0], "tokens": int(tokens_sum),
                          "target_tokens": int(targets), "tokens_per_s_per_gpu": tokens_sum / (now - since) / world,
                          "eta_s": (now - started) / (step - start_step) * (total_steps - step),
                          "optimizer_steps": engine.global_steps}
                window.zero_()
                if saving:
                    measured, measured_step = measure(), step
                    record.update(measured)
                if rank == 0 and log:
                    log(record)
                if saving and checkpoint:
                    checkpoint(step, record)
                since = time.perf_counter()  # the held-out pass and the save are not counted
        if not stepped:
            raise RuntimeError(f"rank {rank}: a pass over its training batches made no optimizer step "
                               f"(fewer than grad_accum={t.grad_accum} micro-batches of {t.micro_batch_size})")
    if measured_step != step:  # restarted after the last checkpoint: nothing trained since, measure it again
        measured = measure()
    return {"step": step, **measured}


def optimizer_step(engine, group: list[dict], world: int):
    """One optimizer step over this rank's micro-batches `group` (train.grad_accum of them), weighing every
    target token of the global batch the same, whatever the batching, packing or rank (transformers'
    `num_items_in_batch`): each micro-batch's loss is the sum of its target tokens' losses over the target
    tokens of all ranks' micro-batches of the step. A micro-batch's mean loss instead would weigh a short
    task row batched with long self-dialogues by its batch, not by its tokens, and λ (counted in rows) would
    not be what the loss sees. Returns this rank's [sum of target-token losses, target tokens, tokens]."""
    import torch
    import torch.distributed as dist

    group = [{k: v.to(engine.device, non_blocking=True) for k, v in b.items()} for b in group]  # no-op under Ray Data
    # the targets of a causal LM's loss: every label but each row's first; counted on the model's device
    targets = [(batch["labels"][:, 1:] != IGNORE).sum() for batch in group]
    total = torch.stack(targets).sum()
    dist.all_reduce(total)  # on the model's device: GPU process groups are NCCL-only
    total = total.clamp(min=1)  # a step with no target at all: zero loss, not 0/0
    out = torch.zeros(3, dtype=torch.float64, device=engine.device)
    for batch, n in zip(group, targets):
        tokens = batch.pop("num_tokens")
        loss = engine(**batch, use_cache=False, num_items_in_batch=total).loss
        # DeepSpeed averages the ranks' gradients and (scale_wrt_gas) the accumulated micro-batches'; this
        # loss is already a share of the global batch's sum, so neither average applies: x world, no / gas
        engine.backward(loss * world, scale_wrt_gas=False)
        engine.step()  # the optimizer steps at the group's last micro-batch (DeepSpeed counts them)
        out += torch.stack([loss.detach().double() * total, n.double(), tokens.double()])
    return out


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def heldout_loss(engine, batches: Iterable[dict]) -> float | None:
    """Mean loss per target token over every rank's held-out batches; None if there are none."""
    import torch
    import torch.distributed as dist

    device, was_training = engine.device, engine.training
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            batch.pop("num_tokens")
            n = (batch["labels"][:, 1:] != IGNORE).sum().double()  # the targets of a causal LM's loss
            total += torch.stack([engine(**batch, use_cache=False).loss.detach().double() * n, n])
    dist.all_reduce(total)
    engine.train(was_training)
    loss, n = total.tolist()
    return loss / n if n else None
