"""The README's "## Results" blocks, generated from benchmarks/results/*.json: no figure is typed in.

    .venv/bin/python benchmarks/readme_results.py           # rewrite the blocks in README.md and docs/results.md (make results)
    .venv/bin/python benchmarks/readme_results.py --check   # exit 1 if a block differs from what its JSON renders

Every result is a block of docs/results.md (the headline one also of README.md) between `<!-- results:NAME:start -->` and
`<!-- results:NAME:end -->`; the text between the markers is replaced, everything outside them is
hand-written and left alone. A block states the command that reproduces it, when it ran, the machine,
the versions and the load, then a compact table, all read from the result's JSON. While the JSON (or
its renderer) does not exist yet, the block is one line: "not run yet: <command>".

To add a result: write its benchmark (it writes benchmarks/results/<name>.json), add a RESULTS entry
with a render(report) -> str, put the two marker lines where it belongs in the README, run this script.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmark modules whose renderers are reused

import bench_methods  # noqa: E402  (after the sys.path line; these import neither torch, Ray nor MLflow at module level)
import bench_pipeline  # noqa: E402
import fashion_gap  # noqa: E402
import mnist_demo  # noqa: E402
from bench_storage import _fmt  # noqa: E402
from harness import gpu_words, header_lines, table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS_DOC = REPO / "docs" / "results.md"
RESULTS_DIR = REPO / "benchmarks" / "results"
BLOCK = re.compile(r"<!-- results:(?P<name>[\w-]+):start -->\n(?P<body>.*?)<!-- results:(?P=name):end -->", re.DOTALL)


class RendererMissing(Exception):
    """The renderer's module or function does not exist yet (a benchmark still being written)."""


@dataclass(frozen=True)
class Result:
    name: str  # the README marker name
    json_file: str  # in benchmarks/results/
    command: str  # what writes the JSON; shown while it does not exist
    render: Callable[[dict], str]  # the loaded JSON -> the block's markdown


def lazy(module: str, function: str) -> Callable[[dict], str]:
    """A renderer imported only when its JSON exists, so a benchmark that is not written yet does not break the others."""

    def render(report: dict) -> str:
        try:
            found = getattr(importlib.import_module(module), function)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # the module exists but one of its own imports is missing: a real error
                raise
            raise RendererMissing(f"{module}.py not found") from exc
        except AttributeError as exc:
            raise RendererMissing(f"{module}.py has no {function}()") from exc
        return found(report)

    return render


# ------------------------------------------------------------------------------------ shared words


def machine_words(m: dict) -> str:
    """CPUs, GPU or not, and the versions, from a benchmark's machine dict (two key conventions exist)."""
    cpus = m.get("nproc") or m.get("cpus")
    model = f" x {m['cpu_model']}" if m.get("cpu_model") else " CPUs"
    return (f"{cpus}{model}, {gpu_words(m)}; Python {m.get('python')}, torch {m.get('torch')}, "
            f"ray {m.get('ray')}, mlflow {m.get('mlflow')}")


def pct(value: float | None) -> str:
    return f"{value:.0%}" if value is not None else "-"


# ------------------------------------------------------------------------------------ renderers


