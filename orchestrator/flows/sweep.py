"""Ray Tune sweeps over temperature, alpha, learning rate, student and teacher-assistant chain.

The driver resolves the teacher and its soft targets once; every trial is a Tune
function trainable that runs its chain stage by stage (memoized assistants, see
chains.py) and distils its student on Ray Train, reporting each epoch to Tune
through `TuneReportCallback` (tune_report.py) so ASHA can stop it early; the last epoch it reports
itself, once its test metrics and MLflow runs are written.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import ray.data
from ray import tune

from orchestrator.cluster.interrupts import fit_noticing_ctrl_c
from orchestrator.config import ConfigError, JobConfig, SearchDim, spec_of, with_values
from orchestrator.data.ray_objects import image_blocks
from orchestrator.flows.chain_runner import run_chain
from orchestrator.flows.chains import chain_label, stage_registry
from orchestrator.flows.finished import log_model, model_scores, put_test_split
from orchestrator.flows.job import Prepared, ray_logs_attached, start_job
from orchestrator.flows.stage_runs import resolve_teacher, soft_target_stage
from orchestrator.flows.stages import (
    SoftTargets,
    TeacherWeights,
    TrackingContext,
    distill_members,
    soft_target_blocks,
    student_member,
    student_rows,
)
from orchestrator.flows.tune_report import ReportAllButLastEpoch
from orchestrator.teachers.pool import teacher_forward_rows
from orchestrator.tracking import runs as tracking
from orchestrator.tracking.progress import progress_printer, verbose
from orchestrator.train.models import build_model, count_params

STATE_FILE = "kd_sweep.json"
SHORT_NAMES = {"temperature": "T", "alpha": "a", "lr": "lr", "student": "stud", "chain": "chain"}  # narrow trial table


def _dimension(dim: SearchDim) -> Any:
    if dim.grid is not None:
        return tune.grid_search(dim.grid)
    if dim.choice is not None:
        return tune.choice(dim.choice)
    if dim.uniform is not None:
        return tune.uniform(*dim.uniform)
    return tune.loguniform(*dim.loguniform)


def search_space(cfg: JobConfig) -> dict[str, Any]:
    """Tune's param_space. Chains are sampled by index: Optuna only takes choices of plain values."""
    space: dict[str, Any] = {}
    for name, dim in cfg.sweep.space.named().items():
        if name == "chain":
            indices = list(range(len(dim.values())))
            dim = SearchDim(grid=indices) if dim.grid is not None else SearchDim(choice=indices)
        space[name] = _dimension(dim)
    if cfg.sweep.seeds > 1:  # every sampled point again under each seed (students' init, order, views)
        space["seed"] = tune.grid_search([cfg.seed + i for i in range(cfg.sweep.seeds)])
    return space


def max_concurrent_trials(cfg: JobConfig, resources: dict[str, float] | None = None) -> int:
    """Trials that fit at once: each needs its workers' CPUs (and GPUs), beside a teacher actor pool that
    Ray Data must always be able to run (an assistant's soft targets are made inside a trial)."""
    if cfg.sweep.max_concurrent_trials:
        return cfg.sweep.max_concurrent_trials
    resources = ray.cluster_resources() if resources is None else resources
    train, st = cfg.train, cfg.soft_targets
    fits = [(resources.get("CPU", 1) - st.num_actors * st.num_cpus_per_actor) / (train.num_workers * train.cpus_per_worker)]
    if train.use_gpu:
        teacher_gpus_needed = st.num_actors * st.gpus_per_actor(True) if resources.get("GPU") else 0.0
        fits.append((resources.get("GPU", 0) - teacher_gpus_needed) / train.num_workers)  # one GPU per worker
    return max(1, int(min(fits)))


