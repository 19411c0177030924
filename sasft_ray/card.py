"""The model card: `<run_dir>/model/README.md`, in the Hugging Face format, from what the run dir records.

`model_card` reads only what exists: the config, the manifest's finished stage records (task rows,
self-dialogues, mix, training), `model/train_result.json`, `model/adapter/`, and, once the evaluation has run,
the report's headline numbers from its results (`eval/results.json`: the in-domain score of the fine-tune
against the base model's, the share of the general score kept). Training writes the card without scores;
the evaluation rewrites it with them. `sasft push` uploads it with the weights.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from sasft_ray.config import Config
from sasft_ray.data import hub_id_shaped
from sasft_ray.layout import ADAPTER, CARD, MODEL, TRAIN_RESULT, is_uri
from sasft_ray.methods import SELF_DIALOGUES
from sasft_ray.rundir import RunDir


def _same_dir(a: str, b: str) -> bool:
    def norm(p: str) -> str:
        return p.rstrip("/") if is_uri(p) else str(Path(p).expanduser().absolute())

    return norm(a) == norm(b)


def headline(cfg: Config, results: dict) -> dict | None:
    """This run's report entry (`sasft_ray.report.entries`) in an evaluation's results, or None."""
    from sasft_ray.report import entries

    found = [e for e in entries(results) if e.get("run_dir") and _same_dir(e["run_dir"], cfg.run_dir)]
    return found[0] if found else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _count(n) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def shown(path: str) -> str:
    """A path as a card (which `sasft push` publishes) may show it: a hub id or URI whole, a local path by its
    last two parts only (no /home/<user>/... of this machine)."""
    if is_uri(path) or hub_id_shaped(path):
        return path
    return "/".join(Path(path).expanduser().absolute().parts[-2:])


def source_mix(sources: dict[str, dict]) -> str:
    """The training mix as the loss weighs it (every target token alike): rows and target tokens of each
    source, and each other source's target tokens per task target token (λ counts rows, not tokens)."""
    parts = [f"{name} {_count(s['rows'])} rows / {_count(s['target_tokens'])} target tokens"
             for name, s in sources.items()]
    task = sources.get("task", {}).get("target_tokens")
    ratios = [f"{name} {s['target_tokens'] / task:.2f}" for name, s in sources.items() if name != "task" and task]
    return ", ".join(parts) + (f" (target tokens per task target token: {', '.join(ratios)})" if ratios else "")


