"""MLflow bookkeeping: the only module that imports mlflow.

Runs are addressed by id through `MlflowClient` rather than mlflow's global
"active run" stack, because the parent, its children and the Ray Train rank-0
worker all write to the same runs from different processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from orchestrator.tracking.redact import redact  # noqa: F401  (also tracking.redact for callers)

DEFAULT_DB = "mlflow.db"
_MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
_BATCH = 100  # MLflow accepts at most 100 params per log_batch call
_PAGE = 1000  # runs per search_runs page

# Secrets must never become params, tags or logged config.
_SECRET_MARKERS = ("token", "secret", "password", "passwd", "api_key", "apikey", "access_key", "credential")


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a SQLite store in the working directory.

    SQLite paths are made absolute: Ray workers do not run in the driver's directory.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):  # a tracking server already serves the UI
        return f"open {redact(uri)} in a browser"
    return f"mlflow ui --backend-store-uri {redact(uri)} --host 127.0.0.1 --port 5000"


def scrub(tree: Any) -> Any:
    """A JSON-like tree with secret-looking keys dropped and URI credentials redacted (for logged dicts)."""
    if isinstance(tree, Mapping):
        return {k: scrub(v) for k, v in tree.items() if not is_secret_key(str(k))}
    if isinstance(tree, (list, tuple)):
        return [scrub(v) for v in tree]
    return redact(tree) if isinstance(tree, str) else tree


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(marker in lowered for marker in _SECRET_MARKERS)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.0.c": "value"}; secret-looking keys are dropped."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if is_secret_key(str(key)):
            continue
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                flat.update(flatten(item, f"{name}.{i}."))
        else:
            text = json.dumps(scrub(value)) if isinstance(value, (list, dict)) else redact(str(value))
            flat[name] = text[:_MAX_PARAM_CHARS]
    return flat


def check_reachable(uri: str, *, timeout_s: float = 5.0) -> None:
    """Fail fast on a tracking server that does not answer; MLflow's own retries take minutes."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"no MLflow server answers at {redact(uri)} ({reason})") from None


def ensure_experiment(uri: str, name: str) -> str:
    check_reachable(uri)
    # Schema creation/migration chatter on a new SQLite store is not the user's business.
    for noisy in ("mlflow.store.db.utils", "alembic.runtime.migration", "mlflow.pyfunc", "mlflow.models.model"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a tqdm bar per model download otherwise
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = mlflow_client.create_experiment(name, artifact_location=_default_artifact_location(uri), tags=EXPERIMENT_TAGS)
    else:
        experiment_id = experiment.experiment_id
        if experiment.tags.get(EXPERIMENT_KIND) is None:  # made by an older version, or by hand
            mlflow_client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, EXPERIMENT_TAGS[EXPERIMENT_KIND])
    return experiment_id


# Without this tag the MLflow 3 UI opens an experiment in its GenAI view (traces, an assistant panel);
# "custom_model_development" makes it open on the training runs.
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND: "custom_model_development"}


