"""Born-again self-distillation: generation k of a student teaches generation k + 1.

Reference: T. Furlanello, Z. C. Lipton, M. Tschannen, L. Itti, A. Anandkumar, "Born Again
Neural Networks", ICML 2018, arXiv:1805.04770.

A student with `generations: k` is first distilled from the job's teachers, with the other
students (generation 1). Then, k - 1 times, the last generation becomes the teacher: its
soft targets are computed and cached exactly as a teacher's (same actor pool, same
fingerprinted cache), and a fresh copy of the same architecture is distilled from them
with the same loss, as one stage of the chain runner (chain_runner.chain_stage: memoised, so
a rerun reuses the generations it already trained). The paper's set-up is a teacher of the
student's own architecture, trained on labels: give that model as `teachers[0]`. The ensemble
of generations the paper also reports (BAN-ensemble) is not built here.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import ray

from orchestrator.config import TeacherConfig, spec_of
from orchestrator.flows.chain_runner import chain_stage
from orchestrator.flows.chains import Stage, StageRegistry
from orchestrator.flows.stage_runs import soft_target_stage
from orchestrator.flows.stages import StudentsResult, TeacherWeights, TrackingContext
from orchestrator.tracking import runs as tracking
from orchestrator.train.models import state_dict_fingerprint


def later_generations(prep: Any, result: StudentsResult, track: TrackingContext, run_ids: dict[str, str]) -> StudentsResult:
    """Generations 2..k of every student that asks for them; returns `result` with their last generation's weights."""
    cfg, data = prep.cfg, prep.data
    state_dicts = dict(result.state_dicts)
    started = time.perf_counter()
    registry = StageRegistry.remote()
    try:
        for student in cfg.students:
            if student.generations == 1:
                continue
            first_run = run_ids.get(student.name, track.parent_id)
            student_track = track.child(first_run)
            as_teacher = TeacherConfig.model_validate({**spec_of(student).model_dump(), "name": f"{student.name}-gen1"})
            teacher = TeacherWeights(as_teacher, state_dicts[student.name], state_dict_fingerprint(state_dicts[student.name]), "generation", first_run, 0.0)
            soft, lineage = soft_target_stage(cfg, [teacher], data, student_track), []
            for generation in range(2, student.generations + 1):
                stage = Stage(f"{student.name}-gen{generation}", spec_of(student), loss=student.loss, role="generation")
                teacher, soft = chain_stage(cfg, prep, soft, stage, student_track, registry, run_name=f"generation:{student.name}:{generation}",
                                            tags={"role": "generation", "generation": generation, "teacher": teacher.config.name},
                                            teaches=generation < student.generations, parent_teachers=[teacher])
                lineage.append(teacher.run_id)
            state_dicts[student.name] = teacher.state_dict
            if student.name in run_ids:
                tracking.set_tags(track.uri, run_ids[student.name], {"generations": student.generations, "generation_run_ids": ",".join(lineage)})
    finally:
        ray.kill(registry)
    return replace(result, state_dicts=state_dicts, wall_s=result.wall_s + time.perf_counter() - started)
