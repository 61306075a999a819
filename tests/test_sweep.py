"""A real Tune sweep on digits, its driver killed while a trial trains and resumed, read back from MLflow."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
from mlflow.tracking import MlflowClient

from orchestrator.cluster.orphans import orphaned_groups
from orchestrator.config import load_config
from orchestrator.flows.sweep import search_space, trial_config
from orchestrator.teachers.pool import teacher_forward_rows

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(REPO_ROOT / "configs/digits_sweep.yaml")
# ASHA with its only rung at the last epoch says STOP to every trial's final report: each trial
# must still test its student and end its runs FINISHED.
FAST = ["train.epochs=3", "sweep.scheduler=asha", "sweep.grace_period=3",
        "sweep.max_concurrent_trials=1", "tracking.experiment=sweep-it"]
DIGITS_ROWS = 1797  # train + test: one teacher pass covers both
# Two trials of the same point (one-assistant chain, a dotted path drawn from one choice): the first trains the
# assistant, the second reuses it, and both must score the same.
TWO_CHAIN_TRIALS = ("sweep.space={temperature: {grid: [4.0]}, chain: {grid: [[{family: mlp, hidden: [48]}], [{family: mlp, hidden: [48]}]]}, "
                    "paths: {train.weight_decay: {choice: [1.0e-4]}}}")


def test_search_space_and_trial_config():
    cfg = load_config(CONFIG)
    space = search_space(cfg)
    assert space["temperature"] == {"grid_search": [2.0, 6.0]}
    assert space["chain"] == {"grid_search": [0, 1]}  # chains sampled by index
    trial = trial_config(cfg, {"temperature": 6.0, "alpha": 0.5, "lr": 0.01, "chain": 1})
    assert (trial.kd.temperature, trial.kd.alpha, trial.train.lr) == (6.0, 0.5, 0.01)
    assert trial.baseline is False and [s.name for s in trial.students] == ["mlp16"]
    assert cfg.kd.temperature == 4.0  # the base config is untouched


def test_any_students_field_is_swept_by_its_dotted_path():
    cfg = load_config(CONFIG, ["sweep.space.paths={train.weight_decay: {loguniform: [1.0e-5, 1.0e-3]}, students.0.hidden: {grid: [[8], [24]]}}"])
    space = search_space(cfg)
    assert space["students.0.hidden"] == {"grid_search": [[8], [24]]}
    assert space["train.weight_decay"].lower == 1e-5 and space["train.weight_decay"].upper == 1e-3
    assert {"temperature", "chain"} <= set(space)  # beside the short dimensions the config already sweeps
    trial = trial_config(cfg, {"train.weight_decay": 3e-4, "students.0.hidden": [24], "temperature": 2.0, "chain": 0})
    assert trial.train.weight_decay == 3e-4 and trial.students[0].hidden == [24] and trial.kd.temperature == 2.0
    assert cfg.train.weight_decay == 0.0 and cfg.students[0].hidden == [16]  # the base config is untouched


def test_seeds_repeat_every_point_against_one_teacher():
    cfg = load_config(CONFIG, ["seed=5", "sweep.seeds=3"])
    assert search_space(cfg)["seed"] == {"grid_search": [5, 6, 7]}
    trial = trial_config(cfg, {"temperature": 2.0, "seed": 7})
    assert trial.seed == 7 and trial.teachers[0].seed == 5  # the students' seed moves, the teacher's does not
    assert "seed" not in search_space(load_config(CONFIG))


def test_asha_grace_defaults_to_half_the_epochs():
    from orchestrator.flows.sweep import _scheduler

    def first_rung(*overrides: str) -> int:  # the epoch at which ASHA first compares trials: its grace period
        return min(milestone for milestone, _ in _scheduler(load_config(CONFIG, ["sweep.scheduler=asha", *overrides]))._brackets[0]._rungs)

    assert first_rung("train.epochs=9") == 5
    assert first_rung("train.epochs=9", "sweep.grace_period=2") == 2


def test_optuna_search_samples_the_configured_space():
    """configs/fashion_sweep.yaml searches with Optuna (TPE): it must be installed and draw inside the space."""
    from orchestrator.flows.sweep import _search_alg

    cfg = load_config(str(REPO_ROOT / "configs/fashion_sweep.yaml"))
    search = _search_alg(cfg)
    assert search.set_search_properties(cfg.sweep.metric, cfg.sweep.mode, search_space(cfg))
    drawn = [search.suggest(f"trial-{i}") for i in range(5)]
    assert all(1.0 <= d["temperature"] <= 16.0 and 0.3 <= d["alpha"] <= 0.95 and d["chain"] in (0, 1, 2) for d in drawn)
    assert len({d["temperature"] for d in drawn}) == 5


def test_trials_get_the_datasets_references_not_its_arrays(ray_session, mlflow_uri):
    """trial_context: what a trial reads is put once, in the driver, and the dataset travels without its arrays.
    A trial that reached for a pixel would raise LookupError: the sweeps below run whole trials on it."""
    import ray.cloudpickle

    from orchestrator.data.datasets import LeftBehind
    from orchestrator.data.ray_objects import image_blocks, rows_dataset
    from orchestrator.flows.finished import put_test_split
    from orchestrator.flows.job import prepare
    from orchestrator.flows.stages import soft_target_blocks
    from orchestrator.flows.sweep import SweepContext, trial_context

    prep = prepare(load_config(CONFIG, [TWO_CHAIN_TRIALS]))  # chains: their assistants' teacher passes read image blocks too
    ctx = trial_context(prep, [], None, "sweep-run")
    data = ctx.prep.data
    assert isinstance(data.train.images, LeftBehind) and isinstance(data.test.labels, LeftBehind)
    assert (len(data.train.labels), data.input_shape, data.fingerprint("train")) == (len(prep.data.train.labels), prep.data.input_shape, prep.data.fingerprint("train"))
    # The copies the trial finds are the driver's, made before it shipped.
    assert rows_dataset(data, prep.student_train_ids) is rows_dataset(prep.data, prep.student_train_ids)
    assert rows_dataset(data, prep.val_ids) is rows_dataset(prep.data, prep.val_ids)
    assert put_test_split(data) is put_test_split(prep.data)
    blocks = soft_target_blocks(prep.cfg, prep.data)
    assert image_blocks(data, blocks) is image_blocks(prep.data, blocks)
    images = prep.data.train.images.nbytes + prep.data.test.images.nbytes
    assert len(ray.cloudpickle.dumps(ctx)) <= len(ray.cloudpickle.dumps(SweepContext(prep, [], None, "sweep-run"))) - images


def test_a_trial_run_again_after_an_interruption_is_its_finished_run_in_the_table(mlflow_uri):
    """A trial that Ctrl-C cut short runs again on --resume under a new MLflow run: the table (and so trials.csv
    and the champion's choice) takes its FINISHED run, not the KILLED one. Real runs in a real SQLite store."""
    from types import SimpleNamespace

    from orchestrator.flows.sweep_report import trial_table
    from orchestrator.tracking import runs as tracking

    cfg = load_config(CONFIG)
    experiment_id = tracking.ensure_experiment(mlflow_uri, "table")
    parent = tracking.create_run(mlflow_uri, experiment_id, "sweep")
    finished = None
    for status in ("KILLED", "FINISHED", "KILLED"):  # cut short, run again to the end, and a stray later attempt
        run = tracking.create_run(mlflow_uri, experiment_id, "trial:t1", parent_id=parent, tags={"role": "trial", "trial_id": "t1"})
        tracking.log_params(mlflow_uri, run, {"chain": "direct", "student": "mlp16", "temperature": 2.0, "alpha": 0.5})
        if status == "FINISHED":
            tracking.log_metrics(mlflow_uri, run, {"test_accuracy": 0.9})
            finished = run
        tracking.end_run(mlflow_uri, run, status)
    prep = SimpleNamespace(tracking_uri=mlflow_uri, experiment_id=experiment_id)
    table = trial_table(cfg, prep, [SimpleNamespace(metrics={"trial_id": "t1", "training_iteration": 3, cfg.sweep.metric: 0.8})], parent)
    assert table["mlflow_run_id"].tolist() == [finished] and table["test_accuracy"].tolist() == [0.9]


def test_trials_asha_stopped_end_killed_and_tagged_whatever_the_stop_left(mlflow_uri):
    """ASHA's stop reaches a trial as a SystemExit at a report (run_scope ends its runs KILLED), inside its Ray Train
    run (they ended FAILED: 2 of 6 stopped trials in a digits ASHA sweep), or by its actor's end (left RUNNING).
    Tune's results say which trials it stopped: their latest runs end KILLED, tagged stopped_early; a trial that
    failed stays FAILED, and an earlier attempt a killed driver left (closed KILLED by --resume) stays untagged."""
    from types import SimpleNamespace

    from orchestrator.flows.sweep_report import close_stopped_trials, stopped_trial_ids
    from orchestrator.tracking import runs as tracking

    experiment_id = tracking.ensure_experiment(mlflow_uri, "stops")
    parent = tracking.create_run(mlflow_uri, experiment_id, "sweep")
    # trial id -> how its run and its stage run ended; "failed-in-train" has an earlier attempt, killed with its driver.
    ends = {"failed-in-train": ["KILLED", "FAILED"], "actor-killed": [None], "stopped-at-report": ["KILLED"], "finished": ["FINISHED"],
            "errored": ["FAILED"]}
    attempts: dict[str, list[tuple[str, str]]] = {}
    for trial_id, statuses in ends.items():
        for status in statuses:
            trial_run = tracking.create_run(mlflow_uri, experiment_id, f"trial:{trial_id}", parent_id=parent, tags={"role": "trial", "trial_id": trial_id})
            stage_run = tracking.create_run(mlflow_uri, experiment_id, "stage:mlp16", parent_id=trial_run)
            for run in (stage_run, trial_run):
                if status:
                    tracking.end_run(mlflow_uri, run, status)
            attempts.setdefault(trial_id, []).append((trial_run, stage_run))
            time.sleep(0.01)  # distinct start times: the latest attempt is the last created
    result = lambda trial_id, epochs, error=None: SimpleNamespace(metrics={"trial_id": trial_id, "training_iteration": epochs}, error=error)
    results = [result("failed-in-train", 1), result("actor-killed", 1), result("stopped-at-report", 2), result("finished", 4),
               result("errored", 2, RuntimeError())]
    stopped = stopped_trial_ids(results, 4)
    assert stopped == {"failed-in-train", "actor-killed", "stopped-at-report"}
    assert close_stopped_trials(SimpleNamespace(tracking_uri=mlflow_uri, experiment_id=experiment_id), parent, stopped) == 3
    client = MlflowClient(mlflow_uri)
    want = {"failed-in-train": [("KILLED", None), ("KILLED", "True")], "actor-killed": [("KILLED", "True")],
            "stopped-at-report": [("KILLED", "True")], "finished": [("FINISHED", None)], "errored": [("FAILED", None)]}
    for trial_id, expected in want.items():
        for (trial_run, stage_run), (status, tag) in zip(attempts[trial_id], expected, strict=True):
            for run_id in (trial_run, stage_run):
                run = client.get_run(run_id)
                assert (run.info.status, run.data.tags.get("stopped_early")) == (status, tag), trial_id


def _sweep(args: list[str], workdir: Path, address: str, teacher: Path) -> subprocess.Popen:
    """A sweep driver process; its teacher from `teacher` (conftest's digits_teacher): the sweep is under test, not the teacher."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}")
    log = open(workdir / f"sweep-{len(list(workdir.glob('sweep-*.log')))}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "sweep", CONFIG, *FAST, f"teachers.0.checkpoint={teacher}", *args, "--address", address],
                            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)


def _count(db: Path, where: str, *args) -> int:
    """Runs in the sweep's SQLite store matching `where` (over runs r and their tags t)."""
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute(f"select count(distinct r.run_uuid) from runs r join tags t on t.run_uuid = r.run_uuid where {where}", args).fetchone()[0]
        except sqlite3.OperationalError:  # tables not created yet
            return 0


def _finished_trials(db: Path) -> int:
    return _count(db, "t.key = 'role' and t.value = 'trial' and r.status = 'FINISHED'")


def _student_stages_running_since(db: Path, since_ms: float) -> int:
    return _count(db, "r.name = 'stage:mlp16' and r.status = 'RUNNING' and r.start_time > ?", since_ms)


def _wait_until(proc: subprocess.Popen, workdir: Path, reached, what: str) -> None:
    deadline = time.monotonic() + 480
    while not reached():
        assert proc.poll() is None, sorted(workdir.glob("sweep-*.log"))[-1].read_text()[-3000:]
        assert time.monotonic() < deadline, f"{what} did not happen in time"
        time.sleep(0.5)


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_sweep_killed_mid_trial_and_resumed(ray_session, tmp_path, digits_teacher, new_mlflow_store):
    """The driver SIGKILLed (no cleanup runs in it) while the second trial trains its student, the first trial
    finished; then resumed. Ctrl-C to a sweep is tests/test_faults.py's (Tune's graceful stop, runs KILLED)."""
    new_mlflow_store(tmp_path)  # the drivers below find it
    address = ray.get_runtime_context().gcs_address
    rows_before = teacher_forward_rows()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    db = tmp_path / "mlflow.db"

    first = _sweep([TWO_CHAIN_TRIALS], tmp_path, address, digits_teacher)
    # max_concurrent_trials=1: a student stage running once a trial has finished is the second trial's.
    _wait_until(first, tmp_path, lambda: _finished_trials(db) >= 1 and _student_stages_running_since(db, 0) >= 1,
                "the second trial's student stage")
    first.kill()
    first.wait()
    killed_at = time.time() * 1000

    # Resumed: runs to the end. Whatever the killed driver left (RUNNING runs, a placement group its Ray Train run
    # reserved: docs/design.md) is closed or freed as the driver joins.
    second = _sweep([TWO_CHAIN_TRIALS, "--resume"], tmp_path, address, digits_teacher)
    assert second.wait(timeout=600) == 0, (tmp_path / "sweep-1.log").read_text()[-3000:]
    # Both drivers' jobs have ended and left no group reserved.
    deadline = time.monotonic() + 30
    while (left := [g.placement_group_id for g in orphaned_groups(address)]) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, left
    experiment = client.get_experiment_by_name("sweep-it")

    runs = client.search_runs([experiment.experiment_id], max_results=500)
    parents = [r for r in runs if r.data.tags.get("job") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the resumed driver continued the same parent run
    parent = parents[0]

    trials = [r for r in runs if r.data.tags.get("role") == "trial"]
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert sorted({r.data.tags["trial_id"] for r in finished}) == sorted(r.data.tags["trial_id"] for r in finished)
    assert len(finished) == 2
    assert all(0.3 < r.data.metrics["test_accuracy"] <= 1 for r in finished)  # 3 epochs of a KD student; chance is 0.1
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
    assert {r.data.params["train.weight_decay"] for r in finished} == {"0.0001"}  # the swept dotted path, as sampled
    # The same point, run by the killed driver and again by the resumed one: the same result (seeds, data order,
    # the cached assistant's soft targets), in new processes.
    assert len({r.data.metrics["test_accuracy"] for r in finished}) == 1
    # The trial that finished before the kill was not run again by the resumed driver.
    done_before_kill = [r for r in finished if r.info.end_time < killed_at]
    assert len(done_before_kill) == 1
    first_trial = done_before_kill[0].data.tags["trial_id"]
    assert sum(r.data.tags["trial_id"] == first_trial for r in trials) == 1
    # The trial the kill cut short ran again under a new run: the killed attempt closed KILLED (with its stage runs),
    # not counted as a trial ASHA stopped early; nothing left RUNNING.
    cut_short = [r for r in trials if r.data.tags["trial_id"] != first_trial and r.info.start_time < killed_at]
    assert [r.info.status for r in cut_short] == ["KILLED"] and "stopped_early" not in cut_short[0].data.tags
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert client.get_run(parent.info.run_id).data.metrics["trials_stopped_early"] == 0

    # Stage runs nest under their trial: the assistant's and the student's.
    by_parent: dict[str, list] = {}
    for run in runs:
        by_parent.setdefault(run.data.tags.get("mlflow.parentRunId"), []).append(run)
    for trial in finished:
        assert {r.info.run_name for r in by_parent[trial.info.run_id]} == {"stage:mlp16", "stage:assistant1"}

    # No repeated work: the teacher ran once and the assistant once (each over train + test), and every
    # later attempt of the second trial reused the assistant instead of training it again.
    assert teacher_forward_rows() - rows_before == 2 * DIGITS_ROWS
    metrics = client.get_run(parent.info.run_id).data.metrics
    assert metrics["trials"] == 2
    assert metrics["stages_trained"] == 1 and metrics["stage_reuses"] >= 1
    assistant_runs = [r for r in runs if r.info.run_name == "stage:assistant1" and r.info.status == "FINISHED"]
    trained = [r for r in assistant_runs if r.data.tags["reused"] == "False"]
    reused = [r for r in assistant_runs if r.data.tags["reused"] == "True"]
    assert len(trained) == 1 and trained[0].info.end_time < killed_at and len(reused) >= 2  # at least the killed attempt and the last
    # Lineage to the run that trained it (in the first driver).
    assert {r.data.tags["source_run_id"] for r in reused} == {trained[0].info.run_id}

    # Artifacts and the champion.
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)} | {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"trials.csv", "plots/direct_vs_chain.png", "plots/accuracy_vs_params.png"} <= artifacts
    trials_csv = pd.read_csv(client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path)))
    assert len(trials_csv) == 2 and set(trials_csv["train.weight_decay"]) == {1e-4}
    assert set(trials_csv["mlflow_run_id"]) == {r.info.run_id for r in finished} and trials_csv["test_accuracy"].notna().all()
    champion = client.get_model_version_by_alias("digits_sweep-student", "champion")
    assert champion.tags["sweep_run_id"] == parent.info.run_id
    assert champion.tags["trial_id"] == parent.data.tags["champion_trial"]

    # `distill report` on the sweep: teacher plus every finished trial's final student, fp32 and
    # int8, measured; the accuracy-vs-latency/size plot with Pareto fronts logged to the sweep run.
    from orchestrator.compress.compress_report import run_report

    report = run_report(parent.info.run_id, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", export=False)
    trial_rows = [r for r in report["rows"] if r["role"] == "trial"]
    assert [r["role"] for r in report["rows"]].count("teacher") == 1
    assert sorted(r["precision"] for r in trial_rows) == ["fp32"] * 2 + ["int8"] * 2
    by_trial = {r.data.tags["final_stage_run_id"]: r for r in finished}
    for row in trial_rows:
        assert row["latency_ms_b1"] > 0 and row["size_mb_disk"] > 0
        if row["precision"] == "fp32":  # measured again on the test set: the trial's own logged figure
            assert row["test_accuracy"] == pytest.approx(by_trial[row["mlflow_run_id"]].data.metrics["test_accuracy"], abs=1e-6)
    assert any(r["pareto_latency"] for r in report["rows"]) and any(r["pareto_size"] for r in report["rows"])
    assert {"report.json", "tradeoff.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_online_sweep_runs_the_teacher_in_every_trial_and_counts_it(ray_session, tmp_path, monkeypatch, mlflow_uri, capfd, digits_teacher):
    """teacher_mode online: the naive sweep bench_sweep.py compares against. Every trial runs the
    teacher on every train row of every epoch, and the parent run's teacher_forward_rows says so.
    In this process (the driver's own start-up is test_sweep_killed_mid_trial_and_resumed's subject)."""
    from orchestrator.data.datasets import split_train_val
    from orchestrator.flows.sweep import run_sweep

    monkeypatch.chdir(tmp_path)  # the cache and Tune's storage are relative to where a user runs the job
    online = ["teacher_mode=online", "sweep.space={temperature: {grid: [2.0]}, chain: {grid: [[]]}}", "train.epochs=2", "sweep.grace_period=2",
              "tracking.experiment=sweep-online"]  # one trial: the count, not the search, is under test
    run_sweep(load_config(CONFIG, [*FAST, f"teachers.0.checkpoint={digits_teacher}", *online]))
    console = capfd.readouterr().out
    assert "Number of trials: 1/1" in console and "Result for sweep_trial" not in console  # Tune's table, not its per-report dumps

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweep-online").experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("job") == "sweep")
    assert parent.data.params["teacher_mode"] == "online"
    trials = [r for r in runs if r.data.tags.get("role") == "trial"]
    assert len(trials) == 1 and all(r.info.status == "FINISHED" and r.data.metrics["test_accuracy"] > 0.3 for r in trials)  # 2 epochs; chance is 0.1
    train_rows = len(split_train_val(1437, 0.15, 0)[0])  # digits: 1,797 rows less the fixed 20% test split
    # One soft-target pass (validation and test metrics still read the cache), then 1 trial x 2 epochs in the worker.
    assert parent.data.metrics["teacher_forward_rows"] == DIGITS_ROWS + train_rows * 2
    assert parent.data.metrics["naive_teacher_forward_rows"] == train_rows * 2

