"""`sasft run`: generate -> mix -> train -> export -> serve -> eval -> report, resumable.

Each stage records itself in the run directory's manifest, so a second `sasft run`
skips what is finished. Methods listed in `compare` are trained in
`<run_dir>/compare/<method>/` from the same task data and settings, served beside the
main model, and reported with it: the demo shows what plain SFT forgets next to what
SA-SFT keeps, in one table.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

from sasft_ray.config import Config, validate_config
from sasft_ray.rundir import RunDir, fingerprints
from sasft_ray.serve import Models


def method_runs(cfg: Config) -> dict[str, Config]:
    """Model id -> the config that trains it: the main run and one run per compared method."""
    runs = {cfg.serve.model_id: cfg}
    for method in cfg.compare:
        raw = cfg.model_dump(mode="json")
        raw.update(run_dir=f"{cfg.run_dir}/compare/{method}", compare=[])
        raw["train"]["method"] = method
        raw["selftalk"]["monitor_from"] = cfg.run_dir  # every method measured on the same dialogues
        runs[method] = validate_config(raw, source=f"compare: {method}")
    return runs


def require_trained(cfg: Config) -> dict[str, Config]:
    """`method_runs`, refused unless every fine-tune finished training (and `export.interpolate`) under this
    config."""
    from sasft_ray.interpolate import interpolated
    from sasft_ray.serve import ServeError
    from sasft_ray.train import trained

    runs = method_runs(cfg)
    untrained = [f"{model_id} ({c.run_dir})" for model_id, c in runs.items() if not (trained(c) and interpolated(c))]
    if untrained:
        raise ServeError(f"not trained under this config: {', '.join(untrained)}; run `sasft run` (or "
                         "`sasft generate` and `sasft train`) first")
    return runs


def lora_as_adapters(cfg: Config) -> bool:
    """LoRA fine-tunes served as adapters on the base model's engine: Ray Serve LLM loads them from a bucket."""
    return bool(cfg.train.lora) and cfg.serve.lora == "adapters" and "://" in cfg.run_dir


def served_models(cfg: Config, stage: bool = True) -> Models:
    """What `sasft serve` puts behind the endpoint: the base model, and each trained fine-tune, as its own
    engine or (LoRA, run_dir in a bucket) as an adapter on the base model's engine. `stage` copies the
    adapters into `<run_dir>/serve/adapters/<model id>/`, the one folder Ray Serve LLM reads them from."""
    from sasft_ray.export import ADAPTER_DIR

    runs, base = require_trained(cfg), cfg.serve.base_model_id
    if not lora_as_adapters(cfg):
        if cfg.train.lora and cfg.serve.lora == "adapters" and stage:
            print("[serve] LoRA fine-tunes served merged, an engine each: Ray Serve LLM loads adapters from a "
                  "bucket, and run_dir is local")
        return Models({**{model_id: RunDir(c.run_dir).path("model") for model_id, c in runs.items()},
                       **interpolated_models(runs), base: cfg.model.path})
    rd = RunDir(cfg.run_dir)
    adapters = {model_id: rd.path("serve", "adapters", model_id) for model_id in runs}
    if stage:
        for model_id, c in runs.items():
            pafs.copy_files(RunDir(c.run_dir).path("model", ADAPTER_DIR), adapters[model_id])
    return Models({base: cfg.model.path, **interpolated_models(runs)}, adapters, base)


def interpolated_models(runs: dict[str, Config]) -> dict[str, str]:
    """`export.interpolate`'s models of each fine-tune (`<model id>@<α>` -> folder), each served as an engine."""
    from sasft_ray.interpolate import folder, tagged

    return {tagged(model_id, a): RunDir(c.run_dir).path(*folder(a))
            for model_id, c in runs.items() for a in c.export.interpolate}


def train_all(cfg: Config) -> None:
    from sasft_ray.generate import generate
    from sasft_ray.train import train

    for model_id, run_cfg in method_runs(cfg).items():
        print(f"== {model_id}: method {run_cfg.train.method}, run dir {run_cfg.run_dir}")
        rd = generate(run_cfg)
        train(run_cfg, rd)


