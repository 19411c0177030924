"""`sasft plan`: GPU memory, GPUs and hours per stage, from the config alone, before a cluster is spent.

Arithmetic on the model's shape: nothing is loaded, no network is used. Bytes, for P parameters,
N data-parallel GPUs, L the largest single layer (embedding or MLP projection), mixed precision:

Training, DeepSpeed ZeRO with Adam (as `sasft_ray.train` runs it)
  16-bit params 2P, 16-bit grads 2P, Adam fp32 master + 2 moments 12P (the ZeRO paper's 16 bytes),
  plus the fp32 copy of the grads DeepSpeed makes for the optimizer step, 4P. ZeRO-1 shards the
  optimizer state and that copy over N, ZeRO-2 also the grads, ZeRO-3 also the params; ZeRO-3 makes
  the fp32 copy one sub-group (1e9 params) at a time and gathers whole layers to compute (4L, the
  allowance of DeepSpeed's own estimator). offload_optimizer moves optimizer state + fp32 grads
  (16P) to CPU RAM; offload_params also the 16-bit params (ZeRO-3 only). fp32 training (bf16
  false): params 4P, grads 4P, moments 8P, no master copy.
Activations per GPU, per token of the micro-batch and per Llama/Qwen/Mistral block, as HF transformers saves
  them for backward (measured with torch's saved-tensor hooks in tests/unit/test_plan.py), 16-bit, SDPA
  attention (no s x s scores kept), no recomputation: 16h + 4q + 4·kv + 8·I + 4·heads + 8 bytes, q =
  heads·head_dim (= h unless head_dim says otherwise). Each RMSNorm keeps an fp32 copy of its input,
  its fp32 rsqrt and two 16-bit tensors (8h + 4); attention keeps Q, K, V and its output (4q + 4kv)
  and an fp32 log-sum-exp per head; the MLP keeps gate, up, act(gate), act·up (8I) (Korthikanti et
  al. 2022's count, redone for this block). Gemma-2's four norms a block compute in fp32 (the two
  before attention and MLP 10h + 4, the two after them 8h + 4): 36h + 16 instead of 16h + 8. Eager
  attention (`train.attn_implementation: eager`) also keeps each row's s x s scores: per token
  heads·s·6 bytes (the fp32 softmax, its 16-bit copy), 8 with Gemma-2's tanh soft-capping, and K, V
  repeated to every head (4(q − kv)), no log-sum-exp. With `train.gradient_checkpointing` a block
  keeps only its input (2h) and one block is recomputed at a time. Logits at the loss:
  tokens·vocab·(4 + 4 + 2): the fp32 log-softmax kept for backward, its gradient, the 16-bit gradient
  of the logits (+ 2: Gemma-2's soft-capped logits keep their tanh).
vLLM, per engine: weights 2P/TP per GPU; KV cache 2·layers·kv_heads·head_dim·2 bytes per token,
  in gpu_mem·gpu_memory_utilization − weights − VLLM_WORKSPACE_GIB.
Time: training tokens/s per GPU = peak FLOP/s·MFU / 6P; decoding is memory bound: each step reads
  the weights and the batch's KV cache once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from sasft_ray.config import Config, ConfigError

GIB = 2**30
# Assumptions, named so they can be read and changed. Throughput defaults are an H100 SXM's.
GPU_BF16_TFLOPS = 989.0  # dense bf16 peak
GPU_HBM_TBS = 3.35  # memory bandwidth, TB/s
# Model FLOPs utilization of a ZeRO-3 full fine-tune (0.3-0.45 is typical on nodes of 8). One H200 alone
# measured 0.19-0.23 at micro-batch 4 x 2048 tokens, 0.05-0.09 at 1 x 2048 (1.2B, 3.2B; jobs/check_gpu.py).
TRAIN_MFU = 0.35
DECODE_BW_EFFICIENCY = 0.6  # share of HBM bandwidth a vLLM decode step reaches
# fp32 training FLOP/s of one CPU core under ZeRO-3 on gloo: SmolLM2-135M-Instruct trained at 24 tokens/s per
# worker of one core (6 x 134.5 M FLOPs a token) on this project's 2-core machine (docs/real-model.md)
CPU_TRAIN_GFLOPS_PER_CORE = 19.0
# Per training GPU: CUDA context, NCCL buffers, the allocator's slack. On one H200 (jobs/check_gpu.py) the
# formulas above came out 2-7% over the peak allocated, the process's context took 1.3 GiB, and with
# expandable segments (train.py sets them) the allocator held 1.5-3 GiB over its peak: this covers it.
# Eight ranks' NCCL buffers are not measured.
CUDA_OVERHEAD_GIB = 3.0
VLLM_WORKSPACE_GIB = 2.0  # per engine GPU: vLLM's activation peak and CUDA graphs, outside the KV cache
ZERO3_SUB_GROUP = 10**9  # DeepSpeed's default sub_group_size
# Block layouts the formulas count: Llama's (Qwen2 adds q, k, v biases; Mistral is Llama's), and Gemma-2's
# (four norms a block, tanh soft-capping of attention scores and logits, head_dim apart from hidden / heads,
# GeGLU, whose tensors count as SwiGLU's). Other model types are counted as Llama's, with a note.
LLAMA_LIKE = ("llama", "qwen2", "mistral", "gemma2")
# config.json defaults of transformers' config classes, for keys a hub config.json may leave out
TIED_BY_DEFAULT = ("gemma2",)


@dataclass(frozen=True)
class Arch:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads
    tied: bool = False  # lm_head shares the embedding
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v
    sandwich_norms: bool = False  # Gemma-2: four RMSNorms a block (after attention and the MLP too), in fp32
    attn_softcap: bool = False  # Gemma-2: tanh soft-capping of attention scores (only eager attention applies it)
    logit_softcap: bool = False  # Gemma-2: tanh soft-capping of the logits

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of a block's linear layers, by their HF names."""
        h, q, kv, i = self.hidden, self.heads * self.hd, self.kv_heads * self.hd, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def block_params(self) -> int:
        bias = sum(self.linears()[k][1] for k in ("q_proj", "k_proj", "v_proj")) * self.qkv_bias
        # RMSNorm weights; Gemma-2's two more a block are 0.003% of its parameters (their activations are not
        # negligible: `activation_bytes` counts them)
        norms = (4 if self.sandwich_norms else 2) * self.hidden
        return sum(a * b for a, b in self.linears().values()) + bias + norms

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def largest_layer(self) -> int:
        """Parameters of the biggest single module, as DeepSpeed's estimator counts it."""
        q = self.heads * self.hd
        return max(self.vocab * self.hidden, self.hidden * self.intermediate, self.hidden * q + q * self.qkv_bias)


