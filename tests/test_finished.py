"""Scoring finished models off the driver (a Ray task, or the job's warm teacher actor): the same figures as in
this process, metrics (not logits) back."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from orchestrator.config import load_config
from orchestrator.data.datasets import load_arrays
from orchestrator.flows.finished import model_scores, put_test_split, score_models
from orchestrator.teachers.warm_pool import start_teacher_pool, warm_actor
from orchestrator.train.models import build_model

DIGITS = Path(__file__).resolve().parents[1] / "configs/digits_kd.yaml"


@pytest.mark.parametrize("where", ["task", "warm actor"])
def test_a_stage_scored_off_the_driver_matches_this_process_and_sends_back_no_logits(ray_session, where):
    cfg = load_config(DIGITS)
    data = load_arrays(cfg.dataset)
    spec = cfg.students[0]
    torch.manual_seed(0)
    model = build_model(spec, data.input_shape, data.num_classes)
    n_test = len(data.test.labels)
    teacher = {"teacher_logits": np.random.default_rng(0).normal(size=(n_test, 10)).astype(np.float16)}  # as the cache encodes them
    val = (data.train.images[:300], data.train.labels[:300])

    if where == "warm actor":  # as a job that makes soft targets has them (stages.start_teachers)
        start_teacher_pool(2, threads=1)
        assert warm_actor() is not None
    # Two members of one stage, one with its transfer-set bias corrected (class 3 left out), in one call.
    remote = score_models([(spec, model.state_dict(), "student"), (spec, model.state_dict(), "twin")], put_test_split(data), ray.put(teacher),
                          precision="fp32", excluded=[3], bias_val={"student": val}, warm=where == "warm actor")
    plain = model_scores(copy.deepcopy(model), data, teacher, use_gpu=False, precision="fp32", excluded=[3])
    corrected = model_scores(copy.deepcopy(model), data, teacher, use_gpu=False, precision="fp32", excluded=[3], bias_val=val)

    for got, want in ((remote[1], plain), (remote[0], corrected)):
        assert set(got) == {"metrics", "extra", "correct", "state_dict"}  # no logits come back
        assert got["correct"].shape == (n_test,) and got["correct"].dtype == bool
        np.testing.assert_array_equal(got["correct"], want["correct"])
        assert got["metrics"]["test_errors"] == want["metrics"]["test_errors"] == int((~want["correct"]).sum())
        assert got["metrics"] == pytest.approx(want["metrics"], rel=1e-5)  # another process, maybe other thread counts
        assert got["extra"] == pytest.approx(want["extra"])
    assert remote[1]["state_dict"] is None and set(plain["extra"]) == {"excluded_class_errors"}
    # The corrected weights come back: only the left-out class's output bias moved, by the chosen shift.
    moved = {k: (remote[0]["state_dict"][k] - v) for k, v in model.state_dict().items() if not torch.equal(remote[0]["state_dict"][k], v)}
    shift = corrected["extra"]["bias_shift"]
    assert shift > 0  # this seed's untrained model gains from it (0.25 here)
    (name, delta), = moved.items()
    assert name.endswith("bias") and delta[3] == pytest.approx(shift) and int((delta != 0).sum()) == 1
