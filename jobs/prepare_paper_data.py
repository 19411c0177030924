"""Fetch the paper grid's data (five SuperNI tasks, MedText), before `sasft grid cluster/grids/paper.yaml`.

    python jobs/prepare_paper_data.py --out data/paper
"""

import argparse
from pathlib import Path

from sasft_ray.paper import SUPERNI_TASKS, prepare

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/paper")
    parser.add_argument("--task", action="append", dest="tasks",
                        help=f"SuperNI task (repeatable; default: {', '.join(SUPERNI_TASKS)})")
    args = parser.parse_args()
    for name, rows in prepare(Path(args.out), args.tasks or SUPERNI_TASKS).items():
        print(f"{args.out}/{name}: {rows} rows")
