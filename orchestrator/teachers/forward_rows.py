"""The teachers' forward-row counter: rows a teacher actually ran on, counted by a small actor.

Its own module, importing nothing but Ray: an actor process imports the module that defines its class, and
this one is started once per job (and once per cluster), so it must not pay for torch (2 s of CPU here).
"""

from __future__ import annotations

from typing import Any

import ray

COUNTER_NAME = "kd-teacher-forward-rows"
COUNTER_NAMESPACE = "kd-orchestrator"


@ray.remote(num_cpus=0)
class ForwardRowCounter:
    """Counts rows the teacher actually ran on, so tests and MLflow see real teacher work, not timings."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def total(self) -> int:
        return self.rows


_JOB_COUNTERS: dict[tuple[str, str], Any] = {}


def forward_row_counter(scope: str = "cluster") -> Any:
    """Rows the teachers ran on. `cluster`: every job's since the cluster started (detached; tests and benchmarks
    compare it across drivers). `job`: this driver's job only (owned by the driver, gone with it), what a job
    reports, whatever other jobs run beside it. The driver creates its job counter before any actor adds to it:
    one first made by an actor would end with that actor."""
    if scope == "job":
        context = ray.get_runtime_context()
        name = f"{COUNTER_NAME}-job-{context.get_job_id()}"
        key = (context.get_node_id(), name)  # a restarted Ray numbers its jobs from 1 again, on a new node id
        if key not in _JOB_COUNTERS:  # held here: a non-detached actor ends when the last handle to it goes
            _JOB_COUNTERS[key] = ForwardRowCounter.options(name=name, namespace=COUNTER_NAMESPACE, get_if_exists=True).remote()
        return _JOB_COUNTERS[key]
    if scope != "cluster":
        raise ValueError(f"scope must be 'cluster' or 'job', got {scope!r}")
    return ForwardRowCounter.options(name=COUNTER_NAME, namespace=COUNTER_NAMESPACE, get_if_exists=True, lifetime="detached").remote()


def teacher_forward_rows(scope: str = "cluster") -> int:
    return ray.get(forward_row_counter(scope).total.remote())
