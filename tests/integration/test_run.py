"""`sasft run` end to end on the small forgetting lab: self-talk, mix, ZeRO-3 training, Ray Serve,
evaluation over HTTP, report; then a second run resumes and redoes nothing. The demo's `compare`
(a second method trained, served and reported beside the first) is left to the demo itself, which
CI runs: here it would cost one more training and one more vLLM engine."""

import json

from sasft_ray.cli import main
from sasft_ray.layout import LM_EVAL, REPORT, REPORT_PLOT, RESULTS, SAMPLES

PLANTED_KEY = "sk-planted-4d1e0b7a93"  # the endpoint's API key: it must reach no file and no log


def test_run_demo_on_the_small_lab_end_to_end_and_resume(small_lab, tmp_path, capsys, no_ray_left, monkeypatch):
    lab, _ = small_lab
    monkeypatch.setenv("SASFT_TEST_RUN_KEY", PLANTED_KEY)
    tasks = _lm_eval_task(lab, tmp_path / "lm_tasks")
    overrides = [f"run_dir={tmp_path / 'run'}", "bootstrap=lab-small", f"model.path={lab / 'model'}",
                 f"data.path={lab / 'tasks' / 'double.jsonl'}", f"mix.external.path={lab / 'external.jsonl'}",
                 f"mix.replay.path={lab / 'tasks' / 'house.jsonl'}",
                 "data.max_rows=150", "compare=[]", "selftalk.num_dialogues=64", "mix.self_ratio=0.4",
                 "serve.port=8124", "export.interpolate=[0.5]",  # WiSE-FT: one more model, served and scored
                 # (64 dialogues hold λ 0.4 of at most 150 task rows; a pool smaller than λ takes is refused)
                 # a few dozen steps, enough to teach the task's style
                 "train.epochs=2", "train.lr=3e-3", "train.micro_batch_size=4",
                 f"eval.suites=[{{name: lab, path: {lab / 'evals'}, scorers: [exact, contains]}}]",
                 # behind an API key, with lm-eval on: lm-eval keeps the key in what it returns
                 "serve.api_key_env=SASFT_TEST_RUN_KEY",
                 f"eval.lm_eval=[{{tasks: [lab_gen], include_path: {tasks}, mode: chat, limit: 4}}]"]
    args = ["run", "demo", *[f"--set={o}" for o in overrides]]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert (tmp_path / "run" / LM_EVAL / "finetuned" / "lab_gen.json").exists()
    leaked = [str(p) for p in tmp_path.rglob("*") if p.is_file() and PLANTED_KEY.encode() in p.read_bytes()]
    assert not leaked and PLANTED_KEY not in printed.out + printed.err

    results = json.loads((tmp_path / "run" / RESULTS).read_text())
    assert set(results["models"]) == {"finetuned", "finetuned@0.5", "base"}
    assert results["finetuned"]["finetuned"]["method"] == "sa-sft"
    assert results["finetuned"]["finetuned@0.5"]["method"] == "sa-sft@0.5"
    _assert_halfway(lab / "model", tmp_path / "run" / "model", tmp_path / "run" / "interpolated" / "0.5")
    skills = json.loads((lab / "lab.json").read_text())["skills"]
    for scores in results["models"].values():
        assert set(scores) == {"in-domain", *skills, "lab_gen"}
    assert results["models"]["base"]["in-domain"]["exact"] == 0.0  # the task's style is foreign to the base model
    # a few dozen steps on the small lab teach the task's answer style, if not yet its content
    styled = {m: _share_in_task_style(tmp_path / "run" / SAMPLES / m / "in-domain.jsonl")
              for m in results["models"]}
    assert styled["base"] == 0.0 and styled["finetuned"] > 0.5
    report = (tmp_path / "run" / REPORT).read_text()
    assert "## finetuned (method sa-sft," in report and "## finetuned@0.5 (method sa-sft@0.5," in report
    assert "forgetting" in report
    # the forgetting monitor: 4 held-out self-dialogues (5 % of 64), measured at every checkpoint
    curve = results["finetuned"]["finetuned"]["curve"]
    assert curve and all(isinstance(c["selftalk_heldout_loss"], float) for c in curve)
    assert "forgetting monitor (loss on held-out self-dialogues" in report
    assert (tmp_path / "run" / REPORT_PLOT).stat().st_size > 1000

    capsys.readouterr()
    assert main(args) == 0  # everything is done: nothing is generated, trained or served again
    out = capsys.readouterr().out
    for stage in ("task", "selftalk", "mix", "train", "interpolate", "eval"):
        assert f"[{stage}] done earlier" in out
    assert "[serve]" not in out


def _share_in_task_style(samples) -> float:
    """Replies that open like their reference (`ANS=`, `<<`, `{"result"`): the task's foreign style."""
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return sum(r["prediction"].startswith(r["reference"][:4]) for r in rows) / len(rows)


def _lm_eval_task(lab, out):
    """A local lm-eval generation task over a few of the lab's general questions (offline)."""
    import yaml

    out.mkdir()
    rows = [json.loads(line) for line in sorted((lab / "evals").glob("*.jsonl"))[0].read_text().splitlines()[:4]]
    data = out / "rows.jsonl"
    data.write_text("".join(json.dumps({"question": r["messages"][-1]["content"], "answer": r["reference"]}) + "\n"
                            for r in rows))
    (out / "lab_gen.yaml").write_text(yaml.safe_dump({
        "task": "lab_gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}", "generation_kwargs": {"max_gen_toks": 8, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}]}))
    return out


def _assert_halfway(base, tuned, mixed) -> None:
    """Every weight of the α 0.5 model is the mean of the base model's and the fine-tune's."""
    import torch
    from safetensors.torch import load_file

    theta0, theta, half = (load_file(str(folder / "model.safetensors")) for folder in (base, tuned, mixed))
    assert half.keys() == theta.keys()
    assert any(not torch.equal(theta0[k], theta[k]) for k in theta)  # training moved the weights
    for k in theta:
        torch.testing.assert_close(half[k], (theta0[k] + theta[k]) / 2)
