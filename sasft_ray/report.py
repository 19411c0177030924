"""The forgetting report: per benchmark base / fine-tuned / delta, in-domain gain, and across runs,
which method wins each scenario.

`results.json` (written by `sasft eval`) holds every model's scores; here each fine-tuned
model becomes one *entry* (base model, task, method, seed). One run's report compares its
models with the base model; `sasft report RUN...` pools the entries of many runs, averages
seeds, and counts per scenario (base model x task x benchmark) the method with the best
score, as the paper's "best in 40 of 50" does.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

import yaml

from sasft_ray.card import source_mix
from sasft_ray.config import INDOMAIN_SHARE, NOT_IN_WEIGHTS, defaults, flatten
from sasft_ray.evaluate import INDOMAIN, EvalError
from sasft_ray.layout import CONFIG, REPORT, REPORT_PLOT, RESULTS, SAMPLES
from sasft_ray.rundir import RunDir

GENERAL = "general (mean)"


def is_general(benchmark: str) -> bool:
    """A mean over the general benchmarks, not a scenario of its own."""
    return benchmark.startswith("general (")


def primary(scores: dict[str, float]) -> float:
    """A benchmark's headline metric: the first scorer listed (or lm-eval's first metric)."""
    return next(iter(scores.values()))


def entries(results: dict) -> list[dict]:
    """One entry per fine-tuned model, with its headline scores and the base model's."""
    base = results["models"][results["base_model_id"]]
    benchmarks = [b for b in base if b != INDOMAIN]
    out = []
    for model_id, info in results["finetuned"].items():
        scores = results["models"][model_id]
        row = {"model_id": model_id, **info, "base_model": results["base_model"], "task": results["task"],
               "scores": {b: primary(scores[b]) for b in [INDOMAIN, *benchmarks]},
               "base": {b: primary(base[b]) for b in [INDOMAIN, *benchmarks]}}
        if benchmarks:
            row["scores"][GENERAL] = statistics.fmean(row["scores"][b] for b in benchmarks)
            row["base"][GENERAL] = statistics.fmean(row["base"][b] for b in benchmarks)
            row["forgetting"] = row["base"][GENERAL] - row["scores"][GENERAL]
            row["retention"] = row["scores"][GENERAL] / row["base"][GENERAL] if row["base"][GENERAL] else None
            # A further metric every general benchmark has (the lab's lenient `contains`): its mean too
            for metric in [m for m in list(base[benchmarks[0]])[1:] if all(m in base[b] for b in benchmarks)]:
                row["scores"][f"general ({metric})"] = statistics.fmean(scores[b][metric] for b in benchmarks)
                row["base"][f"general ({metric})"] = statistics.fmean(base[b][metric] for b in benchmarks)
        row["indomain_gain"] = row["scores"][INDOMAIN] - row["base"][INDOMAIN]
        out.append(row)
    return out


def _fmt(x: float | None, signed: bool = False) -> str:
    return "n/a" if x is None else f"{x:+.3f}" if signed else f"{x:.3f}"


