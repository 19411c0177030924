import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from sasft_ray.data import ROW_SCHEMA
from sasft_ray.layout import COMPARE, MANIFEST, MIXED_PART, MONITOR, SELFTALK, TASK_TRAIN
from sasft_ray.methods import MIX_DATA
from sasft_ray.mix import interleave, write_mix
from sasft_ray.rundir import RunDir, StageChanged
from tests.conftest import make_config


def dialogue(text):
    return [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]


def prepare(tmp_path, task_rows=1200, self_rows=900, external_rows=0, **sections):
    """A run directory whose earlier stages are done, with data written the way they write it."""
    cfg = make_config(tmp_path, **sections)
    rd = RunDir(cfg.run_dir)
    rd.fs.create_dir(rd.local("task"))
    pq.write_table(pa.Table.from_pylist(
        [{"messages": dialogue(f"task {i}"), "source_row": i} for i in range(task_rows)], ROW_SCHEMA),
        rd.local(TASK_TRAIN))
    rd.fs.create_dir(rd.local(SELFTALK))
    reasons = ["" if i % 10 else "truncated" for i in range(self_rows)]
    for part in range(3):  # several files, like Ray Data writes
        pq.write_table(pa.Table.from_pylist(
            [{"id": i, "messages": dialogue(f"self {i}"), "drop_reason": reasons[i]}
             for i in range(part, self_rows, 3)]), rd.local(SELFTALK, f"{part}.parquet"))
    for folder in MIX_DATA:  # external-mix's and replay's general data
        rd.fs.create_dir(rd.local(folder))
        pq.write_table(pa.Table.from_pylist(
            [{"messages": dialogue(f"{folder} {i}"), "source_row": i} for i in range(external_rows)], ROW_SCHEMA),
            rd.local(folder, "train.parquet"))
    for stage, info in {"task": {"train_rows": task_rows},
                        "selftalk": {"survived": reasons.count("")},
                        **{folder: {"train_rows": external_rows} for folder in MIX_DATA}}.items():
        rd.begin(stage, "test")
        rd.finish(stage, info)
    return cfg, rd


def mixed_rows(cfg, rd):
    counts = write_mix(cfg, rd)
    return pq.read_table(rd.local(MIXED_PART)).to_pylist(), counts


def test_ratio_holds_overall_and_in_every_window(tmp_path):
    cfg, rd = prepare(tmp_path, mix={"self_ratio": 0.5}, selftalk={"num_dialogues": 800})
    rows, counts = mixed_rows(cfg, rd)
    sources = [r["source"] for r in rows]
    assert len(rows) == 1800 and sources.count("self") == 600 and counts["achieved_ratio"] == 0.5
    for start in range(0, 1800 - 300, 150):
        window = sources[start:start + 300]
        assert window.count("self") / window.count("task") == pytest.approx(0.5, rel=0.05)
    assert all(r["id"] % 10 for r in rows if r["source"] == "self")  # dropped rows never come back
    assert len({(r["source"], r["id"]) for r in rows}) == len(rows)  # no row twice


def test_same_seed_same_mix_other_seed_other_mix(tmp_path):
    cfg, rd = prepare(tmp_path, mix={"self_ratio": 0.5})
    first, _ = mixed_rows(cfg, rd)
    again, _ = mixed_rows(cfg, rd)
    assert first == again
    other = make_config(tmp_path, mix={"self_ratio": 0.5, "seed": 1})
    reseeded, _ = mixed_rows(other, rd)
    assert reseeded != first and len(reseeded) == len(first)


def test_ratio_is_capped_by_survivors_only_and_says_so(tmp_path, capsys):
    cfg, rd = prepare(tmp_path, task_rows=100, self_rows=50, mix={"self_ratio": 3.0})
    rows, counts = mixed_rows(cfg, rd)
    assert counts["mixed_in_rows"] == 45 and len(rows) == 145  # 50 generated, every 10th truncated
    assert "wanted 300 self rows for self_ratio=3.0, only 45 available" in capsys.readouterr().out