def eval_hash(cfg: Config) -> str:
    """What a run's results depend on: the evaluation, everything that trained its models, and the
    trainings themselves (a model retrained since makes the results stale)."""
    from sasft_ray.evaluate import score_settings

    settings = cfg.as_trained().section_hash("eval", "serve.model_id", "serve.base_model_id", "compare", "model",
                                             "data", "selftalk", "filters", "mix", "train", "export")
    if extra := score_settings(cfg):  # only where it counts: runs evaluated before it stay finished
        settings += json.dumps(extra, sort_keys=True)
    ids = ",".join(map(str, trainings(cfg).values()))
    return RunDir(cfg.run_dir, create=False).chained(f"{settings}:{ids}", "task")


def trainings(cfg: Config) -> dict[str, str | None]:
    """Each fine-tune's training, by the id of its last run."""
    return {model_id: RunDir(c.run_dir, create=False).stage_info("train").get("id")
            for model_id, c in method_runs(cfg).items()}


SERVING = "serving.json"  # what a running `sasft serve` put behind its endpoint


def record_serving(cfg: Config, url: str | None) -> None:
    """`sasft serve`'s record of the trainings it serves at `url` (None: it stopped), which `sasft eval --url`
    checks: an endpoint started before a model was retrained serves the old weights."""
    rd = RunDir(cfg.run_dir)
    if url is None:
        rd.remove(SERVING)
    else:
        rd.write_json({"url": url, "trainings": trainings(cfg)}, SERVING)


def check_serving(cfg: Config, url: str) -> None:
    rd = RunDir(cfg.run_dir, create=False)
    served = rd.read_json(SERVING) if rd.exists(SERVING) else {}
    if served.get("url") == url and served.get("trainings") != trainings(cfg):
        from sasft_ray.serve import ServeError

        raise ServeError(f"the endpoint at {url} was started by `sasft serve` before a model was trained again: it "
                         "serves the old weights; restart `sasft serve`, then evaluate")


def eval_inputs(cfg: Config) -> dict[str, str | None]:
    """The local files a run's results come from besides its run dir: the base model, the benchmarks, lm-eval's
    task files, scorer modules."""
    from sasft_ray.evaluate import eval_files

    return {**fingerprints(cfg, "model.path"), **eval_files(cfg)}


def eval_stage(cfg: Config, url: str, key: str | None, force: bool = False) -> dict:
    """Score every served model; writes eval/results.json and the report. Skipped when done."""
    from sasft_ray.card import write_model_card
    from sasft_ray.evaluate import evaluate_models
    from sasft_ray.report import write_run_report
    from sasft_ray.tracking import log_scores

    rd = RunDir(cfg.run_dir)
    stage_hash = eval_hash(cfg)
    runs = require_trained(cfg)  # before `begin` wipes the old results: a refused evaluation deletes nothing
    # eval/models/ is kept: each model's saved scores carry the hash, and only this hash's are reused
    if not rd.begin("eval", stage_hash, force, inputs=eval_inputs(cfg),
                    outputs=("eval/samples", "eval/lm_eval", "eval/results.json", "report.md", "report.png")
                    + (("eval/models",) if force else ())):
        return rd.read_json("eval", "results.json")
    with tempfile.TemporaryDirectory() as scratch:  # a remote run_dir gets the replies and report at the end
        out = scratch if rd.remote else rd.local()
        scores = evaluate_models(cfg, rd, url, served_models(cfg, stage=False).api_ids(), key,
                                 samples=Path(out, "eval", "samples"), stage_hash=stage_hash)
        results = {
            # which evaluation these are, of which config: `sasft report` checks them against the manifest
            "eval_id": rd.stage_info("eval")["id"], "stage_hash": stage_hash, "config": cfg.model_dump(mode="json"),
            "run_dir": cfg.run_dir, "base_model": cfg.model.path, "task": cfg.data.path,
            "base_model_id": cfg.serve.base_model_id, "models": scores,
            "finetuned": {model_id: {"method": c.train.method, "seed": c.train.seed, "run_dir": c.run_dir,
                                     "drift": _drift(RunDir(c.run_dir)), "curve": curve(RunDir(c.run_dir)),
                                     **_selected(RunDir(c.run_dir)), **_sources(RunDir(c.run_dir))}
                          for model_id, c in runs.items()},
        }
        results["finetuned"].update(interpolated_entries(runs))
        for model_id, c in runs.items():  # each fine-tune's scores to its training's tracked run
            log_scores(c, scores[model_id])
        write_run_report(results, out)
        if rd.remote:
            rd.upload(scratch)
    rd.write_json(results, "eval", "results.json")
    for c in runs.values():  # each fine-tune's model card, now with its scores
        write_model_card(c, RunDir(c.run_dir), results)
    rd.finish("eval", {"models": len(scores), "report": rd.path("report.md")})
    return results


