"""tracking/runs.py against a real SQLite MLflow store: run statuses, nesting, secrets, paths."""

from __future__ import annotations

import contextlib
import tempfile

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.tracking import runs as tracking


@pytest.fixture
def store(tmp_path, monkeypatch, new_mlflow_store):
    monkeypatch.chdir(tmp_path)
    new_mlflow_store(tmp_path)  # the schema made once per session: what is under test is what comes after
    uri = tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    return uri, tracking.ensure_experiment(uri, "t")


def test_relative_sqlite_uri_made_absolute_and_artifacts_beside_db(store, tmp_path):
    uri, experiment_id = store
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    location = MlflowClient(uri).get_experiment(experiment_id).artifact_location
    assert location == (tmp_path / "mlartifacts").as_uri()


def test_default_uri_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.resolve_tracking_uri(None) == "http://mlflow.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.mark.parametrize(("raised", "status"), [(None, "FINISHED"), (RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED"),
                                                  (SystemExit, "KILLED")])  # SystemExit: how Tune stops a trial (ASHA)
def test_run_scope_never_leaves_a_run_running(store, raised, status):
    uri, experiment_id = store
    seen = {}
    with pytest.raises(raised) if raised else contextlib.nullcontext():
        with tracking.run_scope(uri, experiment_id, "parent") as parent_id:
            seen["parent"] = parent_id
            with tracking.run_scope(uri, experiment_id, "child", parent_id=parent_id) as child_id:
                seen["child"] = child_id
                if raised:
                    raise raised()
    client = MlflowClient(uri)
    assert client.get_run(seen["parent"]).info.status == status
    assert client.get_run(seen["child"]).info.status == status
    assert client.get_run(seen["child"]).data.tags["mlflow.parentRunId"] == seen["parent"]


def test_flatten_and_params_drop_secrets(store):
    uri, experiment_id = store
    flat = tracking.flatten({"a": {"b": 1, "api_token": "xyz"}, "students": [{"name": "s", "hidden": [8]}], "AWS_SECRET_ACCESS_KEY": "k"})
    assert flat == {"a.b": "1", "students.0.name": "s", "students.0.hidden": "[8]"}
    with tracking.run_scope(uri, experiment_id, "p") as run_id:
        tracking.log_params(uri, run_id, {"lr": 0.1, "mlflow_password": "hunter2"})
    assert MlflowClient(uri).get_run(run_id).data.params == {"lr": "0.1"}


def test_many_params_are_batched(store):
    uri, experiment_id = store
    with tracking.run_scope(uri, experiment_id, "p") as run_id:
        tracking.log_params(uri, run_id, {f"p{i}": i for i in range(250)})
    assert len(MlflowClient(uri).get_run(run_id).data.params) == 250


def test_unreachable_server_fails_fast():
    with pytest.raises(ConnectionError, match="no MLflow server answers at http://127.0.0.1:9"):
        tracking.check_reachable("http://127.0.0.1:9", timeout_s=2)


def test_uri_credentials_and_secret_keys_never_reach_the_store(store, tmp_path, monkeypatch):
    uri, experiment_id = store
    assert tracking.redact("http://alice:pw@host:5000/x and https://ghp_tok@github.com") == "http://***@host:5000/x and https://***@github.com"
    assert tracking.redact("runs:/abc/model models:/name@champion s3://bucket/a@b") == "runs:/abc/model models:/name@champion s3://bucket/a@b"
    config = {"tracking": {"tracking_uri": "http://alice:pw-123@mlflow:5000"}, "students": [{"kwargs": {"api_key": "pw-123", "depth": 2}}]}
    with tracking.run_scope(uri, experiment_id, "p") as run_id:
        tracking.log_params(uri, run_id, tracking.flatten(config))
        tracking.set_tags(uri, run_id, {"source": "https://tok-pw-123@host/x", "hf_token": "pw-123"})
        tracking.log_dict(uri, run_id, config, "config.json")
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params == {"tracking.tracking_uri": "http://***@mlflow:5000", "students.0.kwargs.depth": "2"}
    assert run.data.tags["source"] == "https://***@host/x" and "hf_token" not in run.data.tags
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert "pw-123" not in tracking.artifact_text(uri, run_id, "config.json")
    assert not list(scratch.iterdir())  # the download's scratch directory is gone (each call used to leave one in /tmp)
    assert b"pw-123" not in (tmp_path / "mlflow.db").read_bytes()
    assert "pw" not in tracking.ui_command("https://alice:pw@host")


def test_running_descendants_of_a_killed_parent_are_ended(store):
    uri, experiment_id = store
    parent = tracking.create_run(uri, experiment_id, "sweep")
    trial = tracking.create_run(uri, experiment_id, "trial", parent_id=parent)
    stage = tracking.create_run(uri, experiment_id, "stage", parent_id=trial)
    done = tracking.create_run(uri, experiment_id, "done", parent_id=trial)
    tracking.end_run(uri, done, "FINISHED")
    other = tracking.create_run(uri, experiment_id, "another job")
    assert tracking.end_descendants(uri, experiment_id, parent) == 2
    status = {run_id: MlflowClient(uri).get_run(run_id).info.status for run_id in (parent, trial, stage, done, other)}
    assert status == {parent: "RUNNING", trial: "KILLED", stage: "KILLED", done: "FINISHED", other: "RUNNING"}
    # With tags (the trials ASHA stopped): set on each run ended.
    stopped = tracking.create_run(uri, experiment_id, "trial", parent_id=parent, tags={"role": "trial"})
    assert tracking.end_descendants(uri, experiment_id, parent, tags={"stopped_early": True}) == 1
    assert MlflowClient(uri).get_run(stopped).data.tags["stopped_early"] == "True"
    # Other statuses than RUNNING, when named: FINISHED stays.
    assert tracking.end_descendants(uri, experiment_id, parent, "KILLED", ending=("FAILED", "KILLED")) == 3
    assert MlflowClient(uri).get_run(done).info.status == "FINISHED"
    # Under several ancestors at once (the trials ASHA stopped): each one's runs, none of another run's.
    first, second, third = (tracking.create_run(uri, experiment_id, "trial", parent_id=parent) for _ in range(3))
    stages = {t: tracking.create_run(uri, experiment_id, "stage", parent_id=t) for t in (first, second, third)}
    assert tracking.end_descendants(uri, experiment_id, [first, second]) == 2
    assert [MlflowClient(uri).get_run(stages[t]).info.status for t in (first, second, third)] == ["KILLED", "KILLED", "RUNNING"]
    assert MlflowClient(uri).get_run(first).info.status == "RUNNING"  # the ancestors themselves are not theirs to end


def test_child_runs_reads_every_page(store, monkeypatch):
    """A sweep can have more trials than one page of search results holds (1,000): every child comes back."""
    uri, experiment_id = store
    monkeypatch.setattr(tracking, "_PAGE", 2)
    parent = tracking.create_run(uri, experiment_id, "sweep")
    children = {tracking.create_run(uri, experiment_id, f"trial:{i}", parent_id=parent) for i in range(5)}
    tracking.create_run(uri, experiment_id, "another job")
    assert {r["run_id"] for r in tracking.child_runs(uri, parent)} == children
