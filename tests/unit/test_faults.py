"""Runs you can trust: nothing deleted that the project did not create, no stale result passed off as
new, no lost manifest update, no injected command, bad input named before any work. Each case here
was a way to lose data or get a wrong result; no test in this module needs Ray."""

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sasft_ray.config import ConfigError, load_config
from sasft_ray.data import BadRow, LoadReport, iter_rows
from sasft_ray.generate import build_assets, generate
from sasft_ray.layout import CONFIG, EVENTS, KEPT_DIR, LOCK, MIXED, RAY_TRAIN, SCORED
from sasft_ray.rundir import RunDir, RunDirError, StageChanged
from sasft_ray.tiny import write_demo_task
from tests.conftest import make_config


def _listing(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() if p.is_file() else "/" for p in sorted(folder.rglob("*"))}


def _demo(tmp_path, *overrides: str):
    return load_config("demo", [f"run_dir={tmp_path / 'run'}", *overrides])


# --- data loss -----------------------------------------------------------------------------------

def test_a_lab_is_built_only_where_a_lab_belongs(tmp_path):
    from sasft_ray.lab import build_lab

    models = tmp_path / "models"
    for name in ("my-model", "sibling"):
        (models / name).mkdir(parents=True)
        (models / name / "config.json").write_text(name)
    write_demo_task(tmp_path / "task.jsonl", n=20)
    before = _listing(models)
    # the demo's `bootstrap` kept while model.path and data.path point at the user's own files
    cfg = _demo(tmp_path, f"model.path={models / 'my-model'}", f"data.path={tmp_path / 'task.jsonl'}",
                "bootstrap=lab-small")
    with pytest.raises(ConfigError, match="model.path .* is not where the lab puts it"):
        build_assets(cfg)
    # a lab-shaped model.path in a folder that holds other things
    cfg = _demo(tmp_path, f"model.path={models / 'model'}", f"data.path={models / 'tasks' / 'parity.jsonl'}",
                f"mix.external.path={models / 'external.jsonl'}", f"mix.replay.path={models / 'tasks' / 'house.jsonl'}",
                "bootstrap=lab-small")
    with pytest.raises(ConfigError, match="is not a lab .* nothing in it was touched"):
        build_assets(cfg)
    with pytest.raises(ConfigError, match="is not a lab"):
        build_lab(models, preset="small")
    assert _listing(models) == before


@pytest.mark.parametrize("root", ["", "/", "~", "."])
def test_the_root_home_and_current_folder_are_never_run_dirs(root):
    with pytest.raises(RunDirError, match="a run dir must be a folder of its own"):
        RunDir(root)


def test_a_folder_that_is_not_a_run_dir_is_refused_and_left_as_it_was(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.safetensors").write_text("mine")
    (tmp_path / "report.md").write_text("mine")
    (tmp_path / "eval").mkdir()
    before = _listing(tmp_path)
    write_demo_task(tmp_path.parent / "task.jsonl", n=40)
    cfg = make_config(tmp_path, data_path=tmp_path.parent / "task.jsonl", run_dir=str(tmp_path),
                      train={"method": "sft"})
    with pytest.raises(RunDirError, match="is not a run dir: it holds eval, model, report.md"):
        generate(cfg, RunDir(cfg.run_dir))
    assert _listing(tmp_path) == before


def test_two_commands_on_one_run_dir_the_second_is_refused(tmp_path):
    rd = RunDir(str(tmp_path / "run"))
    other = f"from sasft_ray.rundir import RunDir\nwith RunDir({rd.root!r}).locked(): pass"
    with rd.locked():
        with rd.locked():  # one command holding it twice (a run and its stages) is one hold
            rd._update_stage("task", {"status": "done"})
        proc = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "is in use by another command (pid" in proc.stderr, proc.stderr[-2000:]
        assert rd.stage_info("task") == {"status": "done"}
    assert not rd.exists(LOCK)
    # a lock left behind by a process that is gone (killed, say) is taken over
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    rd.write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout)}), LOCK)
    proc = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "which is gone" in proc.stdout, proc.stderr[-2000:]


