"""The paper's grid: its data preparation (with stand-ins for GitHub and the HF hub, which cannot be
reached here) and its preset, expanded and validated without running it."""

import json
import re
from pathlib import Path

import lm_eval
import pytest

from sasft_ray.config import DataConfig, EvalSuite
from sasft_ray.data import LoadReport, iter_rows
from sasft_ray.evaluate import expand_suites, suite_rows
from sasft_ray.grid import expand, load_grid
from sasft_ray.paper import SUPERNI_TASKS, prepare
from sasft_ray.plan import KNOWN

ROOT = Path(__file__).parents[1]
SUPERNI_TASK = {  # the shape of a task file in allenai/natural-instructions (tasks/<task>.json)
    "Definition": ["Classify the sentiment of the sentence.", "Answer POS or NEG."],
    "Positive Examples": [], "Negative Examples": [],
    "Instances": [{"id": f"t-{i}", "input": f"Sentence {i}: it was fine.", "output": ["POS", "positive"]}
                  for i in range(5)],
}
MEDTEXT_ROWS = [{"Prompt": "A 40-year-old presents with chest pain...", "Completion": "Likely angina; order an ECG."}]


@pytest.fixture
def stand_in_for_github_and_the_hub(monkeypatch):
    fetched = []

    class Response:
        def __init__(self, url):
            fetched.append(url)
            self.body = json.dumps(SUPERNI_TASK).encode()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, *args):
            body, self.body = self.body, b""
            return body

    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: Response(url))
    monkeypatch.setattr("datasets.load_dataset", lambda name, split: fetched.append(name) or MEDTEXT_ROWS)
    return fetched


def test_prepare_writes_task_files_and_the_medtext_suite_with_stand_ins_for_github_and_the_hub(
        tmp_path, stand_in_for_github_and_the_hub):
    fetched = stand_in_for_github_and_the_hub
    assert prepare(tmp_path, SUPERNI_TASKS[:2]) == {f"{t}.jsonl": 5 for t in SUPERNI_TASKS[:2]} | {
        "general/medtext.jsonl": 1}
    assert fetched[0].endswith(f"/tasks/{SUPERNI_TASKS[0]}.json") and fetched[-1] == "BI55/MedText"
    # the task stage and the evaluation read them as they are
    rows = list(iter_rows(DataConfig(path=str(tmp_path / f"{SUPERNI_TASKS[0]}.jsonl")), LoadReport()))
    question = "Classify the sentiment of the sentence. Answer POS or NEG.\n\nSentence 0: it was fine."
    assert len(rows) == 5 and rows[0][1] == [{"role": "user", "content": question},
                                             {"role": "assistant", "content": "POS"}]
    (suite,) = expand_suites([EvalSuite(name="medtext", path=str(tmp_path / "general"), scorers=["rouge_l"])])
    assert suite.name == "medtext" and suite_rows(suite)[0]["reference"] == "Likely angina; order an ECG."
    # a re-run fetches nothing: the files are there
    fetched.clear()
    prepare(tmp_path, SUPERNI_TASKS[:2])
    assert fetched == []


def lm_eval_names() -> set[str]:
    """Task and group names that the installed lm-evaluation-harness defines (its YAML files, read as text)."""
    names = set()
    for file in (Path(lm_eval.__file__).parent / "tasks").rglob("*.yaml"):
        names |= set(re.findall(r"^(?:task|group): *([\w.-]+) *$", file.read_text(errors="ignore"), re.M))
    return names


@pytest.mark.slow
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
