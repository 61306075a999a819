"""`distill` command line: run, teacher, soft-targets, sweep, report. Bad input -> one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import sys

from orchestrator.config import ConfigError, load_config

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


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
        if name == "run":
            sub.add_argument("--summary-json", help="also write the results rows to this JSON file")
        if name == "sweep":
            sub.add_argument("--resume", action="store_true", help="continue a sweep whose driver was stopped, without redoing finished trials")
    report = commands.add_parser("report", help="quantize, measure (size, CPU latency, accuracy) and export the models of a finished run")
    report.add_argument("run_id", help="parent MLflow run id of a `distill run` job")
    report.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    report.add_argument("--threads", type=int, default=1, help="torch intra-op threads while timing (default 1)")
    report.add_argument("--no-export", action="store_true", help="skip the TorchScript / ONNX export of the students")
    return parser


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
    ray_was_running = _ray_running()  # a caller's Ray (a driver script, a test session) is not ours to stop
    try:
        return _guarded(lambda: _run(args))
    finally:
        if not ray_was_running and _ray_running():
            import ray

            ray.shutdown()


def _guarded(action) -> int:
    """Bad input: one line on stderr, exit 2. Ctrl-C: exit 130 (runs in flight were ended KILLED by their scopes)."""
    try:
        action()
    except ConfigError as err:
        print(f"distill: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("distill: interrupted; MLflow runs marked KILLED", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _run(args: argparse.Namespace) -> None:
    config_path, overrides = _split_config(args)
    cfg = load_config(config_path, overrides)
    from orchestrator import pipeline  # heavy imports (torch, ray, mlflow) only after the config is valid

    if args.command == "run":
        prepared = pipeline.prepare(cfg)
        pipeline.run_job(cfg, summary_json=args.summary_json, ray_address=args.address, prepared=prepared)
    elif args.command == "teacher":
        pipeline.run_teacher_job(cfg, ray_address=args.address)
    elif args.command == "sweep":
        from orchestrator.sweep import run_sweep

        run_sweep(cfg, resume=args.resume, ray_address=args.address)
    else:
        pipeline.run_soft_targets_job(cfg, ray_address=args.address)


def _report(args: argparse.Namespace) -> None:
    from orchestrator.compress_report import run_report  # torch and mlflow only when asked for

    run_report(args.run_id, tracking_uri=args.tracking_uri, threads=args.threads, export=not args.no_export)


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


if __name__ == "__main__":
    sys.exit(main())
