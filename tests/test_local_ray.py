"""The embedded local Ray tells its own workers where it is, even with another Ray on the host."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Inside a worker, resolve the cluster the way Ray Train's PlacementGroupCleaner does (address
# "auto"-style lookup). Without RAY_ADDRESS this fails once two Ray instances run on one host.
SCRIPT = """
import ray
from ray._private.services import canonicalize_bootstrap_address_or_die
from orchestrator.cluster.local_ray import start_local_ray

address = start_local_ray(num_cpus=1, include_dashboard=False, log_to_driver=False)

@ray.remote(num_cpus=0)
def resolve():
    return canonicalize_bootstrap_address_or_die(None)

@ray.remote(num_cpus=0)
class Nested:  # actors started by actors (the Train controller starts the cleaner) inherit it
    def resolve(self):
        return ray.get(resolve.remote())

print("RESOLVED", address, ray.get(resolve.remote()), ray.get(Nested.remote().resolve.remote()))
ray.shutdown()
"""


@pytest.mark.integration
def test_workers_resolve_their_own_cluster_beside_another(ray_session):
    # ray_session is a second Ray instance on this host while the script's cluster runs.
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESOLVED")), None)
    assert line is not None, out.stderr[-3000:]
    _, address, from_task, from_nested_actor = line.split()
    assert from_task == address and from_nested_actor == address


# The local Ray's GCS told to listen on a port another process holds: a real start failure, as
# an overloaded machine gives one (there after Ray's 30 s wait for the node).
FAILING_START = """
import socket, sys
from orchestrator import cli
from orchestrator.cluster import local_ray

held = socket.socket()
held.bind(("", 0))
held.listen()
local_ray._free_port = lambda: held.getsockname()[1]
sys.exit(cli.main(["run", sys.argv[1], "tracking.experiment=no-ray"]))
"""


@pytest.mark.no_working_ray  # its GCS never starts: it can run beside another job's Ray
def test_a_local_ray_that_does_not_start_is_one_line_and_exit_1(tmp_path, new_mlflow_store):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MLFLOW_TRACKING_URI=new_mlflow_store(tmp_path))
    # Ray's own waits for a GCS that never answers (5 s per connection, 30 s for its cluster id) cut short:
    # the failure and its one line are under test, not how long Ray waits (46 s -> 10 s here).
    env |= {"RAY_py_gcs_connect_timeout_s": "2", "RAY_gcs_rpc_server_connect_timeout_s": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", FAILING_START, str(REPO_ROOT / "configs/digits_kd.yaml")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distill: error:")]
    assert len(errors) == 1 and "could not start a local Ray (Failed to start GCS." in errors[0], proc.stderr[-2000:]
