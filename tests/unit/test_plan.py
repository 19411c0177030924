"""`sasft plan`: its figures against DeepSpeed's own estimator and against what HF models really hold."""

import contextlib
import io
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from sasft_ray.cli import main
from sasft_ray.plan import (
    GIB,
    KNOWN,
    Cluster,
    activation_bytes,
    engine_memory,
    load_arch,
    model_states,
    plan_text,
    scratch_disks,
    smallest_tp,
    train_plan,
    train_time,
    trainable_params,
)
from tests.conftest import make_config

L3_8B, L3_70B, QWEN_7B = (KNOWN["meta-llama/Meta-Llama-3-8B-Instruct"], KNOWN["meta-llama/Meta-Llama-3-70B-Instruct"],
                          KNOWN["Qwen/Qwen2.5-7B-Instruct"])
# DeepSpeed counts 18 bytes per parameter for ZeRO-3 model states without offload; we count the ZeRO
# paper's 16 plus the fp32 gradient copy of one sub-group (1e9 params) that DeepSpeed makes at each step.
# Everything else (offload, ZeRO-2) is the same sum and must agree to the byte.
ZERO3_NO_OFFLOAD_TOLERANCE = 0.12


def _tiny(kind: str, layers: int, tied: bool = False, attn: str = "sdpa"):
    """A tiny llama, qwen2 or gemma2 (head_dim 128 over hidden 256 / 4 heads, soft-capped, its own tying)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen2Config

    kw = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512, attn_implementation=attn)
    cfg = Gemma2Config(head_dim=128, **kw) if kind == "gemma2" else \
        (LlamaConfig if kind == "llama" else Qwen2Config)(tie_word_embeddings=tied, **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)


@pytest.mark.parametrize("kind, tied", [("llama", False), ("qwen2", True), ("gemma2", True)])
def test_shape_from_config_json_counts_parameters_like_deepspeed(tmp_path, kind, tied):
    from deepspeed.runtime.zero.stage3 import model_to_params

    model = _tiny(kind, layers=2, tied=tied)
    model.config.save_pretrained(tmp_path)
    arch, source = load_arch(str(tmp_path))
    assert source.endswith("config.json")  # no "formulas assume" note: the model type is counted
    assert (arch.params, arch.largest_layer) == model_to_params(model)
    assert arch.tied == tied and arch.hd == (128 if kind == "gemma2" else 64)


@pytest.mark.parametrize("train", [
    {"method": "freeze", "freeze_layers": 1},
    {"lora": {"r": 4}},
    {"method": "freeze", "freeze_layers": 1, "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}},
], ids=["freeze", "lora-all-linear", "lora-freeze-qv"])
def test_trainable_parameters_match_the_training_code(tmp_path, train):
    """What `sasft_ray.loop` hands the optimizer (PEFT adapters, frozen blocks) against the planner's count."""
    from sasft_ray import lora
    from sasft_ray.loop import frozen_prefixes

    model = _tiny("llama", layers=3)
    model.config.save_pretrained(tmp_path)
    cfg = make_config(tmp_path, model_path=str(tmp_path), train=train)
    t = cfg.train
    if t.lora:
        model = lora.apply_lora(model, t.lora.r, t.lora.alpha, t.lora.dropout, t.lora.target_modules,
                                first_layer=t.freeze_layers if t.method == "freeze" else 0)
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(not any(piece in name for piece in frozen_prefixes(t.freeze_layers)))
    assert trainable_params(load_arch(str(tmp_path))[0], cfg) == lora.parameter_counts(model)[0]


@pytest.mark.parametrize("hub_id, billions", [
    ("meta-llama/Meta-Llama-3-8B-Instruct", 8.03), ("meta-llama/Meta-Llama-3-70B-Instruct", 70.55),
    ("Qwen/Qwen2.5-7B-Instruct", 7.62), ("Qwen/Qwen2.5-0.5B-Instruct", 0.49), ("meta-llama/Llama-2-7b-chat-hf", 6.74),
    ("meta-llama/Llama-3.1-8B-Instruct", 8.03), ("mistralai/Mistral-7B-Instruct-v0.3", 7.25),
    ("google/gemma-2-9b-it", 9.24)])
def test_known_models_have_their_published_sizes(hub_id, billions):
    assert load_arch(hub_id)[0].params / 1e9 == pytest.approx(billions, abs=0.01)


