"""The GPU check: run on a machine with a CUDA GPU and this project's dependencies.

    .venv/bin/python benchmarks/gpu_check.py            # prints PASS/FAIL per check and per-step timings
    .venv/bin/python benchmarks/gpu_check.py --quick    # fewer timing steps

1. The CUDA tests of tests/test_devices.py (the three crash paths found by reading the code, the teacher
   actor against its CPU result, a short `distill run` with train.use_gpu=true), through pytest.
2. Per-step timings, in-process: one optimisation step of a 2x800 MLP student and its twin
   (`objectives.step_members`, as a train worker runs it) at fp32 and bf16, and teacher inference
   rows/s (`teachers.TeacherPredictor`, 9 views per image) on the GPU and on the CPU.

Writes benchmarks/results/gpu_check.json (the device named) and exits 1 when a check fails. On a machine
without CUDA it says so and exits 2: there is nothing to check.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import REPO, machine, utc_now, write_result  # noqa: E402


def cuda_tests() -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_devices.py", "-k", "cuda", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return {"passed": proc.returncode == 0, "returncode": proc.returncode, "seconds": round(time.perf_counter() - started, 1), "tail": tail}


def step_timings(steps: int) -> dict:
    import torch

    from orchestrator.config import KDConfig, ModelSpec, TrainConfig
    from orchestrator.losses.objective import build_objective, step_members
    from orchestrator.train.models import build_model
    from orchestrator.train.optim import build_optimizer, build_scheduler
    from orchestrator.train.precision import grad_scaler
    from orchestrator.train.train_loop import Member, MemberConfig

    device = torch.device("cuda")
    spec = ModelSpec(family="mlp", hidden=[800, 800])
    results = {}
    for precision in ("fp32", "bf16"):
        members = []
        for name, loss in (("student", "kd"), ("twin", "ce")):
            model = build_model(spec, (1, 28, 28), 10).to(device)
            kd = KDConfig(temperature=4.0, alpha=0.9)
            objective = build_objective(loss, kd, model, (1, 28, 28), None).to(device)
            optimizer = build_optimizer(model.parameters(), TrainConfig())
            config = MemberConfig(name=name, role="student", spec=spec, loss=loss, kd=kd)
            members.append(Member(config, model, optimizer, build_scheduler(optimizer, TrainConfig(), steps), objective, grad_scaler(precision, device)))
        x = torch.randn(256, 1, 28, 28, device=device)
        y = torch.randint(0, 10, (256,), device=device)
        t = torch.randn(256, 10, device=device)
        for _ in range(5):  # warm-up: cuBLAS handles, autocast caches
            step_members(members, x, y, t, None, precision=precision)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            step_members(members, x, y, t, None, precision=precision)
        torch.cuda.synchronize()
        results[precision] = {"ms_per_step": round(1000 * (time.perf_counter() - started) / steps, 3), "batch": 256, "members": 2}
    return results


def teacher_rows_per_s(rows: int) -> dict:
    import numpy as np
    import torch

    from orchestrator.config import ModelSpec
    from orchestrator.teachers.pool import TeacherPredictor
    from orchestrator.train.models import build_model

    spec = ModelSpec(family="cnn", channels=[32, 64, 128], hidden=[256])
    model = build_model(spec, (1, 28, 28), 10).eval()
    teachers = [{"name": "t", "spec": spec.model_dump(), "state_dict": model.state_dict(), "weight": 1.0}]
    batch = {"id": np.arange(rows), "image": np.random.default_rng(0).integers(0, 256, (rows, 1, 28, 28), dtype=np.uint8)}
    results = {}
    for device, use_gpu, precision in (("cuda", True, "auto"), ("cuda", True, "fp32"), ("cpu", False, "fp32")):
        predictor = TeacherPredictor(teachers, input_shape=(1, 28, 28), num_classes=10, mean=(0.13,), std=(0.31,), n_train=rows,
                                     encoding="fp16", top_k=5, ensemble="logits", threads=2, use_gpu=use_gpu, views={"max_shift": 1},
                                     precision=precision)
        predictor(batch)  # warm-up
        if use_gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = predictor(batch)
        seconds = time.perf_counter() - started
        results[f"{device}-{precision}"] = {"rows_per_s": round(len(out["id"]) / seconds), "rows": len(out["id"])}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing steps and rows")
    args = parser.parse_args(argv)
    import ray
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to check", file=sys.stderr)
        return 2
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # the predictor's forward-row counter is a Ray actor
    report = {"started_utc": utc_now(), "machine": machine(), "device": torch.cuda.get_device_name(0)}
    report["cuda_tests"] = cuda_tests()
    report["step"] = step_timings(20 if args.quick else 200)
    report["teacher"] = teacher_rows_per_s(2000 if args.quick else 20000)
    ray.shutdown()
    path = write_result("gpu_check", report)
    ok = report["cuda_tests"]["passed"]
    print(f"device: {report['device']}")
    print(f"{'PASS' if ok else 'FAIL'}  CUDA tests ({report['cuda_tests']['seconds']} s): " + report["cuda_tests"]["tail"][-1])
    for precision, t in report["step"].items():
        print(f"      student+twin step, batch 256, {precision}: {t['ms_per_step']} ms")
    for name, t in report["teacher"].items():
        print(f"      teacher inference {name}: {t['rows_per_s']:,} rows/s")
    print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
