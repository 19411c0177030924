"""Check one GPU node before a cluster is spent on it: the training path in bf16 on CUDA, and the
planner's figures against what the GPU measures. One process, no Ray, nothing from a hub.

1. Correctness. A tiny chat model (`sasft_ray.tiny`) is fine-tuned on the demo task by the library's
   own engine (`sasft_ray.train.build_engine`: bf16, ZeRO-3, NCCL, AdamW and its schedule) on the
   library's tokenization (assistant-only labels) and batches. Checked: the loss falls; the export
   (`sasft_ray.export`: ZeRO-3 shards gathered into an HF folder) reloads in transformers and gives
   the engine's own held-out loss; a packed batch (`train.packing`) gives the loss of the same rows
   padded, so packed examples do not see each other under the GPU's attention kernels.
2. Scale. A randomly initialized model of a real shape (default Llama-3.2-1B's, 1.24B parameters)
   trains a few steps of `--micro-batch` x `--seq` tokens under the same engine. Printed: measured
   peak GPU memory and tokens/s beside `sasft plan`'s per-GPU memory and throughput assumption.

    python jobs/check_gpu.py                                            # on a GPU node
    ray job submit --working-dir . --entrypoint-num-gpus 1 -- python jobs/check_gpu.py
    python jobs/check_gpu.py --cpu --arch hidden=128,layers=2,heads=4,kv_heads=2,intermediate=256,vocab=512

Exit code 0 when every correctness check passes; `--json FILE` writes all figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

LLAMA_32_1B = "hidden=2048,layers=16,heads=32,kv_heads=8,intermediate=8192,vocab=128256,tied=1"
LLAMA_32_3B = "hidden=3072,layers=28,heads=24,kv_heads=8,intermediate=8192,vocab=128256,tied=1"


def init_single_process(gpu: bool) -> None:
    import deepspeed

    with socket.socket() as s:  # a free port for the one-member process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")


def config(model: Path, tmp: Path, gpu: bool, **train):
    from sasft_ray.config import validate_config

    return validate_config({"run_dir": str(tmp / "run"), "model": {"path": str(model)},
                            "data": {"path": str(tmp / "task.jsonl")}, "resources": {"use_gpu": gpu},
                            "train": {"method": "sft", "num_workers": 1, "zero_stage": 3, **train}})


def batch_on(device, rows: list[dict], pad_id: int) -> dict:
    from sasft_ray.train import _collate

    batch = _collate({k: [r[k] for r in rows] for k in rows[0]}, pad_id)
    batch.pop("num_tokens")
    return {k: v.to(device) for k, v in batch.items()}


def check_correctness(tmp: Path, gpu: bool, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from sasft_ray import packing
    from sasft_ray.export import export
    from sasft_ray.selftalk import load_tokenizer, turn_format
    from sasft_ray.tiny import build_tiny_model, demo_task_rows, write_demo_task
    from sasft_ray.train import build_engine, deepspeed_config, encode

    model_dir = build_tiny_model(tmp / "tiny", "llama", layers=2, hidden=128, warmup_steps=0)
    write_demo_task(tmp / "task.jsonl")
    cfg = config(model_dir, tmp, gpu, micro_batch_size=16, lr=3e-3, max_steps=steps, max_length=64)
    tokenizer = load_tokenizer(str(model_dir))
    strip_bos = turn_format(tokenizer).strip_bos
    rows = [encode(tokenizer, [{"role": "user", "content": r["instruction"]},
                               {"role": "assistant", "content": r["output"]}], 64, strip_bos)
            for r in demo_task_rows(16 * steps + 32)]
    train_rows, heldout = rows[:-32], rows[-32:]
    engine, _, _, _ = build_engine(cfg, deepspeed_config(cfg), steps, rank=0)
    device, pad = engine.device, tokenizer.pad_token_id
    losses = []
    for step in range(steps):
        loss = engine(**batch_on(device, train_rows[16 * step: 16 * (step + 1)], pad), use_cache=False).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    engine.eval()
    with torch.no_grad():
        engine_heldout = engine(**batch_on(device, heldout, pad), use_cache=False).loss.item()

    out = tmp / "export"
    export(engine, cfg, str(out), rank=0)
    del engine
    unset_hf_deepspeed_config()  # else transformers would load the next models sharded too
    dtype = torch.bfloat16 if gpu else torch.float32
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).to(device).eval()
    # the packer ignores each example's first label, a BOS never scored anyway: the same targets
    packed = packing.pack([r["input_ids"] for r in heldout], [r["labels"] for r in heldout], 64 * 4)
    with torch.no_grad():
        export_heldout = reloaded(**batch_on(device, heldout, pad), use_cache=False).loss.item()
        packed_loss = reloaded(**batch_on(device, [dict(zip(packed, v)) for v in zip(*packed.values())], pad),
                               use_cache=False).loss.item()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    drift = json.loads((out / "drift.json").read_text())["total"]
    checks = {
        f"loss falls ({first:.3f} -> {last:.3f})": last < 0.5 * first,
        f"export reloads with the engine's held-out loss ({engine_heldout:.4f} vs {export_heldout:.4f})":
            abs(export_heldout - engine_heldout) <= 0.01 * engine_heldout,
        f"packed rows keep apart ({len(packed['input_ids'])} packed vs {len(heldout)} padded rows: "
        f"loss {packed_loss:.4f} vs {export_heldout:.4f})": abs(packed_loss - export_heldout) <= 0.02 * export_heldout,
        f"weight drift recorded ({drift:.3f})": drift > 0,
    }
    return {"checks": checks, "losses": losses, "engine_heldout": engine_heldout, "export_heldout": export_heldout,
            "packed_loss": packed_loss, "drift": drift}


def check_scale(tmp: Path, gpu: bool, arch_spec: str, micro_batch: int, seq: int, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sasft_ray import plan
    from sasft_ray.train import build_engine, deepspeed_config

    arch, _ = plan.load_arch("", arch_spec)
    model_dir = Path(tempfile.mkdtemp(dir=tmp))
    device = "cuda" if gpu else "cpu"
    with torch.device(device):  # random weights of the shape, made where they are fast to make
        model = AutoModelForCausalLM.from_config(LlamaConfig(
            hidden_size=arch.hidden, num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
            num_key_value_heads=arch.kv_heads, intermediate_size=arch.intermediate, vocab_size=arch.vocab,
            tie_word_embeddings=arch.tied, max_position_embeddings=max(seq, 2048)), dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    del model
    cfg = config(model_dir, tmp, gpu, micro_batch_size=micro_batch, max_length=seq, max_steps=steps, lr=1e-5)
    cl = plan.Cluster(gpu_mem_gib=torch.cuda.mem_get_info()[1] / plan.GIB if gpu else 80.0, gpus_per_node=1)
    tp = plan.train_plan(cfg, arch, cl)
    _, tokens, seconds = plan.train_time(cfg, arch, cl, task_rows=None)  # the planner's own rate (max_steps set)
    planned_rate = tokens / seconds

    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    engine, _, _, _ = build_engine(cfg, deepspeed_config(cfg), steps, rank=0)
    after_init = torch.cuda.memory_allocated() if gpu else 0
    ids = torch.randint(arch.vocab, (micro_batch, seq), device=engine.device)
    warmup, timed = 2, None
    for step in range(steps):
        if step == warmup:
            if gpu:
                torch.cuda.synchronize()
            timed = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        engine.step()
    if gpu:
        torch.cuda.synchronize()
    rate = micro_batch * seq * (steps - warmup) / (time.perf_counter() - timed)
    out = {"params": arch.params, "tokens_per_s": rate, "planned_tokens_per_s": planned_rate,
           "mfu": rate * 6 * arch.params / (plan.GPU_BF16_TFLOPS * 1e12),
           "planned_states_gib": tp.chosen.states / plan.GIB, "planned_blocks_gib": tp.act[0] / plan.GIB,
           "planned_logits_gib": tp.act[1] / plan.GIB, "planned_total_gib": tp.need / plan.GIB}
    if gpu:
        free, total = torch.cuda.mem_get_info()
        out.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / plan.GIB,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / plan.GIB,
                   after_init_gib=after_init / plan.GIB,
                   device_in_use_gib=(total - free) / plan.GIB)  # every process on the GPU: the parent too
        # where the peak comes from: one more step, its phases measured apart
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)
        torch.cuda.synchronize()
        forward_backward = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        engine.step()
        torch.cuda.synchronize()
        out.update(resident_gib=resident / plan.GIB, forward_backward_over_resident_gib=(
            forward_backward - resident) / plan.GIB,
            optimizer_step_over_resident_gib=(torch.cuda.max_memory_allocated() - resident) / plan.GIB)
    shutil.rmtree(model_dir)
    return out


def scale_in_fresh_process(tmp: Path, gpu: bool, *args) -> dict:
    """One measurement per process: DeepSpeed keeps references to an engine after `del`, so a second
    engine in the same process would count the first one's memory as its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_scale_child, tmp, gpu, *args).result()


