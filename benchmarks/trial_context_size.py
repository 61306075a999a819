"""What a sweep ships to each trial: the SweepContext as `tune.with_parameters` pickles it, with the dataset's
arrays (as before 864e0bd) and as `flows/sweep.trial_context` ships it now (references, no arrays).

    .venv/bin/python benchmarks/trial_context_size.py                # digits and MNIST
    .venv/bin/python benchmarks/trial_context_size.py --datasets mnist

Prints one line per dataset; writes nothing but a scratch MLflow store. A few seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="digits,mnist", help="comma-separated dataset names for configs/digits_sweep.yaml")
    args = parser.parse_args(argv)

    import ray
    import ray.cloudpickle

    from orchestrator.config import load_config
    from orchestrator.flows.job import prepare
    from orchestrator.flows.sweep import SweepContext, trial_context

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    store = Path(tempfile.mkdtemp(prefix="kd-trial-context-")) / "mlflow.db"
    for name in args.datasets.split(","):
        # The driver's reader: the arrays in the driver are what a context "with the arrays" held (Ray's reader holds none).
        cfg = load_config(REPO / "configs/digits_sweep.yaml", [f"dataset.name={name}", "dataset.reader=driver", f"tracking.tracking_uri=sqlite:///{store}"])
        prep = prepare(cfg)
        with_arrays = len(ray.cloudpickle.dumps(SweepContext(prep, [], None, "sweep-run")))
        started = time.perf_counter()
        ctx = trial_context(prep, [], None, "sweep-run")
        priming_s = time.perf_counter() - started
        shipped = len(ray.cloudpickle.dumps(ctx))
        ids = sum(a.nbytes for a in {id(a): a for a in (prep.train_ids, prep.val_ids, prep.student_train_ids)}.values())  # one pickle each
        print(f"{name}: train images {prep.data.train.images.shape}; context with the arrays {with_arrays:,} bytes, "
              f"as shipped {shipped:,} bytes ({ids:,} of them the splits' row ids); putting the trials' copies {priming_s:.2f} s")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
