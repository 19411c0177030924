"""Ray job: the whole pipeline: generate, mix, train, export, serve, eval, report.

    ray job submit --working-dir . -- python jobs/run.py --config CONFIG [--set SECTION.KEY=VALUE ...]
"""

import sys

from job import main

if __name__ == "__main__":
    sys.exit(main("run"))
