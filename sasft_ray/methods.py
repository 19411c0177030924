"""The training methods, one row each: what the mix adds to the task rows, what training freezes, how the
model card and the config reference describe it. Every stage reads this table, so a method is added here.

`sasft_ray.config.Method` (the values `train.method` and `compare` accept) is derived from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sasft_ray.layout import EXTERNAL, REPLAY, REWRITE, SELFTALK, TASK


@dataclass(frozen=True)
class MixedIn:
    """Rows a method mixes in beside the task rows, round(λ x task rows) of them (λ: mix.self_ratio)."""

    source: str  # their `source` in the mixed rows
    stage: str  # the generate stage that writes them, and its folder in the run dir
    rows: str  # what the model card calls them
    repeats: bool = False  # as many rows as λ asks, repeated in turn: never short of a pool
    data: str | None = None  # the dataset it reads, a key of the config's `mix` section (mix.external, mix.replay)


SELF_DIALOGUES = MixedIn("self", SELFTALK, "self-dialogues")
EXTERNAL_ROWS = MixedIn("external", EXTERNAL, "external rows", data="external")
REPLAY_ROWS = MixedIn("replay", REPLAY, "general rows replayed", data="replay")
MIX_DATA = tuple(m.data for m in (EXTERNAL_ROWS, REPLAY_ROWS))  # the `mix` keys that hold a method's dataset
TASK_REPEATS = MixedIn("repeat", TASK, "task rows repeated", repeats=True)  # the task's own training rows again


@dataclass(frozen=True)
class TrainingMethod:
    name: str
    summary: str  # the config reference's words (train.method)
    description: str  # the model card's words: "A fine-tune of ... with <description>"
    mixed_in: MixedIn | None = None
    freezes: bool = False  # the embeddings and the lowest train.freeze_layers blocks
    rewrites: bool = False  # its task rows are the base model's rewrites of them (the `rewrite` stage, sdft)

    @property
    def reads(self) -> tuple[str, ...]:
        """The generate stages whose output the mix reads (besides mix.sources)."""
        return tuple(dict.fromkeys((TASK,) + ((REWRITE,) if self.rewrites else ())
                                   + ((self.mixed_in.stage,) if self.mixed_in else ())))


METHODS = {m.name: m for m in (
    TrainingMethod("sft", "task rows only", "supervised fine-tuning on the task data alone"),
    TrainingMethod("sa-sft", "+ self-dialogues at mix.self_ratio",
                   "SA-SFT (self-augmented SFT): the task data mixed with self-dialogues the base model wrote itself, "
                   "so that it keeps what it knew", mixed_in=SELF_DIALOGUES),
    TrainingMethod("freeze", "sft with the embeddings and the lowest freeze_layers blocks frozen",
                   "supervised fine-tuning on the task data with the embeddings and lowest blocks frozen",
                   freezes=True),
    TrainingMethod("external-mix", "+ mix.external", "supervised fine-tuning on the task data mixed with external "
                   "general data", mixed_in=EXTERNAL_ROWS),
    # the classic defence against forgetting: rehearse general data (ideally what the model was trained on)
    TrainingMethod("replay", "+ mix.replay, general data at mix.self_ratio (rehearsal)", "supervised fine-tuning "
                   "on the task data mixed with replayed general data", mixed_in=REPLAY_ROWS),
    # SA-SFT's compute-matched control: without it, part of SA-SFT's win over SFT could be its longer schedule
    TrainingMethod("sft-matched", "sft on as many rows as sa-sft at mix.self_ratio: the task rows repeated in place of "
                   "self-dialogues (the compute-matched control)", "supervised fine-tuning on the task data, the task "
                   "rows repeated to as many rows and optimizer steps as SA-SFT trains on at the same λ (SA-SFT's "
                   "compute-matched control)", mixed_in=TASK_REPEATS),
    # SDFT (Yang et al. 2024): the targets moved toward the model's own distribution instead of self-talk added
    TrainingMethod("sdft", "task rows whose replies the base model rewrote in its own words (sdft section)",
                   "self-distillation fine-tuning (SDFT): the task data with each reply rewritten by the base model in "
                   "its own words, from the task input and the reference reply", rewrites=True),
)}
