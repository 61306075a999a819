"""Ray job entry point: `ray job submit --working-dir . -- python jobs/train_teacher.py --config CONFIG [a.b=value ...]`.

Same as `distill teacher`; ray.init() inside connects to the cluster the job runs in.
"""

import sys

from orchestrator.cli import main

if __name__ == "__main__":
    sys.exit(main(["teacher", *sys.argv[1:]]))
