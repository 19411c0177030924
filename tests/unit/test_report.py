"""Scorers, suite validation, report aggregation and winner counting (no server needed)."""

import json

import pytest

from sasft_ray.evaluate import INDOMAIN, EvalError, suite_rows
from sasft_ray.report import GENERAL, compare, entries, winners
from sasft_ray.scorers import ScorerError, contains, exact, rouge_l, scorer


def test_scorers():
    row = {"reference": "Sure! The answer is 12.", "answer": "12"}
    assert exact("  Sure! The   answer is 12.\n", row) == 1.0
    assert exact("ANS=12", row) == 0.0
    assert contains("ANS= 12", row) == 1.0 and contains("the answer is 123", row) == 0.0
    assert contains("It is 12.", row) == 1.0
    assert rouge_l("Sure! The answer is 12.", row) == 1.0
    assert rouge_l("banana", row) == 0.0
    # LCS "the answer is" (3 words): precision 3/4, recall 3/5
    assert rouge_l("so the answer is", row) == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    # the standard ROUGE-L: punctuation dropped and words stemmed (a hand-written one read 0.667 here)
    assert rouge_l("The patient has a fever.", {"reference": "the patient has fever"}) == pytest.approx(8 / 9)
    assert rouge_l("The patients had fevers", {"reference": "the patient had fever"}) == 1.0


def test_lm_eval_metrics_keep_every_filter_apart():
    """GSM8K reports one metric under two filters; cut at the comma they would overwrite each other."""
    from sasft_ray.evaluate import lm_eval_metrics

    results = {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.40, "exact_match_stderr,strict-match": 0.02,
                         "exact_match,flexible-extract": 0.75, "exact_match_stderr,flexible-extract": 0.03},
               "mmlu": {"acc,none": 0.5, "acc_stderr,none": 0.01}}
    assert lm_eval_metrics(results) == {"gsm8k/exact_match,strict-match": 0.40,
                                        "gsm8k/exact_match,flexible-extract": 0.75, "mmlu/acc,none": 0.5}
    assert scorer("sasft_ray.scorers:exact") is exact
    with pytest.raises(ScorerError, match="unknown scorer"):
        scorer("bleu")
    with pytest.raises(ScorerError, match="cannot be imported"):
        scorer("sasft_ray.scorers:nothing")


def test_suite_errors_name_file_line_and_field(tmp_path):
    from sasft_ray.config import EvalSuite

    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}], "reference": "a"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(EvalError, match=r"s.jsonl:2: field 'reference'"):
        suite_rows(EvalSuite(name="s", path=str(path)))
    path.write_text("{not json\n")
    with pytest.raises(EvalError, match=r"s.jsonl:1: not valid JSON"):
        suite_rows(EvalSuite(name="s", path=str(path)))


def _results(task, seed, scores_by_method, base):
    models = {"base": {INDOMAIN: {"exact": base[0]}, "math": {"exact": base[1]}, "words": {"exact": base[2]}}}
    finetuned = {}
    for method, (ind, math, words) in scores_by_method.items():
        models[method] = {INDOMAIN: {"exact": ind}, "math": {"exact": math}, "words": {"exact": words}}
        finetuned[method] = {"method": method, "seed": seed, "drift": {"total": 0.1}}
    return {"run_dir": f"r-{task}-{seed}", "base_model": "m", "task": task, "base_model_id": "base",
            "models": models, "finetuned": finetuned}


def test_entries_forgetting_and_gain():
    (e,) = entries(_results("t", 0, {"sft": (0.9, 0.2, 0.4)}, base=(0.1, 0.8, 0.8)))
    assert e["indomain_gain"] == pytest.approx(0.8)
    assert e["scores"][GENERAL] == pytest.approx(0.3) and e["forgetting"] == pytest.approx(0.5)
    assert e["retention"] == pytest.approx(0.3 / 0.8)


def test_compare_averages_seeds_and_counts_winners():
    found = []
    for seed in (0, 1):
        found += entries(_results("t1", seed, {"sft": (0.9, 0.1 + seed * 0.1, 0.2), "sa-sft": (0.9, 0.7, 0.6)},
                                  base=(0.0, 0.8, 0.8)))
    found += entries(_results("t2", 0, {"sft": (1.0, 0.5, 0.9), "sa-sft": (0.8, 0.6, 0.5)}, base=(0.0, 0.8, 0.8)))
    text = compare(found)
    assert "| m | t1 | sft | 2 | 0.900 ± 0.000 | 0.150 ± 0.071 |" in text
    means = {("m", "t1", "math"): {"sft": 0.15, "sa-sft": 0.7}, ("m", "t1", "words"): {"sft": 0.2, "sa-sft": 0.6},
             ("m", "t2", "words"): {"sft": 0.9, "sa-sft": 0.5}, ("m", "t2", INDOMAIN): {"sft": 1.0, "sa-sft": 1.0},
             ("m", "t2", GENERAL): {"sft": 0.0, "sa-sft": 1.0}}
    assert winners(means) == {"sa-sft": 3, "sft": 2}  # a tie counts for both; the general mean is not a scenario
    assert "Wins over 6 scenarios" in text and "sa-sft 4" in text


