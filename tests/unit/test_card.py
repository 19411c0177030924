"""The model card of `<run_dir>/model/`, from a run dir fabricated here (no training, no server)."""

import json

import yaml

from sasft_ray.card import model_card, write_model_card
from sasft_ray.evaluate import INDOMAIN
from sasft_ray.layout import ADAPTER, MANIFEST, MODEL, TRAIN_RESULT
from sasft_ray.rundir import RunDir
from tests.conftest import make_config

HUB_BASE = "meta-llama/Llama-3.1-8B-Instruct"


def _run_dir(cfg, *, lora: bool = False) -> RunDir:
    """What a finished training leaves: the manifest's stage records, the export, its train_result.json."""
    rd = RunDir(cfg.run_dir)
    stages = {
        "task": {"status": "done", "rows_in": 1000, "rows_out": 1000, "train_rows": 900, "heldout_rows": 100},
        "selftalk": {"status": "done", "rows_in": 625, "rows_out": 450, "survived": 560, "heldout": 25},
        "mix": {"status": "done", "task_rows": 900, "self_ratio": 0.5, "achieved_ratio": 0.5, "mixed_in_rows": 450,
                "rows_out": 1350},
        "train": {"status": "done", "steps": 42, "heldout_loss": 0.8123, "selftalk_heldout_loss": 1.1042,
                  "sources": {"task": {"rows": 900, "target_tokens": 18000}, "self": {"rows": 450,
                                                                                   "target_tokens": 40500}},
                  "trainable_params": 8_030_261_248, "total_params": 8_030_261_248},
        "eval": {"status": "running"},  # not finished: nothing of it is read
    }
    rd.write_json({"stages": stages}, MANIFEST)
    rd.write_text("weights", MODEL, "model.safetensors")
    rd.write_text(json.dumps({"heldout_loss": 0.8123, "trainable_params": 8_030_261_248,
                              "total_params": 8_030_261_248}), MODEL, TRAIN_RESULT)
    if lora:
        rd.write_text("{}", MODEL, ADAPTER, "adapter_config.json")
    return rd


def _results(cfg) -> dict:
    """eval/results.json as `sasft eval` writes it: every model's scores, the fine-tunes' run dirs."""
    def scores(ind, math, words):
        return {INDOMAIN: {"exact": ind, "rouge_l": ind + 0.05}, "math": {"exact": math}, "words": {"exact": words}}

    return {"run_dir": cfg.run_dir, "base_model": cfg.model.path, "task": cfg.data.path, "base_model_id": "base",
            "models": {"base": scores(0.10, 0.60, 0.40), "finetuned": scores(0.90, 0.57, 0.33)},
            "finetuned": {"finetuned": {"method": "sa-sft", "seed": 0, "run_dir": cfg.run_dir, "drift": None,
                                        "curve": []}}}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_card_after_training_has_the_run_and_no_scores(tmp_path):
    cfg = make_config(tmp_path, model_path=HUB_BASE, mix={"self_ratio": 0.5}, train={"lr": 2e-5, "epochs": 3})
    card = model_card(cfg, _run_dir(cfg))
    assert _front_matter(card) == {"base_model": HUB_BASE, "library_name": "transformers",
                                   "pipeline_tag": "text-generation", "tags": ["sasft", "self-augmented-sft", "sa-sft"]}
    for line in (f"| base model | `{HUB_BASE}` |", "| method | sa-sft, λ = 0.5 |",
                 # a local path by its last two parts: no /home/<user>/... published with the card
                 f"| task data | `{tmp_path.name}/task.jsonl`: 900 training rows, 100 held out |",
                 "| self-dialogues | 450 mixed in (625 generated, 560 kept by the filters) |",
                 "| mix as trained | task 900 rows / 18,000 target tokens, self 450 rows / 40,500 target tokens "
                 "(target tokens per task target token: self 2.25) |", "| steps | 42 |",
                 "| learning rate | 2e-05 (cosine, warmup 0.03) |", "| epochs | 3 |",
                 "| fine-tuning | full: 8.03 B of 8.03 B parameters trained |", "| held-out task loss | 0.812 |"):
        assert line in card, line
    assert "λ = 0.5 (mix.self_ratio: self-dialogues per task row)" in card
    assert "license" not in card and "## Evaluation" not in card and "adapter/" not in card
    assert str(tmp_path) not in card


def test_the_card_after_evaluation_has_the_headline_numbers(tmp_path):
    cfg = make_config(tmp_path, model_path=HUB_BASE)
    rd = _run_dir(cfg)
    results = _results(cfg)
    assert write_model_card(cfg, rd, results)
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "| in-domain (exact, the task's held-out split) | 0.100 | 0.900 |" in card
    assert "| math | 0.600 | 0.570 |" in card and "| general (mean) | 0.500 | 0.450 |" in card
    assert "- in-domain gain over the base model: +0.800" in card
    assert "- general score kept: 90.0% of the base model's (forgetting +0.050)" in card
    # a compared method's card reads its own entry of its main run's results: here there is none
    other = make_config(tmp_path / "compare" / "sft", model_path=HUB_BASE, train={"method": "sft"})
    other_card = model_card(other, _run_dir(other), results)
    assert "## Evaluation" not in other_card and "λ" not in other_card and "self-dialogues |" not in other_card
    assert "sft" in _front_matter(other_card)["tags"]


def test_the_card_of_a_lora_fine_tune_of_a_local_model(tmp_path):
    base = tmp_path / "my-model"
    base.mkdir()
    cfg = make_config(tmp_path, model_path=str(base), train={"lora": {"r": 8, "alpha": 16}, "max_steps": 30})
    rd = _run_dir(cfg, lora=True)
    card = model_card(cfg, rd)
    meta = _front_matter(card)
    assert "base_model" not in meta  # a local folder is no hub id for the hub to link
    assert meta["tags"] == ["sasft", "self-augmented-sft", "sa-sft", "lora"]
    assert "| fine-tuning | LoRA r=8, alpha 16, merged into the weights: 8.03 B of 8.03 B parameters trained |" in card
    assert "| epochs | 30 steps (train.max_steps) |" in card
    assert "the adapter itself is in `adapter/`" in card


def test_no_card_without_an_export(tmp_path):
    cfg = make_config(tmp_path, model_path=HUB_BASE)
    rd = RunDir(cfg.run_dir)
    assert not write_model_card(cfg, rd)
    assert not rd.exists(MODEL)
