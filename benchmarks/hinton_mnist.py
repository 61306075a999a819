"""Hinton et al. (2015) on MNIST: teacher, 2x800 student alone and distilled at T=20, 2x30 student at several T.

Reads finished runs back from the MLflow store (nothing typed in). Run the two jobs first, from one
directory, so the second reuses the first one's cached teacher and soft targets:

    distill run configs/mnist_hinton.yaml --summary-json summary.json              # teacher, 2x800 + baseline
    distill run configs/mnist_hinton_small.yaml --summary-json summary_small.json  # 2x30: labels only, T=2.5, 4, 8
    python benchmarks/hinton_mnist.py [--load-log load.log]  # -> benchmarks/results/hinton_mnist.{json,md}

The table is the latest FINISHED parent run of each experiment whose logged config.json equals the
YAML in configs/ as it is now (paths aside), else the latest FINISHED one with the differences printed;
every other run of the two experiments (older, other settings, FAILED, KILLED) is listed below the
table with its own numbers. The 2x30 job must have used the same teacher as the 2x800 job (same
teacher weight fingerprint), or the script stops. `--load-log` takes lines "<ISO time> <contents of
/proc/loadavg>" sampled during the runs and summarises the 1-minute load over each job; the runs of
2026-11-29 sampled it with

    while true; do echo "$(date -u +%FT%TZ) $(cat /proc/loadavg)" >> load.log; sleep 30; done &

Gap closure of a distilled row = (baseline errors - distilled errors) / (baseline errors - teacher errors),
with the baseline of the same architecture trained on labels alone in the same job (same batches).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.machine

from harness import machine  # noqa: E402

from orchestrator.config import load_config
from orchestrator.tracking import runs as tracking

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("KD_BENCH_RESULTS", REPO / "benchmarks" / "results"))  # run_all.py --quick points it elsewhere
BIG, SMALL = "mnist_hinton", "mnist_hinton_small"

# Hinton, Vinyals and Dean (2015), arXiv:1503.02531, Section 3: test errors out of 10,000.
PAPER = {
    "teacher": 67,
    "2x800 baseline": 146,
    "2x800 distilled T=20": 74,
    "2x800 gap closure": (146 - 74) / (146 - 67),
    "2x30": "no error counts reported; temperatures 2.5 to 4 worked significantly better than higher or lower ones",
}
# Keys that legitimately differ between the logged config and the YAML read here (paths are made absolute
# against the directory the job ran in).
PATH_KEYS = {"soft_targets.cache_dir", "train.storage_path", "dataset.root"}


def finished_parents(client, experiment: str) -> list:
    """Finished parent runs of the experiment, newest first."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        sys.exit(f"no MLflow experiment {experiment!r} in this store: run `distill run configs/{experiment}.yaml` first")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.job = 'distill' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    if not runs:
        sys.exit(f"no finished {experiment!r} parent run in this store")
    return runs


def artifact_json(uri: str, run_id: str, path: str):
    return json.loads(tracking.artifact_text(uri, run_id, path))


def config_overrides(logged: dict, experiment: str) -> list[str]:
    """Keys where the logged config differs from configs/<experiment>.yaml as it is now (paths ignored)."""
    path = REPO / "configs" / f"{experiment}.yaml"
    if not path.is_file():
        return [f"(configs/{experiment}.yaml not found)"]
    ours = tracking.flatten(load_config(path).model_dump(mode="json"))
    theirs = tracking.flatten(logged)
    return [f"{k}={theirs.get(k)} (file: {ours.get(k)})" for k in sorted(set(ours) | set(theirs))
            if k not in PATH_KEYS and ours.get(k) != theirs.get(k)]


def student_kd(cfg: dict, name: str) -> tuple[float, float] | None:
    """(temperature, alpha) a student was distilled with, from the logged config; None for label-only."""
    student = next(s for s in cfg["students"] if s["name"] == name)
    loss = student["loss"]
    if loss == "ce":
        return None
    if loss == "kd":
        return cfg["kd"]["temperature"], cfg["kd"]["alpha"]
    if isinstance(loss, str):  # another named loss (dkd, kd_ls, ...): not a Hinton KD row
        return None
    kd = [t for t in loss if t["name"] == "kd"]  # weighted terms, as logged: a list of dicts
    if not kd:
        return None
    total = sum(t["weight"] for t in loss)
    return kd[0]["temperature"] or cfg["kd"]["temperature"], kd[0]["weight"] / total


