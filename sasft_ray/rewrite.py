"""sdft's rewrites: before training, the base model rewrites each task reply in its own words.

Self-distillation fine-tuning (Yang et al. 2024, "Self-Distillation Bridges Distribution Gap in Language
Model Fine-Tuning"): the model is trained on its own wording of the task's replies, not on the reference's, so
that fine-tuning moves it less from what it was. Each assistant reply of a task training row is rewritten from
one prompt: the conversation before the reply's user message as it is, then a user turn of `sdft.prompt` filled
in with that user message (`{prompt}`) and the reply (`{reference}`), rendered in the model's own chat template.
A multi-turn row has each of its replies rewritten so, independently (the earlier replies it sees are the
reference ones), all at once.

The rewrites run on the self-talk engine pool (`selftalk.engine`, its restarts and `continue_on_error`,
`sasft_ray.selftalk.on_engines`): `RewriteWriter` actors in a Ray Data map over `task/train.parquet`, writing
`rewrite/*.parquet`, one row per task training row. On CPU each batch reseeds the engine's generator from
(`selftalk.seed`, its first row), on GPU every request has its own seed, as self-talk's.

`judge` decides what becomes of each row: a rewrite that is empty, cut at `sdft.max_tokens`, leaks the chat
template, did not fit `selftalk.engine.max_model_len`, was refused by the engine, or scores under
`sdft.min_score` by `sdft.keep_if` against its reference ("lost answer") is not used; then `sdft.on_lost`
keeps the row with its reference reply (`replaced`) or drops it (`drop_reason`). The mix reads the kept rows
in place of the task's.
"""

from __future__ import annotations

import math
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from sasft_ray.chat import TurnFormat, model_tokenizer, render_prompt, turn_format
from sasft_ray.config import Config, ConfigError, SdftConfig
from sasft_ray.data import MESSAGE_TYPE
from sasft_ray.filters import EMPTY, KEPT, LEAK, TRUNCATED, leaks
from sasft_ray.layout import REWRITE, TASK_TRAIN
from sasft_ray.rundir import RunDir
from sasft_ray.scorers import scorer
from sasft_ray.selftalk import ENGINE_ERROR, TOO_LONG, derived_seed, on_engines, queue, start_engine, was_cut

# source_row: the task training row; messages: rewritten (or, replaced, the reference); original: the reference
# replies; rewrites: the model's rewrites of them, used or not; score: the lowest keep_if score of its replies;
# rejected: why a rewrite was not used ("": all were)
REWRITE_SCHEMA = pa.schema([("source_row", pa.int64()), ("messages", MESSAGE_TYPE), ("original", pa.list_(pa.string())),
                            ("rewrites", pa.list_(pa.string())),
                            ("score", pa.float64()), ("replaced", pa.bool_()), ("rejected", pa.string()),
                            ("drop_reason", pa.string()), ("num_tokens", pa.int64())])
LOST = "lost answer"
# the settings a rewrite depends on, besides the task stage's run (and the model's files)
HASHED = ("model", "sdft", "selftalk.seed", "selftalk.engine", "selftalk.continue_on_error")


def prompts(messages: list[dict], template: str) -> list[list[dict]]:
    """The conversation each assistant reply is rewritten from: what came before its user message, then that
    message and the reply in `template` as one user turn (canonical rows: a user message before every reply)."""
    return [messages[:i - 1] + [{"role": "user", "content": template.format(prompt=messages[i - 1]["content"],
                                                                            reference=m["content"])}]
            for i, m in enumerate(messages) if m["role"] == "assistant"]


def answer(reference: str, pattern: str | None) -> str | None:
    """The answer in a reference reply: `sdft.answer_pattern`'s first group; None (the whole reply) without one."""
    found = re.search(pattern, reference) if pattern else None
    return found.group(1) if found else None


def check(text: str, reference: str, cfg: SdftConfig, markers: tuple[str, ...] = ()) -> tuple[float, str]:
    """A rewrite's `keep_if` score against its reference, and why it is not used ("" if it is)."""
    if not text.strip():
        return 0.0, EMPTY
    if leaks(text, markers):
        return 0.0, LEAK
    score = float(scorer(cfg.keep_if)(text, {"reference": reference, "answer": answer(reference, cfg.answer_pattern)}))
    return score, KEPT if score >= cfg.min_score else LOST


def judge(messages: list[dict], rewrites: list[tuple[str, str]], cfg: SdftConfig,
          markers: tuple[str, ...] = ()) -> dict:
    """A task row's outcome from the (text, reason) of each of its replies' rewrites (reason: the engine's, e.g.
    cut at max_tokens; "" for none): its messages (a rewrite not used replaced by its reference), the lowest
    score, whether any reply was `replaced` (on_lost original), the first reason a rewrite was not used, and
    the row's `drop_reason` (on_lost drop: that reason)."""
    out, scores, rejected, replies = [], [], KEPT, iter(rewrites)
    for m in messages:
        if m["role"] != "assistant":
            out.append(m)
            continue
        text, reason = next(replies)
        score, reason = (0.0, reason) if reason else check(text, m["content"], cfg, markers)
        scores.append(score)
        rejected = rejected or reason
        out.append({**m, "content": m["content"] if reason else text})
    return {"messages": out, "score": min(scores, default=0.0),
            "replaced": bool(rejected) and cfg.on_lost == "original", "rejected": rejected,
            "drop_reason": rejected if cfg.on_lost == "drop" else KEPT}