def render_hinton(report: dict) -> str:
    """hinton_mnist.json: the jobs' commands, then one row per model against the paper's figures."""
    jobs, load = report["jobs"], report["load_average_1min"]
    started = min(j["started"] for j in jobs.values())
    ended = max(j["ended"] for j in jobs.values())
    lines = ["Commands (from one directory, so the second job reuses the first one's teacher and soft targets):", "", "```bash"]
    lines += [j["command"] for j in jobs.values()]
    lines += [f"python benchmarks/hinton_mnist.py --tracking-uri {report['tracking_uri']}" + (f" --load-log {load['log']}" if load.get("log") else ""),
              "```", "", f"Jobs ran {started} to {ended} on {machine_words(report['machine'])}."]
    for name, job in jobs.items():
        lines[-1] += " " + job_words(name, job, load.get(name))
    rows = [[f"{r['row']}: {r['model']}", r["test_errors"], f"{r['agreement']:.4f}", f"{r['kl_to_teacher']:.4f}", pct(r["gap_closure"]),
             "-" if r["paper_test_errors"] is None else f"{r['paper_test_errors']}" + (f" ({pct(r['paper_gap_closure'])})" if r["paper_gap_closure"] is not None else "")]
            for r in report["rows"]]
    lines += ["", *table(["row", "test errors", "agreement with teacher", "KL to teacher", "gap closure", "paper: test errors (gap closure)"], rows, "lrrrrr")]
    teacher = report["rows"][0]
    gaps = ", ".join(f"{r['row'].removesuffix(' (labels only)')} {r['test_errors'] - teacher['test_errors']}"
                     for r in report["rows"] if r["row"].endswith("(labels only)"))
    lines += ["", f"Teacher-baseline gap in test errors (gap closure divides by it): {gaps}; paper, 2x800: "
              f"{report['paper']['2x800 baseline'] - report['paper']['teacher']}. Paper, 2x30: {report['paper']['2x30']}."]
    if report["other_runs"]:
        lines.append(f"{len(report['other_runs'])} other run(s) of these jobs are listed in benchmarks/results/hinton_mnist.md.")
    return "\n".join(lines) + "\n"


def job_words(name: str, job: dict, load: dict | None) -> str:
    """One job's wall time, config check and load, for the Hinton block's run line."""
    config = "config as committed" if not job["config_differs_from_repo_yaml"] else "config differs from the YAML: " + "; ".join(job["config_differs_from_repo_yaml"])
    words = f"`{name}`: {job['wall_min']} min, {config}"
    if load and load.get("samples"):
        words += f", 1-minute load average median {load['median']:.1f}, max {load['max']:.1f} ({load['samples']} samples)"
    return words + "."


def render_growth(report: dict) -> str:
    """growth.json, compact: time and peak memory per size (the full table is growth.md)."""
    g = report["growth"]
    st, se = g["soft_targets"], g["student_epoch"]
    lines = header_lines(report) + [""]
    rows = []
    for k in g["factors"]:
        s, e = st[f"{k}x"], se[f"{k}x"]
        rows.append([f"{k}x ({s['rows']:,} rows)", f"{s['median_s']:.2f} ({s['rows_per_s']:,.0f})", f"{e['steady_epoch_s']:.2f}",
                     f"{e['driver_peak_rss_mb']:.0f}", f"{s['actor_peak_rss_mb']:.0f}" if s["actor_peak_rss_mb"] else "not seen",
                     f"{e['worker_peak_rss_mb']:.0f}"])
    ratio = "time vs 1x (2x / 4x)"
    rows.append([ratio, growth_words(st["growth"]), growth_words(se["growth"]), "", "", ""])
    lines += table(["size", "soft targets s (rows/s)", "one student epoch on Ray Train, s", "driver peak MB",
                    "teacher actor peak MB", "Ray Train worker peak MB"], rows, "lrrrrr")
    lines += ["", f"Driver peak before the first stage: {g['driver_peak_rss_mb_before_stages']:.0f} MB. First soft-target call on the "
              f"fresh cluster (not in the table): {g['first_call_1x']['s']:.2f} s. Soft targets: median of {g['rounds_done']} runs per size; "
              f"student: {se['epochs_per_run']} epochs per size, epoch 0 excluded. How each figure is taken: benchmarks/results/growth.md."]
    return "\n".join(lines) + "\n"


def growth_words(growth: dict) -> str:
    ratios = growth["time_ratio_vs_1x"]
    return f"{ratios['2x']:.2f}x / {ratios['4x']:.2f}x ({'linear' if growth['linear'] else 'not linear'})"