def run_report(results: dict) -> str:
    """Markdown for one run: a table per fine-tuned model against the base model."""
    lines = [f"# Forgetting report: {results['run_dir']}", "",
             f"Base model `{results['base_model']}`, task `{results['task']}`.", ""]
    for e in entries(results):
        lines += [f"## {e['model_id']} (method {e['method']}, seed {e['seed']})", "",
                  "| benchmark | base | fine-tuned | Δ |", "|---|---|---|---|"]
        lines += [f"| {b} | {_fmt(e['base'][b])} | {_fmt(s)} | {_fmt(s - e['base'][b], True)} |"
                  for b, s in e["scores"].items()]
        lines += ["", f"- in-domain gain: {_fmt(e['indomain_gain'], True)}"]
        if e.get("sources"):
            lines.append(f"- trained on: {source_mix(e['sources'])}")
        if "forgetting" in e:
            lines.append(f"- forgetting (mean drop over general benchmarks): {_fmt(e['forgetting'], True)}; "
                         f"general accuracy kept: {_fmt(e['retention'])}")
        if (curve := [c for c in e.get("curve") or [] if c.get("selftalk_heldout_loss") is not None]):
            first, last = curve[0], curve[-1]
            lines.append(f"- forgetting monitor (loss on held-out self-dialogues, never trained on): "
                         f"{first['selftalk_heldout_loss']:.3f} at step {first['step']} -> "
                         f"{last['selftalk_heldout_loss']:.3f} at step {last['step']}; task held-out loss "
                         f"{_fmt(first['heldout_loss'])} -> {_fmt(last['heldout_loss'])}")
        if (chosen := e.get("selected")):
            lines.append(f"- exported checkpoint: step {chosen['step']} (train.select {chosen['rule']}: "
                         f"{chosen['why']}; task held-out loss {_fmt(chosen['task_loss'])}, self-talk held-out "
                         f"loss {_fmt(chosen['selftalk_loss'])})")
        if e.get("drift"):
            lines.append(f"- weight drift ‖θ−θ₀‖/‖θ₀‖: total {_fmt(e['drift']['total'])}" if "total" in e["drift"]
                         else f"- weight drift: not measured ({e['drift'].get('unavailable')})")
        lines.append("")
    lines += [*decision_lines(entries(results), run_share(results))[1:], "",
              f"Per-metric scores: `{RESULTS}`; every reply: `{SAMPLES}/`.", ""]
    return "\n".join(lines)


def plot(results: dict, path: str, share: float = INDOMAIN_SHARE) -> None:
    """Bars per benchmark: the base model and each fine-tuned model; beside them, when training measured
    it, the forgetting curve: task and self-talk held-out losses over steps, one colour per model, a star
    at the checkpoint exported when train.select chose one other than the last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    es = entries(results)
    benchmarks = list(es[0]["scores"]) if es else []
    series = [("base", [es[0]["base"][b] for b in benchmarks])] + [
        (f"{e['model_id']} ({e['method']})", [e["scores"][b] for b in benchmarks]) for e in es]
    curves = [e for e in es if any(c.get("selftalk_heldout_loss") is not None for c in e.get("curve") or [])]
    traded = next(iter(scenarios(es).values()), None)  # two or more fine-tunes scored on general benchmarks
    width = 0.8 / len(series)
    bars_width, panels = max(6, 1.2 * len(benchmarks)), 1 + bool(curves) + bool(traded)
    legend_rows = math.ceil(max(len(series), 2 * len(curves)) / LEGEND_COLUMNS) if len(series) > LEGEND_INSIDE else 0
    fig, axes = plt.subplots(1, panels, figsize=(bars_width + 5 * (panels - 1), 3.5 + 0.2 * legend_rows),
                             squeeze=False,
                             gridspec_kw={"width_ratios": [bars_width] + [5] * (panels - 1)})
    ax = axes[0][0]
    for i, (label, values) in enumerate(series):
        ax.bar([x + i * width for x in range(len(benchmarks))], values, width, label=label,
               color=colour(i, len(series)))
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(benchmarks))], benchmarks,
                  rotation=30, ha="right")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.05)
    legend(ax, len(series))
    if curves:
        ax = axes[0][1]
        for i, e in enumerate(curves):
            steps = [c["step"] for c in e["curve"]]
            shade = colour(i + 1, len(series))  # the model's colour among the bars (0 is the base model's)
            ax.plot(steps, [c["heldout_loss"] for c in e["curve"]], color=shade, marker=".",
                    label=f"{e['model_id']}: task")
            ax.plot(steps, [c.get("selftalk_heldout_loss") for c in e["curve"]], color=shade, marker=".",
                    linestyle="--", label=f"{e['model_id']}: self-talk")
            if (chosen := e.get("selected")) and chosen["rule"] != "last" and chosen["task_loss"] is not None:
                ax.plot([chosen["step"]], [chosen["task_loss"]], color=shade, marker="*", markersize=12,
                        linestyle="none", label=f"{e['model_id']}: exported ({chosen['rule']})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out loss")
        ax.set_title("forgetting monitor", fontsize=9)
        legend(ax, len(series))
    if traded:
        plot_tradeoff(axes[0][-1], traded, share)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


LEGEND_INSIDE, LEGEND_COLUMNS = 6, 3


def colour(i: int, models: int):
    """The i-th model's colour: matplotlib's ten, or twenty paler and darker ones for more models."""
    import matplotlib

    return f"C{i}" if models <= 10 else matplotlib.colormaps["tab20"].colors[i % 20]


def legend(ax, models: int) -> None:
    """The legend inside the panel for a few models; below it, in columns, for many (the lab grid's 15)."""
    if models <= LEGEND_INSIDE:
        ax.legend(fontsize=7)
    else:
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=LEGEND_COLUMNS)


