"""Training through real Ray Train workers running real DeepSpeed ZeRO-3 on gloo (CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from sasft_ray.chat import encode, load_tokenizer
from sasft_ray.config import LoraConfig
from sasft_ray.generate import generate
from sasft_ray.layout import (
    ADAPTER,
    DRIFT,
    KEPT_DIR,
    KEPT_STEP,
    MODEL,
    MONITOR,
    RAY_TRAIN,
    TENSORBOARD,
    TRACKING,
    TRAIN_RESULT,
    kept,
)
from sasft_ray.loop import collate
from sasft_ray.lora import apply_lora, merge_lora, parameter_counts
from sasft_ray.packing import pack
from sasft_ray.rundir import RunDir
from sasft_ray.tiny import demo_task_rows, warmup_dialogues, write_demo_task
from sasft_ray.train import FAIL_ONCE_AT_STEP, IGNORE, TrainSetupError, train, train_events
from tests.conftest import make_config

TRAIN = {"num_workers": 2, "micro_batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.0, "schedule": "constant",
         "max_length": 128, "checkpoint_every": 10}
MONITOR_SELFTALK = {"num_dialogues": 40, "heldout_fraction": 0.25, "max_user_tokens": 32, "max_assistant_tokens": 32,
                    "engine": {"max_model_len": 256, "batch_size": 16}}


def test_label_mask_covers_assistant_tokens_only(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
                {"role": "assistant", "content": "Sure! The answer is 5."}, {"role": "user", "content": "And 4?"},
                {"role": "assistant", "content": "Sure! The answer is 9."}]
    [enc] = encode(tok, messages, max_length=512)
    assert len(enc["input_ids"]) == len(enc["labels"])
    # token by token: each label is either ignored or equal to its input token
    assert all(lab in (IGNORE, tid) for tid, lab in zip(enc["input_ids"], enc["labels"]))
    learned = tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE])
    assert learned == "Sure! The answer is 5.<|eot_id|>Sure! The answer is 9.<|eot_id|>"
    ignored = tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab == IGNORE])
    assert "Add 2 and 3." in ignored and "And 4?" in ignored and "Be brief." in ignored
    [cut] = encode(tok, messages, max_length=10)
    assert len(cut["input_ids"]) == 10 and all(lab == IGNORE for lab in cut["labels"])
    # a last reply cut at its token limit (`filters.truncated: keep`): trained as far as it goes, never its end
    [open_end] = encode(tok, messages, max_length=512, open_end=True)
    learned = tok.decode([t for t, lab in zip(open_end["input_ids"], open_end["labels"]) if lab != IGNORE])
    assert learned == "Sure! The answer is 5.<|eot_id|>Sure! The answer is 9."


def test_lora_trains_adapters_only_and_merges_like_peft(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), r=4, alpha=8, dropout=0.0,
                       target_modules="all-linear", first_layer=1)  # method freeze with 1 frozen block
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapted = {n.split(".lora_")[0] for n in trainable}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(".layers.1." in n for n in adapted) and len(adapted) == 7  # q k v o gate up down, block 1 only
    n_trainable, n_total = parameter_counts(model)
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable) < n_total / 10
    for name, p in model.named_parameters():
        if ".lora_B." in name:  # B starts at zero: make the merge do something
            torch.nn.init.normal_(p)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merge_lora(state, scaling=8 / 4)
    reference = model.merge_and_unload().state_dict()
    assert set(merged) == set(reference) == set(load_file(str(Path(tiny_llama, "model.safetensors"))))
    for key, value in reference.items():
        assert torch.equal(merged[key], value), key


def _encoded_examples(tiny_llama, n=200):
    tok = load_tokenizer(tiny_llama)
    task = [[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
            for r in demo_task_rows(n // 2)]
    return [seq for m in task + warmup_dialogues(n // 2) for seq in encode(tok, m, max_length=128)]


def test_packing_makes_fewer_fuller_sequences_with_the_same_targets(tiny_llama):
    examples = _encoded_examples(tiny_llama)
    ids, labels = [e["input_ids"] for e in examples], [e["labels"] for e in examples]
    out = pack(ids, labels, max_length=128)
    lengths = [len(x) for x in out["input_ids"]]
    assert max(lengths) <= 128 and len(lengths) < len(ids) / 2  # fewer sequences (200 examples of ~49 tokens)...
    assert sum(lengths) == sum(map(len, ids))  # ...with every token kept, none duplicated...
    assert sum(lengths) / len(lengths) > 0.9 * 128  # ...and fuller: over 90% of max_length on average
    # targets: the labels a causal LM learns (all but each example's first) are the same, in number and value
    targets = sorted(t for lab in labels for t in lab[1:] if t != IGNORE)
    assert sorted(int(t) for lab in out["labels"] for t in lab if t != IGNORE) == targets
    for seq, pos in zip(out["input_ids"], out["position_ids"]):
        starts = [i for i, p in enumerate(pos) if p == 0]
        assert starts[0] == 0 and len(seq) == len(pos)  # positions restart at 0 for every example


def test_packed_examples_do_not_see_each_other(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    examples = _encoded_examples(tiny_llama, n=6)
    out = pack([e["input_ids"] for e in examples], [e["labels"] for e in examples], max_length=128)
    batch = collate(out, pad_id=0)  # several packed rows, the shorter ones padded
    assert "attention_mask" not in batch and int(batch.pop("num_tokens")) == sum(map(len, out["input_ids"]))
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        for row, pos in enumerate(batch["position_ids"]):
            n = len(out["input_ids"][row])  # the padding after n is a segment of its own
            starts = [i for i, p in enumerate(pos.tolist()[:n]) if p == 0] + [n]
            assert len(starts) > 2 or row > 0  # the first row holds several examples
            for a, b in zip(starts, starts[1:]):
                alone = model(input_ids=batch["input_ids"][row:row + 1, a:b]).logits[0]
                assert torch.allclose(packed_logits[row, a:b], alone, atol=1e-5)


@pytest.fixture(scope="module")
def task_run(tiny_llama, local_ray, tmp_path_factory):
    """A run directory with its data stages done: method sft, whose self-talk writes only the forgetting
    monitor's held-out dialogues (10 of 40), never trained on."""
    tmp = tmp_path_factory.mktemp("train")
    write_demo_task(tmp / "task.jsonl", n=120)
    cfg = make_config(tmp, tiny_llama, train={**TRAIN, "method": "sft"}, selftalk=MONITOR_SELFTALK)
    rd = RunDir(cfg.run_dir)
    generate(cfg, rd)
    return cfg, rd


