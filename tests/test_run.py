"""`sasft run` end to end on the small forgetting lab: self-talk, mix, ZeRO-3 training, Ray Serve,
evaluation over HTTP, report; then a second run resumes and redoes nothing. The demo's `compare`
(a second method trained, served and reported beside the first) is left to the demo itself, which
CI runs: here it would cost one more training and one more vLLM engine."""

import json

from sasft_ray.cli import main


def test_run_demo_on_the_small_lab_end_to_end_and_resume(small_lab, tmp_path, capsys, no_ray_left):
    lab, _ = small_lab
    overrides = [f"run_dir={tmp_path / 'run'}", "bootstrap=lab-small", f"model.path={lab / 'model'}",
                 f"data.path={lab / 'tasks' / 'double.jsonl'}", f"mix.external.path={lab / 'external.jsonl'}",
                 "data.max_rows=150", "compare=[]", "selftalk.num_dialogues=64", "mix.self_ratio=0.4",
                 "serve.port=8124",
                 # (64 dialogues hold λ 0.4 of at most 150 task rows; a pool smaller than λ takes is refused)
                 # a few dozen steps, enough to teach the task's style
                 "train.epochs=2", "train.lr=3e-3", "train.micro_batch_size=4",
                 f"eval.suites=[{{name: lab, path: {lab / 'evals'}, scorers: [exact, contains]}}]"]
    args = ["run", "demo", *[f"--set={o}" for o in overrides]]
    assert main(args) == 0

    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"finetuned", "base"}
    assert results["finetuned"]["finetuned"]["method"] == "sa-sft"
    skills = json.loads((lab / "lab.json").read_text())["skills"]
    for scores in results["models"].values():
        assert set(scores) == {"in-domain", *skills}
    assert results["models"]["base"]["in-domain"]["exact"] == 0.0  # the task's style is foreign to the base model
    # a few dozen steps on the small lab teach the task's answer style, if not yet its content
    styled = {m: _share_in_task_style(tmp_path / "run" / "eval" / "samples" / m / "in-domain.jsonl")
              for m in results["models"]}
    assert styled["base"] == 0.0 and styled["finetuned"] > 0.5
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## finetuned (method sa-sft" in report and "forgetting" in report
    # the forgetting monitor: 4 held-out self-dialogues (5 % of 64), measured at every checkpoint
    curve = results["finetuned"]["finetuned"]["curve"]
    assert curve and all(isinstance(c["selftalk_heldout_loss"], float) for c in curve)
    assert "forgetting monitor (loss on held-out self-dialogues" in report
    assert (tmp_path / "run" / "report.png").stat().st_size > 1000

    capsys.readouterr()
    assert main(args) == 0  # everything is done: nothing is generated, trained or served again
    out = capsys.readouterr().out
    for stage in ("task", "selftalk", "mix", "train", "eval"):
        assert f"[{stage}] done earlier" in out
    assert "[serve]" not in out


def _share_in_task_style(samples) -> float:
    """Replies that open like their reference (`ANS=`, `<<`, `{"result"`): the task's foreign style."""
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return sum(r["prediction"].startswith(r["reference"][:4]) for r in rows) / len(rows)
