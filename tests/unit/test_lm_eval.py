"""lm-evaluation-harness's task index: built once per content of its folder, and from that folder alone when
the group's tasks all lie there."""

import yaml

from sasft_ray.config import LmEvalGroup

TASK = {"dataset_path": "json", "output_type": "generate_until", "doc_to_text": "{{q}}", "doc_to_target": "{{a}}"}


def test_a_group_of_local_tasks_is_indexed_from_its_folder_alone_and_once(tmp_path):
    from sasft_ray.evaluate import all_indexed, task_manager

    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"task": "mine", **TASK}))
    (tmp_path / "local.yaml").write_text(yaml.safe_dump({"group": "local", "task": ["mine"]}))
    (tmp_path / "mixed.yaml").write_text(yaml.safe_dump({"group": "mixed", "task": ["local", "hellaswag"]}))
    group = LmEvalGroup(tasks=["mine", "local"], include_path=str(tmp_path))
    index = task_manager(group)
    assert set(index.all_tasks) == {"mine", "local", "mixed"}  # none of lm-eval's own ~14,000 task files read
    assert task_manager(LmEvalGroup(tasks=["mine"], include_path=str(tmp_path), limit=2)) is index
    # a local group that lists a built-in task, or a name not in the folder, needs lm-eval's own index
    assert not all_indexed(index, ["mixed"]) and not all_indexed(index, ["hellaswag"])
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"task": "mine", **TASK, "doc_to_target": "{{b}}"}))
    edited = task_manager(group)  # an edited task file is read again, not served from the old index
    assert edited is not index and edited.task_index["mine"].cfg["doc_to_target"] == "{{b}}"
