"""The end of training: the fine-tuned model as an HF folder, and how far its weights moved.

`export` runs inside the Ray Train workers (every rank takes part in gathering ZeRO-3 shards,
rank 0 writes); `weight_drift` compares the written state with the base model's safetensors,
block by block, so the report can tell which layers a method moved. A hub model's safetensors
are read where transformers cached them when rank 0 loaded the model (fetched once if not);
when they cannot be had, drift.json says why instead of holding nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sasft_ray import lora
from sasft_ray.chat import model_tokenizer
from sasft_ray.config import Config
from sasft_ray.layout import ADAPTER, DRIFT


def export(engine, cfg: Config, out: str, rank: int) -> None:
    """Full weights on rank 0 as an HF folder (safetensors, config, tokenizer, chat template);
    LoRA adapters are merged into the base weights, so the folder needs no PEFT to load, and written
    as they are too (`out/adapter/`: PEFT's adapter_config.json and adapter_model.safetensors), so many
    fine-tunes of one base model can be served as adapters on one engine."""
    state = engine._zero3_consolidated_16bit_state_dict() if cfg.train.zero_stage == 3 \
        else engine.module.state_dict()
    if rank != 0:
        return
    model = engine.module
    if cfg.train.lora:
        model.save_pretrained(str(Path(out, ADAPTER)), state_dict=state, safe_serialization=True)
        state = lora.merge_lora(state, cfg.train.lora.alpha / cfg.train.lora.r)
        model = model.get_base_model()
    model.save_pretrained(out, state_dict=state, safe_serialization=True)
    model_tokenizer(cfg.model).save_pretrained(out)
    Path(out, DRIFT).write_text(json.dumps(weight_drift(cfg.model.path, state), indent=2))


def base_safetensors(base: str) -> tuple[list[Path], str | None]:
    """The base model's safetensors files: in its local folder, or for a hub id in the local HF cache
    (where `from_pretrained` put them), fetched once if missing; else ([], why not)."""
    if Path(base).is_dir():
        files = sorted(Path(base).glob("*.safetensors"))
        return files, None if files else f"no *.safetensors in {base}"
    from huggingface_hub import snapshot_download

    why = "not found"
    for local_only in (True, False):  # the cache first; the hub only if the cache lacks them
        try:
            files = sorted(Path(snapshot_download(base, allow_patterns=["*.safetensors"],
                                                  local_files_only=local_only)).glob("*.safetensors"))
        except Exception as e:  # offline, gated, no such repo: drift is a diagnostic, the export stands
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        if files:
            return files, None
        why = "the hub repo has no *.safetensors"
    return [], f"base weights of {base} not found ({why})"


def weight_drift(base_path: str, state: dict) -> dict:
    """Relative drift ||θ - θ0|| / ||θ0|| per block and in total, from the base safetensors; or
    `{"unavailable": why}` when those cannot be found."""
    import torch
    from safetensors import safe_open

    files, why = base_safetensors(base_path)
    if why:
        return {"unavailable": why}
    sums: dict[str, list[float]] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key not in state:
                    continue
                base = f.get_tensor(key).double()
                diff = state[key].double() - base
                group = _group(key)
                for g in (group, "total"):
                    acc = sums.setdefault(g, [0.0, 0.0])
                    acc[0] += float(torch.sum(diff * diff))
                    acc[1] += float(torch.sum(base * base))
    return {g: math.sqrt(d) / math.sqrt(b) if b else 0.0 for g, (d, b) in sums.items()}


def _group(key: str) -> str:
    parts = key.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return f"layers.{int(parts[i + 1]):03d}"
    return "embeddings" if "embed" in key else "lm_head" if "lm_head" in key else "other"
