"""Checks that run before Ray starts and before any MLflow run exists.

Each turns a failure that would otherwise come late (a minute of reconnect retries,
a local Ray started for a request it can never meet, NaN soft targets raised inside
an actor) into one line naming the problem: `ConfigError`, exit code 2. Checks that
need the cluster itself (multi-node storage, a remote cluster's resources) are in
`cluster/checks.py`, after `ray.init` and still before any MLflow run.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import torch

from orchestrator.config import ConfigError, JobConfig

# Addresses that ray.init resolves itself: no host:port to probe.
_SYMBOLIC_ADDRESSES = ("auto", "local")


def ray_address(address: str | None) -> tuple[str | None, str]:
    """The address a job will connect to, and where it came from (for the error message)."""
    if address:
        return address, "--address"
    env = os.environ.get("RAY_ADDRESS")
    return (env, "RAY_ADDRESS") if env else (None, "")


def check_ray_address(address: str, where: str, *, timeout_s: float = 3.0) -> None:
    """A TCP connect to host:port; ray.init itself would retry for about a minute before failing."""
    if address in _SYMBOLIC_ADDRESSES:
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number
        host, port = None, None
    if not host or not port:
        raise ConfigError(f"{where}: {address!r} is not host:port, ray://host:port, auto or local")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{where}: no Ray cluster answers at {address} ({reason})") from None


def local_resources() -> dict[str, float]:
    """What a local `ray.init()` on this machine would register."""
    from ray._private.utils import get_num_cpus  # the container-aware count ray.init uses

    return {"CPU": float(get_num_cpus()), "GPU": float(torch.cuda.device_count())}


def check_local_resources(cfg: JobConfig) -> None:
    """Requests a local Ray on this machine could never meet; Ray would queue them forever.
    (A running cluster is judged after `ray.init` by `cluster/checks.py`, which also knows its nodes.)"""
    have = local_resources()
    st, train = cfg.soft_targets, cfg.train
    requests = [
        # Teacher actors asking for a GPU fall back to the CPU when there is none; only their CPUs must fit.
        ("soft_targets.num_cpus_per_actor", "CPU", st.num_cpus_per_actor, "teacher actors each"),
        ("train.num_workers x train.cpus_per_worker", "CPU", train.num_workers * train.cpus_per_worker, f"{train.num_workers} train workers"),
        ("train.use_gpu", "GPU", float(train.num_workers) if train.use_gpu else 0.0, f"{train.num_workers} train workers"),
    ]
    for field, kind, amount, who in requests:
        if amount > have[kind]:
            raise ConfigError(f"{field}: {who} need {amount:g} {kind}, this machine has {have[kind]:g}")


def check_finite_weights(state_dict: dict, where: str) -> None:
    """NaN or inf weights give NaN logits, which the soft-target encoder refuses deep inside an actor."""
    for key, tensor in state_dict.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ConfigError(f"{where}: checkpoint tensor {key!r} holds NaN or inf values")
