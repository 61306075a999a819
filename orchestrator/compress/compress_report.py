"""`distill report RUN_ID`: quantize, measure and export the models of a finished `distill run` job or sweep.

Reads everything back from MLflow (the parent's `config.json`, each child's logged model),
reloads the dataset the job named, then for the teacher(s) and every student and baseline:
measures the float model, quantizes it to int8 (`orchestrator.compress.quantize`), measures that too,
exports each KD student (TorchScript, ONNX, int8 TorchScript; each checked by reloading),
logs the figures to the child runs and `report.json` + `tradeoff.png` to the parent.
Given a sweep's parent run instead, the rows are its teacher and every finished trial's
final student, so the plot shows accuracy against latency and size across the sweep's trials.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from orchestrator.compress import quantize as compress
from orchestrator.config import ConfigError, JobConfig, validate_config
from orchestrator.data.datasets import DatasetArrays, load_arrays, normalize_images, split_train_val
from orchestrator.teachers.pool import ensemble_logits
from orchestrator.tracking import runs as tracking
from orchestrator.train.models import build_model, count_params, load_weights

CALIBRATION_ROWS = 512  # train-split images the static quantizer's observers see
EXPORT_CHECK_ROWS = 256  # test images every exported model is compared on
FLOAT_METRICS = ("latency_ms_b1", "latency_ms_b256", "throughput_b256", "size_mb_disk", "size_mb_torchscript")


def resolve_store(flag: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory; it must exist."""
    uri = tracking.resolve_tracking_uri(flag)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise ConfigError(f"no MLflow store at {uri} (run `distill report` where `distill run` ran, or pass --tracking-uri)")
    try:
        tracking.check_reachable(uri)
    except ConnectionError as exc:
        raise ConfigError(str(exc)) from None
    return uri


def _job(uri: str, run_id: str) -> tuple[dict, JobConfig]:
    parent = tracking.get_run(uri, run_id)
    if parent is None:
        raise ConfigError(f"no MLflow run {run_id!r} in {uri}")
    if parent["tags"].get("job") not in ("distill", "sweep"):
        raise ConfigError(f"run {run_id} ({parent['name']}) is not the parent run of a `distill run` job or a sweep")
    try:
        tree = json.loads(tracking.artifact_text(uri, run_id, "config.json"))
    except Exception as exc:
        raise ConfigError(f"run {run_id}: cannot read its config.json artifact ({type(exc).__name__})") from None
    return parent, validate_config(tree)


def _load_model(uri: str, run: dict, cfg: JobConfig, data: DatasetArrays) -> torch.nn.Module:
    """The run's logged model; a teacher reused from the cache points at the run that logged it (or at the cache file)."""
    failure = "no model"
    for run_id in filter(None, (run["run_id"], run["tags"].get("source_run_id"))):
        try:
            return tracking.load_torch_model(uri, f"runs:/{run_id}/model").eval()
        except Exception as exc:  # not logged (tracking.log_models false), or its class no longer imports
            failure = type(exc).__name__
    cache, name = run["tags"].get("cache_file"), run["name"].split(":", 1)[1]
    specs = {t.name: t for t in cfg.teachers}
    if run["tags"].get("role") == "teacher" and name in specs and cache and Path(cache).is_file():
        model = build_model(specs[name], data.input_shape, data.num_classes)
        load_weights(model, torch.load(cache, map_location="cpu", weights_only=True)["state_dict"], where=f"teacher {name} cache")
        return model.eval()
    raise ConfigError(f"run {run['run_id']} ({run['name']}): cannot load runs:/{run['run_id']}/model ({failure}; was tracking.log_models false?)")