def test_lambda_sets_the_self_rows_whatever_the_task_size(tmp_path):
    """λ 1 on a task of 1,200 rows mixes in 1,200 self-dialogues: the pool is sized by λ, not by a default
    num_dialogues (1,000 once, which trained every task over 1,000 rows at λ < 1 without a word)."""
    cfg, rd = prepare(tmp_path, task_rows=1200, self_rows=2000)
    assert cfg.selftalk.num_dialogues is None and cfg.selftalk_wanted(1200) == (1200, 0)
    rows, counts = mixed_rows(cfg, rd)
    assert counts["mixed_in_rows"] == 1200 and counts["achieved_ratio"] == 1.0 and len(rows) == 2400
    for ratio in (0.5, 2.0):  # one pool, several λ: each takes its own count from it
        _, counts = mixed_rows(make_config(tmp_path, mix={"self_ratio": ratio}, selftalk={"num_dialogues": 2400}), rd)
        assert counts["mixed_in_rows"] == min(round(ratio * 1200), 1800)


def test_dialogues_wanted_follow_lambda_unless_set():
    def wanted(task_rows=1200, **sections):
        return make_config(Path("/tmp/unused"), **sections).selftalk_wanted(task_rows)

    monitor = {"heldout_fraction": 0.05}
    assert wanted(selftalk=monitor) == (1200, 60)
    assert wanted(selftalk=monitor, mix={"self_ratio": 2.0}) == (2400, 120)
    assert wanted(selftalk=monitor, mix={"max_distinct": 90}) == (90, 5)  # repeated to λ by the mix
    assert wanted(selftalk={**monitor, "num_dialogues": 5000}) == (5000, 250)  # set: as many (a pool for λ grids)
    assert wanted(selftalk=monitor, train={"method": "sft"}) == (0, 60)  # the monitor only


def test_a_pool_smaller_than_lambda_takes_is_refused_before_any_self_talk(tmp_path):
    """Once the task's size is known (its stage done) and before an engine starts: the key, both numbers."""
    from sasft_ray.config import ConfigError
    from sasft_ray.generate import generate

    task = tmp_path / "task.jsonl"
    task.write_text("".join(f'{{"prompt": "q {i}", "completion": "a {i}"}}\n' for i in range(400)))
    cfg = make_config(tmp_path, data_path=task, selftalk={"num_dialogues": 300}, mix={"self_ratio": 1.0})
    with pytest.raises(ConfigError) as refused:
        generate(cfg, rd := RunDir(cfg.run_dir))
    rows = rd.stage_info("task")["train_rows"]
    assert 300 < rows < 400
    assert str(refused.value).startswith(f"selftalk.num_dialogues 300 is fewer than the {rows} self-dialogues "
                                         f"the mix takes: mix.self_ratio 1.0 x {rows} task training rows")
    assert set(rd.manifest()["stages"]) == {"task"}  # no self-talk, no mix
    distinct = make_config(tmp_path, data_path=task, selftalk={"num_dialogues": 300}, mix={"max_distinct": 300})
    assert distinct.check_dialogues(rows) is None  # 300 distinct, repeated to λ: enough
    with pytest.raises(ConfigError, match=r"fewer than the 301 .* \(mix.max_distinct 301\)"):
        make_config(tmp_path, data_path=task, selftalk={"num_dialogues": 300},
                    mix={"max_distinct": 301}).check_dialogues(rows)


