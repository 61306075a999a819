"""Faults, each caused for real: a teacher actor and a Ray Train worker SIGKILLed mid-run, a cache
truncated on disk, a second process holding the cache lock, Ctrl-C on a `distill run` process.

Real local Ray (the session's), real SQLite MLflow, no mocks. Processes are killed by PID, found
through Ray's state API (this session's cluster only) or as children of the process the test started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from test_pipeline import teacher_actor_pids  # this session's alive teacher actors

from orchestrator.config import load_config
from orchestrator.data.datasets import DatasetArrays, Split
from orchestrator.flows.stage_runs import soft_target_stage
from orchestrator.flows.stages import TeacherWeights, TrackingContext
from orchestrator.teachers.pool import teacher_forward_rows
from orchestrator.teachers.soft_targets import CacheCorruptWarning, read_cache
from orchestrator.tracking import runs as tracking
from orchestrator.train.models import build_model, state_dict_fingerprint

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[1]


class Killer(threading.Thread):
    """Polls `ready()` and SIGKILLs the process `find_pid()` names, once; records what it killed."""

    def __init__(self, ready: Callable[[], bool], find_pid: Callable[[], int | None], timeout_s: float = 300):
        super().__init__(daemon=True)
        self.ready, self.find_pid, self.timeout_s = ready, find_pid, timeout_s
        self.killed_pid: int | None = None
        self.error: BaseException | None = None
        self.run_id: str | None = None  # what `ready` may watch, set before start()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        try:
            while time.monotonic() < deadline:
                if self.ready():
                    pid = self.find_pid()
                    if pid:
                        os.kill(pid, signal.SIGKILL)
                        self.killed_pid = pid
                        return
                time.sleep(0.05)
        except BaseException as exc:  # surfaced by the test, not lost in the thread
            self.error = exc


def alive_actor_pid(class_name_part: str) -> int | None:
    """PID of an alive actor of this session's cluster (other Ray clusters may share the host)."""
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address
    actors = [a for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000) if class_name_part in a.class_name]
    return actors[0].pid if actors else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ----------------------------------------------------------------------------- soft targets

N_TRAIN, N_TEST = 16000, 4000  # big enough that the actor pool works for seconds: the kill lands mid-run


@pytest.fixture(scope="module")
def soft_setup(ray_session, tmp_path_factory, new_mlflow_store):
    """Synthetic images, an untrained wide MLP teacher, a store, and one clean run to compare against."""
    root = tmp_path_factory.mktemp("soft")
    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        return Split(rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64))

    data = DatasetArrays("synthetic", split(N_TRAIN), split(N_TEST), 10, (1, 28, 28), (0.5,), (0.25,))
    teacher_cfg = "teachers=[{name: wide, family: mlp, hidden: [512, 512]}]"

    def config(cache: str):
        return load_config(None, ["name=faults", teacher_cfg, "soft_targets.num_actors=2", "soft_targets.batch_size=256", f"soft_targets.cache_dir={root / cache}"])

    cfg = config("clean")
    torch.manual_seed(0)
    state = build_model(cfg.teachers[0], data.input_shape, data.num_classes).state_dict()
    teachers = [TeacherWeights(cfg.teachers[0], state, state_dict_fingerprint(state), "checkpoint", "none", 0.0)]
    uri = new_mlflow_store(root)
    experiment_id = tracking.ensure_experiment(uri, "faults")
    track = TrackingContext(uri, experiment_id, tracking.create_run(uri, experiment_id, "parent"))
    clean = soft_target_stage(cfg, teachers, data, track)
    assert not clean.cache_hit and clean.forward_rows == N_TRAIN + N_TEST
    return {"config": config, "data": data, "teachers": teachers, "track": track, "clean": clean, "root": root}


def assert_same_soft_targets(got, clean) -> None:
    assert got.fingerprint == clean.fingerprint and got.n_train == clean.n_train
    for part, rows in (("train_columns", (N_TRAIN, 1, 10)), ("test_columns", (N_TEST, 10))):
        mine, theirs = ray.get(getattr(got, part)), ray.get(getattr(clean, part))  # the columns stay in the object store
        assert set(mine) == set(theirs)
        for name, values in theirs.items():
            assert mine[name].shape == values.shape == rows
            np.testing.assert_array_equal(mine[name], values)