def test_manifest_writes_never_share_a_temporary_file(tmp_path):
    rd = RunDir(str(tmp_path / "run"))

    def write(i: int) -> None:
        for j in range(30):
            rd.write_json({"writer": i, "n": j}, f"out-{i}.json")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [rd.read_json(f"out-{i}.json") for i in range(4)] == [{"writer": i, "n": 29} for i in range(4)]
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_grid_does_not_start_a_cell_that_is_running(tmp_path, capsys):
    from sasft_ray.grid import GridSpec, run_grid

    spec = GridSpec(base="demo", run_root=str(tmp_path / "grid"), axes={"train.seed": [0]})
    cell = RunDir(str(tmp_path / "grid" / "seed=0"))
    cell.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}), LOCK)  # alive: this process
    run_grid(spec)
    assert "seed=0: in use by pid" in capsys.readouterr().out


# --- wrong results -------------------------------------------------------------------------------

def _finish_training(cfg, rd):
    """A training record as `sasft train` leaves it (no worker needed to test what reads it)."""
    from sasft_ray.train import train_hash

    rd.begin("train", train_hash(cfg, rd), force=True)
    rd.finish("train", {"steps": 1})


def test_a_stage_redone_upstream_makes_training_and_evaluation_stale(tmp_path):
    from sasft_ray.pipeline import eval_hash
    from sasft_ray.train import train, trained

    write_demo_task(tmp_path / "task.jsonl", n=60)
    cfg = make_config(tmp_path, data_path=tmp_path / "task.jsonl", train={"method": "sft"})
    rd = RunDir(cfg.run_dir)
    generate(cfg, rd)
    _finish_training(cfg, rd)
    assert trained(cfg, rd)
    evaluated = eval_hash(cfg, rd)
    # the same path, other rows, redone on purpose: the mix after it is redone, so the model is stale
    write_demo_task(tmp_path / "task.jsonl", n=80)
    generate(cfg, rd, redo="task")
    with pytest.raises(StageChanged, match="'train' .* from stages redone since; `sasft train --force` redoes it"):
        trained(cfg, rd)
    with pytest.raises(StageChanged, match="'train'"):
        train(cfg, rd)  # refused before any worker, not "done earlier, skipped"
    assert eval_hash(cfg, rd) != evaluated


def test_a_new_training_run_starts_from_a_clean_ray_train_folder(tmp_path):
    from sasft_ray.train import train_outputs

    rd = RunDir(str(tmp_path / "run"))
    rd.begin("train", "aaaa", force=True)  # a run that died mid-way, its checkpoints in train/
    # the same config resumes there, with the checkpoints train.select kept aside
    assert not {RAY_TRAIN, KEPT_DIR} & set(train_outputs(rd, "aaaa", force=False))
    for config_hash, force in (("bbbb", False), ("aaaa", True)):  # another config, or --force: from scratch
        assert {RAY_TRAIN, EVENTS, KEPT_DIR} <= set(train_outputs(rd, config_hash, force))
    rd.finish("train", {})
    assert RAY_TRAIN in train_outputs(rd, "aaaa", force=False)  # a finished run is never resumed


def test_a_refused_or_interrupted_stage_leaves_no_false_marks(tmp_path, monkeypatch):
    write_demo_task(tmp_path / "task.jsonl", n=60)
    cfg = make_config(tmp_path, data_path=tmp_path / "task.jsonl", train={"method": "sft"})
    rd = RunDir(cfg.run_dir)
    generate(cfg, rd)
    saved = rd.read_text(CONFIG)
    changed = cfg.model_copy(update={"data": cfg.data.model_copy(update={"heldout_fraction": 0.3})})
    with pytest.raises(StageChanged):
        generate(changed, rd)
    assert rd.read_text(CONFIG) == saved  # the refused config did not relabel the results

    def crash(*parts):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "remove", lambda self, *parts: crash())
    with pytest.raises(KeyboardInterrupt):
        rd.begin("mix", "cccc", force=True, outputs=(MIXED,))
    assert rd.stage_info("mix")["status"] == "running"  # not "done" with its outputs half gone


