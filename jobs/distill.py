"""Ray job entry point: `ray job submit --working-dir . -- python jobs/distill.py --config CONFIG [a.b=value ...]`.

Same as `distill run`; ray.init() inside connects to the cluster the job runs in.
"""

import sys

from orchestrator.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