def test_max_distinct_repeats_fewer_dialogues_to_keep_the_ratio(tmp_path):
    cfg, rd = prepare(tmp_path, task_rows=100, self_rows=900, mix={"self_ratio": 1.0, "max_distinct": 8})
    rows, counts = mixed_rows(cfg, rd)
    self_ids = [r["id"] for r in rows if r["source"] == "self"]
    assert len(self_ids) == 100 and counts["mixed_in_distinct"] == 8 and len(set(self_ids)) == 8
    assert sorted(self_ids.count(i) for i in set(self_ids)) == [12] * 4 + [13] * 4  # in turn, not at random
    passes = [self_ids[k:k + 8] for k in range(0, 96, 8)]
    assert all(sorted(p) == sorted(passes[0]) for p in passes) and len(set(map(tuple, passes))) > 1  # reshuffled
    unrepeated = [r["id"] for r in mixed_rows(make_config(tmp_path, mix={"self_ratio": 1.0}), rd)[0]
                  if r["source"] == "self"]
    assert len(unrepeated) == len(set(unrepeated)) == 100


@pytest.mark.parametrize("method, source", [("sft", None), ("freeze", None), ("external-mix", "external"),
                                            ("replay", "replay"), ("sa-sft", "self"), ("sft-matched", "repeat")])
def test_each_method_mixes_in_its_own_data(tmp_path, method, source):
    data = {source: {"path": "unused.jsonl"}} if source in MIX_DATA else {}
    cfg, rd = prepare(tmp_path, task_rows=200, external_rows=300, train={"method": method},
                      mix={"self_ratio": 1.0, **data})
    rows, _ = mixed_rows(cfg, rd)
    mixed_in = {r["source"] for r in rows} - {"task"}
    assert mixed_in == ({source} if source else set())
    assert len(rows) == cfg.mix_rows(200) == (400 if source else 200)


def test_sft_matched_trains_on_as_many_rows_as_sa_sft_the_task_rows_repeated_in_turn(tmp_path):
    """The compute-matched control at λ 2.5: 200 task rows and 500 more, each task row twice in the repeats
    and half of them a third time, the same row count (so the same optimizer steps) as SA-SFT at λ 2.5."""
    cfg, rd = prepare(tmp_path, task_rows=200, train={"method": "sft-matched"}, mix={"self_ratio": 2.5})
    rows, counts = mixed_rows(cfg, rd)
    repeats = [r["id"] for r in rows if r["source"] == "repeat"]
    task = {r["id"] for r in rows if r["source"] == "task"}
    assert len(rows) == 700 == cfg.mix_rows(200) and counts["mixed_in_rows"] == 500
    assert set(repeats) == task and sorted(repeats.count(i) for i in task) == [2] * 100 + [3] * 100
    sa_sft = cfg.model_copy(update={"train": cfg.train.model_copy(update={"method": "sa-sft"})})
    assert sa_sft.mix_rows(200) == cfg.mix_rows(200)


def test_interleave_spreads_evenly():
    out = "".join(interleave((iter("a" * 6), 6), (iter("b" * 3), 3)))
    assert out == "abaabaaba"


