"""What a person sees while a job runs: this project's lines, one per epoch and stage, and nothing of Ray's.

By default Ray's own output stays in its session logs (`ray.init(log_to_driver=False)`): no worker
prefixes, no Ray Data progress bars, no per-report dumps. Train workers send their epoch lines to a
`ProgressSink` actor of the job instead, and the driver prints them (`progress_printer`). Errors
still reach the console in full: Ray raises a worker's exception, with its traceback, in the driver.
`distill -v` (KD_VERBOSE=1) turns Ray's output back on.

Lines are printed with rich, which leaves out colours and control codes when stdout is not a
terminal (CI, `ray job logs`): plain lines, one per event.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import ray

VERBOSE_ENV = "KD_VERBOSE"
SINK_NAMESPACE = "kd-orchestrator"


def verbose() -> bool:
    return bool(os.environ.get(VERBOSE_ENV))


def console():
    from rich.console import Console

    # Piped output would otherwise be cut to 80 columns; `highlight=False`: no colouring of numbers;
    # `markup=False`: "[teacher:cnn]" is text, not a rich style tag.
    return Console(width=None if Console().is_terminal else 140, highlight=False, markup=False, soft_wrap=True)


# The open progress_printer's "print what the sink holds now", so a stage's last epoch lines come before its end line.
_flush_progress: list = []


def say(line: str) -> None:
    """A line of the driver's own (stage starts and ends), after the workers' lines that came before it."""
    for flush in _flush_progress:
        flush()
    console().print(line)


@ray.remote(num_cpus=0)
class ProgressSink:
    """Collects progress lines from train workers until the driver drains them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def emit(self, line: str) -> None:
        self.lines.append(line)

    def drain(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


def emit(sink_name: str | None, line: str) -> None:
    """From a worker: hand `line` to the job's sink (fire and forget), or print it when there is none."""
    if sink_name:
        try:
            ray.get_actor(sink_name, namespace=SINK_NAMESPACE).emit.remote(line)
            return
        except ValueError:  # the driver is gone (a test calling the loop directly): print instead
            pass
    print(line, flush=True)


@contextlib.contextmanager
def progress_printer(interval_s: float = 0.5) -> Iterator[str | None]:
    """Start the job's sink and a thread printing what reaches it; yields the sink's name (None when verbose:
    then workers print, and Ray forwards their output)."""
    if verbose():
        yield None
        return
    name = f"kd-progress-{uuid.uuid4().hex[:12]}"
    sink = ProgressSink.options(name=name, namespace=SINK_NAMESPACE).remote()
    out = console()
    stop = threading.Event()
    lock = threading.Lock()  # one drain-and-print at a time, so lines keep their order

    def flush() -> None:
        with lock:
            for line in ray.get(sink.drain.remote(), timeout=30):
                out.print(line)

    def pump() -> None:
        while True:
            finished = stop.wait(interval_s)
            try:
                flush()
            except Exception:  # noqa: BLE001  (Ray shutting down under us: progress is best effort)
                return
            if finished:
                return

    def flush_quietly() -> None:
        with contextlib.suppress(Exception):
            flush()

    thread = threading.Thread(target=pump, name="kd-progress", daemon=True)
    thread.start()
    _flush_progress.append(flush_quietly)
    try:
        yield name
    finally:
        _flush_progress.remove(flush_quietly)
        stop.set()
        thread.join(timeout=35)
        with contextlib.suppress(Exception):
            ray.kill(sink)


def quiet_driver_logs() -> None:
    """The driver's share of the quiet: Ray Data's execution logs and progress bars, Ray core's start-up INFO."""
    if verbose():
        return
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray.data", "ray.train", "ray.tune", "ray._private.worker"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Progress bars disabled. To enable, set ..." answers our own setting above.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # "The Ray cluster currently does not have any available CPUs. The Dataset job will hang": said
    # whenever our own sized actor pool or Train workers hold every CPU for a moment; nothing to act on.
    logging.getLogger("ray.data.dataset").setLevel(logging.ERROR)
    # A resumed sweep's "Failed to fetch metrics for 1 trial(s)": the trial that was pending at the kill, about to rerun.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)


# Workers Ray starts before any job asks for them carry this job id in their log names; the job that
# leases one is named inside the file instead (Ray writes ":job_id:<id>" when the worker takes its first task).
PRESTARTED = "ffffffff"


def _ran_for(path: Path, job: str) -> bool:
    """Whether a prestarted worker's log (or its .out/.err sibling) names `job` as the job it ran for."""
    marker = f":job_id:{job}".encode()
    for sibling in (path.with_suffix(".out"), path.with_suffix(".err")):
        try:
            with open(sibling, "rb") as f:
                if marker in f.read(1 << 16):
                    return True
        except OSError:
            continue
    return False


def copy_job_logs(dest: Path, *, max_bytes: int = 1 << 20, since: float = 0.0) -> list[Path]:
    """This job's Ray worker logs on the driver's node (the stdout and stderr of every task and actor it ran
    there: what the console left out), each cut to its last `max_bytes`, copied into dest for MLflow.
    `since` (a time.time()): only logs written to since then, so a driver that runs several jobs (a notebook,
    a test session) attaches to each run its own workers' logs, not every earlier job's again.

    On the embedded default that is every worker of the job; on a cluster, the head node's share (each
    node keeps its own in its session folder, `ray logs`). [] when the folder cannot be found."""
    here = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n["NodeID"] == here), None)
    if node is None or not node.get("ObjectStoreSocketName"):
        return []
    # <session>/sockets/plasma_store: Ray has no public call for the session folder itself.
    logs = Path(node["ObjectStoreSocketName"]).parent.parent / "logs"
    job = ray.get_runtime_context().get_job_id()
    copied = []
    prestarted = sorted(logs.glob(f"worker-*-{PRESTARTED}-*"))
    ours = {stem for stem in {p.stem for p in prestarted} if _ran_for(logs / f"{stem}.out", job)}  # one look per worker, not per file
    for path in sorted(logs.glob(f"worker-*-{job}-*")) + [p for p in prestarted if p.stem in ours]:
        stat = path.stat()
        size = stat.st_size
        if path.suffix not in (".out", ".err") or size == 0 or stat.st_mtime < since:
            continue
        with open(path, "rb") as f:
            f.seek(max(0, size - max_bytes))
            (dest / path.name).write_bytes(f.read())
        copied.append(dest / path.name)
    return copied