# Hub ids the planner knows without a download (shapes from their config.json).
_L3_8B, _L3_70B = Arch(4096, 32, 32, 8, 14336, 128256), Arch(8192, 80, 64, 8, 28672, 128256)
_MISTRAL_7B_V03 = Arch(4096, 32, 32, 8, 14336, 32768)  # v0.3: the vocabulary grew from 32000 to 32768
_GEMMA2_9B = Arch(3584, 42, 16, 8, 14336, 256000, head_dim=256, tied=True, sandwich_norms=True, attn_softcap=True,
                  logit_softcap=True)  # 16 heads x 256 = 4096 wide attention over a 3584 residual stream
KNOWN = {
    "meta-llama/Meta-Llama-3-8B-Instruct": _L3_8B, "meta-llama/Llama-3.1-8B-Instruct": _L3_8B,
    "meta-llama/Meta-Llama-3-70B-Instruct": _L3_70B, "meta-llama/Llama-3.1-70B-Instruct": _L3_70B,
    "meta-llama/Llama-2-7b-chat-hf": Arch(4096, 32, 32, 32, 11008, 32000),
    "Qwen/Qwen2.5-7B-Instruct": Arch(3584, 28, 28, 4, 18944, 152064, qkv_bias=True),
    "Qwen/Qwen2.5-0.5B-Instruct": Arch(896, 24, 14, 2, 4864, 151936, tied=True, qkv_bias=True),
    "mistralai/Mistral-7B-Instruct-v0.3": _MISTRAL_7B_V03, "mistralai/Mistral-7B-v0.3": _MISTRAL_7B_V03,
    "google/gemma-2-9b-it": _GEMMA2_9B, "google/gemma-2-9b": _GEMMA2_9B,
}


def arch_from_config(c: dict) -> tuple[Arch, str]:
    """The shape in an HF config.json (as a dict), and a note when its model type is not one the formulas count."""
    kind = c.get("model_type", "?")
    note = "" if kind in LLAMA_LIKE else f" (model_type {kind}: formulas assume a Llama-like block)"
    arch = Arch(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                c.get("num_key_value_heads") or c["num_attention_heads"], c["intermediate_size"], c["vocab_size"],
                c.get("head_dim") or 0, bool(c.get("tie_word_embeddings", kind in TIED_BY_DEFAULT)),
                bool(c.get("attention_bias", kind == "qwen2")), sandwich_norms=kind == "gemma2",
                attn_softcap=bool(c.get("attn_logit_softcapping")),
                logit_softcap=bool(c.get("final_logit_softcapping")))
    return arch, note


