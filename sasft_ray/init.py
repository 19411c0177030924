"""`sasft init NAME`: a commented config to start from, for one of the example models or any other.

The example models are those of the shipped cluster configs (`sasft_ray/configs/cluster/`, shown by
`sasft config cluster/llama3-8b`). A starter is its example's own text, comments included, with what ties
it to one cluster made local (a folder for run_dir, a Ray started here, the endpoint on this machine with
no key) and the accelerator types commented out; a starter for any other model is the default example's,
its notes on that model left out.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from sasft_ray.config import CLUSTER_EXAMPLES, ConfigError, resolve_config_path, shipped_configs, validate_config

DEFAULT_EXAMPLE = f"{CLUSTER_EXAMPLES}/llama3.1-8b"
DEFAULT_DATA = "data/task.jsonl"
COMMENT_COLUMN = 31
# What ties an example to one cluster: the keys a starter writes for this machine instead (`starter_config`),
# and their comments
LOCAL = {
    "run_dir": "every stage's output; s3://... or gs://... on a cluster (shared by its nodes)",
    "model.path": "hub id or local folder (a gated one: HF_TOKEN in the environment, never here)",
    "data.path": "the task: JSONL (messages, prompt/completion or ShareGPT rows), Parquet, HF dataset",
    "serve.host": "this machine only; 0.0.0.0 opens the endpoint: then set api_key_env",
    "serve.api_key_env": "the variable holding the endpoint's API key (e.g. SASFT_API_KEY)",
    "resources.address": "null: a Ray started here; auto: join the cluster the job runs on",
}
CLUSTER_ONLY = ("resources.accelerator_type", "serve.engine.accelerator_type")  # commented out in a starter
_KEY = re.compile(r"( *)([A-Za-z_]\w*):(.*)")


def examples() -> dict[str, str]:
    """Each example model's hub id and its shipped config's name (`cluster/<file>`), the default's first."""
    names = [n for n in shipped_configs() if n.startswith(f"{CLUSTER_EXAMPLES}/")]
    by_model = {yaml.safe_load(_text(n))["model"]["path"]: n for n in names}
    return dict(sorted(by_model.items(), key=lambda item: item[1] != DEFAULT_EXAMPLE))


def starter_path(name: str) -> Path:
    """NAME.yaml, or NAME when it ends in .yaml."""
    return Path(name if name.endswith(".yaml") else f"{name}.yaml")


def starter_config(name: str, model: str | None = None, data: str | None = None) -> str:
    """The starter's YAML text, commented: its example's text, made local."""
    by_model = examples()
    model = model or next(iter(by_model))
    example = by_model.get(model, DEFAULT_EXAMPLE)
    path = starter_path(name)
    head, body = _split_header(_text(example))
    lines = [f"# A config to start from, written by `sasft init` from the shipped example {example}",
             f"# (`sasft config {example}`), made local: run_dir a folder, a Ray started here, the endpoint",
             "# on this machine, no accelerator types.",
             *(head if model in by_model else
               [f"# SA-SFT of {model} with the example's settings: check that they fit this model",
                "# (`sasft plan`, with --arch when the planner does not know the model's shape)."]),
             f"# Check it:  sasft config {path}   (the resolved config, or what is wrong)",
             f"#            sasft plan {path} --task-rows N   (GPU memory, GPUs and hours per stage)",
             f"# Run it:    sasft run {path}",
             f"#            on a cluster: ray job submit ... -- python jobs/job.py run --config {path}"]
    local = {"run_dir": f"runs/{path.stem}", "model.path": model, "data.path": data or DEFAULT_DATA,
             "serve.host": "127.0.0.1", "serve.api_key_env": None, "resources.address": None}
    return "\n".join(lines + _made_local(body, local)) + "\n"


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


def _text(example: str) -> str:
    return resolve_config_path(example).read_text()


def _split_header(text: str) -> tuple[list[str], list[str]]:
    """The example's notes on its model (its header, down to its own `# Check it` line), and its settings."""
    lines = text.splitlines()
    settings = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    notes = next(i for i, line in enumerate(lines) if line.startswith("# Check it"))
    return lines[:notes], lines[settings:]


def _made_local(lines: list[str], local: dict) -> list[str]:
    """The settings' lines with the LOCAL keys' values and comments replaced and CLUSTER_ONLY commented out."""
    out, keys = [], []
    for line in lines:
        match = _KEY.fullmatch(line)
        if match:
            pad, key, _ = match.groups()
            keys[len(pad) // 2:] = [key]
            dotted = ".".join(keys)
            if dotted in local:
                line = f"{pad}{key}: {_scalar(local[dotted])}"
                line = f"{line:<{COMMENT_COLUMN - 1}} # {LOCAL[dotted]}"
            elif dotted in CLUSTER_ONLY:
                line = f"{pad}# {line.lstrip()}"
        out.append(line)
    return out


def _scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("\n...\n").strip()
