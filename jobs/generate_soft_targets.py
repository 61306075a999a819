"""Ray job entry point: `ray job submit --working-dir . -- python jobs/generate_soft_targets.py --config CONFIG [a.b=value ...]`.

Same as `distill soft-targets`; ray.init() inside connects to the cluster the job runs in.
"""

import sys

from orchestrator.cli import main

if __name__ == "__main__":
    sys.exit(main(["soft-targets", *sys.argv[1:]]))