def render_fashion_gap(report: dict) -> str:
    """fashion_gap.json: its comparison table (fashion_gap.render) and every sweep trial."""
    lines = ["Commands (from one directory, so the sweep takes the job's cached teacher and soft targets):", "", "```bash",
             "distill run configs/fashion_kd.yaml", "distill sweep configs/fashion_sweep.yaml",
             f"python benchmarks/fashion_gap.py --tracking-uri {report['tracking_uri']}", "```", "",
             f"Read back from MLflow runs {report['job_run_id']} (job) and {report['sweep_run_id']} (sweep). {fashion_gap_when(report)}",
             "", fashion_gap.render(report).rstrip("\n"), "", "Every trial of the sweep:", ""]
    rows = [[t["trial_id"], t["chain"], f"{t['temperature']:.2f}", f"{t['alpha']:.2f}", t["epochs_run"], f"{t['val_accuracy']:.4f}",
             "-" if t["test_accuracy"] != t["test_accuracy"] else f"{t['test_accuracy']:.4f}", t["status"]]  # NaN: ASHA stopped it
            for t in report["trials"]]
    lines += table(["trial", "chain", "T", "alpha", "epochs run", "val accuracy", "test accuracy", "status"], rows, "llrrrrrl")
    return "\n".join(lines) + "\n"


def fashion_gap_when(report: dict) -> str:
    if "runs" not in report:
        return "Date, machine, versions and load: not recorded in fashion_gap.json."
    job, sweep, m = report["runs"]["job"], report["runs"]["sweep"], report["report_machine"]
    return (f"Job {job['start_utc']} ({job['minutes']:.0f} min), sweep {sweep['start_utc']} ({sweep['minutes']:.0f} min), as MLflow recorded them; "
            f"read back on {m.get('nproc')} x {m.get('cpu_model') or '?'}, {gpu_words(m)}; Python {m.get('python')}, "
            f"torch {m.get('torch')}, ray {m.get('ray')}, mlflow {m.get('mlflow')}. Load during the runs: not recorded.")


def render_storage(report: dict) -> str:
    """storage.json, compact: (a) a real job per encoding, (b) the synthetic 1000-class teacher (full tables: storage.md)."""
    real, syn = report["real"], report["synthetic"]
    runs, kd = real["runs"], real["kd"]
    fp32 = runs[0]["storage"]["bytes_per_example"]
    lines = header_lines(report) + ["", f"(a) {real['dataset']}: one `distill run {real['config']} {' '.join(real['base_overrides'])}` "
                                                   f"per encoding (soft_targets.encoding / top_k), students T={kd['temperature']:g}, alpha={kd['alpha']:g}:", ""]
    rows = []
    for run in runs:
        by_role = {r["role"]: r for r in run["rows"]}
        rows.append([run["label"], f"{run['storage']['bytes_per_example']:.1f}", f"{run['storage']['bytes_per_example'] / fp32:.2f}x",
                     f"{by_role['student']['test_accuracy']:.4f}", f"{by_role['baseline']['test_accuracy']:.4f}", f"{run['wall_s']:.0f}"])
    lines += table(["encoding", "bytes / example (cache entry)", "vs fp32", "student test acc", "labels-only baseline in the same job", "job wall s"], rows, "lrrrrr")
    teacher = next(r for r in runs[0]["rows"] if r["role"] == "teacher")
    lines += ["", f"Teacher `{teacher['name']}` trained once: test accuracy {teacher['test_accuracy']:.4f}.", "",
              f"(b) Synthetic {syn['classes']}-class teacher, {syn['rows']:,} rows, no training; distortion of the decoded soft targets against fp32:", ""]
    temps = [t for t in (1, 4, 20) if f"T{t}" in syn["encodings"][0]["distortion_vs_fp32"]]
    rows = [[e["label"], f"{e['storage']['bytes_per_example']:.0f}", f"{e['distortion_vs_fp32']['top1_agreement']:.4f}",
             *(_fmt(e["distortion_vs_fp32"][f"T{t}"]["kl_q_p"]) for t in temps),
             *(_fmt(e["distortion_vs_fp32"][f"T{t}"]["dropped_mass"]) for t in temps)] for e in syn["encodings"]]
    lines += table(["encoding", "on disk bytes / example", "top-1 = fp32", *(f"KL(q‖p) T={t}" for t in temps),
                    *(f"dropped mass T={t}" for t in temps)], rows, "l" + "r" * (2 + 2 * len(temps)))
    return "\n".join(lines) + "\n"


