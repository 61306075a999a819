"""A real two-node Ray cluster (`ray start --head` + `ray start --address`, on 127.0.0.1) and a real
`distill mlflow-server`; jobs go in through `distill submit` and the runs come back from the server.

Everything talks to the cluster from separate processes (`python -m orchestrator.cli ...`): this pytest
process may hold its own local Ray (the `ray_session` fixture of other test files), and Ray's client
state (address, auth token) is per process. The job's driver runs inside the started cluster, with
RAY_ADDRESS set by Ray's job supervisor to that cluster's GCS address, so it never picks up another
Ray on this host. Everything started here is stopped by PID (tests/local_cluster.py), never by `ray stop`.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid

import pytest
from local_cluster import LocalCluster

from orchestrator.tracking import runs as tracking

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

SMALL_JOB = ["teachers.0.train.epochs=2", "train.epochs=2", "train.num_workers=2", "soft_targets.num_actors=1", "tracking.log_models=false"]


@pytest.fixture(scope="module")
def cluster():
    # 1 CPU per node: the job's two Ray Train workers must land on different nodes.
    c = LocalCluster(head_cpus=1, worker_cpus=1)
    try:
        c.start_mlflow(wait=False)  # both start at once: each takes tens of seconds on this machine
        c.start_ray()
        c.wait_mlflow()
        yield c
    finally:
        c.stop()
        left = c.leftover_pids()
        shutil.rmtree(c.root, ignore_errors=True)
        assert not left, f"processes of the test cluster still alive: {left}"


def _readable(done, chars: int = 6000) -> str:
    """The end of a `distill` run's output without Ray Data's progress bars, for assertion messages."""
    lines = [line for line in (done.stdout + done.stderr).replace("\r", "\n").splitlines() if "row/s" not in line and line.strip()]
    return "\n".join(lines)[-chars:]


def _runs(c: LocalCluster, experiment: str) -> list:
    client = tracking.client(c.mlflow_url)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def test_node_local_storage_is_refused_on_two_nodes(cluster):
    job_id = f"kd-it-refused-{uuid.uuid4().hex[:6]}"
    # Default train.storage_path / cache_dir: relative, i.e. inside the job's working dir on the head's disk.
    done = cluster.distill("submit", "configs/digits_kd.yaml", *SMALL_JOB, "tracking.experiment=cluster-refused", "--submission-id", job_id)
    assert done.returncode == 2, _readable(done)  # the driver's exit code: bad input
    errors = [line for line in done.stdout.splitlines() if line.startswith("distill: error:")]
    assert len(errors) == 1, _readable(done)
    assert "train.storage_path:" in errors[0] and "is local to one node, but this Ray cluster has 2 nodes" in errors[0]
    assert f"job {job_id} FAILED" in done.stderr
    assert _runs(cluster, "cluster-refused") == []  # refused before any MLflow run


def _mlp_teachers(folder) -> str:
    """Two untrained MLP teachers for MNIST as state-dict files, an ensemble weighted 3:1, as a `teachers=` override:
    given weights spare the job a Ray Train run each (tens of seconds here)."""
    import torch

    from orchestrator.config import ModelSpec
    from orchestrator.train.models import build_model

    teachers = []
    for name, width, weight in (("wide", 64, 3), ("narrow", 32, 1)):
        torch.manual_seed(width)
        torch.save(build_model(ModelSpec(family="mlp", hidden=[width]), (1, 28, 28), 10).state_dict(), folder / f"{name}.pt")
        teachers.append(f"{{name: {name}, family: mlp, hidden: [{width}], checkpoint: {folder / f'{name}.pt'}, weight: {weight}}}")
    return f"teachers=[{', '.join(teachers)}]"


def _mnist_parquet(folder):
    """The first 3,000 MNIST training and 500 test images as parquet (flat uint8 pixel lists, row groups of 500),
    as a file:// URI: what a user's shared storage would hold."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.config import DatasetConfig
    from orchestrator.data.datasets import load_arrays

    mnist = load_arrays(DatasetConfig(name="mnist", limit=3000, test_limit=500, normalize=False, reader="driver"))
    for name, split in (("train", mnist.train), ("test", mnist.test)):
        (folder / name).mkdir(parents=True)
        pixels = pa.FixedSizeListArray.from_arrays(np.ascontiguousarray(split.images).reshape(-1), 784)
        pq.write_table(pa.table({"image": pixels, "label": split.labels}), folder / name / "part-0.parquet", row_group_size=500)
    return folder