@pytest.fixture(scope="module")
def trained(task_run):
    """30 steps on 2 workers. A worker killed and resumed from: `overfit` below, and test_multinode_s3.py (a node
    lost mid-epoch)."""
    cfg, rd = task_run
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "max_steps": 30, "log_every": 5, "keep_checkpoints_after_export": True})})
    return cfg, rd, train(cfg, rd)


def test_zero3_training_on_two_workers_lowers_the_loss(trained):
    cfg, rd, record = trained
    assert record["status"] == "done" and record["steps"] == 30
    events = train_events(rd)
    assert [(e["event"], e["step"]) for e in events] == [
        ("started", 0), ("log", 5), ("checkpoint", 10), ("log", 15), ("checkpoint", 20), ("log", 25),
        ("checkpoint", 30)]
    assert len(events[0]["nodes"]) == 2
    assert record["sources"] == {"task": {"rows": record["rows_in"], "target_tokens": record["sources"]["task"][
        "target_tokens"]}} and record["sources"]["task"]["target_tokens"] > 5 * record["rows_in"]
    for e in events[1:]:  # a record of the two ranks every log_every steps
        assert e["tokens_per_s_per_gpu"] > 0 and e["grad_norm"] > 0 and e["lr"] == 5e-3 and e["eta_s"] >= 0
    losses = {e["step"]: e["loss"] for e in events if "loss" in e}
    assert losses[30] < 0.7 * losses[10] and record["final_loss"] == losses[30]
    assert record["heldout_loss"] < events[2]["heldout_loss"]  # the held-out loss fell too (from step 10's)
    drift = json.loads(Path(rd.local(MODEL, DRIFT)).read_text())
    assert drift["total"] > 0 and "layers.000" in drift and "embeddings" in drift


def test_heldout_loss_is_measured_at_every_checkpoint(trained):
    cfg, rd, record = trained
    checkpoints = [e for e in train_events(rd) if e["event"] == "checkpoint"]
    assert all(isinstance(e["heldout_loss"], float) for e in checkpoints)
    assert [(c["step"], c["heldout_loss"]) for c in record["curve"]] == [(e["step"], e["heldout_loss"])
                                                                         for e in checkpoints]
    assert [c["step"] for c in record["curve"]] == [10, 20, 30]
    assert record["heldout_loss"] == checkpoints[-1]["heldout_loss"] < checkpoints[0]["heldout_loss"]


