"""LoRA adapters (PEFT) for `sasft train`, and their merge into plain HF weights for the export.

Only the adapter matrices train: the base weights stay frozen and never enter the optimizer,
so DeepSpeed keeps optimizer state (and, under ZeRO, gradients) for the adapters alone. The
export is not an adapter folder: `merge_lora` folds W + (alpha / r) * B @ A into every adapted
weight of the consolidated state dict and renames the keys back to the base model's, so
vLLM and transformers load `<run_dir>/model/` with no PEFT and the drift report compares the
merged weights with the base ones.
"""

from __future__ import annotations

PEFT_PREFIX = "base_model.model."  # what PeftModelForCausalLM puts before the base model's keys
ADAPTER = "default"


def apply_lora(model, r: int, alpha: float, dropout: float, target_modules: list[str] | str,
               first_layer: int = 0):
    """`model` wrapped by PEFT with LoRA adapters; every base parameter frozen. Blocks below
    `first_layer` get no adapter (method `freeze` with LoRA: the lowest blocks stay untouched)."""
    from peft import LoraConfig, get_peft_model

    if target_modules == "all-linear":
        target_modules = linear_module_names(model)
    n = model.config.num_hidden_layers
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                        target_modules=target_modules,
                        layers_to_transform=list(range(first_layer, n)) if first_layer else None)
    # adapters in the base dtype (PEFT would make them fp32 under bf16); DeepSpeed keeps fp32 master copies
    return get_peft_model(model, config, autocast_adapter_dtype=False)


def linear_module_names(model) -> list[str]:
    """Names (last part) of every linear layer but the output head: PEFT's "all-linear", spelled out
    so that it combines with `layers_to_transform`."""
    import torch

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; ZeRO-3 partitioned parameters count at their full size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def merge_lora(state: dict, scaling: float) -> dict:
    """A PEFT model's full state dict turned into the base model's: W + scaling * B @ A for every
    adapted weight (computed in fp32, stored in W's dtype), adapter tensors dropped, keys renamed."""
    merged = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if key.endswith(".base_layer.weight"):
            stem = key.removesuffix(".base_layer.weight")
            a, b = state[f"{stem}.lora_A.{ADAPTER}.weight"], state[f"{stem}.lora_B.{ADAPTER}.weight"]
            value = (value.float() + (b.float() @ a.float()) * scaling).to(value.dtype)
        merged[key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")] = value
    return merged
