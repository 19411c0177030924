"""What `sasft` prints: its own progress lines, the libraries' logs only when verbose."""

import logging
import time
import warnings

from sasft_ray import session
from sasft_ray.generate import selftalk_progress
from sasft_ray.layout import EVENTS
from sasft_ray.rundir import RunDir
from sasft_ray.train import latest_progress, log_event


def test_progress_prints_each_new_line_once_and_survives_a_failing_probe(capsys):
    said = iter(["a", "a", RuntimeError("file half written"), "b", "b", "b", "b", "b", "b", "b", "b", "b", "b"])

    def line():
        value = next(said)
        if isinstance(value, Exception):
            raise value
        return value

    with session.progress(line, every=0.02):
        time.sleep(0.3)
    assert capsys.readouterr().out.splitlines() == ["a", "b"]


def test_quiet_silences_the_libraries_unless_verbose(monkeypatch):
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    for name in ("ray.data", "vllm"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.INFO)
    monkeypatch.setenv(session.VERBOSE, "1")
    session.quiet()
    assert logging.getLogger("ray.data").getEffectiveLevel() == logging.INFO
    monkeypatch.setenv(session.VERBOSE, "0")
    session.quiet()
    assert logging.getLogger("ray.data").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("vllm").getEffectiveLevel() == logging.ERROR
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("old API", DeprecationWarning, "x.py", 1, module="torch.distributed")
        warnings.warn_explicit("ours", UserWarning, "x.py", 1, module="sasft_ray.train")
    assert [str(w.message) for w in caught] == ["ours"]  # the project's own warnings still show


def test_the_driver_reads_training_progress_from_the_events(tmp_path):
    rd = RunDir(str(tmp_path / "run"))
    assert latest_progress(rd, 100) is None
    log_event(rd, event="started", step=0, nodes=["n1", "n1"])
    assert latest_progress(rd, 100) == "[train] started at step 0 on 1 node(s)"
    log_event(rd, event="log", step=50, loss=0.5, grad_norm=1.0, lr=1e-4, tokens_per_s_per_gpu=900.0, eta_s=60)
    line = latest_progress(rd, 100)
    assert line.startswith("[train] ##########.......... step 50/100: loss 0.5000") and "ETA 1.0 min" in line
    assert rd.exists(EVENTS)


def test_selftalk_progress_counts_finished_dialogues_capped_at_the_total():
    assert selftalk_progress(lambda: 0, 10, time.time()).startswith("[selftalk] .................... 0/10 dialogues")
    line = selftalk_progress(lambda: 4, 10, time.time() - 20)
    assert " 4/10 dialogues in 20 s, ETA 0.5 min" in line
    assert " 10/10 dialogues" in selftalk_progress(lambda: 12, 10, time.time() - 20)  # a retried batch counted twice


def test_a_stage_stopped_by_its_first_batch_is_told_by_the_engines_message():
    """Ray Data hands the driver its own exception with the engine's traceback as text."""
    from sasft_ray.generate import cut_message

    wrapped = RuntimeError("ray.exceptions.UserCodeException: UDF failed\n  File selftalk.py, in check_cuts\n"
                           "sasft_ray.selftalk.SelfTalkCut: self-talk stopped after its first batch: 15 of its 16\n"
                           "\nThe above exception was the direct cause of the following exception:")
    assert cut_message(wrapped) == "self-talk stopped after its first batch: 15 of its 16"
    assert cut_message(RuntimeError("an engine died")) is None
