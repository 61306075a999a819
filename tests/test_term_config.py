"""students[].loss as a string or as weighted terms, teacher_mode and the augmentation policy: one-line errors before Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import ConfigError, load_config, validate_config
from orchestrator.losses.terms import AT, RKD, TEACHER_LOGITS, FitNet, describe_loss, loss_needs, needs_online_teacher, uses_kd_section

REPO_ROOT = Path(__file__).resolve().parents[1]
DIGITS = REPO_ROOT / "configs/digits_kd.yaml"


def _load(*overrides: str):
    return load_config(DIGITS, list(overrides))


def test_string_form_unchanged_and_list_form_parsed():
    cfg = _load()
    assert cfg.students[0].loss == "kd" and cfg.teacher_mode == "cached" and cfg.students[0].generations == 1
    cfg = _load("students.0.loss=[{name: ce, weight: 0.1}, {name: kd, weight: 0.9}]", "students.1.loss=dkd")
    terms = cfg.students[0].loss
    assert [(t.name, t.weight) for t in terms] == [("ce", 0.1), ("kd", 0.9)] and cfg.students[1].loss == "dkd"
    assert describe_loss(terms) == "0.1*ce+0.9*kd" and uses_kd_section(terms)  # kd at kd.temperature
    own = _load("students.0.loss=[{name: ce, weight: 0.1}, {name: kd, weight: 0.9, temperature: 2.5}]").students[0].loss
    assert describe_loss(own) == "0.1*ce+0.9*kd@T2.5" and not uses_kd_section(own)
    assert uses_kd_section("kd") and not uses_kd_section("ce")
    # A dumped config (every term field written out) validates again to the same thing: workers rebuild it so.
    assert validate_config(cfg.model_dump(mode="json")) == cfg
    assert _load("students.0.loss=[ce, dml]", "students.1.loss=[ce, dml]").students[1].loss[1].name == "dml"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["students.0.loss=[{name: kdd}]"], "students.0.loss: term 0: unknown term 'kdd' (known: ce, kd, dkd, fitnet, at, rkd, dml)"),
        (["students.0.loss=[ce, {name: kd, bogus: 1}]"], "students.0.loss: term 1: kd does not take 'bogus' (it takes standardize, temperature)"),
        (["students.0.loss=[{name: at, layers: {a: b}, temperature: 2}]"], "students.0.loss: term 0: at does not take 'temperature' (it takes layers, p)"),
        (["students.0.loss=[{weight: 1}]"], "students.0.loss: term 0: needs a name (one of ce, kd, dkd, fitnet, at, rkd, dml)"),
        (["students.0.loss=[{name: ce, temperature: 2}]"], "students.0.loss: term 0: ce does not take 'temperature' (it takes nothing but weight)"),
        (["students.0.loss=[{name: kd, layers: {a: b}}]"], "students.0.loss: term 0: kd does not take 'layers' (it takes standardize, temperature)"),
        (["students.0.loss=[{name: kd, weight: -1}]"], "students.0.loss: term 0 weight: Input should be greater than or equal to 0"),
        (["students.0.loss=[ce, ce]"], "students.0.loss: each term at most once, got ['ce', 'ce']"),
        (["students.0.loss=[]"], "students.0.loss: must be a loss name (ce, kd, dkd, ...) or a non-empty list of {name, weight, ...} terms"),
        (["students.0.loss=[{name: at}]"], "students.0.loss: term 0: at needs layers: {student_module: teacher_module}"),
        (["students.0.loss=[{name: rkd, layers: {a: b, c: d}}]"], "students.0.loss: term 0: rkd takes one layer pair (or none: on the logits)"),
        (["students.0.loss=[ce, {name: fitnet, layers: {fc1: features.relu2}}]"],
         "students.0.loss.1: fitnet needs the teacher's features for the student's own input; set teacher_mode: online"),
        (["students.0.loss=[{name: kd, standardize: true}]", "soft_targets.encoding=topk"],
         "students.0.loss.0: standardize needs every teacher logit; soft_targets.encoding topk drops them (use fp16 or fp32)"),
        (["students.0.loss=[ce, dml]"], "students: dml needs two or more students with a dml term, only 'mlp32' has one"),
        (["students.0.generations=0"], "students.0.generations: Input should be greater than or equal to 1"),
        (["teacher_mode=live"], "teacher_mode: Input should be 'cached' or 'online'"),
        (["train.input_jitter=1"], "train.input_jitter: students train on views; set views.max_shift"),
        (["train.flip=true", "teacher_mode=online"], "train.flip: students train on views; set views.max_shift (and views.flip)"),
        (["transfer.labels=false", "students.0.loss=ce"], "students.0.loss: ce reads labels, and transfer.labels is false"),
        (["transfer.labels=false", "students.0.loss=kd", "students.1.loss=[{name: dkd}]"], "students.1.loss: dkd reads labels"),
        (["views.max_shift=1", "views.num_views=10"], "views: num_views: 10 is more than the 9 views max_shift=1, flip=False define"),
        (["views.fill=300"], "views: fill: must be a uint8 value in [0, 255] or auto, got 300"),
        (["transfer.exclude_classes=[3, 3]"], "transfer.exclude_classes: must be distinct class indices >= 0"),
    ],
)
def test_bad_terms_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        _load(*overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_augmentation_policy():
    # Students augment through views, which the cache holds per view: a shift of their own is refused
    # above, whatever their loss; teachers keep their own random shifts and flips.
    cfg = _load("views.max_shift=2", "views.flip=true", "teachers.0.train.input_jitter=2", "teachers.0.train.flip=true")
    assert (cfg.views.max_shift, cfg.views.flip, cfg.teachers[0].train.input_jitter, cfg.teachers[0].train.flip) == (2, True, 2, True)
    assert _load("transfer.labels=false", "students.0.loss=kd", "students.1.loss=[{name: kd}]").transfer.labels is False


def test_term_predicates():
    fit = FitNet(layers={"a": "b"})
    assert needs_online_teacher([fit]) and TEACHER_LOGITS not in loss_needs([fit]) and fit.layer_pairs() == [("a", "b")]
    assert TEACHER_LOGITS in loss_needs([RKD()]) and not needs_online_teacher([RKD()]) and RKD().layer_pairs() == []
    assert needs_online_teacher([RKD(layers={"a": "b"})]) and needs_online_teacher([AT(layers={"c": "d"})])
    assert TEACHER_LOGITS in loss_needs("dkd") and TEACHER_LOGITS not in loss_needs("ce")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["teacher_mode=online"], r"sweep.space.chain.1: teacher_mode online runs the teacher in every trial, which is built for direct KD only"),
        (["students=[{name: mlp16, loss: [ce, dml]}, {name: peer, loss: [ce, dml]}]"], "students.0.loss: dml needs peers trained together"),
        (["students.0.generations=2"], "students.0.generations: born-again generations are not supported in sweeps yet"),
    ],
)
def test_sweeps_refuse_what_a_single_student_trial_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_config(REPO_ROOT / "configs/digits_sweep.yaml", list(overrides))
    # Term lists themselves are fine in a sweep.
    assert load_config(REPO_ROOT / "configs/digits_sweep.yaml", ["students.0.loss=[ce, {name: dkd, standardize: true}]"]).sweep is not None
