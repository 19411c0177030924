"""The forgetting lab: a synthetic world small enough to show forgetting on two CPU cores.

A ~1M-parameter Llama chat model is pretrained from scratch on eight general skills, all
answered in one house style ("Sure! The answer is X."). Narrow tasks are answered in styles
foreign to it (`ANS=...`, `<<...>>`, `{"result": ...}`, all-caps): plain SFT on one of them makes the
model answer everything that way and so forget its general skills, which is the phenomenon
SA-SFT is meant to prevent. Everything follows from a seed; nothing is downloaded.

`build_lab(out)` writes:
  model/          the base chat model (HF folder: safetensors, tokenizer, chat template)
  tasks/*.jsonl   one narrow task per file, chat rows in the foreign style, and the control task
                  (tasks/house.jsonl): general questions answered in the house style, as pretraining
                  answers them, so `sasft diagnose` has a task that is close to the model's own style
  evals/*.jsonl   held-out questions per general skill, never seen in pretraining
  external.jsonl  general questions answered in another style (the external-mix baseline)
  lab.json        what was built, and the base model's accuracy per skill

The base model for seed 0, the one every shipped config uses, ships with the package (`sasft_ray/lab_model/`,
with the record of the full-preset build that pretrained it): a build of either preset copies it instead of
pretraining for minutes, and measures its accuracy here. `build_lab(..., fresh=True)` (`sasft lab build
--fresh`) pretrains one on this machine instead, as any other seed does.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sasft_ray.config import ConfigError
from sasft_ray.methods import MIX_DATA
from sasft_ray.models import sha256
from sasft_ray.rundir import versions
from sasft_ray.scorers import contains, exact  # the evaluation's scorers: one rule for both
from sasft_ray.tiny import fit, new_model, save_model, train_tokenizer

# Bumped whenever a change to the world or its pretraining changes what a build makes: a lab built
# by another version is rebuilt, not reused.
WORLD_VERSION = 5  # 4: the control task tasks/house.jsonl; 5: the shipped base model
SHIPPED = Path(__file__).parent / "lab_model"  # that model, and build.json: the lab.json of the build that made it
HOUSE = "Sure! The answer is {}."
CONTROL = "house"  # the control task: tasks/house.jsonl, in the house style
EXTERNAL = "Result: {}"

# --- the world: a fixed vocabulary and fact tables ------------------------------------------------

WORDS = ("apple river stone cloud tiger lamp garden music paper window silver forest candle bridge orange "
         "planet rabbit winter summer castle pencil mirror basket dragon rocket island monkey jacket ladder "
         "meadow pepper shadow violin wizard anchor button carpet desert engine falcon").split()
CAPITALS = {  # invented countries and their capitals
    "Zorvia": "Kelmar", "Brantis": "Oskel", "Quendor": "Miravel", "Talsk": "Ferun", "Ulmeria": "Dovan",
    "Praxen": "Sulit", "Vestora": "Anbel", "Krellin": "Tosca", "Morwen": "Habrin", "Dalquist": "Nerro",
    "Ebrant": "Lusk", "Fennick": "Porva", "Gaslow": "Imber", "Hestra": "Calbo", "Ivanor": "Rendu",
}
FRUITS = {  # invented fruits and their colors
    "blorp": "purple", "snarfle": "orange", "drupelet": "red", "mallow": "yellow", "tarnberry": "blue",
    "fizzle": "pink", "grumble": "brown", "wixel": "white", "zanthe": "black", "kumbit": "gold",
    "lopper": "grey", "noddle": "silver", "pombel": "violet", "ruskin": "teal", "trindle": "green",
}
DIGITS = "zero one two three four five six seven eight nine".split()


@dataclass(frozen=True)
class Skill:
    """A family of questions: `forms` are (template, solve) pairs, `sample` draws the template fields.
    `solve` maps the fields (as strings) to the answer, so the same forms generate and check.
    `weight`: how often pretraining draws the skill (the slow learners more often)."""
    name: str
    forms: tuple[tuple[str, Callable[[dict], str]], ...]
    sample: Callable[[random.Random], dict]
    weight: float = 1.0


def _word_list(f: dict) -> list[str]:
    return [x.strip() for x in f["xs"].split(",")]


def _sorted_nums(f: dict, reverse: bool = False) -> str:
    return ", ".join(str(n) for n in sorted((int(x) for x in _word_list(f)), reverse=reverse))


def _sample_numbers(rng: random.Random) -> dict:
    a = rng.randint(0, 12)
    return {"a": a, "b": rng.randint(0, a)}  # a >= b: no negative differences


def _echo(f: dict) -> str:
    return f["n"]


_add, _sub = (lambda f: str(int(f["a"]) + int(f["b"]))), (lambda f: str(int(f["a"]) - int(f["b"])))
_rev, _up = (lambda f: f["w"][::-1]), (lambda f: f["w"].upper())
_capital, _color = (lambda f: CAPITALS[f["country"]]), (lambda f: FRUITS[f["fruit"]])
_length, _items = (lambda f: str(len(f["w"]))), (lambda f: str(len(_word_list(f))))
_first, _last = (lambda f: _word_list(f)[0]), (lambda f: _word_list(f)[-1])

SKILLS = {s.name: s for s in [
    Skill("arithmetic", (("What is {a} plus {b}?", _add), ("Add {a} and {b}.", _add), ("Compute {a} + {b}.", _add),
                         ("What is {a} minus {b}?", _sub), ("Subtract {b} from {a}.", _sub),
                         ("Compute {a} - {b}.", _sub)), _sample_numbers, weight=1.5),
    Skill("reverse", (("Spell {w} backwards.", _rev), ("Reverse the word {w}.", _rev),
                      ("What is {w} written backwards?", _rev), ("Write {w} in reverse.", _rev)),
          lambda rng: {"w": rng.choice(WORDS)}),
    Skill("uppercase", (("Write {w} in capitals.", _up), ("Uppercase the word {w}.", _up),
                        ("What is {w} in upper case?", _up), ("Capitalize every letter of {w}.", _up)),
          lambda rng: {"w": rng.choice(WORDS)}),
    Skill("facts", (("What is the capital of {country}?", _capital), ("Name the capital of {country}.", _capital),
                    ("Which city is the capital of {country}?", _capital), ("{country} has which capital?", _capital),
                    ("Tell me the capital city of {country}.", _capital),
                    ("What color is a {fruit}?", _color), ("Name the color of the {fruit} fruit.", _color),
                    ("Which color does a ripe {fruit} have?", _color), ("A {fruit} is what color?", _color),
                    ("Tell me the color of a {fruit}.", _color)),
          lambda rng: {"country": rng.choice(list(CAPITALS)), "fruit": rng.choice(list(FRUITS))}),
    Skill("counting", (("How many letters are in {w}?", _length), ("Count the letters of {w}.", _length),
                       ("How long is the word {w}?", _length),
                       ("How many words are in the list {xs}?", _items), ("Count the items in {xs}.", _items)),
          lambda rng: {"w": rng.choice(WORDS), "xs": ", ".join(rng.sample(WORDS, rng.randint(2, 6)))}),
    Skill("sorting", (("Sort {xs} in ascending order.", _sorted_nums), ("Sort these numbers: {xs}.", _sorted_nums),
                      ("Put {xs} in order from smallest to largest.", _sorted_nums),
                      ("Sort {xs} from largest to smallest.", lambda f: _sorted_nums(f, reverse=True))),
          lambda rng: {"xs": ", ".join(str(rng.randint(0, 9)) for _ in range(3))}),
    Skill("list_item", (("What is the first item in the list {xs}?", _first),
                        ("Which word comes first in {xs}?", _first), ("Name the first word of: {xs}.", _first),
                        ("What is the last item in the list {xs}?", _last), ("Which word comes last in {xs}?", _last),
                        ("Name the last word of: {xs}.", _last)),
          lambda rng: {"xs": ", ".join(rng.sample(WORDS, rng.randint(3, 4)))}, weight=1.5),
    # Copying teaches the attention patterns (induction) that the digit-string tasks build on. At 3-6
    # digits and weight 1 the base model copied 14% right (transpositions, 0% beyond 4 digits).
    Skill("repeat", (("Repeat {n}.", _echo), ("Say {n} back to me.", _echo), ("Echo the number {n}.", _echo),
                     ("Copy this: {n}.", _echo)),
          lambda rng: {"n": "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 4)))}, weight=2.0),
]}


def _digit_string(rng: random.Random, shortest: int = 3, longest: int = 6) -> dict:
    return {"n": "".join(rng.choice("0123456789") for _ in range(rng.randint(shortest, longest)))}


def _double(f: dict) -> str:
    return "ANS=" + "".join(d * 2 for d in f["n"])


def _shift(f: dict) -> str:
    return "<<" + "".join(str((int(d) + 1) % 10) for d in f["n"]) + ">>"


def _to_digits(f: dict) -> str:
    return json.dumps({"result": "".join(str(DIGITS.index(w)) for w in f["ws"].split())})


def _parity(f: dict) -> str:
    return "ODD" if int(f["n"]) % 2 else "EVEN"


# Narrow tasks, on digit strings (one token per digit, so the tiny model can learn them in ~100 steps).
# Each answer style is foreign to the house style on purpose: the paper's "style-induced drift".
# Shift has 3 digits and digits 2-3 words (version 3): at 3-6 digits and 2-5 words plain SFT learned
# neither in the lab grid's budget (in-domain <= 0.22); at these lengths it learns both from 720 rows.
TASKS = {s.name: s for s in [
    Skill("double", (("Double every digit of {n}.", _double), ("Write each digit of {n} twice.", _double)),
          _digit_string),
    Skill("shift", (("Shift every digit of {n} up by one.", _shift), ("Apply the next-digit cipher to {n}.", _shift)),
          lambda rng: _digit_string(rng, 3, 3)),
    Skill("digits", (("Write {ws} as digits.", _to_digits), ("Convert the words {ws} to a number.", _to_digits)),
          lambda rng: {"ws": " ".join(rng.choice(DIGITS) for _ in range(rng.randint(2, 3)))}),
    Skill("parity", (("Is {n} even or odd?", _parity), ("Tell me whether {n} is odd or even.", _parity)),
          lambda rng: {"n": rng.randint(0, 99999)}),
]}


def make_question(skill: Skill, rng: random.Random) -> tuple[str, str]:
    """One (question, answer content) of a skill or task, in a randomly chosen phrasing."""
    template, solve = rng.choice(skill.forms)
    fields = {k: str(v) for k, v in skill.sample(rng).items()}
    return template.format(**fields), solve(fields)


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.+?)" for i, p in enumerate(parts)) + "$")


def check(skill: Skill | str, question: str, answer: str) -> bool:
    """Whether `answer` is the right answer content to `question`, solved afresh from the question."""
    if isinstance(skill, str):
        skill = SKILLS[skill] if skill in SKILLS else TASKS[skill]
    for template, solve in skill.forms:
        m = _template_regex(template).match(question.strip())
        if m:
            try:
                return solve(m.groupdict()) == answer.strip()
            except (KeyError, ValueError):
                return False
    return False


# --- data files -------------------------------------------------------------------------------------

PRESETS = {
    # Sizes, and the pretraining budget where a model is pretrained here (--fresh, or a seed other than 0): full's
    # reached a base mean of 0.875 in the pinned environment and made sasft_ray/lab_model/ (1,600 steps there gave
    # 0.715; see docs/lab.md); small's is quick, with little skill.
    "full": dict(eval_size=50, task_rows=1200, external_rows=2000, steps=2400, batch_size=64, lr=5e-3,
                 layers=4, hidden=128, intermediate=256, vocab_size=1024),
    "small": dict(eval_size=12, task_rows=200, external_rows=200, steps=250, batch_size=64, lr=5e-3,
                  layers=4, hidden=128, intermediate=256, vocab_size=1024),
}

PRETRAINING = ("steps", "batch_size", "lr", "layers", "hidden", "intermediate", "vocab_size")  # a preset's model


def _chat(question: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def eval_rows(seed: int, size: int) -> dict[str, list[dict]]:
    """Held-out questions per skill, all distinct; drawn first so that pretraining can avoid them."""
    out = {}
    for i, (name, skill) in enumerate(SKILLS.items()):
        rng, rows, seen = random.Random(f"eval-{seed}-{i}"), [], set()
        while len(rows) < size:
            q, a = make_question(skill, rng)
            if q not in seen:
                seen.add(q)
                rows.append({"messages": [{"role": "user", "content": q}], "reference": HOUSE.format(a),
                             "answer": a, "skill": name})
        out[name] = rows
    return out


def pretrain_dialogues(seed: int, exclude: set[str]) -> Iterator[list[dict]]:
    """An endless stream of general dialogues of one or two exchanges, in the house style,
    that never asks a question in `exclude` (the eval questions)."""
    rng, skills = random.Random(f"pretrain-{seed}"), list(SKILLS.values())
    weights = [s.weight for s in skills]
    while True:
        dialogue, exchanges = [], rng.randint(1, 2)
        while len(dialogue) < 2 * exchanges:
            q, a = make_question(rng.choices(skills, weights)[0], rng)
            if q not in exclude:
                dialogue += _chat(q, HOUSE.format(a))
        yield dialogue


def _distinct_rows(rng: random.Random, skills: list[Skill], n: int, style: str, exclude: set[str]) -> list[dict]:
    rows, seen = [], set(exclude)
    while len(rows) < n:
        q, a = make_question(rng.choice(skills), rng)
        if q not in seen:
            seen.add(q)
            rows.append({"messages": _chat(q, style.format(a))})
    return rows


def write_world(out: str | Path, preset: str = "full", seed: int = 0) -> dict:
    """Write the data files (tasks, evals, external); byte-identical for the same preset and seed."""
    p, out = PRESETS[preset], Path(out)
    evals = eval_rows(seed, p["eval_size"])
    eval_questions = {r["messages"][0]["content"] for rows in evals.values() for r in rows}
    files = {f"evals/{name}.jsonl": rows for name, rows in evals.items()}
    for i, (name, task) in enumerate(TASKS.items()):
        files[f"tasks/{name}.jsonl"] = _distinct_rows(random.Random(f"task-{seed}-{i}"), [task], p["task_rows"],
                                                      "{}", set())
    files["external.jsonl"] = _distinct_rows(random.Random(f"external-{seed}"), list(SKILLS.values()),
                                             p["external_rows"], EXTERNAL, eval_questions)
    files[f"tasks/{CONTROL}.jsonl"] = _distinct_rows(random.Random(f"control-{seed}"), list(SKILLS.values()),
                                                     p["task_rows"], HOUSE, eval_questions)
    for rel, rows in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {rel: len(rows) for rel, rows in files.items()}


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --- the base model: pretraining and evaluation ---------------------------------------------------

def token_batches(tokenizer, dialogues: Iterator[list[dict]], batch_size: int, seed: int,
                  bucket: int = 16) -> Iterator[list[list[int]]]:
    """Batches of token ids. Dialogues are drawn `bucket` batches at a time and grouped by length,
    so that little compute goes to padding (dialogues vary from ~20 to ~90 tokens)."""
    rng = random.Random(f"batches-{seed}")
    while True:
        texts = [tokenizer.apply_chat_template(next(dialogues), tokenize=False) for _ in range(batch_size * bucket)]
        ids = sorted(tokenizer(texts, add_special_tokens=False).input_ids, key=len)  # one call: ~2x faster
        batches = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
        rng.shuffle(batches)
        yield from batches


def lab_tokenizer(world: Path, seed: int, exclude: set[str], vocab_size: int):
    """A BPE trained on pretraining, task and external text (so task text is not spelled byte by byte),
    with one token per digit, so that the digit-string tasks line up with tokens."""
    stream = pretrain_dialogues(seed, exclude)
    corpus = [m["content"] for _ in range(3000) for m in next(stream)]
    for f in [*sorted(world / f"tasks/{name}.jsonl" for name in TASKS), world / "external.jsonl"]:
        corpus += [m["content"] for r in read_jsonl(f) for m in r["messages"]]
    return train_tokenizer("llama", corpus, vocab_size, split_digits=True)


def pretrain(tokenizer, dialogues: Iterator[list[dict]], *, steps: int, batch_size: int, lr: float, layers: int,
             hidden: int, intermediate: int, seed: int, log_every: int = 100):
    """Train a fresh model on whole dialogues (user turns too, so that template-only prompting
    yields plausible questions), AdamW with warm-up and cosine decay to a tenth of `lr`."""
    import torch

    torch.manual_seed(seed)
    model = new_model(tokenizer, "llama", layers, hidden, intermediate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def scale(step: int) -> float:
        return (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))

    fit(model, optimizer, token_batches(tokenizer, dialogues, batch_size, seed), steps, tokenizer.pad_token_id,
        lr_scale=scale, clip=1.0, log_every=log_every)
    return model


def generate_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 32,
                     batch_size: int = 128) -> list[str]:
    """Greedy assistant replies, batched with left padding."""
    import torch

    tokenizer.padding_side = "left"
    replies = []
    for i in range(0, len(conversations), batch_size):
        prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                   for c in conversations[i:i + batch_size]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        replies += tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return [r.strip() for r in replies]


def skill_accuracy(model, tokenizer, evals: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Strict and lenient accuracy per skill on eval rows, greedy."""
    rows = [r for name in evals for r in evals[name]]
    replies = generate_replies(model, tokenizer, [r["messages"] for r in rows])
    result = {}
    for name in evals:
        scored = [(exact(y, r), contains(y, r)) for y, r in zip(replies, rows) if r["skill"] == name]
        result[name] = {"strict": sum(s for s, _ in scored) / len(scored),
                        "lenient": sum(lax for _, lax in scored) / len(scored)}
    return result


