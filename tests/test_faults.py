"""Faults, each caused for real: a teacher actor and a Ray Train worker SIGKILLed mid-run, a cache
truncated on disk, a second process holding the cache lock, Ctrl-C on a `distill run` process.

Real local Ray (the session's), real SQLite MLflow, no mocks. Processes are killed by PID, found
through Ray's state API (this session's cluster only) or as children of the process the test started.
"""

from __future__ import annotations

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
import torch
from mlflow.tracking import MlflowClient

from orchestrator import tracking
from orchestrator.config import load_config
from orchestrator.data import DatasetArrays, Split
from orchestrator.models import build_model, state_dict_fingerprint
from orchestrator.soft_targets import CacheCorruptWarning, read_cache
from orchestrator.stages import TeacherWeights, TrackingContext, soft_target_stage
from orchestrator.teachers import teacher_forward_rows

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[1]


class Killer(threading.Thread):
    """Polls `ready()` and SIGKILLs the process `find_pid()` names, once; records what it killed."""

    def __init__(self, ready: Callable[[], bool], find_pid: Callable[[], int | None], timeout_s: float = 300):
        super().__init__(daemon=True)
        self.ready, self.find_pid, self.timeout_s = ready, find_pid, timeout_s
        self.killed_pid: int | None = None
        self.error: BaseException | None = None

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
def soft_setup(ray_session, tmp_path_factory):
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
    uri = f"sqlite:///{root / 'mlflow.db'}"
    experiment_id = tracking.ensure_experiment(uri, "faults")
    track = TrackingContext(uri, experiment_id, tracking.create_run(uri, experiment_id, "parent"))
    clean = soft_target_stage(cfg, teachers, data, track)
    assert not clean.cache_hit and clean.forward_rows == N_TRAIN + N_TEST
    return {"config": config, "data": data, "teachers": teachers, "track": track, "clean": clean, "root": root}


def assert_same_soft_targets(got, clean) -> None:
    assert got.fingerprint == clean.fingerprint and got.n_train == clean.n_train
    assert set(got.columns) == set(clean.columns)
    for name, values in clean.columns.items():
        assert got.columns[name].shape == values.shape == (N_TRAIN + N_TEST, 10)
        np.testing.assert_array_equal(got.columns[name], values)


def test_teacher_actor_killed_mid_generation_gives_the_complete_identical_cache(soft_setup):
    s = soft_setup
    cfg = s["config"]("killed")
    total = N_TRAIN + N_TEST
    before = teacher_forward_rows()
    killer = Killer(ready=lambda: total // 5 <= teacher_forward_rows() - before < total // 2, find_pid=lambda: alive_actor_pid("MapWorker"))
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
from orchestrator.soft_targets import build_lock
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