def test_serving_or_scoring_an_untrained_run_is_refused(tmp_path):
    from sasft_ray.pipeline import served_models
    from sasft_ray.serve import ServeError

    write_demo_task(tmp_path / "task.jsonl", n=60)
    cfg = make_config(tmp_path, data_path=tmp_path / "task.jsonl", train={"method": "sft"}, compare=["sa-sft"])
    rd = RunDir(cfg.run_dir)
    generate(cfg, rd)
    _finish_training(cfg, rd)  # the main run trained, its compared SA-SFT run not
    with pytest.raises(ServeError, match=r"not trained under this config: sa-sft \(.*compare/sa-sft\)"):
        served_models(cfg, rd)


@pytest.mark.parametrize("override, message", [
    ("serve.model_id=base", "model id 'base' is both serve.model_id and serve.base_model_id"),
    ("compare=[sft, sft]", "model id 'sft' is both compare and compare"),
    ("serve.model_id=sft", "model id 'sft' is both serve.model_id and compare"),
])
def test_two_models_under_one_id_are_refused(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _demo(tmp_path, override)


def test_an_empty_heldout_split_is_refused_before_any_work(tmp_path):
    write_demo_task(tmp_path / "task.jsonl", n=30)
    cfg = make_config(tmp_path, data_path=tmp_path / "task.jsonl", train={"method": "sft"},
                      data={"path": str(tmp_path / "task.jsonl"), "heldout_fraction": 0.0})
    with pytest.raises(BadRow, match=r"data.heldout_fraction=0.0 leaves none of the 30 rows held out"):
        generate(cfg, rd := RunDir(cfg.run_dir))
    assert rd.stage_info("task")["status"] == "failed"


# --- security ------------------------------------------------------------------------------------

def test_grid_overrides_reach_the_job_as_they_are_never_as_commands(tmp_path):
    from sasft_ray.grid import Cell, expand, job_request

    evil = "x'; touch " + str(tmp_path / "pwned") + "; echo '"
    cell = Cell("c", [f"run_dir={tmp_path}/r", f"selftalk.system_prompt={evil}"], None)
    entrypoint = job_request("demo", cell)["entrypoint"]
    assert shlex.split(entrypoint) == ["python", "jobs/job.py", "run", "--config", "demo", "--set", cell.overrides[0],
                                       "--set", cell.overrides[1]]
    subprocess.run(["bash", "-c", "printf '%s\\n' " + entrypoint.removeprefix("python ")], check=True,
                   capture_output=True)
    assert not (tmp_path / "pwned").exists()

    from sasft_ray.grid import GridSpec

    spec = GridSpec(base="demo", run_root=str(tmp_path), axes={"data.path": ["a/task.jsonl", "b/task.jsonl"]})
    with pytest.raises(ConfigError, match="grid cells share a run dir: path=task"):
        expand(spec)


def test_an_open_endpoint_needs_a_key_or_an_explicit_yes(tmp_path):
    with pytest.raises(ConfigError, match="serve.host 0.0.0.0 opens the endpoint to the network with no API key"):
        _demo(tmp_path, "serve.host=0.0.0.0")
    assert _demo(tmp_path, "serve.host=0.0.0.0", "serve.api_key_env=SASFT_KEY").serve.host == "0.0.0.0"
    assert _demo(tmp_path, "serve.host=0.0.0.0", "serve.allow_unauthenticated=true")
    cfg = load_config(str(Path(__file__).parents[2] / "sasft_ray" / "configs" / "cluster" / "llama3-8b.yaml"))
    assert cfg.serve.host == "0.0.0.0" and cfg.serve.api_key_env


# --- bad input, clearly refused ------------------------------------------------------------------

def _rows(path: Path, **data) -> list:
    from sasft_ray.config import DataConfig

    return list(iter_rows(DataConfig(path=str(path), **data), LoadReport()))


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("text, where, message", [
    ('{"messages": ' + "[" * 1000 + "]" * 1000 + "}", "line 2", "nested too deeply"),
    ('{"prompt": "\\ud800", "completion": "x"}', "line 2", "field 'prompt': not valid Unicode"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "assistant", "content": "c"}]}', "line 2", "messages\\[2\\].role': 'assistant' where 'user'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, '
     '{"role": "assistant", "content": "c"}]}', "line 2", "messages\\[1\\].role': 'user' where 'assistant'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "user", "content": "c"}]}', "line 2", "must end on an assistant turn"),
    ('{"prompt": "' + "x" * 3000 + '", "completion": "y"}', "line 2", "longer than data.max_line_bytes=2048"),
])
def test_bad_jsonl_rows_are_named_by_file_line_and_field(tmp_path, text, where, message):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + text + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(BadRow, match=rf"task.jsonl:{where}: .*{message}"):
        _rows(path, max_line_bytes=2048)
    assert len(_rows(path, max_line_bytes=2048, on_bad_row="skip")) == 2  # skip counts it and goes on


