"""Grid expansion: every combination becomes a validated config with its own run_dir."""

import json
import shlex

import pytest
import yaml

from sasft_ray.cli import main
from sasft_ray.config import ConfigError, absolute_paths
from sasft_ray.grid import expand, load_grid, run_grid, with_changes


def _grid(tmp_path, axes, **extra):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"base": "demo", "run_root": str(tmp_path / "grid"), "axes": axes, **extra}))
    return str(path)


def test_expand_crosses_axes_and_sets_keys_together(tmp_path):
    spec = load_grid(_grid(tmp_path, {"train.method": ["sft", "sa-sft"], "train.seed,mix.seed": [0, 1, 2]},
                           set=["train.lr=0.01"]))
    cells = expand(spec)
    assert len(cells) == 6 and len({c.config.run_dir for c in cells}) == 6
    cell = next(c for c in cells if c.name == "method=sa-sft_seed=2")
    assert cell.config.run_dir == str(tmp_path / "grid" / "method=sa-sft_seed=2")
    assert (cell.config.train.method, cell.config.train.seed, cell.config.mix.seed) == ("sa-sft", 2, 2)
    assert all(c.config.train.lr == 0.01 for c in cells)


def test_grid_typos_fail_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'train.seed'"):
        expand(load_grid(_grid(tmp_path, {"train.sed": [0, 1]})))
    with pytest.raises(ConfigError, match="not a valid grid file"):
        load_grid(_grid(tmp_path, {}))
    with pytest.raises(ConfigError, match=r"grid 'lab-lamda' is neither a file nor a shipped grid \(shipped: .*lab-"):
        load_grid("lab-lamda")


