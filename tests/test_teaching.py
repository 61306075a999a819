"""Teaching on views, the transfer set and the twin comparison, end to end on a real local Ray and SQLite MLflow.

One short digits job: views, digit 3 left out of the transfer set, the bias fix, the paired comparison. (That a rerun
repeats a result exactly is test_sweep.py's: the same point run by two sweep drivers.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.config import load_config, spec_of
from orchestrator.data.datasets import load_arrays, normalize_images
from orchestrator.data.views import epoch_views, views_of
from orchestrator.flows.job import prepare
from orchestrator.flows.pipeline import run_job
from orchestrator.flows.stages import view_policy
from orchestrator.losses.kd_settings import student_kd
from orchestrator.losses.objective import Objective, StepInputs
from orchestrator.teachers.pool import TeacherPredictor
from orchestrator.teachers.soft_target_columns import assemble_soft_targets, gather_soft_targets, teacher_sample
from orchestrator.tracking import runs as tracking
from orchestrator.train.models import build_model
from orchestrator.train.train_loop import LoopConfig, cached_teacher_logits

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[1]
DIGITS = REPO_ROOT / "configs/digits_kd.yaml"
VIEWS = ["views.max_shift=1", "views.flip=true", "views.num_views=4"]
# 6 student epochs: with conftest's teacher, 3 epochs left every student naming no 3 at all, bias fix or not.
JOB = ["train.epochs=6", "soft_targets.num_actors=1", "tracking.experiment=teaching",
       "tracking.log_models=false", *VIEWS, "transfer.exclude_classes=[3]", "transfer.bias_correction=true"]


@pytest.fixture
def workdir(tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in rows}


def _preemption_watchers() -> int:
    """Ray Train's PreemptionWatcher actors on this session's cluster, alive or dead: one per run it starts them for."""
    import ray
    from ray.util.state import list_actors

    return len(list_actors(address=ray.get_runtime_context().gcs_address, filters=[("class_name", "=", "PreemptionWatcher")], limit=10_000))


def _newest_soft_target_run(uri: str, experiment: str):
    client = tracking.client(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], "tags.role = 'soft_targets'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0]


def test_views_transfer_set_and_twins(ray_session, workdir, mlflow_uri, digits_teacher):
    # The teacher from conftest's state-dict file (a Ray Train run less): teaching from it is under test, training it is not.
    job = [*JOB, f"teachers.0.checkpoint={digits_teacher}"]
    cfg = load_config(DIGITS, job)
    prep = prepare(cfg)
    data = prep.data
    watchers_before = _preemption_watchers()
    rows = _by_name(run_job(cfg, prepared=prep))
    assert _preemption_watchers() == watchers_before  # one node: its Ray Train runs start none (train/trainer.py)

    # The cache holds 4 views of every training image and view 0 of every test image.
    soft_run = _newest_soft_target_run(mlflow_uri, "teaching")
    assert soft_run.data.metrics["teacher_forward_rows"] == len(data.train.labels) * 4 + len(data.test.labels)
    entry = Path(soft_run.data.tags["cache_path"])
    table = pq.ParquetDataset(sorted(str(f) for f in entry.rglob("*.parquet"))).read(columns=["id", "view"])
    assert table.num_rows == len(data.train.labels) * 4 + len(data.test.labels)
    assert sorted(set(table.column("view").to_pylist())) == [0, 1, 2, 3]

    # The twins never saw a 3, so they name none; the students learnt 3s from the teacher's soft targets alone.
    threes = int((data.test.labels == 3).sum())
    for name in ("mlp32", "mlp16"):
        student, twin = rows[name], rows[f"{name}-baseline"]
        assert twin["excluded_class_errors"] == threes
        assert student["excluded_class_errors"] <= student["excluded_class_errors_before_bias_correction"]
        assert student["bias_shift"] >= 0 and student["excluded_class_errors"] < threes
        # The paired comparison is consistent with the two error counts.
        assert student["twin_errors"] == twin["test_errors"]
        assert student["errors_saved"] == twin["test_errors"] - student["test_errors"]
        assert student["discordant_student_only"] - student["discordant_twin_only"] == student["errors_saved"]
        assert 0.0 < student["mcnemar_p"] <= 1.0
        assert (student["temperature"], student["alpha"]) == (4.0, 0.7)  # digits_kd.yaml sets them


def test_without_labels_students_learn_from_the_teacher_alone():
    """transfer.labels false: every student's weight is on the teacher, and its loss no longer depends on the labels."""
    cfg = load_config(DIGITS, ["transfer.labels=false", "kd.alpha=0.3", "students.0.loss=kd", "students.1.loss=[{name: kd, temperature: 2}]"])
    kd = student_kd(cfg, cfg.students[0], params=2410)
    assert (kd.temperature, kd.alpha) == (4.0, 1.0)
    objective = Objective(cfg.students[0].loss, kd)
    logits, teacher = torch.randn(8, 10, generator=torch.Generator().manual_seed(0)), torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    one, other = torch.zeros(8, dtype=torch.int64), torch.arange(8) % 10
    assert torch.equal(objective(StepInputs(logits, one, teacher)), objective(StepInputs(logits, other, teacher)))