def test_weighted_sources_join_the_mix_at_their_exact_counts_and_in_every_window(tmp_path):
    """mix.sources beside the task (here with plain SFT, so no self-talk): each source read and checked
    like the task data, then mixed in at round(weight x task rows) rows, the short one repeated in turn,
    spread evenly; and a bad row in a source stops the run naming its file."""
    import json

    from sasft_ray.config import ConfigError, validate_config
    from sasft_ray.data import BadRow
    from sasft_ray.generate import generate

    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    task = write("task.jsonl", [{"prompt": f"task {i}", "completion": "ok"} for i in range(400)])
    replay = write("replay.jsonl", [{"prompt": f"replay {i}", "completion": "ok"} for i in range(1000)])
    second = write("second.jsonl", [{"instruction": f"second {i}", "output": "ok"} for i in range(50)])
    sources = [{"path": replay, "weight": 0.5}, {"path": second, "weight": 0.25}]
    cfg = make_config(tmp_path, data_path=task, train={"method": "sft"}, mix={"sources": sources})
    rd = RunDir(cfg.run_dir)
    generate(cfg, rd)
    rows = pq.read_table(rd.local(MIXED_PART)).to_pylist()
    task_rows = rd.stage_info("task")["train_rows"]
    kinds = [r["source"] for r in rows]
    assert kinds.count("source0") == round(0.5 * task_rows) and kinds.count("source1") == round(0.25 * task_rows)
    assert rd.stage_info("mix")["rows_out"] == len(rows) == task_rows + kinds.count("source0") + kinds.count("source1")
    assert len(rows) == cfg.mix_rows(task_rows)  # what `sasft plan` counts
    assert len({r["id"] for r in rows if r["source"] == "source0"}) == round(0.5 * task_rows)  # no replay row twice
    assert len({r["id"] for r in rows if r["source"] == "source1"}) == 50  # 90 rows from 50: repeated in turn
    for start in range(0, len(rows) - 140, 70):  # every stretch holds the sources in their ratio
        window = kinds[start:start + 140]
        assert window.count("source0") / window.count("task") == pytest.approx(0.5, abs=0.08)
    assert rd.stage_info("sources")["train_rows"] == [1000, 50]

    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "completion": "ok"}\n{"prompt": 3, "completion": "ok"}\n')
    bad = make_config(tmp_path / "b", data_path=task, train={"method": "sft"},
                      mix={"sources": [{"path": str(tmp_path / "bad.jsonl"), "weight": 1}]})
    with pytest.raises(BadRow, match=r"bad.jsonl.*line 2"):
        generate(bad, RunDir(bad.run_dir))
    with pytest.raises(ConfigError, match="mix.sources.0.weight"):
        validate_config({"run_dir": str(tmp_path / "c"), "model": {"path": "m"}, "data": {"path": task},
                         "mix": {"sources": [{"path": replay, "weight": 0}]}})


def test_a_compare_run_measures_the_main_runs_monitor_dialogues_without_an_engine(tmp_path):
    from sasft_ray.generate import TooFewSurvivors, generate
    from sasft_ray.pipeline import method_runs

    task = tmp_path / "task.jsonl"
    task.write_text("".join(f'{{"prompt": "q {i}", "completion": "a {i}"}}\n' for i in range(40)))
    cfg = make_config(tmp_path, data_path=task, compare=["sft"], selftalk={"heldout_fraction": 0.1})
    main = RunDir(cfg.run_dir)
    sft, rd = method_runs(cfg, main)["sft"]
    assert sft.selftalk.monitor_from == cfg.run_dir and sft.selftalk_wanted(36) == (0, 4)
    assert rd.root == sft.run_dir == f"{cfg.run_dir}/{COMPARE}/sft"
    with pytest.raises(TooFewSurvivors, match="no forgetting-monitor dialogues"):
        generate(sft, rd)  # the main run has not written its monitor yet: nothing is generated in its place
    pq.write_table(pa.Table.from_pylist([{"id": i, "messages": dialogue(f"self {i}")} for i in range(7)]),
                   main.local(MONITOR))
    main.begin("selftalk", "test")
    main.finish("selftalk", {"heldout": 7})
    generate(sft, rd)
    assert pq.read_table(rd.local(MONITOR)).equals(pq.read_table(main.local(MONITOR)))
    assert rd.stage_info("selftalk")["heldout"] == 7 and rd.stage_info("mix")["mixed_in_rows"] == 0
    first = rd.stage_info("selftalk")["id"]
    generate(sft, rd)
    assert rd.stage_info("selftalk")["id"] == first  # done: not copied again
    # the run dir copied elsewhere: the compared run resumes there too (its stages hash the dialogues, not a path)
    shutil.copytree(cfg.run_dir, tmp_path / "moved")
    moved_cfg = cfg.model_copy(update={"run_dir": str(tmp_path / "moved")})
    moved_sft, moved = method_runs(moved_cfg, RunDir(moved_cfg.run_dir))["sft"]
    generate(moved_sft, moved)
    assert moved.stage_info("selftalk")["id"] == first and moved.stage_info("mix") == rd.stage_info("mix")
    manifest = rd.manifest()  # as runs before 2026-12-07 recorded it, with the main run's path: still finished
    source_id = main.stage_info("selftalk")["id"]
    manifest["stages"]["selftalk"]["config_hash"] = f"{sft.section_hash('model')}:from:{main.root}:{source_id}"
    rd.write_json(manifest, MANIFEST)
    generate(sft, rd)
    assert rd.stage_info("selftalk")["id"] == first
    main.begin("selftalk", "test", force=True)
    main.finish("selftalk", {"heldout": 7})  # the main run's self-talk redone: the copy is stale
    with pytest.raises(StageChanged):
        generate(sft, rd)
    generate(sft, rd, redo="selftalk")
    assert rd.stage_info("selftalk")["id"] != first


