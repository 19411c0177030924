"""Tiny chat models built locally: a trained BPE tokenizer, a chat template, random
or briefly warmed-up weights, saved as an HF folder that transformers and vLLM load.

Head size is 32 (vLLM's CPU attention needs >= 32). A few hundred warm-up steps on
synthetic dialogues teach the model its turn structure, so that template-only
prompting yields dialogues that end where they should instead of running to the
token limit.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from sasft_ray.packing import IGNORE

ARCHS = ("llama", "qwen2")

# Templates in the style of the real families: Llama-3 headers and ChatML.
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = {
    "llama": dict(tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|end_of_text|>", eot="<|eot_id|>",
                  template=LLAMA_TEMPLATE),
    "qwen2": dict(tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|endoftext|>",
                  eot="<|im_end|>", template=CHATML_TEMPLATE),
}

WORDS = ("apple river stone cloud tiger lamp garden music paper window silver forest candle bridge "
         "orange planet rabbit winter summer castle").split()


def _exchange(rng: random.Random) -> list[dict]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    word = rng.choice(WORDS)
    q, ans = rng.choice([
        (rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."]), a + b),
        (rng.choice(["Spell {w} backwards.", "Reverse the word {w}."]), word[::-1]),
        (rng.choice(["How many letters are in {w}?", "Count the letters of {w}."]), len(word)),
        (rng.choice(["Write {w} in capitals.", "Uppercase the word {w}."]), word.upper()),
    ])
    return [{"role": "user", "content": q.format(a=a, b=b, w=word)},
            {"role": "assistant", "content": f"Sure! The answer is {ans}."}]


def warmup_dialogues(n: int, seed: int = 0) -> list[list[dict]]:
    """Short, varied general dialogues of one or two exchanges in one house style."""
    rng = random.Random(seed)
    return [[m for _ in range(rng.randint(1, 2)) for m in _exchange(rng)] for _ in range(n)]


def demo_task_rows(n: int, seed: int = 1) -> list[dict]:
    """A narrow task answered in a terse style foreign to the warm-up data."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 6)))
        rows.append({"instruction": f"Double every letter of {word}.",
                     "output": "ANS=" + "".join(c * 2 for c in word)})
    return rows


def write_demo_task(path: str | Path, n: int = 400) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in demo_task_rows(n)))
    return path


def train_tokenizer(arch: str, corpus: list[str], vocab_size: int, split_digits: bool = False):
    """A byte-level BPE trained on `corpus`, with the family's special tokens and chat template.
    `split_digits`: one token per digit (as Llama does), so that digit strings line up with tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = SPECIAL[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["tokens"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"],
                                   pad_token=spec["eos"], chat_template=spec["template"])


def new_model(tokenizer, arch: str = "llama", layers: int = 2, hidden: int = 128, intermediate: int | None = None):
    """A randomly initialised chat model sized for `tokenizer`; head size 32 (vLLM's CPU minimum).
    Generation stops at the end-of-turn token as well as at EOS."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    eot_id, eos_id = tokenizer.convert_tokens_to_ids(SPECIAL[arch]["eot"]), tokenizer.eos_token_id
    config_cls = LlamaConfig if arch == "llama" else Qwen2Config
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id or eos_id,
        eos_token_id=[eot_id, eos_id], pad_token_id=eos_id,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=[eot_id, eos_id],
                                               pad_token_id=eos_id)
    return model


def save_model(model, tokenizer, out: str | Path) -> Path:
    """An HF folder (safetensors, tokenizer, chat template) that transformers and vLLM load."""
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_model(out: str | Path, arch: str = "llama", layers: int = 2, hidden: int = 128,
                     warmup_steps: int = 300, seed: int = 0) -> Path:
    """Build, optionally warm up, and save a tiny chat model; returns the folder."""
    import torch

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    torch.manual_seed(seed)
    dialogues = warmup_dialogues(2000, seed)
    tokenizer = train_tokenizer(arch, [m["content"] for d in dialogues for m in d] + WORDS, vocab_size=512)
    model = new_model(tokenizer, arch, layers, hidden)
    if warmup_steps:
        _warm_up(model, tokenizer, dialogues, warmup_steps)
    return save_model(model, tokenizer, out)


def _warm_up(model, tokenizer, dialogues: list[list[dict]], steps: int, batch_size: int = 32) -> None:
    import torch

    texts = [tokenizer.apply_chat_template(d, tokenize=False) for d in dialogues]
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    batches = ([ids[(step * batch_size + i) % len(ids)] for i in range(batch_size)] for step in itertools.count())
    fit(model, torch.optim.AdamW(model.parameters(), lr=3e-3), batches, steps, tokenizer.pad_token_id)


def fit(model, optimizer, batches: Iterator[list[list[int]]], steps: int, pad: int,
        lr_scale: Callable[[int], float] | None = None, clip: float | None = None, log_every: int = 0) -> None:
    """The plain torch loop that trains the models built here (the tiny ones, the lab's) on whole token rows:
    each batch right-padded with `pad`, every real token a target; the optimizer's lr times `lr_scale(step)`."""
    import torch

    peak = [group["lr"] for group in optimizer.param_groups]
    model.train()
    for step in range(steps):
        if lr_scale:
            for group, lr in zip(optimizer.param_groups, peak):
                group["lr"] = lr * lr_scale(step)
        batch = next(batches)
        width = max(map(len, batch))
        inputs = torch.tensor([b + [pad] * (width - len(b)) for b in batch])
        labels = torch.tensor([b + [IGNORE] * (width - len(b)) for b in batch])
        loss = model(input_ids=inputs, labels=labels).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"[lab] step {step}/{steps} loss {loss.item():.3f}", flush=True)  # only the lab's pretraining logs
    model.eval()
