"""Self-talk: the base model writes its own dialogues, streamed through vLLM actors.

Template-only prompting (as in Magpie): the engine sees only the model's own
chat-template prefix that opens a user turn, so the user message it samples is
drawn from what the model thinks users say; then it answers that message as the
assistant. Each turn is two `ray.data.llm` processors chained in one Ray Data
pipeline, so every stage streams and scales on its own: the same code runs
CPU engines here and tensor-parallel GPU engines on a cluster.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

from sasft_ray.config import Config, EngineConfig

SENTINEL = "\ue000SASFT\ue000"  # private-use text that no tokenizer merges with its neighbours
LIGHT_CPUS = 0.25  # CPU share of the light row maps, so the engines keep the cores


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Once per worker process: every Ray task reuses it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


@dataclass(frozen=True)
class TurnFormat:
    """What a model's chat template says about turns, derived once in the driver."""

    stop_user: tuple[int, ...]       # token ids that end a user message
    stop_assistant: tuple[int, ...]  # token ids that end an assistant message
    markers: tuple[str, ...]         # template text that must never appear inside a message
    strip_bos: str                   # the BOS text to drop from a render, if the tokenizer adds it again


def _suffix_after_sentinel(tokenizer, messages: list[dict]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return text.split(SENTINEL, 1)[1]


def _first_token(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text.strip(), add_special_tokens=False).input_ids if text.strip() else []
    return ids[:1] if ids and ids[0] in tokenizer.all_special_ids + list(tokenizer.added_tokens_decoder) else []


def turn_format(tokenizer) -> TurnFormat:
    if not tokenizer.chat_template:
        raise ValueError("the model's tokenizer has no chat template; self-talk needs one to open a user turn")
    eos = tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    user_end = _suffix_after_sentinel(tokenizer, [{"role": "user", "content": SENTINEL}])
    assistant_end = _suffix_after_sentinel(
        tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": SENTINEL}])
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": SENTINEL}, {"role": "user", "content": SENTINEL},
         {"role": "assistant", "content": SENTINEL}], tokenize=False)
    segments = {s.strip() for s in rendered.split(SENTINEL) if s.strip()}
    specials = {t for t in tokenizer.all_special_tokens + [str(t) for t in tokenizer.added_tokens_decoder.values()]
                if len(t) > 1}
    bos = tokenizer.bos_token or ""
    adds_bos = bool(bos) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
    return TurnFormat(
        stop_user=tuple(dict.fromkeys(_first_token(tokenizer, user_end) + eos_ids)),
        stop_assistant=tuple(dict.fromkeys(_first_token(tokenizer, assistant_end) + eos_ids)),
        markers=tuple(sorted(segments | specials)),
        strip_bos=bos if adds_bos else "",
    )


