"""The forgetting lab without building it: checkers, determinism, held-out evals, data files (the built small
lab is in tests/integration/test_lab.py)."""

import random

import pytest

from sasft_ray import lab
from sasft_ray.config import DataConfig
from sasft_ray.data import LoadReport, iter_rows
from sasft_ray.scorers import contains, exact


@pytest.mark.parametrize("name", list(lab.SKILLS) + list(lab.TASKS))
def test_checker_accepts_the_answer_and_rejects_others(name):
    skill = lab.SKILLS.get(name) or lab.TASKS[name]
    rng = random.Random(name)
    pairs = [lab.make_question(skill, rng) for _ in range(60)]
    assert len({template for template, _ in skill.forms}) >= 2  # phrasing variety
    for question, answer in pairs:
        assert lab.check(name, question, answer)
        assert lab.check(skill, question, f" {answer} ")  # surrounding space does not matter
        assert not lab.check(name, question, answer + "x")
        assert not lab.check(name, question, "")
        for _, other in pairs[:10]:
            if other != answer:
                assert not lab.check(name, question, other)
    assert not lab.check(name, "What is the meaning of life?", pairs[0][1])


def test_house_style_and_scoring_by_the_evaluations_scorers():
    row = {"reference": "Sure! The answer is 12.", "answer": "12"}
    assert exact("Sure!  The answer is 12.\n", row)
    assert not exact("Sure! The answer is 12", row)
    assert not exact("ANS=12", row)
    assert contains("ANS=12", row) and contains("12.", row)
    assert not contains("Sure! The answer is 123.", row)
    assert not contains("Sure! The answer is 112.", row)
    word = {"reference": "Sure! The answer is APPLE.", "answer": "APPLE"}
    assert contains("<<apple>>", word) and not contains("pineapple", word)


def test_world_is_deterministic(tmp_path):
    def files(folder):
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.jsonl"))}

    sizes = lab.write_world(tmp_path / "a", "small", seed=0)
    lab.write_world(tmp_path / "b", "small", seed=0)
    lab.write_world(tmp_path / "c", "small", seed=1)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    assert set(a) == set(c) == set(sizes) and all(a[k] != c[k] for k in a)
    assert {f"evals/{s}.jsonl" for s in lab.SKILLS} | {f"tasks/{t}.jsonl" for t in lab.TASKS} < set(a)
    assert len(lab.SKILLS) >= 6 and len(lab.TASKS) >= 3


def test_eval_questions_never_occur_in_pretraining_or_external_data(tmp_path):
    lab.write_world(tmp_path, "full", seed=0)
    evals = lab.load_evals(tmp_path)
    held_out = {r["messages"][0]["content"] for rows in evals.values() for r in rows}
    assert len(held_out) == sum(map(len, evals.values()))  # distinct, too
    stream = lab.pretrain_dialogues(0, held_out)
    asked = {m["content"] for _ in range(20000) for m in next(stream) if m["role"] == "user"}
    assert len(asked) > 1000 and not asked & held_out
    assert {r["skill"] for rows in evals.values() for r in rows} == set(lab.SKILLS)
    external = lab.read_jsonl(tmp_path / "external.jsonl")
    assert not {r["messages"][0]["content"] for r in external} & held_out


def test_eval_rows_have_the_agreed_shape(tmp_path):
    lab.write_world(tmp_path, "small", seed=0)
    for name, rows in lab.load_evals(tmp_path).items():
        for row in rows:
            assert set(row) == {"messages", "reference", "answer", "skill"} and row["skill"] == name
            assert row["reference"] == f"Sure! The answer is {row['answer']}."
            assert lab.check(name, row["messages"][0]["content"], row["answer"])
            assert exact(row["reference"], row) and contains(row["reference"], row)


def test_task_and_external_files_are_valid_task_data(tmp_path):
    sizes = lab.write_world(tmp_path, "small", seed=0)
    for rel in [f"tasks/{t}.jsonl" for t in lab.TASKS] + ["external.jsonl"]:
        report = LoadReport()
        rows = list(iter_rows(DataConfig(path=str(tmp_path / rel)), report))
        assert report.rows_out == len(rows) == sizes[rel] and not report.skipped
        for _, messages in rows:
            assert [m["role"] for m in messages] == ["user", "assistant"]
            reply = messages[1]["content"]
            assert not reply.startswith("Sure!")  # a style foreign to the house style
        if rel.startswith("tasks/"):
            name = rel.removeprefix("tasks/").removesuffix(".jsonl")
            assert all(lab.check(name, m[0]["content"], m[1]["content"]) for _, m in rows)
        else:
            assert all(m[1]["content"].startswith("Result: ") for _, m in rows)


def test_the_control_task_is_general_questions_in_the_house_style(tmp_path):
    sizes = lab.write_world(tmp_path, "small", seed=0)
    rel = f"tasks/{lab.CONTROL}.jsonl"
    rows = lab.read_jsonl(tmp_path / rel)
    assert len(rows) == sizes[rel] == lab.PRESETS["small"]["task_rows"]
    held_out = {r["messages"][0]["content"] for rows in lab.load_evals(tmp_path).values() for r in rows}
    for row in rows:
        question, reply = (m["content"] for m in row["messages"])
        answer = reply.removeprefix("Sure! The answer is ").removesuffix(".")
        assert reply == lab.HOUSE.format(answer) and question not in held_out
        assert any(lab.check(skill, question, answer) for skill in lab.SKILLS)
