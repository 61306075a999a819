"""Every distillation family end to end on digits, on a real local Ray and a real SQLite MLflow store.

One job holds them all (response, feature, online mutual learning, born-again) so the
teacher trains once and every batch is read once for all students.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import load_config
from orchestrator.flows.pipeline import run_job

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_digits_every_method_family_online_teacher_with_jitter(ray_session, workdir, mlflow_uri, digits_teacher):
    cfg = load_config(REPO_ROOT / "configs/digits_methods.yaml", [
        f"teachers.0.checkpoint={digits_teacher}", "train.epochs=4", "tracking.experiment=methods", "tracking.log_models=false",
    ])
    assert cfg.teacher_mode == "online" and cfg.views.max_shift == 1
    rows = run_job(cfg)

    names = ["kd", "dkd-ls", "features", "dml-a", "dml-b", "born-again"]
    assert [(r["role"], r["name"]) for r in rows] == [("teacher", "cnn")] + [("student", n) for n in names]
    for row in rows[1:]:
        # Trained, not broken (chance is 0.1): this test is the plumbing of every family in one job; what each
        # loss computes is pinned in test_objectives.py and test_*_losses.py, whether it helps in benchmarks/.
        assert row["test_accuracy"] > 0.3, row
        assert row["params"] == rows[1]["params"]  # the reported model is the bare student: no adapters

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("methods")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id], max_results=200)}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["student:features"].data.params["loss"] == "1*ce+1*fitnet+500*at+1*rkd"
    assert runs["student:dkd-ls"].data.params["loss"] == "1*ce+1*dkd_ls@T2"  # its own temperature, so no kd.temperature param
    assert "kd.temperature" not in runs["student:dkd-ls"].data.params and runs["student:kd"].data.params["kd.temperature"] == "4.0"
    assert runs["student:kd"].data.params["loss"] == "kd"
    history = client.get_metric_history(runs["student:features"].info.run_id, "train_loss")
    assert [m.step for m in history] == [0, 1, 2, 3] and all(m.value == m.value for m in history)  # finite, not NaN
    peers = [client.get_metric_history(runs[f"student:{n}"].info.run_id, "train_loss") for n in ("dml-a", "dml-b")]
    assert [m.value for m in peers[0]] != [m.value for m in peers[1]]  # the peers start apart, else DML would be CE

    # Born-again: generation 2 is a child of the student's run (generation 1), taught by its soft targets.
    student_run = runs["student:born-again"]
    generation = runs["generation:born-again:2"]
    assert generation.data.tags["mlflow.parentRunId"] == student_run.info.run_id
    assert student_run.data.tags["generations"] == "2"
    assert student_run.data.tags["generation_run_ids"] == generation.info.run_id
    assert generation.data.tags["teacher"] == "born-again-gen1" and generation.data.tags["stage_key"]  # a memoised chain stage
    soft_runs = [r for r in client.search_runs([exp.experiment_id], "attributes.run_name = 'soft-targets'")]
    assert len(soft_runs) == 2  # the teacher's, then generation 1's (the last generation teaches nobody)
    gen_soft = next(r for r in soft_runs if r.data.tags["mlflow.parentRunId"] == student_run.info.run_id)
    assert gen_soft.data.metrics["teacher_forward_rows"] == 1797
    # The job's count is every pass it ran plus the online teacher's rows: each of the 1,221 training rows, each of
    # the 4 epochs, once for all the students it teaches.
    job_rows = runs["digits_methods"].data.metrics["teacher_forward_rows"]
    assert job_rows == sum(r.data.metrics["teacher_forward_rows"] for r in soft_runs) + 1221 * 4
    assert len(client.get_metric_history(generation.info.run_id, "val_accuracy")) == 4
