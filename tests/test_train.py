"""Training through real Ray Train workers running real DeepSpeed ZeRO-3 on gloo (CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sasft_ray.generate import generate
from sasft_ray.selftalk import load_tokenizer
from sasft_ray.tiny import write_demo_task
from sasft_ray.train import IGNORE, TrainSetupError, encode, frozen_prefixes, lr_lambda, train
from tests.conftest import make_config

TRAIN = {"num_workers": 2, "micro_batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.0, "schedule": "constant",
         "max_length": 128, "checkpoint_every": 10}


def test_label_mask_covers_assistant_tokens_only(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
                {"role": "assistant", "content": "Sure! The answer is 5."}, {"role": "user", "content": "And 4?"},
                {"role": "assistant", "content": "Sure! The answer is 9."}]
    enc = encode(tok, messages, max_length=512)
    assert len(enc["input_ids"]) == len(enc["labels"])
    # token by token: each label is either ignored or equal to its input token
    assert all(lab in (IGNORE, tid) for tid, lab in zip(enc["input_ids"], enc["labels"]))
    learned = tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE])
    assert learned == "Sure! The answer is 5.<|eot_id|>Sure! The answer is 9.<|eot_id|>"
    ignored = tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab == IGNORE])
    assert "Add 2 and 3." in ignored and "And 4?" in ignored and "Be brief." in ignored
    cut = encode(tok, messages, max_length=10)
    assert len(cut["input_ids"]) == 10 and all(lab == IGNORE for lab in cut["labels"])


def test_schedules_and_freeze_selection():
    assert lr_lambda(0, warmup=4, total=10, schedule="cosine") == 0.25
    assert lr_lambda(10, warmup=4, total=10, schedule="cosine") == pytest.approx(0.0)
    assert lr_lambda(7, warmup=4, total=10, schedule="linear") == pytest.approx(0.5)
    assert frozen_prefixes(4, None) == ("embed_tokens.", "layers.0.", "layers.1.")


@pytest.fixture(scope="module")
def task_run(tiny_llama, local_ray, tmp_path_factory):
    """A run directory with its data stages done (method sft: no self-talk needed to test training)."""
    tmp = tmp_path_factory.mktemp("train")
    write_demo_task(tmp / "task.jsonl", n=120)
    cfg = make_config(tmp, tiny_llama, train={**TRAIN, "method": "sft"})
    return cfg, generate(cfg)


@pytest.fixture(scope="module")
def trained(task_run):
    cfg, rd = task_run
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 30, "fail_once_at_step": 15})})
    return cfg, rd, train(cfg, rd)


def test_zero3_training_survives_a_killed_worker_and_the_loss_falls(trained):
    cfg, rd, record = trained
    assert record["status"] == "done" and record["steps"] == 30
    assert Path(rd.local("train-failed-once")).exists()  # a worker really died at step 15...
    events = [json.loads(line) for line in Path(rd.local("train-events.jsonl")).read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in events] == [
        ("checkpoint", 10), ("resumed", 10), ("checkpoint", 20), ("checkpoint", 30)]  # ...and went on from 10
    losses = [e["loss"] for e in events if e["event"] == "checkpoint"]
    assert losses[-1] < 0.6 * losses[0] and record["final_loss"] == losses[-1]
    assert record["heldout_loss"] < losses[0]
    drift = json.loads(Path(rd.local("model", "drift.json")).read_text())
    assert drift["total"] > 0 and "layers.000" in drift and "embeddings" in drift


def test_export_equals_deepspeed_zero_to_fp32(trained):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg, rd, record = trained
    exported = load_file(str(Path(rd.local("model", "model.safetensors"))))
    reference = get_fp32_state_dict_from_zero_checkpoint(record["checkpoint"], tag="ds")
    assert set(exported) == set(reference)
    for key, value in reference.items():
        assert torch.equal(exported[key], value.to(exported[key].dtype)), key


def test_export_generates_in_transformers_and_vllm(trained):
    from transformers import AutoModelForCausalLM

    cfg, rd, _ = trained
    model_dir = rd.local("model")
    tok = load_tokenizer(model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Double every letter of abc."}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out = AutoModelForCausalLM.from_pretrained(model_dir).generate(ids, max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).startswith("ANS=")  # the task's foreign style, learned
    script = (
        "from vllm import LLM, SamplingParams\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM({model_dir!r}, enforce_eager=True, dtype='float32', max_model_len=256)\n"
        f"    out = llm.generate([{prompt!r}], SamplingParams(max_tokens=12, temperature=0))\n"
        "    print('OUT=' + out[0].outputs[0].text)\n"
    )
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert "OUT=ANS=" in done.stdout, done.stderr[-2000:]


def test_freeze_keeps_frozen_weights_bit_identical(task_run, tiny_llama, tmp_path):
    cfg, rd = task_run
    freeze_cfg = make_config(tmp_path, tiny_llama, data_path=cfg.data.path,
                             train={**TRAIN, "method": "freeze", "freeze_layers": 1, "max_steps": 3,
                                    "grad_accum": 2})
    freeze_rd = generate(freeze_cfg)
    train(freeze_cfg, freeze_rd)
    last = json.loads(Path(freeze_rd.local("train-events.jsonl")).read_text().splitlines()[-1])
    assert last["step"] == last["optimizer_steps"] == 3  # our step count agrees with DeepSpeed's
    base = load_file(str(Path(tiny_llama, "model.safetensors")))
    tuned = load_file(str(Path(freeze_rd.local("model", "model.safetensors"))))
    for key in base:
        frozen = "embed_tokens." in key or ".layers.0." in key
        assert torch.equal(base[key], tuned[key]) == frozen, key


@pytest.mark.parametrize("change, message", [
    ({"micro_batch_size": 64}, "do not fill one global batch"),
    ({"max_length": 16}, "no assistant token left"),
    ({"num_workers": 40}, "not enough resources"),
])
def test_config_errors_stop_before_any_worker(task_run, tmp_path, change, message):
    cfg, rd = task_run
    bad = cfg.model_copy(update={"train": cfg.train.model_copy(update=change)})
    with pytest.raises(TrainSetupError, match=message):
        train(bad, rd, force=True)
