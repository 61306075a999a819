"""Shared fixtures: a real local Ray cluster shared by the tests that need one, a real SQLite MLflow store per test.

Tests that use a Ray cluster or a real MLflow store end to end are marked `integration` here, from
their fixtures, so no test can forget the mark: `pytest -m "not integration"` runs the fast ones.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Tests of these modules start Ray or `distill` processes of their own (not through ray_session).
PROCESS_MODULES = {"test_faults", "test_local_ray", "test_cluster_integration", "test_console", "test_sweep"}


HOST_SPEED: list[str] = []


def pytest_sessionstart(session):
    """How fast this host is right now, printed after the tests: the same suite took 569 s and 1071 s of pytest on
    this project's 2-core machines hours apart, and most of its time is processes starting and importing torch. Two
    probes: a pure-Python loop, and this process's own first `import torch` (the tests import it anyway).

    On a run of the whole suite, digits_cli_job's process starts here, before collection (7-11 s here), which then
    runs beside it on the other core; a narrower run starts it at its first test, and only if a test reads it."""
    import sys
    import time

    started = time.perf_counter()
    total = 0
    for i in range(5_000_000):
        total += i
    loop_s = time.perf_counter() - started
    if _whole_suite(session.config):
        _DIGITS_CLI_JOB.update(_start_digits_cli_job(Path(tempfile.mkdtemp(prefix="kd-digits-cli-job-"))))
    if "torch" in sys.modules:
        HOST_SPEED.append(f"host speed before the tests: a 5M-step Python loop {loop_s:.2f} s")
        return
    started = time.perf_counter()
    import torch  # noqa: F401

    HOST_SPEED.append(f"host speed before the tests: a 5M-step Python loop {loop_s:.2f} s, `import torch` {time.perf_counter() - started:.2f} s"
                      f"{' beside the digits job starting' if _DIGITS_CLI_JOB else ''}")


def _whole_suite(config) -> bool:
    """`pytest` on the whole tests folder (CI's `make test`), with no selection that could leave digits_cli_job unread."""
    paths = config.args or [str(REPO_ROOT)]
    return (not config.option.keyword and not config.option.markexpr and not config.getoption("lf", False)
            and all(Path(arg).resolve() in (REPO_ROOT, REPO_ROOT / "tests") for arg in paths))


def pytest_terminal_summary(terminalreporter):
    for line in HOST_SPEED:
        terminalreporter.write_line(line)


def pytest_collection_modifyitems(items):
    """Integration marked from fixtures and modules; then the order: the tests with no working Ray first (marked
    no_working_ray where their module's others have one), while digits_cli_job's process (started before collection
    or by the first test: pytest_sessionstart) runs beside them on the other core, then the tests that read that job
    (they wait for it), then the other integration tests, each alone. The sort is stable: within each group, the
    files' own order."""
    for item in items:
        if {"ray_session", "digits_cli_job"} & set(item.fixturenames) or item.module.__name__.rsplit(".", 1)[-1] in PROCESS_MODULES:
            item.add_marker(pytest.mark.integration)

    def group(item) -> int:
        if item.get_closest_marker("integration") is None or item.get_closest_marker("no_working_ray"):
            return 0
        return 1 if "digits_cli_job" in item.fixturenames else 2

    items.sort(key=group)


def _start_ray():
    import ray

    # Workers must import `orchestrator` from this checkout even when it is not installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    # "local": a new Ray, never one that another process (a `distill` job, a test's cluster) runs on this host.
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False, configure_logging=False)


@pytest.fixture(scope="module")
def ray_session():
    """A real local Ray with 2 CPUs, started by the first module that needs it and kept for the next ones.

    Module-scoped, not session-scoped: a test that needs no Ray in this process (test_bad_input's
    `no_ray`) may stop it, and the next module that needs one starts it again, whatever the order.
    """
    import ray

    if not ray.is_initialized():
        _start_ray()
    yield ray


@pytest.fixture
def no_ray():
    """This process without a Ray: a command run in it must start (or refuse to start) its own."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield


def pytest_sessionfinish(session, exitstatus):
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    if _DIGITS_CLI_JOB:  # also when no test ran (--collect-only) after pytest_sessionstart started it
        _stop_if_running(_DIGITS_CLI_JOB["proc"])
        if _DIGITS_CLI_JOB["root"].name.startswith("kd-digits-cli-job-"):  # pytest_sessionstart's folder, not pytest's
            shutil.rmtree(_DIGITS_CLI_JOB["root"], ignore_errors=True)


@pytest.fixture(scope="session")
def _empty_mlflow_store(tmp_path_factory) -> Path:
    """An empty SQLite MLflow store, its schema made by MLflow itself, once: MLflow's migrations cost 2-3 s per
    new database here (26 stores in the suite), a copy of the migrated file 0.05 s."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture(scope="session")
