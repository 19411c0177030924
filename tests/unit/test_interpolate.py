"""WiSE-FT's interpolated models (`export.interpolate`): the arithmetic on real safetensors shards, the
refusals, the config's αs and the names every stage gives them. Serving and scoring them end to end:
tests/integration/test_run.py."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sasft_ray.config import ConfigError
from sasft_ray.interpolate import InterpolateError, interpolate_folders
from tests.conftest import make_config


def _model(folder, shards: dict[str, dict[str, torch.Tensor]], **files):
    folder.mkdir()
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
    for name, data in files.items():
        (folder / name).write_text(json.dumps(data))
    return folder


def test_each_weight_is_on_the_line_from_the_base_in_the_fine_tunes_dtype_and_shards(tmp_path):
    base = _model(tmp_path / "base", {"model.safetensors": {  # the base in one file, fp32
        "a": torch.zeros(2, 3), "b": torch.ones(4), "c": torch.full((2,), 2.0)}})
    tuned = _model(tmp_path / "tuned", {  # the fine-tune in two shards, bf16, with its run's records
        "model-00001-of-00002.safetensors": {"a": torch.full((2, 3), 4.0, dtype=torch.bfloat16)},
        "model-00002-of-00002.safetensors": {"b": torch.full((4,), 3.0, dtype=torch.bfloat16),
                                             "c": torch.full((2,), 2.0, dtype=torch.bfloat16)}},
        **{"config.json": {"model_type": "llama"}, "model.safetensors.index.json": {"weight_map": {}},
           "drift.json": {"total": 1.0}, "train_result.json": {}})
    out = tmp_path / "mixed"
    assert interpolate_folders(sorted(base.glob("*.safetensors")), tuned, {0.25: out, 0.5: tmp_path / "half"}) == 3
    assert torch.equal(load_file(str(tmp_path / "half" / "model-00001-of-00002.safetensors"))["a"],
                       torch.full((2, 3), 2.0, dtype=torch.bfloat16))  # every α from the one read
    first, second = (load_file(str(out / f"model-0000{i}-of-00002.safetensors")) for i in (1, 2))
    assert torch.equal(first["a"], torch.full((2, 3), 1.0, dtype=torch.bfloat16))  # 0 + 0.25 (4 - 0)
    assert torch.equal(second["b"], torch.full((4,), 1.5, dtype=torch.bfloat16))  # 1 + 0.25 (3 - 1)
    assert torch.equal(second["c"], torch.full((2,), 2.0, dtype=torch.bfloat16))  # unchanged by training
    # the model's own files come along; the fine-tune's records (its drift, its training) do not
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".safetensors") == [
        "config.json", "model.safetensors.index.json"]


def test_a_fine_tune_of_another_model_is_refused(tmp_path):
    base = _model(tmp_path / "base", {"model.safetensors": {"a": torch.zeros(2, 3)}})
    wider = _model(tmp_path / "wider", {"model.safetensors": {"a": torch.zeros(2, 4)}})
    other = _model(tmp_path / "other", {"model.safetensors": {"a": torch.zeros(2, 3), "z": torch.zeros(1)}})
    with pytest.raises(InterpolateError, match=r"'a' has shape \(2, 4\), the base model's \(2, 3\)"):
        interpolate_folders([base / "model.safetensors"], wider, {0.5: tmp_path / "out1"})
    with pytest.raises(InterpolateError, match="'z' is not in the base model's safetensors"):
        interpolate_folders([base / "model.safetensors"], other, {0.5: tmp_path / "out2"})


def test_alphas_lie_strictly_between_the_base_and_the_fine_tune(tmp_path):
    assert make_config(tmp_path, export={"interpolate": [0.75, 0.25]}).export.interpolate == [0.25, 0.75]
    for bad in ([0.0], [1.0], [1.5], [0.5, 0.5]):
        with pytest.raises(ConfigError, match="export.interpolate takes distinct αs strictly between 0"):
            make_config(tmp_path, export={"interpolate": bad})


def test_every_method_gets_its_interpolated_models_served_and_reported(tmp_path):
    from sasft_ray.pipeline import interpolated_entries, interpolated_models, method_runs
    from sasft_ray.rundir import RunDir

    cfg = make_config(tmp_path, compare=["sft"], export={"interpolate": [0.5, 0.25]})
    runs = method_runs(cfg, RunDir(cfg.run_dir))
    models = interpolated_models(runs)
    assert models == {"finetuned@0.25": str(tmp_path / "run" / "interpolated" / "0.25"),
                      "finetuned@0.5": str(tmp_path / "run" / "interpolated" / "0.5"),
                      "sft@0.25": str(tmp_path / "run" / "compare" / "sft" / "interpolated" / "0.25"),
                      "sft@0.5": str(tmp_path / "run" / "compare" / "sft" / "interpolated" / "0.5")}
    entries = interpolated_entries(runs)
    assert entries.keys() == models.keys()
    assert entries["sft@0.5"]["method"] == "sft@0.5" and entries["finetuned@0.25"]["method"] == "sa-sft@0.25"
    assert entries["sft@0.5"]["interpolated"] == {"from": "sft", "alpha": 0.5}
