"""Check one GPU node before a cluster is spent on it: the training path in bf16 on CUDA, and the
planner's figures against what the GPU measures. One process, no Ray, nothing from a hub.

The training is the library's own: `sasft_ray.loop` (the engine and the loop that every Ray Train
worker runs), fed its rows as a worker reads its share (`loop.epoch_batches`), in a process group
made as Ray Train makes it (NCCL alone), so a tensor on the wrong device fails here as it would on
a cluster (the loop's count of each step's target tokens, reduced over the ranks, among them).

1. Correctness. A tiny chat model (`sasft_ray.tiny`) is fine-tuned on the demo task (bf16, ZeRO-3,
   AdamW and its schedule, assistant-only labels). Checked: the loss falls; a progress record comes
   every `train.log_every` steps; the export (`sasft_ray.export`: ZeRO-3 shards gathered into an HF
   folder) reloads in transformers and gives the loop's own held-out loss; packed rows
   (`train.packing`) give the loss of the same rows padded, so packed examples do not see each other
   under the GPU's attention kernels.
2. vLLM, as the self-talk engines start on GPUs (`sasft_ray.engines.engine_env`): the engine core in a
   process of its own (not in-process as on CPU), and `selftalk.batch_invariant`: seeded prompts
   sampled alone and among others give the same tokens. Skipped on CPU and where vLLM is not installed.
3. Scale. A randomly initialized model of a real shape (default Llama-3.2-1B's, 1.24B parameters)
   trains a few steps of `--micro-batch` packed rows of `--seq` tokens, with gradient checkpointing
   off and on. Printed: peak GPU memory, tokens/s and MFU beside `sasft plan`'s figures.

    python jobs/check_gpu.py                                            # on a GPU node
    ray job submit --working-dir . --entrypoint-num-gpus 1 -- python jobs/check_gpu.py
    python jobs/check_gpu.py --cpu                                      # the same code on CPU, a tiny shape

Exit code 0 when every correctness check passes; `--json FILE` writes all figures.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

LLAMA_32_1B = "hidden=2048,layers=16,heads=32,kv_heads=8,intermediate=8192,vocab=128256,tied=1"
LLAMA_32_3B = "hidden=3072,layers=28,heads=24,kv_heads=8,intermediate=8192,vocab=128256,tied=1"
TINY = "hidden=128,layers=2,heads=4,kv_heads=2,intermediate=256,vocab=512"  # CPU: the 1.2B default needs > 24 GB


def config(model: Path, tmp: Path, gpu: bool, **train):
    from sasft_ray.config import validate_config

    return validate_config({"run_dir": str(tmp / "run"), "model": {"path": str(model)},
                            "data": {"path": str(tmp / "task.jsonl")}, "resources": {"use_gpu": gpu},
                            "train": {"method": "sft", "num_workers": 1, "zero_stage": 3, **train}})


def check_correctness(tmp: Path, gpu: bool, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from sasft_ray import loop, packing
    from sasft_ray.chat import encode, load_tokenizer, turn_format
    from sasft_ray.export import export
    from sasft_ray.layout import DRIFT
    from sasft_ray.tiny import build_tiny_model, demo_task_rows, write_demo_task

    model_dir = build_tiny_model(tmp / "tiny", "llama", layers=2, hidden=128, warmup_steps=0)
    write_demo_task(tmp / "task.jsonl")
    cfg = config(model_dir, tmp, gpu, micro_batch_size=16, lr=3e-3, max_steps=steps, max_length=64, log_every=5,
                 checkpoint_every=steps)
    tokenizer = load_tokenizer(str(model_dir))
    strip_bos = turn_format(tokenizer).strip_bos
    rows = [seq for r in demo_task_rows(16 * steps + 32) for seq in encode(
        tokenizer, [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}],
        64, strip_bos)]
    train_rows, heldout = rows[:-32], rows[-32:]
    engine, _, _, _ = loop.build_engine(cfg, steps, rank=0)
    device, pad = engine.device, tokenizer.pad_token_id

    def heldout_batches(rows=heldout):
        return loop.device_batches(rows, 16, pad, device, drop_last=False)

    records: list[dict] = []  # the library's own loop, fed its rows as a Ray Train worker reads its share
    batches = functools.partial(loop.epoch_batches, loop.in_windows(train_rows), cfg, len(train_rows) // 16, pad)
    end = loop.run(engine, cfg, batches, {"heldout_loss": heldout_batches}, total_steps=steps, log=records.append)
    engine_heldout = end["heldout_loss"]

    out = tmp / "export"
    export(engine, cfg, str(out), rank=0)
    del engine
    unset_hf_deepspeed_config()  # else transformers would load the next models sharded too
    dtype = torch.bfloat16 if gpu else torch.float32
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).to(device).eval()
    # the packer ignores each example's first label, a BOS never scored anyway: the same targets
    packed = packing.pack([r["input_ids"] for r in heldout], [r["labels"] for r in heldout], 64 * 4)
    export_heldout = loop.heldout_loss(reloaded, heldout_batches())
    packed_loss = loop.heldout_loss(reloaded, heldout_batches([dict(zip(packed, v)) for v in zip(*packed.values())]))
    first, last = records[0]["loss"], records[-1]["loss"]
    drift = json.loads((out / DRIFT).read_text())["total"]
    checks = {
        f"loss falls ({first:.3f} -> {last:.3f}, steps 1-5 -> {steps - 4}-{steps})": last < 0.5 * first,
        f"records every 5 steps on rank 0 ({len(records)} of {steps // 5}), grad norm and tokens/s in each":
            len(records) == steps // 5 and all(r["grad_norm"] and r["tokens_per_s_per_gpu"] > 0 for r in records),
        f"export reloads with the engine's held-out loss ({engine_heldout:.4f} vs {export_heldout:.4f})":
            abs(export_heldout - engine_heldout) <= 0.01 * engine_heldout,
        f"packed rows keep apart ({len(packed['input_ids'])} packed vs {len(heldout)} padded rows: "
        f"loss {packed_loss:.4f} vs {export_heldout:.4f})": abs(packed_loss - export_heldout) <= 0.02 * export_heldout,
        f"weight drift recorded ({drift:.3f})": drift > 0,
    }
    return {"checks": checks, "records": records, "engine_heldout": engine_heldout, "export_heldout": export_heldout,
            "packed_loss": packed_loss, "drift": drift}


def check_vllm(tmp: Path) -> dict:
    """The correctness check's export in a vLLM engine started as a GPU self-talk engine is, in a fresh
    process (the variables must be set before vLLM is imported)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_vllm_child, tmp).result()