def load_arch(model_path: str, spec: str | None = None) -> tuple[Arch, str]:
    """The model's shape: from --arch, the local folder's config.json, or the built-in table."""
    if spec:
        try:
            kw = {k.strip(): int(v) for k, v in (item.split("=") for item in spec.split(","))}
            return Arch(**kw), "--arch"
        except (ValueError, TypeError) as e:
            raise ConfigError(f"--arch '{spec}': {e} (e.g. hidden=4096,layers=32,heads=32,kv_heads=8,"
                              "intermediate=14336,vocab=128256; head_dim=256 where it is not hidden / heads)") from None
    config = Path(model_path) / "config.json"
    if config.is_file():
        arch, note = arch_from_config(json.loads(config.read_text()))
        return arch, f"{config}{note}"
    if model_path in KNOWN:
        return KNOWN[model_path], "built-in table"
    raise ConfigError(f"model.path '{model_path}' is neither a local model folder nor a known hub id "
                      f"({', '.join(KNOWN)}); give its shape with --arch")


def trainable_params(arch: Arch, cfg: Config) -> int:
    """Parameters the optimizer sees: all, all but the frozen ones (method freeze), or LoRA's adapters."""
    t = cfg.train
    frozen = t.freeze_layers if cfg.training_method.freezes else 0
    if t.lora:  # r x (in + out) per adapted linear, in the blocks above the frozen ones
        names = arch.linears() if t.lora.target_modules == "all-linear" else t.lora.target_modules
        per_block = sum(t.lora.r * sum(arch.linears()[n]) for n in names if n in arch.linears())
        return (arch.layers - frozen) * per_block
    if cfg.training_method.freezes:
        return arch.params - arch.vocab * arch.hidden - frozen * arch.block_params
    return arch.params


@dataclass(frozen=True)
class Cluster:
    gpu_mem_gib: float = 80.0
    gpus_per_node: int = 8
    cpu_mem_gib: float = 1800.0  # p5.48xlarge has 2 TiB, a3-highgpu-8g 1.8 TiB
    gpu_mem_util: float = 0.9  # vLLM's gpu_memory_utilization default
    train_tokens_per_s: float | None = None  # per GPU; None: GPU_BF16_TFLOPS x TRAIN_MFU / 6P
    gen_tokens_per_s: float | None = None  # per engine; None: the HBM bandwidth model
    nodes: int | None = None  # GPU nodes the cluster can have at once; None: as many as it takes
    scratch: tuple[tuple[str, int, float], ...] = ()  # (node type, GPUs, scratch bytes): `scratch_disks`


# Local NVMe of the GPU machine types the cluster files use: they put scratch there (p5.48xlarge: 8 x 3.84 TB of
# instance store; a3-highgpu-8g: 16 x 375 GiB of local SSD)
LOCAL_NVME_BYTES = {"p5.48xlarge": 8 * 3.84e12, "a3-highgpu-8g": 16 * 375 * GIB}
K8S_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": GIB, "Ti": 2**40}


def scratch_disks(path: str) -> tuple[tuple[str, int, float], ...]:
    """(node type, GPUs, scratch bytes) of each GPU node type of a cluster file, where its TMPDIR (and with it
    Ray's temp dir, checkpoint staging included) lives. A Ray cluster launcher YAML: the machine type's local
    NVMe (LOCAL_NVME_BYTES), else its boot disk; a KubeRay manifest: the size of the volume mounted at the
    worker's TMPDIR (an emptyDir's sizeLimit or an ephemeral volume's request), 0 if it has none."""
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if isinstance(d, dict)]
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cluster file {path}: {e}") from e
    out = []
    for doc in docs:
        for name, node in (doc.get("available_node_types") or {}).items():  # a Ray cluster launcher YAML
            nc, gpus = node.get("node_config", {}), int(node.get("resources", {}).get("GPU", 0))
            boot = [d["Ebs"]["VolumeSize"] for d in nc.get("BlockDeviceMappings", []) if "Ebs" in d] + [
                d["initializeParams"]["diskSizeGb"] for d in nc.get("disks", []) if d.get("boot")]  # GiB: AWS, GCP
            disk = LOCAL_NVME_BYTES.get(nc.get("InstanceType") or nc.get("machineType")) or sum(boot[:1]) * GIB
            if gpus:
                out.append((name, gpus, disk))
        spec = doc.get("spec") or {}
        cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec  # RayJob, RayService
        for group in cluster.get("workerGroupSpecs", []):  # a KubeRay manifest
            pod = group["template"]["spec"]
            container = pod["containers"][0]
            gpus = int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            tmpdir = next((e["value"] for e in container.get("env", []) if e["name"] == "TMPDIR"), None)
            mount = next((m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == tmpdir), None)
            volume = next((v for v in pod.get("volumes", []) if v["name"] == mount), {})
            size = (volume.get("emptyDir") or {}).get("sizeLimit") or (
                volume.get("ephemeral", {}).get("volumeClaimTemplate", {}).get("spec", {}).get("resources", {})
                .get("requests", {}).get("storage"))
            if gpus:
                out.append((group["groupName"], gpus, _k8s_bytes(str(size or 0))))
    return tuple(out)


def _k8s_bytes(quantity: str) -> float:
    number = quantity.rstrip("KMGTi")
    return float(number) * K8S_UNITS[quantity[len(number):]]


