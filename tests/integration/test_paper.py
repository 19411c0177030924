"""The paper's preset: its grid expanded and validated without running it, its evals named as lm-eval
knows them."""

import re
from pathlib import Path

import lm_eval

from sasft_ray.grid import expand, load_grid
from sasft_ray.paper import SUPERNI_TASKS
from sasft_ray.plan import KNOWN

ROOT = Path(__file__).parents[2]


def lm_eval_names() -> set[str]:
    """Task and group names that the installed lm-evaluation-harness defines (its YAML files, read as text)."""
    names = set()
    for file in (Path(lm_eval.__file__).parent / "tasks").rglob("*.yaml"):
        names |= set(re.findall(r"^(?:task|group): *([\w.-]+) *$", file.read_text(errors="ignore"), re.M))
    return names


def test_the_paper_grid_expands_to_its_setting():
    cells = expand(load_grid(str(ROOT / "cluster" / "grids" / "paper.yaml")))
    assert len(cells) == 2 * 5 * 3 and len({c.config.run_dir for c in cells}) == 30
    assert {c.config.model.path for c in cells} == {"meta-llama/Meta-Llama-3-8B-Instruct", "Qwen/Qwen2.5-7B-Instruct"}
    assert all(c.config.model.path in KNOWN for c in cells)  # `sasft plan` knows their shapes
    # the data paths are the files the preparation job writes
    assert {Path(c.config.data.path).name for c in cells} == {f"{t}.jsonl" for t in SUPERNI_TASKS}
    cfg = cells[0].config
    assert cfg.train.method == "sa-sft" and cfg.compare == ["sft", "freeze", "external-mix"]
    assert cfg.mix.external.path == "tatsu-lab/alpaca" and cfg.resources.use_gpu
    assert [s.scorers for s in cfg.eval.suites] == [["rouge_l"]]
    assert Path(cfg.eval.suites[0].path) == Path("data/paper/general")
    tasks = {t for group in cfg.eval.lm_eval for t in group.tasks}
    assert tasks == {"gsm8k", "mmlu", "ifeval", "agieval_en"} and tasks <= lm_eval_names()