def test_cli_dry_run_lists_cells(tmp_path, capsys):
    assert main(["grid", _grid(tmp_path, {"data.path": ["a/t1.jsonl", "b/t2.jsonl"]}), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["path=t1", "path=t2"]


def test_cli_runs_part_of_a_grid_with_more_overrides_elsewhere(tmp_path, capsys):
    grid = _grid(tmp_path, {"data.path": ["a/t1.jsonl", "b/t2.jsonl"], "train.seed": [0, 1]}, set=["train.lr=0.01"])
    args = ["grid", grid, "--only", "path=t2", "--set", "train.lr=0.02", "--run-root", str(tmp_path / "study")]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["path=t2_seed=0", "path=t2_seed=1"]
    assert all("train.lr=0.02" in line and str(tmp_path / "study" / "path=t2_seed=") in line for line in out)

    spec = with_changes(load_grid(grid), ["train.lr=0.02"], str(tmp_path / "study"))
    (cell,) = expand(spec, only=["seed=1", "path=t1"])
    assert (cell.config.train.lr, cell.config.run_dir) == (0.02, str(tmp_path / "study" / "path=t1_seed=1"))
    with pytest.raises(ConfigError, match="no cell of the grid has all of seed=2"):
        expand(spec, only=["seed=2"])


def test_shipped_lab_grid_is_every_method_by_three_tasks_by_three_seeds():
    cells = expand(load_grid("lab"))
    assert len(cells) == 9 and len({c.config.run_dir for c in cells}) == 9
    assert {c.config.data.path.rsplit("/", 1)[-1] for c in cells} == {"parity.jsonl", "shift.jsonl", "digits.jsonl"}
    seeds = {(c.config.train.seed, c.config.mix.seed, c.config.selftalk.seed) for c in cells}
    assert seeds == {(0, 0, 0), (1, 1, 1), (2, 2, 2)}
    from sasft_ray.methods import METHODS

    assert all(c.config.train.method == "sa-sft" and set(c.config.compare) == set(METHODS) - {"sa-sft"}
               and c.config.export.interpolate == [0.5] for c in cells)


def test_a_finished_cell_is_skipped_and_one_finished_under_other_settings_refused(tmp_path, capsys):
    from sasft_ray.pipeline import eval_hash
    from sasft_ray.rundir import RunDir, StageChanged

    spec = load_grid(_grid(tmp_path, {"train.seed": [0, 1]}))
    for cell in expand(spec):  # as if each cell had been run and evaluated
        rd = RunDir(cell.config.run_dir)
        rd.begin("eval", eval_hash(absolute_paths(cell.config), rd))
        rd.finish("eval", {})
    assert run_grid(spec) == [c.config.run_dir for c in expand(spec)]  # nothing to run: no Ray is started
    assert capsys.readouterr().out.count("done earlier") == 2
    with pytest.raises(StageChanged, match="seed=0 was made with another config.*--run-root"):
        run_grid(with_changes(spec, ["train.lr=0.02"]))


def test_a_cell_finished_from_a_base_model_since_rebuilt_is_refused(tmp_path):
    from sasft_ray.pipeline import eval_hash, eval_inputs
    from sasft_ray.rundir import RunDir, StageChanged

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights, first build")
    spec = load_grid(_grid(tmp_path, {"train.seed": [0]}, set=[f"model.path={model}"]))
    cfg = absolute_paths(expand(spec)[0].config)
    rd = RunDir(cfg.run_dir)
    rd.begin("eval", eval_hash(cfg, rd), inputs=eval_inputs(cfg))
    rd.finish("eval", {})
    assert run_grid(spec) == [cfg.run_dir]  # done: nothing runs
    (model / "model.safetensors").write_bytes(b"weights, rebuilt")  # e.g. a lab of a newer world version
    with pytest.raises(StageChanged, match="other files at model.path.*--run-root"):
        run_grid(spec)


def test_shipped_lambda_study_varies_lambda_alone():
    assert {c.config.train.seed for c in expand(load_grid("lab-lambda"))} == {0, 1}
    cells = expand(load_grid("lab-lambda"), only=["seed=0"])
    assert [c.config.mix.self_ratio for c in cells] == [0.5, 1.0, 2.0]
    rest = [c.config.model_dump(exclude={"run_dir": True, "mix": {"self_ratio"}}) for c in cells]
    assert all(r == rest[0] for r in rest) and cells[0].config.compare == []
    # the pool holds enough self-dialogues for the largest λ (about 90% of max_rows are training rows)
    cfg = cells[-1].config
    assert cfg.selftalk.num_dialogues >= 2.0 * cfg.data.max_rows * (1 - cfg.data.heldout_fraction)


def test_shipped_temperature_study_is_the_lambda_studys_middle_cell_at_other_temperatures():
    (_, middle, _) = expand(load_grid("lab-lambda"), only=["seed=0"])
    cells = expand(load_grid("lab-temperature"), only=["seed=0"])
    assert (middle.config.mix.self_ratio, middle.config.selftalk.temperature) == (1.0, 0.2)
    assert [c.config.selftalk.temperature for c in cells] == [0.7, 1.0]
    same = {"run_dir": True, "selftalk": {"temperature"}}
    assert all(c.config.model_dump(exclude=same) == middle.config.model_dump(exclude=same) for c in cells)


def test_shipped_distinct_study_varies_diversity_alone_at_one_lambda():
    cells = expand(load_grid("lab-distinct"), only=["seed=0"])
    assert [c.config.mix.max_distinct for c in cells] == [45, 90, 180, None]
    rest = [c.config.model_dump(exclude={"run_dir": True, "mix": {"max_distinct"}}) for c in cells]
    assert all(r == rest[0] for r in rest) and cells[0].config.compare == []
    assert cells[-1].config.mix.self_ratio == 1.0


def test_shipped_turns_study_is_the_distinct_studys_last_cell_with_two_exchanges():
    *_, one_exchange = expand(load_grid("lab-distinct"), only=["seed=0"])
    (cell,) = expand(load_grid("lab-turns"), only=["seed=0"])
    assert (one_exchange.config.selftalk.turns, one_exchange.config.mix.max_distinct) == (1, None)
    assert cell.config.selftalk.turns == 2
    same = {"run_dir": True, "selftalk": {"turns"}}
    assert cell.config.model_dump(exclude=same) == one_exchange.config.model_dump(exclude=same)


def test_report_of_a_grid_names_the_cell_not_done_yet(tmp_path, capsys):
    grid = _grid(tmp_path, {"train.seed": [0, 1]})
    assert main(["report", "--grid", grid]) != 0
    assert f"{tmp_path / 'grid' / 'seed=0'}: no eval/results.json" in capsys.readouterr().err


def test_a_submitted_cell_runs_its_overrides_and_carries_no_secret(tmp_path, monkeypatch):
    from sasft_ray.grid import job_request

    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    (cell,) = expand(load_grid(_grid(tmp_path, {"train.seed": [0]})))
    job = job_request("demo", cell)
    # Ray's job API shows a runtime_env in clear: the nodes read HF_TOKEN from the secret store instead
    assert job["runtime_env"] == {"working_dir": "."} and "hf_from_the_environment" not in json.dumps(job)
    assert job["entrypoint"].startswith("python jobs/job.py run --config demo")
    assert shlex.split(job["entrypoint"])[5:7] == ["--set", "train.seed=0"]
