"""What the Ray job entrypoints share: `--config` and `--set`, handed to the `sasft` command.

A job's driver runs on the head node, which reserves no GPU: every stage asks Ray for its
own GPUs (engines, training workers, replicas). The exit code is the job's result:
0 done, 2 a config or data error (the message says which), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys


def main(command: str) -> int:
    from sasft_ray.cli import main as sasft

    parser = argparse.ArgumentParser(description=f"Ray job entrypoint for `sasft {command}`")
    parser.add_argument("--config", required=True, help="a YAML file in the working dir, or a shipped config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args, rest = parser.parse_known_args()
    return sasft([command, args.config, *[f"--set={o}" for o in args.overrides], *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv.pop(1)))