def log_datasets(uri: str, run_id: str, datasets: list[Mapping[str, Any]]) -> None:
    """Record what a run read as MLflow dataset inputs (the runs table's Dataset column): each a mapping with
    name, digest, source, context (training / validation / test / soft_targets) and rows. Nothing is copied."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = [
        DatasetInput(
            Dataset(name=d["name"], digest=str(d["digest"])[:36], source_type="local",
                    source=json.dumps({"uri": redact(str(d["source"]))}), profile=json.dumps({"num_rows": int(d["rows"])})),
            tags=[InputTag("mlflow.data.context", d["context"])],
        )
        for d in datasets
    ]
    if inputs:
        client(uri).log_inputs(run_id, datasets=inputs)


def _default_artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database file, not in whatever directory the job ran from."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None  # a tracking server decides (served artifacts)
    return (Path(uri[len(prefix) :]).parent / "mlartifacts").resolve().as_uri()


def create_run(uri: str, experiment_id: str, name: str, *, parent_id: str | None = None, tags: Mapping[str, str] | None = None) -> str:
    all_tags = dict(tags or {})
    if parent_id:
        all_tags["mlflow.parentRunId"] = parent_id  # what makes the MLflow UI nest the run
    run = client(uri).create_run(experiment_id, run_name=name, tags={k: str(v) for k, v in all_tags.items()})
    return run.info.run_id


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status)


def reopen_run(uri: str, run_id: str) -> None:
    """A run that ended (a sweep's parent, KILLED with its driver) RUNNING again, for a resumed driver to continue."""
    client(uri).update_run(run_id, status="RUNNING")


@contextlib.contextmanager
def run_scope(uri: str, experiment_id: str, name: str, *, parent_id: str | None = None, tags: Mapping[str, str] | None = None) -> Iterator[str]:
    """Create a run, yield its id, end it FINISHED, FAILED on error, KILLED on Ctrl-C or a SystemExit (how Tune
    stops a trial's thread: ASHA's stop is no failure): never left RUNNING."""
    run_id = create_run(uri, experiment_id, name, parent_id=parent_id, tags=tags)
    try:
        yield run_id
    except (KeyboardInterrupt, SystemExit):
        end_run(uri, run_id, "KILLED")
        raise
    except BaseException:
        end_run(uri, run_id, "FAILED")
        raise
    end_run(uri, run_id, "FINISHED")


def end_descendants(uri: str, experiment_id: str, ancestor_id: str | Collection[str], status: str = "KILLED", *,
                    ending: tuple[str, ...] = ("RUNNING",), tags: Mapping[str, Any] | None = None) -> int:
    """End `status` every run nested (at any depth) under `ancestor_id` (or under any of several ancestor ids: one
    read of the experiment for all) whose status is one of `ending`, `tags` set on each first; returns how many.

    For runs whose own process was stopped from outside (a Tune trial on Ctrl-C, one ASHA stopped, a killed
    driver's) and so cannot end them, or ended them as something they were not.
    """
    ancestors = {ancestor_id} if isinstance(ancestor_id, str) else set(ancestor_id)
    runs = _all_runs(client(uri), experiment_id)
    parent_of = {r.info.run_id: r.data.tags.get("mlflow.parentRunId") for r in runs}

    def descends(run_id: str) -> bool:
        for _ in range(len(parent_of)):  # bounded: a corrupt parent cycle cannot loop forever
            run_id = parent_of.get(run_id)
            if run_id is None:
                return False
            if run_id in ancestors:
                return True
        return False

    stale = [r.info.run_id for r in runs if r.info.status in ending and descends(r.info.run_id)]
    for run_id in stale:
        if tags:
            set_tags(uri, run_id, tags)
        end_run(uri, run_id, status)
    return len(stale)


def _all_runs(mlflow_client: MlflowClient, experiment_id: str, filter_string: str = "") -> list:
    """Every run of the experiment matching `filter_string`, page by page: a sweep can have more than one page holds."""
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs([experiment_id], filter_string=filter_string, max_results=_PAGE, page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(k, redact(str(v))[:_MAX_PARAM_CHARS]) for k, v in params.items() if not is_secret_key(k)]
    mlflow_client = client(uri)
    for start in range(0, len(items), _BATCH):
        mlflow_client.log_batch(run_id, params=items[start : start + _BATCH])


def set_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    client(uri).log_batch(run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items() if not is_secret_key(k)])


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], *, step: int = 0) -> None:
    import time

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    if batch:
        client(uri).log_batch(run_id, metrics=batch)


def log_dict(uri: str, run_id: str, data: Any, artifact_file: str) -> None:
    client(uri).log_dict(run_id, scrub(data), artifact_file)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client(uri).log_text(run_id, text, artifact_file)


def log_artifact(uri: str, run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(local_path), artifact_path)