def _scale_child(tmp: Path, gpu: bool, *args) -> dict:
    import torch

    init_single_process(gpu)
    try:
        return check_scale(tmp, gpu, *args)
    except torch.OutOfMemoryError as e:  # a figure too: the planner said it would fit, or not
        return {"oom": str(e).splitlines()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run the same code on CPU (fp32, gloo)")
    parser.add_argument("--steps", type=int, default=60, help="correctness: training steps of 16 rows")
    parser.add_argument("--arch", action="append", help="scale: a model shape (plan.Arch fields, tied=0/1); "
                        f"repeat for several; default Llama-3.2-1B's: {LLAMA_32_1B}; Llama-3.2-3B's: {LLAMA_32_3B}")
    parser.add_argument("--micro-batch", type=int, action="append",
                        help="scale: rows of --seq tokens per step; repeat for several (default 4)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--scale-steps", type=int, default=12)
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()

    import torch

    from sasft_ray import plan

    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        print("no CUDA device visible; run on a GPU node, or with --cpu to try the same code on CPU")
        return 2
    print(f"torch {torch.__version__}, " + (f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
                                            if gpu else f"CPU, {os.cpu_count()} cores"))
    init_single_process(gpu)
    tmp = Path(tempfile.mkdtemp(prefix="sasft-check-"))
    start = time.perf_counter()
    result = {"correctness": check_correctness(tmp, gpu, args.steps), "scale": []}
    result["correctness"]["seconds"] = time.perf_counter() - start
    for name, ok in result["correctness"]["checks"].items():
        print(f"[{'ok' if ok else 'FAILED'}] {name}")

    for spec, micro_batch in itertools.product(args.arch or [LLAMA_32_1B], args.micro_batch or [4]):
        start = time.perf_counter()
        s = scale_in_fresh_process(tmp, gpu, spec, micro_batch, args.seq, args.scale_steps)
        s.update(arch=spec, micro_batch=micro_batch, seconds=time.perf_counter() - start)
        result["scale"].append(s)
        if "oom" in s:
            print(f"\nscale {spec}, micro-batch {micro_batch}: out of GPU memory: {s['oom']}")
            continue
        print(f"\nscale: {s['params'] / 1e9:.2f}B parameters ({spec}), ZeRO-3 on 1 "
              f"{'GPU' if gpu else 'CPU process'}, micro-batch {micro_batch} x {args.seq} tokens, "
              f"{s['seconds']:.0f} s")
        print(f"  tokens/s {s['tokens_per_s']:.0f}; the planner assumes {s['planned_tokens_per_s']:.0f} "
              f"(MFU {plan.TRAIN_MFU:.2f}); measured MFU {s['mfu']:.3f} (6P FLOPs a token)")
        print(f"  planned per GPU: states {s['planned_states_gib']:.1f} + activations {s['planned_blocks_gib']:.1f}"
              f" + logits {s['planned_logits_gib']:.1f} GiB, {s['planned_total_gib']:.1f} GiB with CUDA overhead")
        if gpu:
            print(f"  measured: peak allocated {s['peak_allocated_gib']:.1f} GiB, peak reserved "
                  f"{s['peak_reserved_gib']:.1f} GiB; planned without overhead / peak allocated: "
                  f"{(s['planned_total_gib'] - plan.CUDA_OVERHEAD_GIB) / s['peak_allocated_gib']:.2f}")
            print(f"  by phase: {s['after_init_gib']:.1f} GiB after the engine's start, {s['resident_gib']:.1f} held "
                  f"between steps; peak over that: forward + backward {s['forward_backward_over_resident_gib']:.1f}"
                  f", optimizer step {s['optimizer_step_over_resident_gib']:.1f}")
    if args.json:
        result["correctness"]["checks"] = {k: bool(v) for k, v in result["correctness"]["checks"].items()}
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if all(result["correctness"]["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