def interpolated_entries(runs: dict[str, Config]) -> dict[str, dict]:
    """The report's entries of `export.interpolate`'s models: method `<method>@<α>`, from which fine-tune."""
    from sasft_ray.interpolate import tagged

    return {tagged(model_id, a): {"method": tagged(c.train.method, a), "seed": c.train.seed, "run_dir": c.run_dir,
                                  "interpolated": {"from": model_id, "alpha": a}}
            for model_id, c in runs.items() for a in c.export.interpolate}


def curve(rd: RunDir) -> list[dict]:
    """The forgetting curve of a run, from its train record: at each checkpoint the task's and the
    monitor's held-out losses."""
    info = rd.stage_info("train")
    task, monitor = info.get("heldout_by_step") or {}, info.get("selftalk_heldout_by_step") or {}
    return [{"step": int(step), "heldout_loss": loss, "selftalk_heldout_loss": monitor.get(step)}
            for step, loss in task.items()]


def _selected(rd: RunDir) -> dict:
    """The checkpoint a run exported and why (`train.select`), as its train record names it."""
    selected = rd.stage_info("train").get("selected")
    return {"selected": selected} if selected else {}


def _sources(rd: RunDir) -> dict:
    """The rows and target tokens of each source a run trained on, as its train record counts them."""
    sources = rd.stage_info("train").get("sources")
    return {"sources": sources} if sources else {}


def _drift(rd: RunDir) -> dict | None:
    return rd.read_json("model", "drift.json") if rd.exists("model", "drift.json") else None


def serve_and_eval(cfg: Config, url: str | None = None, force: bool = False) -> dict:
    """Evaluate at `url`, or start the endpoint here, evaluate, and shut it down."""
    from sasft_ray import serve
    from sasft_ray.cluster import connect
    from sasft_ray.evaluate import check_eval

    check_eval(cfg)
    key = serve.api_key(cfg)
    rd = RunDir(cfg.run_dir)
    with rd.locked():
        if url:
            check_serving(cfg, url)
        if url or (not force and rd.stage_info("eval").get("status") == "done"):
            return eval_stage(cfg, url or "", key, force)
        connect(cfg)
        url = serve.start(cfg, served_models(cfg))
        try:
            return eval_stage(cfg, url, key, force)
        finally:
            serve.stop()


def run(cfg: Config) -> dict:
    """The whole pipeline on the embedded local Ray (no resources.address) or on a cluster."""
    from sasft_ray import serve
    from sasft_ray.evaluate import check_eval
    from sasft_ray.report import run_report

    started = time.time()
    check_eval(cfg)  # the evaluation's mistakes found now, not after self-talk and training are paid for
    serve.api_key(cfg)
    with RunDir(cfg.run_dir).locked():
        train_all(cfg)  # the lab a demo config points at is built by its first generate
        results = serve_and_eval(cfg)
    print(run_report(results))
    print(f"[run] finished in {time.time() - started:.0f} s; report: {RunDir(cfg.run_dir).path('report.md')}")
    return results
