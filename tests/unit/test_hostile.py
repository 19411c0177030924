"""The run directory under hostile and careless use: no secret written, no stale score reported as new,
nothing deleted that the project did not make, no changed input missed, no path outside the run dir.
No test here needs Ray or an engine: an endpoint is the stand-in of tests/unit/test_faults.py."""

import json
import re
import shutil

import pytest

from sasft_ray.generate import generate
from sasft_ray.layout import EVAL, LOCK, MANIFEST, RESULTS, SCORED
from sasft_ray.rundir import RunDir
from sasft_ray.tiny import write_demo_task
from tests.conftest import make_config
from tests.unit.test_faults import _Endpoint, _finish_training, endpoint  # noqa: F401 (a fixture)

KEY = "sk-planted-9f3b2c71"


def found_anywhere(folder, text: str) -> list[str]:
    """The files under `folder` whose bytes hold `text`."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


# --- 1: no secret on disk ----------------------------------------------------------------------------

def test_lm_evals_saved_results_hold_no_api_key(tmp_path):
    from sasft_ray.evaluate import save_lm_eval

    header = {"Authorization": f"Bearer {KEY}"}
    # what lm-eval returns: its model_args (the header included) under config, and each request in samples
    result = {"results": {"tiny_mc": {"acc,none": 0.5}}, "configs": {"tiny_mc": {}},
              "config": {"model": "local-completions", "model_args": {"model": "finetuned", "header": header}},
              "samples": {"tiny_mc": [{"doc_id": 0, "arguments": [["q", " a"]], "note": f"sent with {header}"}]}}
    save_lm_eval(result, tmp_path / "lm_eval", "tiny_mc", KEY)
    assert not found_anywhere(tmp_path, KEY)
    saved = json.loads((tmp_path / "lm_eval" / "tiny_mc.json").read_text())
    assert saved["results"]["tiny_mc"]["acc,none"] == 0.5  # the scores themselves kept
    assert saved["config"]["model_args"]["header"] == {"Authorization": "Bearer <redacted>"}


# --- 2: a report shows only current results ---------------------------------------------------------

def _evaluated(tmp_path, url, name: str, **train):
    """A run trained (its record) and evaluated against the stand-in endpoint, as `sasft eval` does it."""
    from sasft_ray.pipeline import eval_stage

    write_demo_task(tmp_path / "task.jsonl", n=60)
    cfg = make_config(tmp_path, data_path=tmp_path / "task.jsonl", run_dir=str(tmp_path / name),
                      train={"method": "sft", **train}, eval={"indomain_scorers": ["exact"]})
    rd = RunDir(cfg.run_dir)
    generate(cfg, rd)
    _finish_training(cfg, rd)
    _Endpoint.fail = [0]
    eval_stage(cfg, rd, url, None)
    return cfg, rd


def test_a_report_shows_only_results_of_the_settings_it_names_each_run_once(tmp_path, endpoint, capsys):  # noqa: F811
    from sasft_ray.evaluate import EvalError
    from sasft_ray.report import load_entries

    cfg, rd = _evaluated(tmp_path, endpoint, "a")
    _evaluated(tmp_path, endpoint, "b", lr=0.5)
    # a later command with another setting rewrites config.yaml; the scores stay those of lr 1e-5
    generate(cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 0.5})}), rd)
    found = load_entries([str(tmp_path / "a"), str(tmp_path / "b")])
    assert [e["variant"] for e in found] == ["train.lr=1e-05", "train.lr=0.5"]  # not two seeds of lr 0.5
    # a copy of a run dir is the same evaluation: counted once
    shutil.copytree(tmp_path / "a", tmp_path / "a-copy")
    capsys.readouterr()
    found = load_entries([str(tmp_path / "a"), str(tmp_path / "a-copy")])
    assert len(found) == 1 and "a-copy left out: the same evaluation as" in capsys.readouterr().err
    # retrained after the evaluation: its scores are of a model that is gone
    _finish_training(cfg, rd)
    with pytest.raises(EvalError, match="no current results"):
        load_entries([str(tmp_path / "a")])
    assert "models trained since" in capsys.readouterr().err


# --- 4: a refused evaluation deletes nothing ---------------------------------------------------------

def test_eval_force_on_an_untrained_run_deletes_nothing(tmp_path, endpoint):  # noqa: F811
    from sasft_ray.pipeline import eval_stage
    from sasft_ray.serve import ServeError

    cfg, rd = _evaluated(tmp_path, endpoint, "a")
    before = {p: p.read_bytes() for p in (tmp_path / "a" / EVAL).rglob("*") if p.is_file()}
    rd.begin("train", "another", force=True)  # training started again, not finished
    with pytest.raises(ServeError, match="not trained under this config"):
        eval_stage(cfg, rd, endpoint, None, force=True)
    assert {p: p.read_bytes() for p in (tmp_path / "a" / EVAL).rglob("*") if p.is_file()} == before
    assert rd.stage_info("eval")["status"] == "done"


# --- 5: a lab rebuild deletes only the lab's files ---------------------------------------------------

def test_a_lab_rebuild_refuses_files_the_lab_did_not_write(tmp_path, monkeypatch):
    from sasft_ray import lab
    from sasft_ray.config import ConfigError

    old = tmp_path / "lab"
    (old / "tasks").mkdir(parents=True)
    (old / "tasks" / "double.jsonl").write_text("the lab's\n")
    (old / "tasks" / "mine.jsonl").write_text("the user's own task\n")
    (old / "notes.md").write_text("the user's notes\n")
    (old / "lab.json").write_text(json.dumps({"preset": "small", "seed": 0, "version": lab.WORLD_VERSION - 1,
                                              "files": ["lab.json", "tasks/double.jsonl"]}))
    monkeypatch.setattr(lab, "write_world", lambda *a, **k: pytest.fail("the rebuild started"))
    with pytest.raises(ConfigError, match=r"holds files the lab did not write \(notes.md, tasks/mine.jsonl\)"):
        lab.build_lab(old, preset="small", seed=1)
    assert (old / "tasks" / "mine.jsonl").read_text() == "the user's own task\n" and (old / "notes.md").exists()


# --- 6: every byte a stage reads, every setting that changes a score ---------------------------------

def test_a_same_length_fix_in_the_middle_of_the_task_file_is_a_change(tmp_path):
    from sasft_ray.rundir import StageChanged

    task = tmp_path / "task.jsonl"
    write_demo_task(task, n=4000)
    text = task.read_text()
    assert len(text) > 200_000  # well over the 2 x 64 KiB a fingerprint used to read
    cfg = make_config(tmp_path, data_path=task, train={"method": "sft"})
    generate(cfg, RunDir(cfg.run_dir))
    middle = len(text) // 2
    start = text.index('"ANS=', middle) + len('"ANS=')
    task.write_text(text[:start] + ("X" if text[start] != "X" else "Y") + text[start + 1:])  # one label, same size
    with pytest.raises(StageChanged, match="'task' .* from other files at data.path"):
        generate(cfg, RunDir(cfg.run_dir))


def test_weights_rewritten_in_the_middle_change_the_models_fingerprint(tmp_path):
    from sasft_ray.rundir import fingerprint

    model = tmp_path / "model"
    model.mkdir()
    weights = bytearray(range(256)) * 4096  # 1 MiB, as a checkpoint's tensors lie between header and tail
    (model / "model.safetensors").write_bytes(weights)
    before = fingerprint(str(model))
    weights[300_000:700_000] = bytes(400_000)
    (model / "model.safetensors").write_bytes(weights)
    assert fingerprint(str(model)) != before


def test_a_record_from_before_full_hashes_is_still_checked(tmp_path):
    from sasft_ray.rundir import StageChanged, fingerprint, sampled_fingerprint

    task = tmp_path / "task.jsonl"
    task.write_text("a" * 100)
    rd = RunDir(str(tmp_path / "run"))
    rd.begin("task", "h", inputs={"data.path": sampled_fingerprint(str(task))})  # as an older version recorded it
    rd.finish("task", {})
    assert rd.finished("task", "h", {"data.path": fingerprint(str(task))})  # the same file: still done
    task.write_text("b" * 100)
    with pytest.raises(StageChanged, match="from other files at data.path"):
        rd.finished("task", "h", {"data.path": fingerprint(str(task))})


def test_lm_eval_task_files_scorer_modules_and_context_length_key_the_scores(tmp_path, monkeypatch):
    from sasft_ray.evaluate import base_cache_key
    from sasft_ray.pipeline import eval_hash, eval_inputs

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text("task: tiny_mc\nmetric_list: [{metric: acc}]\n")
    (tmp_path / "my_scorer.py").write_text("def score(prediction, row):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = make_config(tmp_path, eval={"indomain_scorers": ["my_scorer:score"],
                                      "lm_eval": [{"tasks": ["tiny_mc"], "include_path": str(tasks)}]})

    def keys(c):
        return base_cache_key(c), eval_inputs(c), eval_hash(c, RunDir(c.run_dir))

    first = keys(cfg)
    (tasks / "tiny_mc.yaml").write_text("task: tiny_mc\nmetric_list: [{metric: acc_norm}]\n")
    edited_task = keys(cfg)
    assert edited_task[0] != first[0] and edited_task[1] != first[1]
    (tmp_path / "my_scorer.py").write_text("def score(prediction, row):\n    return 0.0\n")
    edited_scorer = keys(cfg)
    assert edited_scorer[0] != edited_task[0] and edited_scorer[1] != edited_task[1]
    shorter = cfg.model_copy(update={"serve": cfg.serve.model_copy(
        update={"engine": cfg.serve.engine.model_copy(update={"max_model_len": 256})})})
    assert base_cache_key(shorter) != edited_scorer[0] and keys(shorter)[2] != edited_scorer[2]


# --- 7: no name writes outside the run dir ------------------------------------------------------------

@pytest.mark.parametrize("override", ["serve.model_id=../../x", "serve.base_model_id=a/b", "serve.model_id=.hidden",
                                      "eval.suites=[{name: ../../x, path: s.jsonl}]"])
def test_names_that_become_file_names_are_refused_at_load(tmp_path, override):
    from sasft_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="becomes a file name in the run dir"):
        load_config("demo", [f"run_dir={tmp_path / 'run'}", override])


def test_the_run_dir_hands_out_no_path_outside_it(tmp_path):
    from sasft_ray.rundir import RunDirError

    rd = RunDir(str(tmp_path / "run"))
    for parts in (("eval", "models", "../../../x.json"), ("/etc", "passwd"), ("eval/../../x",)):
        with pytest.raises(RunDirError, match="not a path inside the run dir"):
            rd.write_text("x", *parts)
    assert list(tmp_path.iterdir()) == []  # nor made the run dir: nothing was written


def test_a_run_dir_is_made_only_when_something_is_written_there(tmp_path):
    """What only reads a run dir (a stage's record, the evaluation's hash, the lock's holder) leaves no folder
    behind; the first write makes the folders it goes in."""
    from sasft_ray.pipeline import eval_hash

    cfg = make_config(tmp_path)
    rd = RunDir(cfg.run_dir)
    eval_hash(cfg, rd)
    assert rd.manifest() == {"stages": {}} and rd.lock_holder() is None and not rd.exists(RESULTS)
    assert not (tmp_path / "run").exists()
    rd.write_json({"scores": {}}, SCORED, "base.json")
    assert rd.read_json(SCORED, "base.json") == {"scores": {}}


# --- 3: no benchmark takes another's scores -------------------------------------------------------------

@pytest.mark.parametrize("suites, message", [
    ("[{name: in-domain, path: s.jsonl}]", "'in-domain' is the task's own held-out benchmark"),
    ("[{name: a, path: s.jsonl}, {name: a, path: t.jsonl}]", "benchmark 'a' is named twice"),
])
def test_a_suite_cannot_take_another_benchmarks_name(tmp_path, suites, message):
    from sasft_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config("demo", [f"run_dir={tmp_path / 'run'}", f"eval.suites={suites}"])


def test_a_suite_folders_files_cannot_take_another_benchmarks_name(tmp_path):
    from sasft_ray.config import EvalSuite
    from sasft_ray.evaluate import EvalError, expand_suites

    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "math.jsonl").write_text("{}\n")
    (tmp_path / "one" / "in-domain.jsonl").write_text("{}\n")
    with pytest.raises(EvalError, match="'in-domain' is the task's own held-out benchmark"):
        expand_suites([EvalSuite(name="g", path=str(tmp_path / "one"))])
    (tmp_path / "one" / "in-domain.jsonl").unlink()
    with pytest.raises(EvalError, match="benchmark 'math' comes from two files"):
        expand_suites([EvalSuite(name="g", path=str(tmp_path / "one")),
                       EvalSuite(name="h", path=str(tmp_path / "two"))])


# --- 9: the evaluation's mistakes found before any stage --------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("eval.indomain_scorers=[exactt]", "unknown scorer 'exactt'"),
    ("eval.indomain_scorers=[]", "at least 1 item"),
    ("eval.suites=[{name: s, path: s.jsonl, scorers: []}]", "at least 1 item"),
])
def test_bad_scorers_are_refused_at_load(tmp_path, override, message):
    from sasft_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config("demo", [f"run_dir={tmp_path / 'run'}", override])


@pytest.mark.parametrize("sections, error, message", [
    ({"eval": {"suites": [{"name": "s", "path": "missing.jsonl"}]}}, "EvalError", "eval suite 's': no file or folder"),
    ({"eval": {"indomain_scorers": ["no_such_module_here:score"]}}, "ScorerError", "cannot be imported"),
    ({"serve": {"api_key_env": "SASFT_TEST_UNSET_KEY"}}, "ServeError", r"\$SASFT_TEST_UNSET_KEY, but it is not set"),
])
def test_evaluation_mistakes_stop_a_run_before_its_first_stage(tmp_path, sections, error, message, monkeypatch):
    from sasft_ray import pipeline

    monkeypatch.delenv("SASFT_TEST_UNSET_KEY", raising=False)
    monkeypatch.setattr(pipeline, "train_all", lambda cfg, rd: pytest.fail("a stage started"))
    cfg = make_config(tmp_path, **sections)
    with pytest.raises(Exception, match=message) as raised:
        pipeline.run(cfg, RunDir(cfg.run_dir))
    assert type(raised.value).__name__ == error and not (tmp_path / "run").exists()


def test_an_ipv6_host_makes_a_bracketed_url(tmp_path):
    from sasft_ray.serve import base_url

    cfg = make_config(tmp_path, serve={"host": "::1", "port": 8001})
    assert base_url(cfg) == "http://[::1]:8001/v1"


# --- 10: one command per run dir, even taking over a dead one's lock ----------------------------------

def _hold(run: str, start, results) -> None:
    """In a process of its own: hold `run` for a second, with reading the lock made slow (the window in
    which two commands both see a dead holder's lock, widened)."""
    import time

    from sasft_ray.rundir import RunDirError

    read = RunDir.lock_holder

    def slow(self):
        found = read(self)
        time.sleep(0.3)
        return found

    RunDir.lock_holder = slow
    start.wait()
    try:
        with RunDir(run).locked():
            began = time.time()
            time.sleep(1.0)
            results.put(("held", began, time.time()))
    except RunDirError:
        results.put(("refused", 0, 0))


def test_two_commands_taking_over_a_dead_lock_never_both_hold_the_run_dir(tmp_path):
    import multiprocessing
    import socket
    import subprocess


    gone = subprocess.Popen(["true"])
    gone.wait()
    rd = RunDir(str(tmp_path / "run"))
    rd.write_json({"stages": {}}, MANIFEST)
    rd.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "token": "dead"}), LOCK)
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_hold, args=(rd.root, start, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    (a, a0, a1), (b, b0, b1) = results.get(timeout=5), results.get(timeout=5)
    assert "held" in (a, b)
    if a == b == "held":
        assert a1 <= b0 or b1 <= a0, "both commands held the run dir at once"
    assert not rd.exists(LOCK)


def test_a_command_releases_only_its_own_lock(tmp_path):

    rd = RunDir(str(tmp_path / "run"))
    with rd.locked():
        rd.write_text(json.dumps({"pid": 1, "token": "another command's"}), LOCK)  # taken over meanwhile
    assert rd.lock_holder()["token"] == "another command's"


# --- 8: every input through the same checks -----------------------------------------------------------

def _rows(tmp_path, path, **data):
    from sasft_ray.data import LoadReport, iter_rows

    cfg = make_config(tmp_path, data_path=path, data={"path": str(path), **data})
    return list(iter_rows(cfg.data, LoadReport()))


def test_a_folder_of_jsonl_files_or_of_split_folders_is_refused_not_merged(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sasft_ray.data import BadRow

    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    for name in ("a", "b"):
        write_demo_task(jsonl / f"{name}.jsonl", n=5)
    with pytest.raises(BadRow, match="a folder must hold .parquet files or a dataset saved"):
        _rows(tmp_path, jsonl)
    table = pa.table({"prompt": ["q"], "completion": ["02134"]})
    hive = tmp_path / "hive"
    for split in ("train", "test"):
        (hive / f"split={split}").mkdir(parents=True)
        pq.write_table(table, hive / f"split={split}" / "part-0.parquet")
    with pytest.raises(BadRow, match="a folder must hold"):
        _rows(tmp_path, hive)
    pq.write_table(table, hive / "top.parquet")  # rows of its own beside the splits: still not merged
    with pytest.raises(BadRow, match=r"holds Parquet files in subfolders too \(split=test, split=train\)"):
        _rows(tmp_path, hive)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadRow, match="a folder must hold"):
        _rows(tmp_path, tmp_path / "empty")


def test_a_saved_dataset_without_the_split_names_the_splits_it_has(tmp_path):
    import datasets

    from sasft_ray.data import BadRow

    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"prompt": "q", "completion": "a"}])}).save_to_disk(
        str(tmp_path / "saved"))
    with pytest.raises(BadRow, match=r"field 'data.split': no split 'train' \(it has test\)"):
        _rows(tmp_path, tmp_path / "saved")
    assert len(_rows(tmp_path, tmp_path / "saved", split="test")) == 1