def test_submit_mnist_ensemble_distillation_and_read_runs_from_the_server(cluster):
    """A user's job on real data: an MNIST slice (mnist_kd.yaml: 9 views of each image) as parquet on a shared URI,
    read by Ray tasks (dataset.reader: ray), a weighted teacher ensemble from state-dict files, students on two
    data-parallel workers, one per node, each reading its own rows' soft targets from the files of the cache on
    a shared URI (soft_targets.worker_reads: cache)."""
    job_id = f"kd-it-ok-{uuid.uuid4().hex[:6]}"
    shared = cluster.shared
    data = _mnist_parquet(shared / "mnist")
    done = cluster.distill(
        "submit", "configs/mnist_kd.yaml", "dataset.name=parquet", f"dataset.train_path={(data / 'train').as_uri()}", f"dataset.test_path={(data / 'test').as_uri()}",
        "dataset.image_shape=[1, 28, 28]", "dataset.reader=ray", _mlp_teachers(shared),
        "students=[{name: mlp32, family: mlp, hidden: [32]}]", "train.epochs=2", "train.num_workers=2", "train.cpus_per_worker=1", "soft_targets.num_actors=1",
        # No model logging: MLflow infers each model's pip requirements in a subprocess, tens of seconds per model here.
        "tracking.log_models=false", "tracking.experiment=cluster-it",
        f"soft_targets.cache_dir={(shared / 'kd_cache').as_uri()}", f"train.storage_path={shared / 'ray_results'}", "soft_targets.worker_reads=cache",
        "--submission-id", job_id, "--env", f"DISTILL_SHARED_STORAGE={shared}",
    )
    assert done.returncode == 0, _readable(done)
    assert f"job {job_id} SUCCEEDED" in done.stderr
    # Each worker, on its own node, read the cache files holding its rows, not all of them (rank 0 reads the
    # validation rows' files too, on a line of its own).
    reads = re.findall(r"\[distill\] worker (\d) on node (\w+): soft targets of [\d,]+ rows from (\d+) of (\d+) cache files", done.stdout)
    print("the workers' cache reads (rank, node, files read, files):", reads)  # shown with pytest -rP
    nodes = {rank: node for rank, node, _, _ in reads}
    assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"], _readable(done)
    assert all(any(int(read) < int(files) for r, _, read, files in reads if r == rank) for rank in nodes), reads
    assert "mlp32" in done.stdout and "baseline" in done.stdout  # the summary table, streamed from the job's logs

    runs = _runs(cluster, "cluster-it")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == {"teacher:wide", "teacher:narrow", "soft-targets", "student:mlp32", "baseline:mlp32-baseline"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert children["teacher:wide"].data.tags["source"] == children["teacher:narrow"].data.tags["source"] == "checkpoint"
    assert children["soft-targets"].data.metrics["teacher_forward_rows"] == 3000 * 9 + 500  # one pass for the ensemble
    client = tracking.client(cluster.mlflow_url)
    assert len(client.get_metric_history(children["student:mlp32"].info.run_id, "val_accuracy")) == 2
    assert {"config.json", "summary.json"} <= {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    # Served artifacts: the files went over HTTP to the server's --artifacts-destination.
    [summary] = list((cluster.root / "mlartifacts").rglob("summary.json"))
    rows = json.loads(summary.read_text())
    assert [(r["role"], r["name"]) for r in rows] == [("teacher", "wide"), ("teacher", "narrow"), ("student", "mlp32"), ("baseline", "mlp32-baseline")]
    assert (rows[0]["params"], rows[1]["params"]) == (784 * 64 + 64 + 64 * 10 + 10, 784 * 32 + 32 + 32 * 10 + 10)
    # Agreement is with the ensemble's soft targets: neither member agrees perfectly, the heavier one more.
    assert 0.0 < rows[1]["agreement"] < rows[0]["agreement"] < 1.0
    assert all(r["test_errors"] == round((1 - r["test_accuracy"]) * 500) for r in rows)
    assert rows[3]["test_accuracy"] > 0.5  # labels only: it learns whatever the (untrained) teachers say
    assert list((shared / "kd_cache").iterdir()) and list((shared / "ray_results").iterdir())

    listed = cluster.distill("jobs")
    assert listed.returncode == 0 and any(job_id in line and "SUCCEEDED" in line for line in listed.stdout.splitlines())
    logs = cluster.distill("logs", job_id)
    assert logs.returncode == 0 and "mlp32" in logs.stdout


def test_stop_a_running_job(cluster):
    job_id = f"kd-it-stop-{uuid.uuid4().hex[:6]}"
    submitted = cluster.distill("submit", "configs/digits_kd.yaml", "tracking.experiment=cluster-stop", "--no-wait", "--submission-id", job_id)
    assert submitted.returncode == 0 and submitted.stdout.strip() == job_id
    stopped = cluster.distill("stop", job_id)
    assert stopped.returncode == 0 and f"job {job_id} STOPPED" in stopped.stderr, stopped.stderr[-2000:]
    unknown = cluster.distill("logs", "no-such-job")
    assert unknown.returncode == 2 and unknown.stderr.strip() == "distill: error: no job 'no-such-job' on this cluster (distill jobs lists them)"
