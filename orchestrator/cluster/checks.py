"""Checks against the Ray cluster a job runs on, after `ray.init` and before any stage or MLflow run.

- Resources: every request the config makes (teacher actor pool, Ray Train workers) must fit the
  cluster, and each actor or worker must fit on one node; otherwise one line names the field,
  instead of Ray waiting forever for resources that do not exist. Teacher actors asking for GPUs on
  a cluster without any fall back to the CPU (with a warning); `train.use_gpu` without GPUs is an error.
  On an autoscaling cluster, set DISTILL_RESOURCE_WAIT_S to ask the autoscaler for the resources
  and wait that long for them before refusing.
- URIs: `train.storage_path` and `soft_targets.cache_dir` may be URIs pyarrow opens (s3://, gs://,
  hdfs://, abfs://, file://); trained teachers and a sweep's assistants are cached beside the soft
  targets, in the same place. A sweep's state needs a file system path.
- Storage: on more than one node, every location that several nodes write must be shared: a
  remote URI (s3://, gs://, hdfs://, abfs://...), a path on a network file system (NFS, CIFS,
  Lustre, CephFS, ...), or a path under one of the prefixes listed in DISTILL_SHARED_STORAGE
  (os.pathsep-separated, for mounts this check cannot recognise). A SQLite or file MLflow store
  is refused there: run `distill mlflow-server` and log over HTTP.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import ray

from orchestrator.config import ConfigError, JobConfig
from orchestrator.teachers.uri_cache import CACHE_URI_SCHEMES

REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "az", "wasb", "wasbs")
NETWORK_FS_TYPES = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "beegfs", "panfs", "wekafs",
    "fuse.ceph", "fuse.glusterfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.sshfs", "fuse.juicefs", "fuse.mountpoint-s3",
}
SHARED_ENV = "DISTILL_SHARED_STORAGE"
WAIT_ENV = "DISTILL_RESOURCE_WAIT_S"


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def uri_scheme(location: str) -> str | None:
    return location.split("://", 1)[0].lower() if "://" in location else None


def mount_type(path: str, mounts_file: str = "/proc/mounts") -> str | None:
    """File system type of the mount that holds `path` (its nearest existing ancestor), from /proc/mounts."""
    target = Path(path).expanduser().absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    target = target.resolve()
    best, best_type = "", None
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (target == Path(point) or Path(point) in target.parents) and len(point) > len(best):
            best, best_type = point, fields[2]
    return best_type


def declared_shared() -> list[Path]:
    return [Path(p).expanduser().resolve() for p in os.environ.get(SHARED_ENV, "").split(os.pathsep) if p]


def is_shared_location(location: str) -> bool:
    """True when every node can reach `location` at the same name (see the module docstring)."""
    scheme = uri_scheme(location)
    if scheme in REMOTE_SCHEMES:
        return True
    if scheme not in (None, "file"):
        return False
    path = Path(location.split("://", 1)[1] if scheme == "file" else location).expanduser().resolve()
    if any(path == p or p in path.parents for p in declared_shared()):
        return True
    return mount_type(str(path)) in NETWORK_FS_TYPES


def is_local_tracking_uri(uri: str) -> bool:
    """SQLite, file: and bare paths live on one node's disk; http(s)://, postgresql://, databricks... do not."""
    if uri.startswith(("sqlite:", "file:")):
        return True
    return "://" not in uri and not uri.startswith("databricks")


def check_storage(cfg: JobConfig, tracking_uri: str, num_nodes: int) -> None:
    """On more than one node: shared storage for everything several nodes write, an MLflow server for tracking."""
    if num_nodes <= 1:
        return
    hint = f"use a shared location (an NFS mount, s3://..., gs://...) or list a shared mount in ${SHARED_ENV}"
    for field, location in (("train.storage_path", cfg.train.storage_path), ("soft_targets.cache_dir", cfg.soft_targets.cache_dir)):
        if not is_shared_location(location):
            raise ConfigError(f"{field}: {location} is local to one node, but this Ray cluster has {num_nodes} nodes; {hint}")
    if is_local_tracking_uri(tracking_uri):
        raise ConfigError(
            f"tracking.tracking_uri: {tracking_uri} is a store on one node's disk, but this Ray cluster has {num_nodes} nodes; "
            "start `distill mlflow-server` and set MLFLOW_TRACKING_URI=http://<host>:<port>"
        )