def test_a_missing_local_path_is_not_tried_as_a_hub_id(tmp_path, monkeypatch):
    import datasets

    from sasft_ray.data import BadRow

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("asked the hub"))
    with pytest.raises(BadRow, match="data/mytask: field 'data.path': no such file or folder"):
        _rows(tmp_path, "data/mytask")


# --- 11: no silent change to the data ---------------------------------------------------------------

@pytest.mark.parametrize("extra, field, message", [
    ({"weight": 0}, "messages[1].weight", "weight 0: every assistant message is trained on"),
    ({"name": "bob"}, "messages[1].name", "speaker names are not supported"),
    ({"tool_calls": [{"id": "1"}]}, "messages[1].tool_calls", "tool calls are not supported"),
])
def test_message_fields_that_would_be_dropped_are_refused(tmp_path, extra, field, message):
    from sasft_ray.data import BadRow

    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", **extra}]}
    (tmp_path / "t.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(BadRow, match=rf"t.jsonl:line 1: field '{re.escape(field)}': {message}"):
        _rows(tmp_path, tmp_path / "t.jsonl")
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 1}]}
    (tmp_path / "t.jsonl").write_text(json.dumps(ok) + "\n")
    assert len(_rows(tmp_path, tmp_path / "t.jsonl")) == 1