def test_the_forgetting_monitor_sees_sft_make_the_models_own_text_unlikely(trained, tiny_llama):
    """Plain SFT on a task in a foreign style: its held-out self-dialogues (generated for the monitor only,
    never trained on) are measured at every checkpoint, and end less likely than under the base model,
    while the task's held-out loss falls: forgetting, seen with no benchmark."""
    from transformers import AutoModelForCausalLM

    _, rd, record = trained
    assert rd.stage_info("selftalk")["heldout"] == 10
    assert rd.stage_info("mix")["rows_out"] == rd.stage_info("task")["train_rows"]  # SFT: nothing mixed in
    checkpoints = [e for e in train_events(rd) if e["event"] == "checkpoint"]
    assert [e["step"] for e in checkpoints] == [10, 20, 30]
    assert [c["selftalk_heldout_loss"] for c in record["curve"]] == [e["selftalk_heldout_loss"] for e in checkpoints]
    assert checkpoints[-1]["heldout_loss"] < checkpoints[0]["heldout_loss"]  # it learns the task...

    tok, base = load_tokenizer(tiny_llama), AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    total = count = 0
    for messages in pq.read_table(rd.local(MONITOR))["messages"].to_pylist():
        [enc] = encode(tok, messages, max_length=TRAIN["max_length"])
        labels = torch.tensor([enc["labels"]])
        n = int((labels[:, 1:] != IGNORE).sum())
        with torch.no_grad():
            total += base(input_ids=torch.tensor([enc["input_ids"]]), labels=labels).loss.item() * n
        count += n
    assert record["selftalk_heldout_loss"] > 1.2 * total / count  # ...and its own text became less likely


def test_export_equals_deepspeed_zero_to_fp32(trained):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg, rd, record = trained
    exported = load_file(str(Path(rd.local(MODEL, "model.safetensors"))))
    reference = get_fp32_state_dict_from_zero_checkpoint(record["checkpoint"], tag="ds")
    assert set(exported) == set(reference)
    for key, value in reference.items():
        assert torch.equal(exported[key], value.to(exported[key].dtype)), key


def test_export_generates_in_transformers_and_vllm(trained):
    from transformers import AutoModelForCausalLM

    cfg, rd, _ = trained
    model_dir = rd.local(MODEL)
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


def test_lora_zero3_packed_checkpointed_trains_adapters_only_and_exports_merged_weights(task_run, tiny_llama, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    cfg, _ = task_run
    lora_cfg = make_config(tmp_path, tiny_llama, data_path=cfg.data.path,
                           train={**TRAIN, "method": "sft", "lr": 1e-2, "max_steps": 20, "checkpoint_every": 5,
                                  "packing": True, "lora": {"r": 8, "alpha": 16}, "gradient_checkpointing": True,
                                  "keep_checkpoints_after_export": True})
    lora_rd = RunDir(lora_cfg.run_dir)
    generate(lora_cfg, lora_rd)
    record = train(lora_cfg, lora_rd)
    assert record["sequences"] <= record["rows_in"] / 2  # packed: two ~50-token dialogues per 128 tokens
    assert 0 < record["trainable_params"] < record["total_params"] / 10
    events = [e for e in train_events(lora_rd) if e["event"] == "checkpoint"]
    assert [e["step"] for e in events] == [5, 10, 15, 20]
    assert events[-1]["loss"] < 0.6 * events[0]["loss"]
    assert events[-1]["heldout_loss"] < events[0]["heldout_loss"]

    # the optimizer (and so the checkpoint's trained state) holds the adapters only; the base stayed as it was
    states = torch.load(Path(record["checkpoint"], "ds", "zero_pp_rank_0_mp_rank_00_model_states.pt"),
                        weights_only=False)
    shapes = {name for group in states["param_shapes"] for name in group}
    assert shapes and all(".lora_A." in n or ".lora_B." in n for n in shapes)
    assert sum(torch.Size(s).numel() for g in states["param_shapes"] for s in g.values()) \
        == record["trainable_params"]
    base = load_file(str(Path(tiny_llama, "model.safetensors")))
    in_checkpoint = get_fp32_state_dict_from_zero_checkpoint(record["checkpoint"], tag="ds")
    for key, value in in_checkpoint.items():
        if ".lora_" not in key:
            assert torch.equal(value, base[key.removeprefix("base_model.model.").replace(".base_layer", "")]), key

    # the export: plain HF weights, adapters merged into the adapted matrices, everything else untouched
    exported = load_file(str(Path(lora_rd.local(MODEL, "model.safetensors"))))
    assert set(exported) == set(base) and not (Path(lora_rd.local(MODEL)) / "adapter_config.json").exists()  # HF
    for key in base:
        adapted = key.endswith("proj.weight")
        assert torch.equal(exported[key], base[key]) != adapted, key
    model = AutoModelForCausalLM.from_pretrained(lora_rd.local(MODEL))
    assert torch.equal(model.state_dict()["model.layers.1.mlp.down_proj.weight"],
                       exported["model.layers.1.mlp.down_proj.weight"])
    drift = json.loads(Path(lora_rd.local(MODEL, DRIFT)).read_text())
    assert drift["total"] > 0 and drift["embeddings"] == 0 and drift["lm_head"] == 0

    # and the adapter itself, as PEFT writes it: the base model with it computes what the merged model does
    from peft import PeftModel

    adapter = Path(lora_rd.local(MODEL, ADAPTER))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(adapter))
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        assert torch.allclose(peft(ids).logits, model(ids).logits, atol=1e-4)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(tiny_llama)(ids).logits, model(ids).logits,
                                  atol=1e-3)


