"""vLLM engine settings, one implementation for the self-talk engines and the served models.

`engine_kwargs` is what vLLM gets (our own keys, then the free `engine.vllm` mapping),
`engine_placement` what Ray reserves for one engine (a CPU bundle here; `tensor_parallel_size`
GPUs of one node, of `accelerator_type`, on a cluster), `engine_env` the variables the engine
process starts with. `check_vllm_args` validates `engine.vllm` against the installed vLLM's own
`EngineArgs` (and, for serving, its OpenAI server's `FrontendArgs`) when the config loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
from pathlib import Path
from typing import Any

# engine arguments the config sets through its own keys: the planner and the pipeline read those
OWN_KEYS = {"model": "model.path", "tokenizer": "model.path", "trust_remote_code": "model.trust_remote_code",
            "dtype": "model.dtype", "seed": "selftalk.seed", "max_model_len": "engine.max_model_len",
            "max_num_seqs": "engine.max_num_seqs", "tensor_parallel_size": "engine.tensor_parallel_size",
            "enforce_eager": "engine.enforce_eager", "chat_template": "model.chat_template"}
# vLLM's logging config: a `FrontendArgs` key in the release Ray's LLM stack pins (0.29), an `EngineArgs` key from
# 0.32 on. Every release also reads it from the engine process's environment, so it goes there, for self-talk
# and serving alike, whichever release is installed.
LOG_CONFIG_KEY = "log_config_file"


def engine_kwargs(cfg, eng, serving: bool = False, **extra) -> dict:
    """vLLM engine arguments of one engine; `serving` adds the OpenAI server's own (`FrontendArgs`) keys, the
    chat template of `model.chat_template` among them (self-talk renders its prompts itself)."""
    gpu = cfg.resources.use_gpu
    own = dict(max_model_len=eng.max_model_len, max_num_seqs=eng.max_num_seqs,
               tensor_parallel_size=eng.tensor_parallel_size, trust_remote_code=cfg.model.trust_remote_code,
               dtype=cfg.model.dtype, enforce_eager=(not gpu) if eng.enforce_eager is None else eng.enforce_eager)
    if serving and cfg.model.chat_template:  # the text, not the path: a replica's node may not have the file
        own["chat_template"] = Path(cfg.model.chat_template).read_text(encoding="utf-8")
    frontend = _fields("frontend") if eng.vllm else set()
    passed = {k: v for k, v in eng.vllm.items() if k != LOG_CONFIG_KEY and (serving or k not in frontend)}
    return {**own, **extra, **passed}


def accelerator(cfg, eng) -> str | None:
    """The GPU type an engine asks for: its own `accelerator_type`, else `resources.accelerator_type`."""
    return (eng.accelerator_type or cfg.resources.accelerator_type) if cfg.resources.use_gpu else None


def engine_resources(cfg, eng) -> dict:
    """What Ray reserves for one self-talk engine actor: `tensor_parallel_size` GPUs (one actor, so one
    node: vLLM's own workers share it) of the engine's accelerator type, or its CPU bundle."""
    if not cfg.resources.use_gpu:
        return {"num_cpus": cfg.engine_cpus(serving=False)}
    kind = accelerator(cfg, eng)
    return {"num_gpus": eng.tensor_parallel_size, **({"accelerator_type": kind} if kind else {})}


def engine_placement(cfg, eng, engines: int | None = None) -> dict:
    """Ray Serve LLM's placement of one engine. CPU: the engine's CPU bundle (without it Ray's LLM stack
    asks for a GPU), its share of the cores among the `engines` of its endpoint. GPU: one bundle per
    tensor-parallel rank, all on one node (STRICT_PACK: NVLink, not the network, carries the all-reduces),
    on the engine's accelerator type."""
    if not cfg.resources.use_gpu:
        return {"placement_group_config": {"bundles": [{"CPU": cfg.engine_cpus(serving=True, engines=engines)}]}}
    return {"placement_group_config": {"bundle_per_worker": {"GPU": 1}, "strategy": "STRICT_PACK"},
            **({"accelerator_type": kind} if (kind := accelerator(cfg, eng)) else {})}


def engine_env(cfg, eng, batch_invariant: bool = False) -> dict:
    """The variables an engine process starts with. `batch_invariant` (self-talk on GPUs): vLLM's
    batch-invariant kernels, so a dialogue's logits do not depend on what else its engine batches."""
    env = {"VLLM_LOGGING_LEVEL": "WARNING", **({"VLLM_BATCH_INVARIANT": "1"} if batch_invariant else {})}
    if LOG_CONFIG_KEY in eng.vllm:
        env["VLLM_LOGGING_CONFIG_PATH"] = str(eng.vllm[LOG_CONFIG_KEY])
    if not cfg.resources.use_gpu:
        # vLLM's engine core in the engine's own process: it starts in ~3 s instead of ~30 on CPU. On GPUs
        # it keeps its process of its own, where scheduling and detokenisation do not stall the GPU.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(eng.kv_cache_gib)))
        # Engines share the cores: idle OpenMP threads must sleep, not spin. And vLLM's CPU worker must not
        # pin itself: it binds to the cores it does not reserve for its scheduler, the same ones for every
        # engine of a machine, so the demo's three served engines shared one of its two cores.
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return env


# --- engine.vllm, checked against vLLM's own argument classes ----------------------------------

@functools.cache
def _classes() -> dict[str, type]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    return {"engine": AsyncEngineArgs, "frontend": FrontendArgs}


@functools.cache
def _fields(kind: str) -> set[str]:
    return {f.name for f in dataclasses.fields(_classes()[kind])}


def _annotation(cls: type, name: str) -> Any:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if not isinstance(field.type, str):
        return field.type
    try:
        return eval(field.type, vars(sys.modules[cls.__module__]))  # vLLM's own annotation text
    except Exception:
        return None  # an annotation its module cannot resolve: the key is checked, not its type


def check_vllm_args(args: dict[str, Any]) -> None:
    """Every key an argument of vLLM's engine (`AsyncEngineArgs`) or OpenAI server (`FrontendArgs`), not
    one the config sets itself, and its value of the type vLLM declares; then the engine arguments are
    constructed as vLLM would. A `ValueError` names the key."""
    from pydantic import TypeAdapter, ValidationError
    from vllm import __version__ as release

    known = _fields("engine") | _fields("frontend")
    for key, value in args.items():
        if key in OWN_KEYS:
            raise ValueError(f"vllm.{key}: set {OWN_KEYS[key]} instead (the planner and the pipeline read it)")
        if key not in known:
            hint = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            raise ValueError(f"vllm.{key}: not an argument of vLLM {release}'s engine or OpenAI server"
                             + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        cls = _classes()["engine" if key in _fields("engine") else "frontend"]
        if (annotation := _annotation(cls, key)) is not None:
            try:
                TypeAdapter(annotation).validate_python(value, strict=isinstance(value, str))
            except ValidationError as e:
                raise ValueError(f"vllm.{key}: {value!r} is not what vLLM takes ({e.errors()[0]['msg']})") from None
    engine = {k: v for k, v in args.items() if k in _fields("engine")}
    try:
        # a bucket URI as the model: vLLM resolves no hub id for it (nor needs the network) at construction
        _classes()["engine"](model="s3://unused/model", **engine)
    except (TypeError, ValueError) as e:
        raise ValueError(f"vllm: vLLM refuses {engine}: {e}") from None
