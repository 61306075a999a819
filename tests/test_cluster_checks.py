"""Unit tests (no Ray started) for the cluster checks, the job-submission helpers and the MLflow server command."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from orchestrator.cli import main
from orchestrator.cluster import checks as cluster
from orchestrator.cluster import submit
from orchestrator.config import ConfigError, load_config
from orchestrator.tracking.mlflow_server import build_command, default_stores

DIGITS = REPO_ROOT / "configs" / "digits_kd.yaml"


def _node(cpu: float, gpu: float = 0.0) -> dict:
    return {"Alive": True, "Resources": {"CPU": cpu, **({"GPU": gpu} if gpu else {})}}


def _cfg(*overrides: str):
    return load_config(DIGITS, list(overrides))


# --- resources ---------------------------------------------------------------------------------


def test_default_digits_job_fits_a_two_cpu_node():
    assert cluster.unmet(_cfg(), [_node(2)]) is None


@pytest.mark.parametrize(
    ("overrides", "nodes", "expected"),
    [
        (["soft_targets.num_actors=3"], [_node(2)], "soft_targets.num_actors / num_cpus_per_actor / num_gpus_per_actor: 3 x 1 CPU requested, the cluster has 2 CPU on 1 node(s)"),
        (["train.num_workers=2", "train.cpus_per_worker=2"], [_node(2), _node(2)], None),
        (["train.num_workers=1", "train.cpus_per_worker=3"], [_node(2), _node(2)], "train.num_workers / cpus_per_worker / use_gpu: no node of this cluster has 3 CPU for one actor/worker"),
        (["train.use_gpu=true"], [_node(2)], "train.num_workers / cpus_per_worker / use_gpu: 1 x 1 GPU requested, the cluster has 0 GPU on 1 node(s)"),
        (["train.use_gpu=true", "train.num_workers=2"], [_node(8), _node(8, gpu=1), _node(8, gpu=1)], None),
        (["soft_targets.num_gpus_per_actor=0.5"], [_node(2)], None),  # no GPU anywhere: teacher actors fall back to the CPU
        (["soft_targets.num_gpus_per_actor=0.5", "soft_targets.num_actors=4"], [_node(8), _node(4, gpu=1)], "soft_targets.num_actors / num_cpus_per_actor / num_gpus_per_actor: 4 x 0.5 GPU requested, the cluster has 1 GPU on 2 node(s)"),
    ],
)
def test_unmet_requests_are_named(overrides, nodes, expected):
    assert cluster.unmet(_cfg(*overrides), nodes) == expected


# --- storage -----------------------------------------------------------------------------------


def test_shared_locations(tmp_path, monkeypatch):
    monkeypatch.delenv(cluster.SHARED_ENV, raising=False)
    assert cluster.is_shared_location("s3://bucket/kd/ray_results")
    assert cluster.is_shared_location("gs://bucket/cache")
    assert not cluster.is_shared_location("memory://x")
    assert not cluster.is_shared_location(str(tmp_path))  # a local disk (tmpfs/ext4/overlay on this machine)
    assert not cluster.is_shared_location(tmp_path.as_uri())
    monkeypatch.setenv(cluster.SHARED_ENV, str(tmp_path))
    assert cluster.is_shared_location(str(tmp_path / "kd_cache" / "not-yet-created"))


def test_mount_type_reads_the_longest_matching_mount(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "overlay / overlay rw 0 0\n"
        f"server:/export {tmp_path / 'shared'} nfs4 rw 0 0\n"
    )
    (tmp_path / "shared" / "cache").mkdir(parents=True)
    assert cluster.mount_type(str(tmp_path / "shared" / "cache" / "new"), str(mounts)) == "nfs4"
    assert cluster.mount_type(str(tmp_path / "elsewhere"), str(mounts)) == "overlay"


@pytest.mark.parametrize(
    ("uri", "local"),
    [("sqlite:////tmp/mlflow.db", True), ("file:///tmp/mlruns", True), ("./mlruns", True),
     ("http://10.0.0.10:5000", False), ("https://mlflow.example.com", False), ("postgresql://u@db/mlflow", False), ("databricks", False)],
)
def test_local_tracking_uris(uri, local):
    assert cluster.is_local_tracking_uri(uri) is local


def test_multi_node_storage_rules(tmp_path, monkeypatch):
    monkeypatch.delenv(cluster.SHARED_ENV, raising=False)
    cfg = _cfg(f"train.storage_path={tmp_path / 'rr'}", f"soft_targets.cache_dir={tmp_path / 'cache'}")
    cluster.check_storage(cfg, "sqlite:////tmp/mlflow.db", num_nodes=1)  # one node: anything local is fine
    with pytest.raises(ConfigError, match=r"^train\.storage_path: .* is local to one node, but this Ray cluster has 2 nodes"):
        cluster.check_storage(cfg, "http://127.0.0.1:5000", num_nodes=2)
    shared = _cfg("train.storage_path=s3://bucket/rr", f"soft_targets.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(ConfigError, match=r"^soft_targets\.cache_dir: "):
        cluster.check_storage(shared, "http://127.0.0.1:5000", num_nodes=2)
    with pytest.raises(ConfigError, match=r"^soft_targets\.cache_dir: file://.* is local to one node"):  # a URI, but of a local disk
        cluster.check_storage(_cfg("train.storage_path=s3://bucket/rr", f"soft_targets.cache_dir={(tmp_path / 'cache').as_uri()}"),
                              "http://127.0.0.1:5000", num_nodes=2)
    cluster.check_storage(_cfg("train.storage_path=s3://bucket/rr", "soft_targets.cache_dir=s3://bucket/kd_cache"), "http://127.0.0.1:5000", num_nodes=2)
    monkeypatch.setenv(cluster.SHARED_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match=r"^tracking\.tracking_uri: sqlite:////tmp/mlflow.db is a store on one node's disk"):
        cluster.check_storage(cfg, "sqlite:////tmp/mlflow.db", num_nodes=2)
    cluster.check_storage(cfg, "http://127.0.0.1:5000", num_nodes=2)


def test_which_locations_take_uris():
    cluster.check_uris(_cfg("train.storage_path=s3://bucket/ray_results"))  # Ray Train writes through pyarrow
    cluster.check_uris(_cfg("soft_targets.cache_dir=/mnt/shared/kd_cache"))
    for uri in ("s3://bucket/kd_cache", "gs://bucket/kd_cache", "abfs://c@acct.dfs.core.windows.net/kd", "file:///mnt/shared/kd_cache"):
        cluster.check_uris(_cfg(f"soft_targets.cache_dir={uri}"))  # uri_cache.py and weights_cache.py publish without renames
        cluster.check_uris(load_config(REPO_ROOT / "configs" / "digits_sweep.yaml", [f"soft_targets.cache_dir={uri}"]))
    with pytest.raises(ConfigError, match=r"^soft_targets\.cache_dir: memory://kd has a scheme the cache cannot open; use a path or one of s3://"):
        cluster.check_uris(_cfg("soft_targets.cache_dir=memory://kd"))
    sweep = load_config(REPO_ROOT / "configs" / "digits_sweep.yaml", ["train.storage_path=gs://bucket/rr"])
    with pytest.raises(ConfigError, match=r"^train\.storage_path: gs://bucket/rr is a URI; sweeps keep their state"):
        cluster.check_uris(sweep)


# --- job submission helpers --------------------------------------------------------------------


def test_address_precedence(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="no Ray cluster address"):
        submit.resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://b:8265")
    assert submit.resolve_address(None) == "http://b:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://a:8265")
    assert submit.resolve_address(None) == "http://a:8265"
    assert submit.resolve_address("http://flag:8265") == "http://flag:8265"


def test_entrypoint_and_runtime_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    entry = submit.build_entrypoint("run", DIGITS, ["kd.alpha=0.5", "students.0.hidden=[8, 4]"], REPO_ROOT)
    assert shlex.split(entry) == ["python", "jobs/distill.py", "--config", "configs/digits_kd.yaml", "kd.alpha=0.5", "students.0.hidden=[8, 4]"]
    assert submit.build_entrypoint("sweep", DIGITS, ["--resume"], REPO_ROOT).endswith("--config configs/digits_kd.yaml --resume")
    outside = tmp_path / "x.yaml"
    with pytest.raises(ConfigError, match="outside the working directory"):
        submit.build_entrypoint("run", outside, [], REPO_ROOT)
    env = submit.build_runtime_env(REPO_ROOT, {"A": "1"})
    assert env["working_dir"] == str(REPO_ROOT)
    assert {".venv", ".kd_cache", "mlflow.db", "ray_results", "mlartifacts"} <= set(env["excludes"])
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "A": "1"}
    for script in submit.SCRIPTS.values():
        assert (REPO_ROOT / script).is_file()


def test_cli_cluster_commands_fail_in_one_line(capsys, monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(REPO_ROOT)
    assert main(["jobs"]) == 2
    assert main(["submit", "configs/digits_kd.yaml", "kd.alpha=7"]) == 2  # validated before any cluster is contacted
    assert main(["submit", "configs/digits_kd.yaml", "--env", "NOVALUE"]) == 2
    assert main(["logs", "raysubmit_x", "--address", "http://127.0.0.1:9"]) == 2  # nothing listens on port 9
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("distill: error: ") for line in lines)
    assert "no Ray cluster address" in lines[0] and "kd.alpha" in lines[1] and "KEY=VALUE" in lines[2]
    assert "cannot reach the Ray job API at http://127.0.0.1:9" in lines[3]


def test_mlflow_server_command(tmp_path):
    backend, artifacts = default_stores(tmp_path)
    assert backend == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}" and Path(artifacts) == tmp_path.resolve() / "mlartifacts"
    cmd = build_command(host="127.0.0.1", port=5055, backend_store_uri=backend, artifacts_destination=artifacts, workers=1)
    assert cmd[1:4] == ["-m", "mlflow", "server"]
    joined = " ".join(cmd)
    assert "--host 127.0.0.1 --port 5055" in joined and "--serve-artifacts --artifacts-destination" in joined
    with pytest.raises(ConfigError, match="database URI"):
        from orchestrator.tracking.mlflow_server import serve

        serve(backend_store_uri=str(tmp_path / "mlruns"))


@pytest.mark.integration
def test_checks_against_a_real_ray(ray_session, capsys, monkeypatch):
    """The session's local Ray: one node, 2 CPUs, no GPU."""
    monkeypatch.delenv(cluster.WAIT_ENV, raising=False)
    cluster.check_cluster(_cfg(), "sqlite:////tmp/x.db")  # one node: a SQLite store is fine
    with pytest.raises(ConfigError, match=r"^soft_targets\.num_actors / .*: 3 x 1 CPU requested, the cluster has 2 CPU on 1 node\(s\)$"):
        cluster.check_cluster(_cfg("soft_targets.num_actors=3"), "sqlite:////tmp/x.db")
    with pytest.raises(ConfigError, match=r"^train\.num_workers / .*: 1 x 1 GPU requested, the cluster has 0 GPU"):
        cluster.check_cluster(_cfg("train.use_gpu=true"), "sqlite:////tmp/x.db")
    cluster.check_cluster(_cfg("soft_targets.num_gpus_per_actor=1"), "sqlite:////tmp/x.db")
    assert "teacher actors run on the CPU" in capsys.readouterr().err
    assert cluster.teacher_gpus(1.0) == 0.0 and cluster.teacher_gpus(0.0) == 0.0