def _memorized_task(path: Path, words: int = 16, fraction: float = 0.5) -> Path:
    """A task that overfits: every prompt twice, once in training and once held out, each with a random
    answer of its own. Training first learns the answers' form (the held-out loss falls), then memorizes
    its own answers, which makes the held-out ones, to the same prompts, less likely (it rises again)."""
    import random

    from sasft_ray.data import is_heldout, to_messages

    rng = random.Random(3)

    def row(prompt: str, heldout: bool) -> dict:
        while True:  # an answer that lands the row in the split wanted (the split hashes the content)
            raw = {"instruction": prompt, "output": "ANS=" + "".join(rng.choice("abcdefghij") for _ in range(8))}
            if is_heldout(to_messages(raw, "row"), fraction) == heldout:
                return raw

    rows = []
    for _ in range(words):
        prompt = "Double every letter of " + "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 6)))
        rows += [row(prompt + ".", False), row(prompt + ".", True)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def overfit(tiny_llama, local_ray, tmp_path_factory):
    """train.select best_task on a task that overfits, Ray Train keeping its latest checkpoint only
    (keep_checkpoints 1), a worker killed at step 26, every record tracked (W&B offline: the driver's
    WANDB_MODE reaches the workers)."""
    tmp = tmp_path_factory.mktemp("overfit")
    data = _memorized_task(tmp / "task.jsonl")
    cfg = make_config(tmp, tiny_llama, data={"heldout_fraction": 0.5},
                      train={**TRAIN, "method": "sft", "max_steps": 32, "checkpoint_every": 4, "log_every": 4,
                             "keep_checkpoints": 1, "keep_checkpoints_after_export": True, "select": "best_task",
                             "report_to": ["tensorboard", "mlflow", "wandb"]})
    assert cfg.data.path == str(data)
    rd = RunDir(cfg.run_dir)
    generate(cfg, rd)
    assert rd.stage_info("task")["train_rows"] == 16
    with pytest.MonkeyPatch.context() as env:
        env.setenv(FAIL_ONCE_AT_STEP, "26")
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        record = train(cfg, rd)
    return cfg, rd, record


def test_best_task_exports_the_checkpoint_of_the_lowest_held_out_loss_kept_past_retention(overfit):
    """The held-out loss is lowest before the end; Ray Train keeps only its latest checkpoint, so the chosen one
    survives as the project's copy, across a worker killed on the way, and the export holds its weights, not the
    last step's."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from sasft_ray.selection import keep, losses_by_step

    _, rd, record = overfit
    events = train_events(rd)
    assert ("resumed", 24) in [(e["event"], e["step"]) for e in events]  # a worker died at 26
    train_loss = {e["step"]: e["loss"] for e in events if "loss" in e}
    assert train_loss[28] < train_loss[24]  # resumed from step 24's weights, not the base model's (far higher)
    losses = {c["step"]: c["heldout_loss"] for c in record["curve"]}
    assert list(losses) == list(range(4, 33, 4))
    best = max(losses, key=lambda step: (-losses[step], step))  # the lowest; ties: the later
    print("held-out loss by step:", losses)
    assert best < 32 and losses[32] > losses[best]  # it overfit: the best is not the last
    chosen = record["selected"]
    assert chosen["rule"] == "best_task" and chosen["step"] == best and chosen["task_loss"] == losses[best]
    assert json.loads(Path(rd.local(MODEL, TRAIN_RESULT)).read_text())["selected"] == chosen
    assert rd.stage_info("train")["selected"] == chosen  # in the manifest
    # the exported model, measured again on the held-out split, is the chosen checkpoint's
    assert record["heldout_loss"] == pytest.approx(losses[best], rel=1e-5)

    # Ray Train kept its latest only; the copies hold what may still be chosen, the chosen one among them
    ray_checkpoints = [p for p in Path(rd.local(RAY_TRAIN)).glob("checkpoint_*") if p.is_dir()]
    assert len(ray_checkpoints) == 1
    copies = {int(p.name.removeprefix(KEPT_STEP)) for p in Path(rd.local(KEPT_DIR)).iterdir()}
    assert copies == keep("best_task", 0.02, losses_by_step(events)) - {32} == {best}
    assert record["checkpoint"] == rd.path(kept(best))

    exported = load_file(str(Path(rd.local(MODEL, "model.safetensors"))))
    chosen_weights = get_fp32_state_dict_from_zero_checkpoint(record["checkpoint"], tag="ds")
    last_weights = get_fp32_state_dict_from_zero_checkpoint(str(ray_checkpoints[0]), tag="ds")
    assert set(exported) == set(chosen_weights)
    for key, value in chosen_weights.items():
        assert torch.equal(exported[key], value.to(exported[key].dtype)), key
    assert not all(torch.equal(exported[key], value) for key, value in last_weights.items())


def _tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value from TensorBoard event files (TFRecords: length, crc, an Event, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        while data:
            (length,) = struct.unpack("<Q", data[:8])
            event = Event.FromString(data[12:12 + length])
            data = data[12 + length + 4:]
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_training_is_tracked_in_tensorboard_mlflow_and_wandb_as_in_its_events(overfit):
    """Every record of train-events.jsonl in TensorBoard and MLflow with the same values, across the
    worker's restart (one MLflow run, found again by its id); W&B offline, the same run resumed; the
    evaluation's scores land in that run at the last step."""
    from mlflow.tracking import MlflowClient

    from sasft_ray.tracking import log_scores, mlflow_local_uri, run_id

    cfg, rd, _ = overfit
    records = {e["step"]: e for e in train_events(rd) if e["event"] in ("log", "checkpoint")}
    scalars = _tensorboard_scalars(Path(rd.local(TENSORBOARD)))
    assert scalars["train/loss"] == pytest.approx({step: e["loss"] for step, e in records.items()})
    assert scalars["train/heldout_loss"] == pytest.approx(
        {step: e["heldout_loss"] for step, e in records.items() if "heldout_loss" in e})

    client = MlflowClient(mlflow_local_uri(rd))
    (run,) = client.search_runs([client.get_experiment_by_name("sasft-ray").experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/grad_norm")}
    assert history == pytest.approx({step: e["grad_norm"] for step, e in records.items()})
    assert run.data.params["train.lr"] == "0.005" and run.data.tags["sasft_run_id"] == run_id(rd)
    wandb_runs = list(Path(rd.local(TRACKING, "wandb")).glob(f"offline-run-*-{run_id(rd)}*"))
    assert len(wandb_runs) == 2  # started, then resumed by the restarted worker group

    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        log_scores(cfg, rd, {"in-domain": {"exact": 0.25}})
    assert _tensorboard_scalars(Path(rd.local(TENSORBOARD)))["eval/in-domain/exact"] == {32: 0.25}
    scores = client.get_metric_history(run.info.run_id, "eval/in-domain/exact")
    assert [(m.step, m.value) for m in scores] == [(32, 0.25)]


@pytest.mark.parametrize("change, message", [
    ({"micro_batch_size": 64}, "do not fill one global batch"),
    ({"max_length": 16}, "no assistant token left"),
    ({"num_workers": 40}, "not enough resources"),
    ({"method": "freeze", "freeze_layers": 2, "lora": LoraConfig()}, "leaves none of the model's 2 blocks"),
    ({"packing": True, "micro_batch_size": 32}, "58 training packed sequences do not fill one global batch"),
])
def test_config_errors_stop_before_any_worker(task_run, tmp_path, change, message):
    cfg, rd = task_run
    bad = cfg.model_copy(update={"train": cfg.train.model_copy(update=change)})
    with pytest.raises(TrainSetupError, match=message):
        train(bad, rd, force=True)


def test_the_gpu_check_passes_on_cpu(tmp_path):
    """`jobs/check_gpu.py` (one GPU node: the library's loop fed as Ray Data feeds it, bf16 ZeRO-3 over
    NCCL, export, packing, the planner's figures) runs the same code on CPU in fp32 over gloo, so it
    does not rot between GPU sessions."""
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "jobs/check_gpu.py", "--cpu", "--seq", "64", "--micro-batch", "2",
                           "--scale-steps", "4", "--json", str(out)], cwd=Path(__file__).parents[2],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    checks = result["correctness"]["checks"]
    assert len(checks) == 5 and all(checks.values()), checks
    assert [s["gradient_checkpointing"] for s in result["scale"]] == [False, True]  # a tiny shape on CPU
    for scale in result["scale"]:
        assert scale["tokens_per_s"] > 0 and scale["planned_states_gib"] > 0 and "oom" not in scale
        assert len(scale["losses"]) == 2  # records at steps 2 and 4
    assert result["scale"][1]["planned_blocks_gib"] < result["scale"][0]["planned_blocks_gib"]


def _loop_without_ray(model_path: str, tmp: str, variants: list[dict]) -> list[dict]:
    """In a fresh process, as `jobs/check_gpu.py` drives it: `sasft_ray.loop` in a one-process gloo group,
    fed by `device_batches`, a few ZeRO-3 steps per variant of the train section."""
    from sasft_ray import loop

    loop.init_process_group(gpu=False)
    rows = _encoded_examples(model_path, n=16)
    return [_train_alone(make_config(Path(tmp) / str(i), model_path, train={
        **TRAIN, "num_workers": 1, "max_steps": 4, "log_every": 1, "checkpoint_every": 4, **section}), rows)
        for i, section in enumerate(variants)]


def _train_alone(cfg, rows: list[dict]) -> dict:
    """Each step's loss, the last record's step and DeepSpeed's optimizer steps, the weights still equal to the
    base model's after training, and the bytes autograd saves for backward in one training forward
    (parameters, gathered by ZeRO-3 at that moment, left out)."""
    import deepspeed

    from sasft_ray import loop

    pad_id = load_tokenizer(cfg.model.path).pad_token_id
    engine, *_ = loop.build_engine(cfg, 4, rank=0)
    # ZeRO-3 (every variant here), run with the persistence threshold the rule gives
    assert engine._config.zero_config.param_persistence_threshold == 10 * engine.module.config.hidden_size
    records: list[dict] = []
    loop.run(engine, cfg, lambda step: loop.device_batches(rows, 4, pad_id, engine.device), {},
             total_steps=4, log=records.append)
    base = load_file(str(Path(cfg.model.path, "model.safetensors")))
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        unchanged = {name for name, p in params.items() if name in base and torch.equal(p.detach().cpu(), base[name])}
    saved: dict[int, int] = {}

    def pack(t):
        params = {p.data.untyped_storage().data_ptr() for p in engine.module.parameters()}
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    batch = next(loop.device_batches(rows, 4, pad_id, engine.device))
    batch.pop("num_tokens")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        engine(**batch)
    return {"losses": [r["loss"] for r in records], "steps": (records[-1]["step"], records[-1]["optimizer_steps"]),
            "unchanged": unchanged, "saved": sum(saved.values())}


def test_gradient_checkpointing_gives_the_same_loss_with_less_saved_memory(tiny_llama, tmp_path):
    """Full, LoRA and freeze (frozen embeddings: the blocks' inputs need no grad, where reentrant
    checkpointing would train nothing) under ZeRO-3: the same losses step by step with and without
    `train.gradient_checkpointing`, and less memory kept for backward with it. Freeze keeps its frozen
    weights bit-identical (the export writes them as the engine holds them: `test_export_equals_...`), and
    with 2 micro-batches a step, our step count is DeepSpeed's."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    methods = {"full": {}, "lora": {"lora": {"r": 4}},
               "freeze": {"method": "freeze", "freeze_layers": 1, "grad_accum": 2}}
    variants = [{**m, "gradient_checkpointing": ckpt} for m in methods.values() for ckpt in (False, True)]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = pool.submit(_loop_without_ray, tiny_llama, str(tmp_path), variants).result()
    for name, off, on in zip(methods, results[::2], results[1::2]):
        assert len(off["losses"]) == 4 and off["losses"][-1] < off["losses"][0], name  # it trains
        assert on["losses"] == pytest.approx(off["losses"], abs=1e-5), name
        assert on["saved"] < 0.6 * off["saved"], (name, on["saved"], off["saved"])
        print(f"{name}: saved for backward with checkpointing {on['saved'] / off['saved']:.0%} of without")
        assert off["steps"] == on["steps"] == (4, 4), name
    base = load_file(str(Path(tiny_llama, "model.safetensors")))
    frozen = {key for key in base if "embed_tokens." in key or ".layers.0." in key}
    assert results[4]["unchanged"] == results[5]["unchanged"] == frozen
    assert not results[0]["unchanged"]  # full fine-tuning changed every weight


def test_weight_drift_of_a_hub_model_reads_the_hf_cache_stand_in_for_the_hub(tiny_llama, tmp_path, monkeypatch):
    """A hub id's base weights are found where transformers cached them (a cache laid out by hand here,
    as the hub would leave it); missing ones make drift.json say why, not hold nothing."""
    import shutil

    import huggingface_hub.constants

    from sasft_ray.export import weight_drift

    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(Path(tiny_llama, "model.safetensors"), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    state = load_file(str(Path(tiny_llama, "model.safetensors")))
    state["model.layers.0.mlp.down_proj.weight"] += 0.1
    drift = weight_drift("org/tiny", state)
    assert drift == weight_drift(tiny_llama, state) and drift["total"] > 0 and drift["layers.000"] > 0
    assert drift["layers.001"] == 0
    missing = weight_drift("org/absent", state)
    assert list(missing) == ["unavailable"] and "org/absent" in missing["unavailable"]


def _ranks(world: int, fn, *args):
    """`fn(*args)` in `world` fresh processes, one gloo process group over them, as `torchrun` would start
    them (`loop.init_process_group` reads who is who from the environment); returns rank 0's result."""
    import multiprocessing

    from tests.conftest import free_port

    ctx, port = multiprocessing.get_context("spawn"), free_port()
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=_rank_main, args=(rank, world, port, fn, args, results)) for rank in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        return results[0]