def trial_config(cfg: JobConfig, params: dict[str, Any]) -> JobConfig:
    """The job config a trial's final stage trains with: one student, the sampled hyperparameters."""
    if cfg.sweep is not None and cfg.sweep.space.paths:  # swept dotted paths first (students.N. refers to the job's list)
        cfg = with_values(cfg, {path: params[path] for path in cfg.sweep.space.paths if path in params})
    student = next((s for s in cfg.students if s.name == params.get("student")), cfg.students[0])
    kd = cfg.kd.model_copy(update={k: float(params[k]) for k in ("temperature", "alpha") if k in params})
    train = cfg.train.model_copy(update={"lr": float(params["lr"])} if "lr" in params else {})
    seed = int(params.get("seed", cfg.seed))
    # The teachers keep the job's seed, so every seed of a point learns from the same cached teacher.
    teachers = [t.model_copy(update={"seed": cfg.seed if t.seed is None else t.seed}).model_dump() for t in cfg.teachers]
    return JobConfig.model_validate({**cfg.model_dump(), "seed": seed, "teachers": teachers, "kd": kd.model_dump(), "train": train.model_dump(),
                                     "students": [student.model_dump()], "baseline": False})


@dataclass
class SweepContext:
    """What every trial needs, shipped once through the object store (tune.with_parameters): the dataset as
    references (`trial_context`), never its arrays."""

    prep: Prepared
    teachers: list[TeacherWeights]
    soft: SoftTargets
    sweep_run_id: str


def trial_context(prep: Prepared, teachers: list[TeacherWeights], soft: SoftTargets, sweep_run_id: str) -> SweepContext:
    """The trials' context: the object-store copies a trial reads (its students' train and validation rows, the
    test split it is scored on, and for chains the image blocks its assistants' soft-target passes read) are put
    here, once, and the dataset travels without its arrays (DatasetArrays.without_arrays). A trial on another node
    pulls the rows its workers train on, not the driver's whole dataset."""
    data = prep.data
    student_rows(data, prep.student_train_ids, prep.val_ids)  # what distill_members hands Ray Train in a trial
    put_test_split(data)
    if any(prep.cfg.sweep.chains()):
        image_blocks(data, soft_target_blocks(prep.cfg, data))
    return SweepContext(replace(prep, data=data.without_arrays()), teachers, soft, sweep_run_id)


def sweep_trial(params: dict[str, Any], ctx: SweepContext) -> None:
    """One Tune trial: its chain's assistants stage by stage, then its student, reported to Tune per epoch."""
    # Concurrent trials' ingest progress bars would interleave into noise; Tune's table is the progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    base = ctx.prep.cfg
    cfg = trial_config(base, params)
    chain = base.sweep.chains()[int(params.get("chain", 0))]
    student = cfg.students[0]
    uri, experiment_id = ctx.prep.tracking_uri, ctx.prep.experiment_id
    trial_id = tune.get_context().get_trial_id()
    if _replay_finished_trial(ctx, trial_id):
        return
    label = chain_label(chain)
    with tracking.run_scope(uri, experiment_id, f"trial:{trial_id}", parent_id=ctx.sweep_run_id,
                            tags={"role": "trial", "trial_id": trial_id, "chain": label, "student": student.name}) as trial_run:
        tracking.log_params(uri, trial_run, {**{k: v for k, v in params.items() if k != "chain"}, "chain": label, "student": student.name})
        track = TrackingContext(uri, experiment_id, trial_run)
        soft, lineage = ctx.soft, [t.run_id for t in ctx.teachers]
        soft, assistants = run_chain(base, ctx.prep, soft, chain, track, stage_registry(ctx.sweep_run_id))
        lineage += [a.run_id for a in assistants]
        with tracking.run_scope(uri, experiment_id, f"stage:{student.name}", parent_id=trial_run,
                                tags={"role": "student", "soft_target_fingerprint": soft.fingerprint, "lineage": ">".join(lineage)}) as stage_run:
            member = student_member(cfg, student, ctx.prep.data, soft, run_id=stage_run)
            # The T and alpha it trains with: sampled, else the job's, else auto_kd's for this stage's teacher.
            tracking.log_params(uri, trial_run, {k: v for k, v in member.kd.model_dump().items() if k not in params})
            states, last_epoch = distill_members(cfg, ctx.prep.data, ctx.prep.student_train_ids, ctx.prep.val_ids, soft, track, [member],
                                                 run_name=f"{base.name}-trial-{trial_id}", callbacks=[ReportAllButLastEpoch(cfg.train.epochs)],
                                                 teachers=ctx.teachers)  # run in the workers only with teacher_mode online
            model = build_model(spec_of(student), ctx.prep.data.input_shape, ctx.prep.data.num_classes)
            model.load_state_dict(states[student.name])
            # Scored in this trial's own actor (never the driver) on the test split's object-store copy, against the teachers' test logits.
            test_split = ray.get(put_test_split(ctx.prep.data))
            test = model_scores(model, test_split, ray.get(ctx.soft.test_columns), use_gpu=base.train.use_gpu, precision=base.train.precision)["metrics"]
            counted = {"params": count_params(model), "online_teacher_rows": last_epoch.get("online_teacher_rows", 0)}
            tracking.log_metrics(uri, stage_run, test | counted)
            tracking.log_metrics(uri, trial_run, test | counted)
            tracking.set_tags(uri, trial_run, {"final_stage_run_id": stage_run, "soft_target_fingerprints": soft.fingerprint, "lineage": ">".join(lineage)})
            if base.tracking.log_models:
                log_model(uri, stage_run, model, student, ctx.prep.data)
    tune.report(last_epoch | test)  # last: a STOP on it kills nothing left to do


