"""`sasft eval`: in-domain gain and forgetting, measured over HTTP against the served models.

Every model is scored the same way through the same endpoint:
  in-domain  the task's held-out split; the reply to each prompt against the reference reply
  suites     general benchmarks as JSONL prompts + references, with built-in or named scorers
  lm_eval    lm-evaluation-harness tasks through `local-completions` (log-likelihood) or
             `local-chat-completions` (generation), by name or from local task files

The base model's scores depend only on the base model and the benchmarks, so they are
cached by a hash of both: a grid of runs over one base model scores it once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq

from sasft_ray import instructions
from sasft_ray.chat import adds_bos, model_tokenizer
from sasft_ray.config import INDOMAIN, Config, EvalSuite, LmEvalGroup, check_benchmark_name
from sasft_ray.layout import BASE_CACHE, LM_EVAL, SAMPLES, SCORED, TASK_HELDOUT, is_uri
from sasft_ray.rundir import RunDir, fingerprint
from sasft_ray.scorers import scorer, scorer_file


class EvalError(ValueError):
    pass


def check_eval(cfg: Config) -> None:
    """What the evaluation reads, checked before the first stage of a run rather than after its training:
    the suite files and their benchmark names, the scorers' modules, lm-eval's task folders. A `bootstrap`
    config's benchmarks that its bootstrap writes (in the folder above model.path) are checked when they exist."""
    world = Path(cfg.model.path).parent
    expand_suites([s for s in cfg.eval.suites if not (
        cfg.bootstrap and not Path(s.path).exists() and Path(s.path).absolute().is_relative_to(world.absolute()))])
    for name in {*cfg.eval.indomain_scorers, *(n for s in cfg.eval.suites for n in s.scorers)}:
        scorer(name)
    for group in cfg.eval.lm_eval:
        if group.include_path and not Path(group.include_path).is_dir():
            raise EvalError(f"eval.lm_eval include_path {group.include_path}: no such folder")


# --- prompts and references ---------------------------------------------------------------------

def indomain_rows(rd: RunDir, limit: int | None) -> list[dict]:
    """Held-out task dialogues cut before their last assistant turn: that turn is the reference."""
    table = pq.read_table(rd.local(TASK_HELDOUT), filesystem=rd.fs, columns=["messages"])
    rows = []
    for messages in table.column("messages").to_pylist()[:limit]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        rows.append({"messages": messages[:last], "reference": messages[last]["content"]})
    return rows


def expand_suites(suites: list[EvalSuite]) -> list[EvalSuite]:
    """A suite whose path is a folder is one benchmark per JSONL file in it, named by the file."""
    out = []
    for suite in suites:
        if Path(suite.path).is_dir():
            files = sorted(Path(suite.path).glob("*.jsonl"))
            if not files:
                raise EvalError(f"eval suite {suite.name!r}: no .jsonl files in {suite.path}")
            out += [suite.model_copy(update={"name": f.stem, "path": str(f)}) for f in files]
        elif not Path(suite.path).is_file():
            raise EvalError(f"eval suite {suite.name!r}: no file or folder at {suite.path}")
        else:
            out.append(suite)
    names = [s.name for s in out]
    for suite in out:  # a folder's files name benchmarks too: none may take another's name or in-domain's
        try:
            check_benchmark_name(suite.name, f"eval suite {suite.path}: benchmark")
        except ValueError as e:
            raise EvalError(str(e)) from None
        if names.count(suite.name) > 1:
            raise EvalError(f"eval suites: benchmark {suite.name!r} comes from two files "
                            f"({', '.join(s.path for s in out if s.name == suite.name)}): each needs a name of its own")
    return out


def suite_rows(suite: EvalSuite) -> list[dict]:
    """Rows of a suite file, checked before any request is sent."""
    rows = []
    with open(suite.path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{suite.path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{where}: not valid JSON ({e.msg})") from None
            messages = row.get("messages")
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)):
                raise EvalError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
            if not isinstance(row.get("reference"), str):
                raise EvalError(f"{where}: field 'reference' must be a string")
            if "follows" in suite.scorers:
                try:
                    instructions.validate(row.get("instructions"), where)
                except ValueError as e:
                    raise EvalError(str(e)) from None
            rows.append(row)
            if suite.limit and len(rows) >= suite.limit:
                break
    if not rows:
        raise EvalError(f"{suite.path}: no rows")
    return rows


# --- requests -----------------------------------------------------------------------------------

def client(url: str, key: str | None):
    import openai

    return openai.OpenAI(base_url=url, api_key=key or "unused", max_retries=0, timeout=300)  # retries: `ask`


# Back-off between tries of a request the endpoint could not answer (5xx, 429, a dropped connection):
# about two minutes in all, long enough for a Serve replica to restart.
RETRY_WAITS = (1, 2, 4, 8, 15, 30, 30, 30)