def test_a_metric_every_general_benchmark_has_gets_its_mean_too():
    results = _results("t", 0, {"sft": (0.9, 0.2, 0.4)}, base=(0.1, 0.8, 0.8))
    for model, (math, words) in {"base": (1.0, 0.6), "sft": (0.5, 0.0)}.items():
        results["models"][model]["math"]["contains"] = math
        results["models"][model]["words"]["contains"] = words
    (e,) = entries(results)
    assert e["scores"]["general (contains)"] == pytest.approx(0.25)
    assert e["base"]["general (contains)"] == pytest.approx(0.8)
    assert e["scores"][GENERAL] == pytest.approx(0.3)  # the headline stays the first metric
    assert "Wins over 3 scenarios" in compare([e, *entries(_results("t", 0, {"sa-sft": (0.9, 0.9, 0.9)},
                                                                   base=(0.1, 0.8, 0.8)))])


def test_runs_that_differ_in_a_setting_are_told_apart_and_their_seeds_pooled(tmp_path):
    from sasft_ray.report import load_entries

    for ratio in (0.5, 2.0):
        for seed in (0, 1):
            run = tmp_path / f"ratio={ratio}_seed={seed}"
            results = _results("t", seed, {"sa-sft": (1.0, ratio / 4, 0.5)}, base=(0.0, 0.6, 0.6))
            _evaluated(run, results, mix={"self_ratio": ratio, "seed": seed}, train={"seed": seed, "lr": 1e-3})
    found = load_entries(sorted(str(run) for run in tmp_path.iterdir()))
    assert [e["variant"] for e in found] == ["mix.self_ratio=0.5"] * 2 + ["mix.self_ratio=2.0"] * 2
    text = compare(found)
    assert "| m | t | sa-sft (mix.self_ratio=2.0) | 2 | 1.000 ± 0.000 | 0.500 ± 0.000 |" in text
    assert "Wins over 3 scenarios" in text and "sa-sft (mix.self_ratio=2.0) 3, sa-sft (mix.self_ratio=0.5) 2" in text
    with pytest.raises(EvalError, match="nowhere: no eval/results.json"):
        load_entries([str(tmp_path / "nowhere")])
    assert not (tmp_path / "nowhere").exists()  # reading a report creates no folder


def _evaluated(run, results: dict, **sections) -> None:
    """`results` saved in `run` as `sasft eval` saves them: of a finished evaluation, with its config."""
    from sasft_ray.config import validate_config
    from sasft_ray.layout import RESULTS
    from sasft_ray.pipeline import eval_hash
    from sasft_ray.rundir import RunDir

    cfg = validate_config({"run_dir": str(run), "model": {"path": "m"}, "data": {"path": "t"}, **sections})
    rd = RunDir(str(run))
    rd.begin("eval", eval_hash(cfg, rd))
    rd.write_json({**results, "eval_id": rd.stage_info("eval")["id"], "config": cfg.model_dump(mode="json")},
                  RESULTS)
    rd.finish("eval", {})


def test_the_report_shows_each_runs_forgetting_curve(tmp_path):
    from matplotlib.image import imread

    from sasft_ray.report import write_run_report

    results = _results("t", 0, {"sft": (0.9, 0.2, 0.4), "sa-sft": (0.9, 0.7, 0.8)}, base=(0.1, 0.8, 0.8))
    results["finetuned"]["sft"]["curve"] = [{"step": 10, "heldout_loss": 1.2, "selftalk_heldout_loss": 0.9},
                                            {"step": 20, "heldout_loss": 0.6, "selftalk_heldout_loss": 1.7}]
    results["finetuned"]["sa-sft"]["curve"] = [{"step": 10, "heldout_loss": 1.3, "selftalk_heldout_loss": 0.8},
                                               {"step": 20, "heldout_loss": 0.7, "selftalk_heldout_loss": 0.8}]
    results["finetuned"]["sa-sft"]["selected"] = {"rule": "balanced", "step": 10, "task_loss": 1.3,
                                                  "selftalk_loss": 0.8, "why": "the lowest self-talk held-out loss"}
    results["finetuned"]["sa-sft"]["sources"] = {"task": {"rows": 360, "target_tokens": 3600},
                                                 "self": {"rows": 360, "target_tokens": 9000}}
    write_run_report(results, str(tmp_path))
    text = (tmp_path / "report.md").read_text()
    assert "forgetting monitor (loss on held-out self-dialogues, never trained on): 0.900 at step 10 -> 1.700 at " \
           "step 20; task held-out loss 1.200 -> 0.600" in text
    sa_sft = text.split("## sa-sft")[1]  # the chosen checkpoint, in its run's section
    assert "- exported checkpoint: step 10 (train.select balanced: the lowest self-talk held-out loss; task " \
           "held-out loss 1.300, self-talk held-out loss 0.800)" in sa_sft
    assert "exported checkpoint" not in text.split("## sa-sft")[0]
    assert "- trained on: task 360 rows / 3,600 target tokens, self 360 rows / 9,000 target tokens (target tokens " \
           "per task target token: self 2.50)" in sa_sft
    with_curve = imread(str(tmp_path / "report.png")).shape[1]
    for info in results["finetuned"].values():
        info.pop("curve")
    write_run_report(results, str(tmp_path))
    assert "forgetting monitor" not in (tmp_path / "report.md").read_text()
    assert with_curve > imread(str(tmp_path / "report.png")).shape[1]  # the curve is a panel of its own


