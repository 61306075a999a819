"""`distill mlflow-server`: an MLflow tracking server for cluster jobs (SQLite backend, served artifacts).

Runs `python -m mlflow server` in its own process group and stops the whole group on Ctrl-C or
SIGTERM (killing only the CLI's pid would orphan its web workers). Jobs log to it over HTTP, so
artifacts reach the server's `--artifacts-destination` (a local folder, an NFS path, `s3://...`)
from any node. It does not import mlflow itself: that stays in tracking/runs.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from orchestrator.errors import ConfigError


def build_command(*, host: str, port: int, backend_store_uri: str, artifacts_destination: str, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "server",
        "--host", host, "--port", str(port), "--workers", str(workers),
        "--backend-store-uri", backend_store_uri,
        "--serve-artifacts", "--artifacts-destination", artifacts_destination,
    ]


def default_stores(base: Path) -> tuple[str, str]:
    """SQLite file and artifact folder beside each other under `base` (absolute: the server may run elsewhere)."""
    base = base.resolve()
    return f"sqlite:///{base / 'mlflow.db'}", str(base / "mlartifacts")


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"mlflow server exited with code {proc.returncode} before answering at {url} (port taken?)")
        try:
            urllib.request.urlopen(url + "/health", timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise ConfigError(f"mlflow server did not answer at {url}/health within {timeout_s:.0f}s")


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def serve(*, host: str = "127.0.0.1", port: int = 5000, backend_store_uri: str | None = None,
          artifacts_destination: str | None = None, workers: int = 1) -> int:
    """Start the server, print its tracking URI once it is healthy, run until interrupted."""
    default_backend, default_artifacts = default_stores(Path.cwd())
    backend = backend_store_uri or default_backend
    if backend.startswith(("file:", "./", "/")) or "://" not in backend:
        raise ConfigError(f"--backend-store-uri {backend}: use a database URI (sqlite:///..., postgresql://...); MLflow 3 refuses file stores")
    command = build_command(host=host, port=port, backend_store_uri=backend,
                            artifacts_destination=artifacts_destination or default_artifacts, workers=workers)
    # MLflow's server-side job runner (GenAI evaluation jobs, a pool of huey workers) is not needed here.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    proc = subprocess.Popen(command, start_new_session=True, env=env)
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    try:
        wait_healthy(url, proc)
        print(f"distill: MLflow server up (pid {proc.pid}): export MLFLOW_TRACKING_URI={url}", file=sys.stderr, flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_group(proc)
        signal.signal(signal.SIGTERM, previous)
