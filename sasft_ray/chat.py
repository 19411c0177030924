"""The model's chat template: how a conversation becomes the text and tokens of the model's own format.

Self-talk opens each turn with the template's own prefix (`render_prompt`, stop tokens from `turn_format`);
training and `sasft diagnose` label the tokens of assistant replies only (`encode`). The tokenizer is the
model's, with `model.chat_template` (a Jinja file) in place of its own template where the config sets one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from sasft_ray.packing import IGNORE

SENTINEL = "\ue000SASFT\ue000"  # private-use text that no tokenizer merges with its neighbours


class ChatError(ValueError):
    """A chat template that cannot render what self-talk or training needs."""


UNOPENED = ("the chat template renders a reply's turn otherwise than the generation prompt that opens it, so a "
            "reply written after that prompt cannot be found in the rendered turn; give a template that opens a "
            "reply as it renders one in model.chat_template (a Jinja file)")


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template: str | None = None):
    """Once per worker process: every Ray task reuses it. `chat_template`: a Jinja file that replaces the
    model's own template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if chat_template:
        tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
    return tokenizer


def model_tokenizer(model):
    """The tokenizer of a config's `model` section, with its `chat_template` if it sets one."""
    return load_tokenizer(model.path, model.trust_remote_code, model.chat_template)


@dataclass(frozen=True)
class TurnFormat:
    """What a model's chat template says about turns, derived once in the driver."""

    stop_user: tuple[int, ...]       # token ids that end a user message
    stop_assistant: tuple[int, ...]  # token ids that end an assistant message
    markers: tuple[str, ...]         # template text that must never appear inside a message
    strip_bos: str                   # the BOS text to drop from a render, if the tokenizer adds it again


def _suffix_after_sentinel(tokenizer, messages: list[dict]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return text.split(SENTINEL, 1)[1]


def _first_token(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text.strip(), add_special_tokens=False).input_ids if text.strip() else []
    return ids[:1] if ids and ids[0] in tokenizer.all_special_ids + list(tokenizer.added_tokens_decoder) else []


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS before every text it encodes (Llama-3's does)."""
    return bool(tokenizer.bos_token) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]


def turn_format(tokenizer) -> TurnFormat:
    if not tokenizer.chat_template:
        raise ChatError("the model's tokenizer has no chat template; self-talk needs one to open a user turn: "
                        "give one as a Jinja file in model.chat_template")
    opened = render(tokenizer, [{"role": "user", "content": "x"}], generation_prompt=True)
    replied = render(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    if not replied.startswith(opened):
        raise ChatError(UNOPENED)
    eos = tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    user_end = _suffix_after_sentinel(tokenizer, [{"role": "user", "content": SENTINEL}])
    assistant_end = _suffix_after_sentinel(
        tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": SENTINEL}])
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": SENTINEL}, {"role": "user", "content": SENTINEL},
         {"role": "assistant", "content": SENTINEL}], tokenize=False)
    segments = {s.strip() for s in rendered.split(SENTINEL) if s.strip()}
    specials = {t for t in tokenizer.all_special_tokens + [str(t) for t in tokenizer.added_tokens_decoder.values()]
                if len(t) > 1}
    bos = tokenizer.bos_token or ""
    return TurnFormat(
        stop_user=tuple(dict.fromkeys(_first_token(tokenizer, user_end) + eos_ids)),
        stop_assistant=tuple(dict.fromkeys(_first_token(tokenizer, assistant_end) + eos_ids)),
        markers=tuple(sorted(segments | specials)),
        strip_bos=bos if adds_bos(tokenizer) else "",
    )


def render(tokenizer, messages: list[dict], strip_bos: str = "", generation_prompt: bool = False) -> str:
    """The chat template's text, less a leading BOS that the tokenizer will add again."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return text[len(strip_bos):] if strip_bos and text.startswith(strip_bos) else text


def render_prompt(tokenizer, fmt: TurnFormat, history: list[dict], role: str) -> str:
    """The text that opens the next `role` turn after `history`, nothing more."""
    if role == "assistant":
        return render(tokenizer, history, fmt.strip_bos, generation_prompt=True)
    text = render(tokenizer, history + [{"role": "user", "content": SENTINEL}], fmt.strip_bos)
    return text.split(SENTINEL, 1)[0]


# --- training's tokens: loss on assistant replies only ------------------------------------------

def encode(tokenizer, messages: list[dict], max_length: int, strip_bos: str = "",
           open_end: bool = False) -> list[dict]:
    """Token ids and labels of a conversation, as sequences of at most `max_length` tokens; labels are IGNORE
    everywhere but inside assistant replies (their content and the template's end-of-turn marker, so the
    model learns to stop). Each reply is labelled in its own rendering, the conversation up to and including
    it after the prompt the model writes it from. With a prefix-stable template every such rendering begins
    the next one: one sequence, the whole conversation. A template that renders an earlier reply otherwise
    once more turns follow (Qwen3's drops its `<think>` block) starts a new sequence at each reply whose
    prompt does not continue the sequence so far, so that no reply is learnt in a form the model never
    writes. `open_end`: the last reply was cut at a token limit, so its end-of-turn marker is no target (it
    did not end there)."""
    sequences: list[tuple[str, list[tuple[int, int]]]] = []
    text, spans = "", []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], strip_bos, generation_prompt=True)
        through = render(tokenizer, messages[: i + 1], strip_bos)
        if not through.startswith(before):
            raise ChatError(UNOPENED)
        end = len(through)
        if open_end and i == len(messages) - 1:
            content = m["content"].strip()
            end = through.rfind(content, len(before)) + len(content)
            if end < len(before) + len(content):
                raise ChatError("the chat template changes a reply's text: its end cannot be found")
        if not before.startswith(text):  # this reply's prompt renders the sequence so far otherwise
            sequences.append((text, spans))
            spans = []
        text = through
        spans.append((len(before), end))
    full = render(tokenizer, messages, strip_bos)  # with the messages after the last reply, if any
    sequences.append((full if full.startswith(text) else text, spans))
    return [_labelled(tokenizer, t, s, max_length) for t, s in sequences]


def _labelled(tokenizer, text: str, spans: list[tuple[int, int]], max_length: int) -> dict:
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids = enc["input_ids"][:max_length]
    labels = [tok if any(s <= a < e for s, e in spans) else IGNORE
              for tok, (a, _) in zip(ids, enc["offset_mapping"][:max_length])]
    return {"input_ids": ids, "labels": labels}
