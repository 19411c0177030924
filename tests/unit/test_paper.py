"""The paper's data preparation, with stand-ins for GitHub and the HF hub, which cannot be reached here (its
grid, expanded and validated without running it, is in tests/integration/test_paper.py)."""

import json

import pytest

from sasft_ray.config import DataConfig, EvalSuite
from sasft_ray.data import LoadReport, iter_rows
from sasft_ray.evaluate import expand_suites, suite_rows
from sasft_ray.paper import SUPERNI_TASKS, prepare

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