def check_uris(cfg: JobConfig) -> None:
    """Which locations take a URI. `train.storage_path`: any pyarrow file system (Ray Train writes through
    pyarrow), for `distill run`. `soft_targets.cache_dir`: the URIs pyarrow's FileSystem.from_uri opens
    (uri_cache.py publishes there without renames; trained teachers and sweep assistants go beside them
    through weights_cache.py). A sweep's own state (Tune's experiment, kd_sweep.json) needs a path."""
    cache = cfg.soft_targets.cache_dir
    scheme = uri_scheme(cache)
    if scheme is not None:
        if scheme not in CACHE_URI_SCHEMES:
            raise ConfigError(f"soft_targets.cache_dir: {cache} has a scheme the cache cannot open; use a path or one of "
                              + ", ".join(f"{s}://" for s in CACHE_URI_SCHEMES))
    if cfg.sweep is not None and uri_scheme(cfg.train.storage_path) not in (None, "file"):
        raise ConfigError(f"train.storage_path: {cfg.train.storage_path} is a URI; sweeps keep their state in a file system path (an NFS mount on a cluster)")


def _demands(cfg: JobConfig) -> list[tuple[str, dict[str, float], int]]:
    """(config field, resources of one actor/worker, how many) for each stage that runs on the cluster."""
    st, train = cfg.soft_targets, cfg.train
    gpus = st.gpus_per_actor(train.use_gpu)
    actor = {"CPU": st.num_cpus_per_actor, **({"GPU": gpus} if gpus > 0 else {})}
    worker = {"CPU": train.cpus_per_worker, **({"GPU": 1.0} if train.use_gpu else {})}
    return [
        ("soft_targets.num_actors / num_cpus_per_actor / num_gpus_per_actor", actor, st.num_actors),
        ("train.num_workers / cpus_per_worker / use_gpu", worker, train.num_workers),
    ]


def unmet(cfg: JobConfig, nodes: list[dict], *, teacher_gpu_fallback: bool = True) -> str | None:
    """The first request that cannot be met on `nodes` (their total resources), as one line; None when all fit."""
    totals: dict[str, float] = {}
    for node in nodes:
        for key, value in node.get("Resources", {}).items():
            totals[key] = totals.get(key, 0.0) + value
    for i, (field, one, count) in enumerate(_demands(cfg)):
        if i == 0 and teacher_gpu_fallback and one.get("GPU") and not totals.get("GPU"):
            one = {"CPU": one["CPU"]}  # teacher actors fall back to the CPU
        for key, amount in one.items():
            if count * amount > totals.get(key, 0.0) + 1e-9:
                return (f"{field}: {count} x {amount:g} {key} requested, the cluster has {totals.get(key, 0.0):g} {key} "
                        f"on {len(nodes)} node(s)")
        if not any(all(node.get("Resources", {}).get(k, 0.0) + 1e-9 >= v for k, v in one.items()) for node in nodes):
            wanted = ", ".join(f"{v:g} {k}" for k, v in one.items())
            return f"{field}: no node of this cluster has {wanted} for one actor/worker"
    return None


def teacher_gpus(requested: float) -> float:
    """GPUs per teacher actor: as configured when the cluster has GPUs, else 0 (the actors run on the CPU)."""
    if requested > 0 and not ray.cluster_resources().get("GPU"):
        return 0.0
    return requested


def check_resources(cfg: JobConfig) -> None:
    problem = unmet(cfg, alive_nodes())
    wait_s = float(os.environ.get(WAIT_ENV) or 0)
    if problem and wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[one for _, one, count in _demands(cfg) for _ in range(count)])
        deadline = time.monotonic() + wait_s
        while problem and time.monotonic() < deadline:
            time.sleep(5)
            problem = unmet(cfg, alive_nodes())
        request_resources(bundles=[])  # a standing request would keep the nodes up after the job; its own tasks hold them now
    if problem:
        raise ConfigError(problem)
    st = cfg.soft_targets
    if st.num_gpus_per_actor and not teacher_gpus(st.num_gpus_per_actor):
        print(f"distill: warning: soft_targets.num_gpus_per_actor={st.num_gpus_per_actor:g} but the cluster has no GPU; "
              "teacher actors run on the CPU", file=sys.stderr)


def check_cluster(cfg: JobConfig, tracking_uri: str) -> None:
    """Everything about the cluster that would make the job hang or lose data, before it starts work."""
    check_uris(cfg)
    check_storage(cfg, tracking_uri, len(alive_nodes()))
    check_resources(cfg)