def check_fits(cfg: Config, tokenizer, fmt: TurnFormat) -> None:
    """Refuse, before any engine starts, a rewrite that cannot fit the engine whatever the row: the rewrite
    prompt's own tokens (chat template and `sdft.prompt`, empty fields) plus `sdft.max_tokens` over
    `selftalk.engine.max_model_len`. A row too long for it is left to `on_lost` ("over max_model_len")."""
    sd, limit = cfg.sdft, cfg.selftalk.engine.max_model_len
    (empty,) = prompts([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}], sd.prompt)
    template = len(tokenizer(render_prompt(tokenizer, fmt, empty, "assistant")).input_ids)
    if template + sd.max_tokens > limit:
        raise ConfigError(f"sdft rewrites need at least {template + sd.max_tokens} tokens (the chat template's and "
                          f"sdft.prompt's {template} + sdft.max_tokens {sd.max_tokens}), over "
                          f"selftalk.engine.max_model_len {limit}; raise it, or lower sdft.max_tokens")


class RewriteWriter:
    """One vLLM engine; each call rewrites the replies of one batch of task rows (a pyarrow table)."""

    def __init__(self, cfg_json: str, fmt: TurnFormat):
        self.cfg = Config.model_validate_json(cfg_json)
        self.fmt = fmt
        self.llm = start_engine(self.cfg)
        self.tokenizer = model_tokenizer(self.cfg.model)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        sd, rows = self.cfg.sdft, batch.to_pylist()
        if rows and not self.cfg.resources.use_gpu:  # vLLM's CPU sampler takes no per-request seed
            torch.manual_seed(derived_seed(self.cfg.selftalk.seed, rows[0]["source_row"]))
        sampling = dict(temperature=sd.temperature, top_p=sd.top_p, max_tokens=sd.max_tokens)
        done: dict[str, tuple[str, str, int]] = {}  # request id -> (text, reason, tokens)
        for row in rows:
            for j, conversation in enumerate(prompts(row["messages"], sd.prompt)):
                request_id = f"{row['source_row']}:{j}"
                # tokenized here as vLLM would (BOS added back): its length is known before it is sent
                prompt = self.tokenizer(render_prompt(self.tokenizer, self.fmt, conversation, "assistant")).input_ids
                if len(prompt) + sd.max_tokens > self.cfg.selftalk.engine.max_model_len:
                    done[request_id] = ("", TOO_LONG, 0)
                elif not queue(self.cfg, self.llm, request_id, prompt, sampling, self.fmt.stop_assistant,
                               (row["source_row"], j)):
                    done[request_id] = ("", ENGINE_ERROR, 0)
        engine = self.llm.llm_engine
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens = list(out.outputs[0].token_ids)
                    cut = was_cut(tokens, sd.max_tokens, self.fmt.stop_assistant)
                    done[out.request_id] = (out.outputs[0].text.strip(), TRUNCATED if cut else KEPT, len(tokens))
        written = []
        for row in rows:
            count = sum(m["role"] == "assistant" for m in row["messages"])
            replies = [done[f"{row['source_row']}:{j}"] for j in range(count)]
            written.append({"source_row": row["source_row"], "num_tokens": sum(n for _, _, n in replies),
                            "original": [m["content"] for m in row["messages"] if m["role"] == "assistant"],
                            "rewrites": [text for text, _, _ in replies],
                            **judge(row["messages"], [(t, r) for t, r, _ in replies], sd, self.fmt.markers)})
        return pa.Table.from_pylist(written, schema=REWRITE_SCHEMA)


def write_rewrites(cfg: Config, rd: RunDir, task_rows: int) -> dict:
    """Rewrite the replies of the task's `task_rows` training rows into `REWRITE`; returns the counts."""
    import ray

    from sasft_ray.session import connect

    tokenizer = model_tokenizer(cfg.model)
    fmt = turn_format(tokenizer)
    check_fits(cfg, tokenizer, fmt)
    connect(cfg)
    size = cfg.selftalk.engine.batch_size
    ds = ray.data.read_parquet(rd.path(TASK_TRAIN)).repartition(max(1, math.ceil(task_rows / size)))
    on_engines(cfg, ds, RewriteWriter, (cfg.model_dump_json(), fmt), batch_size=size,
               batch_format="pyarrow").write_parquet(rd.path(REWRITE))
    return rewrite_counts(rd)


def rewrite_counts(rd: RunDir) -> dict:
    """Rows in, out (to train on), rewritten, replaced and dropped (each by reason), tokens generated."""
    table = pads.dataset(rd.local(REWRITE), filesystem=rd.fs, format="parquet").to_table(
        columns=["rejected", "replaced", "drop_reason", "num_tokens"])

    def by_reason(rows: pa.Table, column: str) -> dict[str, int]:
        return {d["values"]: d["counts"] for d in pc.value_counts(rows[column]).to_pylist()}

    replaced = table.filter(table["replaced"])
    drops = by_reason(table.filter(pc.not_equal(table["drop_reason"], KEPT)), "drop_reason")
    rewritten = table.filter(pc.equal(table["rejected"], KEPT)).num_rows
    return {"rows_in": table.num_rows, "rows_out": rewritten + replaced.num_rows, "rewritten": rewritten,
            "replaced": replaced.num_rows, "replaced_reasons": by_reason(replaced, "rejected"), "drops": drops,
            "generated_tokens": int(pc.sum(table["num_tokens"]).as_py() or 0)}
