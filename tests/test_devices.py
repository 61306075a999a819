"""The GPU path. On this CPU machine: code that builds tensors where its data lives, checked on PyTorch's
`meta` device (an operation that mixes a meta tensor with a CPU tensor fails as a CPU-CUDA mix would).
On a machine with CUDA: the three crash paths found by reading the code, the teacher actor against its
CPU result, and a short `distill run` with train.use_gpu=true (skipped here, with the reason)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.config import ModelSpec, TrainConfig, load_config
from orchestrator.data.views import ViewPolicy, epoch_views, views_of
from orchestrator.teachers.online import OnlineTeacher, feature_shapes
from orchestrator.teachers.pool import ensemble_logits
from orchestrator.teachers.soft_targets import decode_logits
from orchestrator.train.models import build_model
from orchestrator.train.precision import autocast_dtype, grad_scaler, resolved_name
from orchestrator.train.train_loop import LoopConfig, cached_teacher_logits

REPO_ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine: run on a GPU machine (benchmarks/gpu_check.py)")
SHAPE = (1, 8, 8)
CNN = ModelSpec(family="cnn", channels=[4, 8], hidden=[16])


def _loop(encoding: str = "fp16") -> LoopConfig:
    return LoopConfig(stage="t", members=[], optim=TrainConfig(), input_shape=SHAPE, num_classes=10, mean=(0.5,), std=(0.25,),
                      encoding=encoding, seed=0, train_rows=4)


# ------------------------------------------------------------------ device-mixing checks on the CPU (meta)

def test_cached_teacher_logits_stay_on_the_batch_device():
    batch = {"teacher_logits": torch.zeros(4, 3, 10, dtype=torch.float16, device="meta")}
    views = torch.zeros(4, dtype=torch.int64, device="meta")
    assert cached_teacher_logits(batch, _loop(), views).device.type == "meta"
    top = {"teacher_topk_values": torch.zeros(4, 3, 2, device="meta"), "teacher_topk_indices": torch.zeros(4, 3, 2, dtype=torch.int16, device="meta")}
    assert cached_teacher_logits(top, _loop("topk"), None).device.type == "meta"  # no host read of the indices off the CPU


def test_views_and_epoch_draws_are_built_on_the_images_device():
    images = torch.zeros(4, *SHAPE, dtype=torch.uint8, device="meta")
    ids = torch.arange(4, device="meta")
    views = epoch_views(0, 3, ids, 9)
    assert views.device.type == "meta"
    assert views_of(images, ids, views, ViewPolicy(max_shift=1, flip=True)).device.type == "meta"


def test_online_teacher_probes_shapes_on_its_own_device():
    model = build_model(CNN, SHAPE, 10).to("meta")
    seen = []
    model.register_forward_pre_hook(lambda _module, inputs: seen.append(inputs[0].device.type))
    shapes = feature_shapes(model, ["features.relu1"], SHAPE)
    assert seen == ["meta"]  # the probe is made on the model's device (CPU zeros into a CUDA model was crash 3)
    assert shapes == {"features.relu1": (4, 8, 8)}  # before its pooling


def test_ensemble_weights_follow_the_logits():
    logits = [torch.zeros(3, 10, device="meta"), torch.zeros(3, 10, device="meta")]
    for rule in ("logits", "probs"):
        assert ensemble_logits(logits, [2.0, 1.0], rule=rule).device.type == "meta"
    top = decode_logits({"teacher_topk_values": torch.zeros(2, 3, device="meta"),
                         "teacher_topk_indices": torch.zeros(2, 3, dtype=torch.int64, device="meta")}, num_classes=10)
    assert top.device.type == "meta"


def test_precision_resolution():
    assert autocast_dtype("auto", "cpu") is None and resolved_name("auto", "cpu") == "fp32"
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16 and autocast_dtype("fp32", "cuda") is None
    assert grad_scaler("fp16", "cpu") is None  # scaling is for fp16 gradients on a GPU
    with pytest.raises(ValueError):
        autocast_dtype("fp8", "cpu")


def test_sweep_concurrency_counts_workers_gpus_and_the_teacher_pool():
    from orchestrator.flows.sweep import max_concurrent_trials

    base = str(REPO_ROOT / "configs/digits_sweep.yaml")
    gpu = load_config(base, ["train.use_gpu=true", "train.num_workers=2", "train.cpus_per_worker=1"])
    # 8 GPUs: 2 teacher actors x 0.25 GPU leave 7.5, and each trial's 2 workers take a GPU each: 3 trials.
    assert max_concurrent_trials(gpu, {"CPU": 64, "GPU": 8}) == 3
    # CPUs bind first when they are short: (16 - 2 actor CPUs) / 2 worker CPUs = 7, GPUs allow 3.
    assert max_concurrent_trials(gpu, {"CPU": 16, "GPU": 8}) == 3
    assert max_concurrent_trials(gpu, {"CPU": 6, "GPU": 8}) == 2
    cpu = load_config(base, ["train.num_workers=1", "train.cpus_per_worker=2"])
    assert max_concurrent_trials(cpu, {"CPU": 10}) == 4  # (10 - 2) / 2


def test_teacher_actors_take_a_gpu_fraction_when_students_train_on_gpus():
    cfg = load_config(str(REPO_ROOT / "configs/digits_kd.yaml"), ["train.use_gpu=true"])
    assert cfg.soft_targets.gpus_per_actor(cfg.train.use_gpu) == 0.25
    assert load_config(str(REPO_ROOT / "configs/digits_kd.yaml")).soft_targets.gpus_per_actor(False) == 0.0
    pinned = load_config(str(REPO_ROOT / "configs/digits_kd.yaml"), ["train.use_gpu=true", "soft_targets.num_gpus_per_actor=0"])
    assert pinned.soft_targets.gpus_per_actor(True) == 0.0


# ------------------------------------------------------------------ on a CUDA device

@needs_cuda
def test_cuda_validation_with_cuda_batches():
    """Crash 1: validation logits on the CPU against labels and teacher logits left on CUDA."""
    from orchestrator.train.evaluate import classification_metrics

    logits = torch.randn(6, 10)
    metrics = classification_metrics(logits, torch.arange(6, device="cuda") % 10, torch.randn(6, 10, device="cuda"))
    assert 0 <= metrics["accuracy"] <= 1


@needs_cuda
def test_cuda_views_and_teacher_augmentation():
    """Crash 2: the input jitter built its sampling grid on the CPU for CUDA images."""
    from orchestrator.data.views import random_views

    images = torch.randint(0, 255, (16, *SHAPE), dtype=torch.uint8, device="cuda")
    out = random_views(images, ViewPolicy(max_shift=2, flip=True), torch.Generator().manual_seed(0))
    assert out.device.type == "cuda" and out.shape == images.shape
    ids = torch.arange(16, device="cuda")
    cpu = views_of(images.cpu(), ids.cpu(), (ids % 9).cpu(), ViewPolicy(max_shift=1))
    assert torch.equal(views_of(images, ids, ids % 9, ViewPolicy(max_shift=1)).cpu(), cpu)


@needs_cuda
def test_cuda_online_teacher_with_feature_terms():
    """Crash 3: the online teacher probed feature shapes with CPU zeros on a CUDA model."""
    state = build_model(CNN, SHAPE, 10).state_dict()
    teacher = OnlineTeacher([{"name": "t", "spec": CNN.model_dump(), "weight": 1.0}], [state], input_shape=SHAPE, num_classes=10,
                            ensemble="logits", layers=["features.relu1"], device=torch.device("cuda"))
    logits, features = teacher(torch.randn(3, *SHAPE, device="cuda"))
    assert logits.device.type == "cuda" and features["features.relu1"].shape == (3, 4, 8, 8)


@needs_cuda
def test_cuda_teacher_actor_matches_its_cpu_result():
    from orchestrator.teachers.pool import TeacherPredictor

    torch.manual_seed(0)
    model = build_model(CNN, SHAPE, 10).eval()
    kwargs = dict(input_shape=SHAPE, num_classes=10, mean=(0.5,), std=(0.25,), n_train=4, encoding="fp32", top_k=5, ensemble="logits",
                  threads=1, views={"max_shift": 1}, precision="fp32")
    teachers = [{"name": "t", "spec": CNN.model_dump(), "state_dict": model.state_dict(), "weight": 1.0}]
    batch = {"id": np.arange(6), "image": np.random.default_rng(0).integers(0, 256, (6, *SHAPE), dtype=np.uint8)}
    cpu = TeacherPredictor(teachers, use_gpu=False, **kwargs)(batch)
    gpu = TeacherPredictor(teachers, use_gpu=True, **kwargs)(batch)
    np.testing.assert_array_equal(cpu["view"], gpu["view"])
    np.testing.assert_allclose(cpu["teacher_logits"], gpu["teacher_logits"], atol=1e-3)  # TF32 / cuDNN differ in low bits


@needs_cuda
@pytest.mark.integration
def test_cuda_distill_run(ray_session, tmp_path, monkeypatch):
    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code = main(["run", str(REPO_ROOT / "configs/digits_kd.yaml"), "train.use_gpu=true", "teachers.0.train.epochs=2", "train.epochs=2",
                 "views.max_shift=1", "teachers.0.train.input_jitter=1", "--summary-json", str(tmp_path / "s.json")])
    assert code == 0
    rows = json.loads((tmp_path / "s.json").read_text())
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows) and any(r["role"] == "student" for r in rows)
