"""Self-talk: the base model writes its own dialogues, streamed through vLLM actors.

Template-only prompting (as in Magpie): the engine sees only the model's own
chat-template prefix that opens a user turn, so the user message it samples is
drawn from what the model thinks users say; then it answers that message as the
assistant. One pool of `selftalk.engine.concurrency` engines (`DialogueWriter`
actors in a Ray Data map, each one vLLM engine of `tensor_parallel_size` GPUs or
a CPU bundle) writes whole dialogues: every turn and role of a batch on the same
engine, so a later turn reuses the earlier turns' KV (prefix caching) and no
engine idles while another role's pool is busy. The same code runs CPU engines
here and tensor-parallel GPU engines on a cluster.

The same config, seed and engine count give the same dialogues: each batch of
dialogues is fixed by its index; on GPU every request has its own seed from
(`selftalk.seed`, dialogue id, turn, role); on CPU, where vLLM's sampler takes no
per-request seed, the engine's generator is reseeded from (`selftalk.seed`,
batch) before the batch is written, so what a batch gets does not depend on
which engine ran it or when.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
import warnings
from dataclasses import dataclass

from sasft_ray.config import Config
from sasft_ray.engines import engine_env, engine_kwargs, engine_resources

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


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS before every text it encodes (Llama-3's does)."""
    return bool(tokenizer.bos_token) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]


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
    return TurnFormat(
        stop_user=tuple(dict.fromkeys(_first_token(tokenizer, user_end) + eos_ids)),
        stop_assistant=tuple(dict.fromkeys(_first_token(tokenizer, assistant_end) + eos_ids)),
        markers=tuple(sorted(segments | specials)),
        strip_bos=bos if adds_bos(tokenizer) else "",
    )


def check_fits(cfg: Config, tokenizer, fmt: TurnFormat) -> None:
    """Refuse, before any engine starts, a dialogue that cannot fit the engine: the chat template's own
    tokens plus `turns` x (max_user_tokens + max_assistant_tokens) over `engine.max_model_len`."""
    from sasft_ray.config import ConfigError

    st = cfg.selftalk
    system = [{"role": "system", "content": st.system_prompt}] if st.system_prompt else []
    filler = [{"role": role, "content": "x"} for _ in range(st.turns) for role in ("user", "assistant")]
    rendered = len(tokenizer(render(tokenizer, system + filler, fmt.strip_bos)).input_ids)
    template = rendered - len(filler) * len(tokenizer("x", add_special_tokens=False).input_ids)
    messages = st.turns * (st.max_user_tokens + st.max_assistant_tokens)
    if template + messages > st.engine.max_model_len:
        raise ConfigError(f"self-talk dialogues need up to {template + messages} tokens (the chat template's "
                          f"{template} + selftalk.turns {st.turns} x (max_user_tokens {st.max_user_tokens} + "
                          f"max_assistant_tokens {st.max_assistant_tokens})), over selftalk.engine.max_model_len "
                          f"{st.engine.max_model_len}; raise it or lower the token limits")


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


# --- the engine actor: whole dialogues, turn after turn ---------------------------------------

TOO_LONG, ENGINE_ERROR = "over max_model_len", "engine error"  # drop reasons set while writing


