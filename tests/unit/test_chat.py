"""The chat template without a model: a template that drops earlier thoughts still trains each reply as
the model writes it (the tiny models' own templates are in tests/integration/test_chat.py)."""

from sasft_ray.chat import model_tokenizer
from sasft_ray.packing import IGNORE

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