def log_artifacts(uri: str, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
    client(uri).log_artifacts(run_id, str(local_dir), artifact_path)


def log_torch_model(uri: str, run_id: str, model: Any, *, name: str, spec: Mapping[str, Any], input_shape: Any, num_classes: int,
                    input_example: Any = None) -> str:
    """Log a torch module under `run_id` as its state dict and architecture (mlflow_model_code.py); returns its URI.

    The run is activated briefly (log_model writes to the active run) and not ended here: the caller's
    run_scope decides its final status.
    """
    import torch

    mlflow.set_tracking_uri(uri)
    model.eval()
    with tempfile.TemporaryDirectory(prefix="kd-model-") as scratch:
        weights, meta = Path(scratch) / "weights.pt", Path(scratch) / "spec.json"
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, weights)
        meta.write_text(json.dumps({"spec": dict(spec), "input_shape": list(input_shape), "num_classes": int(num_classes)}))
        active = mlflow.start_run(run_id=run_id)
        try:
            mlflow.pyfunc.log_model(
                name=name,
                python_model=str(Path(__file__).with_name("mlflow_model_code.py")),
                artifacts={"weights": str(weights), "spec": str(meta)},
                input_example=input_example,
                # Explicit requirements skip MLflow's slow import-scanning inference.
                pip_requirements=_model_requirements(),
            )
        finally:
            # Pop mlflow's active-run stack without terminating the run.
            _detach_active_run(active)
    return f"runs:/{run_id}/{name}"


def _detach_active_run(active: Any) -> None:
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()
    if stack and stack[-1].info.run_id == active.info.run_id:
        stack.pop()


def _model_requirements() -> list[str]:
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]


def load_torch_model(uri: str, model_uri: str) -> Any:
    """The torch module of a model logged by `log_torch_model` (`runs:/...`, `models:/name@alias`), on the CPU."""
    mlflow.set_tracking_uri(uri)
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().model


def artifact_text(uri: str, run_id: str, path: str) -> str:
    """A run's text artifact (JSON, CSV), read through a scratch directory that is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="kd-artifact-") as target:
        return Path(client(uri).download_artifacts(run_id, path, target)).read_text()


def register_champion(uri: str, model_uri: str, name: str, *, tags: Mapping[str, str], alias: str = "champion") -> str:
    """Register a model version, point `alias` at it and tag it with its lineage; returns the version."""
    mlflow.set_tracking_uri(uri)
    mlflow_client = client(uri)
    if not mlflow_client.search_registered_models(filter_string=f"name = '{name}'"):
        mlflow_client.create_registered_model(name, description="Best student of a kd-orchestrator sweep")
    run_id = model_uri.split("/")[1] if model_uri.startswith("runs:/") else None
    version = mlflow_client.create_model_version(name, model_uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()})
    mlflow_client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def _run_dict(run: Any) -> dict[str, Any]:
    return {
        "run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status, "experiment_id": run.info.experiment_id,
        "start_time": run.info.start_time, "tags": dict(run.data.tags), "params": dict(run.data.params), "metrics": dict(run.data.metrics),
    }  # fmt: skip


def get_run(uri: str, run_id: str) -> dict[str, Any] | None:
    """A run as a plain dict (run_id, name, status, experiment_id, tags, params, metrics); None if the store has no such run."""
    from mlflow.exceptions import MlflowException

    try:
        return _run_dict(client(uri).get_run(run_id))
    except MlflowException:
        return None


def child_runs(uri: str, parent_id: str) -> list[dict[str, Any]]:
    """The runs whose mlflow.parentRunId is `parent_id`, oldest first, as `get_run` dicts."""
    mlflow_client = client(uri)
    experiment_id = mlflow_client.get_run(parent_id).info.experiment_id
    runs = _all_runs(mlflow_client, experiment_id, f"tags.mlflow.parentRunId = '{parent_id}'")
    return sorted((_run_dict(r) for r in runs), key=lambda r: r["start_time"] or 0)



def finished_child(uri: str, experiment_id: str, parent_id: str, tag: str, value: str):
    """A FINISHED direct child of `parent_id` whose `tag` equals `value`, or None."""
    runs = client(uri).search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.{tag} = '{value}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0] if runs else None


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client(uri).get_metric_history(run_id, key), key=lambda m: m.step)]
