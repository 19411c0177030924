"""Ray job: the fine-tuned and base models behind one OpenAI API, until the job is stopped.

    ray job submit --working-dir . -- python jobs/serve.py --config CONFIG [--set SECTION.KEY=VALUE ...]
"""

import sys

from job import main

if __name__ == "__main__":
    sys.exit(main("serve"))