def mlp_label(spec: dict, extra: str = "") -> str:
    layers = "-".join(str(w) for w in [784, *spec["hidden"], 10])
    bits = [f"MLP {layers}"]
    if spec.get("input_dropout"):
        bits.append(f"input dropout {spec['input_dropout']}")
    if spec.get("dropout"):
        bits.append(f"dropout {spec['dropout']}")
    return ", ".join(bits + ([extra] if extra else []))


def command(cfg: dict, experiment: str, uri: str) -> str:
    """The command that runs the job as logged: from the directory holding its cache (the default, relative
    `.kd_cache`, is resolved against where the command ran), against this tracking store."""
    cache = Path(cfg["soft_targets"]["cache_dir"])
    where = f"cd {cache.parent} && " if cache.name == ".kd_cache" else ""
    summary = "summary.json" if experiment == BIG else "summary_small.json"
    return f"{where}MLFLOW_TRACKING_URI={uri} distill run {REPO}/configs/{experiment}.yaml --summary-json {summary}"


def gap_closure(baseline: int, distilled: int, teacher: int) -> float | None:
    return (baseline - distilled) / (baseline - teacher) if baseline != teacher else None


def student_rows(cfg: dict, summary: list[dict], teacher_errors: int, experiment: str, paper: dict) -> list[dict]:
    """Table rows of one job's label-only baseline and its distilled students (gap closure against this job's baseline)."""
    rows = []
    epochs = cfg["train"]["epochs"]
    baseline = next(r for r in summary if r["role"] == "baseline" or (r["role"] == "student" and student_kd(cfg, r["name"]) is None))
    spec = next(s for s in cfg["students"] if baseline["name"] in (s["name"], f"{s['name']}-baseline"))
    width = "x".join(str(w) for w in spec["hidden"])
    width = f"{len(spec['hidden'])}x{spec['hidden'][0]}" if len(set(spec["hidden"])) == 1 else width
    rows.append({
        "row": f"{width} baseline (labels only)", "model": mlp_label(spec, f"{epochs} epochs"),
        **{k: baseline[k] for k in ("name", "test_errors", "test_accuracy", "params", "agreement", "kl_to_teacher")},
        "gap_closure": None, "paper_test_errors": paper.get("baseline"), "paper_gap_closure": None, "job": experiment,
    })
    for r in summary:
        if r["role"] != "student" or r is baseline:
            continue
        kd = student_kd(cfg, r["name"])
        if kd is None:
            continue
        t, alpha = kd
        paper_errors = paper.get(t)
        rows.append({
            "row": f"{width} distilled T={t:g}", "model": mlp_label(spec, f"{epochs} epochs, alpha={alpha:g}"),
            **{k: r[k] for k in ("name", "test_errors", "test_accuracy", "params", "agreement", "kl_to_teacher")},
            "temperature": t, "alpha": alpha,
            "gap_closure": gap_closure(baseline["test_errors"], r["test_errors"], teacher_errors),
            "paper_test_errors": paper_errors,
            "paper_gap_closure": gap_closure(paper["baseline"], paper_errors, PAPER["teacher"]) if paper_errors else None,
            "job": experiment,
        })
    return rows


PAPER_ROWS = {BIG: {"baseline": PAPER["2x800 baseline"], 20.0: PAPER["2x800 distilled T=20"]}, SMALL: {}}