def test_rows_differing_only_in_whitespace_fall_on_one_side_of_the_split():
    from sasft_ray.data import is_heldout

    pairs = [([{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}],
              [{"role": "user", "content": f"question  {i}\n"}, {"role": "assistant", "content": f"answer {i} "}])
             for i in range(1000)]
    assert sum(is_heldout(a, 0.2) != is_heldout(b, 0.2) for a, b in pairs) == 0
    assert 150 < sum(is_heldout(a, 0.2) for a, _ in pairs) < 250  # still a split at the fraction asked


# --- 12: one line, naming the path, never a traceback ------------------------------------------------

def _one_line_error(capsys, *args) -> str:
    from sasft_ray.cli import main

    capsys.readouterr()
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_a_run_dir_that_is_not_usable_is_one_line_naming_it(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    assert "is a file, not a folder" in _one_line_error(capsys, "generate", "demo", "--set", f"run_dir={afile}")
    for text in ("{not json", json.dumps(["a list"])):
        (tmp_path / "foreign").mkdir(exist_ok=True)
        (tmp_path / "foreign" / MANIFEST).write_text(text)
        err = _one_line_error(capsys, "generate", "demo", "--set", f"run_dir={tmp_path / 'foreign'}",
                              "--set", "bootstrap=null")
        assert str(tmp_path / "foreign" / MANIFEST) in err
        assert (tmp_path / "foreign" / MANIFEST).read_text() == text
    assert afile.read_text() == "mine\n"


def test_truncated_results_are_one_line_naming_the_file(tmp_path, capsys, endpoint):  # noqa: F811
    _evaluated(tmp_path, endpoint, "a")
    results = tmp_path / "a" / RESULTS
    results.write_text(results.read_text()[:100])
    err = _one_line_error(capsys, "report", str(tmp_path / "a"))
    assert f"{results} is not readable JSON" in err


# --- 13: what serving writes and what a stale endpoint gets ------------------------------------------

def test_serve_keeps_a_serve_config_file_it_did_not_write(tmp_path):
    from sasft_ray.serve import Models, ServeError, write_serve_config

    cfg = make_config(tmp_path)
    models = Models({"finetuned": str(tmp_path / "m"), "base": str(tmp_path / "b")})
    mine = tmp_path / "serve_config.yaml"
    mine.write_text("my own Serve config\n")
    with pytest.raises(ServeError, match="exists and was not written by sasft serve"):
        write_serve_config(cfg, models, str(mine))
    assert mine.read_text() == "my own Serve config\n"
    ours = tmp_path / "ours.yaml"
    write_serve_config(cfg, models, str(ours))
    write_serve_config(cfg, models, str(ours))  # its own earlier file: rewritten
    assert "applications" in ours.read_text()


def test_eval_url_refuses_an_endpoint_started_before_a_retraining(tmp_path, endpoint):  # noqa: F811
    from sasft_ray.pipeline import record_serving, serve_and_eval
    from sasft_ray.serve import ServeError

    cfg, rd = _evaluated(tmp_path, endpoint, "a")
    record_serving(cfg, rd, endpoint)  # `sasft serve` started here
    _finish_training(cfg, rd)  # then `sasft train --force`
    with pytest.raises(ServeError, match="started by `sasft serve` before a model was trained again"):
        serve_and_eval(cfg, rd, endpoint, force=True)
    assert rd.stage_info("eval")["status"] == "done" and rd.exists(RESULTS)
    record_serving(cfg, rd, endpoint)  # restarted: it serves the new training
    assert serve_and_eval(cfg, rd, endpoint, force=True)["models"]


def test_lm_eval_gets_the_key_only_for_its_call_and_never_the_users_own(monkeypatch):
    import os

    from sasft_ray.evaluate import key_for_lm_eval

    monkeypatch.setenv("OPENAI_API_KEY", "the user's own OpenAI key")
    with key_for_lm_eval(KEY):
        assert os.environ["OPENAI_API_KEY"] == KEY
    with key_for_lm_eval(None):  # an endpoint with no key gets none, not the user's
        assert "OPENAI_API_KEY" not in os.environ
    assert os.environ["OPENAI_API_KEY"] == "the user's own OpenAI key"