def derived_seed(*parts: int) -> int:
    """A 31-bit seed from integers (selftalk.seed, batch or dialogue id, turn, role), the same in every process."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class DialogueWriter:
    """One vLLM engine; each call writes one batch of dialogues whole (`__call__` takes batch indices)."""

    def __init__(self, cfg_json: str, fmt: TurnFormat, num_rows: int):
        from vllm import LLM

        self.cfg = Config.model_validate_json(cfg_json)
        self.fmt, self.num_rows = fmt, num_rows
        eng, gpu = self.cfg.selftalk.engine, self.cfg.resources.use_gpu
        extra = {"distributed_executor_backend": "mp"} if gpu and eng.tensor_parallel_size > 1 else {}
        self.llm = LLM(model=self.cfg.model.path, **engine_kwargs(
            self.cfg, eng, seed=self.cfg.selftalk.seed, enable_prefix_caching=True, **extra))
        self.tokenizer = load_tokenizer(self.cfg.model.path, self.cfg.model.trust_remote_code)

    def __call__(self, batch: dict) -> dict:
        st = self.cfg.selftalk
        rows = []
        for index in (int(i) for i in batch["id"]):
            ids = range(index * st.engine.batch_size, min((index + 1) * st.engine.batch_size, self.num_rows))
            rows += self.write(index, list(ids))
        return {key: [r[key] for r in rows] for key in rows[0]} if rows else {}

    def write(self, index: int, ids: list[int]) -> list[dict]:
        """Dialogues `ids` (batch `index`): user turn, reply, user turn, ... for `selftalk.turns` exchanges.
        Continuous batching across turns: a dialogue's next message is queued the moment its last one
        ends, so the engine stays full while other dialogues of the batch are still on an earlier turn."""
        import torch

        st, gpu = self.cfg.selftalk, self.cfg.resources.use_gpu
        system = [{"role": "system", "content": st.system_prompt}] if st.system_prompt else []
        rows = [{"id": i, "messages": list(system), "num_tokens": 0, "truncated": False, "first_words": "",
                 "drop_reason": "", "finished_at": 0.0} for i in ids]
        if not gpu:  # vLLM's CPU sampler takes no per-request seed: its generator is seeded for this batch
            torch.manual_seed(derived_seed(st.seed, index))
        waiting: dict[str, tuple[dict, int, str]] = {}
        for row in rows:
            self.submit(row, 0, "user", waiting)
        engine = self.llm.llm_engine
        while engine.has_unfinished_requests():
            for out in engine.step():
                if not out.finished:
                    continue
                row, turn, role = waiting.pop(out.request_id)
                self.record(row, role, out.outputs[0])
                turn, role = (turn, "assistant") if role == "user" else (turn + 1, "user")
                if turn < st.turns:
                    self.submit(row, turn, role, waiting)
        now = time.time()  # when the batch was done: throughput over time, stalls
        return [{**row, "finished_at": now} for row in rows]

    def submit(self, row: dict, turn: int, role: str, waiting: dict) -> None:
        """Queue the row's next message; a prompt with no room for it is never sent (the row is kept, marked)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        st, fmt = self.cfg.selftalk, self.fmt
        sampling = self.cfg.selftalk.sampling(role)
        # tokenized here as vLLM would (BOS added back): its length is known before it is sent
        prompt = self.tokenizer(render_prompt(self.tokenizer, fmt, row["messages"], role)).input_ids
        if len(prompt) + sampling["max_tokens"] > st.engine.max_model_len:
            row["drop_reason"] = TOO_LONG
            return
        stop = fmt.stop_user if role == "user" else fmt.stop_assistant
        # GPU: a seed per request. CPU: vLLM's sampler crashes on seeded requests ("CPU Generator does not
        # use offset"); the batch's generator seed stands in (`write`).
        seed = derived_seed(st.seed, row["id"], turn, role == "assistant") if self.cfg.resources.use_gpu else None
        params = SamplingParams(**sampling, stop_token_ids=list(stop), skip_special_tokens=False, seed=seed,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        request_id = f"{row['id']}:{turn}:{role}"
        try:
            self.llm.llm_engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
        except Exception:
            if not st.continue_on_error:
                raise
            row["drop_reason"] = ENGINE_ERROR  # the engine refused this one; the others go on
            return
        waiting[request_id] = (row, turn, role)

    def record(self, row: dict, role: str, out) -> None:
        tokens = list(out.token_ids)
        stop = self.fmt.stop_user if role == "user" else self.fmt.stop_assistant
        text = out.text.strip()  # the stop token is in `tokens`, never in the text
        row["messages"].append({"role": role, "content": text})
        row["num_tokens"] += len(tokens)
        row["truncated"] |= len(tokens) >= self.cfg.selftalk.sampling(role)["max_tokens"] and (
            not tokens or tokens[-1] not in stop)
        # the opening words of the first user turn: a cheap measure of how varied the topics are
        row["first_words"] = row["first_words"] or " ".join(text.lower().split()[:2])


def selftalk_dataset(cfg: Config, num_rows: int, fmt: TurnFormat):
    """A lazy Ray Dataset of `num_rows` generated dialogues (unfiltered): one row per batch index in,
    `engine.batch_size` dialogues out, on `engine.concurrency` engines."""
    import ray

    eng = cfg.selftalk.engine
    batches = math.ceil(num_rows / eng.batch_size)
    with warnings.catch_warnings():  # the restart bounds have no named parameter: they go as ray_remote_args
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ray.data.range(batches, override_num_blocks=batches).map_batches(
            DialogueWriter, fn_constructor_args=(cfg.model_dump_json(), fmt, num_rows), batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=eng.concurrency),
            runtime_env={"env_vars": engine_env(cfg, eng, cfg.selftalk.batch_invariant)}, **engine_resources(cfg, eng),
            # a batch whose engine dies is retried on a restarted one, a bounded number of times
            max_restarts=cfg.selftalk.max_engine_restarts, max_task_retries=cfg.selftalk.max_engine_restarts)
