"""`sasft init NAME`: a commented config to start from, for one of the example models or any other.

The example models are those of `cluster/configs/` (SA-SFT on one node of 8 x 80 GB GPUs each).
`EXAMPLES` holds what each of those configs sets apart from the settings they share (`COMMON`), so a
starter for an example model has its example's settings (tests/test_init.py holds them to the files),
and a starter for any other model starts from the first example's. What ties a config to one cluster
(a bucket run_dir, `address: auto`, accelerator types, an endpoint open to the network) is left out,
with a comment where it goes.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sasft_ray.config import ConfigError, validate_config

DEFAULT_DATA = "data/task.jsonl"
COMMENT_COLUMN = 31


@dataclass(frozen=True)
class Example:
    config: str  # cluster/configs/<config>.yaml
    gated: bool  # the hub asks for a token (its license accepted): HF_TOKEN
    notes: tuple[str, ...] = ()  # header lines: what matters for this model
    settings: dict = field(default_factory=dict)  # over COMMON, by dotted key
    comments: dict = field(default_factory=dict)  # over COMMENTS, by dotted key


# The settings the example configs share (cluster/configs/llama3-8b.yaml's), by section.
COMMON: dict = {
    "run_dir": None, "model": {"path": None, "dtype": "bfloat16"},
    "data": {"path": None, "heldout_fraction": 0.1},
    "selftalk": {"num_dialogues": None, "turns": 2, "temperature": 0.7, "top_p": 0.9, "user_temperature": 1.0,
                 "user_top_p": 1.0, "max_user_tokens": 256, "max_assistant_tokens": 768, "oversample": 1.25,
                 "engine": {"concurrency": 8, "batch_size": 512, "tensor_parallel_size": 1, "max_model_len": 4096,
                            "max_num_seqs": 256, "vllm": {"max_num_batched_tokens": 8192}}},
    "mix": {"self_ratio": 1.0},
    "train": {"method": "sa-sft", "num_workers": 8, "gpus_per_worker": 1, "cpus_per_worker": 8, "zero_stage": 3,
              "micro_batch_size": 2, "grad_accum": 4, "lr": 1.0e-5, "epochs": 2, "max_length": 2048, "lora": None,
              "checkpoint_every": 100},
    "serve": {"host": "127.0.0.1", "api_key_env": None, "port": 8000, "model_id": "finetuned", "base_model_id": "base",
              "engine": {"concurrency": 1, "tensor_parallel_size": 1, "max_model_len": 4096, "max_num_seqs": 128}},
    "resources": {"address": None, "use_gpu": True},
}

# The keys that matter most, commented where they are written.
COMMENTS = {
    "run_dir": "every stage's output; s3://... or gs://... on a cluster (shared by its nodes)",
    "model.path": "hub id or local folder of the base model",
    "data.path": "the task: JSONL (messages, prompt/completion or ShareGPT rows), Parquet, HF dataset",
    "selftalk.num_dialogues": "self-dialogues to mix in (sa-sft); null: λ x the task's training rows",
    "selftalk.engine.concurrency": "vLLM engines writing them, tensor_parallel_size GPUs each",
    "mix.self_ratio": "λ: self-dialogues mixed in per task row",
    "train.method": "sa-sft | sft (no self-talk) | freeze | external-mix (mix.external data)",
    "train.num_workers": "training GPUs, one worker each; ZeRO-3 shards the model over them",
    "train.lr": "peak learning rate (warmup, then cosine)",
    "train.epochs": "passes over the mix (train.max_steps overrides)",
    "train.lora": "null: full fine-tuning; {} (or {r: 16, alpha: 32}): LoRA adapters",
    "serve.host": "this machine only; 0.0.0.0 opens the endpoint: then set api_key_env",
    "serve.api_key_env": "the variable holding the endpoint's API key (e.g. SASFT_API_KEY)",
    "resources.address": "null: a Ray started here; auto: join the cluster the job runs on",
    "resources.use_gpu": "false: CPU only (tiny models, e.g. `sasft tiny-model`)",
}

_NO_SYSTEM = "selftalk.system_prompt"
EXAMPLES: dict[str, Example] = {  # the first is the default model
    "meta-llama/Llama-3.1-8B-Instruct": Example(
        "llama3.1-8b", gated=True,
        notes=("Llama-3.1-8B: Llama-3-8B's shapes (8.03 B parameters). Its chat template opens every dialogue",
               "with a system header of its own (knowledge cutoff and date), with or without a system prompt.")),
    "Qwen/Qwen2.5-7B-Instruct": Example(
        "qwen2.5-7b", gated=False,
        notes=("Qwen2.5-7B (7.62 B parameters): biases on q, k, v; 4 KV heads, so tensor_parallel_size 1, 2 or 4;",
               "its template adds a default system message when selftalk.system_prompt is null."),
        comments={"selftalk.engine.concurrency": "vLLM engines writing them; TP must divide 28 heads and 4 KV "
                                                 "heads"}),
    "mistralai/Mistral-7B-Instruct-v0.3": Example(
        "mistral-7b", gated=True,
        notes=("Mistral-7B-v0.3 (7.25 B parameters): Llama's block, a 32768-token vocabulary; its template needs",
               "user and assistant turns to alternate and has no system turn of its own."),
        settings={_NO_SYSTEM: None},
        comments={_NO_SYSTEM: "leave null: the template folds a system message into the last user turn"}),
    "google/gemma-2-9b-it": Example(
        "gemma2-9b", gated=True,
        notes=("Gemma-2-9B (9.24 B parameters): heads of 256, four norms a block, tied 256k embeddings, tanh",
               "soft-capping of attention and logits, 336 KiB of KV cache a token."),
        settings={_NO_SYSTEM: None, "selftalk.engine.batch_size": 256, "selftalk.engine.max_num_seqs": 128,
                  "train.attn_implementation": "eager", "train.gradient_checkpointing": True},
        comments={_NO_SYSTEM: "stays null: Gemma-2's chat template has no system role",
                  "selftalk.engine.max_num_seqs": "the KV cache holds ~80 dialogues of 2048 tokens at once",
                  "train.attn_implementation": "SDPA drops Gemma-2's attention soft-capping; eager applies it",
                  "train.gradient_checkpointing": "eager keeps each layer's s x s scores: 86 GiB without it"}),
}
DEFAULT_MODEL = next(iter(EXAMPLES))
# Where a key goes after the keys COMMON has in its section (model-specific keys that COMMON lacks).
_AFTER = {"selftalk.system_prompt": "selftalk.user_top_p", "train.attn_implementation": "train.max_length",
          "train.gradient_checkpointing": "train.attn_implementation"}


def starter_path(name: str) -> Path:
    """NAME.yaml, or NAME when it ends in .yaml."""
    return Path(name if name.endswith(".yaml") else f"{name}.yaml")


def settings(name: str, model: str | None = None, data: str | None = None) -> dict:
    """The starter's settings as a config mapping (the example's, for an example model)."""
    tree = copy.deepcopy(COMMON)
    model = model or DEFAULT_MODEL
    tree["run_dir"] = f"runs/{starter_path(name).stem}"
    tree["model"]["path"], tree["data"]["path"] = model, data or DEFAULT_DATA
    for key, value in EXAMPLES.get(model, EXAMPLES[DEFAULT_MODEL]).settings.items():
        _put(tree, key, value)
    return tree


def starter_config(name: str, model: str | None = None, data: str | None = None) -> str:
    """The starter's YAML text, commented."""
    model = model or DEFAULT_MODEL
    example = EXAMPLES.get(model)
    path = starter_path(name)
    source = example or EXAMPLES[DEFAULT_MODEL]
    lines = [f"# A config to start from, written by `sasft init`: SA-SFT of {model}",
             f"# on one node of 8 x 80 GB GPUs, with the settings of cluster/configs/{source.config}.yaml"
             + ("." if example else ","),
             *([f"# {line}" for line in source.notes] if example else
               [f"# the example of {DEFAULT_MODEL}: check that they fit this model",
                "# (`sasft plan`, with --arch when the planner does not know the model's shape)."]),
             f"# Check it:  sasft config {path}   (the resolved config, or what is wrong)",
             f"#            sasft plan {path} --task-rows N   (GPU memory, GPUs and hours per stage)",
             f"# Run it:    sasft run {path}   (on a cluster: ray job submit ... -- python jobs/run.py "
             f"--config {path})"]
    comments = {**COMMENTS, **source.comments}
    if example is None:
        comments["model.path"] += "; a gated hub model needs HF_TOKEN"
    elif example.gated:
        comments["model.path"] = "gated on the hub: HF_TOKEN in the environment, never here"
    lines += _render(settings(name, model, data), comments)
    return "\n".join(lines) + "\n"