def _replay_finished_trial(ctx: SweepContext, trial_id: str) -> bool:
    """A driver killed after a trial finished but before Tune saved that fact restarts the trial
    on --resume. Its MLflow run says it is done: report the recorded epochs to Tune instead of training again."""
    uri, metric = ctx.prep.tracking_uri, ctx.prep.cfg.sweep.metric
    done = tracking.finished_child(uri, ctx.prep.experiment_id, ctx.sweep_run_id, "trial_id", trial_id)
    if done is None or "final_stage_run_id" not in done.data.tags:
        return False
    for _, value in tracking.metric_history(uri, done.data.tags["final_stage_run_id"], metric):
        tune.report({metric: value, "replayed": 1})
    return True


def _scheduler(cfg: JobConfig):
    if cfg.sweep.scheduler == "fifo":
        return None
    # KD trials (high T above all) learn slowly at first and overtake later: a grace period shorter than
    # half the epochs lets ASHA stop exactly the trials that would have won.
    grace = cfg.sweep.grace_period if cfg.sweep.grace_period is not None else math.ceil(cfg.train.epochs / 2)
    return tune.schedulers.ASHAScheduler(max_t=cfg.train.epochs, grace_period=min(grace, cfg.train.epochs), time_attr="training_iteration")


def _search_alg(cfg: JobConfig):
    if cfg.sweep.search == "random":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=cfg.seed)


def build_tuner(cfg: JobConfig, ctx: SweepContext, *, storage: Path, resume: bool) -> tune.Tuner:
    # Ray 2.60's default console output ignores progress_reporter and prints every metric of
    # every trial; the classic reporter prints the compact table configured below.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Save the experiment state every few seconds, so a killed driver loses little on --resume.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, ctx=ctx), {"cpu": 0.01})
    path = storage / sweep_dir_name(cfg)
    if resume:
        return tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True, restart_errored=False)
    return tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(
            metric=cfg.sweep.metric, mode=cfg.sweep.mode, num_samples=cfg.sweep.num_samples,
            scheduler=_scheduler(cfg), search_alg=_search_alg(cfg), max_concurrent_trials=max_concurrent_trials(cfg),
            # Not reuse_actors: a trial ASHA stops keeps training in its actor's thread, Tune's reset of that actor
            # fails ("Could not re-use actor"), and the actor, its Ray Train run and its CPU stay: a digits sweep with
            # ASHA hung so on 2026-12-02. A new actor per trial costs its imports (about 5 s here) and never hangs.
        ),
        run_config=tune.RunConfig(
            name=sweep_dir_name(cfg), storage_path=str(storage),
            # 1: the trial table only; Tune's per-report "Result for <trial>" dumps come back with -v.
            verbose=3 if verbose() else 1,
            progress_reporter=tune.CLIReporter(
                metric_columns={cfg.sweep.metric: "val", "training_iteration": "ep"},
                parameter_columns={k: SHORT_NAMES.get(k, k) for k in search_space(cfg)},
                max_column_length=12, max_report_frequency=30, sort_by_metric=True,
            ),
        ),
    )


