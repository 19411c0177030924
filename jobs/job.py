"""Ray job entrypoint: a `sasft` command on a config, with `--set` overrides.

    ray job submit --working-dir . -- python jobs/job.py COMMAND --config CONFIG [--set SECTION.KEY=VALUE ...]

COMMAND is one of JOBS: `run`, the whole pipeline (generate, mix, train, export, serve, eval, report);
`generate`, self-talk with vLLM actors, filters, mix; `train`, DeepSpeed ZeRO fine-tuning on Ray Train,
then the HF export; `serve`, the fine-tuned and base models behind one OpenAI API until the job is
stopped; `eval`, serve, score the in-domain and general benchmarks, write the report.
A job's driver runs on the head node, which reserves no GPU: every stage asks Ray for its
own GPUs (engines, training workers, replicas). The exit code is the job's result:
0 done, 2 a config or data error (the message says which), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys

JOBS = ("run", "generate", "train", "serve", "eval")


def main(argv: list[str] | None = None) -> int:
    from sasft_ray.cli import main as sasft

    parser = argparse.ArgumentParser(description="Ray job entrypoint: `sasft COMMAND CONFIG`")
    parser.add_argument("command", choices=JOBS)
    parser.add_argument("--config", required=True, help="a YAML file in the working dir, or a shipped config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args, rest = parser.parse_known_args(argv)
    return sasft([args.command, args.config, *[f"--set={o}" for o in args.overrides], *rest])


if __name__ == "__main__":
    sys.exit(main())
