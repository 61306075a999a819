"""One chain runner: "a model teaches the next" for `distill run` (`chain:`), sweep trials and born-again
generations (born_again.py): teacher -> assistant(s) -> students, student -> generation 2 -> ...

Each stage is distilled from the current soft targets like a student, then (unless it is the last)
teaches the next stage through its own cached soft targets. Stages are memoised in the weights cache
under chains.stage_key, and a StageRegistry actor lets one caller train a stage while others that need
it wait and reuse it.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from orchestrator.config import JobConfig, ModelSpec, StudentConfig
from orchestrator.flows.chains import Stage, assistant_as_teacher, assistant_stages, stage_key
from orchestrator.flows.stage_runs import soft_target_stage
from orchestrator.flows.stages import SoftTargets, TeacherWeights, TrackingContext, distill_members, student_member
from orchestrator.teachers.weights_cache import load_cached_weights, save_cached_weights, weights_file
from orchestrator.tracking import runs as tracking
from orchestrator.train.models import state_dict_fingerprint


def chain_stage(cfg: JobConfig, prep: Any, parent_soft: SoftTargets, stage: Stage, track: TrackingContext, registry: Any, *,
                run_name: str, tags: dict[str, Any], teaches: bool = True,
                parent_teachers: list[TeacherWeights] | None = None) -> tuple[TeacherWeights, SoftTargets | None]:
    """Train (or reuse) one stage under an MLflow run `run_name` (a child of track's parent); returns its weights
    and, if it `teaches`, its soft targets. `prep` is a pipeline.Prepared; `parent_teachers` run inside the
    workers with teacher_mode online."""
    key = stage_key(cfg, parent_soft.fingerprint, stage, prep.data.fingerprint("train"))
    path = weights_file(cfg.soft_targets.cache_dir, "stages", key)
    with tracking.run_scope(track.uri, track.experiment_id, run_name, parent_id=track.parent_id,
                            tags={**tags, "stage_key": key, "parent_soft_target_fingerprint": parent_soft.fingerprint}) as run_id:
        tracking.log_params(track.uri, run_id, tracking.flatten(stage.spec.model_dump(mode="json")))
        stage_track = track.child(run_id)
        started = time.perf_counter()
        while True:
            cached = load_cached_weights(path)
            if cached is not None:
                ray.get(registry.count_reuse.remote())
                # This job's stage run stands for it (as a cached teacher's run does); source_run_id leads to the training.
                weights = TeacherWeights(assistant_as_teacher(stage), cached["state_dict"], state_dict_fingerprint(cached["state_dict"]), "reused", run_id, 0.0)
                tracking.set_tags(track.uri, run_id, {"reused": True, "source_run_id": cached["run_id"]})
                return weights, soft_target_stage(cfg, [weights], prep.data, stage_track) if teaches else None
            if ray.get(registry.claim.remote(key)):
                break
            ray.get(registry.wait.remote(key))  # another caller is training it: wait, then reuse
        try:
            as_student = StudentConfig.model_validate({**stage.spec.model_dump(), "name": stage.name, "loss": stage.loss})
            member = student_member(cfg, as_student, prep.data, parent_soft, run_id=run_id).model_copy(update={"role": stage.role})
            states, _ = distill_members(cfg, prep.data, prep.student_train_ids, prep.val_ids, parent_soft, stage_track, [member],
                                        run_name=f"{cfg.name}-{stage.name}-{key[:12]}", teachers=parent_teachers)
            state_dict = states[stage.name]
            weights = TeacherWeights(assistant_as_teacher(stage), state_dict, state_dict_fingerprint(state_dict), "trained", run_id, time.perf_counter() - started)
            # Soft targets before publishing: a waiting caller then finds them cached, not re-run.
            soft = soft_target_stage(cfg, [weights], prep.data, stage_track) if teaches else None
            save_cached_weights(path, {"state_dict": state_dict, "run_id": run_id})
            tracking.set_tags(track.uri, run_id, {"reused": False})
        except BaseException:
            ray.get(registry.publish.remote(key, False))
            raise
        ray.get(registry.publish.remote(key, True))
        return weights, soft


def run_chain(cfg: JobConfig, prep: Any, soft: SoftTargets, assistants: list[ModelSpec], track: TrackingContext,
              registry: Any) -> tuple[SoftTargets, list[TeacherWeights]]:
    """Every assistant of the chain in order; returns the soft targets the students learn from and the assistants."""
    trained = []
    for stage in assistant_stages(assistants):
        weights, soft = chain_stage(cfg, prep, soft, stage, track, registry, run_name=f"stage:{stage.name}", tags={"role": "assistant"})
        trained.append(weights)
    return soft, trained