def test_replay_reads_its_general_data_as_a_stage_of_its_own_and_mixes_it_in_at_lambda(tmp_path):
    """method replay: mix.replay checked and written like the task data (its own stage, its file fingerprinted),
    then round(λ x task rows) of its rows mixed in; an edited replay file is not passed off as the old one."""
    from sasft_ray.generate import generate

    task = tmp_path / "task.jsonl"
    task.write_text("".join(f'{{"prompt": "task {i}", "completion": "ok"}}\n' for i in range(200)))
    general = tmp_path / "general.jsonl"
    general.write_text("".join(f'{{"prompt": "general {i}", "completion": "Sure! {i}"}}\n' for i in range(500)))
    cfg = make_config(tmp_path, data_path=task, train={"method": "replay"},
                      mix={"self_ratio": 0.5, "replay": {"path": str(general)}})
    rd = RunDir(cfg.run_dir)
    generate(cfg, rd)
    rows = pq.read_table(rd.local(MIXED_PART)).to_pylist()
    task_rows = rd.stage_info("task")["train_rows"]
    replayed = [r for r in rows if r["source"] == "replay"]
    assert rd.stage_info("replay")["train_rows"] == 500 and "external" not in rd.manifest()["stages"]
    assert len(replayed) == len({r["id"] for r in replayed}) == round(0.5 * task_rows) == rd.stage_info("mix")[
        "mixed_in_rows"]
    assert all(r["messages"][0]["content"].startswith("general ") for r in replayed)
    first = rd.stage_info("replay")["id"]
    generate(cfg, rd)
    assert rd.stage_info("replay")["id"] == first  # done: not read again
    general.write_text(general.read_text() + '{"prompt": "one more", "completion": "Sure!"}\n')
    with pytest.raises(StageChanged, match="mix.replay.path"):
        generate(cfg, rd)


def test_the_mix_depends_on_the_rows_not_on_the_order_their_files_were_written_in(tmp_path):
    """Ray Data numbers a stage's files as its blocks finish: the same rows, written as blocks that finished
    the other way round, mix in the same order (sdft's rewrites, all replaced, train as plain SFT does)."""
    mixes = []
    for name, parts in (("in-order", [range(0, 450), range(450, 900)]), ("swapped", [range(450, 900), range(0, 450)])):
        cfg, rd = prepare(tmp_path / name, task_rows=300, self_rows=900, mix={"self_ratio": 1.0})
        for path in rd.fs.get_file_info(pafs.FileSelector(rd.local(SELFTALK))):
            rd.fs.delete_file(path.path)
        for number, ids in enumerate(parts):
            pq.write_table(pa.Table.from_pylist([{"id": i, "messages": dialogue(f"self {i}"), "drop_reason": ""}
                                                 for i in ids]), rd.local(SELFTALK, f"{number:06}.parquet"))
        rows, _ = mixed_rows(cfg, rd)
        mixes.append([(r["source"], r["id"]) for r in rows])
    assert mixes[0] == mixes[1] and len(mixes[0]) == 600
