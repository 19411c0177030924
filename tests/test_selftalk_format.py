"""The model's own chat template decides the prompts and stop tokens (no per-family code)."""

from sasft_ray.chat import load_tokenizer, model_tokenizer, render_prompt, turn_format
from sasft_ray.packing import IGNORE


def test_llama_style_template(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    fmt = turn_format(tok)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert fmt.stop_user[0] == eot and fmt.stop_assistant[0] == eot
    assert tok.eos_token_id in fmt.stop_user
    assert "<|start_header_id|>" in fmt.markers
    assert render_prompt(tok, fmt, [], "user") == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    history = [{"role": "user", "content": "Hi"}]
    assert render_prompt(tok, fmt, history, "assistant").endswith(
        "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    history.append({"role": "assistant", "content": "Hello"})
    assert render_prompt(tok, fmt, history, "user").endswith(
        "Hello<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")


def test_chatml_template_with_system_prompt(tiny_qwen2):
    tok = load_tokenizer(tiny_qwen2)
    fmt = turn_format(tok)
    assert fmt.stop_user[0] == tok.convert_tokens_to_ids("<|im_end|>")
    assert fmt.strip_bos == ""
    system = [{"role": "system", "content": "Be brief."}]
    assert render_prompt(tok, fmt, system, "user") == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"


def test_tiny_model_generates_in_transformers(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert model.config.hidden_size // model.config.num_attention_heads == 32  # vLLM on CPU needs >= 32
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:])
    assert answer.startswith("Sure! The answer is")  # the warm-up taught it the house style
    assert answer.rstrip().endswith("<|eot_id|>")     # ...and to end its turn


# Qwen3's way: a reply is rendered with its <think> block only while it is the last turn; once more turns
# follow, the block is dropped (so the template is not prefix-stable)
QWEN3_STYLE = (
    "{%- set ns = namespace(last=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' %}"
    "{%- set answer = m.content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- set thought = m.content.split('</think>')[0].split('<think>')[-1].strip('\\n') if '</think>' in m.content "
    "else '' %}"
    "{%- if loop.index0 > ns.last %}<|im_start|>assistant\n<think>\n{{ thought }}\n</think>\n\n{{ answer }}"
    "<|im_end|>\n{% else %}<|im_start|>assistant\n{{ answer }}<|im_end|>\n{% endif %}"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_drops_earlier_thoughts_trains_each_reply_as_the_model_writes_it(tmp_path):
    from sasft_ray.chat import encode
    from sasft_ray.config import ModelConfig
    from sasft_ray.tiny import WORDS, train_tokenizer

    train_tokenizer("qwen2", WORDS, vocab_size=300).save_pretrained(tmp_path / "model")
    (tmp_path / "qwen3.jinja").write_text(QWEN3_STYLE)
    model = ModelConfig(path=str(tmp_path / "model"), chat_template=str(tmp_path / "qwen3.jinja"))
    tok = model_tokenizer(model)
    assert tok.chat_template == QWEN3_STYLE  # model.chat_template, in place of the tokenizer's own ChatML
    messages = [{"role": "user", "content": "Add 2 and 3."},
                {"role": "assistant", "content": "<think>\n2 + 3\n</think>\n\nFive."},
                {"role": "user", "content": "And 4?"}, {"role": "assistant", "content": "Nine."}]
    first, second = encode(tok, messages, max_length=512)

    def learned(seq, wanted=True):
        return tok.decode([t for t, lab in zip(seq["input_ids"], seq["labels"]) if (lab != IGNORE) == wanted])

    # each reply as its own turn renders it when the model writes it: the <think> block included
    assert learned(first) == "<think>\n2 + 3\n</think>\n\nFive.<|im_end|>\n"
    assert learned(second) == "<think>\n\n</think>\n\nNine.<|im_end|>\n"
    # ...after the prompt it was written from: the first reply without its thoughts, as the template shows it then
    assert learned(second, wanted=False) == ("<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n"
                                             "Five.<|im_end|>\n<|im_start|>user\nAnd 4?<|im_end|>\n"
                                             "<|im_start|>assistant\n")
    assert tok.decode(first["input_ids"]) == tok.apply_chat_template(messages[:2], tokenize=False)
    # training's rows: each sequence a row of its dialogue's source
    from sasft_ray.train import _encode_batch

    rows = _encode_batch({"messages": [messages, messages[:2]], "source": ["selftalk", "task"]}, model=model,
                         max_length=512, strip_bos="")
    assert list(rows["source"]) == ["selftalk", "selftalk", "task"]
    assert [list(r) for r in rows["labels"]] == [first["labels"], second["labels"], first["labels"]]