def write_run_report(results: dict, folder: str) -> None:
    Path(folder, REPORT).write_text(run_report(results) + f"\n![scores]({REPORT_PLOT})\n")
    plot(results, str(Path(folder, REPORT_PLOT)), run_share(results))


def run_share(results: dict) -> float:
    """The decision's rule a run's config names (`eval.indomain_share`)."""
    return results.get("config", {}).get("eval", {}).get("indomain_share", INDOMAIN_SHARE)


# --- many runs ----------------------------------------------------------------------------------

def load_entries(run_dirs: list[str]) -> list[dict]:
    """The entries of every run (local folders or s3:// / gs:// URIs), each labelled with its variant: the
    settings its scores were made with. Results that are not the run dir's current evaluation (a stage
    redone since, config.yaml changed by a later command) are left out, with the reason; one evaluation
    found twice (a copied run dir) is counted once."""
    results, configs, seen = [], [], {}
    for run_dir in run_dirs:
        rd = RunDir(run_dir)
        result, config = _read_results(rd)
        why = stale(rd, result, config)
        if why:
            print(f"[report] {run_dir} left out: {why}; run `sasft eval` there again", file=sys.stderr)
            continue
        eval_id = rd.stage_info("eval").get("id")
        if eval_id in seen:
            print(f"[report] {run_dir} left out: the same evaluation as {seen[eval_id]} (a copy)", file=sys.stderr)
            continue
        seen[eval_id] = run_dir
        results.append(result)
        configs.append(config)
    if not results:
        raise EvalError(f"no current results to report in {', '.join(run_dirs)}")
    return [{**e, "variant": variant} for result, variant in zip(results, variants(configs))
            for e in entries(result)]


def _read_results(rd: RunDir) -> tuple[dict, dict]:
    """A run's results and the config they were made with (results made before they held it: `CONFIG`)."""
    where = rd.path(RESULTS)
    if not rd.exists(RESULTS):
        raise EvalError(f"{rd.root}: no {RESULTS}; run `sasft eval` (or `sasft run`) first")
    try:
        result = rd.read_json(RESULTS)
        config = result.get("config") or (yaml.safe_load(rd.read_text(CONFIG)) if rd.exists(CONFIG) else {})
    except yaml.YAMLError as e:  # (results that are not JSON: RunDirError, naming the file)
        raise EvalError(f"{rd.path(CONFIG)}: not readable YAML ({e})") from None
    if not isinstance(result, dict) or not {"models", "finetuned", "base_model_id"} <= set(result):
        raise EvalError(f"{where}: not the results of `sasft eval`")
    return result, config