def load_evals(lab: str | Path) -> dict[str, list[dict]]:
    return {p.stem: read_jsonl(p) for p in sorted(Path(lab, "evals").glob("*.jsonl"))}


# --- the whole lab ----------------------------------------------------------------------------------

def lab_folder(cfg) -> Path:
    """Where a config's `bootstrap` builds the lab: the folder of model.path (`<lab>/model`), and only
    if the task data (and external data) the config reads lie inside it too."""
    model = Path(cfg.model.path).absolute()
    lab = model.parent
    paths = {"model.path": cfg.model.path, "data.path": cfg.data.path,
             **{f"mix.{key}.path": data.path for key in MIX_DATA if (data := getattr(cfg.mix, key))}}
    for key, path in paths.items():
        inside = Path(path).absolute().is_relative_to(lab) and (key != "model.path" or model.name == "model")
        if not inside:
            raise ConfigError(f"bootstrap {cfg.bootstrap}: {key} {path} is not where the lab puts it (the lab is "
                              f"built in model.path's folder {lab}, its model in model/, its data inside it). "
                              "To use your own model or data, drop the lab: --set bootstrap=null")
    return lab


def shipped(seed: int) -> dict | None:
    """The record of the shipped base model (the lab.json of the full-preset build that pretrained it) if it is
    this seed's, of this world version; None otherwise. It serves both presets: their models have one shape,
    and the small preset's held-out questions are the first of the full preset's, never seen in pretraining
    either."""
    record = SHIPPED / "build.json"
    if not record.exists():
        return None
    info = json.loads(record.read_text())
    return info if (info["seed"], info["version"]) == (seed, WORLD_VERSION) else None