def _vllm_child(tmp: Path) -> dict:
    model = str(tmp / "export")
    cfg = config(Path(model), tmp, True)
    cfg.selftalk.batch_invariant = True  # what `selftalk.batch_invariant: true` gives the self-talk engines
    cfg.selftalk.engine.max_model_len = 256  # the tiny model's positions: 1,024
    from sasft_ray.engines import engine_env, engine_kwargs

    os.environ.update(engine_env(cfg, cfg.selftalk.engine, cfg.selftalk.batch_invariant))
    from vllm import LLM, SamplingParams

    llm = LLM(model, **engine_kwargs(cfg, cfg.selftalk.engine, seed=0, enable_prefix_caching=True,
                                     gpu_memory_utilization=0.3))
    core_processes = len(multiprocessing.active_children())  # vLLM's engine core, apart from this process
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(64)]
    params = [SamplingParams(temperature=1.0, max_tokens=32, seed=i) for i in range(64)]
    alone = [list(llm.generate([p], [sp], use_tqdm=False)[0].outputs[0].token_ids)
             for p, sp in zip(prompts[:8], params[:8])]
    together = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)[:8]]
    return {"checks": {
        f"the engine core runs in a process of its own ({core_processes} child process(es))": core_processes > 0,
        f"batch-invariant: 8 seeded prompts alone and among 64 give the same tokens "
        f"({sum(a == b for a, b in zip(alone, together))} of 8)": alone == together}}


def packed_rows(n: int, seq: int, vocab: int, example: int = 512) -> list[dict]:
    """Random full-length rows packed from examples of `example` tokens (positions restart at each)."""
    import torch

    positions = (torch.arange(seq) % min(example, seq)).tolist()
    return [{"input_ids": ids, "labels": ids, "position_ids": positions}
            for ids in torch.randint(vocab, (n, seq)).tolist()]