def test_cached_view_logits_are_the_teachers_logits_on_the_view_the_student_sees(ray_session):
    """The whole cached path without Ray Train: actor rows -> per-id columns -> a worker batch -> the drawn view."""
    cfg = load_config(DIGITS, ["views.max_shift=2", "views.flip=true", "views.num_views=7", "soft_targets.encoding=fp32"])
    data = load_arrays(cfg.dataset)
    policy = view_policy(cfg, data)
    torch.manual_seed(0)
    teacher = build_model(cfg.teachers[0], data.input_shape, data.num_classes).eval()
    predictor = TeacherPredictor(
        [{"name": "t", "spec": spec_of(cfg.teachers[0]).model_dump(), "state_dict": teacher.state_dict(), "weight": 1.0}],
        input_shape=data.input_shape, num_classes=10, mean=data.mean, std=data.std, n_train=len(data.train.labels),
        encoding="fp32", top_k=5, ensemble="logits", threads=1, use_gpu=False, views={**policy.__dict__}, forward_batch=512,
    )
    ids = np.arange(40)
    rows = predictor({"id": ids, "image": data.train.images[ids], "label": data.train.labels[ids]})
    import pyarrow as pa
    import ray

    # As a job does it: the rows assembled per id by a task, the columns left in the object store, and each
    # train worker gathering its rows' logits from them.
    table = pa.table({"id": rows["id"], "view": rows["view"], "teacher_logits": list(rows["teacher_logits"])})
    train_ref, _, summary = assemble_soft_targets.remote(None, ["id", "view", "teacher_logits"], ["teacher_logits"],
                                                         {"n_train": 40, "n_test": 0, "views": 7}, table)
    assert ray.get(summary) == {"rows": 40 * 7}
    # What auto T and alpha read: an evenly strided sample, cut beside the object store (the actor's rows are in (id, view) order).
    every = np.asarray(rows["teacher_logits"], dtype=np.float32)
    assert torch.equal(ray.get(teacher_sample.remote(train_ref, 10, 7)), torch.from_numpy(every[np.linspace(0, 40 * 7 - 1, 7).astype(np.int64)]))
    with pytest.raises(RuntimeError, match="do not cover every"):  # a missing (id, view) fails the task, and the stage with it
        ray.get(assemble_soft_targets.remote(None, ["id", "view", "teacher_logits"], ["teacher_logits"],
                                             {"n_train": 40, "n_test": 0, "views": 7}, table.slice(1))[2])
    batch = {"id": ids, "image": data.train.images[ids], **gather_soft_targets(ray.get(train_ref), ids)}  # the train worker's join
    batch = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    loop = LoopConfig(stage="t", members=[], optim=cfg.train, input_shape=data.input_shape, num_classes=10, mean=data.mean, std=data.std,
                      encoding="fp32", seed=5, train_rows=40)
    for epoch in (0, 1, 2):
        views = epoch_views(5, epoch, batch["id"], policy.count)
        cached = cached_teacher_logits(batch, loop, views)
        with torch.no_grad():
            online = teacher(normalize_images(views_of(batch["image"], batch["id"], views, policy), data.mean, data.std))
        assert torch.allclose(cached, online, atol=1e-5)
