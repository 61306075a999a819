"""Ray job / driver script: `python jobs/sweep.py --config CONFIG [--resume] [a.b=value ...]`.

Same as `distill sweep`; also `ray job submit --working-dir . -- python jobs/sweep.py --config ...`.
"""

import sys

from orchestrator.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