def test_teacher_actor_killed_mid_generation_gives_the_complete_identical_cache(soft_setup):
    s = soft_setup
    cfg = s["config"]("killed")
    total = N_TRAIN + N_TEST
    before = teacher_forward_rows()
    killer = Killer(ready=lambda: total // 5 <= teacher_forward_rows() - before < total // 2, find_pid=lambda: alive_actor_pid("TeacherActor"))
    killer.start()
    got = soft_target_stage(cfg, s["teachers"], s["data"], s["track"])
    killer.join(timeout=5)
    assert killer.error is None and killer.killed_pid is not None, "no teacher actor was killed mid-run"
    assert not pid_alive(killer.killed_pid)
    assert got.forward_rows >= total  # the killed actor's unfinished batches ran again on its restarted successor
    assert_same_soft_targets(got, s["clean"])
    # What reached the disk is complete too: a fresh read validates and holds every id once, same values.
    entry = read_cache(cfg.soft_targets.cache_dir, got.fingerprint)
    assert entry is not None and entry.manifest["rows"] == total
    again = soft_target_stage(cfg, s["teachers"], s["data"], s["track"])
    assert again.cache_hit and again.forward_rows == 0
    assert_same_soft_targets(again, s["clean"])


def test_truncated_cache_is_detected_and_rebuilt_with_a_warning(soft_setup):
    s = soft_setup
    cfg = s["config"]("clean")  # the entry the clean run published
    entry = read_cache(cfg.soft_targets.cache_dir, s["clean"].fingerprint)
    victim = entry.path / entry.manifest["files"][0]["name"]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a writer killed mid-file
    with pytest.warns(CacheCorruptWarning, match="discarding it, it will be rebuilt"):
        rebuilt = soft_target_stage(cfg, s["teachers"], s["data"], s["track"])
    assert not rebuilt.cache_hit and rebuilt.forward_rows == N_TRAIN + N_TEST
    assert_same_soft_targets(rebuilt, s["clean"])
    assert read_cache(cfg.soft_targets.cache_dir, s["clean"].fingerprint) is not None


LOCK_HOLDER = """
import shutil, sys, time
from orchestrator.teachers.soft_targets import build_lock
source, root, fp = sys.argv[1:]
with build_lock(root, fp):
    print("locked", flush=True)
    time.sleep(4.0)  # still building ...
    shutil.copytree(source, f"{root}/.tmp-{fp}-other")  # ... then publish the way write_cache does: whole dir, one rename
    import os; os.rename(f"{root}/.tmp-{fp}-other", f"{root}/{fp}")
"""


def test_second_job_waits_for_the_builder_and_reuses_its_cache(soft_setup):
    s = soft_setup
    cfg = s["config"]("shared")
    fp = s["clean"].fingerprint
    clean_entry = read_cache(s["config"]("clean").soft_targets.cache_dir, fp)
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(clean_entry.path), cfg.soft_targets.cache_dir, fp],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        got = soft_target_stage(cfg, s["teachers"], s["data"], s["track"])
    finally:
        holder.wait(timeout=60)
    assert holder.returncode == 0
    assert got.cache_hit and got.forward_rows == 0  # waited, then reused: the teacher did not run again
    run = MlflowClient(s["track"].uri).get_run(got.run_id)
    assert run.data.metrics["cache_lock_wait_s"] >= 0.5
    assert_same_soft_targets(got, s["clean"])
    assert sorted(p.name for p in Path(cfg.soft_targets.cache_dir).iterdir() if not p.name.startswith(".lock-")) == [fp]


# ----------------------------------------------------------------------------- Ray Train workers

EPOCHS = 6


def _train_digits(cfg, data, train_ids, val_ids, track, name: str, killer: Killer | None = None):
    from orchestrator.flows.teacher_stage import train_teacher

    run_id = tracking.create_run(track.uri, track.experiment_id, name, parent_id=track.parent_id)
    if killer is not None:
        killer.run_id = run_id
        killer.start()
    state_dict, _ = train_teacher(cfg, 0, data, train_ids, val_ids, track, run_id)
    tracking.end_run(track.uri, run_id)
    model = build_model(cfg.teachers[0], data.input_shape, data.num_classes)
    model.load_state_dict(state_dict)
    from orchestrator.train.evaluate import classification_metrics, predict_logits

    logits = predict_logits(model, data.test.images, mean=data.mean, std=data.std)
    return run_id, classification_metrics(logits, torch.from_numpy(data.test.labels))["accuracy"]