def test_unknown_model_asks_for_its_shape():
    from sasft_ray.config import ConfigError

    with pytest.raises(ConfigError, match="--arch"):
        load_arch("someone/unknown-model")
    arch, _ = load_arch("someone/unknown-model", "hidden=4096,layers=32,heads=32,kv_heads=8,intermediate=14336,"
                                                   "vocab=128256")
    assert arch == L3_8B


@pytest.mark.parametrize("arch", [L3_8B, L3_70B, QWEN_7B], ids=["llama3-8b", "llama3-70b", "qwen2.5-7b"])
@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_zero3_model_states_agree_with_deepspeeds_estimator(arch, nodes, capsys):
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_cold,
    )

    n = 8 * nodes
    for offload_opt, offload_params in ((True, True), (True, False), (False, False)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            arch.params, arch.largest_layer, num_gpus_per_node=8, num_nodes=nodes, cpu_offload=offload_opt,
            cpu_offload_params=offload_params, zero_init=True, additional_buffer_factor=1.0)
        ours = model_states(arch, 3, n, offload_opt, offload_params)
        assert ours.cpu_per_node == pytest.approx(cpu, abs=1)
        if offload_opt:
            assert ours.states == pytest.approx(gpu, abs=1)
        else:
            assert ours.states == pytest.approx(gpu, rel=ZERO3_NO_OFFLOAD_TOLERANCE)

    # The printed table of the estimator the DeepSpeed docs point to says the same (GiB, 2 decimals).
    estimate_zero3_model_states_mem_needs_all_cold(arch.params, arch.largest_layer, num_gpus_per_node=8,
                                                   num_nodes=nodes, additional_buffer_factor=1.0)
    rows = re.findall(r"([\d.]+)GB \|\s*([\d.]+)GB \| offload_param=([\w.]+)\s*, offload_optimizer=([\w.]+)\s*, "
                      r"zero_init=1", capsys.readouterr().out)
    assert len(rows) == 3
    for cpu_gb, gpu_gb, param_dev, opt_dev in rows:  # devices print as "none" or "cpu" / "OffloadDeviceEnum.cpu"
        ours = model_states(arch, 3, n, opt_dev.endswith("cpu"), param_dev.endswith("cpu"))
        assert ours.cpu_per_node / GIB == pytest.approx(float(cpu_gb), abs=0.01)
        tol = dict(abs=0.01) if opt_dev.endswith("cpu") else dict(rel=ZERO3_NO_OFFLOAD_TOLERANCE)
        assert ours.states / GIB == pytest.approx(float(gpu_gb), **tol)


@pytest.mark.parametrize("arch", [L3_8B, L3_70B])
@pytest.mark.parametrize("n", [8, 16, 64])
def test_zero2_gpu_states_agree_with_deepspeeds_estimator(arch, n):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    for offload in (False, True):
        _, gpu = estimate_zero2_model_states_mem_needs(arch.params, num_gpus_per_node=8, num_nodes=n // 8,
                                                       cpu_offload=offload, additional_buffer_factor=1.0)
        assert model_states(arch, 2, n, offload_optimizer=offload).states == pytest.approx(gpu, abs=1)


def test_lora_keeps_optimizer_state_for_the_adapters_only():
    full = model_states(L3_70B, 3, 8)
    adapters = model_states(L3_70B, 3, 8, trainable=10**8)
    assert adapters.params == full.params  # the frozen base weights are still sharded over the GPUs
    assert (adapters.grads, adapters.optim) == (2 * 10**8 / 8, 16 * 10**8 / 8)  # vs 17.6 and 110 GB in full


def test_refused_offload_combinations_are_named():
    assert "ZeRO >= 1" in model_states(L3_8B, 0, 8, offload_optimizer=True).refused
    assert "ZeRO-3" in model_states(L3_8B, 2, 8, offload_optimizer=True, offload_params=True).refused