RESULTS = [
    Result("quality", "quality.json", "python benchmarks/quality.py", lazy("quality", "render")),
    Result("mnist_demo", "mnist_demo.json", "python benchmarks/mnist_demo.py", mnist_demo.render),
    Result("hinton_mnist", "hinton_mnist.json", "python benchmarks/hinton_mnist.py", render_hinton),
    Result("pipeline", "pipeline.json", "python benchmarks/bench_pipeline.py", bench_pipeline.render_pipeline),
    Result("first_call", "first_call.json", "python benchmarks/bench_first_call.py", lazy("bench_first_call", "render")),
    Result("growth", "growth.json", "python benchmarks/bench_growth.py", render_growth),
    Result("driver_memory", "driver_memory.json", "python benchmarks/bench_driver_memory.py", lazy("bench_driver_memory", "render")),
    Result("methods", "methods.json", "python benchmarks/bench_methods.py", bench_methods.table),
    Result("fashion_gap", "fashion_gap.json", "python benchmarks/fashion_gap.py", render_fashion_gap),
    Result("sweep_cost", "sweep_cost.json", "python benchmarks/bench_sweep.py", lazy("bench_sweep", "markdown")),
    Result("storage", "storage.json", "python benchmarks/bench_storage.py", render_storage),
    Result("foreign_parquet", "foreign_parquet.json", "python benchmarks/foreign_parquet.py", lazy("foreign_parquet", "render")),
]


# ------------------------------------------------------------------------------------ README blocks


def block_body(result: Result, results_dir: Path) -> str:
    """The markdown between a result's markers: generated from its JSON, or the 'not run yet' line."""
    path = results_dir / result.json_file
    not_run = f"not run yet: {result.command}\n"
    if not path.is_file():
        return not_run
    try:
        body = result.render(json.loads(path.read_text()))
    except RendererMissing:
        return not_run
    source = f"<!-- generated by benchmarks/readme_results.py from benchmarks/results/{result.json_file}: edit nothing up to the end marker -->\n"
    return source + body.rstrip("\n") + "\n"


def regenerate(readme: str, results_dir: Path, results: list[Result] = RESULTS) -> tuple[str, list[str], list[str]]:
    """(README with every block rendered anew, names of the blocks that changed, registry names without markers)."""
    bodies = {r.name: block_body(r, results_dir) for r in results}
    changed = []

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in bodies:  # a marker this registry does not know: leave it as it is
            return match[0]
        if match["body"] != bodies[name]:
            changed.append(name)
        return f"<!-- results:{name}:start -->\n{bodies[name]}<!-- results:{name}:end -->"

    text = BLOCK.sub(replace, readme)
    present = {m["name"] for m in BLOCK.finditer(readme)}
    missing = [r.name for r in results if r.name not in present]
    return text, changed, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a block differs from what its JSON renders; write nothing")
    parser.add_argument("--readme", action="append", help="a document holding results blocks (repeatable; default: README.md and docs/results.md)")
    parser.add_argument("--results", default=str(RESULTS_DIR), help="the folder holding the result JSON files")
    args = parser.parse_args(argv)
    documents = [Path(p) for p in (args.readme or [README, RESULTS_DOC])]
    present, stale = set(), []
    for document in documents:
        text, changed, _ = regenerate(document.read_text(), Path(args.results))
        present |= {m["name"] for m in BLOCK.finditer(document.read_text())}
        stale += [f"{document.name}:{name}" for name in changed]
        if changed and not args.check:
            document.write_text(text)
        if not args.check:
            print(f"{document}: {len(changed)} block(s) rewritten" + (f": {', '.join(changed)}" if changed else ""))
    missing = [r.name for r in RESULTS if r.name not in present]
    if missing:
        print(f"{', '.join(map(str, documents))}: no <!-- results:NAME:start/end --> markers for: {', '.join(missing)}", file=sys.stderr)
        return 1
    if args.check and stale:
        print(f"stale results block(s): {', '.join(stale)} (run: python benchmarks/readme_results.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
