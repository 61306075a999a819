"""Terminal output: the results table at the end of a job."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.table import Table

from orchestrator.flows.scoring import SIGNIFICANT, verdicts
from orchestrator.tracking.progress import console as progress_console
from orchestrator.tracking.runs import ui_command


def summary_table(rows: Sequence[Mapping]) -> Table:
    table = Table(title="kd-orchestrator results (test set)")
    for header in ("role", "name", "test errors", "test acc", "vs twin", "T / alpha", "params", "agreement", "wall s"):
        table.add_column(header, justify="left" if header in ("role", "name") else "right", no_wrap=True)
    for row in rows:
        table.add_row(
            row["role"], row["name"], str(row["test_errors"]), f"{row['test_accuracy']:.4f}", vs_twin(row), kd_label(row),
            f"{row['params']:,}", f"{row['agreement']:.4f}", f"{row['wall_s']:.0f}",
        )
    return table


def summary_markdown(rows: Sequence[Mapping]) -> str:
    """The results table as markdown (logged as summary.md on the parent run: the MLflow run page shows it)."""
    header = ["role", "name", "test acc", "test errors", "vs twin", "T / alpha", "params", "size MB", "agreement", "KL to teacher"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([row["role"], row["name"], f"{row['test_accuracy']:.4f}", str(row["test_errors"]), vs_twin(row),
                                         kd_label(row), f"{row['params']:,}", f"{row['size_mb']:.3f}", f"{row['agreement']:.4f}",
                                         f"{row['kl_to_teacher']:.4f}"]) + " |")
    return "\n".join(lines) + "\n\nvs twin: test errors saved against the same student trained on labels alone (exact McNemar p; * p < 0.05).\n"


def vs_twin(row: Mapping) -> str:
    """Errors distillation saved against the label-only twin (negative: cost), with the McNemar p-value."""
    if "errors_saved" not in row:
        return ""
    mark = "*" if row["mcnemar_p"] < SIGNIFICANT else ""
    return f"{row['errors_saved']:+d} (p={row['mcnemar_p']:.2g}){mark}"


def kd_label(row: Mapping) -> str:
    if row.get("temperature") is None:
        return ""
    return f"{row['temperature']:g} / {row['alpha']:g}" if row.get("alpha") is not None else f"{row['temperature']:g} / -"


def print_summary(rows: Sequence[Mapping], stage_walls: Mapping[str, float], soft, tracking_uri: str, *, forward_rows: int) -> None:
    """`soft`: the soft targets the students learnt from (the last assistant's with a chain); `forward_rows`: every
    teacher forward row the job ran (the teachers' pass, each assistant's and generation's, online ones)."""
    console = progress_console()
    console.print(summary_table(rows))
    if any("errors_saved" in row for row in rows):
        console.print("vs twin: test errors saved against the same student trained on labels alone, same views and batches "
                      f"(exact McNemar p; * p < {SIGNIFICANT})")
    for line in verdicts(rows):
        console.print(line, style="bold yellow", soft_wrap=True)
    walls = ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in stage_walls.items())
    console.print(f"stage wall time: {walls} (students share one Ray Train run)")
    source = "cache hit" if soft.cache_hit else "generated"
    console.print(f"soft targets {soft.fingerprint} ({source}; {soft.views} view(s) per training image, {soft.cache_bytes / 1e6:.1f} MB; "
                  f"{forward_rows:,} teacher forward rows this run): {soft.path}", soft_wrap=True)
    console.print(f"Open MLflow: {ui_command(tracking_uri)}", soft_wrap=True)


def print_sweep_summary(summary: Mapping, metric: str, tracking_uri: str) -> None:
    console = progress_console()
    trials = summary["trials"]
    table = Table(title="sweep trials (best first)")
    for header in ("trial", "chain", "student", "T", "alpha", "lr", "epochs", metric, "test acc"):
        table.add_column(header)
    if len(trials):
        for _, row in trials.sort_values(metric, ascending=False, na_position="last").iterrows():
            table.add_row(
                str(row["trial_id"]), str(row["chain"]), str(row["student"]), f"{row['temperature']:.2f}", f"{row['alpha']:.2f}",
                f"{row['lr']:.1e}", str(row["epochs_run"]), _fmt(row[metric]), _fmt(row["test_accuracy"]),
            )
    console.print(table)
    counts = summary["counts"]
    console.print(
        f"teacher forward rows {counts['teacher_forward_rows']:,} (naive: {counts['naive_teacher_forward_rows']:,}); "
        f"chain stages trained {counts['stages_trained']}, reused {counts['stage_reuses']}; "
        f"trials stopped early {counts['trials_stopped_early']}"
    )
    if "champion" in summary:
        console.print(f"champion: {summary['champion']['uri']} (version {summary['champion']['version']})")
    console.print(f"Open MLflow: {ui_command(tracking_uri)}", soft_wrap=True)


def _fmt(value) -> str:
    try:
        return "-" if value != value else f"{float(value):.4f}"  # NaN != NaN
    except (TypeError, ValueError):
        return "-"
