"""The paper's setting, prepared for a cluster: five Super-NaturalInstructions tasks as task files
and MedText as a general benchmark, for `cluster/grids/paper.yaml`.

The paper fine-tunes on five SuperNI tasks without naming them in what we know of it; these five
are ours (summarization, sentiment, extraction, reading comprehension, commonsense QA: short,
checkable answers in formats of their own). It needs the internet (GitHub and the HF hub), so it
runs where a cluster's jobs run; the tests feed the converters rows in the same formats.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

SUPERNI_TASKS = (
    "task1290_xsum_summarization",
    "task363_sst2_polarity_classification",
    "task181_outcome_extraction",
    "task002_quoref_answer_generation",
    "task073_commonsenseqa_answer_generation",
)
SUPERNI_URL = "https://raw.githubusercontent.com/allenai/natural-instructions/master/tasks/{task}.json"
MEDTEXT = "BI55/MedText"  # 1.4k clinical prompts with reference completions, scored by ROUGE-L


def superni_rows(task: dict) -> Iterator[dict]:
    """One chat row per instance: the task's definition and the input, then the first reference output."""
    definition = " ".join(task["Definition"]).strip()
    for instance in task["Instances"]:
        yield {"messages": [{"role": "user", "content": f"{definition}\n\n{instance['input']}"},
                            {"role": "assistant", "content": instance["output"][0]}]}


def medtext_rows(rows: Iterable[dict]) -> Iterator[dict]:
    """Evaluation rows: the prompt as a user message, the completion as the reference."""
    for row in rows:
        yield {"messages": [{"role": "user", "content": row["Prompt"]}], "reference": row["Completion"]}


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def prepare(out: Path, tasks: Iterable[str] = SUPERNI_TASKS) -> dict[str, int]:
    """Download and write `out/<task>.jsonl` per task and `out/general/medtext.jsonl`; returns rows per file.
    A file already there is kept: a re-run fetches only what is missing."""
    written = {}
    for task in tasks:
        path = out / f"{task}.jsonl"
        if not path.exists():
            with urllib.request.urlopen(SUPERNI_URL.format(task=task), timeout=120) as response:
                write_jsonl(path.with_suffix(".part"), superni_rows(json.load(response)))
            path.with_suffix(".part").rename(path)
        written[path.name] = sum(1 for _ in path.open())
    path = out / "general" / "medtext.jsonl"
    if not path.exists():
        from datasets import load_dataset

        write_jsonl(path.with_suffix(".part"), medtext_rows(load_dataset(MEDTEXT, split="train")))
        path.with_suffix(".part").rename(path)
    written["general/medtext.jsonl"] = sum(1 for _ in path.open())
    return written
