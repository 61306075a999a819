"""Large capacity gap on Fashion-MNIST: baseline vs direct KD (default and tuned T/alpha) vs the best TA chain.

Reads finished runs back from the MLflow store (nothing typed in), so run the two jobs first,
in one directory so the sweep reuses the job's cached teacher:

    distill run configs/fashion_kd.yaml          # teacher, baseline student, direct KD at T=4, alpha=0.9
    distill sweep configs/fashion_sweep.yaml     # Optuna + ASHA over T, alpha and assistant chains
    python benchmarks/fashion_gap.py             # -> benchmarks/results/fashion_gap.{json,md}

"Tuned" rows are chosen by validation accuracy (the sweep's metric); their test accuracy is
only reported. Trials that ASHA stopped have no test accuracy and cannot be chosen.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(os.environ.get("KD_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))  # run_all.py --quick points it elsewhere


def latest_parent(client, experiment: str, job: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        sys.exit(f"no MLflow experiment {experiment!r} in this store: run its job first")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.job = '{job}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        sys.exit(f"no finished {experiment!r} parent run in this store")
    return runs[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    args = parser.parse_args()
    # Imported here, not at the top: readme_results imports render() and must stay quick (no MLflow, no pandas).
    import pandas as pd

    from orchestrator.tracking import runs as tracking

    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    client = tracking.client(uri)

    job = latest_parent(client, "fashion_kd", "distill")
    summary = json.loads(tracking.artifact_text(uri, job.info.run_id, "summary.json"))
    by_role = {row["role"]: row for row in summary}
    sweep = latest_parent(client, "fashion_sweep", "sweep")
    trials = pd.read_csv(io.StringIO(tracking.artifact_text(uri, sweep.info.run_id, "trials.csv")))
    finished = trials.dropna(subset=["val_accuracy", "test_accuracy"])
    direct = finished[finished["chain"] == "direct"].sort_values("val_accuracy", ascending=False)
    chains = finished[finished["chain"] != "direct"].sort_values("val_accuracy", ascending=False)

    def fidelity(row: dict) -> dict:
        return {"agreement": row["agreement"], "kl_to_teacher": row["kl_to_teacher"]}

    rows = [
        {"row": "teacher", "how": by_role["teacher"]["name"], "test_accuracy": by_role["teacher"]["test_accuracy"], "params": by_role["teacher"]["params"],
         **fidelity(by_role["teacher"])},
        {"row": "baseline student (CE only)", "how": by_role["baseline"]["name"], "test_accuracy": by_role["baseline"]["test_accuracy"], "params": by_role["baseline"]["params"],
         **fidelity(by_role["baseline"])},
        {"row": "direct KD, default T/alpha", "how": f"T={job.data.params['kd.temperature']}, alpha={job.data.params['kd.alpha']}",
         "test_accuracy": by_role["student"]["test_accuracy"], "params": by_role["student"]["params"], **fidelity(by_role["student"])},
    ]
    for label, best in (("direct KD, tuned T/alpha", direct), ("best teacher-assistant chain", chains)):
        if len(best):
            b = best.iloc[0]
            trial_metrics = client.get_run(b["mlflow_run_id"]).data.metrics  # the trial run logs its test fidelity
            rows.append({"row": label, "how": f"chain {b['chain']}, T={b['temperature']:.2f}, alpha={b['alpha']:.2f} (trial {b['trial_id']}, val {b['val_accuracy']:.4f})",
                         "test_accuracy": float(b["test_accuracy"]), "params": int(b["params"]),
                         "agreement": trial_metrics["test_agreement"], "kl_to_teacher": trial_metrics["test_kl_to_teacher"]})
        else:
            rows.append({"row": label, "how": "no finished trial of this kind", "test_accuracy": None, "params": None, "agreement": None, "kl_to_teacher": None})
    counts = {k: int(v) for k, v in sweep.data.metrics.items()
              if k in {"trials", "trials_stopped_early", "teacher_forward_rows", "naive_teacher_forward_rows", "stages_trained", "stage_reuses", "stage_waits"}}
    report = {"job_run_id": job.info.run_id, "sweep_run_id": sweep.info.run_id, "tracking_uri": uri, "rows": rows, "sweep_counts": counts,
              "runs": {"job": run_window(job), "sweep": run_window(sweep)}, "report_machine": report_machine(),
              "trials": trials.drop(columns=[c for c in ("mlflow_run_id", "final_stage_run_id") if c in trials]).to_dict(orient="records")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fashion_gap.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = render(report)
    (RESULTS / "fashion_gap.md").write_text(md)
    print(md, end="")
    return 0


def run_window(run) -> dict:
    """When a run started and ended, and how long it took, as MLflow recorded it."""
    def utc(ms):
        return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    return {"start_utc": utc(run.info.start_time), "end_utc": utc(run.info.end_time), "minutes": round((run.info.end_time - run.info.start_time) / 60000, 1)}


def report_machine() -> dict:
    """The machine this report is made on. MLflow does not record where a run ran: run this where the jobs ran."""
    from harness import machine

    return machine()


def render(report: dict) -> str:
    """fashion_gap.md from fashion_gap.json: the comparison table and the sweep's counts."""
    counts = report["sweep_counts"]
    lines = ["| model | how | test accuracy | params | agreement with teacher | KL to teacher |", "|---|---|---|---|---:|---:|"]
    for r in report["rows"]:
        acc = f"{r['test_accuracy']:.2%}" if r["test_accuracy"] is not None else "-"
        agreement, kl = (f"{r[k]:.4f}" if r.get(k) is not None else "-" for k in ("agreement", "kl_to_teacher"))
        lines.append(f"| {r['row']} | {r['how']} | {acc} | {r['params'] if r['params'] is not None else '-'} | {agreement} | {kl} |")
    stopped = sum(t.get("status") == "KILLED" for t in report.get("trials", []))
    lines += ["", f"Sweep: {counts.get('trials')} trials ({stopped} stopped early by ASHA), "
              f"{counts.get('stages_trained')} chain stages trained, {counts.get('stage_reuses')} reused; teacher forward rows "
              f"{counts.get('teacher_forward_rows'):,} against {counts.get('naive_teacher_forward_rows'):,} for the naive sweep "
              "(every trial runs the teacher every epoch)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