# --- training ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainMem:
    """Per-GPU bytes of the model states of one ZeRO option, and CPU RAM per node."""
    stage: int
    offload_optimizer: bool
    offload_params: bool
    params: float
    grads: float
    optim: float
    gather: float
    cpu_per_node: float  # peak: while loading, or the offloaded states
    refused: str = ""  # why DeepSpeed refuses the combination

    @property
    def states(self) -> float:
        return self.params + self.grads + self.optim + self.gather

    @property
    def name(self) -> str:
        off = "+params" if self.offload_params else ""
        return f"ZeRO-{self.stage}" + (f" offload optim{off}" if self.offload_optimizer else "")


def model_states(arch: Arch, stage: int, n: int, offload_optimizer=False, offload_params=False, half=True,
                 gpus_per_node=8, trainable: int | None = None) -> TrainMem:
    """`trainable` (default: all) parameters have gradients and optimizer state; the rest only weights."""
    P, T = arch.params, arch.params if trainable is None else trainable
    pb, gb, ob = (2, 2, 12) if half else (4, 4, 8)
    copy = 4 if half else 0  # fp32 grads for the step; in fp32 training the grads already are
    params, grads = pb * P / (n if stage >= 3 else 1), gb * T / (n if stage >= 2 else 1)
    optim = ob * T / (n if stage >= 1 else 1)
    optim += copy * (min(T / n, ZERO3_SUB_GROUP) if stage >= 3 else T / (n if stage >= 1 else 1))
    cpu = 0.0
    if offload_optimizer:  # the CPU Adam reads fp32 grads that ZeRO streams out as it reduces them
        cpu, optim, grads = (ob + 4) * T, 0.0, grads if stage < 2 else 0.0
    if offload_params:
        cpu, params = cpu + pb * P, 0.0
    refused = ("offload needs ZeRO >= 1" if offload_optimizer and stage == 0 else
               "offload_params needs ZeRO-3 and offload_optimizer" if offload_params and (
                   stage < 3 or not offload_optimizer) else "")
    # While loading, every process on the node holds its 16-bit copy of the model (ZeRO-0..2), or under
    # ZeRO-3's zero.Init one layer in fp32 before it is partitioned (DeepSpeed's estimate); CPU RAM must
    # hold the larger of that and the offloaded states.
    local = min(n, gpus_per_node)
    load = (4 * arch.largest_layer if stage == 3 else pb * P) * local
    return TrainMem(stage, offload_optimizer, offload_params, params, grads, optim,
                    4 * arch.largest_layer if stage == 3 else 0.0, max(cpu * local / n, load), refused)


def activation_bytes(arch: Arch, micro_batch: int, seq: int, half=True, checkpointing=False,
                     attn: str = "sdpa") -> tuple[float, float]:
    """(blocks, logits) activation bytes per GPU for one micro-batch of `seq` tokens per row; `attn` is
    `train.attn_implementation` (only eager keeps the s x s scores)."""
    tokens, b = micro_batch * seq, 2 if half else 4
    q, kv = arch.heads * arch.hd, arch.kv_heads * arch.hd
    norms = 36 * arch.hidden + 16 if arch.sandwich_norms else 16 * arch.hidden + 8
    block = norms + 4 * q + 4 * kv + 8 * arch.intermediate + 4 * arch.heads
    if attn == "eager":  # the scores, K and V repeated to every query head; no log-sum-exp
        block += arch.heads * seq * (8 if arch.attn_softcap else 6) + 4 * (q - kv) - 4 * arch.heads
    block *= b / 2
    per_token = arch.layers * b * arch.hidden + block if checkpointing else arch.layers * block
    return tokens * per_token, tokens * arch.vocab * (b + 8 + (b if arch.logit_softcap else 0))


def gpu_total(mem: TrainMem, act: tuple[float, float]) -> float:
    return mem.states + sum(act) + CUDA_OVERHEAD_GIB * GIB


@dataclass
class TrainPlan:
    options: list[TrainMem]  # all ZeRO stage x offload combinations at the configured N
    act: tuple[float, float]  # as configured (train.gradient_checkpointing)
    act_ckpt: tuple[float, float]  # with gradient checkpointing
    chosen: TrainMem
    need: float  # per-GPU bytes of the configured option
    fits: bool
    advice: list[str]