def _sweep_models(uri: str, sweep_run_id: str) -> list[dict]:
    """A sweep's teacher run(s) and, per finished trial, its final-stage run renamed after the trial.

    Trials that ASHA stopped (KILLED) were never tested and are left out. Trials are reported
    with role "trial": quantized and measured like students, not exported (the champion is
    registered by the sweep; `distill report` on a job exports).
    """
    runs = tracking.child_runs(uri, sweep_run_id)
    # A resumed sweep resolved its teacher again (from the cache): one row per teacher, the newest.
    teachers = {r["name"]: r for r in runs if r["tags"].get("role") == "teacher" and r["status"] == "FINISHED"}
    models = list(teachers.values())
    for trial in runs:
        stage_id = trial["tags"].get("final_stage_run_id")
        if trial["tags"].get("role") != "trial" or trial["status"] != "FINISHED" or not stage_id:
            continue
        stage = tracking.get_run(uri, stage_id)
        label = f"{trial['tags'].get('trial_id', trial['run_id'][:8])} {trial['tags'].get('chain', '')}".strip()
        models.append(stage | {"name": f"trial:{label}", "tags": stage["tags"] | {"role": "trial"}})
    return models


def _calibration(cfg: JobConfig, data: DatasetArrays) -> torch.Tensor:
    """A seeded sample of the job's own train split (never validation or test)."""
    train_ids, _ = split_train_val(len(data.train.labels), cfg.dataset.val_fraction, cfg.seed)
    pick = np.sort(np.random.default_rng(cfg.seed).choice(train_ids, min(CALIBRATION_ROWS, len(train_ids)), replace=False))
    return normalize_images(torch.from_numpy(data.train.images[pick]), data.mean, data.std)


def _logits(model: torch.nn.Module, inputs: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(inputs[s : s + batch]).float() for s in range(0, len(inputs), batch)])