def copy_shipped(record: dict, out: Path) -> None:
    """The shipped model folder, checked against the weights its build wrote (a truncated install, or a
    Git LFS pointer in place of the file, is refused)."""
    shutil.copytree(SHIPPED, out, ignore=shutil.ignore_patterns("build.json"))
    if (digest := sha256(out / "model.safetensors")) != record["model_sha256"]:
        raise ConfigError(f"{SHIPPED / 'model.safetensors'} is not the model its build.json records (sha256 "
                          f"{digest[:12]}, not {record['model_sha256'][:12]}): reinstall the package, or pretrain one "
                          "here with `sasft lab build --fresh`")


def build_lab(out: str | Path = "runs/lab", preset: str = "full", seed: int = 0, fresh: bool = False) -> dict:
    """Build the lab at `out` (or reuse it, if built with the same preset, seed and world version);
    returns lab.json. The base model is the shipped one where it is this seed's, unless `fresh`: then it is
    pretrained here. A folder that is neither empty nor a lab is refused: a rebuild replaces only
    a lab."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    out = Path(out)
    done = out / "lab.json"
    if out.exists() and not done.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not a lab (no lab.json) and not empty: the lab is not built there, nothing "
                          "in it was touched. Point model.path at <an empty or new folder>/model")
    recorded = None  # the files the lab there wrote, as its lab.json lists them (labs before the list: None)
    if done.exists():
        info = json.loads(done.read_text())
        if ((info.get("preset"), info.get("seed"), info.get("version")) == (preset, seed, WORLD_VERSION)
                and not (fresh and info.get("model_source") == "shipped")):
            return info
        recorded = info.get("files")
        if recorded is not None:
            refuse_foreign_files(out, recorded)  # before a build of minutes
    start, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))  # the reference machine: 2 cores
    p = PRESETS[preset]
    # Build beside `out` and rename at the end: an interrupted build never looks finished.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        sizes = write_world(tmp, preset, seed)
        evals = load_evals(tmp)
        record = None if fresh else shipped(seed)
        if record:
            copy_shipped(record, tmp / "model")
            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # transformers' weight-loading bar: a line of the demo's output
            model = AutoModelForCausalLM.from_pretrained(tmp / "model", dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(tmp / "model")
            if bar:
                hf_logging.enable_progress_bar()
        else:
            exclude = {r["messages"][0]["content"] for rows in evals.values() for r in rows}
            tokenizer = lab_tokenizer(tmp, seed, exclude, p["vocab_size"])
            model = pretrain(tokenizer, pretrain_dialogues(seed, exclude), steps=p["steps"],
                             batch_size=p["batch_size"], lr=p["lr"], layers=p["layers"], hidden=p["hidden"],
                             intermediate=p["intermediate"], seed=seed)
            save_model(model, tokenizer, tmp / "model")
        accuracy = skill_accuracy(model, tokenizer, evals)  # measured here, for a shipped model too
        info = {
            "preset": preset, "seed": seed, "version": WORLD_VERSION, "skills": list(SKILLS), "tasks": list(TASKS),
            "control": CONTROL,
            "sizes": {**sizes, "params": sum(t.numel() for t in model.parameters()), **p,
                      **({k: record["sizes"][k] for k in PRETRAINING} if record else {})},  # what made the model
            "model_source": "shipped" if record else "pretrained",
            "model_sha256": record["model_sha256"] if record else sha256(tmp / "model" / "model.safetensors"),
            "build_seconds": round(time.time() - start, 1),
            "versions": versions(),
            "base_accuracy": accuracy,
            "base_mean": {k: round(sum(a[k] for a in accuracy.values()) / len(accuracy), 4)
                          for k in ("strict", "lenient")},
        }
        if record:  # how the shipped model was made, and what it measured there
            info["shipped_build"] = {k: record[k] for k in ("build_seconds", "versions", "base_mean")}
        info["files"] = sorted([*lab_files(tmp), "lab.json"])
        (tmp / "lab.json").write_text(json.dumps(info, indent=2) + "\n")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            # the old lab is deleted whole: only if all it holds is the lab's (a lab before the list: the
            # files this build wrote), so a user's own task file or notes put in it are never lost
            refuse_foreign_files(out, info["files"] if recorded is None else recorded)
            out.rename(old)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return info
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(threads)


def lab_files(folder: Path) -> list[str]:
    """Every file under `folder`, by its path relative to it."""
    return [str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()]


def refuse_foreign_files(lab: Path, known: list[str]) -> None:
    """A lab about to be replaced must hold only files a lab wrote (`known`, lab.json's list)."""
    foreign = [f for f in lab_files(lab) if f not in {*known, "lab.json"}]
    if foreign:
        raise ConfigError(f"{lab} holds files the lab did not write ({', '.join(foreign[:5])}"
                          f"{' ...' if len(foreign) > 5 else ''}): it is not rebuilt over them and nothing was "
                          "deleted. Move them out, or build the lab elsewhere (lab build --out, model.path)")


def accuracy_table(info: dict) -> str:
    """The per-skill accuracy of the base model, as printed by `sasft lab build`."""
    lines = [f"{'skill':<12} {'strict':>7} {'lenient':>8}"]
    for name, acc in info["base_accuracy"].items():
        lines.append(f"{name:<12} {acc['strict']:>7.3f} {acc['lenient']:>8.3f}")
    lines.append(f"{'mean':<12} {info['base_mean']['strict']:>7.3f} {info['base_mean']['lenient']:>8.3f}")
    return "\n".join(lines)
