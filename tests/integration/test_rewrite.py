"""train.method sdft end to end: the base model's rewrites of the task replies through real Ray Data and real
vLLM (CPU) actors, on the tiny model, into the mix."""

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from sasft_ray import layout
from sasft_ray.generate import TooFewSurvivors, generate
from sasft_ray.rundir import RunDir, StageChanged
from sasft_ray.tiny import write_demo_task
from tests.conftest import make_config

ENGINE = {"max_model_len": 256, "batch_size": 8}  # several batches: the rows spread over them
# any rewrite that ends by itself is used: the tiny model's replies do ("Sure! The answer is 2?")
SDFT = {"max_tokens": 40, "keep_if": "rouge_l", "min_score": 0.0, "on_lost": "original"}


def rewrites(rd):
    return {r["source_row"]: r for r in pads.dataset(rd.local(layout.REWRITE)).to_table().to_pylist()}


def test_sdft_trains_on_the_rewritten_task_rows_only(tiny_llama, local_ray, tmp_path):
    write_demo_task(tmp_path / "task.jsonl", n=30)
    cfg = make_config(tmp_path, tiny_llama, train={"method": "sdft"}, sdft=SDFT,
                      selftalk={"heldout_fraction": 0.0, "max_user_tokens": 16, "max_assistant_tokens": 16,
                                "engine": ENGINE})
    rd = RunDir(cfg.run_dir)
    generate(cfg, rd)

    task, info, mix = rd.stage_info("task"), rd.stage_info("rewrite"), rd.stage_info("mix")
    assert "selftalk" not in rd.manifest()["stages"]  # no self-talk: nothing mixed in, no monitor asked for
    # every row accounted for once: rewritten, or (on_lost original) its reference reply kept
    assert info["rows_in"] == task["train_rows"] == info["rewritten"] + info["replaced"] == info["rows_out"]
    assert info["drops"] == {} and sum(info["replaced_reasons"].values()) == info["replaced"]
    assert info["generated_tokens"] > 0 and info["rewritten"] > 0
    rows = rewrites(rd)
    originals = {r["source_row"]: r["messages"] for r in pq.read_table(rd.local(layout.TASK_TRAIN)).to_pylist()}
    assert rows.keys() == originals.keys()
    for source_row, r in rows.items():
        assert r["drop_reason"] == "" and r["original"] == [originals[source_row][1]["content"]]
        assert r["messages"][0] == originals[source_row][0]  # the task input as it was
        if r["replaced"]:
            assert r["messages"] == originals[source_row] and r["rejected"]
        else:
            assert r["rejected"] == "" and r["messages"][1]["content"].strip()
            assert r["rewrites"] == [r["messages"][1]["content"]]  # the model's rewrite, kept whether used or not

    # the mix: the rewrite stage's rows, each once, and nothing else
    mixed = pq.read_table(rd.local(layout.MIXED_PART)).to_pylist()
    assert mix["task_rows"] == mix["rows_out"] == len(mixed) == info["rows_out"] and mix["mixed_in_rows"] == 0
    assert {m["source"] for m in mixed} == {"task"}
    assert {m["id"]: m["messages"] for m in mixed} == {i: r["messages"] for i, r in rows.items()}

    # done: skipped on a re-run; another prompt is refused until the stage is redone, which redoes the mix too
    before = rd.manifest()["stages"]
    generate(cfg, RunDir(cfg.run_dir))
    assert rd.manifest()["stages"] == before
    # (and a rule that asks for the answer in it: the tiny model's rewrites lose it, the rows keep their replies)
    reworded = cfg.model_copy(update={"sdft": cfg.sdft.model_copy(update={
        "prompt": "Say it again: {reference}", "keep_if": "contains", "min_score": 1.0,
        "answer_pattern": "ANS=(\\w+)"})})
    with pytest.raises(StageChanged, match="--redo rewrite"):
        generate(reworded, RunDir(cfg.run_dir))
    generate(reworded, RunDir(cfg.run_dir), redo="rewrite")
    after = rd.manifest()["stages"]
    assert after["task"] == before["task"]
    assert after["rewrite"]["id"] != before["rewrite"]["id"] and after["mix"]["id"] != before["mix"]["id"]
    redone = after["rewrite"]
    assert redone["rows_in"] == redone["rows_out"] == redone["rewritten"] + redone["replaced"] == info["rows_in"]
    assert redone["replaced"] > 0 and redone["replaced_reasons"].get("lost answer")

    # on_lost drop with a rule gibberish cannot pass: every row dropped, counted, and the stage fails
    strict = reworded.model_copy(update={"sdft": reworded.sdft.model_copy(update={"on_lost": "drop",
                                                                                 "keep_if": "exact"})})
    with pytest.raises(TooFewSurvivors, match="sdft.keep_if"):
        generate(strict, RunDir(cfg.run_dir), redo="rewrite")
    failed = rd.stage_info("rewrite")
    assert failed["status"] == "failed" and failed["rows_out"] == 0
    assert sum(failed["drops"].values()) == failed["rows_in"] == info["rows_in"]
    assert all(not r["replaced"] and r["drop_reason"] for r in rewrites(rd).values())