def test_the_monitor_check_ranks_runs_by_their_exported_checkpoints_self_talk_loss():
    from sasft_ray.report import monitor_check

    def run(task, general, losses, selected=None):
        results = _results(task, 0, {"m": (1.0, general, general)}, base=(0.0, 0.8, 0.8))
        results["finetuned"]["m"]["curve"] = [{"step": 10 * i, "heldout_loss": 1.0, "selftalk_heldout_loss": x}
                                              for i, x in enumerate(losses, 1)]
        if selected is not None:
            results["finetuned"]["m"]["selected"] = {"step": 10, "rule": "balanced", "why": "", "task_loss": 1.0,
                                                     "selftalk_loss": selected}
        return entries(results)

    # a: the more monitor loss, the less kept; b: the ranking reversed, by the checkpoint train.select chose
    found = [*run("x/a.jsonl", 0.7, [0.1, 0.2]), *run("x/a.jsonl", 0.4, [0.1, 0.9]),
             *run("x/a.jsonl", 0.0, [0.2, 1.5]), *run("x/b.jsonl", 0.7, [0.1, 1.0]),
             *run("x/b.jsonl", 0.4, [0.1, 0.5]), *run("x/b.jsonl", 0.0, [0.1, 2.0], selected=0.2),
             *run("x/c.jsonl", 0.5, [0.1, 0.2])]  # one run: no ρ of its own
    check = monitor_check(found)
    assert check["a"] == {"runs": 3, GENERAL: pytest.approx(-1.0)}
    assert check["b"] == {"runs": 3, GENERAL: pytest.approx(1.0)}
    assert set(check) == {"a", "b", "all"} and check["all"]["runs"] == 7
    text = compare(found)
    assert "| task | runs | ρ, general (mean) |" in text
    assert "| a | 3 | -1.00 |" in text and "| b | 3 | +1.00 |" in text
    assert monitor_check(run("x/a.jsonl", 0.7, [])) == {}  # no monitor measured: nothing to check


def test_the_decision_picks_the_most_kept_among_the_methods_near_the_best_in_domain_score(tmp_path):
    from sasft_ray.report import decide, plot_scenarios

    points = {"sft": (1.0, 0.0), "sa-sft": (0.98, 0.9), "freeze": (0.5, 0.95), "sft@0.5": (0.6, 0.5)}
    front, winner = decide(points, share=0.97)
    assert front == {"sft", "sa-sft", "freeze"}  # sft@0.5 is beaten on both by sa-sft
    assert winner == "sa-sft"
    assert decide(points, share=1.0)[1] == "sft"  # the best in-domain score alone
    assert decide(points, share=0.5)[1] == "freeze"

    found = []
    for seed in (0, 1):
        found += entries(_results("t1", seed, {"sft": (0.9, 0.1, 0.1), "sa-sft": (0.9 - seed * 0.02, 0.7, 0.6)},
                                  base=(0.0, 0.8, 0.8)))
    text = compare(found)
    assert "Decision for m on t1: **sa-sft**" in text
    assert "| sa-sft | 2 | 0.890 ± 0.014 | 0.890 ± 0.014 | 0.812 ± 0.000 | ✓ |" in text
    assert "| sft | 2 | 0.900 ± 0.000 | 0.900 ± 0.000 | 0.125 ± 0.000 | ✓ |" in text
    assert "**sft**" in compare(found, share=1.0)
    assert plot_scenarios(found, str(tmp_path / "pareto.png")) == 1 and (tmp_path / "pareto.png").stat().st_size > 1000


def test_a_setting_a_run_of_an_older_version_lacks_counts_at_its_default():
    """Two runs of one study, one from before `export.interpolate` and `eval.indomain_share` existed: only λ tells
    them apart; a third that set the newer setting is told apart by it."""
    from sasft_ray.config import load_config
    from sasft_ray.report import variants

    new = load_config("demo", ["mix.self_ratio=0.5"]).model_dump(mode="json")
    old = load_config("demo").model_dump(mode="json")
    del old["export"]["interpolate"], old["eval"]["indomain_share"]
    tuned = load_config("demo", ["export.interpolate=[0.5]"]).model_dump(mode="json")
    assert variants([old, new]) == ["mix.self_ratio=1.0", "mix.self_ratio=0.5"]
    assert variants([old, tuned]) == ["export.interpolate=[]", "export.interpolate=[0.5]"]
