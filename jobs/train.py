"""Ray job: DeepSpeed ZeRO fine-tuning on Ray Train, then the HF export.

    ray job submit --working-dir . -- python jobs/train.py --config CONFIG [--set SECTION.KEY=VALUE ...]
"""

import sys

from job import main

if __name__ == "__main__":
    sys.exit(main("train"))
