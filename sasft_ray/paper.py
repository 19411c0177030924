"""The paper's setting, prepared for a cluster: five Super-NaturalInstructions tasks as task files
and MedText as a general benchmark, for `cluster/grids/paper.yaml`.

The paper fine-tunes on five SuperNI tasks without naming them in what we know of it; these five
are ours (summarization, sentiment, extraction, reading comprehension, commonsense QA: short,
checkable answers in formats of their own). It needs GitHub and the HF hub, so it runs on a machine
that reaches them (where the grid is submitted from: `data/` travels with each job's working dir);
the tests feed the converters rows in the same formats.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

SUPERNI_TASKS = (
    "task1290_xsum_summarization",
    "task363_sst2_polarity_classification",
    "task181_outcome_extraction",
    "task002_quoref_answer_generation",
    "task073_commonsenseqa_answer_generation",
)
SUPERNI_URL = "https://raw.githubusercontent.com/allenai/natural-instructions/master/tasks/{task}.json"
MEDTEXT = "BI55/MedText"  # clinical prompts with reference completions, scored by ROUGE-L


def superni_rows(task: dict) -> Iterator[dict]:
    """One chat row per instance: the task's definition and the input, then the first reference output."""
    definition = " ".join(task["Definition"]).strip()
    for instance in task["Instances"]:
        if not instance["output"]:
            continue
        yield {"messages": [{"role": "user", "content": f"{definition}\n\n{instance['input']}"},
                            {"role": "assistant", "content": instance["output"][0]}]}


def medtext_rows(rows: Iterable[dict]) -> Iterator[dict]:
    """Evaluation rows: the prompt as a user message, the completion as the reference."""
    for row in rows:
        yield {"messages": [{"role": "user", "content": row["Prompt"]}], "reference": row["Completion"]}


def write_once(path: Path, rows: Callable[[], Iterable[dict]]) -> int:
    """Write `path` as JSONL unless it is there already (a re-run fetches only what is missing);
    returns its rows. A crash leaves a `.part` file, never a short `path`."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".part")
        with part.open("w") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows())
        part.rename(path)
    with path.open() as f:
        return sum(1 for _ in f)


def _superni_task(task: str) -> dict:
    with urllib.request.urlopen(SUPERNI_URL.format(task=task), timeout=120) as response:
        return json.load(response)


def _medtext() -> Iterable[dict]:
    from datasets import load_dataset

    return load_dataset(MEDTEXT, split="train")


def prepare(out: Path, tasks: Iterable[str] = SUPERNI_TASKS) -> dict[str, int]:
    """`out/<task>.jsonl` per SuperNI task and `out/general/medtext.jsonl`; returns rows per file."""
    written = {f"{task}.jsonl": write_once(out / f"{task}.jsonl", lambda task=task: superni_rows(_superni_task(task)))
               for task in tasks}
    written["general/medtext.jsonl"] = write_once(out / "general" / "medtext.jsonl", lambda: medtext_rows(_medtext()))
    return written