def render(tokenizer, messages: list[dict], strip_bos: str = "", generation_prompt: bool = False) -> str:
    """The chat template's text, less a leading BOS that the tokenizer will add again."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return text[len(strip_bos):] if strip_bos and text.startswith(strip_bos) else text


def render_prompt(tokenizer, fmt: TurnFormat, history: list[dict], role: str) -> str:
    """The text that opens the next `role` turn after `history`, nothing more."""
    if role == "assistant":
        return render(tokenizer, history, fmt.strip_bos, generation_prompt=True)
    text = render(tokenizer, history + [{"role": "user", "content": SENTINEL}], fmt.strip_bos)
    return text.split(SENTINEL, 1)[0]


# --- Ray Data stages: top-level functions, so they pickle by reference ------------------------

def _prepare(row: dict, *, model: str, trust_remote_code: bool, fmt: TurnFormat, role: str,
             sampling: dict) -> dict:
    tokenizer = load_tokenizer(model, trust_remote_code)
    history = list(row["messages"])
    stop = fmt.stop_user if role == "user" else fmt.stop_assistant
    return {
        **row,
        "messages": history,
        "prompt": render_prompt(tokenizer, fmt, history, role),
        # No per-request seed: vLLM's CPU sampler crashes on seeded requests ("CPU Generator does not
        # use offset"); the engine is seeded once instead.
        "sampling_params": {**sampling, "stop_token_ids": list(stop), "skip_special_tokens": False},
    }


def _collect(row: dict, *, fmt: TurnFormat, role: str, max_tokens: int) -> dict:
    tokens = list(row["generated_tokens"])
    stop = fmt.stop_user if role == "user" else fmt.stop_assistant
    truncated = len(tokens) >= max_tokens and (not tokens or tokens[-1] not in stop)
    text = row["generated_text"].strip()  # the stop token is in `tokens`, never in the text
    return {
        "id": row["id"],
        # the opening words of the first user turn: a cheap measure of how varied the topics are
        "first_words": row["first_words"] or " ".join(text.lower().split()[:2]),
        "messages": list(row["messages"]) + [{"role": role, "content": text}],
        "num_tokens": int(row["num_tokens"]) + len(tokens),
        "truncated": bool(row["truncated"]) or truncated,
        "finished_at": time.time(),  # when this message was done: throughput over time, stalls
    }


def _seed_row(row: dict, *, system_prompt: str | None) -> dict:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return {"id": int(row["id"]), "messages": messages, "num_tokens": 0, "truncated": False, "first_words": "",
            "finished_at": 0.0}


def engine_kwargs(cfg: Config, eng: EngineConfig, **extra) -> dict:
    """vLLM engine arguments shared by the self-talk engines and the served models."""
    gpu = cfg.resources.use_gpu
    return dict(max_model_len=eng.max_model_len, max_num_seqs=eng.max_num_seqs,
                tensor_parallel_size=eng.tensor_parallel_size, trust_remote_code=cfg.model.trust_remote_code,
                dtype=cfg.model.dtype, enforce_eager=(not gpu) if eng.enforce_eager is None else eng.enforce_eager,
                **extra)


def engine_placement(cfg: Config, eng: EngineConfig) -> dict:
    """On CPU an engine must be told its CPU bundle, or Ray's LLM stack asks for a GPU."""
    return {} if cfg.resources.use_gpu else {"placement_group_config": {"bundles": [{"CPU": eng.cpus_per_engine}]}}


def engine_env(cfg: Config, eng: EngineConfig) -> dict:
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "WARNING"}
    if not cfg.resources.use_gpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(eng.kv_cache_gib)))
        # Engines share the cores: idle OpenMP threads must sleep, not spin.
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def engine_processor_config(cfg: Config):
    """One vLLM engine pool; GPUs on a cluster, a CPU bundle per engine here."""
    from ray.data.llm import vLLMEngineProcessorConfig

    eng = cfg.selftalk.engine
    return vLLMEngineProcessorConfig(
        model_source=cfg.model.path, engine_kwargs=engine_kwargs(cfg, eng, seed=cfg.selftalk.seed),
        concurrency=eng.concurrency, batch_size=eng.batch_size, chat_template_stage=False, tokenize_stage=False,
        detokenize_stage=False, runtime_env={"env_vars": engine_env(cfg, eng)}, **engine_placement(cfg, eng),
    )


def sampling_for(cfg: Config, role: str) -> dict:
    st = cfg.selftalk
    if role == "user":
        temperature = st.temperature if st.user_temperature is None else st.user_temperature
        top_p = st.top_p if st.user_top_p is None else st.user_top_p
        return dict(temperature=temperature, top_p=top_p, max_tokens=st.max_user_tokens)
    return dict(temperature=st.temperature, top_p=st.top_p, max_tokens=st.max_assistant_tokens)


def selftalk_dataset(cfg: Config, num_rows: int, fmt: TurnFormat):
    """A lazy Ray Dataset of `num_rows` generated dialogues (unfiltered)."""
    import ray
    from ray.data.llm import build_processor

    light = {"num_cpus": LIGHT_CPUS}
    blocks = max(1, math.ceil(num_rows / cfg.selftalk.engine.batch_size))
    ds = ray.data.range(num_rows, override_num_blocks=blocks)
    ds = ds.map(functools.partial(_seed_row, system_prompt=cfg.selftalk.system_prompt), **light)
    engine = engine_processor_config(cfg)
    for _turn in range(cfg.selftalk.turns):
        for role in ("user", "assistant"):
            sampling = sampling_for(cfg, role)
            processor = build_processor(
                engine,
                preprocess=functools.partial(
                    _prepare, model=cfg.model.path, trust_remote_code=cfg.model.trust_remote_code, fmt=fmt,
                    role=role, sampling=sampling),
                postprocess=functools.partial(_collect, fmt=fmt, role=role, max_tokens=sampling["max_tokens"]),
                preprocess_map_kwargs=light, postprocess_map_kwargs=light,
            )
            ds = processor(ds)
    return ds