def stale(rd: RunDir, result: dict, config: dict) -> str | None:
    """Why a run's results are not those of its current evaluation under `config`, or None: the manifest's
    finished evaluation must have the hash `config` gives now (the same settings, the same trainings)."""
    from sasft_ray.config import ConfigError, validate_config
    from sasft_ray.pipeline import eval_hash

    record = rd.stage_info("eval")
    if record.get("status") != "done":
        return "its evaluation is not finished (redone or interrupted since)"
    if result.get("eval_id", record["id"]) != record["id"]:
        return f"{RESULTS} is not from the evaluation the manifest records"
    try:
        cfg = validate_config({**config, "run_dir": rd.root}, source=rd.path(CONFIG))
    except ConfigError as e:
        return f"its config no longer loads ({str(e).splitlines()[-1].strip()})"
    if eval_hash(cfg, rd) != record.get("config_hash"):
        return ("its scores were made under other settings or from models trained since "
                f"({CONFIG} or a stage changed after the evaluation)")
    return None


# Settings that have columns of their own, or are spread over (seeds), or do not change the weights, rather
# than told apart.
NOT_A_VARIANT = {"run_dir", "model.path", "data.path", "train.method", "compare",
                 *(f"train.{key}" for key in NOT_IN_WEIGHTS)}


def variants(configs: list[dict]) -> list[str]:
    """Per run, the settings in which the runs differ: a study's λ, say ("mix.self_ratio=0.5"). A setting a run's
    config lacks (written before the setting existed) counts at its default."""
    unset = defaults()
    flat = [flatten(c) for c in configs]
    keys = {k for f in flat for k in f}
    flat = [{k: f.get(k, unset.get(k)) for k in keys} for f in flat]
    varying = [k for k in sorted(keys) if k not in NOT_A_VARIANT and not k.endswith(".seed")
               and len({json.dumps(f[k], sort_keys=True) for f in flat}) > 1]
    return [", ".join(f"{k}={f[k]}" for k in varying) for f in flat]


def mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def compare(found: list[dict], share: float = INDOMAIN_SHARE) -> str:
    """Markdown: mean ± spread over seeds per (base model, task, method and variant), with the weight drift
    and the forgetting monitor's loss at the exported checkpoint; winners per scenario; and how well the
    monitor ranks the runs."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for e in found:
        method = f"{e['method']} ({e['variant']})" if e.get("variant") else e["method"]
        groups[(e["base_model"], e["task"], method)].append(e)
    benchmarks = list(dict.fromkeys(b for e in found for b in e["scores"]))
    lines = ["| base model | task | method | seeds | " + " | ".join(benchmarks) + " | drift | self-talk loss |",
             "|---" * (6 + len(benchmarks)) + "|"]
    means: dict[tuple, dict[str, float]] = {}
    for (model, task, method), es in sorted(groups.items()):
        cells = []
        for b in benchmarks:
            values = [e["scores"][b] for e in es if b in e["scores"]]
            cells.append(mean_spread(values) if values else "")
            if values:
                means.setdefault((model, task, b), {})[method] = statistics.fmean(values)
        drift = [e["drift"]["total"] for e in es if "total" in (e.get("drift") or {})]
        monitor = [x for e in es if (x := exported_monitor_loss(e)) is not None]
        lines.append(f"| {Path(model).name} | {Path(task).name} | {method} | {len(es)} | " + " | ".join(cells)
                     + f" | {mean_spread(drift) if drift else ''} | {mean_spread(monitor) if monitor else ''} |")
    base_cells = {b: statistics.fmean(e["base"][b] for e in found if b in e["base"]) for b in benchmarks}
    lines.append("| base | | | | " + " | ".join(f"{base_cells[b]:.3f}" for b in benchmarks) + " | | |")
    lines += ["", *winner_lines(means), *decision_lines(found, share), *monitor_lines(found)]
    return "\n".join(lines)


def exported_monitor_loss(entry: dict) -> float | None:
    """The self-talk held-out loss of the checkpoint a run exported: train.select's choice, else its last."""
    if (chosen := entry.get("selected")) and chosen.get("selftalk_loss") is not None:
        return chosen["selftalk_loss"]
    losses = [c["selftalk_heldout_loss"] for c in entry.get("curve") or []]
    return next((x for x in reversed(losses) if x is not None), None)