def new_mlflow_store(_empty_mlflow_store):
    """`new_mlflow_store(folder)` -> the URI of a fresh store at folder/mlflow.db, as a first job there would make it.

    Only the Default experiment's artifact location names a folder, that of the template: moved to `folder`."""
    import shutil
    import sqlite3

    def make(folder: Path) -> str:
        db = folder / "mlflow.db"
        shutil.copyfile(_empty_mlflow_store, db)
        with sqlite3.connect(db) as conn:
            conn.execute("update experiments set artifact_location = ? where experiment_id = 0", (str(folder / "mlruns" / "0"),))
        return f"sqlite:///{db}"

    return make


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch, new_mlflow_store) -> str:
    """A fresh SQLite tracking store for one test, also exported for code that reads the environment."""
    uri = new_mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> Path:
    """A state-dict file of the digits configs' CNN teacher, trained here in plain torch (a second, no Ray).

    For tests whose subject is what comes after the teacher (sweeps, methods, views, parquet, faults): a teacher
    trained by Ray Train costs a fit (10-12 s here) each; digits_cli_job below still trains one the way a job does."""
    import torch
    import torch.nn.functional as F

    from orchestrator.config import load_config, spec_of
    from orchestrator.data.datasets import load_arrays, normalize_images
    from orchestrator.train.models import build_model

    cfg = load_config(REPO_ROOT / "configs/digits_kd.yaml")
    data = load_arrays(cfg.dataset)
    torch.manual_seed(0)
    model = build_model(spec_of(cfg.teachers[0]), data.input_shape, data.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    images = normalize_images(torch.from_numpy(data.train.images), data.mean, data.std)
    labels = torch.from_numpy(data.train.labels)
    for _ in range(8):
        for batch in torch.randperm(len(labels)).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        test_accuracy = (model(normalize_images(torch.from_numpy(data.test.images), data.mean, data.std)).argmax(1) == torch.from_numpy(data.test.labels)).float().mean()
    assert test_accuracy > 0.9, f"the test teacher reached only {test_accuracy:.3f}"
    path = tmp_path_factory.mktemp("digits_teacher") / "cnn.pt"
    torch.save(model.state_dict(), path)
    return path


# digits_cli_job's process once started (by pytest_sessionstart or _digits_cli_job_started): proc, folder, uri, overrides, console.
_DIGITS_CLI_JOB: dict = {}


def _start_digits_cli_job(root: Path) -> dict:
    """Its `distill run` in root/job, on a store the job makes there as a user's first job does (its schema is made
    in the job's process, beside this one's work); its console into files, not pipes nobody drains until a reader waits."""
    import subprocess
    import sys

    folder = root / "job"
    folder.mkdir()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    overrides = ["teachers.0.train.epochs=2", "train.epochs=2", "soft_targets.num_actors=1", "tracking.experiment=console"]
    argv = ["run", str(REPO_ROOT / "configs/digits_kd.yaml"), *overrides, "chain=[{family: mlp, hidden: [48]}]",
            "students=[{name: mlp32, family: mlp, hidden: [32]}]", "--summary-json", "summary.json"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "KD_VERBOSE")}
    env |= {"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO_ROOT)}
    console = [root / "stdout.txt", root / "stderr.txt"]
    with open(console[0], "w") as out, open(console[1], "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *argv], cwd=folder, env=env, stdout=out, stderr=err,
                                start_new_session=True)
    return {"proc": proc, "root": root, "folder": folder, "uri": uri, "overrides": overrides, "console": console}


def _stop_if_running(proc) -> None:
    """Ctrl-C it, so that it stops its Ray itself (SIGKILL after a minute)."""
    import signal
    import subprocess

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session", autouse=True)
def _digits_cli_job_started(request, tmp_path_factory):
    """digits_cli_job's `distill run`, started at the first test when any test of the session reads it and
    pytest_sessionstart did not start it already: a whole job costs 40-80 s here, most of it on one core or waiting
    on process start-ups, so collection and the tests with no Ray (run first: pytest_collection_modifyitems) take
    the other core meanwhile. Stopped on the way out if nobody waited for it (-x, a deselected reader)."""
    readers = any("digits_cli_job" in item.fixturenames for item in request.session.items)
    if readers and not _DIGITS_CLI_JOB:
        _DIGITS_CLI_JOB.update(_start_digits_cli_job(tmp_path_factory.mktemp("digits_cli_job")))
    if _DIGITS_CLI_JOB and not readers:  # started before collection, which then selected none of its readers
        _stop_if_running(_DIGITS_CLI_JOB["proc"])
    yield _DIGITS_CLI_JOB if readers else None
    if _DIGITS_CLI_JOB:
        _stop_if_running(_DIGITS_CLI_JOB["proc"])


@pytest.fixture(scope="session")
def digits_cli_job(_digits_cli_job_started):
    """One short `distill run` as a user starts it (a `distill` process, not a TTY), shared by the tests that read
    what it leaves: its console (test_console.py), its run tree and caches, on which next jobs run (test_pipeline.py,
    in a copy: `copy_to(dest)`), and its runs, which `distill report` measures (test_compress.py). `overrides`: its
    own, less its students; a later job given them finds its teacher and soft targets in the job's caches."""
    from types import SimpleNamespace

    job = _digits_cli_job_started
    code = job["proc"].wait(timeout=500)
    output = job["console"][0].read_text() + job["console"][1].read_text()
    assert code == 0, output[-6000:]
    return SimpleNamespace(folder=job["folder"], uri=job["uri"], console=output, overrides=job["overrides"],
                           copy_to=lambda dest: _copy_of_job(job["folder"], dest))


def _copy_of_job(folder: Path, dest: Path) -> str:
    """A finished job's working dir (its caches, its SQLite store, the store's artifacts) copied to `dest`, for a next
    job to run there as it would in the original, which stays untouched. Returns the copy's tracking URI.

    The store names its artifact folders by absolute path: those of the copy are moved to the copy's own."""
    import shutil
    import sqlite3

    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("ray_results"))
    with sqlite3.connect(dest / "mlflow.db") as conn:
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location")):
            conn.execute(f"update {table} set {column} = replace({column}, ?, ?)", (str(folder), str(dest)))
    return f"sqlite:///{dest / 'mlflow.db'}"
