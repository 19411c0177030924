"""Cluster scale on one machine: a real two-node Ray cluster, the pipeline submitted to it as Ray jobs,
the run directory on a real S3-compatible server (moto, on loopback), and a training node lost mid-run."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

from sasft_ray.layout import MIXED, MODEL, SELFTALK
from sasft_ray.rundir import RunDir
from sasft_ray.tiny import write_demo_task
from sasft_ray.train import train_events
from tests.conftest import free_port

ROOT = Path(__file__).parents[2]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def cluster(bucket):
    """A head node and a worker node, each a raylet of its own with 3 CPUs; jobs go to the head's dashboard."""
    from ray.cluster_utils import Cluster

    port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port})
    worker = cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
    yield cluster, worker, f"http://127.0.0.1:{port}"
    cluster.shutdown()


@pytest.fixture(scope="module")
def job_config(tiny_llama, bucket, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    write_demo_task(tmp / "task.jsonl", n=120)
    raw = {"run_dir": f"{bucket}/pipeline", "model": {"path": tiny_llama, "dtype": "float32"},
           "data": {"path": str(tmp / "task.jsonl")},
           "selftalk": {"num_dialogues": 16, "max_user_tokens": 32, "max_assistant_tokens": 32,
                        "engine": {"max_model_len": 256, "batch_size": 16}},
           "filters": {"min_survival": 0.1}, "mix": {"self_ratio": 0.1},
           "train": {"num_workers": 2, "placement_strategy": "SPREAD", "micro_batch_size": 4, "lr": 5e-3,
                     "warmup_ratio": 0.0, "schedule": "constant", "max_length": 128, "max_steps": 30,
                     "checkpoint_every": 10}}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, RunDir(raw["run_dir"])


def submit(dashboard: str, job: str, config: Path) -> str:
    """`ray job submit`; returns the job's id without waiting for it. No `--working-dir`: both nodes
    here share one machine and one Ray session folder, and a job's working-dir copy vanished from under it
    (the project is installed on every node, as the cluster configs install it)."""
    out = subprocess.run([RAY, "job", "submit", "--address", dashboard, "--no-wait",
                          "--", sys.executable, str(ROOT / "jobs" / "job.py"), job, "--config", str(config)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"ray job submit failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout).group()


def wait_for_job(dashboard: str, job_id: str, timeout_s: float = 900) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    deadline = time.time() + timeout_s
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                            JobStatus.STOPPED}:
        assert time.time() < deadline, f"job {job_id} still {status} after {timeout_s} s"
        time.sleep(2)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-4000:]
    return client.get_job_logs(job_id)


@pytest.fixture(scope="module")
def generated(cluster, job_config):
    config, rd = job_config
    wait_for_job(cluster[2], submit(cluster[2], "generate", config))
    return rd


def test_self_talk_and_mix_land_in_s3(generated):
    rd = generated
    info = rd.stage_info("selftalk")
    ids = pads.dataset(rd.local(SELFTALK), filesystem=rd.fs, format="parquet").to_table(columns=["id"])
    assert sorted(ids["id"].to_pylist()) == list(range(info["rows_in"]))
    mixed = pads.dataset(rd.local(MIXED), filesystem=rd.fs, format="parquet").count_rows()
    assert mixed == rd.stage_info("mix")["rows_out"] > rd.stage_info("task")["train_rows"]


@pytest.fixture(scope="module")
def trained(cluster, job_config, generated):
    head_cluster, worker, dashboard = cluster
    config, rd = job_config
    job = submit(dashboard, "train", config)
    # Lose the node once Ray Train's controller has registered a checkpoint: it writes its snapshot to
    # S3 then. A worker's report alone is not enough: the controller picks it up on its next poll.
    snapshot = ("train", "checkpoint_manager_snapshot.json")
    deadline = time.time() + 600
    while not (rd.exists(*snapshot) and json.loads(rd.read_text(*snapshot))["latest_checkpoint_result"]):
        assert time.time() < deadline, "no checkpoint registered within 600 s"
        time.sleep(0.5)
    head_cluster.remove_node(worker)  # the node dies with its training worker (and its local disk)
    return rd, head_cluster.head_node.node_id, worker.node_id, wait_for_job(dashboard, job)


def test_training_spans_both_nodes_and_resumes_from_s3_after_losing_one(trained, job_config):
    from sasft_ray.config import load_config

    rd, head, lost, _ = trained
    events = train_events(rd)
    assert events[0]["event"] == "started" and set(events[0]["nodes"]) == {head, lost}, events  # one per node
    starts = [e for e in events if e["event"] in ("started", "resumed")]
    assert [e["event"] for e in starts] == ["started", "resumed"], events  # restarted once, not from scratch
    resumed = starts[1]
    assert lost not in resumed["nodes"]
    checkpoints = [e["step"] for e in events if e["event"] == "checkpoint"]
    assert resumed["step"] in checkpoints and checkpoints[-1] == 30  # went on from a checkpoint in S3
    record = rd.stage_info("train")
    # each rank resumed at its row of the epoch where that step left it: the rest of the epoch, not a new one
    cfg = load_config(str(job_config[0]))
    epoch, done = divmod(resumed["step"], record["rows_in"] // cfg.global_batch)
    assert done and (resumed["epoch"], resumed["row"]) == (epoch, done * cfg.train.micro_batch_size)
    assert record["status"] == "done" and record["final_loss"] < events[1]["loss"]


def test_the_export_lands_in_s3_and_generates(trained, tmp_path):
    import pyarrow.fs as pafs
    from transformers import AutoModelForCausalLM

    from sasft_ray.chat import load_tokenizer

    rd, *_ = trained
    pafs.copy_files(rd.local(MODEL), str(tmp_path), source_filesystem=rd.fs)
    assert {"model.safetensors", "drift.json", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    tok = load_tokenizer(str(tmp_path))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Double every letter of abc."}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out = AutoModelForCausalLM.from_pretrained(tmp_path).generate(ids, max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).startswith("ANS=")  # the task's foreign style, learned