def model_card(cfg: Config, rd: RunDir, results: dict | None = None) -> str:
    """The card's text. `results`: an evaluation's results.json (the run's own, or for a compared method its
    main run's), whose entry for this run dir gives the scores; None: no scores (as training writes it: an
    evaluation already in the run dir would be of the model trained before)."""
    stages = rd.manifest().get("stages", {})
    done = {name: info for name, info in stages.items() if info.get("status") == "done"}
    task, selftalk, mix, train = (done.get(k, {}) for k in ("task", "selftalk", "mix", "train"))
    result = rd.read_json(MODEL, TRAIN_RESULT) if rd.exists(MODEL, TRAIN_RESULT) else {}
    entry = headline(cfg, results) if results else None
    t, method, spec, base = cfg.train, cfg.train.method, cfg.training_method, shown(cfg.model.path)
    lora = rd.exists(MODEL, ADAPTER)

    meta = {**({"base_model": base} if hub_id_shaped(cfg.model.path) else {}), "library_name": "transformers",
            "pipeline_tag": "text-generation", "tags": ["sasft", "self-augmented-sft", method, *(["lora"] if t.lora
                                                                                              else [])]}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {Path(cfg.run_dir.rstrip('/')).name}: {base} fine-tuned with {method}", "",
             f"A fine-tune of `{base}` by sasft-ray with {spec.description}"
             + (f"; λ = {cfg.mix.self_ratio:g} (mix.self_ratio: {spec.mixed_in.rows} per task row)." if spec.mixed_in
                else "."), ""]

    rows = [("base model", f"`{base}`"), ("method", method + (f", λ = {cfg.mix.self_ratio:g}" + (
        f" (achieved {mix['achieved_ratio']:g})" if mix.get("achieved_ratio") not in (None, cfg.mix.self_ratio)
        else "") if spec.mixed_in else ""))]
    data = f"`{shown(cfg.data.path)}`"
    if task:
        data += f": {_count(task.get('train_rows'))} training rows, {_count(task.get('heldout_rows'))} held out"
    rows.append(("task data", data))
    if spec.mixed_in is SELF_DIALOGUES and (selftalk or mix):
        mixed = mix.get("mixed_in_rows", selftalk.get("rows_out"))
        rows.append(("self-dialogues", f"{_count(mixed)} mixed in" + (
            f" ({_count(selftalk['rows_in'])} generated, {_count(selftalk['survived'])} kept by the filters)"
            if "rows_in" in selftalk and "survived" in selftalk else "")))
    if cfg.mixed_in_data is not None and mix.get("mixed_in_rows") is not None:
        rows.append((spec.mixed_in.rows, f"{_count(mix['mixed_in_rows'])} of `{shown(cfg.mixed_in_data.path)}`"))
    if spec.rewrites and (rewrite := done.get("rewrite")):
        rows.append(("rewritten replies", f"{_count(rewrite['rewritten'])} of {_count(rewrite['rows_in'])} task rows "
                     f"in the base model's words, {_count(rewrite['replaced'])} kept as they were (sdft.on_lost), "
                     f"{_count(sum(rewrite['drops'].values()))} dropped"))
    if spec.freezes:
        rows.append(("frozen", f"embeddings and the lowest {t.freeze_layers} blocks"))
    if train.get("sources"):
        rows.append(("mix as trained", source_mix(train["sources"])))
    if train.get("steps") is not None:
        rows.append(("steps", _count(train["steps"])))
    rows += [("learning rate", f"{t.lr:g} ({t.schedule}, warmup {t.warmup_ratio:g})"),
             ("epochs", f"{t.max_steps} steps (train.max_steps)" if t.max_steps else str(t.epochs)),
             ("batch", f"{t.micro_batch_size * t.grad_accum * t.num_workers} rows a step ({t.micro_batch_size} x "
                       f"{t.grad_accum} accumulated x {t.num_workers} workers), up to {t.max_length} tokens each")]
    trainable = train.get("trainable_params", result.get("trainable_params"))
    total = train.get("total_params", result.get("total_params"))
    size = f": {_params(trainable)} of {_params(total)} parameters trained" if trainable and total else ""
    rows.append(("fine-tuning", (f"LoRA r={t.lora.r}, alpha {t.lora.alpha:g}, merged into the weights" if t.lora
                                 else "full") + size))
    heldout = train.get("heldout_loss", result.get("heldout_loss"))
    if heldout is not None:
        rows.append(("held-out task loss", _fmt(heldout)))
    monitor = train.get("selftalk_heldout_loss", result.get("selftalk_heldout_loss"))
    if monitor is not None:
        rows.append(("held-out self-dialogue loss", f"{_fmt(monitor)} (the forgetting monitor: the base model's own "
                                                    "dialogues, never trained on)"))
    lines += ["## Training", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    if lora:
        lines += ["The weights here have the LoRA adapter merged in (no PEFT needed to load them); the adapter "
                  "itself is in `adapter/`.", ""]

    if entry:
        from sasft_ray.evaluate import INDOMAIN
        from sasft_ray.report import GENERAL, is_general

        metric = next(iter(results["models"][entry["model_id"]][INDOMAIN]), "score")
        lines += ["## Evaluation", "", "| benchmark | base | fine-tuned |", "|---|---|---|",
                  f"| in-domain ({metric}, the task's held-out split) | {_fmt(entry['base'][INDOMAIN])} | "
                  f"{_fmt(entry['scores'][INDOMAIN])} |"]
        lines += [f"| {b} | {_fmt(entry['base'][b])} | {_fmt(s)} |" for b, s in entry["scores"].items()
                  if b != INDOMAIN and not is_general(b)]
        if GENERAL in entry["scores"]:
            lines.append(f"| {GENERAL} | {_fmt(entry['base'][GENERAL])} | {_fmt(entry['scores'][GENERAL])} |")
        lines += ["", f"- in-domain gain over the base model: {entry['indomain_gain']:+.3f}"]
        if entry.get("retention") is not None:
            lines.append(f"- general score kept: {entry['retention']:.1%} of the base model's "
                         f"(forgetting {entry['forgetting']:+.3f})")
        lines.append("")
    return "\n".join(lines)


def write_model_card(cfg: Config, rd: RunDir, results: dict | None = None) -> bool:
    """(Re)write `<run_dir>/model/README.md`; False when the run has no exported model yet."""
    if not rd.exists(MODEL):
        return False
    rd.write_text(model_card(cfg, rd, results), MODEL, CARD)
    return True