def _export(model: torch.nn.Module, quantized: torch.nn.Module, check: torch.Tensor, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        int8_reference = quantized(check)
    return [
        compress.export_torchscript(model, check, out / "model.torchscript.pt"),
        compress.export_onnx(model, check, out / "model.onnx"),
        compress.export_torchscript(quantized, check, out / "model_int8.torchscript.pt", reference=int8_reference) | {"precision": "int8"},
    ]


def _mark_pareto(rows: list[dict]) -> None:
    from orchestrator.tracking.plots import pareto_front

    for x, flag in (("latency_ms_b1", "pareto_latency"), ("size_mb_disk", "pareto_size")):
        front = set(pareto_front([(r[x], r["test_accuracy"]) for r in rows]))
        for r in rows:
            r[flag] = (r[x], r["test_accuracy"]) in front


def tradeoff_plot(rows: list[dict], path: Path) -> Path:
    """Accuracy vs batch-1 latency and accuracy vs size on disk, every model, Pareto fronts marked."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    from orchestrator.tracking.plots import pareto_front

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"teacher": "tab:blue", "student": "tab:green", "baseline": "tab:orange", "trial": "tab:purple"}
    colors = {role: c for role, c in colors.items() if any(r["role"] == role for r in rows)}
    for ax, x, label in ((axes[0], "latency_ms_b1", "CPU latency, batch 1 (ms, median)"), (axes[1], "size_mb_disk", "state dict on disk (MB)")):
        for r in rows:
            marker = "s" if r["precision"] == "int8" else "o"
            ax.scatter(r[x], r["test_accuracy"], c=colors.get(r["role"], "gray"), marker=marker, s=45, zorder=3)
            ax.annotate(f"{r['name']} {r['precision']}", (r[x], r["test_accuracy"]), fontsize=6, xytext=(4, 3), textcoords="offset points")
        front = pareto_front([(r[x], r["test_accuracy"]) for r in rows])
        ax.plot([p[0] for p in front], [p[1] for p in front], "r--", lw=1, zorder=2, label="Pareto front")
        ax.set(xscale="log", xlabel=label, ylabel="test accuracy")
        values = [r[x] for r in rows]  # five labelled ticks across the data: default log ticks crowd or vanish within a decade
        ax.set_xticks(np.geomspace(min(values), max(values), 5), [f"{v:.2g}" for v in np.geomspace(min(values), max(values), 5)])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], ls="", marker="o", c=c, label=role) for role, c in colors.items()]
    handles += [plt.Line2D([], [], ls="", marker=m, c="gray", label=p) for m, p in (("o", "fp32"), ("s", "int8"))]
    handles.append(plt.Line2D([], [], ls="--", c="r", label="Pareto front"))
    axes[1].legend(handles=handles, fontsize=7, loc="lower right")
    fig.suptitle("accuracy vs cost after distillation (further left = cheaper, higher = more accurate)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_report(parent_run_id: str, *, tracking_uri: str | None = None, threads: int = 1, export: bool = True) -> dict:
    """Measure, quantize and export every model of a `distill run` job; log the results; return report.json's content."""
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per model download otherwise
    uri = resolve_store(tracking_uri)
    parent, cfg = _job(uri, parent_run_id)
    children = _sweep_models(uri, parent_run_id) if parent["tags"]["job"] == "sweep" else [
        r for r in tracking.child_runs(uri, parent_run_id) if r["tags"].get("role") in ("teacher", "student", "baseline")]
    if not any(r["tags"]["role"] == "teacher" for r in children) or not any(r["tags"]["role"] != "teacher" for r in children):
        raise ConfigError(f"run {parent_run_id} has no teacher and student child runs (did the job finish?)")
    # Read here, in this process, whatever the job's dataset.reader: a calibration sample and the test rows are all it
    # uses, and the same pixels give the same statistics either way (data/pixel_stats.py).
    data = load_arrays(cfg.dataset.model_copy(update={"reader": "driver"}))
    models = {r["run_id"]: _load_model(uri, r, cfg, data) for r in children}
    test_inputs = normalize_images(torch.from_numpy(data.test.images), data.mean, data.std)
    labels = torch.from_numpy(data.test.labels)
    example, check = test_inputs[:1], test_inputs[:EXPORT_CHECK_ROWS]
    teachers = [r for r in children if r["tags"]["role"] == "teacher"]
    weights = {t.name: t.weight for t in cfg.teachers}
    per_teacher = [_logits(models[r["run_id"]], test_inputs) for r in teachers]
    teacher_logits = per_teacher[0] if len(per_teacher) == 1 else ensemble_logits(
        per_teacher, [weights.get(r["name"].split(":", 1)[1], 1.0) for r in teachers], rule=cfg.soft_targets.ensemble)
    calibration = _calibration(cfg, data)

    load_before = round(os.getloadavg()[0], 2)
    rows, exports, timed = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="kd-report-") as tmp:
        for run in children:
            role, name, model = run["tags"]["role"], run["name"].split(":", 1)[1], models[run["run_id"]]
            params = count_params(model)
            base = {"role": role, "name": name, "mlflow_run_id": run["run_id"], "logged_test_accuracy": run["metrics"].get("test_accuracy")}
            variants = [("fp32", "-", model)]
            if role != "teacher":
                quantized, method = compress.quantize_int8(model, calibration)
                variants.append(("int8", method, quantized))
                tracking.set_tags(uri, run["run_id"], {"int8_method": method})
                if export and role == "student":
                    folder = Path(tmp) / run["run_id"] / "export"
                    exports[name] = checks = _export(model, quantized, check, folder)
                    for c in checks:
                        if c.get("ok"):
                            tracking.log_artifact(uri, run["run_id"], folder / c["file"], "export")
                    tracking.log_dict(uri, run["run_id"], checks, "export/export_check.json")
            for precision, method, variant in variants:
                figures = compress.measure(variant, test_inputs, labels, teacher_logits, params=params, example=example, timed=False)
                rows.append(base | {"precision": precision, "quantization": method} | figures)
                timed[len(rows) - 1] = variant
        for index, figures in compress.timing(timed, test_inputs, threads=threads).items():
            rows[index] |= figures
        for run in children:
            own = {r["precision"]: r for r in rows if r["mlflow_run_id"] == run["run_id"]}
            logged = {k: own["fp32"][k] for k in FLOAT_METRICS}
            if "int8" in own:
                logged |= {f"int8_{k}": own["int8"][k] for k in (*FLOAT_METRICS, "test_accuracy", "agreement")}
            tracking.log_metrics(uri, run["run_id"], logged)
        _mark_pareto(rows)
        report = {
            "parent_run_id": parent_run_id, "job": parent["name"], "dataset": data.name, "test_rows": len(labels),
            "settings": _settings(threads, len(calibration), load_before), "rows": rows, "exports": exports,
        }  # fmt: skip
        tracking.log_dict(uri, parent_run_id, report, "report.json")
        tracking.log_artifact(uri, parent_run_id, tradeoff_plot(rows, Path(tmp) / "tradeoff.png"))
    print_report(report, uri)
    return report


