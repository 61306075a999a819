"""Jobs on a running Ray cluster over its job API: submit (and stream logs), list, logs, stop.

The address comes from `--address`, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS: the dashboard's
HTTP address (`http://<head>:8265`) or a GCS address (`<head>:6379`). The job runs
`python jobs/<script>.py --config <path> [overrides]` in the uploaded working directory; inside it,
`ray.init()` connects to the cluster the job runs in (Ray sets RAY_ADDRESS for the driver).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path

from orchestrator.config import ConfigError, load_config

ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# Never uploaded: environments, caches, local stores and results (they can be gigabytes).
EXCLUDES = [
    ".venv", "venv", ".git", ".kd_cache", "ray_results", "mlflow.db", "mlflow.db-journal", "mlartifacts", "mlruns",
    "__pycache__", "*.egg-info", ".pytest_cache", "summary.json", "benchmarks/results",
]
# Forwarded into the job's environment when set here.
FORWARDED_VARIABLES = ("MLFLOW_TRACKING_URI", "DISTILL_SHARED_STORAGE", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
SCRIPTS = {"run": "jobs/distill.py", "sweep": "jobs/sweep.py", "teacher": "jobs/train_teacher.py", "soft-targets": "jobs/generate_soft_targets.py"}
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}  # FAILED with a driver exit code: that code


def resolve_address(flag: str | None) -> str:
    for candidate in (flag, *(os.environ.get(v) for v in ADDRESS_VARIABLES)):
        if candidate:
            return candidate
    raise ConfigError("no Ray cluster address: pass --address http://<head>:8265 or set RAY_ADDRESS")


@contextlib.contextmanager
def _address_env_cleared():
    """Ray's client lets $RAY_ADDRESS override its address argument; our --address flag must win."""
    saved = {v: os.environ.pop(v) for v in ADDRESS_VARIABLES if v in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def build_client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    resolved = resolve_address(address)
    try:
        with _address_env_cleared():
            return JobSubmissionClient(resolved)
    except Exception as exc:  # ConnectionError, AuthenticationError, ValueError on a malformed address
        raise ConfigError(f"cannot reach the Ray job API at {resolved} ({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""


def build_runtime_env(working_dir: Path, env: dict[str, str] | None = None) -> dict:
    env_vars = {k: os.environ[k] for k in FORWARDED_VARIABLES if os.environ.get(k)}
    env_vars.update(env or {})
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": list(EXCLUDES)}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return runtime_env


def build_entrypoint(command: str, config: Path, overrides: list[str], working_dir: Path) -> str:
    """`python jobs/<script>.py --config <path relative to the working dir> [overrides]`."""
    try:
        relative = config.resolve().relative_to(working_dir)
    except ValueError:
        raise ConfigError(f"config {config} is outside the working directory {working_dir}: it would not be uploaded with the job") from None
    return shlex.join(["python", SCRIPTS[command], "--config", relative.as_posix(), *overrides])


def submit(config: str, overrides: list[str], *, address: str | None = None, command: str = "run", working_dir: str = ".",
           env: dict[str, str] | None = None, wait: bool = True, submission_id: str | None = None, script_flags: list[str] = ()) -> int:
    """Validate the config here, submit it, stream the logs; the exit code follows the job's final status."""
    load_config(config, overrides)  # bad input is refused here, not minutes later on the cluster
    root = Path(working_dir).resolve()
    if not (root / SCRIPTS[command]).is_file():
        raise ConfigError(f"--working-dir {root}: no {SCRIPTS[command]} there (run from the repository root)")
    entrypoint = build_entrypoint(command, Path(config), [*overrides, *script_flags], root)
    client = build_client(address)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=build_runtime_env(root, env), submission_id=submission_id)
    print(f"distill: submitted {job_id}: {entrypoint}", file=sys.stderr, flush=True)
    if not wait:
        print(job_id)
        return 0
    try:
        return follow(client, job_id)
    except KeyboardInterrupt:
        print(f"distill: stopped following; the job keeps running (distill logs {job_id} / distill stop {job_id})", file=sys.stderr)
        return 130


def follow(client, job_id: str, *, poll_s: float = 1.0) -> int:
    """Stream the job's logs until it ends; return the exit code for its final status."""

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    with contextlib.suppress(Exception):  # the log stream can drop; the status below is what counts
        asyncio.run(_tail())
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(poll_s)
    info = client.get_job_info(job_id)
    detail = f": {info.message}" if status.value != "SUCCEEDED" and info.message else ""
    print(f"distill: job {job_id} {status.value}{detail}", file=sys.stderr)
    if status.value == "FAILED" and info.driver_exit_code:
        return info.driver_exit_code  # 2: the job refused its input (one line in the logs), 130: interrupted
    return EXIT_CODES.get(status.value, 1)


def list_jobs(address: str | None = None) -> int:
    client = build_client(address)
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    print(f"{'SUBMISSION ID':<28} {'STATUS':<10} {'STARTED (UTC)':<20} ENTRYPOINT")
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(job.start_time / 1000)) if job.start_time else "-"
        print(f"{job.submission_id or job.job_id or '-':<28} {job.status.value:<10} {started:<20} {job.entrypoint[:100]}")
    return 0


def _known(client, job_id: str) -> None:
    try:
        client.get_job_info(job_id)
    except RuntimeError:
        raise ConfigError(f"no job {job_id!r} on this cluster (distill jobs lists them)") from None


def show_logs(job_id: str, *, address: str | None = None, follow_logs: bool = False) -> int:
    client = build_client(address)
    _known(client, job_id)
    if follow_logs:
        return follow(client, job_id)
    sys.stdout.write(client.get_job_logs(job_id))
    return 0


def stop(job_id: str, *, address: str | None = None, timeout_s: float = 60.0) -> int:
    client = build_client(address)
    _known(client, job_id)
    if not client.stop_job(job_id):
        print(f"distill: job {job_id} had already ended ({client.get_job_status(job_id).value})", file=sys.stderr)
        return 0
    deadline = time.monotonic() + timeout_s
    while not (status := client.get_job_status(job_id)).is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    print(f"distill: job {job_id} {status.value}", file=sys.stderr)
    return 0