# --- placement groups left behind by ended jobs (cluster/orphans.py) -----------------------------


def test_only_reserved_groups_of_ended_jobs_with_no_live_actor_are_orphans():
    from types import SimpleNamespace as Record

    from ray.dashboard.modules.job.common import JobStatus

    from orchestrator.cluster.orphans import orphaned

    def group(name: str, job: str, state: str = "CREATED", detached: bool = False):
        return Record(placement_group_id=name, creator_job_id=job, state=state, is_detached=detached)

    jobs = [Record(job_id="01", status=JobStatus.RUNNING), Record(job_id="02", status=JobStatus.SUCCEEDED),
            Record(job_id="03", status="FAILED"), Record(job_id="04", status=JobStatus.STOPPED), Record(job_id=None, status=JobStatus.FAILED)]
    groups = [group("left", "02"), group("left-too", "03"), group("running-job", "01"), group("kept-by-detached-actor", "04"),
              group("detached", "02", detached=True), group("pending", "02", state="PENDING"), group("unknown-job", "09")]
    alive = [Record(job_id="01"), Record(job_id="04")]
    assert [g.placement_group_id for g in orphaned(groups, jobs, alive)] == ["left", "left-too"]


def test_a_job_joining_a_cluster_frees_no_group_in_use(ray_session, capsys):
    """A real cluster: this job's own reserved group and one an ended job's detached actor still holds stay."""
    import subprocess
    import sys

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from orchestrator.cluster.orphans import free_orphaned_placement_groups

    address = ray.get_runtime_context().gcs_address
    ours = placement_group([{"CPU": 0.1}])
    ray.get(ours.ready(), timeout=60)
    holder = (
        "import ray, sys\n"
        "ray.init(address=sys.argv[1], namespace='orphans-test')\n"
        "@ray.remote(num_cpus=0)\n"
        "class Holder:\n"
        "    def reserve(self):\n"
        "        from ray.util.placement_group import placement_group\n"
        "        self.pg = placement_group([{'CPU': 0.1}])\n"
        "        ray.get(self.pg.ready())\n"
        "        return self.pg.id.hex()\n"
        "print(ray.get(Holder.options(name='holder', lifetime='detached').remote().reserve.remote()))\n"
    )
    done = subprocess.run([sys.executable, "-c", holder, address], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    held = done.stdout.strip().splitlines()[-1]
    try:
        assert free_orphaned_placement_groups() == []
        table = ray.util.placement_group_table()
        assert table[ours.id.hex()]["state"] == "CREATED" and table[held]["state"] == "CREATED"
        assert capsys.readouterr().err == ""  # listed (no warning), nothing freed
    finally:
        ray.kill(ray.get_actor("holder", namespace="orphans-test"))
        remove_placement_group(ours)