def test_bad_json_and_parquet_files_are_named(tmp_path):
    garbage = tmp_path / "task.json"
    garbage.write_text(json.dumps([GOOD, GOOD]) + "\n{oops")
    with pytest.raises(BadRow, match="task.json:line 1: .*text after the array's closing"):
        _rows(garbage)
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really")
    for name in ("empty.parquet", "corrupt.parquet"):
        with pytest.raises(BadRow, match=rf"{name}:row 0: field '<parquet>': not a readable Parquet file"):
            _rows(tmp_path / name)
    pq.write_table(pa.Table.from_pylist([GOOD]), tmp_path / "good.parquet")
    assert len(_rows(tmp_path / "good.parquet")) == 1


@pytest.mark.parametrize("override, message", [
    ("train.lr=.inf", "train.lr: Input should be a finite number"),
    ("mix.self_ratio=.nan", "mix.self_ratio: Input should be a finite number"),
    ("selftalk.oversample=.inf", "selftalk.oversample: Input should be a finite number"),
    ("selftalk.temperature=[1, 2", "override 'selftalk.temperature=\\[1, 2': the value of selftalk.temperature is "
                                   "not valid YAML"),
    ("selftalk.turns=5", "selftalk.turns 5 x \\(max_user_tokens 32 \\+ max_assistant_tokens 32\\) = 320 tokens do "
                         "not fit selftalk.engine.max_model_len 256"),
])
def test_bad_settings_are_config_errors_naming_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _demo(tmp_path, override)


def test_bad_task_data_is_named_before_the_lab_is_built(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GOOD) + "\n{not json\n")
    cfg = _demo(tmp_path, f"data.path={bad}", f"model.path={tmp_path / 'lab' / 'model'}")
    started = time.time()
    with pytest.raises(BadRow, match="bad.jsonl:line 2: field '<json>': malformed JSON"):
        generate(cfg, RunDir(cfg.run_dir))
    assert time.time() - started < 30 and not (tmp_path / "lab").exists()


# --- the evaluation rides out a restarting endpoint -----------------------------------------------

class _Endpoint(BaseHTTPRequestHandler):
    """A stand-in for a Serve endpoint whose replica restarts: `fail` answers 503 first, then replies;
    a prompt containing "TOO LONG" gets vLLM's 400 for a prompt over the context length."""

    fail: list[int] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        if "TOO LONG" in prompt or body["model"] == "refused":
            return self._send(400, {"error": {"message": "maximum context length is 256 tokens", "code": 400}})
        if self.fail and self.fail[0] > 0:
            self.fail[0] -= 1
            return self._send(503, {"error": {"message": "replica restarting"}})
        self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": prompt.upper()}}]})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_eval_retries_a_restarting_endpoint_and_names_a_refused_row_stand_in_endpoint(endpoint, monkeypatch):
    from sasft_ray import evaluate

    monkeypatch.setattr(evaluate, "RETRY_WAITS", (0.01, 0.01, 0.01))
    api = evaluate.client(endpoint, None)
    _Endpoint.fail = [2]  # two 503s, then the replica is back
    assert evaluate.ask(api, "m", {"messages": [{"role": "user", "content": "hi"}]}, 8, "suite row 0") == "HI"
    _Endpoint.fail = [10]  # never back: a bounded number of tries, then an error that says where
    with pytest.raises(evaluate.EvalError, match="m: suite row 0: the endpoint failed 4 times"):
        evaluate.ask(api, "m", {"messages": [{"role": "user", "content": "hi"}]}, 8, "suite row 0")
    _Endpoint.fail = [0]
    rows = [{"messages": [{"role": "user", "content": c}]} for c in ("a", "b", "TOO LONG c")]
    with pytest.raises(evaluate.EvalError, match=r"m: gsm8k row 2: the endpoint refused the request \(400: "
                                                 r".*maximum context length"):
        evaluate.replies(api, "m", rows, 8, 4, "gsm8k")


