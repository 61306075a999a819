"""After a sweep: close what ASHA stopped, tabulate trials, plot, register the champion, count reuse."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.config import JobConfig
from orchestrator.tracking import plots
from orchestrator.tracking import runs as tracking

STOPPED_EARLY = {"stopped_early": True}
TRIAL_COLUMNS = ["trial_id", "chain", "student", "temperature", "alpha", "lr", "epochs_run", "params", "test_accuracy"]


def trial_table(cfg: JobConfig, prep, results, parent_id: str) -> pd.DataFrame:
    """One row per trial: sampled parameters (from MLflow), last validation metric (from Tune), test accuracy."""
    metric = cfg.sweep.metric
    runs = [run for run in tracking.child_runs(prep.tracking_uri, parent_id) if run["tags"].get("role") == "trial"]  # every page
    # A trial cut short (Ctrl-C) runs again on --resume under a new run: the FINISHED one, else the newest, speaks for it.
    by_trial = {run["tags"]["trial_id"]: run for run in sorted(runs, key=lambda r: (r["status"] == "FINISHED", r["start_time"] or 0))}
    rows = []
    for result in results:
        trial_id = result.metrics.get("trial_id") if result.metrics else None
        run = by_trial.get(trial_id)
        if run is None:
            continue
        params, metrics = run["params"], run["metrics"]
        rows.append({
            "trial_id": trial_id,
            "chain": params.get("chain", "direct"),
            "student": params.get("student"),
            "temperature": float(params.get("temperature", "nan")),  # every trial logs its resolved T and alpha
            "alpha": float(params.get("alpha", "nan")),
            "lr": float(params.get("lr", cfg.train.lr)),
            **{path: params.get(path) for path in cfg.sweep.space.paths},  # swept dotted paths, as MLflow logged them
            "epochs_run": int(result.metrics.get("training_iteration", 0)),
            metric: result.metrics.get(metric),
            "params": metrics.get("params"),
            "online_teacher_rows": metrics.get("online_teacher_rows", 0.0),
            "test_accuracy": metrics.get("test_accuracy"),
            "mlflow_run_id": run["run_id"],
            "final_stage_run_id": run["tags"].get("final_stage_run_id"),
            "status": run["status"],
        })
    return pd.DataFrame(rows)


def stopped_trial_ids(results, epochs: int) -> set[str]:
    """The trials ASHA stopped, as Tune saw them: no error, fewer epochs reported than the sweep trains."""
    return {r.metrics["trial_id"] for r in results if r.error is None and r.metrics and "trial_id" in r.metrics
            and r.metrics.get("training_iteration", epochs) < epochs}


def close_stopped_trials(prep, parent_id: str, stopped: set[str]) -> int:
    """The runs of the trials ASHA stopped end KILLED, tagged stopped_early, whatever the stop left them: RUNNING
    (Tune killed the trial's actor), KILLED (a SystemExit at a report: run_scope) or FAILED (the stop came back as
    the trial's Ray Train run's error). Only a trial's latest run, the attempt Tune's result speaks for: an earlier
    one a killed driver left stays as --resume closed it. Returns how many trials ASHA stopped."""
    uri, experiment_id = prep.tracking_uri, prep.experiment_id
    tracking.end_descendants(uri, experiment_id, parent_id, tags=STOPPED_EARLY)
    latest = {run["tags"].get("trial_id"): run for run in tracking.child_runs(uri, parent_id)}  # oldest first: the last wins
    closing = [latest[t]["run_id"] for t in stopped if t in latest and latest[t]["status"] != "FINISHED"]
    for run_id in closing:
        tracking.set_tags(uri, run_id, STOPPED_EARLY)
        tracking.end_run(uri, run_id, "KILLED")
    if closing:  # their stage runs, all trials in one read of the experiment (one per trial grew with the sweep squared)
        tracking.end_descendants(uri, experiment_id, closing, ending=("FAILED", "KILLED"), tags=STOPPED_EARLY)
    return len(stopped)


def register_champion(cfg: JobConfig, prep, best: pd.Series, parent_id: str, teachers, soft) -> dict[str, str]:
    name = cfg.sweep.register_as or f"{cfg.name}-student"
    tags = {
        "sweep_run_id": parent_id,
        "trial_id": best["trial_id"],
        "teacher_run_ids": ",".join(t.run_id for t in teachers),
        "teacher_soft_target_fingerprint": soft.fingerprint,
        "chain": best["chain"],
    }
    version = tracking.register_champion(prep.tracking_uri, f"runs:/{best['final_stage_run_id']}/model", name, tags=tags)
    return {"model": name, "version": version, "alias": "champion", "uri": f"models:/{name}@champion"}


def finish_sweep(cfg: JobConfig, prep, results, parent_id: str, teachers, soft, *, forward_rows: int, stage_stats: dict[str, int]) -> dict[str, Any]:

    uri, metric = prep.tracking_uri, cfg.sweep.metric
    closed = close_stopped_trials(prep, parent_id, stopped_trial_ids(results, cfg.train.epochs))
    trials = trial_table(cfg, prep, results, parent_id)
    stats = stage_stats
    counts = {
        "trials": len(trials),
        "trials_stopped_early": closed,
        # online: besides any soft-target pass, the rows the teachers ran on inside the trials' workers, as they counted them
        "teacher_forward_rows": forward_rows + int(trials["online_teacher_rows"].fillna(0).sum()) if len(trials) else forward_rows,
        "naive_teacher_forward_rows": naive_forward_rows(len(prep.train_ids), len(trials), cfg.train.epochs),
        "stages_trained": stats["produced"],
        "stage_reuses": stats["reused"],
        "stage_waits": stats["waited"],
    }
    tracking.log_metrics(uri, parent_id, counts)
    summary: dict[str, Any] = {"counts": counts, "trials": trials}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        trials.to_csv(out / "trials.csv", index=False)
        tracking.log_artifact(uri, parent_id, out / "trials.csv")
        finished = trials.dropna(subset=[metric, "test_accuracy"])
        if len(finished):
            for path in (
                plots.accuracy_vs_temperature(finished, metric, out),
                plots.alpha_temperature_map(finished, metric, out),
                plots.accuracy_vs_params(finished, out),
                plots.direct_vs_chain(finished, metric, out),
            ):
                tracking.log_artifact(uri, parent_id, path, "plots")
            best = finished.sort_values(metric, ascending=cfg.sweep.mode == "min").iloc[0]
            summary["champion"] = register_champion(cfg, prep, best, parent_id, teachers, soft)
            tracking.set_tags(uri, parent_id, {"champion_trial": best["trial_id"], "champion_model": summary["champion"]["uri"]})
    from orchestrator.tracking.report import print_sweep_summary

    print_sweep_summary(summary, metric, uri)
    return summary


def naive_forward_rows(rows: int, trials: int, epochs: int) -> int:
    """Teacher rows a sweep costs when every trial runs the teacher every epoch (train split only)."""
    return rows * trials * epochs
