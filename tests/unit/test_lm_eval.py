"""lm-evaluation-harness's task index: built once, and from the group's own folder when its tasks all lie there."""

import yaml

from sasft_ray.config import LmEvalGroup


def test_a_group_of_local_tasks_is_indexed_from_its_folder_alone_and_once(tmp_path):
    from sasft_ray.evaluate import task_manager

    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({
        "task": "mine", "dataset_path": "json", "output_type": "generate_until", "doc_to_text": "{{q}}",
        "doc_to_target": "{{a}}"}))
    group = LmEvalGroup(tasks=["mine"], include_path=str(tmp_path))
    index = task_manager(group)
    assert index.all_tasks == ["mine"]  # none of lm-eval's own ~14,000 task files read
    assert task_manager(LmEvalGroup(tasks=["mine"], include_path=str(tmp_path), limit=2)) is index
