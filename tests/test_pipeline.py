"""End to end on a real local Ray and a real SQLite MLflow store (no mocks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from orchestrator.cli import main as cli_main
from orchestrator.teachers.pool import teacher_forward_rows
from orchestrator.tracking import runs as tracking

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[1]


def _runs_by_name(client: MlflowClient, experiment: str) -> dict[str, list]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=200)
    by_name: dict[str, list] = {}
    for run in runs:
        by_name.setdefault(run.info.run_name, []).append(run)
    return by_name


def teacher_actor_pids() -> set[int]:
    """The alive teacher actors' processes on this session's cluster (teachers/warm_pool.py), whichever job started them."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "TeacherActor"), ("state", "=", "ALIVE")]
    return {a.pid for a in list_actors(address=ray.get_runtime_context().gcs_address, filters=filters, limit=10_000)}


def test_digits_end_to_end_run_tree_and_cache_reuse(ray_session, digits_cli_job, tmp_path, monkeypatch):
    # Job 1: conftest's digits_cli_job, a `distill run` with an assistant chain (`chain:`), finished in its own
    # process: the teacher trained by Ray Train, its soft targets, the assistant distilled from them, the assistant's
    # soft targets, then mlp32 and its twin distilled from those. Its summary and its run tree.
    rows = json.loads((digits_cli_job.folder / "summary.json").read_text())
    assert [(r["role"], r["name"]) for r in rows] == [("teacher", "cnn"), ("assistant", "assistant1"), ("student", "mlp32"), ("baseline", "mlp32-baseline")]
    for row in rows:
        assert set(row) >= {"role", "name", "test_accuracy", "test_errors", "params", "size_mb", "agreement", "wall_s"}
        assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["agreement"] <= 1.0
        assert row["test_errors"] == round((1 - row["test_accuracy"]) * 360)  # digits test split has 360 rows
    teacher, assistant = rows[0], rows[1]
    assert teacher["test_accuracy"] > 0.8  # a CNN on digits after 2 epochs (0.91 here); chance is 0.1
    assert assistant["test_accuracy"] > 0.5 and assistant["params"] == 64 * 48 + 48 + 48 * 10 + 10
    assert rows[2]["params"] == 64 * 32 + 32 + 32 * 10 + 10  # mlp32 on 8x8 digits

    # The next jobs run in a copy of its working dir and store, as a user's next commands would in the original.
    mlflow_uri = digits_cli_job.copy_to(tmp_path / "job")
    monkeypatch.chdir(tmp_path / "job")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    job = digits_cli_job.overrides  # its teacher and experiment: the caches it left match

    # MLflow: one parent with children per stage, all FINISHED, per-epoch metrics, lineage, models.
    client = MlflowClient(mlflow_uri)
    runs = _runs_by_name(client, "console")
    parent = runs["digits_kd"][0]
    stage = runs["stage:assistant1"][0]
    children = {"teacher:cnn", "stage:assistant1", "student:mlp32", "baseline:mlp32-baseline"}
    assert all(runs[name][0].data.tags["mlflow.parentRunId"] == parent.info.run_id for name in children)
    assert all(r.info.status == "FINISHED" for group in runs.values() for r in group)
    assert parent.data.params["kd.temperature"] == "4.0"
    assert json.loads(tracking.artifact_text(mlflow_uri, parent.info.run_id, "summary.json")) == rows

    student = runs["student:mlp32"][0]
    history = client.get_metric_history(student.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [0, 1]
    assert {"val_agreement", "val_kl_to_teacher", "train_loss", "test_accuracy"} <= set(student.data.metrics)
    # Memory: the Ray Train worker's peak per epoch, the driver's peak after each stage (peaks only grow).
    worker_peaks = [m.value for m in client.get_metric_history(student.info.run_id, "worker_peak_rss_mb")]
    assert len(worker_peaks) == 2 and 100 < worker_peaks[0] <= worker_peaks[-1] < 24 * 1024
    # Each epoch's time, and within it the training pass alone (validation comes after it).
    epoch_s, train_s = ([m.value for m in client.get_metric_history(student.info.run_id, key)] for key in ("epoch_s", "train_s"))
    assert len(epoch_s) == len(train_s) == 2 and all(0 < t < e for t, e in zip(train_s, epoch_s))
    driver = [parent.data.metrics[f"driver_peak_rss_mb_{stage_name}"] for stage_name in ("teacher", "soft_targets", "students")]
    assert 100 < driver[0] <= driver[1] <= driver[2] < 24 * 1024

    # Two soft-target passes, each over train + test once: the teacher's (a child of the job) and the assistant's
    # (a child of its stage). The assistant learnt from the first; the student from the second, and its lineage names both.
    pass_rows = 1797
    teacher_run = runs["teacher:cnn"][0]
    soft_run = next(r for r in runs["soft-targets"] if r.data.tags["mlflow.parentRunId"] == parent.info.run_id)
    assistant_soft = next(r for r in runs["soft-targets"] if r.data.tags["mlflow.parentRunId"] == stage.info.run_id)
    for run in (soft_run, assistant_soft):
        assert run.data.metrics["teacher_forward_rows"] == pass_rows and run.data.tags["cache_hit"] == "False"
    assert soft_run.data.tags["teacher_run_ids"] == teacher_run.info.run_id
    assert parent.data.metrics["teacher_forward_rows"] == 2 * pass_rows  # the job's: both passes, not only the last
    assert parent.data.metrics["wall_s_assistants"] > assistant["wall_s"] > 0  # its training, then its soft-target pass
    assert stage.data.tags["role"] == "assistant" and stage.data.tags["reused"] == "False"
    assert (tmp_path / "job" / ".kd_cache" / "stages" / f"{stage.data.tags['stage_key']}.pt").is_file()  # memoised for a next job
    assert student.data.tags["soft_target_fingerprint"] == assistant_soft.data.tags["soft_target_fingerprint"] != soft_run.data.tags["soft_target_fingerprint"]
    assert student.data.tags["assistant_run_ids"] == stage.info.run_id
    assert student.data.tags["lineage"] == f"{teacher_run.info.run_id}>{stage.info.run_id}"

    model = tracking.load_torch_model(mlflow_uri, f"runs:/{student.info.run_id}/model")
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)

    # A later job (or trial) finds the memoised assistant instead of training it again: one Ray Train run less
    # here, so shown where a second run happens anyway, by the resumed sweep driver in test_sweep.py.

    # The teacher logged to MLflow, used as the teacher of a soft-targets job: same weights, so the same
    # fingerprint and a cache hit, with no teacher inference. Then a teacher job: the trained teacher from the
    # weights cache, with lineage to the run that trained it.
    teacher_uri = f"runs:/{teacher_run.info.run_id}/model"
    rows_before = teacher_forward_rows()
    assert cli_main(["soft-targets", str(REPO_ROOT / "configs/digits_kd.yaml"), *job, f"teachers.0.mlflow_model={teacher_uri}"]) == 0
    assert cli_main(["teacher", str(REPO_ROOT / "configs/digits_kd.yaml"), *job]) == 0
    runs = _runs_by_name(client, "console")
    assert {"digits_kd:soft-targets", "digits_kd:teacher"} <= set(runs)
    sources = {r.data.tags["source"]: r for r in runs["teacher:cnn"]}
    assert sorted(sources) == ["cache", "mlflow", "trained"] and len(runs["teacher:cnn"]) == 3
    assert sources["cache"].data.tags["source_run_id"] == teacher_run.info.run_id
    newest_soft = max(runs["soft-targets"], key=lambda r: r.info.start_time)
    assert newest_soft.data.tags["cache_hit"] == "True"
    assert newest_soft.data.tags["soft_target_fingerprint"] == soft_run.data.tags["soft_target_fingerprint"]
    assert teacher_forward_rows() == rows_before
    assert all(r.info.status == "FINISHED" for group in runs.values() for r in group)

    # Pruning the teacher before soft targets: the trained teacher comes from the cache (not
    # retrained), its accuracy before and after is logged, and the pruned weights make new soft targets.
    assert cli_main(["soft-targets", str(REPO_ROOT / "configs/digits_kd.yaml"), *job, "teachers.0.prune_amount=0.5"]) == 0
    runs = _runs_by_name(client, "console")
    pruned = max(runs["teacher:cnn"], key=lambda r: r.info.start_time)
    assert pruned.data.tags["source"] == "cache"
    assert pruned.data.metrics["unpruned_test_accuracy"] == pytest.approx(teacher["test_accuracy"], abs=1e-6)
    assert 0.45 < pruned.data.metrics["prune_sparsity"] <= 0.5  # half of every layer but the logits layer
    assert pruned.data.tags["teacher_fingerprint"] != teacher_run.data.tags["teacher_fingerprint"]
    assert max(runs["soft-targets"], key=lambda r: r.info.start_time).data.tags["cache_hit"] == "False"
    assert teacher_forward_rows() == rows_before + pass_rows
    pruned_model = tracking.load_torch_model(mlflow_uri, f"runs:/{pruned.info.run_id}/model")
    zeros = sum(int((m.weight == 0).sum()) for m in pruned_model.modules() if isinstance(m, torch.nn.Conv2d))
    assert zeros > 0  # the logged model is the pruned one

    # The teacher actors stay warm in this process: the next job's pass runs on the same ones.
    warm = teacher_actor_pids()
    assert warm
    assert cli_main(["soft-targets", str(REPO_ROOT / "configs/digits_kd.yaml"), *job, "teachers.0.prune_amount=0.25"]) == 0
    assert teacher_forward_rows() == rows_before + 2 * pass_rows
    assert teacher_actor_pids() == warm