def _rank_main(rank: int, world: int, port: int, fn, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    from sasft_ray import loop

    loop.init_process_group(gpu=False)
    out = fn(*args)
    if rank == 0:
        results[0] = out


def _step_gradients(model_path: str, tmp: str, rows: list[dict], groupings: list[tuple[int, int]]) -> list[dict]:
    """For each (micro_batch_size, grad_accum): one optimizer step of `sasft_ray.loop` under ZeRO-3 over `rows`
    (this rank's share: every world-th row), and the full gradient DeepSpeed hands its optimizer."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for i, (micro, accum) in enumerate(groupings):
        cfg = make_config(Path(tmp) / f"{world}-{i}", model_path, train={
            **TRAIN, "num_workers": world, "micro_batch_size": micro, "grad_accum": accum, "max_steps": 1})
        out.append(_one_step_gradient(cfg, rows, rank, world))
    return out


def _one_step_gradient(cfg, rows: list[dict], rank: int, world: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    from sasft_ray import loop

    pad_id = load_tokenizer(cfg.model.path).pad_token_id
    engine, *_ = loop.build_engine(cfg, 1, rank=rank)
    grads: dict[str, torch.Tensor] = {}
    optimizer_step = engine.optimizer.step

    def step_and_capture(*a, **k):  # what the optimizer is given: every rank gathers the full gradients
        grads.update({n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()})
        return optimizer_step(*a, **k)

    engine.optimizer.step = step_and_capture
    loop.run(engine, cfg, lambda step: loop.device_batches(rows, cfg.train.micro_batch_size, pad_id, engine.device,
                                                           rank=rank, world=world), {}, total_steps=1)
    return grads


def _gradient(model_path: str, rows: list[dict], groups: list[list[int]]) -> dict[str, torch.Tensor]:
    """Plain PyTorch, no DeepSpeed: the gradient of the mean over `groups` of each group's mean loss per target
    token. One group of every row: every target token weighs the same."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)
    model.train()
    for group in groups:
        batch = collate({k: [rows[i][k] for i in group] for k in ("input_ids", "labels")}, pad_id=0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=IGNORE)
        (loss / len(groups)).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_every_target_token_weighs_the_same_however_the_rows_are_batched(tiny_llama, tmp_path):
    """One optimizer step over the same 8 rows, short task rows and long self-dialogues, as 1 x 8, 4 x 2
    and 2 x 4 micro-batches on one rank, and 2 x 2 and 1 x 4 on each of 2 ranks: the gradient DeepSpeed
    hands its optimizer is the same within float tolerance, and it is the gradient of the mean loss over
    every target token of the 8 rows. Weighing each micro-batch's mean loss alike (as before) gives
    another gradient for these rows."""
    tok = load_tokenizer(tiny_llama)
    task = [[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
            for r in demo_task_rows(4)]
    talk = [[*d[:-1], {**d[-1], "content": " ".join([d[-1]["content"]] * 4)}] for d in warmup_dialogues(4)]
    rows = [seq for m in task + talk for seq in encode(tok, m, max_length=128)]  # short task rows, long dialogues
    targets = [sum(lab != IGNORE for lab in r["labels"][1:]) for r in rows]
    assert max(targets) > 3 * min(targets), targets
    reference = _gradient(tiny_llama, rows, [list(range(8))])
    one_rank = _ranks(1, _step_gradients, tiny_llama, str(tmp_path), rows, [(8, 1), (2, 4), (4, 2)])
    two_ranks = _ranks(2, _step_gradients, tiny_llama, str(tmp_path), rows, [(2, 2), (4, 1)])

    def distance(a: dict, b: dict) -> float:
        diff = sum(float((a[k] - b[k]).double().square().sum()) for k in b)
        return (diff / sum(float(v.double().square().sum()) for v in b.values())) ** 0.5

    for grads in one_rank + two_ranks:
        assert set(grads) == set(reference)
        assert distance(grads, reference) < 1e-5
    by_micro_batch = _gradient(tiny_llama, rows, [[0, 1], [2, 3], [4, 5], [6, 7]])
    assert distance(by_micro_batch, reference) > 1e-2  # the test can tell the two weightings apart


def _killed_then_resumed(model_path: str, tmp: str) -> dict[str, dict[int, list[int]]]:
    """`sasft_ray.loop` under ZeRO-3 with the very data path of a Ray Train worker (`epoch_batches`): a run
    checkpoints every 3 steps and dies after step 8; a new engine loads the checkpoint of step 6 and trains
    on to step 12. Returns each run's rows (their indices) trained at each step."""
    from sasft_ray import loop

    tok = load_tokenizer(model_path)
    rows = [seq for i in range(20) for seq in encode(tok, [{"role": "user", "content": f"Question {i}?"},
                                                          {"role": "assistant", "content": f"Answer {i}."}], 128)]
    index = {tuple(r["input_ids"]): i for i, r in enumerate(rows)}
    cfg = make_config(Path(tmp), model_path, train={**TRAIN, "num_workers": 1, "micro_batch_size": 2, "grad_accum": 2,
                                                     "max_steps": 12, "checkpoint_every": 3, "log_every": 3})
    per_epoch = len(rows) // cfg.global_batch  # 5

    class Killed(Exception):
        pass

    def train(step: int, kill_after: int | None) -> dict[int, list[int]]:
        engine, *_ = loop.build_engine(cfg, 12, rank=0)
        if step:
            _, client = engine.load_checkpoint(str(Path(tmp, f"ckpt-{step}")), tag="ds")
            assert client["step"] == step
        micro_batches: list[list[int]] = []
        trained: dict[int, list[int]] = {}

        def batches(step: int):
            for batch in loop.epoch_batches(loop.in_windows(rows), cfg, per_epoch, tok.pad_token_id, step):
                micro_batches.append([index[tuple(ids[mask.bool()].tolist())]
                                      for ids, mask in zip(batch["input_ids"], batch["attention_mask"])])
                yield batch

        def after_step(step: int) -> None:  # the loop pulls a step's micro-batches only: those are its rows
            trained[step] = [i for mb in micro_batches for i in mb]
            micro_batches.clear()
            if step == kill_after:
                raise Killed

        def save(step: int, record: dict) -> None:
            engine.save_checkpoint(str(Path(tmp, f"ckpt-{step}")), tag="ds", client_state={"step": step})

        try:
            loop.run(engine, cfg, batches, {}, total_steps=12, step=step, checkpoint=save, after_step=after_step)
        except Killed:
            pass
        return trained

    return {"killed": train(0, kill_after=8), "resumed": train(6, kill_after=None)}


def test_a_run_killed_mid_epoch_trains_every_row_of_that_epoch_once(tiny_llama, tmp_path):
    """20 rows, 4 a step: epochs of 5 steps. Killed after step 8, resumed from step 6's checkpoint (mid-epoch):
    the steps the model keeps (1-6 of the first run, 7-12 of the second) train each epoch's 20 rows exactly
    once, and steps 7-8 again on the very rows the killed run had given them."""
    runs = _ranks(1, _killed_then_resumed, tiny_llama, str(tmp_path))
    killed, resumed = runs["killed"], runs["resumed"]
    assert list(killed) == list(range(1, 9)) and list(resumed) == list(range(7, 13))
    kept = {**{s: killed[s] for s in range(1, 7)}, **resumed}
    for epoch in (0, 1):
        rows = [i for s in range(5 * epoch + 1, 5 * epoch + 6) for i in kept[s]]
        assert sorted(rows) == list(range(20)), (epoch, rows)
    assert resumed[7] == killed[7] and resumed[8] == killed[8]
    assert kept[1] + kept[2] != kept[6] + kept[7]  # epoch 1 is not epoch 0 again