def train_plan(cfg: Config, arch: Arch, cl: Cluster) -> TrainPlan:
    t = cfg.train
    n, half, gib, T = t.num_workers, cfg.bf16, cl.gpu_mem_gib * GIB, trainable_params(arch, cfg)
    combos = [(s, False, False) for s in range(4)] + [(s, True, False) for s in (1, 2, 3)] + [(3, True, True)]
    options = [model_states(arch, s, n, o, p, half, cl.gpus_per_node, T) for s, o, p in combos]
    act = activation_bytes(arch, t.micro_batch_size, t.max_length, half, t.gradient_checkpointing,
                           t.attn_implementation)
    act_ckpt = activation_bytes(arch, t.micro_batch_size, t.max_length, half, True, t.attn_implementation)
    chosen = model_states(arch, t.zero_stage, n, t.offload_optimizer, t.offload_params, half, cl.gpus_per_node, T)
    cpu_cap = cl.cpu_mem_gib * GIB

    def fits(m: TrainMem, a) -> bool:
        return not m.refused and gpu_total(m, a) <= gib and m.cpu_per_node <= cpu_cap

    need, advice = gpu_total(chosen, act), []
    ok = fits(chosen, act)
    if chosen.refused:
        advice.append(f"DeepSpeed refuses this combination: {chosen.refused}")
    if chosen.cpu_per_node > cpu_cap:
        advice.append(f"needs {chosen.cpu_per_node / GIB:.1f} GiB CPU RAM per node, has {cl.cpu_mem_gib:g}")
    ckpt = " with train.gradient_checkpointing: true"
    if not ok and not t.gradient_checkpointing and fits(chosen, act_ckpt):
        advice.append(f"{ckpt.strip()}: {gpu_total(chosen, act_ckpt) / GIB:.1f} GiB per GPU: fits")
    if not ok:  # what offload (and recomputation) would change
        same = (chosen.stage, chosen.offload_optimizer, chosen.offload_params)
        for m in options:
            if m.stage in (t.zero_stage, 3) and not m.refused and (
                    m.stage, m.offload_optimizer, m.offload_params) != same and m.offload_optimizer:
                verdict = ("fits" if fits(m, act) else f"fits{ckpt}" if fits(m, act_ckpt) else "does not fit")
                advice.append(f"with {m.name}: {gpu_total(m, act) / GIB:.1f} GiB per GPU"
                              + ("" if t.gradient_checkpointing else
                                 f" ({gpu_total(m, act_ckpt) / GIB:.1f}{ckpt})")
                              + f", {m.cpu_per_node / GIB:.0f} GiB CPU RAM per node: {verdict}")
        for a, how in ((act, ""),) + (() if t.gradient_checkpointing else ((act_ckpt, ckpt),)):
            more = next((k for k in range(n, 4097) if fits(model_states(arch, 3, k, half=half, trainable=T), a)),
                        None)
            advice.append(f"without offload{how}: " + (
                f"ZeRO-3 fits on {more} GPUs ({math.ceil(more / cl.gpus_per_node)} node(s))" if more else
                f"no GPU count fits (activations alone need {sum(a) / GIB:.1f} GiB per GPU)"))
    return TrainPlan(options, act, act_ckpt, chosen, need, ok, advice)


def train_flops(cfg: Config, arch: Arch) -> float:
    """FLOPs a trained token costs: forward 2P, backward 2P for the activations' gradients + 2T for the
    weights' (+ 2P: gradient checkpointing runs each block's forward again in backward)."""
    return (6 if cfg.train.gradient_checkpointing else 4) * arch.params + 2 * trainable_params(arch, cfg)


def train_time(cfg: Config, arch: Arch, cl: Cluster, task_rows: int | None) -> tuple[int, float, float] | None:
    """(optimizer steps, tokens, seconds) over the rows the mix writes (the task's, the mixed-in ones, mix.sources'),
    padding every row to max_length; None if rows are unknown. With train.packing both are upper bounds: a packed
    sequence holds as many rows as fit."""
    t = cfg.train
    global_batch = cfg.global_batch
    if t.max_steps:
        steps = t.max_steps
    elif task_rows is None:
        return None
    else:
        steps = cfg.optimizer_steps(cfg.mix_rows(train_rows(cfg, task_rows)))
    tokens = steps * global_batch * t.max_length
    rate = cl.train_tokens_per_s or GPU_BF16_TFLOPS * 1e12 * TRAIN_MFU / train_flops(cfg, arch)
    return steps, tokens, tokens / (rate * t.num_workers)


def train_rows(cfg: Config, task_rows: int) -> int:
    """The task's training rows, of all its rows (data.heldout_fraction held out)."""
    return int(task_rows * (1 - cfg.data.heldout_fraction))


def checkpoint_bytes(cfg: Config, arch: Arch) -> float:
    """A training checkpoint: 12 bytes a trained parameter (fp32 weights and Adam's two moments, in every
    rank's ZeRO shards), and below ZeRO-3 the whole model's 16-bit weights besides."""
    return 12 * trainable_params(arch, cfg) + (2 * arch.params if cfg.train.zero_stage < 3 else 0)


def count_task_rows(cfg: Config) -> int | None:
    path = Path(cfg.data.path)
    if path.is_file() and path.suffix == ".jsonl":
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    return None


# --- vLLM engines --------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineMem:
    tp: int
    weights: float  # per GPU
    kv_per_token: float  # per GPU (KV heads are split over TP, replicated past kv_heads)
    kv_tokens: int  # tokens the KV cache holds
    max_model_len: int

    @property
    def fits(self) -> bool:
        return self.kv_tokens >= self.max_model_len  # vLLM refuses to start below one full sequence