def monitor_check(found: list[dict]) -> dict[str, dict]:
    """Whether the forgetting monitor ranks runs as the general benchmarks do: per task (and over all of
    them, "all"), Spearman's ρ between the exported checkpoint's self-talk held-out loss and each general
    mean (strict, and lenient where measured), over methods and seeds, with the number of runs. A monitor
    that works reads near -1 (the more its loss, the less was kept); a task with under three runs is left
    out, and ρ is nan where the scores are all equal."""
    from scipy.stats import spearmanr

    runs: dict[str, list[dict]] = defaultdict(list)
    for e in found:
        if (loss := exported_monitor_loss(e)) is not None and GENERAL in e["scores"]:
            runs[Path(e["task"]).stem].append({"loss": loss, **{b: x for b, x in e["scores"].items() if is_general(b)}})
    if len(runs) > 1:
        runs["all"] = [r for task in list(runs) for r in runs[task]]
    check = {}
    for task, rs in runs.items():
        if len(rs) < 3:
            continue
        losses, metrics = [r["loss"] for r in rs], [b for b in rs[0] if b != "loss" and all(b in r for r in rs)]
        check[task] = {"runs": len(rs), **{b: float(spearmanr(losses, [r[b] for r in rs]).statistic) for b in metrics}}
    return check


def monitor_lines(found: list[dict]) -> list[str]:
    check = monitor_check(found)
    if not check:
        return []
    metrics = [m for m in next(iter(check.values())) if m != "runs"]
    return ["", "The forgetting monitor against the benchmarks: Spearman's ρ between each run's self-talk held-out "
            "loss at its exported checkpoint and its general accuracy (near -1: the monitor ranks the runs as "
            "the benchmarks do; n/a: the scores are all equal).", "",
            "| task | runs | " + " | ".join(f"ρ, {m}" for m in metrics) + " |", "|---" * (2 + len(metrics)) + "|",
            *[f"| {task} | {c['runs']} | " + " | ".join(_rho(c.get(m)) for m in metrics) + " |"
              for task, c in check.items()]]


def _rho(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:+.2f}"


def winners(means: dict[tuple, dict[str, float]]) -> Counter:
    """Per scenario with two or more methods, the method with the best mean score (ties: all of them)."""
    wins: Counter = Counter()
    for (_model, _task, benchmark), by_method in means.items():
        if is_general(benchmark) or len(by_method) < 2:
            continue
        best = max(by_method.values())
        wins.update(m for m, v in by_method.items() if v == best)
    return wins


def winner_lines(means: dict[tuple, dict[str, float]]) -> list[str]:
    scenarios = sum(1 for (_, _, b), by in means.items() if not is_general(b) and len(by) >= 2)
    if not scenarios:
        return ["(one method per scenario: no winners to count)"]
    wins = winners(means)
    return [f"Wins over {scenarios} scenarios (base model × task × benchmark, in-domain included): "
            + ", ".join(f"{m} {n}" for m, n in wins.most_common())]


# --- the decision -------------------------------------------------------------------------------



def decide(points: dict[str, tuple[float, float]], share: float = INDOMAIN_SHARE) -> tuple[set[str], str | None]:
    """`points`: method -> (in-domain score, general accuracy kept). The Pareto front (no other method is as
    good on both and better on one) and the winner: the most general accuracy kept among the methods whose
    in-domain score is at least `share` × the best one's (ties: the better in-domain score)."""
    front = {m for m, (x, k) in points.items()
             if not any(x2 >= x and k2 >= k and (x2, k2) != (x, k) for x2, k2 in points.values())}
    if not points:
        return front, None
    best = max(x for x, _ in points.values())
    able = {m: (k, x) for m, (x, k) in points.items() if x >= share * best}
    return front, max(able, key=able.get)


