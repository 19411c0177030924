"""`sasft grid`: a grid of runs from one base config, run here or submitted as Ray jobs.

A grid file names a base config, fixed overrides, and axes; every combination of axis
values is one run with its own run_dir under `run_root`:

    base: demo                     # a shipped config or a YAML path
    run_root: runs/lab-grid
    set: [selftalk.num_dialogues=400]
    axes:
      data.path: [runs/lab/tasks/a.jsonl, runs/lab/tasks/b.jsonl]
      train.seed,mix.seed,selftalk.seed: [0, 1, 2]   # one axis setting several keys together

Cells evaluated with the same settings are skipped, so a grid resumes where it stopped;
`sasft report` (run at the end) pools every cell. `--only path=parity` runs part of a grid,
`--set` and `--run-root` change it for one study without copying the file.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
from dataclasses import dataclass

import yaml
from pydantic import BaseModel, ConfigDict, Field

from sasft_ray.config import Config, ConfigError, load_config, resolve_config_path


class GridSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str
    run_root: str
    set: list[str] = Field(default_factory=list)
    axes: dict[str, list] = Field(min_length=1)


@dataclass
class Cell:
    name: str  # its axis settings joined by "_", e.g. seed=0_path=parity
    overrides: list[str]
    config: Config


def load_grid(name_or_path: str) -> GridSpec:
    """A grid YAML file, or the name of a grid shipped in `sasft_ray/configs/grids/`."""
    file = resolve_config_path(name_or_path, "grid")
    try:
        return GridSpec.model_validate(yaml.safe_load(file.read_text()))
    except Exception as e:  # YAML and schema errors alike: name the file
        raise ConfigError(f"{file}: not a valid grid file: {e}") from None


def _slug(value) -> str:
    """A path or hub id by its last part, less a data file's extension: parity, Qwen2.5-7B-Instruct."""
    text = re.sub(r"\.(jsonl|json|parquet)$", "", str(value).rsplit("/", 1)[-1])
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text)


def with_changes(spec: GridSpec, overrides: list[str] = (), run_root: str | None = None) -> GridSpec:
    """The grid with more overrides (after its own, so they win) and, optionally, another run_root."""
    return spec.model_copy(update={"set": [*spec.set, *overrides], "run_root": run_root or spec.run_root})


def expand(spec: GridSpec, only: list[str] = ()) -> list[Cell]:
    """Every combination of axis values, validated now: a typo fails before the first run.
    `only`: keep the cells that have every one of these axis settings (e.g. "path=parity")."""
    cells = []
    for values in itertools.product(*spec.axes.values()):
        overrides, parts = list(spec.set), []
        for keys, value in zip(spec.axes, values):
            # JSON is YAML: the override parses back to exactly this value
            overrides += [f"{key.strip()}={json.dumps(value)}" for key in keys.split(",")]
            parts.append(f"{keys.split(',')[0].split('.')[-1]}={_slug(value)}")
        if not set(only) <= set(parts):
            continue
        name = "_".join(parts)
        overrides.append(f"run_dir={json.dumps(f'{spec.run_root}/{name}')}")
        cells.append(Cell(name, overrides, load_config(spec.base, overrides)))
    if not cells:
        raise ConfigError(f"no cell of the grid has all of {', '.join(only)}; see `sasft grid GRID --dry-run`")
    names = [c.name for c in cells]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # e.g. a/task.jsonl and b/task.jsonl: one run dir would hold two cells' results
        raise ConfigError(f"grid cells share a run dir: {', '.join(twice)}; give the axis values distinct last parts")
    return cells


def run_grid(spec: GridSpec, address: str | None = None, only: list[str] = ()) -> list[str]:
    """Run every cell here (in turn) or, with a Ray address, submit each as a Ray job."""
    from sasft_ray.pipeline import eval_hash, eval_inputs, run
    from sasft_ray.rundir import RunDir, StageChanged

    cells = expand(spec, only)
    # Before any cell runs: a cell finished under other settings is refused, not passed off as done.
    try:
        rundirs = [RunDir(c.config.run_dir) for c in cells]
        finished = [rd.finished("eval", eval_hash(c.config, rd), eval_inputs(c.config))
                    for c, rd in zip(cells, rundirs)]
    except StageChanged as e:
        raise StageChanged(f"{e} (for a grid: --run-root)") from None
    for i, (cell, rd, done) in enumerate(zip(cells, rundirs, finished), 1):
        if done:
            print(f"[grid] {i}/{len(cells)} {cell.name}: done earlier")
            continue
        holder = rd.lock_holder()
        if holder is not None:  # running now (here or as a job): not started twice
            print(f"[grid] {i}/{len(cells)} {cell.name}: in use by pid {holder.get('pid')} on "
                  f"{holder.get('host')}, not started again")
            continue
        if address:
            submit(address, spec.base, cell)
        else:
            print(f"[grid] {i}/{len(cells)} {cell.name}")
            run(cell.config, rd)
    return [c.config.run_dir for c in cells]


def job_request(base: str, cell: Cell) -> dict:
    """What `submit` sends for a cell: `jobs/job.py run` with the cell's overrides, run in this working dir. No
    secret: a job's runtime_env is shown in clear by Ray's job API and dashboard; the nodes take HF_TOKEN
    from the cloud's secret store as they start (the cluster files, `sasft_ray/secret_store.py`)."""
    entrypoint = shlex.join(["python", "jobs/job.py", "run", "--config", base,
                             *[arg for o in cell.overrides for arg in ("--set", o)]])
    return {"entrypoint": entrypoint, "runtime_env": {"working_dir": "."}}


def submit(address: str, base: str, cell: Cell) -> str:
    """One Ray job per cell."""
    from ray.job_submission import JobSubmissionClient

    job_id = JobSubmissionClient(address).submit_job(**job_request(base, cell))
    print(f"[grid] {cell.name}: submitted as {job_id}")
    return job_id