def load_summary(path: str | None, windows: dict[str, tuple[float, float]]) -> dict:
    """1-minute load average sampled in each job's [start, end] window (from a '<ISO time> <loadavg>' log)."""
    if not path:
        return {"note": "no load log given"}
    samples = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            t = datetime.fromisoformat(parts[0].replace("Z", "+00:00")).timestamp()
            samples.append((t, float(parts[1])))
    out = {"log": str(path), "cpus": os.cpu_count()}
    for job, (start, end) in windows.items():
        inside = [v for t, v in samples if start <= t <= end]
        if inside:
            out[job] = {"samples": len(inside), "first": inside[0], "last": inside[-1], "min": min(inside),
                        "median": statistics.median(inside), "max": max(inside)}
        else:
            out[job] = {"samples": 0}
    return out


def iso(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if ms else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    parser.add_argument("--load-log", default=None, help="lines '<ISO time> <loadavg>' sampled during the runs")
    args = parser.parse_args()
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    client = tracking.client(uri)

    jobs, others = {}, []
    for experiment in (BIG, SMALL):
        # The table uses the newest finished run of the config as it is in configs/ (no overrides); runs
        # with overrides, and older ones, are listed below it, so nothing is hidden and nothing mixed in.
        candidates = []
        for parent in finished_parents(client, experiment):
            cfg = artifact_json(uri, parent.info.run_id, "config.json")
            candidates.append((parent, cfg, config_overrides(cfg, experiment)))
        chosen = next((c for c in candidates if not c[2]), candidates[0])
        for parent, cfg, diff in candidates:
            if parent is not chosen[0]:
                summary = artifact_json(uri, parent.info.run_id, "summary.json")
                t_row = next(r for r in summary if r["role"] == "teacher")
                others.append({"job": experiment, "parent_run_id": parent.info.run_id, "started": iso(parent.info.start_time),
                               "wall_min": round((parent.info.end_time - parent.info.start_time) / 60000, 1),
                               "overrides": diff, "teacher_test_errors": t_row["test_errors"],
                               "rows": student_rows(cfg, summary, t_row["test_errors"], experiment, PAPER_ROWS[experiment])})
        parent, cfg, _ = chosen
        exp_id = parent.info.experiment_id
        unfinished = client.search_runs([exp_id], filter_string="tags.job = 'distill' and attributes.status != 'FINISHED'")
        for run in unfinished:
            others.append({"job": experiment, "parent_run_id": run.info.run_id, "started": iso(run.info.start_time),
                           "status": run.info.status, "overrides": config_overrides(artifact_json(uri, run.info.run_id, "config.json"), experiment)})
        summary = artifact_json(uri, parent.info.run_id, "summary.json")
        teacher_row = next(r for r in summary if r["role"] == "teacher")
        teacher_run = client.get_run(teacher_row["mlflow_run_id"])
        student_row = next(r for r in summary if r["role"] != "teacher")
        soft_run_id = client.get_run(student_row["mlflow_run_id"]).data.tags.get("soft_target_run_id")  # students carry the lineage tags
        soft_run = client.get_run(soft_run_id) if soft_run_id else None
        trained_by = None
        if teacher_run.data.tags.get("source") != "trained":  # from the teacher cache: find the run that trained it
            fp = teacher_run.data.tags.get("teacher_fingerprint")
            exp_ids = [e.experiment_id for e in client.search_experiments() if e.name in (BIG, SMALL)]
            hits = client.search_runs(exp_ids,
                                      filter_string=f"tags.teacher_fingerprint = '{fp}' and tags.source = 'trained' and attributes.status = 'FINISHED'")
            if hits:
                h = hits[0]
                trained_by = {"teacher_run_id": h.info.run_id, "parent_run_id": h.data.tags.get("mlflow.parentRunId"),
                              "started": iso(h.info.start_time), "wall_s": round((h.info.end_time - h.info.start_time) / 1000, 1)}
        jobs[experiment] = {
            "parent": parent, "cfg": cfg, "summary": summary, "teacher_trained_by": trained_by,
            "teacher_fingerprint": teacher_run.data.tags.get("teacher_fingerprint"),
            "teacher_source": teacher_run.data.tags.get("source"),
            "soft_target_cache_hit": (soft_run.data.tags.get("cache_hit") if soft_run else None),
        }
    big, small = jobs[BIG], jobs[SMALL]
    if big["teacher_fingerprint"] != small["teacher_fingerprint"]:
        sys.exit(f"the latest {SMALL} run used another teacher ({small['teacher_fingerprint']}) than the latest {BIG} run "
                 f"({big['teacher_fingerprint']}): run both jobs with the same teacher config from one directory")

    t_cfg = big["cfg"]["teachers"][0]
    t_train = t_cfg["train"]
    teacher = next(r for r in big["summary"] if r["role"] == "teacher")
    rows = [{
        "row": "teacher",
        "model": mlp_label(t_cfg, f"input jitter {t_train['input_jitter']} px, {t_train['epochs']} epochs"),
        **{k: teacher[k] for k in ("name", "test_errors", "test_accuracy", "params", "agreement", "kl_to_teacher")},
        "gap_closure": None, "paper_test_errors": PAPER["teacher"], "paper_gap_closure": None, "job": BIG,
    }]

    rows += student_rows(big["cfg"], big["summary"], teacher["test_errors"], BIG, PAPER_ROWS[BIG])
    rows += student_rows(small["cfg"], small["summary"], teacher["test_errors"], SMALL, PAPER_ROWS[SMALL])

    windows, job_info = {}, {}
    for experiment, job in jobs.items():
        p = job["parent"]
        windows[experiment] = (p.info.start_time / 1000, p.info.end_time / 1000)
        job_info[experiment] = {
            "parent_run_id": p.info.run_id,
            "started": iso(p.info.start_time), "ended": iso(p.info.end_time),
            "wall_min": round((p.info.end_time - p.info.start_time) / 60000, 1),
            "stage_wall_s": {k.removeprefix("wall_s_"): round(v, 1) for k, v in p.data.metrics.items() if k.startswith("wall_s_")},
            "teacher_source": job["teacher_source"], "teacher_fingerprint": job["teacher_fingerprint"],
            "teacher_trained_by": job["teacher_trained_by"],
            "soft_target_cache_hit": job["soft_target_cache_hit"],
            "teacher_forward_rows": p.data.metrics.get("teacher_forward_rows"),
            "config_differs_from_repo_yaml": config_overrides(job["cfg"], experiment),
            "command": command(job["cfg"], experiment, uri),
        }
    report = {
        "title": "Hinton et al. (2015) on MNIST, reproduced with kd-orchestrator",
        "tracking_uri": uri, "machine": machine(), "load_average_1min": load_summary(args.load_log, windows),
        "jobs": job_info, "rows": rows, "other_runs": others, "paper": PAPER,
        "notes": {
            "test_set": "the 10,000 MNIST test images",
            "agreement": "top-1 agreement with the teacher on the test set (teacher logits from the fp16 soft-target cache)",
            "kl_to_teacher": "mean KL(teacher || model) at T=1 in nats on the test set, same teacher logits",
            "gap_closure": "(baseline errors - distilled errors) / (baseline errors - teacher errors), baseline of the same architecture from the same job",
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hinton_mnist.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = render_md(report)
    (RESULTS / "hinton_mnist.md").write_text(md)
    print(md)
    return 0


def trained_by(info: dict | None) -> str:
    if not info:
        return ""
    return f" (trained in run {info['teacher_run_id']} of parent {info['parent_run_id']}, {info['started']}, {info['wall_s']:.0f} s)"


def render_md(report: dict) -> str:
    m, jobs, load = report["machine"], report["jobs"], report["load_average_1min"]
    first = min([j["started"] for j in jobs.values()] + [j["teacher_trained_by"]["started"] for j in jobs.values() if j["teacher_trained_by"]])
    lines = [
        f"Hinton et al. (2015), MNIST: runs started {first}; {m['nproc']} CPUs ({m['cpu_model']}), GPU: {'yes' if m['gpu'] else 'no'}; "
        f"Python {m['python']}, torch {m['torch']}, ray {m['ray']}, mlflow {m['mlflow']}. Test set: 10,000 MNIST test images.",
        "",
        "| row | model | test errors | test accuracy | params | agreement with teacher | KL to teacher | gap closure | paper: test errors | paper: gap closure |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pct(v):
        return f"{v:.0%}" if v is not None else "-"

    for r in report["rows"]:
        lines.append(f"| {r['row']} | {r['model']} | {r['test_errors']} | {r['test_accuracy']:.4f} | {r['params']:,} | "
                     f"{r['agreement']:.4f} | {r['kl_to_teacher']:.4f} | {pct(r['gap_closure'])} | "
                     f"{r['paper_test_errors'] if r['paper_test_errors'] is not None else '-'} | {pct(r['paper_gap_closure'])} |")
    lines += ["", f"Paper, 2x30 student: {report['paper']['2x30']}.", "", "Commands, with the configs as committed (from one directory, so the second job reuses the first one's teacher and soft targets):", "", "```bash"]
    lines += [j["command"] for j in jobs.values()] + [f"python benchmarks/hinton_mnist.py --tracking-uri {report['tracking_uri']}"
                                                       + (f" --load-log {load['log']}" if load.get("log") else ""), "```", ""]
    for name, j in jobs.items():
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in j["stage_wall_s"].items())
        loadline = ""
        if isinstance(load.get(name), dict) and load[name].get("samples"):
            ld = load[name]
            loadline = f" 1-minute load average during the job (on {load['cpus']} CPUs): first sample {ld['first']:.1f}, last {ld['last']:.1f}, median {ld['median']:.1f}, max {ld['max']:.1f} ({ld['samples']} samples)."
        diff = j["config_differs_from_repo_yaml"]
        lines.append(f"- `{name}` (parent run {j['parent_run_id']}): {j['started']} to {j['ended']}, {j['wall_min']} min; stages: {stages}; "
                     f"teacher {'trained' if j['teacher_source'] == 'trained' else 'from the ' + str(j['teacher_source'])}"
                     f"{trained_by(j['teacher_trained_by'])}, soft targets {'from the cache' if str(j['soft_target_cache_hit']) == 'True' else 'generated'}; "
                     f"config {'as in configs/' + name + '.yaml' if not diff else 'differs from configs/' + name + '.yaml: ' + '; '.join(diff)}.{loadline}")
    teacher = report["rows"][0]
    gaps = {r["row"]: r["test_errors"] - teacher["test_errors"] for r in report["rows"] if r["row"].endswith("(labels only)")}
    lines += ["", "Teacher-baseline gap in test errors (what gap closure divides by; one test error moves it by 100/gap points): "
              + ", ".join(f"{k.removesuffix(' (labels only)')}: {v}" for k, v in gaps.items())
              + f" (paper, 2x800: {report['paper']['2x800 baseline'] - report['paper']['teacher']})."]
    if report["other_runs"]:
        lines += ["", "Other runs of these jobs in the store (older, with another config than the YAML in configs/ now, or not FINISHED; not in the table above):", ""]
        for o in report["other_runs"]:
            if "status" in o:
                lines.append(f"- `{o['job']}` {o['parent_run_id']} ({o['started']}; config differs from the YAML: {'; '.join(o['overrides']) or 'no'}): "
                             f"{o['status']}, no results")
                continue
            lines.append(f"- `{o['job']}` {o['parent_run_id']} ({o['started']}, {o['wall_min']} min; config differs from the YAML: "
                         f"{'; '.join(o['overrides']) or 'no'}): FINISHED, teacher {o['teacher_test_errors']} test errors; "
                         + "; ".join(f"{r['row']} ({r['model'].split(', ', 1)[1]}): {r['test_errors']} test errors, agreement {r['agreement']:.4f}, "
                                     f"KL {r['kl_to_teacher']:.4f}" + (f", gap closure {pct(r['gap_closure'])}" if r["gap_closure"] is not None else "")
                                     for r in o["rows"]))
    lines += ["", "Agreement: top-1 agreement with the teacher; KL to teacher: mean KL(teacher || model) at T=1, nats; both on the test set, "
              "teacher logits from the fp16 soft-target cache. Gap closure: (baseline errors - distilled errors) / (baseline errors - teacher errors), "
              "with the label-only baseline of the same architecture trained in the same job on the same batches.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