def ask(api, model_id: str, row: dict, max_tokens: int, where: str) -> str:
    """The greedy reply to one row; transient failures retried with `RETRY_WAITS`, a refused request
    (a prompt over the context length, say) an `EvalError` naming the benchmark and row."""
    import openai

    for wait in (*RETRY_WAITS, None):
        try:
            out = api.chat.completions.create(model=model_id, messages=row["messages"], max_tokens=max_tokens,
                                              temperature=0.0)
            return out.choices[0].message.content or ""
        except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as e:
            if wait is None:
                raise EvalError(f"{model_id}: {where}: the endpoint failed {len(RETRY_WAITS) + 1} times: {e}") from e
            time.sleep(wait)
        except openai.APIStatusError as e:  # 4xx: retrying would not help
            raise EvalError(f"{model_id}: {where}: the endpoint refused the request ({e.status_code}: "
                            f"{getattr(e, 'message', e)})") from e
    raise AssertionError("unreachable")


def replies(api, model_id: str, rows: list[dict], max_tokens: int, concurrency: int, benchmark: str) -> list[str]:
    """Greedy replies to every row's messages, `concurrency` requests in flight."""
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda ir: ask(api, model_id, ir[1], max_tokens, f"{benchmark} row {ir[0]}"),
                             enumerate(rows)))


def score_rows(api, model_id: str, rows: list[dict], scorer_names: list[str], cfg: Config,
               samples_path: Path | None, benchmark: str) -> dict[str, float]:
    preds = replies(api, model_id, rows, cfg.eval.max_tokens, cfg.eval_concurrency, benchmark)
    scores = {name: [scorer(name)(p, r) for p, r in zip(preds, rows)] for name in scorer_names}
    if samples_path:
        samples_path.parent.mkdir(parents=True, exist_ok=True)
        with samples_path.open("w") as f:
            for i, (p, r) in enumerate(zip(preds, rows)):
                f.write(json.dumps({**r, "prediction": p, **{n: s[i] for n, s in scores.items()}}) + "\n")
    return {name: sum(s) / len(s) for name, s in scores.items()}


_LM_EVAL = threading.Lock()  # lm-eval sets global seeds and task state: one `simple_evaluate` at a time


