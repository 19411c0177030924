import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sasft_ray.config import DataConfig
from sasft_ray.data import BadRow, LoadReport, is_heldout, iter_rows
from sasft_ray.generate import task_stage
from sasft_ray.layout import TASK_TRAIN
from sasft_ray.rundir import RunDir, StageChanged, fingerprint
from tests.conftest import make_config

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
EXPECTED = GOOD["messages"]


def write_jsonl(path, rows):
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows))
    return path


def load(path, **kw):
    report = LoadReport()
    return [m for _, m in iter_rows(DataConfig(path=str(path), **kw), report)], report


@pytest.mark.parametrize("row", [
    GOOD,
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    {"instruction": "hi", "output": "hello"},
    {"instruction": "hi", "input": "", "output": "hello"},
    {"prompt": "hi", "completion": "hello"},
])
def test_common_shapes_become_canonical_messages(tmp_path, row):
    rows, _ = load(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert rows == [EXPECTED]


def test_alpaca_input_is_appended_and_column_mapping(tmp_path):
    rows, _ = load(write_jsonl(tmp_path / "d.jsonl", [{"instruction": "sum", "input": "1 2", "output": "3"}]))
    assert rows[0][0]["content"] == "sum\n\n1 2"
    rows, _ = load(write_jsonl(tmp_path / "e.jsonl", [{"question": "hi", "answer": "hello"}]),
                   columns={"prompt": "question", "completion": "answer"})
    assert rows == [EXPECTED]


def test_json_parquet_and_hf_folder_formats(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([GOOD, GOOD], indent=2))
    assert load(tmp_path / "d.json")[0] == [EXPECTED, EXPECTED]
    pq.write_table(pa.Table.from_pylist([{"prompt": "hi", "completion": "hello"}]), tmp_path / "d.parquet")
    assert load(tmp_path / "d.parquet")[0] == [EXPECTED]
    import datasets

    datasets.Dataset.from_list([{"prompt": "hi", "completion": "hello"}]).save_to_disk(str(tmp_path / "hf"))
    assert load(tmp_path / "hf")[0] == [EXPECTED]



def test_a_dataset_with_configurations_reads_the_one_named_with_its_files_and_revision(tmp_path, monkeypatch):
    """An HF dataset of several configurations (openai/gsm8k's main and socratic), laid out as a folder the
    hub would serve: data.name picks one, data.data_files picks files; data.revision goes to load_dataset
    as the hub would take it (a stand-in for the hub: nothing here reaches it); these keys on a plain file
    are refused, named."""
    import datasets

    folder = tmp_path / "gsm8k"
    for config, answer in (("main", "#### 4"), ("socratic", "Why? #### 4")):
        (folder / config).mkdir(parents=True)
        write_jsonl(folder / config / "train.jsonl", [{"question": "2 + 2?", "answer": answer}])
    (folder / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n"
        for c in ("main", "socratic")) + "---\n")
    columns = {"prompt": "question", "completion": "answer"}
    for config, answer in (("main", "#### 4"), ("socratic", "Why? #### 4")):
        rows, _ = load(folder, name=config, columns=columns)
        assert rows == [[{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": answer}]]
    rows, _ = load(folder, data_files={"train": "socratic/train.jsonl"}, columns=columns)
    assert rows[0][1]["content"] == "Why? #### 4"

    asked, load_dataset = {}, datasets.load_dataset

    def hub(path, **kwargs):  # the hub's answer: the folder's main configuration
        asked.update(path=path, **kwargs)
        return load_dataset(str(folder), name="main", split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", hub)
    rows, _ = load("openai/gsm8k", name="main", revision="e53f048", columns=columns)
    assert rows[0][1]["content"] == "#### 4"
    assert asked == {"path": "openai/gsm8k", "name": "main", "data_files": None, "revision": "e53f048",
                     "split": "train", "streaming": True}
    with pytest.raises(BadRow, match="data.name.*is for HF datasets"):
        load(write_jsonl(tmp_path / "d.jsonl", [GOOD]), name="main")

BAD_CASES = [
    (b'{"messages": [\n', "line 2", "<json>", "malformed JSON"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "line 2", "messages", "no assistant turn"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "line 2",
     "messages[0].content", "missing"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}, "line 2",
     "messages[0].content", "empty"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "line 2",
     "messages[0].content", "must be a string"),
    ({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "line 2",
     "messages[0].role", "unknown role 'bot'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}, "line 2",
     "conversations[1].from", "unknown role 'robot'"),
    ({"instruction": "hi"}, "line 2", "<row>", "unrecognised shape"),
    ({"prompt": "hi", "completion": ""}, "line 2", "completion", "empty"),
    (b'{"prompt": "caf\xe9", "completion": "x"}\n', "line 2", "<text>", "not valid UTF-8"),
    ([1, 2], "line 2", "<row>", "must be an object"),
]


@pytest.mark.parametrize("bad, line, field, reason", BAD_CASES)
def test_bad_rows_name_file_line_and_field(tmp_path, bad, line, field, reason):
    path = write_jsonl(tmp_path / "task.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(BadRow) as err:
        load(path)
    message = str(err.value)
    assert f"{path}:{line}" in message and f"field '{field}'" in message and reason in message


def test_skip_counts_each_reason(tmp_path):
    path = write_jsonl(tmp_path / "task.jsonl",
                       [GOOD, b"{oops\n", GOOD, {"prompt": "x"}, {"messages": [{"role": "bot", "content": "x"}]},
                        b"\n", {"messages": [{"role": "bot", "content": "y"}]}, GOOD])
    rows, report = load(path, on_bad_row="skip")
    assert len(rows) == 3
    assert report.rows_in == 7 and report.rows_out == 3
    assert report.skipped == {"malformed JSON": 1, "unrecognised shape": 1, "unknown role": 2}


def test_json_array_errors_carry_line_numbers(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[\n" + json.dumps(GOOD) + ",\n" + json.dumps({"prompt": "x", "completion": 5}) + "\n]")
    with pytest.raises(BadRow, match=r"d.json:line 3: field 'completion'"):
        load(path)


def test_parquet_errors_carry_row_numbers(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""}]),
                   path)
    with pytest.raises(BadRow, match=r"d.parquet:row 1: field 'completion': empty"):
        load(path)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(BadRow, match="no such file"):
        load(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(BadRow, match="set data.format"):
        load(tmp_path / "d.txt")


def test_heldout_split_is_stable_and_near_its_fraction():
    dialogues = [[{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}] for i in range(4000)]
    held = [is_heldout(d, 0.1) for d in dialogues]
    assert held == [is_heldout(d, 0.1) for d in dialogues]
    assert 0.08 < sum(held) / len(held) < 0.12


def test_task_stage_writes_splits_and_fails_before_any_work(tmp_path):
    write_jsonl(tmp_path / "task.jsonl", [GOOD] * 3 + [{"prompt": f"q{i}", "completion": "a"} for i in range(200)])
    cfg = make_config(tmp_path)
    rd = RunDir(cfg.run_dir)
    task_stage(cfg, rd, force=False)
    info = rd.stage_info("task")
    assert info["status"] == "done" and info["train_rows"] + info["heldout_rows"] == 203
    assert pq.read_table(rd.local(TASK_TRAIN)).num_rows == info["train_rows"]

    write_jsonl(tmp_path / "bad.jsonl", [GOOD, {"prompt": "x", "completion": 1}])
    bad = make_config(tmp_path, data_path=tmp_path / "bad.jsonl", run_dir=str(tmp_path / "run2"))
    with pytest.raises(BadRow, match="bad.jsonl:line 2"):
        task_stage(bad, RunDir(bad.run_dir), force=False)
    assert RunDir(bad.run_dir).stage_info("task")["status"] == "running"  # never marked done


def test_a_task_file_rewritten_at_the_same_path_is_refused_not_reused(tmp_path, capsys):
    task = write_jsonl(tmp_path / "task.jsonl", [{"prompt": f"q{i}", "completion": "a"} for i in range(50)])
    cfg = make_config(tmp_path)
    task_stage(cfg, RunDir(cfg.run_dir), force=False)
    task.write_bytes(task.read_bytes())  # rewritten, same content: still the same input
    task_stage(cfg, RunDir(cfg.run_dir), force=False)
    assert "[task] done earlier, skipped" in capsys.readouterr().out
    write_jsonl(task, [{"prompt": f"q{i}", "completion": "b"} for i in range(50)])
    with pytest.raises(StageChanged, match="other files at data.path.*--redo task"):
        task_stage(cfg, RunDir(cfg.run_dir), force=False)
    task_stage(cfg, RunDir(cfg.run_dir), force=True)  # --redo: made from the new file
    assert RunDir(cfg.run_dir).stage_info("task")["inputs"] == {"data.path": fingerprint(str(task))}


def test_fingerprint_reads_content_not_place_and_skips_hub_ids(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    weights = bytes(range(256)) * 2048  # 512 KiB: more than the two 64 KiB samples
    (model / "model.safetensors").write_bytes(weights)
    before = fingerprint(str(model))
    (model / ".cache").mkdir()
    (model / ".cache" / "lock").write_text("x")  # hub download state, not the model
    (model / "README.md").write_text("scores: 0.9")  # the model card, rewritten by every evaluation
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ("config.json", "model.safetensors"):
        (copy / f).write_bytes((model / f).read_bytes())
    assert fingerprint(str(model)) == fingerprint(str(copy)) == before
    (model / "model.safetensors").write_bytes(weights[:-1] + b"\x00")  # retrained: the last bytes differ
    assert fingerprint(str(model)) != before
    assert fingerprint("meta-llama/Meta-Llama-3-8B-Instruct") is None
    assert fingerprint("s3://bucket/model") is None