def scenarios(found: list[dict]) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """(base model, task) -> method (with its variant) -> its entries (seeds), for the scenarios where two or
    more methods were measured on general benchmarks."""
    by: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for e in found:
        if e.get("retention") is not None:
            method = f"{e['method']} ({e['variant']})" if e.get("variant") else e["method"]
            by[(e["base_model"], e["task"])][method].append(e)
    return {key: dict(methods) for key, methods in sorted(by.items()) if len(methods) >= 2}


def tradeoff(methods: dict[str, list[dict]]) -> dict[str, tuple[float, float]]:
    """Method -> (mean in-domain score, mean general accuracy kept) over its seeds."""
    return {m: (statistics.fmean(e["scores"][INDOMAIN] for e in es), statistics.fmean(e["retention"] for e in es))
            for m, es in methods.items()}


def decision_lines(found: list[dict], share: float = INDOMAIN_SHARE) -> list[str]:
    """Per scenario (base model × task) with two or more methods: each method's in-domain score and gain and
    the general accuracy it kept (mean ± spread over seeds), whether it is on the Pareto front, the
    forgetting monitor's loss, and the winner by the rule `share`."""
    lines = []
    for (model, task), methods in scenarios(found).items():
        points = tradeoff(methods)
        front, winner = decide(points, share)
        lines += ["", f"Decision for {Path(model).name} on {Path(task).name}: **{winner}**, the most general accuracy "
                  f"kept among the methods within {share:g} × the best in-domain score "
                  f"({max(x for x, _ in points.values()):.3f}); ✓: on the Pareto front of the two.", "",
                  "| method | seeds | in-domain | in-domain gain | general kept | Pareto | self-talk loss |",
                  "|---|---|---|---|---|---|---|"]
        for m, es in sorted(methods.items(), key=lambda item: -points[item[0]][1]):
            monitor = [x for e in es if (x := exported_monitor_loss(e)) is not None]
            cells = [mean_spread(values) for values in ([e["scores"][INDOMAIN] for e in es],
                                                        [e["indomain_gain"] for e in es], [e["retention"] for e in es])]
            lines.append(f"| {m} | {len(es)} | {' | '.join(cells)} | {'✓' if m in front else ''} | "
                         f"{mean_spread(monitor) if monitor else ''} |")
    return lines


def plot_tradeoff(ax, methods: dict[str, list[dict]], share: float = INDOMAIN_SHARE, title: str = "") -> None:
    """The Pareto view of one scenario: each method at (general accuracy kept, in-domain score), its seeds as
    small dots, the front as a line, the winner circled."""
    points = tradeoff(methods)
    front, winner = decide(points, share)
    for i, (m, (x, kept)) in enumerate(points.items()):
        ax.scatter([e["retention"] for e in methods[m]], [e["scores"][INDOMAIN] for e in methods[m]], s=8,
                   color=colour(i, len(points)), alpha=0.4)
        ax.scatter([kept], [x], s=40, color=colour(i, len(points)), label=m,
                   edgecolors="black" if m == winner else "none",
                   linewidths=1.5)
    line = sorted((points[m][1], points[m][0]) for m in front)
    ax.plot([k for k, _ in line], [x for _, x in line], color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("general accuracy kept")
    ax.set_ylabel("in-domain score")
    ax.set_title(title or f"trade-off (winner circled: {winner})", fontsize=9)
    legend(ax, len(points))


def plot_scenarios(found: list[dict], path: str, share: float = INDOMAIN_SHARE) -> int:
    """`sasft report --plot`: one Pareto view per scenario in one figure; returns the scenarios drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = scenarios(found)
    if not drawn:
        return 0
    fig, axes = plt.subplots(1, len(drawn), figsize=(4.5 * len(drawn), 3.8), squeeze=False)
    for ax, ((model, task), methods) in zip(axes[0], drawn.items()):
        plot_tradeoff(ax, methods, share, title=f"{Path(model).name}, {Path(task).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return len(drawn)