def write_starter(name: str, model: str | None = None, data: str | None = None, force: bool = False) -> Path:
    """Write the starter config; an existing file is refused unless `force`. The text is validated first."""
    path = starter_path(name)
    text = starter_config(name, model, data)
    validate_config(yaml.safe_load(text), source=str(path))
    if path.is_dir():
        raise ConfigError(f"{path} is a folder")
    if path.exists() and not force:
        raise ConfigError(f"{path} exists: nothing was written (pass --force to overwrite it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    if force:  # the old file is replaced whole, never left half-written
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path
    try:  # created only if absent, even if another writer raced this one
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise ConfigError(f"{path} exists: nothing was written (pass --force to overwrite it)") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _put(tree: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node[part]
    if leaf in node or key not in _AFTER:
        node[leaf] = value
        return
    after = _AFTER[key].rsplit(".", 1)[1]  # insert after that key, keeping the section's order
    items = list(node.items())
    at = next(i for i, (k, _) in enumerate(items) if k == after) + 1
    node.clear()
    node.update(items[:at] + [(leaf, value)] + items[at:])


def _scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("\n...\n").strip()


def _render(tree: dict, comments: dict, prefix: str = "", indent: int = 0) -> list[str]:
    lines = []
    for key, value in tree.items():
        dotted, pad = f"{prefix}{key}", " " * indent
        if not indent and lines and isinstance(value, dict):
            lines.append("")
        if isinstance(value, dict) and value:
            head = f"{pad}{key}:"
            lines.append(_with_comment(head, comments.get(dotted)))
            lines += _render(value, comments, f"{dotted}.", indent + 2)
        else:
            lines.append(_with_comment(f"{pad}{key}: {_scalar(value)}", comments.get(dotted)))
    return lines


def _with_comment(line: str, comment: str | None) -> str:
    return f"{line:<{COMMENT_COLUMN - 1}} # {comment}" if comment else line
