"""The callback through which a sweep trial's Ray Train run reports its epochs to Tune.

Light on purpose: Ray Train's controller, a process of its own per run, unpickles the callbacks it is given, and so
imports their module. Defined in sweep.py, this one made every trial's controller import torch, MLflow and the rest
of the package (6.5 s against 2.3 s here, measured with `python -c "import ..."`), before any worker started.
"""

from __future__ import annotations

from ray.tune.integration.ray_train import TuneReportCallback


class ReportAllButLastEpoch(TuneReportCallback):
    """Forward each epoch's metrics to Tune, except the last one.

    A scheduler's STOP on a trial's report kills the trial's actor at once, and ASHA says STOP
    to every trial whose report reaches max_t (its final epoch): the test metrics and MLflow
    writes after training would die with it, leaving the trial KILLED and untested.
    """

    def __init__(self, epochs: int):
        super().__init__()
        self.last_epoch = epochs - 1

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and metrics[0].get("epoch") == self.last_epoch:
            return
        super().after_report(run_context, metrics, checkpoint)
