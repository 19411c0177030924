"""The `sasft` command: a thin layer over the library, one sub-command per stage."""

from __future__ import annotations

import argparse
import sys

from sasft_ray.config import ConfigError, load_config, shipped_configs
from sasft_ray.data import BadRow
from sasft_ray.generate import STAGES, TooFewSurvivors
from sasft_ray.rundir import StageChanged
from sasft_ray.train import TrainSetupError

# Mistakes in the config or the data: a message, not a traceback.
USER_ERRORS = (ConfigError, BadRow, StageChanged, TooFewSurvivors, TrainSetupError)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help=f"a YAML file, or a shipped config: {', '.join(shipped_configs())}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable); the value is parsed as YAML")


def cmd_generate(args) -> None:
    from sasft_ray.generate import generate

    cfg = load_config(args.config, args.overrides)
    rd = generate(cfg, redo="all" if args.force else args.redo)
    print(f"run directory: {rd.root}  (manifest: {rd.path('manifest.json')})")


def cmd_train(args) -> None:
    from sasft_ray.rundir import RunDir
    from sasft_ray.train import train

    cfg = load_config(args.config, args.overrides)
    rd = RunDir(cfg.run_dir)
    train(cfg, rd, force=args.force)
    print(f"model: {rd.path('model')}")


def cmd_config(args) -> None:
    import yaml

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")


def cmd_tiny_model(args) -> None:
    from sasft_ray.tiny import build_tiny_model

    out = build_tiny_model(args.out, arch=args.arch, layers=args.layers, warmup_steps=args.warmup_steps)
    print(f"tiny {args.arch} chat model written to {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sasft", description="SA-SFT fine-tuning on Ray: self-talk, mix, "
                                     "train, serve, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="validate task data, write self-dialogues with vLLM, mix them")
    _config_args(p)
    p.add_argument("--force", action="store_true", help="redo every stage, even those already done")
    p.add_argument("--redo", choices=STAGES, help="redo this stage and the ones after it")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("train", help="fine-tune on the mixed data with DeepSpeed ZeRO on Ray Train, export HF")
    _config_args(p)
    p.add_argument("--force", action="store_true", help="train again even if done")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("config", help="print the resolved config (after overrides), or the error")
    _config_args(p)
    p.set_defaults(fn=cmd_config)

    p = sub.add_parser("tiny-model", help="build a tiny local chat model (for tests and demos)")
    p.add_argument("out")
    p.add_argument("--arch", choices=("llama", "qwen2"), default="llama")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=300,
                   help="steps on synthetic dialogues so the model ends its turns (0: random weights)")
    p.set_defaults(fn=cmd_tiny_model)

    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
