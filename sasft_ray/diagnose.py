"""`sasft diagnose`: how far the task's replies are from what the base model would write itself.

Before any training: the base model's mean per-token loss (negative log-likelihood, nats) on the
task's assistant replies against its loss on its own self-talk replies, both rendered by its chat
template and masked exactly as training masks them (`chat.encode`). A task written far from the
model's own style costs it much more per token than its own text; plain SFT then pulls it far from
that style, which is the forgetting SA-SFT's self-dialogues hold back (the paper's "style
distance"). Written to `<run_dir>/diagnose.json` and `diagnose.png` (the two histograms).

The losses come from transformers on this process's GPU (or CPU): a model that fits one device.
"""

from __future__ import annotations

import json
import math

import pyarrow.compute as pc
import pyarrow.dataset as pads

from sasft_ray.chat import encode, model_tokenizer, turn_format
from sasft_ray.config import Config, ConfigError
from sasft_ray.filters import KEPT
from sasft_ray.layout import DIAGNOSIS, DIAGNOSIS_PLOT, SELFTALK, TASK_TRAIN
from sasft_ray.methods import SELF_DIALOGUES
from sasft_ray.packing import IGNORE
from sasft_ray.rundir import RunDir

# the distance (nats per assistant token the task costs beyond the model's own replies), and what it says: a
# rule of thumb from the forgetting lab (its foreign-style tasks: 12-17 nats; its house-style control task: 0.02;
# docs/studies.md), not yet calibrated on large models
VERDICTS = ((1.0, "far from the model's own style: plain SFT is likely to pull it away from what it knew; "
                  "SA-SFT's self-dialogues hold it"),
            (0.25, "somewhat away from the model's own style: some forgetting is likely under plain SFT"),
            (-math.inf, "close to the model's own style: plain SFT should forget little"))


def verdict(distance: float) -> str:
    return next(text for bound, text in VERDICTS if distance >= bound)


def row_losses(model, tokenizer, dialogues: list[list[dict]], max_length: int, strip_bos: str,
               batch_size: int = 8) -> list[float]:
    """Mean loss per assistant token of each dialogue (of each of its sequences, where the chat template is
    not prefix-stable: `chat.encode`), under `model` (on its own device)."""
    import torch

    from sasft_ray.loop import collate

    rows = [seq for d in dialogues for seq in encode(tokenizer, d, max_length, strip_bos)]
    rows = [r for r in rows if any(lab != IGNORE for lab in r["labels"])]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            batch = collate({"input_ids": [r["input_ids"] for r in chunk], "labels": [r["labels"] for r in chunk]},
                            pad)
            logits = model(input_ids=batch["input_ids"].to(model.device),
                           attention_mask=batch["attention_mask"].to(model.device)).logits[:, :-1].float()
            labels = batch["labels"][:, 1:].to(model.device)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE,
                                                    reduction="none")
            counted = (labels != IGNORE).sum(dim=1)
            out += (nll.sum(dim=1) / counted).tolist()
    return out


def summary(losses: list[float]) -> dict:
    ordered = sorted(losses)
    return {"rows": len(ordered), "mean": sum(ordered) / len(ordered), "median": ordered[len(ordered) // 2],
            "p10": ordered[len(ordered) // 10], "p90": ordered[(9 * len(ordered)) // 10]}


def dialogues(rd: RunDir, folder: str, limit: int, kept_only: bool = False) -> list[list[dict]]:
    table = pads.dataset(rd.local(folder), filesystem=rd.fs, format="parquet").to_table(
        columns=["messages", *(["drop_reason"] if kept_only else [])])
    if kept_only:
        table = table.filter(pc.field("drop_reason") == KEPT)
    return [list(m) for m in table.column("messages").to_pylist()[:limit]]


def diagnose(cfg: Config, rd: RunDir, limit: int = 256) -> dict:
    """Generate what is missing in `rd` (the task split and the self-dialogues), score both, write the result."""
    from sasft_ray.generate import generate

    if cfg.training_method.mixed_in is not SELF_DIALOGUES and not cfg.selftalk.heldout_fraction:
        raise ConfigError("diagnose compares the task with the model's own self-dialogues: use train.method "
                         "sa-sft, or selftalk.heldout_fraction > 0")
    generate(cfg, rd)
    return score(cfg, rd, limit)


def score(cfg: Config, rd: RunDir, limit: int = 256) -> dict:
    """Score a run dir's task split and self-dialogues under the base model; write diagnose.json and .png."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = model_tokenizer(cfg.model)
    strip_bos = turn_format(tokenizer).strip_bos
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype,
                                                 trust_remote_code=cfg.model.trust_remote_code).to(device).eval()
    task = row_losses(model, tokenizer, dialogues(rd, TASK_TRAIN, limit), cfg.train.max_length, strip_bos)
    own = row_losses(model, tokenizer, dialogues(rd, SELFTALK, limit, kept_only=True), cfg.train.max_length,
                     strip_bos)
    result = {"task": summary(task), "selftalk": summary(own)}
    ratio = result["task"]["mean"] / max(result["selftalk"]["mean"], 1e-9)
    distance = result["task"]["mean"] - result["selftalk"]["mean"]
    result.update(distance=distance, ratio=ratio, verdict=verdict(distance), histogram=histogram(task, own))
    rd.write_text(json.dumps(result, indent=2) + "\n", DIAGNOSIS)
    plot(result["histogram"], rd)
    return result


def histogram(task: list[float], own: list[float], bins: int = 20) -> dict:
    """Both loss distributions over the same bins, from 0 to the largest loss."""
    import numpy as np

    edges = np.linspace(0.0, max(task + own) or 1.0, bins + 1)
    return {"edges": edges.tolist(), "task": np.histogram(task, edges)[0].tolist(),
            "selftalk": np.histogram(own, edges)[0].tolist()}


def plot(hist: dict, rd: RunDir) -> None:
    """The histogram of diagnose.json, drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.stairs(hist["selftalk"], hist["edges"], fill=True, alpha=0.6, label="its own self-talk replies")
    ax.stairs(hist["task"], hist["edges"], fill=True, alpha=0.6, label="the task's replies")
    ax.set_xlabel("base model's loss per assistant token (nats)")
    ax.set_ylabel("dialogues")
    ax.legend()
    fig.tight_layout()
    with rd.fs.open_output_stream(rd.local(DIAGNOSIS_PLOT)) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def describe(result: dict) -> str:
    t, s = result["task"], result["selftalk"]
    return (f"[diagnose] the base model's loss per assistant token: the task's replies {t['mean']:.3f} "
            f"(median {t['median']:.3f}, {t['rows']} rows), its own self-talk replies {s['mean']:.3f} "
            f"(median {s['median']:.3f}, {s['rows']} rows): {result['ratio']:.1f}x, "
            f"{result['distance']:+.3f} nats\n[diagnose] {result['verdict']}")