def test_each_models_scores_are_kept_as_it_finishes_stand_in_endpoint(endpoint, tmp_path, monkeypatch):
    from sasft_ray import evaluate

    monkeypatch.setattr(evaluate, "RETRY_WAITS", (0.01,))
    write_demo_task(tmp_path / "task.jsonl", n=60)
    cfg = make_config(tmp_path, data_path=tmp_path / "task.jsonl", train={"method": "sft"},
                      eval={"indomain_scorers": ["exact"]})
    rd = RunDir(cfg.run_dir)
    generate(cfg, rd)
    _Endpoint.fail = [0]
    with pytest.raises(evaluate.EvalError, match="refused: in-domain row 0: the endpoint refused"):
        evaluate.evaluate_models(cfg, rd, endpoint, {"first": "first", "refused": "refused"}, stage_hash="h1")
    saved = rd.read_json(SCORED, "first.json")
    assert saved["stage_hash"] == "h1" and saved["scores"]["in-domain"]["exact"] == 0.0
    assert not rd.exists(SCORED, "refused.json")
    _Endpoint.fail = [10**6]  # the endpoint down: the re-run of the same evaluation asks nothing of it
    again = evaluate.evaluate_models(cfg, rd, endpoint, {"first": "first"}, stage_hash="h1")
    assert again == {"first": saved["scores"]}
    with pytest.raises(evaluate.EvalError, match="first: in-domain row"):  # another evaluation: scored afresh
        evaluate.evaluate_models(cfg, rd, endpoint, {"first": "first"}, stage_hash="h2")


def test_the_evaluation_serves_its_models_in_waves_and_no_wave_scored_before_a_stop_again_stand_in_endpoint(
        endpoint, tmp_path, monkeypatch):
    """eval.models_at_once 2 of 3 models: two endpoints one after the other, the base model's first; stopped
    during the second, the re-run serves only the second wave again. (Ray Serve's stand-in: the HTTP
    endpoint above, named by every wave.)"""
    from sasft_ray import serve
    from sasft_ray.pipeline import eval_stage, method_runs

    write_demo_task(tmp_path / "task.jsonl", n=60)
    cfg = make_config(tmp_path, data_path=tmp_path / "task.jsonl", train={"method": "sft"}, compare=["freeze"],
                      eval={"indomain_scorers": ["exact"], "models_at_once": 2})
    rd = RunDir(cfg.run_dir)
    for c, r in method_runs(cfg, rd).values():
        generate(c, r)
        _finish_training(c, r)
    served, stopped = [], []

    def start(_, models, fail_on=None):
        served.append(sorted(models.engines))
        if fail_on and fail_on in models.engines:
            raise serve.ServeError("the machine went away")
        return endpoint

    monkeypatch.setattr(serve, "stop", lambda: stopped.append(len(served)))
    monkeypatch.setattr(serve, "start", lambda c, m: start(c, m, fail_on="freeze"))
    _Endpoint.fail = [0]
    with pytest.raises(serve.ServeError):
        eval_stage(cfg, rd, None, None)
    assert served == [["base", "finetuned"], ["freeze"]] and stopped == [1]  # each wave's engines stopped first
    monkeypatch.setattr(serve, "start", start)
    results = eval_stage(cfg, rd, None, None)
    assert served[2:] == [["freeze"]] and stopped == [1, 3]  # the first wave's scores were kept, not redone
    assert set(results["models"]) == {"base", "finetuned", "freeze"}