def engine_memory(arch: Arch, tp: int, max_model_len: int, cl: Cluster, weight_bytes: int = 2) -> EngineMem:
    weights = arch.params * weight_bytes / tp
    kv_token = 2 * arch.layers * math.ceil(arch.kv_heads / tp) * arch.hd * weight_bytes
    budget = cl.gpu_mem_gib * GIB * cl.gpu_mem_util - weights - VLLM_WORKSPACE_GIB * GIB
    return EngineMem(tp, weights, kv_token, max(0, int(budget // kv_token)), max_model_len)


def smallest_tp(arch: Arch, max_model_len: int, cl: Cluster, weight_bytes: int = 2) -> EngineMem | None:
    for tp in (1, 2, 4, 8, 16):
        ok_heads = arch.heads % tp == 0 and (arch.kv_heads % tp == 0 or tp % arch.kv_heads == 0)
        if tp <= cl.gpus_per_node and ok_heads:
            em = engine_memory(arch, tp, max_model_len, cl, weight_bytes)
            if em.fits:
                return em
    return None


def decode_rate(em: EngineMem, seq: int, max_num_seqs: int) -> tuple[int, float]:
    """(concurrent sequences, tokens/s) of one engine decoding sequences of `seq` tokens."""
    batch = max(1, min(max_num_seqs, em.kv_tokens // max(1, seq)))
    step_bytes = em.weights + batch * seq / 2 * em.kv_per_token  # on average half the sequence is written
    return batch, batch * GPU_HBM_TBS * 1e12 * DECODE_BW_EFFICIENCY / step_bytes


# --- the report ----------------------------------------------------------------------------------

def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _engine_lines(out: list[str], key: str, eng, count: int, arch: Arch, cl: Cluster, wb: int) -> EngineMem | None:
    """Memory of `count` engines configured by `eng` (at config key `key`); returns the engine to time (the
    configured one, or the smallest tensor parallel that fits), None if none fits."""
    em = engine_memory(arch, eng.tensor_parallel_size, eng.max_model_len, cl, wb)
    smallest = smallest_tp(arch, eng.max_model_len, cl, wb)
    out += [f"  {count} engines x TP {em.tp} = {count * em.tp} GPUs, "
            f"{math.ceil(count * em.tp / cl.gpus_per_node)} node(s)",
            f"  per GPU: weights {em.weights / GIB:.1f} GiB; KV cache {em.kv_per_token / 1024:.0f} KiB/token, "
            f"room for {em.kv_tokens:,} tokens in {cl.gpu_mem_gib:g} x {cl.gpu_mem_util:g}"
            f" - weights - {VLLM_WORKSPACE_GIB:g} GiB workspace",
            f"  max_num_seqs {eng.max_num_seqs} x max_model_len {eng.max_model_len} wants "
            f"{eng.max_num_seqs * eng.max_model_len * em.kv_per_token / GIB:.1f} GiB of KV: "
            f"{min(eng.max_num_seqs, em.kv_tokens // eng.max_model_len)} full-length sequences at once"]
    if not em.fits:
        out.append(f"  DOES NOT FIT at TP {em.tp}: weights + one {eng.max_model_len}-token sequence need "
                   f"{(em.weights + eng.max_model_len * em.kv_per_token) / GIB + VLLM_WORKSPACE_GIB:.1f} GiB "
                   f"per GPU, has {cl.gpu_mem_gib * cl.gpu_mem_util:.1f}")
    out.append(f"  smallest {key}.tensor_parallel_size that fits: " + (
        f"{smallest.tp}" + ("" if em.fits else f" ({count * smallest.tp} GPUs, "
                                               f"{math.ceil(count * smallest.tp / cl.gpus_per_node)} node(s))")
        if smallest else "none in one node"))
    return em if em.fits else smallest


def plan_text(cfg: Config, arch: Arch, source: str, cl: Cluster, task_rows: int | None = None) -> tuple[str, bool]:
    """The plan as text, and whether every stage fits as configured."""
    g, t, st, eng = GIB, cfg.train, cfg.selftalk, cfg.selftalk.engine
    wb = 4 if cfg.model.dtype == "float32" else 2
    runs = cfg.trained_models
    out = [f"model  {cfg.model.path}  [{source}]",
           f"  {arch.params / 1e9:.2f} B params, {arch.layers} layers, hidden {arch.hidden}, {arch.heads} heads / "
           f"{arch.kv_heads} KV heads" + (f" of {arch.hd}" if arch.hd != arch.hidden // arch.heads else "")
           + f", intermediate {arch.intermediate}, vocab {arch.vocab}",
           f"cluster  {cl.gpus_per_node} x {cl.gpu_mem_gib:g} GiB GPUs and {cl.cpu_mem_gib:g} GiB CPU RAM per node", ""]

    # generation: `concurrency` engines, each writing whole dialogues, every turn and role (sasft_ray.selftalk)
    engines = eng.concurrency
    out.append(f"generate  {engines} vLLM engine(s) (selftalk.engine.concurrency), each writing whole dialogues "
               f"of {st.turns} turn(s)")
    run = _engine_lines(out, "selftalk.engine", eng, engines, arch, cl, wb)
    gen_fits = engine_memory(arch, eng.tensor_parallel_size, eng.max_model_len, cl, wb).fits
    refused = None
    if task_rows:  # the config generate would refuse, refused here too
        try:
            cfg.check_dialogues(train_rows(cfg, task_rows))
        except ConfigError as e:
            refused = str(e)
            out.append(f"  REFUSED: {refused}")
    # the dialogues wanted: num_dialogues, or (unset) λ x the task's training rows
    wanted = sum(cfg.selftalk_wanted(train_rows(cfg, task_rows or 0))) if task_rows or st.num_dialogues else None
    if run and wanted is None:
        out.append("  time: unknown dialogue count (selftalk.num_dialogues follows from the task's rows); "
                   "pass --task-rows")
    elif run and wanted:
        generated = math.ceil(wanted * st.oversample)
        seq = min(eng.max_model_len, st.turns * (st.max_user_tokens + st.max_assistant_tokens))
        batch, rate = decode_rate(run, seq, eng.max_num_seqs)
        rate = cl.gen_tokens_per_s or rate
        decoded = generated * st.turns * (st.max_user_tokens + st.max_assistant_tokens)  # at most
        out.append(f"  time at TP {run.tp}: {generated:,} dialogues, <= {decoded:,} tokens decoded "
                   f"at ~{rate:,.0f} tokens/s per engine ({batch} sequences at once) -> "
                   f"{_hours(decoded / (rate * eng.concurrency))} (decode only)")
    if run and task_rows and cfg.training_method.rewrites:  # sdft: a rewrite of every task training row's reply
        rows, seq = train_rows(cfg, task_rows), min(eng.max_model_len, 2 * cfg.sdft.max_tokens)
        batch, rate = decode_rate(run, seq, eng.max_num_seqs)
        decoded = rows * cfg.sdft.max_tokens  # at most (a single-turn row: one reply)
        out.append(f"  rewrites (sdft) at TP {run.tp}: {rows:,} task rows, <= {decoded:,} tokens decoded at "
                   f"~{cl.gen_tokens_per_s or rate:,.0f} tokens/s per engine -> "
                   f"{_hours(decoded / ((cl.gen_tokens_per_s or rate) * eng.concurrency))} (decode only)")

    # training
    tp_ = train_plan(cfg, arch, cl)
    gpus, trainable = t.num_workers * t.gpus_per_worker, trainable_params(arch, cfg)
    what = (f"LoRA r={t.lora.r}" if t.lora else f"method {t.method}") + (
        f": {trainable / 1e9:.2f} B" if trainable >= 1e9 else f": {trainable / 1e6:.1f} M") + " trainable"
    out += ["", f"train  {t.num_workers} workers x {t.gpus_per_worker:g} GPU: {gpus:g} GPUs, "
            f"{math.ceil(gpus / cl.gpus_per_node)} node(s); {'bf16' if cfg.bf16 else 'fp32'}, "
            f"micro-batch {t.micro_batch_size} x {t.max_length} tokens; {what}",
            f"  activations per GPU: blocks {tp_.act[0] / g:.1f} GiB + logits {tp_.act[1] / g:.1f} GiB "
            + ("(train.gradient_checkpointing on)" if t.gradient_checkpointing else
               f"(with train.gradient_checkpointing: {sum(tp_.act_ckpt) / g:.1f} GiB)"),
            f"  {'GiB per GPU':33}params  grads  optim gather | total | CPU/node"]
    for m in tp_.options:
        mark = " <- config" if (m.stage, m.offload_optimizer, m.offload_params) == (
            t.zero_stage, t.offload_optimizer, t.offload_params) else ""
        out.append(f"  {m.name + mark:31}{m.params / g:7.1f}{m.grads / g:7.1f}{m.optim / g:7.1f}{m.gather / g:7.1f} |"
                   f"{gpu_total(m, tp_.act) / g:6.1f} |"
                   f"{m.cpu_per_node / g:7.0f}" + (f"  ({m.refused})" if m.refused else ""))
    out.append(f"  (totals add activations and {CUDA_OVERHEAD_GIB:g} GiB CUDA/NCCL overhead)")
    out.append(f"  {'fits' if tp_.fits else 'DOES NOT FIT'}: {tp_.chosen.name} needs {tp_.need / g:.1f} GiB per GPU, "
               f"has {cl.gpu_mem_gib:g} (activations {sum(tp_.act) / g:.1f} GiB of it)")
    out += [f"  {line}" for line in tp_.advice]
    if arch.attn_softcap and t.attn_implementation == "sdpa":  # transformers passes the cap on; SDPA drops it
        out.append("  NOTE: sdpa drops the model's attention soft-capping (Gemma-2): set train.attn_implementation "
                   "eager (or flash_attention_2 on GPU) to train the attention the model has")
    timing = train_time(cfg, arch, cl, task_rows)
    if timing:
        steps, tokens, seconds = timing
        rate = tokens / seconds / t.num_workers
        out.append(f"  time: {'at most ' if t.packing else ''}{steps:,} steps x {cfg.global_batch} "
                   f"{'packed sequences' if t.packing else 'rows'} x {t.max_length} tokens (padded) = "
                   f"{tokens / 1e6:,.1f} M tokens at {rate:,.0f} tokens/s per GPU "
                   f"-> {_hours(seconds)}" + (f" per run, {runs} runs (compare)" if runs > 1 else "")
                   + (f" + CPU optimizer steps ({'DeepSpeedCPUAdam' if cfg.resources.use_gpu else 'torch AdamW'})"
                      if t.offload_optimizer else ""))
        if not cfg.resources.use_gpu:  # a laptop run: what the same tokens cost on the workers' cores
            cpu_rate = CPU_TRAIN_GFLOPS_PER_CORE * 1e9 * t.cpus_per_worker / train_flops(cfg, arch)
            out.append(f"  on CPU (resources.use_gpu false): ~{cpu_rate:,.0f} tokens/s per worker of "
                       f"{t.cpus_per_worker:g} core(s) -> {_hours(tokens / (cpu_rate * t.num_workers))}"
                       + (f" per run, {runs} runs (compare)" if runs > 1 else "")
                       + f" (at {CPU_TRAIN_GFLOPS_PER_CORE:g} GFLOP/s a core, measured)")
    else:
        out.append("  time: unknown row count (data.path is not a local .jsonl); pass --task-rows")
    # each rank writes its shard to the node's temporary folder, which Ray uploads, then deletes; a resumed rank
    # fetches its own shards (`sasft_ray.train.rank_files`): a node holds its ranks' share either way
    ckpt = checkpoint_bytes(cfg, arch)
    per_node = ckpt * min(cl.gpus_per_node, gpus) / gpus
    out.append(f"  checkpoint: {ckpt / 1e9:,.0f} GB in run_dir; each node's temporary folder (TMPDIR) holds its "
               f"ranks' {per_node / 1e9:,.0f} GB while a save uploads, and as much on resume")
    short_disks = []
    for name, node_gpus, disk in cl.scratch:  # the GPU nodes of the cluster file (`sasft plan --cluster`)
        need = ckpt * min(node_gpus, gpus) / gpus
        if disk < need:
            short_disks.append(name)
            out.append(f"  DOES NOT FIT the cluster file: a {name} node gives TMPDIR {disk / 1e9:,.0f} GB of scratch, "
                       f"its ranks' checkpoint shards need {need / 1e9:,.0f} GB")

    # serving: the fine-tuned model(s) and the base, serve.engine.concurrency replicas each
    # the run's evaluation serves its models in waves of eval.models_at_once; `sasft serve` all of them at once
    served, all_served = cfg.eval_engines, cfg.served_engines
    out += ["", f"serve  {runs} fine-tuned + the base model, {cfg.serve.engine.concurrency} replica(s) each"]
    if served < all_served:
        out.append(f"  the run's evaluation serves {cfg.eval.models_at_once} model(s) at a time (eval.models_at_once): "
                   f"{served} of the {all_served} engines; `sasft serve` of them all starts {all_served}")
    serve = _engine_lines(out, "serve.engine", cfg.serve.engine, served, arch, cl, wb)
    serve_fits = engine_memory(arch, cfg.serve.engine.tensor_parallel_size, cfg.serve.engine.max_model_len,
                               cl, wb).fits
    peak = max(engines * (run.tp if run else eng.tensor_parallel_size), gpus,
               served * (serve.tp if serve else cfg.serve.engine.tensor_parallel_size))
    nodes = math.ceil(peak / cl.gpus_per_node)
    out.append(f"\nstages run one after another: at most {peak:g} GPUs at once, {nodes} node(s) of {cl.gpus_per_node}")
    stage_gpus = {"generate": engines * eng.tensor_parallel_size, "train": gpus,
                  "serve": served * cfg.serve.engine.tensor_parallel_size}
    too_big = {k: v for k, v in stage_gpus.items() if cl.nodes is not None and v > cl.nodes * cl.gpus_per_node}
    for stage, need in too_big.items():  # engines or workers that cannot all start stall the stage
        out.append(f"DOES NOT FIT the cluster: {stage} needs {need:g} GPUs at once, {cl.nodes} node(s) x "
                   f"{cl.gpus_per_node} have {cl.nodes * cl.gpus_per_node}")
    return "\n".join(out), gen_fits and tp_.fits and serve_fits and not too_big and not refused and not short_disks
