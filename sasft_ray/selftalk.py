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

import hashlib
import math
import time
import warnings

from sasft_ray.chat import TurnFormat, model_tokenizer, render, render_prompt
from sasft_ray.config import Config
from sasft_ray.engines import engine_env, engine_kwargs, engine_resources
from sasft_ray.filters import cut_off

LIGHT_CPUS = 0.25  # CPU share of the light row maps, so the engines keep the cores


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


# --- the engine actor: whole dialogues, turn after turn ---------------------------------------

TOO_LONG, ENGINE_ERROR = "over max_model_len", "engine error"  # drop reasons set while writing


def derived_seed(*parts: int) -> int:
    """A 31-bit seed from integers (selftalk.seed, batch or dialogue id, turn, role), the same in every process."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class SelfTalkCut(RuntimeError):
    """An engine's first batch lost so many dialogues to a token limit that the stage cannot succeed."""


class Written:
    """How many dialogues the engines have finished, for the progress line: a batch's Parquet file appears
    only when its last dialogue ends, and a real model's batch can take minutes."""

    def __init__(self):
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    def get(self) -> int:
        return self.count


class DialogueWriter:
    """One vLLM engine; each call writes one batch of dialogues whole (`__call__` takes batch indices)."""

    REPORT_EVERY_S = 2.0

    def __init__(self, cfg_json: str, fmt: TurnFormat, num_rows: int, written=None):
        self.cfg = Config.model_validate_json(cfg_json)
        self.fmt, self.num_rows, self.written = fmt, num_rows, written
        self.first_batch = True
        self.cut = {"user": 0, "assistant": 0}      # messages of this batch stopped by their token limit
        self.longest = {"user": 0, "assistant": 0}  # tokens of the longest message that ended by itself
        self.unreported, self.reported_at = 0, time.time()
        self.llm = start_engine(self.cfg)
        self.tokenizer = model_tokenizer(self.cfg.model)

    def __call__(self, batch: dict) -> dict:
        st = self.cfg.selftalk
        rows = []
        for index in (int(i) for i in batch["id"]):
            ids = range(index * st.engine.batch_size, min((index + 1) * st.engine.batch_size, self.num_rows))
            rows += self.write(index, list(ids))
            if self.first_batch:
                self.first_batch = False
                self.check_cuts(rows)
        return {key: [r[key] for r in rows] for key in rows[0]} if rows else {}

    def write(self, index: int, ids: list[int]) -> list[dict]:
        """Dialogues `ids` (batch `index`): user turn, reply, user turn, ... for `selftalk.turns` exchanges.
        Continuous batching across turns: a dialogue's next message is queued the moment its last one
        ends, so the engine stays full while other dialogues of the batch are still on an earlier turn."""
        import torch

        st, gpu = self.cfg.selftalk, self.cfg.resources.use_gpu
        system = [{"role": "system", "content": st.system_prompt}] if st.system_prompt else []
        rows = [{"id": i, "messages": list(system), "num_tokens": 0, "truncated": False, "cut_replies": 0,
                 "open_end": False, "first_words": "", "drop_reason": "", "finished_at": 0.0} for i in ids]
        if not gpu:  # vLLM's CPU sampler takes no per-request seed: its generator is seeded for this batch
            torch.manual_seed(derived_seed(st.seed, index))
        self.cut = dict.fromkeys(self.cut, 0)
        waiting: dict[str, tuple[dict, int, str]] = {}
        for row in rows:
            if not self.submit(row, 0, "user", waiting):
                self.finished(1)
        engine = self.llm.llm_engine
        while engine.has_unfinished_requests():
            for out in engine.step():
                if not out.finished:
                    continue
                row, turn, role = waiting.pop(out.request_id)
                self.record(row, role, out.outputs[0])
                turn, role = (turn, "assistant") if role == "user" else (turn + 1, "user")
                if turn >= st.turns or not self.submit(row, turn, role, waiting):
                    self.finished(1)
        self.finished(0, flush=True)
        now = time.time()  # when the batch was done: throughput over time, stalls
        return [{**row, "finished_at": now} for row in rows]

    def finished(self, n: int, flush: bool = False) -> None:
        """Count `n` more finished dialogues, told to the progress counter every few seconds."""
        self.unreported += n
        if self.written is not None and self.unreported and (
                flush or time.time() - self.reported_at > self.REPORT_EVERY_S):
            self.written.add.remote(self.unreported)
            self.unreported, self.reported_at = 0, time.time()

    def check_cuts(self, rows: list[dict]) -> None:
        """After the engine's first batch: if the dialogues lost to a token limit are so many that, at that
        rate, fewer than `filters.min_survival` of the wanted ones would survive, stop now, naming the limit,
        instead of when the whole stage has been paid for."""
        st = self.cfg.selftalk
        lost = sum(cut_off(r, self.cfg.filters) or r["drop_reason"] == TOO_LONG for r in rows)
        wanted = round(self.num_rows / st.oversample)  # what the stage generates num_rows for
        expected = round((1 - lost / len(rows)) * self.num_rows)
        if not lost or expected >= self.cfg.filters.min_survival * wanted:
            return
        too_long = sum(r["drop_reason"] == TOO_LONG for r in rows)
        raise SelfTalkCut(
            f"self-talk stopped after its first batch: {lost} of its {len(rows)} dialogues were cut at a token "
            f"limit (replies at selftalk.max_assistant_tokens {st.max_assistant_tokens}: {self.cut['assistant']}; "
            f"user turns at selftalk.max_user_tokens {st.max_user_tokens}: {self.cut['user']}; no room left in "
            f"selftalk.engine.max_model_len {st.engine.max_model_len}: {too_long}). At that rate about {expected} "
            f"of the {self.num_rows} generated would survive, under filters.min_survival "
            f"{self.cfg.filters.min_survival} x the {wanted} wanted. Raise the limit that cut them (the longest "
            f"reply that ended by itself took {self.longest['assistant']} tokens, the longest user turn "
            f"{self.longest['user']}), or shorten the replies with selftalk.system_prompt")

    def submit(self, row: dict, turn: int, role: str, waiting: dict) -> bool:
        """Queue the row's next message; a prompt with no room for it is never sent (the row is kept, marked).
        Returns whether it was queued."""
        st, fmt = self.cfg.selftalk, self.fmt
        sampling = self.cfg.selftalk.sampling(role)
        # tokenized here as vLLM would (BOS added back): its length is known before it is sent
        prompt = self.tokenizer(render_prompt(self.tokenizer, fmt, row["messages"], role)).input_ids
        if len(prompt) + sampling["max_tokens"] > st.engine.max_model_len:
            row["drop_reason"] = TOO_LONG
            return False
        stop = fmt.stop_user if role == "user" else fmt.stop_assistant
        request_id = f"{row['id']}:{turn}:{role}"
        if not queue(self.cfg, self.llm, request_id, prompt, sampling, stop, (row["id"], turn, role == "assistant")):
            row["drop_reason"] = ENGINE_ERROR  # the engine refused this one; the others go on
            return False
        waiting[request_id] = (row, turn, role)
        return True

    def record(self, row: dict, role: str, out) -> None:
        tokens = list(out.token_ids)
        stop = self.fmt.stop_user if role == "user" else self.fmt.stop_assistant
        text = out.text.strip()  # the stop token is in `tokens`, never in the text
        row["messages"].append({"role": role, "content": text})
        row["num_tokens"] += len(tokens)
        cut = was_cut(tokens, self.cfg.selftalk.sampling(role)["max_tokens"], stop)
        row["truncated"] |= cut
        row["cut_replies"] += cut and role == "assistant"
        row["open_end"] = cut and role == "assistant"  # the last message so far is a reply cut at its limit
        self.cut[role] += cut
        if not cut:
            self.longest[role] = max(self.longest[role], len(tokens))
        # the opening words of the first user turn: a cheap measure of how varied the topics are
        row["first_words"] = row["first_words"] or " ".join(text.lower().split()[:2])


