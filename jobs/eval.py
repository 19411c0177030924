"""Ray job: serve, score in-domain and general benchmarks, write the report.

    ray job submit --working-dir . -- python jobs/eval.py --config CONFIG [--set SECTION.KEY=VALUE ...]
"""

import sys

from job import main

if __name__ == "__main__":
    sys.exit(main("eval"))
