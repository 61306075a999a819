"""The embedded default: a local Ray started for the user, whose workers know its address."""

from __future__ import annotations

import logging
import os
import socket
import warnings
from typing import Any

import ray

from orchestrator.config import RayStartError

GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"  # read by ray._private.node when it starts a head node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def start_local_ray(**init_kwargs: Any) -> str:
    """`ray.init(address="local")` with the GCS port chosen here and passed to every worker as RAY_ADDRESS.

    Why: Ray Train's PlacementGroupCleaner (a detached actor) looks its cluster up with
    address "auto". When another Ray instance runs on the same host, that lookup fails
    ("Found multiple active Ray instances") and the cleaner never frees the placement group
    of a trainer whose controller died -- e.g. a Tune trial that ASHA stopped -- so the next
    trial's Ray Data tasks wait for CPUs forever. Measured here: a Fashion-MNIST sweep hung
    after its first early stop while two other Ray instances ran. Returns the GCS address.
    """
    # Token authentication stays on (docs/reliability.md, "Security"), as Ray's default; its start-up warning
    # that it is on by default is not something a user of this tool needs to act on (-v shows it).
    if not os.environ.get("KD_VERBOSE"):
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    port = _free_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"
    env_vars = {"RAY_ADDRESS": address}
    runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**env_vars, **runtime_env.get("env_vars", {})}
    previous = os.environ.get(GCS_PORT_ENV)
    os.environ[GCS_PORT_ENV] = str(port)
    try:
        ray.init(address="local", runtime_env=runtime_env, **init_kwargs)
    except Exception as exc:  # Ray raises bare Exception/RuntimeError when its GCS or raylet does not come up
        ray.shutdown()  # whatever half-started processes it left
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RayStartError(f"could not start a local Ray ({first_line}); an overloaded machine or a port taken by "
                            "another process are the usual causes, and Ray's own log lines above say which") from None
    finally:
        if previous is None:
            os.environ.pop(GCS_PORT_ENV, None)
        else:
            os.environ[GCS_PORT_ENV] = previous
    actual = ray.get_runtime_context().gcs_address
    if actual != address:  # the port was taken between choosing and binding it
        warnings.warn(f"local Ray started at {actual}, not {address}: its workers' RAY_ADDRESS is wrong", stacklevel=2)
    return actual