def selftalk_dataset(cfg: Config, num_rows: int, fmt: TurnFormat, written=None):
    """A lazy Ray Dataset of `num_rows` generated dialogues (unfiltered): one row per batch index in,
    `engine.batch_size` dialogues out, on `engine.concurrency` engines; each finished dialogue is counted
    in `written` (a `Written` actor) if given."""
    import ray

    batches = math.ceil(num_rows / cfg.selftalk.engine.batch_size)
    return on_engines(cfg, ray.data.range(batches, override_num_blocks=batches), DialogueWriter,
                      (cfg.model_dump_json(), fmt, num_rows, written), batch_size=1)


# --- the engine pool: shared with sdft's rewrites (`sasft_ray.rewrite`) -----------------------------

def start_engine(cfg: Config):
    """The vLLM engine of one actor of the pool (`selftalk.engine`)."""
    from vllm import LLM

    eng, gpu = cfg.selftalk.engine, cfg.resources.use_gpu
    extra = {"distributed_executor_backend": "mp"} if gpu and eng.tensor_parallel_size > 1 else {}
    return LLM(model=cfg.model.path, **engine_kwargs(cfg, eng, seed=cfg.selftalk.seed, enable_prefix_caching=True,
                                                     **extra))


def queue(cfg: Config, llm, request_id: str, prompt: list[int], sampling: dict, stop: tuple[int, ...],
          seed_parts: tuple) -> bool:
    """Queue one request of `prompt`'s token ids, to end at a `stop` token; False if the engine refused it and
    `selftalk.continue_on_error` lets the others go on. GPU: a seed per request, from (`selftalk.seed`,
    *`seed_parts`). CPU: vLLM's sampler crashes on seeded requests ("CPU Generator does not use offset"); the
    caller seeds the engine's generator per batch instead."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    seed = derived_seed(cfg.selftalk.seed, *seed_parts) if cfg.resources.use_gpu else None
    params = SamplingParams(**sampling, stop_token_ids=list(stop), skip_special_tokens=False, seed=seed,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    try:
        llm.llm_engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    except Exception:
        if not cfg.selftalk.continue_on_error:
            raise
        return False
    return True


def was_cut(tokens: list[int], max_tokens: int, stop: tuple[int, ...]) -> bool:
    """A message stopped by its token limit, not by a stop token of its own."""
    return len(tokens) >= max_tokens and (not tokens or tokens[-1] not in stop)


def on_engines(cfg: Config, ds, writer: type, args: tuple, **map_args):
    """`ds` mapped by `writer(*args)` actors, each one vLLM engine of the pool: `selftalk.engine.concurrency` of
    them, their resources and environment, and a batch whose engine dies retried on a restarted one, a bounded
    number of times (`selftalk.max_engine_restarts`)."""
    import ray

    eng = cfg.selftalk.engine
    with warnings.catch_warnings():  # the restart bounds have no named parameter: they go as ray_remote_args
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ds.map_batches(
            writer, fn_constructor_args=args, compute=ray.data.ActorPoolStrategy(size=eng.concurrency),
            runtime_env={"env_vars": engine_env(cfg, eng, cfg.selftalk.batch_invariant)}, **engine_resources(cfg, eng),
            max_restarts=cfg.selftalk.max_engine_restarts, max_task_retries=cfg.selftalk.max_engine_restarts,
            **map_args)