def lm_eval_model_args(group: LmEvalGroup, url: str, model_id: str, cfg: Config) -> dict:
    """`local-completions` / `local-chat-completions` arguments. Log-likelihood requests go as token ids,
    tokenized here with BOS exactly when the model's tokenizer adds one (as the model was trained): sent as
    text, the server would add a BOS lm-eval did not count and every continuation would be off by one
    token. Chat requests go as messages; the server's chat template places the BOS. No API key: lm-eval logs
    these arguments and returns them in its results (`key_for_lm_eval` passes it)."""
    chat = group.mode == "chat"
    bos = adds_bos(model_tokenizer(cfg.model))
    # chat: one conversation a request; completions: `batch` prompts a request, fewer hops per sequence
    batch = 1 if chat else min(8, cfg.eval_concurrency)
    args = {
        "model": model_id, "base_url": f"{url}/{'chat/completions' if chat else 'completions'}",
        # lm-eval counts context tokens itself: the local tokenizer keeps it off any hub.
        "tokenizer": cfg.model.path, "tokenizer_backend": "huggingface", "tokenized_requests": not chat,
        "add_bos_token": bos and not chat, "max_length": cfg.serve.engine.max_model_len,
        "batch_size": batch, "num_concurrent": max(1, cfg.eval_concurrency // batch), "max_retries": 3,
        "max_gen_toks": cfg.eval.max_tokens, "trust_remote_code": cfg.model.trust_remote_code,
    }
    return args


def run_lm_eval(group: LmEvalGroup, url: str, model_id: str, cfg: Config, key: str | None,
                out: Path | None = None) -> dict[str, float]:
    """One lm-eval group against the endpoint; returns `task/metric,filter` -> value. With `out`, lm-eval's
    own results (with stderr, task configs, versions) go to `out/<tasks>.json` and its samples beside it."""
    import lm_eval

    chat = group.mode == "chat"
    with _LM_EVAL, key_for_lm_eval(key):
        result = lm_eval.simple_evaluate(
            model="local-chat-completions" if chat else "local-completions",
            model_args=lm_eval_model_args(group, url, model_id, cfg), tasks=group.tasks,
            num_fewshot=group.num_fewshot, limit=group.limit, gen_kwargs=group.gen_kwargs,
            apply_chat_template=chat if group.apply_chat_template is None else group.apply_chat_template,
            system_instruction=group.system_instruction,
            task_manager=task_manager(group), log_samples=out is not None,
            bootstrap_iters=1000)  # means get their analytic stderr; bootstrap only for the rest (BLEU...)
    if out:
        save_lm_eval(result, out, "+".join(group.tasks), key)
    return lm_eval_metrics(result["results"])


def task_manager(group: LmEvalGroup):
    """lm-eval's index of the group's tasks. Indexing lm-eval's own ~14,000 task files takes ~15 s on 2
    cores, which every group of every model paid again: a group whose tasks all lie in its `include_path`
    is indexed from that folder alone, and each index is built once per process and content of the folder
    (the index holds the task files as parsed: an edited file is indexed again, as the eval's hash sees it)."""
    content = fingerprint(group.include_path) if group.include_path else None
    if group.include_path:
        local = _task_index(group.include_path, content, defaults=False)
        if all_indexed(local, group.tasks):
            return local
    return _task_index(group.include_path, content, defaults=True)


def all_indexed(index, names) -> bool:
    """Whether every task the names reach is in lm-eval's `index`: a local group may list built-in tasks."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        entry = index.task_index.get(name)
        if entry is None:
            return False
        if entry.kind.name == "GROUP":  # its members, by name (a dict member is a task defined inline)
            todo += [m for m in entry.cfg.get("task", []) if isinstance(m, str)]
    return True


@functools.cache
def _task_index(include_path: str | None, content: str | None, defaults: bool):  # `content`: the cache's key only
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


@contextmanager
def key_for_lm_eval(key: str | None):
    """The API key where lm-eval's local-completions models read it, `OPENAI_API_KEY`, for one evaluation
    (under `_LM_EVAL`): as a `header` model argument it would be logged and kept in lm-eval's results. With
    no key the variable is unset meanwhile: a user's own OpenAI key is never sent to the endpoint."""
    before = os.environ.pop("OPENAI_API_KEY", None)
    if key:
        os.environ["OPENAI_API_KEY"] = key
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = before


def save_lm_eval(result: dict, out: Path, name: str, key: str | None) -> None:
    """lm-eval's results as `out/<name>.json` and its samples beside it, with the API key scrubbed wherever it
    may be (lm-eval keeps its `model_args` and each request): a run dir, in a bucket above all, is shared."""
    out.mkdir(parents=True, exist_ok=True)
    for task, samples in (result.pop("samples", None) or {}).items():
        lines = "".join(json.dumps(s, default=str) + "\n" for s in samples)
        (out / f"{name}.samples.{task}.jsonl").write_text(scrub(lines, key))
    (out / f"{name}.json").write_text(scrub(json.dumps(result, indent=2, default=str), key))


REDACTED = "<redacted>"


def scrub(text: str, secret: str | None) -> str:
    """`text` with every occurrence of `secret` replaced, as written (and as JSON escapes it)."""
    if not secret:
        return text
    for form in {secret, json.dumps(secret)[1:-1]}:
        text = text.replace(form, REDACTED)
    return text


def lm_eval_metrics(results: dict) -> dict[str, float]:
    """`task/metric,filter` -> value from lm-eval's results: each metric under its full name, so GSM8K's
    `exact_match,strict-match` and `exact_match,flexible-extract` stay two figures."""
    return {f"{task}/{name}": float(value) for task, values in results.items() for name, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and "_stderr" not in name}


# --- one model, all benchmarks ------------------------------------------------------------------

def general_scores(api, url: str, model_id: str, cfg: Config, key: str | None, samples: Path | None,
                   lm_out: Path | None) -> dict:
    """benchmark -> metric -> value over every suite and lm-eval group; with `samples` (a folder), every reply
    goes there, and with `lm_out`, lm-eval's own files."""
    out: dict[str, dict[str, float]] = {}
    for suite in expand_suites(cfg.eval.suites):
        out[suite.name] = score_rows(api, model_id, suite_rows(suite), suite.scorers, cfg,
                                     samples / f"{suite.name}.jsonl" if samples else None, suite.name)
    for group in cfg.eval.lm_eval:
        for name, value in run_lm_eval(group, url, model_id, cfg, key, lm_out).items():
            task, metric = name.split("/", 1)
            out.setdefault(task, {})[metric] = value
    return out


def base_cache_key(cfg: Config) -> str:
    """What the base model's general scores depend on; every file they read by its `fingerprint` (a model
    rebuilt at the same path, an edited task YAML or scorer module: scored afresh)."""
    keyed = {"model": cfg.model.model_dump(mode="json", exclude_none=True), "weights": fingerprint(cfg.model.path),
             **({"chat_template": fingerprint(t)} if (t := cfg.model.chat_template) else {}),
             "suites": [s.model_dump(mode="json") for s in cfg.eval.suites],
             "lm_eval": [g.model_dump(mode="json") for g in cfg.eval.lm_eval], "files": eval_files(cfg),
             "max_tokens": cfg.eval.max_tokens, **score_settings(cfg)}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def score_settings(cfg: Config) -> dict:
    """Settings outside `eval` that change a score: lm-eval's context length is the serving engine's."""
    return {"max_model_len": cfg.serve.engine.max_model_len} if cfg.eval.lm_eval else {}


def eval_files(cfg: Config) -> dict[str, str | None]:
    """The `fingerprint` of every local file a score reads besides the run dir and the model: the suites,
    lm-eval's task folders, the modules of `module:function` scorers."""
    files = {f"eval.suites.{s.name}": fingerprint(s.path) for s in cfg.eval.suites}
    files |= {f"eval.lm_eval.{i}.include_path": fingerprint(g.include_path)
              for i, g in enumerate(cfg.eval.lm_eval) if g.include_path}
    names = {*cfg.eval.indomain_scorers, *(n for s in cfg.eval.suites for n in s.scorers)}
    return files | {f"scorer {n}": fingerprint(path) for n in sorted(names) if (path := scorer_file(n))}


def base_cache(cfg: Config) -> tuple[str, str]:
    """Where the base model's general scores are cached: `eval.base_cache`, else `BASE_CACHE` beside
    the run dir, local or in the bucket alike (a grid on s3:// scores its base model once too)."""
    if cfg.eval.base_cache:
        root = cfg.eval.base_cache
    elif is_uri(cfg.run_dir):
        scheme, rest = cfg.run_dir.rstrip("/").split("://", 1)
        root = f"{scheme}://{rest.rsplit('/', 1)[0]}/{BASE_CACHE}"
    else:
        root = str(Path(cfg.run_dir).absolute().parent / BASE_CACHE)
    return root, f"{base_cache_key(cfg)}.json"


def saved_scores(rd: RunDir, model_id: str, stage_hash: str) -> dict | None:
    """A model's scores saved by this evaluation (`stage_hash`, not empty) before it stopped, if any."""
    saved = f"{SCORED}/{model_id}.json"
    if stage_hash and rd.exists(saved) and (done := rd.read_json(saved)).get("stage_hash") == stage_hash:
        return done["scores"]
    return None


def evaluate_models(cfg: Config, rd: RunDir, url: str, models: dict[str, str], key: str | None = None,
                    out: Path | None = None, stage_hash: str = "") -> dict:
    """Scores of each model (model id -> the id requests name it by, `Models.api_ids`): in-domain (held-out
    task split) and general benchmarks; with `out` (the run dir, or a local folder standing in for it), every
    reply goes to `out/SAMPLES/<model id>/<benchmark>.jsonl` and lm-eval's own files to `out/LM_EVAL/<model id>/`.

    The models are scored at once, each with `eval_concurrency` requests in flight (its engines'
    `max_num_seqs` x replicas), so no engine idles while another model is scored.
    Each model's scores are saved as soon as it is done (`SCORED/<id>.json`, with `stage_hash`):
    a run stopped by a failure keeps them, and its re-run under the same (non-empty) hash scores only
    the rest. The base model (`serve.base_model_id`) takes its general scores from the cache when it can."""
    api = client(url, key)
    rows = indomain_rows(rd, cfg.eval.indomain_limit)

    def one(model_id: str) -> dict:
        if (done := saved_scores(rd, model_id, stage_hash)) is not None:
            print(f"[eval] {model_id}: scored earlier in this evaluation, kept")
            return done
        started = time.time()
        replies = Path(out, SAMPLES, model_id) if out else None
        indomain = score_rows(api, models[model_id], rows, cfg.eval.indomain_scorers, cfg,
                              replies / "in-domain.jsonl" if replies else None, INDOMAIN)
        cache, name = None, ""  # only the base model's general scores are cached
        if model_id == cfg.serve.base_model_id:
            root, name = base_cache(cfg)
            cache = RunDir(root)
        if cache and cache.exists(name):
            general = cache.read_json(name)
            print(f"[eval] {model_id}: general scores from the cache {cache.path(name)}")
        else:
            general = general_scores(api, url, models[model_id], cfg, key, replies,
                                     Path(out, LM_EVAL, model_id) if out else None)
            if cache:
                cache.write_json(general, name)
        scores = {INDOMAIN: indomain, **general}
        rd.write_json({"stage_hash": stage_hash, "scores": scores}, f"{SCORED}/{model_id}.json")
        print(f"[eval] {model_id} scored in {time.time() - started:.0f} s")
        return scores

    with ThreadPoolExecutor(len(models)) as pool:
        # every model's futures first: one model's failure does not cancel what the others finish and save
        futures = {model_id: pool.submit(one, model_id) for model_id in models}
        return {model_id: future.result() for model_id, future in futures.items()}
