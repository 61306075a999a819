"""Born-again self-distillation: generation k of a student teaches generation k + 1.

Reference: T. Furlanello, Z. C. Lipton, M. Tschannen, L. Itti, A. Anandkumar, "Born Again
Neural Networks", ICML 2018, arXiv:1805.04770.

A student with `generations: k` is first distilled from the job's teachers, with the other
students (generation 1). Then, k - 1 times, the last generation becomes the teacher: its
soft targets are computed and cached exactly as a teacher's (same actor pool, same
fingerprinted cache), and a fresh copy of the same architecture is distilled from them
with the same loss. The paper's set-up is a teacher of the student's own architecture,
trained on labels: give that model as `teachers[0]`. The ensemble of generations the
paper also reports (BAN-ensemble) is not built here.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from orchestrator.tracking import runs as tracking
from orchestrator.config import TeacherConfig, spec_of
from orchestrator.train.models import state_dict_fingerprint
from orchestrator.flows.stages import StudentsResult, TeacherWeights, TrackingContext, distill_members, soft_target_stage, student_member


def later_generations(prep: Any, result: StudentsResult, track: TrackingContext, run_ids: dict[str, str]) -> StudentsResult:
    """Generations 2..k of every student that asks for them; returns `result` with their last generation's weights."""
    cfg, data = prep.cfg, prep.data
    state_dicts = dict(result.state_dicts)
    started = time.perf_counter()
    for student in cfg.students:
        if student.generations == 1:
            continue
        state, lineage = state_dicts[student.name], [run_ids.get(student.name, "")]
        for generation in range(2, student.generations + 1):
            name = f"{student.name}-gen{generation - 1}"
            parent = run_ids.get(student.name, track.parent_id)
            with tracking.run_scope(track.uri, track.experiment_id, f"generation:{student.name}:{generation}", parent_id=parent,
                                    tags={"role": "generation", "generation": generation, "teacher": name}) as run_id:
                as_teacher = TeacherConfig.model_validate({**spec_of(student).model_dump(), "name": name})
                teacher = TeacherWeights(as_teacher, state, state_dict_fingerprint(state), "generation", lineage[-1], 0.0)
                gen_track = track.child(run_id)
                soft = soft_target_stage(cfg, [teacher], data, gen_track)
                member = student_member(cfg, student, data, soft, run_id=run_id)
                states, _ = distill_members(cfg, data, prep.student_train_ids, prep.val_ids, soft, gen_track, [member],
                                            run_name=f"{cfg.name}-{student.name}-gen{generation}-{run_id[:8]}", teachers=[teacher])
                state = states[student.name]
                lineage.append(run_id)
        state_dicts[student.name] = state
        if student.name in run_ids:
            tracking.set_tags(track.uri, run_ids[student.name], {"generations": student.generations, "generation_run_ids": ",".join(lineage[1:])})
    return replace(result, state_dicts=state_dicts, wall_s=result.wall_s + time.perf_counter() - started)