def test_train_worker_killed_mid_run_resumes_from_its_checkpoint(ray_session, tmp_path, new_mlflow_store):
    from orchestrator.data.datasets import load_arrays, split_train_val

    cfg = load_config(None, [
        "name=worker-kill", "dataset.name=digits", "train.max_failures=2", f"train.storage_path={tmp_path / 'ray_results'}",
        f"teachers=[{{name: mlp, family: mlp, hidden: [256, 256], train: {{epochs: {EPOCHS}, batch_size: 32, lr: 0.003, lr_schedule: constant}}}}]",
    ])
    data = load_arrays(cfg.dataset)
    train_ids, val_ids = split_train_val(len(data.train.labels), cfg.dataset.val_fraction, cfg.seed)
    uri = new_mlflow_store(tmp_path)
    experiment_id = tracking.ensure_experiment(uri, "worker-kill")
    track = TrackingContext(uri, experiment_id, tracking.create_run(uri, experiment_id, "parent"))
    client = MlflowClient(uri)

    def epochs_logged(run_id: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, "val_accuracy"))

    # SIGKILL the (only) train worker once Ray Train's controller has registered the checkpoints of two epochs
    # (its snapshot file): a worker's report reaches the controller asynchronously, so "logged to MLflow" alone
    # does not mean "resumable from", and a kill before registration rightly restarts from an older checkpoint.
    seen: list[int] = []
    registered: list[int] = []

    def two_epochs_checkpointed() -> bool:
        snapshots = list((tmp_path / "ray_results").glob("*/checkpoint_manager_snapshot.json"))
        try:
            latest = json.loads(snapshots[0].read_text()).get("latest_checkpoint_result") if snapshots else None
        except json.JSONDecodeError:  # caught mid-write
            return False
        if not latest or latest["metrics"]["epoch"] < 1:
            return False
        registered[:] = [int(latest["metrics"]["epoch"])]
        seen[:] = epochs_logged(killer.run_id)
        return True

    killer = Killer(ready=two_epochs_checkpointed, find_pid=lambda: alive_actor_pid("RayTrainWorker"))
    killed_run, killed_acc = _train_digits(cfg, data, train_ids, val_ids, track, "killed", killer)
    killer.join(timeout=5)
    assert killer.error is None and killer.killed_pid is not None, "no train worker was killed"
    assert not pid_alive(killer.killed_pid)

    steps = epochs_logged(killed_run)
    assert sorted(set(steps)) == list(range(EPOCHS))  # the expected epochs, all of them
    # Resumed from the last registered checkpoint, not from scratch: epochs up to it ran once; only epochs the
    # worker logged after it (and the one it died in) may have run twice.
    checkpointed = registered[0]
    assert all(steps.count(step) == 1 for step in range(checkpointed + 1)), (registered, seen, steps)
    repeated = {step for step in steps if steps.count(step) > 1}
    assert repeated <= set(range(checkpointed + 1, max(seen) + 2)), (registered, seen, steps)

    # The resumed model is a trained one (chance is 0.1). An undisturbed run of this config reached 0.981 here, as
    # did the resumed one (2026-12-02); it is not trained again for the comparison: a Ray Train run costs 15-20 s here.
    assert killed_acc > 0.9, killed_acc
    # One MLflow run per training, whatever happened to its workers: the parent and the one we made.
    runs = client.search_runs([experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["killed", "parent"]
    assert [r.info.status for r in runs if r.info.run_name == "killed"] == ["FINISHED"]


# ----------------------------------------------------------------------------- Ctrl-C

SENTINEL = "kd-sentinel-5d1f0c"  # an environment secret that must not reach MLflow or the logs


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) from /proc, or None once the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def descendants(pid: int) -> list[int]:
    parents = {int(p.name): stat[1] for p in Path("/proc").iterdir() if p.name.isdigit() and (stat := _proc_stat(int(p.name)))}
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def running(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def listening_hosts(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` (from /proc/net/tcp and tcp6)."""
    hosts = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                hosts.add("127.0.0.1" if address == "0100007F" else "0.0.0.0" if set(address) == {"0"} else address)
    return hosts


def _runs_by_status(db: Path) -> dict[str, str]:
    import sqlite3

    if not db.exists():
        return {}
    with sqlite3.connect(db) as conn:
        try:
            return dict(conn.execute("select name, status from runs").fetchall())
        except sqlite3.OperationalError:  # schema not created yet
            return {}


@pytest.fixture
def ray_tmp():
    """This run's Ray temp dir, short (Ray's socket paths have a length limit): its processes name it on their command lines."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kdray") as folder:
        yield Path(folder)


def test_a_ctrl_c_dropped_inside_a_finalizer_is_delivered_again():
    """Python drops a KeyboardInterrupt raised while a __del__ or gc callback runs ("Exception ignored");
    seen here as Ctrl-C and SIGTERM that a busy `distill run` shrugged off and ran on to the end."""
    from orchestrator.cluster.interrupts import ctrl_c_never_lost

    class RaisesOnCollection:
        def __del__(self):
            raise KeyboardInterrupt  # what a SIGINT landing in a finalizer amounts to

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever earlier tests left
    try:
        with pytest.raises(KeyboardInterrupt), ctrl_c_never_lost():
            RaisesOnCollection()  # collected at once: Python drops the interrupt, the hook sends it again
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                pass
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c(proc):
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C signals the whole foreground group


def _ray_job_stop(proc):
    proc.send_signal(signal.SIGTERM)  # what `ray job stop`, Kubernetes and batch schedulers send the driver


def _ray_job_stop_to_a_background_job(proc):
    _ray_job_stop(proc)  # the child was started with SIGINT ignored, as `distill run ... &` from a script is


# A SIGTERM to a driver whose SIGINT is at its default takes the same path as the background job's, less the
# one line that puts SIGINT's handler back (interrupts._forward_sigterm): the background case covers both, a
# whole job (20-25 s here) cheaper. That case joins this session's cluster (`--address`, as a job on a running
# cluster does; Ray's SIGTERM handler comes with either ray.init), so only Ctrl-C's case pays for a Ray of its
# own, whose shutdown it checks.
@pytest.mark.parametrize(("stop", "code", "word", "joins"),
                         [(_ctrl_c, 130, "interrupted", False), (_ray_job_stop_to_a_background_job, 143, "terminated", True)],
                         ids=["ctrl-c", "sigterm-with-sigint-ignored-on-a-running-cluster"])
def test_ctrl_c_marks_runs_killed_stops_ray_and_leaves_no_valid_looking_cache(request, tmp_path, ray_tmp, stop, code, word, joins,
                                                                             new_mlflow_store):
    import re

    address = request.getfixturevalue("ray_session").get_runtime_context().gcs_address if joins else None
    actors_before = teacher_actor_pids() if joins else set()
    torch.manual_seed(0)
    torch.save(build_model(load_config(None).teachers[0].model_copy(update={"hidden": [64]}), (1, 8, 8), 10).state_dict(), tmp_path / "t.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI": new_mlflow_store(tmp_path), "RAY_TMPDIR": str(ray_tmp),
           "AWS_SECRET_ACCESS_KEY": SENTINEL, "KD_API_TOKEN": SENTINEL}
    env.pop("RAY_ADDRESS", None)
    argv = [sys.executable, "-m", "orchestrator.cli", "run", str(REPO_ROOT / "configs/digits_kd.yaml"), "teachers=[{name: cnn, family: mlp, hidden: [64]}]",
            f"teachers.0.checkpoint={tmp_path / 't.pt'}", "tracking.experiment=ctrl-c", "-v",  # -v: Ray prints its dashboard address
            *(["--address", address] if joins else [])]
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        # Its own process group, as a shell gives a foreground job: Ctrl-C signals the whole group.
        # A terminal's foreground job has SIGINT at its default, even if pytest itself inherited it ignored.
        sigint = signal.SIG_IGN if stop is _ray_job_stop_to_a_background_job else signal.SIG_DFL
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=err, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
        try:
            deadline = time.monotonic() + 300
            while _runs_by_status(tmp_path / "mlflow.db").get("soft-targets") != "RUNNING":
                assert proc.poll() is None, (tmp_path / "err.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the soft-target stage never started"
                time.sleep(0.2)
            time.sleep(1.0)  # into the actor pool's work
            ours = descendants(proc.pid)
            if not joins:
                assert any("raylet" in command_line(pid) for pid in ours), [command_line(pid)[:80] for pid in ours]
                # -v: Ray's own start-up lines are there (the default console leaves them out: test_console.py). The
                # dashboard (it can submit jobs) listens on loopback only.
                assert "Started a local Ray instance" in (tmp_path / "err.log").read_text()
                port = int(re.search(r"dashboard at \S*?127\.0\.0\.1:(\d+)", (tmp_path / "err.log").read_text()).group(1))
                assert listening_hosts(port) == {"127.0.0.1"}, listening_hosts(port)
            stop(proc)
            exit_code = proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    stderr = (tmp_path / "err.log").read_text()
    assert exit_code == code, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"distill: {word}; MLflow runs marked KILLED"

    runs = _runs_by_status(tmp_path / "mlflow.db")
    assert runs["digits_kd"] == "KILLED" and runs["soft-targets"] == "KILLED" and runs["teacher:cnn"] == "FINISHED", runs
    assert "RUNNING" not in runs.values()

    # Its own Ray shut down: every process it started is gone (found by PID: children, or naming its temp dir). On a
    # running cluster, the job's teacher actors are gone and the cluster stays up for the next job.
    deadline = time.monotonic() + 60
    while (left := [pid for pid in ours if running(pid)] + sorted(teacher_actor_pids() - actors_before if joins else [])) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [command_line(pid)[:80] for pid in left]
    strays = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and str(ray_tmp) in command_line(int(p.name))]
    assert not strays, strays

    # The cache: nothing half-written that looks valid. Committed entries validate; no temporary dirs remain.
    cache = tmp_path / ".kd_cache"
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")] if cache.exists() else []
    assert all(read_cache(cache, p.name) is not None for p in entries if p.name != "teachers")
    assert not [p for p in cache.iterdir() if p.name.startswith((".tmp-", ".trash-"))] if cache.exists() else True

    # Environment secrets reached neither the MLflow store nor the output.
    assert SENTINEL not in stderr + (tmp_path / "out.log").read_text()
    stored = [tmp_path / "mlflow.db", *(p for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file())]
    assert not [p for p in stored if SENTINEL.encode() in p.read_bytes()]


def _ctrl_c_once_started(started: Path) -> None:
    """From another thread: a Ctrl-C to this process (what a terminal delivers to the driver) once `started` exists."""

    def wait_then_interrupt() -> None:
        deadline = time.monotonic() + 300
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=wait_then_interrupt, daemon=True).start()


def test_ctrl_c_during_a_ray_train_run_is_a_keyboard_interrupt(ray_session, tmp_path):
    """Ray Train's fit() catches the first Ctrl-C itself (it aborts the run, which then fails like any
    failed run) and leaves its handler installed: the job must see a Ctrl-C (KILLED, 130), not a failure."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.cluster.interrupts import train_fit_noticing_ctrl_c

    started = tmp_path / "started"

    def train_func(config):  # local, so Ray ships it by value
        import pathlib
        import time as clock

        pathlib.Path(config["started"]).touch()
        clock.sleep(300)
        pathlib.Path(config["started"]).with_name("finished").touch()

    ours = signal.getsignal(signal.SIGINT)
    trainer = TorchTrainer(train_func, train_loop_config={"started": str(started)}, scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(storage_path=str(tmp_path), name="ctrl-c-train"))
    _ctrl_c_once_started(started)
    with pytest.raises(KeyboardInterrupt):
        train_fit_noticing_ctrl_c(trainer)
    assert started.exists() and not (tmp_path / "finished").exists()  # aborted, not after the worker's 300 s
    assert signal.getsignal(signal.SIGINT) is ours  # Ray Train's handler does not outlive the run


def test_ctrl_c_during_a_tune_run_is_a_keyboard_interrupt(ray_session, tmp_path):
    """Tune's own SIGINT handler turns the first Ctrl-C into a graceful stop and a normal return from fit();
    `distill sweep` must see the Ctrl-C (runs KILLED, exit 130), not a finished sweep."""
    from ray import tune

    from orchestrator.cluster.interrupts import fit_noticing_ctrl_c

    started = tmp_path / "started"

    def trainable(config):  # local, so Tune ships it by value
        import pathlib
        import time as clock

        pathlib.Path(config["started"]).touch()
        for step in range(3000):
            clock.sleep(0.1)
            tune.report({"step": step})
        pathlib.Path(config["started"]).with_name("finished").touch()

    ours = signal.getsignal(signal.SIGINT)
    tuner = tune.Tuner(trainable, param_space={"started": str(started)}, run_config=tune.RunConfig(storage_path=str(tmp_path), name="ctrl-c"))
    _ctrl_c_once_started(started)
    with pytest.raises(KeyboardInterrupt):
        fit_noticing_ctrl_c(tuner)
    assert started.exists() and not (tmp_path / "finished").exists()  # stopped early, not after the trial's 300 s
    assert signal.getsignal(signal.SIGINT) is ours  # a later Ctrl-C is not swallowed by Tune's handler
    assert tune.Tuner.can_restore(str(tmp_path / "ctrl-c"))  # Tune's state was saved: --resume can continue
