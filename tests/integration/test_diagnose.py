"""`sasft diagnose`: a task in a foreign style costs the base model more per token than its own text."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from sasft_ray import lab
from sasft_ray.data import ROW_SCHEMA
from sasft_ray.diagnose import describe, score
from sasft_ray.layout import DIAGNOSIS, DIAGNOSIS_PLOT, SELFTALK, TASK_TRAIN
from sasft_ray.rundir import RunDir
from tests.conftest import make_config


def run_dir_with(tmp_path, name, task: list[list[dict]], own: list[list[dict]], model: str):
    """A run dir as `generate` leaves it: the task split and the self-dialogues (all kept)."""
    cfg = make_config(tmp_path / name, model, selftalk={"heldout_fraction": 0.05}, train={"max_length": 128})
    rd = RunDir(cfg.run_dir)
    rows = [{"messages": m, "source_row": i} for i, m in enumerate(task)]
    rd.make_parent(TASK_TRAIN)
    pq.write_table(pa.Table.from_pylist(rows, ROW_SCHEMA), rd.local(TASK_TRAIN))
    rd.fs.create_dir(rd.local(SELFTALK))
    pq.write_table(pa.Table.from_pylist([{"messages": m, "drop_reason": ""} for m in own]),
                   rd.local(SELFTALK, "part-0.parquet"))
    return cfg, rd


def test_a_foreign_style_task_is_farther_than_one_in_the_house_style(small_lab, tmp_path):
    out, _ = small_lab
    stream = lab.pretrain_dialogues(seed=7, exclude=set())
    own = [next(stream) for _ in range(48)]  # the base model's own kind of text
    foreign = [r["messages"] for r in lab.read_jsonl(out / "tasks" / "parity.jsonl")[:48]]  # replies in ALL CAPS
    house = [r["messages"] for r in lab.read_jsonl(out / "tasks" / f"{lab.CONTROL}.jsonl")[:48]]  # the control

    cfg, rd = run_dir_with(tmp_path, "foreign", foreign, own, str(out / "model"))
    far = score(cfg, rd, limit=48)
    cfg, rd = run_dir_with(tmp_path, "house", house, own, str(out / "model"))
    near = score(cfg, rd, limit=48)

    assert far["task"]["rows"] == far["selftalk"]["rows"] == 48
    assert far["distance"] > 1.0 and far["distance"] > 5 * near["distance"] and far["ratio"] > near["ratio"]
    assert far["verdict"].startswith("far") and not near["verdict"].startswith("far")
    written = json.loads(rd.read_text(DIAGNOSIS))
    assert written["ratio"] == near["ratio"] and sum(written["histogram"]["task"]) == 48
    assert rd.exists(DIAGNOSIS_PLOT) and "x," in describe(far)
