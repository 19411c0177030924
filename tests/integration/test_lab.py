"""The forgetting lab built: the small preset with the shipped base model, a cached build and the CLI's table, a
rebuild for another world version, a base model pretrained here (--fresh), the full preset's shipped model."""

import json
import shutil

import pytest

from sasft_ray import lab


def test_small_lab_has_the_shipped_base_model_with_its_skills(small_lab):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, info = small_lab
    assert json.loads((out / "lab.json").read_text()) == info
    assert info["preset"] == "small" and info["skills"] == list(lab.SKILLS) and info["tasks"] == list(lab.TASKS)
    assert info["model_source"] == "shipped" and info["sizes"]["steps"] == lab.shipped(0)["sizes"]["steps"]
    assert not list(out.parent.glob(".lab.*"))  # no temporary folder left behind
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.hidden_size // model.config.num_attention_heads == 32  # vLLM's CPU minimum
    assert tokenizer.chat_template
    accuracy = lab.skill_accuracy(model, tokenizer, lab.load_evals(out))
    assert accuracy == info["base_accuracy"]  # greedy and reproducible
    assert sum(a["strict"] >= 0.5 for a in accuracy.values()) >= 6, accuracy


def test_a_fresh_build_pretrains_its_base_model_here(tmp_path, monkeypatch):
    """--fresh: the tokenizer trained on the world's text and the model pretrained here (a few steps: the
    path, not the skills), recorded as such; built again without --fresh it is reused, not replaced."""
    monkeypatch.setitem(lab.PRESETS, "small", {**lab.PRESETS["small"], "steps": 20})
    info = lab.build_lab(tmp_path / "lab", preset="small", seed=0, fresh=True)
    assert info["model_source"] == "pretrained" and info["sizes"]["steps"] == 20
    assert info["model_sha256"] != lab.shipped(0)["model_sha256"]
    assert (tmp_path / "lab" / "model" / "tokenizer.json").read_bytes() != (lab.SHIPPED / "tokenizer.json").read_bytes()
    assert lab.build_lab(tmp_path / "lab", preset="small", seed=0) == info


def test_build_is_cached_and_the_cli_prints_the_table(small_lab, capsys):
    from sasft_ray.cli import main

    out, info = small_lab
    assert lab.build_lab(out, preset="small", seed=0) == info  # cached: nothing rebuilt
    assert main(["lab", "build", "--out", str(out), "--preset", "small"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in lab.SKILLS) and "mean" in printed


def test_a_lab_built_by_another_world_version_is_rebuilt_not_reused(small_lab, tmp_path, monkeypatch):
    out, info = small_lab
    stale = tmp_path / "lab"
    shutil.copytree(out, stale)
    (stale / "lab.json").write_text(json.dumps({**info, "version": lab.WORLD_VERSION - 1}))

    class Rebuilt(Exception):
        pass

    def rebuild(*args, **kwargs):  # stop the rebuild at its first step: starting it is the point
        raise Rebuilt

    monkeypatch.setattr(lab, "write_world", rebuild)
    with pytest.raises(Rebuilt):
        lab.build_lab(stale, preset="small", seed=0)
    assert json.loads((stale / "lab.json").read_text())["version"] == lab.WORLD_VERSION - 1  # left intact
    assert lab.build_lab(out, preset="small", seed=0) == info  # the current version is still reused


def test_the_full_lab_copies_the_shipped_base_model_and_measures_it_here(tmp_path, monkeypatch):
    """The full preset's seed-0 base model is the one the package ships, byte for byte, its accuracy measured
    on this machine (the lab's target: a mean of at least 0.75); a shipped file that is not what its build
    wrote is refused, and nothing is left of the build."""
    record = lab.shipped(0)
    assert record is not None, "sasft_ray/lab_model/build.json is not this world version's, seed 0"
    info = lab.build_lab(tmp_path / "lab", preset="full", seed=0)
    assert info["model_source"] == "shipped" and info["model_sha256"] == record["model_sha256"]
    assert info["shipped_build"]["base_mean"] == record["base_mean"]
    assert info["base_mean"]["strict"] >= 0.75, info["base_accuracy"]
    assert lab.shipped(1) is None  # another seed pretrains here

    tampered = tmp_path / "tampered"
    shutil.copytree(lab.SHIPPED, tampered)
    (tampered / "model.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    monkeypatch.setattr(lab, "SHIPPED", tampered)
    with pytest.raises(lab.ConfigError, match="is not the model its build.json records"):
        lab.build_lab(tmp_path / "other", preset="full", seed=0)
    assert not (tmp_path / "other").exists()