def sweep_dir_name(cfg: JobConfig) -> str:
    return f"{cfg.name}-sweep"


def _parent_run(prep: Prepared, state_path: Path, resume: bool) -> str:
    """The sweep's MLflow parent run; a resumed sweep continues the same one."""
    if resume and state_path.is_file():
        run_id = json.loads(state_path.read_text())["mlflow_run_id"]
        tracking.reopen_run(prep.tracking_uri, run_id)
        return run_id
    run_id = tracking.create_run(prep.tracking_uri, prep.experiment_id, sweep_dir_name(prep.cfg), tags={"job": "sweep"})
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps({"mlflow_run_id": run_id}))
    return run_id


def run_sweep(cfg: JobConfig, *, resume: bool = False, ray_address: str | None = None) -> dict[str, Any]:
    if cfg.sweep is None:
        raise ConfigError("sweep: this config has no sweep section")
    storage = Path(cfg.train.storage_path).resolve()
    state_path = storage / sweep_dir_name(cfg) / STATE_FILE
    if resume and not tune.Tuner.can_restore(str(storage / sweep_dir_name(cfg))):
        raise ConfigError(f"--resume: no sweep to resume at {storage / sweep_dir_name(cfg)}")
    prep = start_job(cfg, ray_address=ray_address, warm_teachers=True)  # its parent run is its own: a resumed sweep reopens the one it had
    uri = prep.tracking_uri
    rows_before = teacher_forward_rows("job")
    parent_id = _parent_run(prep, state_path, resume)
    try:
        # The sink prints the teacher's epochs (Tune's table is the trials' progress); the Ray logs are attached on the
        # way out, finished or failed.
        with ray_logs_attached(uri, parent_id), progress_printer() as sink:
            track = TrackingContext(uri, prep.experiment_id, parent_id)
            if not resume:
                tree = cfg.model_dump(mode="json")
                tracking.log_params(uri, parent_id, tracking.flatten(tree))
                tracking.log_dict(uri, parent_id, tree, "config.json")  # `distill report` rebuilds the config from it
            teachers = [resolve_teacher(cfg, i, prep.data, prep.train_ids, prep.val_ids, prep.given_teachers[i], track.with_progress(sink))
                        for i in range(len(cfg.teachers))]
            soft = soft_target_stage(cfg, teachers, prep.data, track)
            ctx = trial_context(prep, teachers, soft, parent_id)
            registry = stage_registry(parent_id)
            if resume:
                ray.get(registry.reset_running.remote())
                # A killed driver's trial and stage runs are still RUNNING: nothing runs them now (its actors died with
                # its job). Closed KILLED here, else the end of the sweep took them for trials ASHA stopped early.
                tracking.end_descendants(uri, prep.experiment_id, parent_id)
            results = fit_noticing_ctrl_c(build_tuner(cfg, ctx, storage=storage, resume=resume))
            from orchestrator.flows.sweep_report import finish_sweep

            stage_stats = ray.get(registry.stats.remote())
            summary = finish_sweep(cfg, prep, results, parent_id, teachers, soft, forward_rows=teacher_forward_rows("job") - rows_before, stage_stats=stage_stats)
            ray.kill(registry)
    except KeyboardInterrupt:
        tracking.end_descendants(uri, prep.experiment_id, parent_id)  # trials and stages Tune stopped mid-run
        tracking.end_run(uri, parent_id, "KILLED")
        raise
    except BaseException:
        tracking.end_run(uri, parent_id, "FAILED")
        raise
    tracking.end_run(uri, parent_id, "FINISHED")
    return summary