def _settings(threads: int, calibration_rows: int, load_before: float) -> dict:
    return {
        "torch": torch.__version__, "quant_engine": compress.QUANT_ENGINE, "threads": threads, "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "load_avg_1m": [load_before, round(os.getloadavg()[0], 2)], "timing_rounds": compress.TIMING_ROUNDS, "latency_repeats": compress.LATENCY_REPEATS, "latency_warmup": compress.LATENCY_WARMUP,
        "throughput_batch": compress.THROUGHPUT_BATCH, "throughput_repeats": compress.THROUGHPUT_REPEATS,
        "throughput_warmup": compress.THROUGHPUT_WARMUP, "calibration_rows": calibration_rows,
        "size_mb_disk": "torch.save(state_dict) file", "size_mb_torchscript": "torch.jit.trace + torch.jit.save file",
        "torchscript_atol": compress.TORCHSCRIPT_ATOL, "onnx_atol": compress.ONNX_ATOL, "onnx_rtol": compress.ONNX_RTOL,
    }  # fmt: skip


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def print_report(report: dict, tracking_uri: str) -> None:
    from rich.console import Console
    from rich.table import Table

    # Piped output would otherwise be cut to 80 columns and the names truncated.
    console = Console(width=None if Console().is_terminal else 180)
    s = report["settings"]
    table = Table(title=f"kd-orchestrator compression report: {report['job']} on {report['dataset']} (test set, CPU, {s['threads']} thread(s))")
    headers = ("role", "name", "precision", "quantization", "params", "size MB", "TorchScript MB", "latency ms b1", "img/s b256", "test acc", "agreement", "Pareto")
    for header in headers:
        left = header in ("role", "name", "precision", "quantization", "Pareto")
        table.add_column(header, justify="left" if left else "right", overflow="fold")
    for r in report["rows"]:
        pareto = " ".join(tag for tag, key in (("latency", "pareto_latency"), ("size", "pareto_size")) if r[key]) or "-"
        table.add_row(
            r["role"], r["name"], r["precision"], r["quantization"], f"{r['params']:,}", f"{r['size_mb_disk']:.3f}", f"{r['size_mb_torchscript']:.3f}",
            f"{r['latency_ms_b1']:.3f}", f"{r['throughput_b256']:,.0f}", f"{r['test_accuracy']:.4f}", f"{r['agreement']:.4f}", pareto,
        )  # fmt: skip
    console.print(table)
    console.print(
        f"medians: batch 1 over {s['latency_repeats']} runs, batch {s['throughput_batch']} over {s['throughput_repeats']}, "
        f"models interleaved in {s['timing_rounds']} rounds (warm-up excluded); torch {s['torch']}, engine {s['quant_engine']}, "
        f"{s['cpu']} ({s['cpu_count']} cores), load average {s['load_avg_1m'][0]} -> {s['load_avg_1m'][1]}; "
        "size MB = torch.save(state_dict) on disk"
    )
    for r in report["rows"]:
        logged = r["logged_test_accuracy"]
        if r["precision"] == "fp32" and logged is not None and abs(logged - r["test_accuracy"]) > 1e-6:
            console.print(f"[yellow]warning: {r['name']} measures {r['test_accuracy']:.4f} here but its run logged {logged:.4f} (different data?)")
    for name, checks in report["exports"].items():
        parts = [c["skipped"] if c.get("skipped") else f"{c['file']} max|diff| {c['max_abs_diff']:.1e} {'ok' if c['ok'] else 'FAILED'}" for c in checks]
        console.print(f"export {name}: " + "; ".join(parts))
    console.print(f"logged: figures to each child run, report.json + tradeoff.png to run {report['parent_run_id']}")
    console.print(f"Open MLflow: {tracking.ui_command(tracking_uri)}", soft_wrap=True)
