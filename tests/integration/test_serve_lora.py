"""LoRA fine-tunes served as adapters: two adapters of one base model on one CPU engine (Ray Serve LLM's
multi-LoRA, the adapters read from an S3 bucket on a moto server on loopback), each answering with the
very tokens its merged twin (the same fine-tune, merged, on an engine of its own) answers with."""

import json

import pytest
import requests

from sasft_ray.layout import ADAPTERS
from tests.conftest import free_port, make_config
from tests.unit.test_faults import _finish_training

# three engines (the base with both adapters, two merged twins), each a replica and a CPU
# bundle, and the router
RAY_CPUS = 8
PROMPTS = ["What is 2 plus 3?", "Spell lamp backwards.", "Write tiger in capitals.", "Add 7 and 9."]


@pytest.fixture(scope="module")
def fine_tunes(tiny_llama, tmp_path_factory):
    """Two LoRA fine-tunes of tiny_llama as PEFT writes them (random adapters, large enough to change the
    answers), each with its merged twin: name -> (adapter folder, merged model folder)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("lora")
    made = {}
    for name, seed in (("alpha", 1), ("beta", 2)):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], task_type="CAUSAL_LM"))
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:  # B starts at zero: an adapter that does something
                torch.nn.init.normal_(param, std=0.3)
        model.save_pretrained(out / name / "adapter")
        model.merge_and_unload().save_pretrained(out / name / "merged")
        AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(out / name / "merged")
        made[name] = (out / name / "adapter", out / name / "merged")
    return made


@pytest.fixture(scope="module")
def endpoint(tiny_llama, fine_tunes, bucket, local_ray, tmp_path_factory):
    from sasft_ray import serve
    from sasft_ray.rundir import RunDir

    rd = RunDir(f"{bucket}/lora-serve")
    for name, (adapter, _) in fine_tunes.items():
        rd.upload(str(adapter), "serve", "adapters", name)
    cfg = make_config(tmp_path_factory.mktemp("lora-serve"), tiny_llama, train={"lora": {"r": 8, "alpha": 16}},
                      serve={"port": free_port(), "engine": {"max_model_len": 256, "max_num_seqs": 8}})
    models = serve.Models({"base": tiny_llama, **{f"{n}-merged": str(m) for n, (_, m) in fine_tunes.items()}},
                          {name: rd.path(ADAPTERS, name) for name in fine_tunes}, base="base")
    url = serve.start(cfg, models)
    yield url, models
    serve.stop()


def _answer(url: str, model: str, question: str, tokenizer) -> list[int]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    r = requests.post(f"{url}/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0, "return_token_ids": True})
    r.raise_for_status()
    return r.json()["choices"][0]["token_ids"]


def test_two_lora_adapters_on_one_engine_answer_as_their_merged_twins(endpoint, tiny_llama):
    from ray import serve as ray_serve
    from transformers import AutoTokenizer

    url, models = endpoint
    listed = {m["id"] for m in requests.get(f"{url}/models", timeout=30).json()["data"]}
    assert {"base", "base:alpha", "base:beta"} <= listed
    # one engine deployment per model folder: the adapters have none of their own
    deployments = ray_serve.status().applications["sasft"].deployments
    assert sorted(d for d in deployments if d.startswith("LLMServer")) == [
        "LLMServer:alpha-merged", "LLMServer:base", "LLMServer:beta-merged"]

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    answers = {model: [_answer(url, model, q, tok) for q in PROMPTS]
               for model in ("base", "base:alpha", "base:beta", "alpha-merged", "beta-merged")}
    assert all(answers["base"])
    for name in ("alpha", "beta"):
        assert answers[f"base:{name}"] == answers[f"{name}-merged"], name  # greedy: the very same tokens
        assert answers[f"base:{name}"] != answers["base"], name  # and the adapter did change the answers
    assert answers["base:alpha"] != answers["base:beta"]


def test_the_pipeline_serves_lora_runs_in_a_bucket_as_adapters_of_one_engine(tiny_llama, fine_tunes, bucket,
                                                                            tmp_path):
    """`served_models` for LoRA runs (the main one and a compared method) whose run_dir is in a bucket:
    their adapters copied into one folder, requested as <base>:<id>; on a local run_dir, merged engines."""
    from sasft_ray.generate import generate
    from sasft_ray.layout import ADAPTER, MODEL
    from sasft_ray.pipeline import method_runs, served_models
    from sasft_ray.rundir import RunDir
    from sasft_ray.serve import llm_config
    from sasft_ray.tiny import write_demo_task

    write_demo_task(tmp_path / "task.jsonl", n=60)
    sections = dict(train={"method": "sft", "lora": {"r": 8}, "freeze_layers": 1}, compare=["freeze"])
    cfg = make_config(tmp_path, tiny_llama, data_path=tmp_path / "task.jsonl", run_dir=f"{bucket}/lora-run",
                      **sections)
    staged = RunDir(cfg.run_dir)
    for (run, rd), (adapter, merged) in zip(method_runs(cfg, staged).values(), fine_tunes.values()):
        generate(run, rd)
        rd.upload(str(merged), MODEL)
        rd.upload(str(adapter), MODEL, ADAPTER)
        _finish_training(run, rd)
    models = served_models(cfg, staged)
    assert models.engines == {"base": tiny_llama} and models.base == "base"
    assert models.api_ids() == {"base": "base", "finetuned": "base:finetuned", "freeze": "base:freeze"}
    for model_id in ("finetuned", "freeze"):
        config = json.loads(staged.read_text(ADAPTERS, model_id, "adapter_config.json"))
        assert config["r"] == 8
    base = llm_config(cfg, "base", tiny_llama, models.adapters)
    assert base["lora_config"] == {"dynamic_lora_loading_path": f"{bucket}/lora-run/{ADAPTERS}",
                                   "max_num_adapters_per_replica": 2}
    assert {k: base["engine_kwargs"][k] for k in ("enable_lora", "max_loras", "max_lora_rank")} == {
        "enable_lora": True, "max_loras": 2, "max_lora_rank": 8}

    merged = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"lora": "merged"})})
    assert set(served_models(merged, staged).engines) == {"finetuned", "freeze", "base"}
    assert served_models(merged, staged).adapters == {}
