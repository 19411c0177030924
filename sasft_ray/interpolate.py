"""Weight interpolation (WiSE-FT, Wortsman et al. 2022): models between the base and a fine-tune.

`export.interpolate: [0.5]` writes, beside a run's fine-tune, `interpolated/<α>/` holding
θ₀ + α (θ − θ₀): α 0 is the base model, 1 the fine-tune. Each is served and scored like a
compared method (model id `<model id>@<α>`), so the report shows the in-domain / general
trade-off along the line between the two. The work is one read of both models, shard by shard
(the fine-tune's own shards, so memory stays at one shard, at any size), in the driver: no GPU,
no Ray. The stage is hashed on the training it reads and the αs, and skipped when done.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

from sasft_ray.config import Config
from sasft_ray.layout import DRIFT, INTERPOLATED, MODEL, TRAIN_RESULT
from sasft_ray.rundir import MODEL_FILES, RunDir, fingerprints


class InterpolateError(RuntimeError):
    pass


def alpha_name(alpha: float) -> str:
    """α as folder names and model ids spell it: 0.5, 0.25."""
    return f"{alpha:g}"


def tagged(name: str, alpha: float) -> str:
    """A model id or method with its α: `finetuned@0.5`, `sa-sft@0.5`."""
    return f"{name}@{alpha_name(alpha)}"


def folder(alpha: float) -> tuple[str, str]:
    """The parts of α's model folder inside the run dir."""
    return INTERPOLATED, alpha_name(alpha)


def interpolate_folders(base_files: list[Path], tuned: Path, outs: dict[float, Path]) -> int:
    """Write, for each α of `outs`, its folder: the HF folder `tuned` (config, tokenizer, index copied) with every
    weight at θ₀ + α (θ − θ₀), computed in float32 and stored in the fine-tune's dtype; one read of both models
    for all αs. Returns the tensors written per folder. A weight the base model lacks, or holds in another shape,
    is an error: then the two are not one model."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with contextlib.ExitStack() as stack:
        base = {}  # base weight name -> the open base shard holding it
        for file in base_files:
            f = stack.enter_context(safe_open(str(file), "pt"))
            base.update(dict.fromkeys(f.keys(), f))
        for out in outs.values():
            out.mkdir(parents=True)
            for item in tuned.iterdir():  # config, generation config, tokenizer, chat template, the shard index
                if item.is_file() and item.suffix != ".safetensors" and item.name not in (DRIFT, TRAIN_RESULT):
                    shutil.copy2(item, out / item.name)
        written = 0
        for shard in sorted(tuned.glob("*.safetensors")):
            mixed: dict[float, dict] = {alpha: {} for alpha in outs}
            with safe_open(str(shard), "pt") as f:
                metadata = f.metadata()
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    theta = f.get_tensor(key)
                    if key not in base:
                        raise InterpolateError(f"{shard.name}: weight {key!r} is not in the base model's safetensors "
                                               f"({base_files[0].parent}): the fine-tune is not of this base model")
                    theta0 = base[key].get_tensor(key)
                    if theta0.shape != theta.shape:
                        raise InterpolateError(f"{shard.name}: weight {key!r} has shape {tuple(theta.shape)}, the "
                                               f"base model's {tuple(theta0.shape)}")
                    for alpha in outs:
                        mixed[alpha][key] = torch.lerp(theta0.float(), theta.float(), alpha).to(theta.dtype)
            for alpha, out in outs.items():
                save_file(mixed[alpha], str(out / shard.name), metadata=metadata)
            written += len(mixed[next(iter(outs))])
    return written


def interpolate_hash(cfg: Config, rd: RunDir) -> str:
    return rd.chained(json.dumps(sorted(cfg.export.interpolate)), "train")


def interpolated(cfg: Config, rd: RunDir) -> bool:
    """Whether every α of the run's fine-tune in `rd` is written from its current training (no αs: True)."""
    return not cfg.export.interpolate or rd.finished("interpolate", interpolate_hash(cfg, rd),
                                                     fingerprints(cfg, *MODEL_FILES))


def interpolate(cfg: Config, rd: RunDir, force: bool = False) -> dict | None:
    """Write `interpolated/<α>/` for each α of `export.interpolate` from the run's exported fine-tune."""
    from sasft_ray.export import base_safetensors

    if not cfg.export.interpolate:
        return None
    if not rd.begin("interpolate", interpolate_hash(cfg, rd), force, outputs=(INTERPOLATED,),
                    inputs=fingerprints(cfg, *MODEL_FILES)):
        return None
    base_files, why = base_safetensors(cfg.model.path)
    if why:
        raise InterpolateError(f"export.interpolate needs the base model's weights: {why}")
    alphas = cfg.export.interpolate  # sorted when the config loads
    with tempfile.TemporaryDirectory() as scratch:  # a bucket's run dir: read and write local copies
        tuned = Path(scratch, MODEL) if rd.remote else Path(rd.local(MODEL))
        if rd.remote:
            import pyarrow.fs as pafs

            pafs.copy_files(rd.path(MODEL), str(tuned))
        outs = {a: Path(scratch, *folder(a)) if rd.remote else Path(rd.local(*folder(a))) for a in alphas}
        tensors = interpolate_folders(base_files, tuned, outs)
        for alpha in alphas:
            if rd.remote:
                rd.upload(str(outs[alpha]), *folder(alpha))
            print(f"[interpolate] α {alpha_name(alpha)}: {rd.path(*folder(alpha))}")
    return rd.finish("interpolate", {"alphas": [alpha_name(a) for a in alphas], "tensors": tensors})
