"""What a person sees: a short `distill run` as a user starts it, its console read back (not a TTY, as in CI)."""

from __future__ import annotations

import os
import re

import pytest

from orchestrator.tracking import runs as tracking

pytestmark = pytest.mark.integration
NOISE = ("Started a local Ray instance", "TrainingReport(", "A new progress UI", "Pickle", "pickle", "(pid=", "Running Dataset", "Token authentication", "available CPUs")
ESCAPE = re.compile(r"\x1b\[")


def test_default_console_is_ours(digits_cli_job):
    """conftest's digits_cli_job: `distill run` on digits, a 2-epoch teacher, an assistant, one student and its twin (2 epochs)."""
    quiet = digits_cli_job.console
    lines = quiet.splitlines()
    assert len(lines) <= 60, quiet
    for noise in NOISE:
        assert noise not in quiet, f"{noise!r} in the default console:\n{quiet}"
    assert not ESCAPE.search(quiet)  # not a terminal: plain lines
    # One line per epoch per model, then the table.
    assert sum("[teacher:cnn] epoch" in line for line in lines) == 2
    assert sum("[distill:mlp32-baseline] epoch 2/2" in line for line in lines) == 1
    assert sum("[distill:assistant1] epoch" in line for line in lines) == 2  # a chain stage shows its epochs like any model
    assert any(line.startswith("teacher cnn: training 2 epochs") for line in lines)
    # A stage's end line comes after its last epoch line, not before it.
    last_epoch = max(i for i, line in enumerate(lines) if "[teacher:cnn] epoch" in line)
    assert next(i for i, line in enumerate(lines) if line.startswith("teacher cnn: trained")) > last_epoch, quiet
    assert any("kd-orchestrator results (test set)" in line for line in lines)
    walls = next(line for line in lines if line.startswith("stage wall time:"))
    assert re.findall(r"(\w+) [\d.]+s", walls) == ["teacher", "soft_targets", "assistants", "students"]
    assert "3,594 teacher forward rows this run" in quiet  # the teacher's pass and the assistant's, 1,797 rows each

    # The MLflow side: a training experiment, the parent's datasets and artifacts.
    client = tracking.client(digits_cli_job.uri)
    experiment = client.get_experiment_by_name("console")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = client.search_runs([experiment.experiment_id], "tags.job = 'distill'")[0]
    contexts = {d.tags[0].value: d.dataset.name for d in parent.inputs.dataset_inputs}
    assert contexts == {"training": "digits-train", "validation": "digits-validation", "test": "digits-test", "soft_targets": "digits-soft-targets"}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)} | {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"summary.json", "summary.md", "plots/val_accuracy.png"} <= artifacts
    # What the console left out is kept: the job's Ray worker logs, attached to the parent run.
    ray_logs = [a.path for a in client.list_artifacts(parent.info.run_id, "ray_logs")]
    assert ray_logs and all(re.fullmatch(r"ray_logs/worker-\w+-\w+-\d+\.(out|err)", p) for p in ray_logs), ray_logs
    student = client.search_runs([experiment.experiment_id], "tags.role = 'student'")[0]
    model = tracking.load_torch_model(digits_cli_job.uri, f"runs:/{student.info.run_id}/model")
    assert sum(p.numel() for p in model.parameters()) > 0  # rebuilt from its state dict and spec, nothing unpickled
    # -v brings Ray's own lines back ("Started a local Ray instance", its dashboard address): asserted on the
    # -v runs of test_faults.py's Ctrl-C test, which starts a job of its own anyway.


def test_a_runs_ray_logs_are_those_written_while_it_ran(ray_session, tmp_path):
    """A driver that runs several jobs (a notebook, this test session) attaches to each run only the worker
    logs written during it, not every earlier job's again."""
    import time

    from orchestrator.tracking.progress import copy_job_logs

    started = time.time() - 1.0
    # Four at once: more than Ray prestarts (their files carry no job id in their names: the job is found in them).
    speak = ray_session.remote(num_cpus=0)(lambda: (time.sleep(1.0), print("kd-log-marker", flush=True), os.getpid())[-1])
    workers = set(ray_session.get([speak.remote() for _ in range(4)]))
    (tmp_path / "now").mkdir()
    (tmp_path / "later").mkdir()
    copied = [p for p in copy_job_logs(tmp_path / "now", since=started) if "kd-log-marker" in p.read_text(errors="replace")]
    assert sorted(int(p.stem.rsplit("-", 1)[1]) for p in copied) == sorted(workers), copied  # every worker that ran one, prestarted or not
    assert copy_job_logs(tmp_path / "later", since=time.time() + 60) == []
