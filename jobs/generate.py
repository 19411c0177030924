"""Ray job: self-talk with vLLM actors, filters, mix.

    ray job submit --working-dir . -- python jobs/generate.py --config CONFIG [--set SECTION.KEY=VALUE ...]
"""

import sys

from job import main

if __name__ == "__main__":
    sys.exit(main("generate"))
