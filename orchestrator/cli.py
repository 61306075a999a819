"""`distill` command line: run, teacher, soft-targets, sweep, config, report; submit, jobs, logs, stop, mlflow-server. Bad input -> one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import time

from orchestrator.cluster.interrupts import Terminated, ctrl_c_never_lost
from orchestrator.config import ConfigError, RayStartError, load_config
from orchestrator.tracking.redact import redact

VERBOSE_ENV = "KD_VERBOSE"  # progress.VERBOSE_ENV; not imported from there, which would import Ray before the config is checked

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports it


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Knowledge distillation on Ray with MLflow tracking.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "teacher -> soft targets -> students, end to end"),
        ("teacher", "train (or reuse) the teacher(s) only"),
        ("soft-targets", "teachers, then their soft targets into the cache"),
        ("sweep", "Ray Tune over temperature, alpha, lr, student and teacher-assistant chains"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("config", nargs="?", help="YAML config (configs/*.yaml)")
        sub.add_argument("overrides", nargs="*", help="dotted overrides such as kd.temperature=8 students.0.hidden=[64]")
        sub.add_argument("--config", dest="config_flag", help="YAML config, as an alternative to the positional one")
        sub.add_argument("--address", help="Ray address to connect to (default: $RAY_ADDRESS, else a local Ray)")
        sub.add_argument("-v", "--verbose", action="store_true", help="also show Ray's own output: worker logs, Ray Data progress, Ray Train reports")
        if name == "run":
            sub.add_argument("--summary-json", help="also write the results rows to this JSON file")
        if name == "sweep":
            sub.add_argument("--resume", action="store_true", help="continue a sweep whose driver was stopped, without redoing finished trials")
    show = commands.add_parser("config", help="print the resolved configuration (defaults filled in, overrides applied) as YAML")
    show.add_argument("config", nargs="?", help="YAML config (configs/*.yaml); none: the defaults")
    show.add_argument("overrides", nargs="*", help="dotted overrides such as kd.temperature=8")
    report = commands.add_parser("report", help="quantize, measure (size, CPU latency, accuracy) and export the models of a finished run")
    report.add_argument("run_id", help="parent MLflow run id of a `distill run` job")
    report.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    report.add_argument("--threads", type=int, default=1, help="torch intra-op threads while timing (default 1)")
    report.add_argument("--no-export", action="store_true", help="skip the TorchScript / ONNX export of the students")
    _cluster_commands(commands)
    return parser


def _cluster_commands(commands) -> None:
    """submit / jobs / logs / stop against a running Ray cluster's job API, and the MLflow server for it."""
    address_help = "Ray job API address, e.g. http://<head>:8265 (default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS)"
    submit = commands.add_parser("submit", help="submit a job to a Ray cluster, stream its logs, exit with its status")
    submit.add_argument("config", help="YAML config inside the working directory (uploaded with it)")
    submit.add_argument("overrides", nargs="*", help="dotted overrides, passed on to the job")
    submit.add_argument("--address", help=address_help)
    submit.add_argument("--job", choices=["run", "sweep", "teacher", "soft-targets"], default="run", help="which jobs/*.py script (default run)")
    submit.add_argument("--working-dir", default=".", help="uploaded as the job's working directory (default: here)")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment variable for the job (repeatable)")
    submit.add_argument("--submission-id", help="job id to use (default: Ray's raysubmit_...)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    submit.add_argument("--resume", action="store_true", help="with --job sweep: continue the sweep stored under train.storage_path")
    jobs = commands.add_parser("jobs", help="list the cluster's jobs")
    jobs.add_argument("--address", help=address_help)
    logs = commands.add_parser("logs", help="print a job's logs")
    logs.add_argument("job_id")
    logs.add_argument("--address", help=address_help)
    logs.add_argument("-f", "--follow", action="store_true", help="keep streaming until the job ends; exit with its status")
    stop = commands.add_parser("stop", help="stop a running job")
    stop.add_argument("job_id")
    stop.add_argument("--address", help=address_help)
    server = commands.add_parser("mlflow-server", help="run an MLflow tracking server (SQLite backend, served artifacts) for cluster jobs")
    server.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; a head node's private IP on a cluster)")
    server.add_argument("--port", type=int, default=5000)
    server.add_argument("--backend-store-uri", help="default: sqlite:///<here>/mlflow.db")
    server.add_argument("--artifacts-destination", help="where served artifacts go: a folder, an NFS path or s3://... (default: <here>/mlartifacts)")
    server.add_argument("--workers", type=int, default=1)


def _split_config(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    config, overrides = args.config, list(args.overrides)
    if args.config_flag:
        if config is not None:
            overrides.insert(0, config)  # with --config, the first positional is an override
        config = args.config_flag
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    return config, overrides


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "report":  # config-free: everything comes from the MLflow run
        return _guarded(lambda: _report(args))
    if args.command == "config":  # no Ray, no MLflow: the config as the job would see it
        return _guarded(lambda: _show_config(args))
    if args.command in CLUSTER_COMMANDS:  # talk to a cluster (or start a server); no Ray in this process
        return _guarded(lambda: _cluster(args))
    ray_was_running = _ray_running()  # a caller's Ray (a driver script, a test session) is not ours to stop
    try:
        with ctrl_c_never_lost():
            return _guarded(lambda: _run(args))
    finally:
        if not ray_was_running and _ray_running():
            import ray

            _wait_for_ray_data_threads()
            ray.shutdown()


def _wait_for_ray_data_threads(timeout_s: float = 30.0) -> None:
    """After a Ctrl-C, Ray Data's scheduling thread can outlive its executor's 2 s join on a busy
    machine; Ray shut down under it makes the core worker end the process with status 1, not 130."""
    import threading

    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread.name.startswith("StreamingExecutor-"):
            thread.join(max(0.0, deadline - time.monotonic()))


def _guarded(action) -> int:
    """Bad input: one line on stderr, exit 2. Ctrl-C: exit 130, SIGTERM: 143 (runs in flight were ended KILLED by their scopes)."""
    try:
        code = action()
    except ConfigError as err:
        print(f"distill: error: {redact(str(err))}", file=sys.stderr)  # a password in a URI never reaches the terminal
        return EXIT_BAD_INPUT
    except RayStartError as err:
        print(f"distill: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"distill: {'terminated' if Terminated.seen else 'interrupted'}; MLflow runs marked KILLED", file=sys.stderr)
        return EXIT_TERMINATED if Terminated.seen else EXIT_INTERRUPTED
    return code or 0


def _run(args: argparse.Namespace) -> None:
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # read by progress.py in this process and, through Ray, in the workers
    config_path, overrides = _split_config(args)
    cfg = load_config(config_path, overrides)
    from orchestrator.flows import job, pipeline  # heavy imports (torch, ray, mlflow) only after the config is valid

    if args.command == "run":
        prepared = job.prepare(cfg)
        pipeline.run_job(cfg, summary_json=args.summary_json, ray_address=args.address, prepared=prepared)
    elif args.command == "teacher":
        pipeline.run_teacher_job(cfg, ray_address=args.address)
    elif args.command == "sweep":
        from orchestrator.flows.sweep import run_sweep

        run_sweep(cfg, resume=args.resume, ray_address=args.address)
    else:
        pipeline.run_soft_targets_job(cfg, ray_address=args.address)


def _show_config(args: argparse.Namespace) -> None:
    import yaml

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, width=120), end="")


def _report(args: argparse.Namespace) -> None:
    from orchestrator.compress.compress_report import run_report  # torch and mlflow only when asked for

    run_report(args.run_id, tracking_uri=args.tracking_uri, threads=args.threads, export=not args.no_export)


CLUSTER_COMMANDS = ("submit", "jobs", "logs", "stop", "mlflow-server")


def _cluster(args: argparse.Namespace) -> int:
    from orchestrator.cluster import submit

    if args.command == "submit":
        if args.resume and args.job != "sweep":
            raise ConfigError("--resume: only with --job sweep")
        env = dict(_key_value(item) for item in args.env)
        return submit.submit(args.config, list(args.overrides), address=args.address, command=args.job, working_dir=args.working_dir,
                             env=env, wait=not args.no_wait, submission_id=args.submission_id,
                             script_flags=["--resume"] if args.resume else [])
    if args.command == "jobs":
        return submit.list_jobs(args.address)
    if args.command == "logs":
        return submit.show_logs(args.job_id, address=args.address, follow_logs=args.follow)
    if args.command == "stop":
        return submit.stop(args.job_id, address=args.address)
    from orchestrator.tracking.mlflow_server import serve

    return serve(host=args.host, port=args.port, backend_store_uri=args.backend_store_uri,
                 artifacts_destination=args.artifacts_destination, workers=args.workers)


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
    return key, value


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


if __name__ == "__main__":
    sys.exit(main())