def check_scale(tmp: Path, gpu: bool, arch_spec: str, micro_batch: int, seq: int, steps: int,
                checkpointing: bool, attn: str, offload: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sasft_ray import loop, plan

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
    warmup = 2  # the first window (start-up, kernel selection) is left out of the rate
    cfg = config(model_dir, tmp, gpu, micro_batch_size=micro_batch, max_length=seq, max_steps=steps, lr=1e-5,
                 log_every=warmup, checkpoint_every=steps, gradient_checkpointing=checkpointing,
                 attn_implementation=attn, offload_optimizer=offload)
    cl = plan.Cluster(gpu_mem_gib=torch.cuda.mem_get_info()[1] / plan.GIB if gpu else 80.0, gpus_per_node=1)
    tp = plan.train_plan(cfg, arch, cl)
    _, tokens, seconds = plan.train_time(cfg, arch, cl, task_rows=None)  # the planner's own rate (max_steps set)
    planned_rate = tokens / seconds

    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    engine, _, _, _ = loop.build_engine(cfg, steps, rank=0)
    after_init = torch.cuda.memory_allocated() if gpu else 0
    rows = packed_rows(micro_batch * steps, seq, arch.vocab)
    records: list[dict] = []
    loop.run(engine, cfg, lambda step: loop.device_batches(rows, micro_batch, 0, engine.device), {},
             total_steps=steps, log=records.append)
    timed = records[1:]
    rate = sum(r["tokens"] for r in timed) / sum(r["tokens"] / r["tokens_per_s_per_gpu"] for r in timed)
    out = {"params": arch.params, "tokens_per_s": rate, "planned_tokens_per_s": planned_rate,
           "optimizer": type(engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer")
                             else engine.optimizer).__name__,
           "mfu": rate * 6 * arch.params / (plan.GPU_BF16_TFLOPS * 1e12),
           "planned_states_gib": tp.chosen.states / plan.GIB, "planned_blocks_gib": tp.act[0] / plan.GIB,
           "planned_logits_gib": tp.act[1] / plan.GIB, "planned_total_gib": tp.need / plan.GIB,
           "losses": [r["loss"] for r in records]}
    if gpu:
        free, total = torch.cuda.mem_get_info()
        out.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / plan.GIB,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / plan.GIB,
                   after_init_gib=after_init / plan.GIB,
                   device_in_use_gib=(total - free) / plan.GIB)  # every process on the GPU: the parent too
        # where the peak comes from: one more step, its phases measured apart
        batch = next(loop.device_batches(rows, micro_batch, 0, engine.device))
        batch.pop("num_tokens")
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        engine.backward(engine(**batch, use_cache=False).loss)
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

    from sasft_ray.loop import init_process_group

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # the parent's group, not ours
        os.environ.pop(key, None)
    init_process_group(gpu)
    try:
        return check_scale(tmp, gpu, *args)
    except torch.OutOfMemoryError as e:  # a figure too: the planner said it would fit, or not
        return {"oom": str(e).splitlines()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run the same code on CPU (fp32, gloo)")
    parser.add_argument("--steps", type=int, default=60, help="correctness: training steps of 16 rows")
    parser.add_argument("--arch", action="append", help="scale: a model shape (plan.Arch fields, tied=0/1); "
                        f"repeat for several; default Llama-3.2-1B's on GPU: {LLAMA_32_1B}; Llama-3.2-3B's: "
                        f"{LLAMA_32_3B}; on CPU: {TINY}")
    parser.add_argument("--micro-batch", type=int, action="append",
                        help="scale: packed rows of --seq tokens per step; repeat for several (default 1 and 4)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--scale-steps", type=int, default=12)
    parser.add_argument("--gradient-checkpointing", choices=("off", "on", "both"), default="both")
    parser.add_argument("--attn", default="sdpa", help="scale: train.attn_implementation (sdpa, flash_attention_2)")
    parser.add_argument("--offload", action="store_true", help="scale: train.offload_optimizer (on GPU: "
                        "DeepSpeedCPUAdam, built just in time; its steps in the time)")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()

    import torch

    from sasft_ray import plan
    from sasft_ray.loop import init_process_group

    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        print("no CUDA device visible; run on a GPU node, or with --cpu to try the same code on CPU")
        return 2
    print(f"torch {torch.__version__}, " + (f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
                                            if gpu else f"CPU, {os.cpu_count()} cores"))
    init_process_group(gpu)  # as Ray Train makes it: NCCL alone on GPU
    tmp = Path(tempfile.mkdtemp(prefix="sasft-check-"))
    start = time.perf_counter()
    result = {"correctness": check_correctness(tmp, gpu, args.steps), "scale": []}
    result["correctness"]["seconds"] = time.perf_counter() - start
    for name, ok in result["correctness"]["checks"].items():
        print(f"[{'ok' if ok else 'FAILED'}] {name}")
    if gpu and importlib.util.find_spec("vllm"):
        result["vllm"] = check_vllm(tmp)
        for name, ok in result["vllm"]["checks"].items():
            print(f"[{'ok' if ok else 'FAILED'}] vLLM: {name}")
    else:
        print("vLLM: not checked (" + ("CPU" if not gpu else "vLLM is not installed") + ")")

    ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]
    for spec, micro_batch, ckpt in itertools.product(args.arch or [LLAMA_32_1B if gpu else TINY],
                                                     args.micro_batch or [1, 4], ckpts):
        start = time.perf_counter()
        s = scale_in_fresh_process(tmp, gpu, spec, micro_batch, args.seq, args.scale_steps, ckpt, args.attn,
                                   args.offload)
        s.update(arch=spec, micro_batch=micro_batch, gradient_checkpointing=ckpt, attn=args.attn,
                 seconds=time.perf_counter() - start)
        result["scale"].append(s)
        what = (f"micro-batch {micro_batch} x {args.seq} packed tokens, {args.attn}, "
                f"gradient checkpointing {'on' if ckpt else 'off'}")
        if "oom" in s:
            print(f"\nscale {spec}, {what}: out of GPU memory: {s['oom']}")
            continue
        print(f"\nscale: {s['params'] / 1e9:.2f}B parameters ({spec}), ZeRO-3 on 1 "
              f"{'GPU' if gpu else 'CPU process'}, {what}, {s['seconds']:.0f} s")
        print(f"  optimizer {s['optimizer']}{' (offloaded)' if args.offload else ''}; "
              f"tokens/s {s['tokens_per_s']:.0f}; the planner assumes {s['planned_tokens_per_s']:.0f} "
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
        for part in ("correctness", "vllm"):
            if part in result:
                result[part]["checks"] = {k: bool(v) for k, v in result[part]["checks"].items()}
        Path(args.json).write_text(json.dumps(result, indent=2))
    checks = [*result["correctness"]["checks"].values(), *result.get("vllm", {}).get("checks", {}).values()]
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