def _saved_activation_bytes(model, batch: int, seq: int) -> int:
    """Bytes autograd keeps for backward in one training forward pass, parameters left out."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(saved.values())


@pytest.mark.parametrize("kind, attn", [("llama", "sdpa"), ("qwen2", "sdpa"), ("llama", "eager"), ("gemma2", "sdpa"),
                                        ("gemma2", "eager")])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_activations_match_what_transformers_saves(kind, attn, checkpointing):
    """Per block and token, the formula against the tensors HF transformers really keeps (bf16; SDPA, or eager
    attention with its s x s scores, soft-capped for Gemma-2); two depths, so that embeddings, final norm and
    loss cancel out."""
    from sasft_ray.plan import arch_from_config

    batch, seq = 2, 64
    measured = []
    for layers in (1, 3):
        model = _tiny(kind, layers, attn=attn)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        measured.append(_saved_activation_bytes(model, batch, seq))
    arch = replace(arch_from_config(model.config.to_dict())[0], layers=1)
    per_block = (measured[1] - measured[0]) / 2
    if checkpointing:  # only the block's input stays; the recomputed block is transient
        assert per_block == batch * seq * arch.hidden * 2
    else:
        assert activation_bytes(arch, batch, seq, attn=attn)[0] == pytest.approx(per_block, rel=0.01)


def test_vllm_engine_kv_cache_and_tensor_parallel():
    cl = Cluster()
    em = engine_memory(L3_8B, 1, 8192, cl)
    assert em.kv_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB per token
    assert em.weights == pytest.approx(L3_8B.params * 2)
    assert em.kv_tokens == int((80 * 0.9 - 2) * GIB - em.weights) // em.kv_per_token
    assert smallest_tp(L3_8B, 8192, cl).tp == 1
    assert smallest_tp(L3_70B, 8192, cl).tp == 2  # 131 GiB of weights: two GPUs
    assert smallest_tp(L3_70B, 8192, Cluster(gpu_mem_gib=24)).tp == 8  # L4s: a whole 8-GPU node
    assert smallest_tp(L3_70B, 8192, Cluster(gpu_mem_gib=24, gpus_per_node=4)) is None


def _one_node_config(tmp_path, model, **train):
    return make_config(tmp_path, model_path=model, model={"path": model, "dtype": "bfloat16"},
                       train={"num_workers": 8, "zero_stage": 3, "micro_batch_size": 2, "max_length": 2048, **train},
                       resources={"use_gpu": True, "address": "auto"})


def test_8b_fits_one_node_and_70b_does_not_without_offload(tmp_path):
    cl = Cluster(gpu_mem_gib=80, gpus_per_node=8)
    small = train_plan(_one_node_config(tmp_path, "meta-llama/Meta-Llama-3-8B-Instruct"), L3_8B, cl)
    assert small.fits and small.need < 80 * GIB and not small.advice

    big = train_plan(_one_node_config(tmp_path, "meta-llama/Meta-Llama-3-70B-Instruct"), L3_70B, cl)
    assert not big.fits
    assert big.need > 2 * 80 * GIB  # 16 bytes/param over 8 GPUs alone is 131 GiB
    advice = "\n".join(big.advice)
    # What offload changes: the optimizer states go to CPU RAM (~1 TiB on the node), but at micro-batch
    # 2 x 2048 the activations still do not fit without gradient checkpointing.
    assert re.search(r"with ZeRO-3 offload optim: [\d.]+ GiB per GPU .* 1051 GiB CPU RAM per node: "
                     r"fits with train.gradient_checkpointing: true", advice)
    assert "without offload: no GPU count fits" in advice

    at_micro_1 = train_plan(_one_node_config(tmp_path, "x", micro_batch_size=1), L3_70B, cl)
    assert re.search(r"with ZeRO-3 offload optim\+params: [\d.]+ GiB .*: fits\n", "\n".join(at_micro_1.advice) + "\n")
    offloaded = _one_node_config(tmp_path, "x", micro_batch_size=1, offload_optimizer=True, offload_params=True)
    assert train_plan(offloaded, L3_70B, cl).fits
    # ...unless the node lacks the CPU RAM the offloaded states need.
    short = train_plan(offloaded, L3_70B, Cluster(cpu_mem_gib=512))
    assert not short.fits and "GiB CPU RAM per node, has 512" in short.advice[0]


def test_cli_prints_the_plan_and_exits_1_when_it_does_not_fit(tmp_path):
    raw = _one_node_config(tmp_path, "meta-llama/Meta-Llama-3-70B-Instruct").model_dump(mode="json")
    path = tmp_path / "llama3-70b.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(["plan", str(path), "--task-rows", "20000"])
    assert exit_.value.code == 1
    text = out.getvalue()
    assert re.search(r"DOES NOT FIT: ZeRO-3 needs [\d.]+ GiB per GPU, has 80", text)
    assert "smallest selftalk.engine.tensor_parallel_size that fits: 2" in text
    assert re.search(r"time: [\d,]+ steps", text)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", str(path), "--set", "model.path=meta-llama/Meta-Llama-3-8B-Instruct"]) == 0
    assert "fits: ZeRO-3 needs" in out.getvalue() and "pass --task-rows" in out.getvalue()



def test_the_plan_sizes_self_talk_by_lambda_and_refuses_a_smaller_pool(tmp_path):
    """20,000 task rows, 18,000 for training: λ 1 generates 18,000 x 1.25 dialogues (the monitor off here);
    a num_dialogues of 10,000 is refused as `sasft generate` would refuse it, both numbers named."""
    cfg = _one_node_config(tmp_path, "meta-llama/Meta-Llama-3-8B-Instruct")
    text, fits = plan_text(cfg, L3_8B, "built-in table", Cluster(), task_rows=20000)
    assert fits and "22,500 dialogues" in text and "REFUSED" not in text
    assert train_time(cfg, L3_8B, Cluster(), 20000)[0] == 36000 // cfg.global_batch
    pinned = cfg.model_copy(update={"selftalk": cfg.selftalk.model_copy(update={"num_dialogues": 10000})})
    text, fits = plan_text(pinned, L3_8B, "built-in table", Cluster(), task_rows=20000)
    assert not fits and "REFUSED: selftalk.num_dialogues 10000 is fewer than the 18000 self-dialogues" in text
    text, _ = plan_text(cfg, L3_8B, "built-in table", Cluster())
    assert "unknown dialogue count" in text

def test_the_planned_steps_are_the_steps_training_takes_over_the_mix(tmp_path):
    """20,000 task rows, 18,000 for training, λ 1 and a source at weight 0.5: the mix writes 18,000 + 18,000 +
    9,000 rows, and the planner counts the steps training counts over them; with packing, as an upper bound."""
    from sasft_ray.train import check_before_work

    cfg = make_config(tmp_path, mix={"sources": [{"path": "replay.jsonl", "weight": 0.5}]},
                      train={"num_workers": 8, "micro_batch_size": 2}, resources={"use_gpu": True})
    rows = 18000 + 18000 + 9000
    assert cfg.mix_rows(18000) == rows
    assert train_time(cfg, L3_8B, Cluster(), 20000)[0] == check_before_work(cfg, rows, rows) == rows // 16
    packed = _one_node_config(tmp_path, "meta-llama/Meta-Llama-3-8B-Instruct", packing=True)
    assert "at most 2,250 steps x 16 packed sequences" in plan_text(packed, L3_8B, "built-in table", Cluster(),
                                                                  task_rows=20000)[0]


CLUSTER_CONFIGS = Path(__file__).parents[2] / "sasft_ray" / "configs" / "cluster"
# Published parameter counts (the hub's model cards and safetensors totals), in billions
PUBLISHED = {"meta-llama/Meta-Llama-3-8B-Instruct": 8.03, "meta-llama/Llama-3.1-8B-Instruct": 8.03,
             "meta-llama/Meta-Llama-3-70B-Instruct": 70.55, "Qwen/Qwen2.5-7B-Instruct": 7.62,
             "mistralai/Mistral-7B-Instruct-v0.3": 7.25, "google/gemma-2-9b-it": 9.24}


@pytest.mark.parametrize("name", sorted(p.stem for p in CLUSTER_CONFIGS.glob("*.yaml")))
def test_report_of_the_shipped_cluster_configs_fits(name):
    """Every config in sasft_ray/configs/cluster loads, is planned from the built-in table at its model's published size
    (within 2%), and fits its nodes of 8 x 80 GB, as `sasft plan CONFIG --task-rows 20000` prints it."""
    from sasft_ray.config import load_config

    cfg = load_config(str(CLUSTER_CONFIGS / f"{name}.yaml"))
    arch, source = load_arch(cfg.model.path)
    assert source == "built-in table"
    assert arch.params / 1e9 == pytest.approx(PUBLISHED[cfg.model.path], rel=0.02)
    text, fits = plan_text(cfg, arch, source, Cluster(), task_rows=20000)
    assert fits, text
    assert "NOTE" not in text, text


def test_gemma2_is_counted_as_gemma2():
    """Gemma-2's shapes: head_dim 256 apart from hidden / heads, four norms, tied embeddings; eager attention's
    scores are what its config's gradient checkpointing is for, and SDPA's dropped soft-capping is named."""
    from sasft_ray.config import load_config

    gemma = KNOWN["google/gemma-2-9b-it"]
    assert gemma.hd == 256 and gemma.linears()["q_proj"] == (3584, 4096) and gemma.tied
    assert gemma.params == 9_241_705_984 and KNOWN["mistralai/Mistral-7B-Instruct-v0.3"].params == 7_248_023_552
    path = str(CLUSTER_CONFIGS / "gemma2-9b.yaml")
    cfg = load_config(path)
    assert cfg.selftalk.system_prompt is None and cfg.train.attn_implementation == "eager"
    eager, sdpa = (sum(activation_bytes(gemma, 2, 2048, attn=a)) for a in ("eager", "sdpa"))
    assert eager > 80 * GIB > sdpa  # the s x s scores: eager training needs gradient checkpointing
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["plan", path, "--task-rows", "20000", "--set", "train.gradient_checkpointing=false"])
    assert "fits with train.gradient_checkpointing: true" in out.getvalue()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", path, "--task-rows", "20000", "--set", "train.attn_implementation=sdpa"]) == 0
    assert "sdpa drops the model's attention soft-capping" in out.getvalue()


def test_70b_fits_two_nodes_with_the_gradient_checkpointing_switch_only():
    """The 70B config fits 16 x 80 GB because of train.gradient_checkpointing; the 8B config pointed at
    70B (no checkpointing) does not, and the planner names the switch; recomputation is timed."""
    root = CLUSTER_CONFIGS
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", str(root / "llama3-70b.yaml"), "--task-rows", "20000"]) == 0
    assert "(train.gradient_checkpointing on)" in out.getvalue()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(["plan", str(root / "llama3-70b.yaml"), "--set", "train.gradient_checkpointing=false"])
    assert exit_.value.code == 1 and "fits with train.gradient_checkpointing: true" in out.getvalue()
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit_:
        main(["plan", str(root / "llama3-8b.yaml"), "--set", "model.path=meta-llama/Meta-Llama-3-70B-Instruct"])
    assert exit_.value.code == 1

    from sasft_ray.config import load_config

    on = load_config(str(root / "llama3-70b.yaml"))
    off = load_config(str(root / "llama3-70b.yaml"), ["train.gradient_checkpointing=false"])
    assert sum(train_plan(on, L3_70B, Cluster()).act) < sum(train_plan(off, L3_70B, Cluster()).act) / 10
    seconds = [train_time(c, L3_70B, Cluster(), 20000)[2] for c in (on, off)]
    assert seconds[0] / seconds[1] == pytest.approx(8 / 6, rel=0.01)  # one more forward: 8P FLOPs a token, not 6P


def test_the_70b_training_workers_ask_for_what_the_plan_counts():
    """What `sasft train` hands Ray Train for the 70B config, built without a GPU: 16 one-GPU workers of the
    accelerator type the config names, packed onto the 2 nodes the planner counts."""
    from sasft_ray.config import load_config
    from sasft_ray.train import scaling_config

    cfg = load_config(str(CLUSTER_CONFIGS / "llama3-70b.yaml"))
    sc = scaling_config(cfg)
    assert (sc.num_workers, sc.use_gpu, sc.accelerator_type, sc.placement_strategy) == (16, True, "H100", "PACK")
    assert sc._resources_per_worker_not_none == {"CPU": 8, "GPU": 1, "accelerator_type:H100": 0.001}  # Ray's label
    text, _ = plan_text(cfg, *load_arch(cfg.model.path), Cluster(), task_rows=20000)
    assert "train  16 workers x 1 GPU: 16 GPUs, 2 node(s)" in text
    assert "+ CPU optimizer steps (DeepSpeedCPUAdam)" in text  # offloaded, on GPU nodes: the fused CPU Adam
    # 12 bytes x 70.55 B parameters, 8 of the 16 ranks on each node
    assert "checkpoint: 847 GB in run_dir; each node's temporary folder (TMPDIR) holds its ranks' 423 GB" in text
    assert scaling_config(load_config(str(CLUSTER_CONFIGS / "llama3-70b.yaml"),
                                      ["resources.use_gpu=false"])).accelerator_type is None


def test_the_planner_counts_one_engine_pool_and_refuses_a_cluster_too_small_for_it():
    """Self-talk holds `selftalk.engine.concurrency` engines (each every turn and role), not one pool per turn
    and role; with --nodes, a stage whose engines or workers cannot all start at once is refused."""
    path = str(CLUSTER_CONFIGS / "llama3-70b.yaml")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", path, "--task-rows", "20000", "--nodes", "2"]) == 0
    assert "generate  4 vLLM engine(s)" in out.getvalue() and "4 engines x TP 4 = 16 GPUs, 2 node(s)" in out.getvalue()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(["plan", path, "--task-rows", "20000", "--nodes", "1"])
    assert exit_.value.code == 1
    assert "DOES NOT FIT the cluster: generate needs 16 GPUs at once, 1 node(s) x 8 have 8" in out.getvalue()
    assert "DOES NOT FIT the cluster: train needs 16 GPUs at once" in out.getvalue()


def test_plan_refuses_a_cluster_file_whose_scratch_disk_is_smaller_than_a_nodes_checkpoint(tmp_path):
    """`sasft plan --cluster FILE` reads the scratch disk (TMPDIR) of each GPU node type: the shipped cluster
    files hold the 70B config's checkpoint shards (423 GB a node); a node type with less is refused, both
    numbers named, a launcher's machine type without local NVMe by its boot disk."""
    cluster = Path(__file__).parents[2] / "cluster"
    config = str(CLUSTER_CONFIGS / "llama3-70b.yaml")
    files = ["aws.yaml", "gcp.yaml", "kuberay/rayjob.yaml", "kuberay/rayservice.yaml"]
    assert all(disk > 0 for f in files for _, _, disk in scratch_disks(str(cluster / f)))
    for f in files:
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["plan", config, "--task-rows", "20000", "--cluster", str(cluster / f)]) == 0, f

    rayjob = (cluster / "kuberay/rayjob.yaml").read_text()
    small_volume = rayjob.replace("sizeLimit: 1Ti", "sizeLimit: 100Gi")
    small_ephemeral = rayjob.replace("emptyDir: {sizeLimit: 1Ti}", "ephemeral: {volumeClaimTemplate: {spec: {"
                                     "accessModes: [ReadWriteOnce], resources: {requests: {storage: 100Gi}}}}}")
    no_nvme = (cluster / "aws.yaml").read_text().replace("p5.48xlarge", "p5e.48xlarge").replace(
        "VolumeSize: 500", "VolumeSize: 200")
    for text, message in ((small_volume, "a gpu-8xh100 node gives TMPDIR 107 GB of scratch"),
                          (small_ephemeral, "a gpu-8xh100 node gives TMPDIR 107 GB of scratch"),
                          (no_nvme, "a gpu_8xh100 node gives TMPDIR 215 GB of scratch")):
        path = tmp_path / "cluster.yaml"
        path.write_text(text)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            main(["plan", config, "--task-rows", "20000", "--cluster", str(path)])
        assert exit_.value.code == 1
        assert f"DOES NOT FIT the cluster file: {message}, its ranks' checkpoint shards need 423 GB" in out.getvalue()


def test_the_planner_counts_the_evaluations_waves_not_every_served_model():
    """Three fine-tunes and their halfway models (7 engines of TP 4 with the base) need 28 GPUs at once, but
    an evaluation in waves of 2 models serves 8: the run fits 2 nodes, and the plan says what `sasft serve` of
    them all would take."""
    path = str(CLUSTER_CONFIGS / "llama3-70b.yaml")
    args = ["plan", path, "--task-rows", "20000", "--nodes", "2", "--set", "compare=[sft, freeze]",
            "--set", "export.interpolate=[0.5]"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 1 and "DOES NOT FIT the cluster: serve needs 28 GPUs at once" in out.getvalue()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*args, "--set", "eval.models_at_once=2"]) == 0
    assert "serves 2 model(s) at a time (eval.models_at_once): 2 of the 7 engines; `sasft serve` of them all " \
           "starts 7" in out.getvalue()
    assert "2 engines x TP 4 = 8 GPUs, 1 node(s)" in out.getvalue() and "DOES NOT FIT" not in out.getvalue()
