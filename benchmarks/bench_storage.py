"""Soft-target storage: bytes per example and what each encoding costs the student (fp32, fp16, top-k).

    .venv/bin/python benchmarks/bench_storage.py --quick   # sklearn digits + 5,000 synthetic rows (a few minutes)
    .venv/bin/python benchmarks/bench_storage.py           # Fashion-MNIST + 20,000 synthetic rows (about 20 min)

(a) Real data. One real distillation per encoding through the project's own pipeline
    (`load_config` + `pipeline.prepare` + `pipeline.run_job`, what `distill run` calls), with
    `soft_targets.encoding=<enc>` (and `soft_targets.top_k=<k>`) as the only difference. All jobs
    share one Ray, one cache_dir and one MLflow store in a scratch working dir, so the teacher is
    trained once (the first job) and reused from the teacher cache; same students, same seed.
    Bytes per example: the soft-target cache entry the job used (its fingerprint is read from the
    student run's MLflow tags, the entry through `read_cache`), sum of the parquet files its
    manifest lists / the manifest's row count (train + test rows). The logit columns' share comes
    from the parquet footers (compressed column-chunk sizes). Student test accuracy and agreement
    with the teacher come from the job's summary rows. The decoded soft targets of every entry are
    also compared with the fp32 entry's (same teacher, same rows).
(b) Synthetic 1000-class teacher, no training: seeded logits with class structure (below), encoded
    with `encode_logits`, written as a cache entry by `write_cache` from a Ray dataset (as the
    pipeline writes it), read back with `read_cache` / `load_table` / `column_to_numpy` and
    decoded with `decode_logits`; bytes per example and the distortion of the decoded targets
    against the fp32 logits at T = 1, 4, 20.

Distortion, p_T = softmax(fp32 logits / T), q_T = softmax(decoded / T), averaged over rows:
KL(p_T || q_T) (infinite for top-k: decode gives the dropped classes probability 0),
KL(q_T || p_T), total variation 0.5 * sum |p_T - q_T|, the teacher mass p_T outside the kept
classes, and top-1 agreement argmax(decoded) == argmax(fp32).

Writes benchmarks/results/storage.json and storage.md (--quick too, marked quick). Every figure
comes from the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("KD_BENCH_RESULTS", REPO / "benchmarks" / "results"))  # run_all.py --quick points it elsewhere
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import loadavg, machine  # noqa: E402

SEED = 0
TEMPERATURES = (1.0, 4.0, 20.0)
SYNTH_CLASSES = 1000
SYNTH_DIM = 64
SYNTH_GROUP = 10  # sibling classes per group
SYNTH_OWN = 0.8  # weight of a class's own direction against its group centre
SYNTH_SCALE = 13.0  # logit = SYNTH_SCALE * <feature, class embedding>
SYNTH_NOISE = 0.18  # per-dimension std of the feature noise around the true class embedding
SYNTH_TOPK = (1, 5, 20, 100)
WRITE_BATCH = 4096  # soft_targets.batch_size default: the rows per block the pipeline writes

MODES = {
    # config, extra overrides, top-k values for the real runs, synthetic rows
    "quick": ("configs/digits_kd.yaml", [], (5, 2), 5_000),
    "full": ("configs/fashion_kd.yaml", ["teachers.0.train.epochs=2", "train.epochs=5"], (5, 2), 20_000),
}


def log(msg: str) -> None:
    print(f"[storage {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------ distortion


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = np.max(z, axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        shifted = z - m
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def distortion(reference: np.ndarray, decoded: np.ndarray, temperatures=TEMPERATURES, chunk: int = 2048) -> dict:
    """Mean over rows of KL(p||q), KL(q||p), TV, dropped teacher mass; top-1 agreement. float64 throughout."""
    n = len(reference)
    sums = {t: {"kl_p_q": 0.0, "kl_q_p": 0.0, "tv": 0.0, "dropped_mass": 0.0, "rows_kl_p_q_inf": 0} for t in temperatures}
    agree = 0
    for start in range(0, n, chunk):
        ref = reference[start : start + chunk]
        dec = decoded[start : start + chunk]
        agree += int((ref.argmax(axis=1) == dec.argmax(axis=1)).sum())
        for t in temperatures:
            logp, logq = _log_softmax(ref / t), _log_softmax(dec / t)
            p, q = np.exp(logp), np.exp(logq)
            kept = q > 0
            with np.errstate(invalid="ignore", divide="ignore"):
                kl_pq_terms = np.where(p > 0, p * (logp - logq), 0.0)  # +inf where q == 0 < p
                kl_qp_terms = np.where(kept, q * (logq - logp), 0.0)
            kl_pq = kl_pq_terms.sum(axis=1)
            s = sums[t]
            s["rows_kl_p_q_inf"] += int(np.isinf(kl_pq).sum())
            s["kl_p_q"] += float(kl_pq.sum())
            s["kl_q_p"] += float(kl_qp_terms.sum())
            s["tv"] += float(0.5 * np.abs(p - q).sum())
            s["dropped_mass"] += float(np.where(kept, 0.0, p).sum())
    out = {"rows": n, "top1_agreement": agree / n}
    for t, s in sums.items():
        out[f"T{t:g}"] = {
            "kl_p_q": "inf" if s["rows_kl_p_q_inf"] else s["kl_p_q"] / n,
            "rows_kl_p_q_inf": s["rows_kl_p_q_inf"],
            "kl_q_p": s["kl_q_p"] / n,
            "tv": s["tv"] / n,
            "dropped_mass": s["dropped_mass"] / n,
        }
    return out


def entry_bytes(entry) -> dict:
    """Bytes of a cache entry: files from its manifest (on disk), per-column compressed sizes from the parquet footers."""
    import pyarrow.parquet as pq

    files = entry.manifest["files"]
    on_disk = sum((entry.path / f["name"]).stat().st_size for f in files)
    assert on_disk == sum(f["bytes"] for f in files), "manifest sizes differ from the files (read_cache validated them)"
    columns: dict[str, dict[str, int]] = {}
    for f in files:
        meta = pq.ParquetFile(entry.path / f["name"]).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                chunk = group.column(c)
                name = chunk.path_in_schema.split(".")[0]
                col = columns.setdefault(name, {"compressed": 0, "uncompressed": 0})
                col["compressed"] += chunk.total_compressed_size
                col["uncompressed"] += chunk.total_uncompressed_size
                col["codec"] = chunk.compression
                col["encodings"] = sorted(set(col.get("encodings", [])) | set(chunk.encodings))
    rows = entry.manifest["rows"]
    return {"files": len(files), "rows": rows, "bytes": on_disk, "bytes_per_example": on_disk / rows, "columns": columns}


def decoded_logits(entry, encoding: str, num_classes: int, *, ids: np.ndarray | None = None) -> np.ndarray:
    """The entry's rows (sorted by id) decoded as the pipeline decodes them."""
    import torch

    from orchestrator.teachers.soft_targets import ID_COLUMN, column_to_numpy, decode_logits, load_table, logit_columns

    names = list(logit_columns(encoding))
    table = load_table(entry, [ID_COLUMN, *names])
    got_ids = column_to_numpy(table, ID_COLUMN)
    if not np.array_equal(got_ids, np.arange(len(got_ids)) if ids is None else ids):
        raise RuntimeError(f"{entry.path}: ids are not 0..N-1")
    columns = {name: torch.from_numpy(np.ascontiguousarray(column_to_numpy(table, name))) for name in names}
    return decode_logits(columns, num_classes=num_classes).numpy()


# ------------------------------------------------------------------------------------ (a) real data


def real_runs(config: str, extra: list[str], topks: tuple[int, ...], work: Path) -> dict:
    from orchestrator.config import load_config
    from orchestrator.flows import job, pipeline
    from orchestrator.teachers.soft_targets import read_cache
    from orchestrator.tracking import runs as tracking

    base = [
        f"soft_targets.cache_dir={work / '.kd_cache'}",
        f"train.storage_path={work / 'ray_results'}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        "tracking.experiment=storage_bench",
        "tracking.log_models=false",
        *extra,
    ]
    variants = [("fp32", ["soft_targets.encoding=fp32"]), ("fp16", ["soft_targets.encoding=fp16"])]
    variants += [(f"topk k={k}", ["soft_targets.encoding=topk", f"soft_targets.top_k={k}"]) for k in topks]
    runs, reference = [], None
    for label, overrides in variants:
        cfg = load_config(REPO / config, [*base, *overrides])
        log(f"(a) {label}: distill run {config} {' '.join(extra + overrides)}; load {loadavg()}")
        started = time.perf_counter()
        prep = job.prepare(cfg)
        job.init_ray(None, cfg)  # the first call starts the local Ray all jobs share
        rows = pipeline.run_job(cfg, prepared=prep)
        wall = time.perf_counter() - started
        uri = prep.tracking_uri
        student_row = next(r for r in rows if r["role"] == "student")
        tags = tracking.get_run(uri, student_row["mlflow_run_id"])["tags"]
        fp = tags["soft_target_fingerprint"]
        soft_run = tracking.get_run(uri, tags["soft_target_run_id"])
        entry = read_cache(cfg.soft_targets.cache_dir, fp)
        if entry is None:
            raise RuntimeError(f"{label}: the cache has no valid entry {fp}")
        if soft_run["tags"].get("cache_path") != str(entry.path):
            raise RuntimeError(f"{label}: soft-target run says {soft_run['tags'].get('cache_path')}, cache has {entry.path}")
        sizes = entry_bytes(entry)
        logits = decoded_logits(entry, cfg.soft_targets.encoding, prep.data.num_classes)
        if label == "fp32":
            reference = logits
        teacher_row = next(r for r in rows if r["role"] == "teacher")
        teacher_run = tracking.get_run(uri, teacher_row["mlflow_run_id"])
        run = {
            "label": label,
            "encoding": cfg.soft_targets.encoding,
            "top_k": cfg.soft_targets.top_k if cfg.soft_targets.encoding == "topk" else None,
            "overrides": [*extra, *overrides],
            "wall_s": round(wall, 1),
            "load_end": loadavg(),
            "fingerprint": fp,
            "cache_path": str(entry.path),
            "soft_targets_cache_hit": soft_run["tags"].get("cache_hit"),
            "soft_targets_wall_s": soft_run["metrics"].get("wall_s"),
            "teacher_from_cache": "source_run_id" in teacher_run["tags"],
            "num_classes": prep.data.num_classes,
            "manifest_columns": entry.manifest["columns"],
            "storage": sizes,
            "distortion_vs_fp32": distortion(reference, logits, temperatures=sorted({1.0, cfg.kd.temperature})),
            "rows": [{k: r[k] for k in ("role", "name", "test_accuracy", "test_errors", "agreement", "kl_to_teacher", "params", "wall_s")} for r in rows],
        }
        runs.append(run)
        students = ", ".join(f"{r['name']} {r['test_accuracy']:.4f} (agree {r['agreement']:.4f})" for r in rows if r["role"] != "teacher")
        log(f"(a) {label}: {sizes['bytes_per_example']:.1f} B/example ({sizes['rows']} rows, {sizes['files']} files); {students}; {wall:.0f} s")
    cfg0 = load_config(REPO / config, base)
    return {
        "config": config,
        "base_overrides": extra,
        "dataset": cfg0.dataset.name,
        "kd": cfg0.kd.model_dump(),
        "train_epochs": cfg0.train.epochs,
        "teacher_epochs": cfg0.teachers[0].train.epochs,
        "runs": runs,
    }


# ------------------------------------------------------------------------------------ (b) synthetic


def synthetic_logits(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (n, 1000) float32 logits with class structure: 100 groups of 10 sibling classes, unit class
    embeddings E = normalise(group centre + SYNTH_OWN * own direction) (1000 x 64), a feature per row =
    E[label] + SYNTH_NOISE * Gaussian noise, logit = SYNTH_SCALE * feature @ E.T. Siblings get high
    logits (the dark knowledge), the other 990 classes a Gaussian-like tail; the noise makes some rows wrong."""
    rng = np.random.default_rng(SEED)
    centres = rng.standard_normal((SYNTH_CLASSES // SYNTH_GROUP, SYNTH_DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    own = rng.standard_normal((SYNTH_CLASSES, SYNTH_DIM))
    own /= np.linalg.norm(own, axis=1, keepdims=True)
    emb = centres[np.arange(SYNTH_CLASSES) // SYNTH_GROUP] + SYNTH_OWN * own
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, SYNTH_CLASSES, size=n)
    feats = emb[labels] + SYNTH_NOISE * rng.standard_normal((n, SYNTH_DIM))
    return (SYNTH_SCALE * feats @ emb.T).astype(np.float32), labels.astype(np.int64)


def _teacher_stats(logits: np.ndarray, labels: np.ndarray) -> dict:
    stats: dict = {"accuracy_vs_labels": float((logits.argmax(axis=1) == labels).mean())}
    for t in TEMPERATURES:
        p = np.exp(_log_softmax(logits / t))
        top = -np.sort(-p, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
        stats[f"T{t:g}"] = {
            "mean_max_prob": float(top[:, 0].mean()),
            "mean_entropy_nats": float(entropy.mean()),
            **{f"mean_top{k}_mass": float(top[:, :k].sum(axis=1).mean()) for k in SYNTH_TOPK},
        }
    return stats


def _encode_batch(batch: dict, *, holder: list, labels: np.ndarray, encoding: str, top_k: int) -> dict:
    """map_batches function: ids -> the columns the teacher actors emit (id, split, label, encoded logits)."""
    import ray

    from orchestrator.teachers.soft_targets import encode_logits

    logits = ray.get(holder[0])  # zero-copy view of the object-store copy
    ids = batch["id"].astype(np.int64)
    return {
        "id": ids,
        "split": np.zeros(len(ids), dtype=np.uint8),
        "label": labels[ids],
        **encode_logits(logits[ids], encoding=encoding, top_k=top_k),
    }


def synthetic(n: int, work: Path) -> dict:
    import ray
    import ray.data

    from orchestrator.teachers.soft_targets import encode_logits, fingerprint, logit_columns, read_cache, write_cache

    started = time.perf_counter()
    logits, labels = synthetic_logits(n)
    stats = _teacher_stats(logits, labels)
    log(f"(b) synthetic teacher {logits.shape}: accuracy {stats['accuracy_vs_labels']:.3f}, "
        f"mean max prob at T=1 {stats['T1']['mean_max_prob']:.3f}, top-5 mass at T=1 {stats['T1']['mean_top5_mass']:.3f}")
    logits_ref = ray.put(logits)
    root = work / "synthetic_cache"
    variants = [("fp32", "fp32", 5), ("fp16", "fp16", 5), *((f"topk k={k}", "topk", k) for k in SYNTH_TOPK)]
    out = []
    for label, encoding, k in variants:
        t0 = time.perf_counter()
        raw = encode_logits(logits[:1], encoding=encoding, top_k=k)  # per-row array bytes, before parquet
        raw_bytes = sum(a.nbytes for a in raw.values())
        fp = fingerprint({"synthetic": [n, SYNTH_CLASSES, SYNTH_DIM, SYNTH_GROUP, SYNTH_OWN, SYNTH_SCALE, SYNTH_NOISE, SEED], "encoding": encoding,
                          "top_k": k if encoding == "topk" else None})
        columns = ["id", "split", "label", *logit_columns(encoding)]
        ds = ray.data.range(n, override_num_blocks=max(1, -(-n // WRITE_BATCH))).map_batches(
            _encode_batch, fn_kwargs={"holder": [logits_ref], "labels": labels, "encoding": encoding, "top_k": k},
            batch_size=WRITE_BATCH, batch_format="numpy")
        write_cache(ds, root, fp, columns=columns, extra_manifest={"dataset": "synthetic"})
        entry = read_cache(root, fp)
        sizes = entry_bytes(entry)
        decoded = decoded_logits(entry, encoding, SYNTH_CLASSES)
        dist = distortion(logits, decoded)
        out.append({"label": label, "encoding": encoding, "top_k": k if encoding == "topk" else None, "fingerprint": fp,
                    "raw_logit_bytes_per_example": raw_bytes, "storage": sizes, "distortion_vs_fp32": dist,
                    "seconds": round(time.perf_counter() - t0, 1)})
        log(f"(b) {label}: {sizes['bytes_per_example']:.1f} B/example on disk (raw logit arrays {raw_bytes} B), "
            f"KL(q||p) T=1 {dist['T1']['kl_q_p']:.3g}, top-1 agreement {dist['top1_agreement']:.4f}")
        shutil.rmtree(entry.path, ignore_errors=True)  # 80 MB for fp32 at 20k rows: keep the scratch dir small
    return {
        "rows": n, "classes": SYNTH_CLASSES, "generator": {"dim": SYNTH_DIM, "group": SYNTH_GROUP, "own": SYNTH_OWN, "scale": SYNTH_SCALE, "noise": SYNTH_NOISE, "seed": SEED},
        "teacher": stats, "encodings": out, "wall_s": round(time.perf_counter() - started, 1),
    }


# ------------------------------------------------------------------------------------ report


def _fmt(x, digits: int = 3) -> str:
    if isinstance(x, str):
        return "inf" if x == "inf" else x
    if x == 0:
        return "0"
    return f"{x:.{digits}g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.{digits + 1}f}".rstrip("0").rstrip(".")


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Command: `{report['command']}`  ",
        f"Run {report['finished_utc']} on {m.get('nproc')} x {m.get('cpu_model', '?')}, {m.get('mem_gib')} GiB; torch {m.get('torch')}, "
        f"ray {m.get('ray')}, mlflow {m.get('mlflow')}, Python {m.get('python')}; {report['wall_s'] / 60:.1f} min in all "
        f"(real runs {report['real_wall_s'] / 60:.1f} min, synthetic {report['synthetic']['wall_s'] / 60:.1f} min).  ",
        f"Load average (1/5/15 min) at start {report['load_start']}, at end {report['load_end']} (the machine was shared with other jobs)."
        + (" **Quick mode.**" if report["quick"] else ""),
        "",
    ]
    real = report["real"]
    runs = real["runs"]
    fp32 = runs[0]["storage"]
    kd = real["kd"]
    lines += [
        f"### (a) {real['dataset']}: one `distill run {real['config']}` per encoding"
        + (f" ({' '.join(real['base_overrides'])})" if real["base_overrides"] else ""),
        "",
        f"Teacher trained once (first job) and reused from the teacher cache by the others; students "
        f"{real['train_epochs']} epochs, T={kd['temperature']:g}, alpha={kd['alpha']:g}, seed {report['seed']}. Bytes: the job's "
        f"soft-target cache entry (train + test rows, {fp32['rows']:,}; columns id, split, label + the logit columns; "
        f"parquet as Ray Data writes it, codec {next(iter(fp32['columns'].values())).get('codec')}). "
        "Accuracy / agreement: the job's summary rows on the test set (agreement = same argmax as the teacher's "
        "decoded cached test logits).",
        "",
    ]
    students = [r["name"] for r in runs[0]["rows"] if r["role"] != "teacher"]
    head = "| encoding | bytes / example (entry) | logit columns bytes / example | vs fp32 | " + " | ".join(
        f"{s} test acc (agree)" for s in students) + f" | top-1 = fp32 | KL(q‖p) T={kd['temperature']:g} | dropped mass T={kd['temperature']:g} | job wall s |"
    lines += [head, "|" + "---|" * (8 + len(students))]
    for run in runs:
        st = run["storage"]
        logit_cols = [c for c in run["manifest_columns"] if c.startswith("teacher_")]
        logit_bytes = sum(st["columns"][c]["compressed"] for c in logit_cols) / st["rows"]
        by_name = {r["name"]: r for r in run["rows"]}
        cells = " | ".join(f"{by_name[s]['test_accuracy']:.4f} ({by_name[s]['agreement']:.4f})" for s in students)
        d = run["distortion_vs_fp32"]
        dt = d[f"T{kd['temperature']:g}"]
        lines.append(f"| {run['label']} | {st['bytes_per_example']:.1f} | {logit_bytes:.1f} | {st['bytes_per_example'] / fp32['bytes_per_example']:.2f}x | "
                     f"{cells} | {d['top1_agreement']:.4f} | {_fmt(dt['kl_q_p'])} | {_fmt(dt['dropped_mass'])} | {run['wall_s']:.0f} |")
    teacher = next(r for r in runs[0]["rows"] if r["role"] == "teacher")
    reused = all(run["teacher_from_cache"] for run in runs[1:]) and not runs[0]["teacher_from_cache"]
    lines += [
        "",
        f"Teacher `{teacher['name']}`: test accuracy {teacher['test_accuracy']:.4f} ({teacher['params']:,} parameters); "
        + (f"trained in the first job ({teacher['wall_s']:.0f} s of its wall time), loaded from the teacher cache by the others. "
           if reused else "teacher cache use: see `teacher_from_cache` in the JSON. ")
        + "KL(q‖p), dropped mass, top-1 = fp32: the entry's decoded soft targets against the fp32 entry's, all train + test rows "
        "(KL(p‖q) is infinite for top-k: decoding gives the dropped classes probability 0).",
        "",
    ]
    for s in students:
        if s.endswith("-baseline"):
            accs = [next(r for r in run["rows"] if r["name"] == s)["test_accuracy"] for run in runs]
            lines.append(f"- `{s}` reads no soft targets (labels only; same config and seed in every job), yet its test accuracy "
                         f"ranged {min(accs):.4f}-{max(accs):.4f} across these jobs: run-to-run variation of this size is not "
                         "caused by the encoding.")
    lines.append("")
    syn = report["synthetic"]
    st1 = syn["teacher"]["T1"]
    g = syn["generator"]
    lines += [
        f"### (b) Synthetic {syn['classes']}-class teacher, {syn['rows']:,} rows (no training)",
        "",
        f"Logits = {g['scale']:g} * (E[label] + {g['noise']:g} * noise) @ E.T, E ({syn['classes']} x {g['dim']}) unit class embeddings "
        f"= normalise(centre of the class's group of {g['group']} + {g['own']:g} * own direction), seed {g['seed']}: "
        f"argmax = label on {syn['teacher']['accuracy_vs_labels']:.3f} of rows; at T=1 mean max probability {st1['mean_max_prob']:.3f}, "
        f"mean entropy {st1['mean_entropy_nats']:.2f} nats; mean probability mass in the top 1/5/20/100 classes at T=1: "
        + " / ".join(f"{syn['teacher']['T1'][f'mean_top{k}_mass']:.3f}" for k in SYNTH_TOPK)
        + ", at T=4: " + " / ".join(f"{syn['teacher']['T4'][f'mean_top{k}_mass']:.3f}" for k in SYNTH_TOPK)
        + ", at T=20: " + " / ".join(f"{syn['teacher']['T20'][f'mean_top{k}_mass']:.3f}" for k in SYNTH_TOPK)
        + ". Written with `write_cache` from a Ray dataset, read back with `read_cache`, decoded with `decode_logits`.",
        "",
        "| encoding | logit arrays bytes / example | on disk bytes / example | vs fp32 | top-1 = fp32 | "
        + " | ".join(f"KL(p‖q) T={t:g}" for t in TEMPERATURES) + " | "
        + " | ".join(f"KL(q‖p) T={t:g}" for t in TEMPERATURES) + " | "
        + " | ".join(f"dropped mass T={t:g}" for t in TEMPERATURES) + " |",
        "|" + "---|" * (5 + 3 * len(TEMPERATURES)),
    ]
    syn_fp32 = syn["encodings"][0]["storage"]["bytes_per_example"]
    for e in syn["encodings"]:
        d = e["distortion_vs_fp32"]
        lines.append(
            f"| {e['label']} | {e['raw_logit_bytes_per_example']} | {e['storage']['bytes_per_example']:.1f} | "
            f"{e['storage']['bytes_per_example'] / syn_fp32:.3f}x | {d['top1_agreement']:.4f} | "
            + " | ".join(_fmt(d[f"T{t:g}"]["kl_p_q"]) for t in TEMPERATURES) + " | "
            + " | ".join(_fmt(d[f"T{t:g}"]["kl_q_p"]) for t in TEMPERATURES) + " | "
            + " | ".join(_fmt(d[f"T{t:g}"]["dropped_mass"]) for t in TEMPERATURES) + " |"
        )
    lines += [
        "",
        "p_T = softmax(fp32 logits / T), q_T = softmax(decoded / T), means over rows. For top-k, q_T is the teacher's "
        "distribution renormalised over the kept k classes at every T, so per row KL(q‖p) = -log(kept mass) (up to float16 rounding) and the dropped mass "
        "is what the student never sees; it grows with T. Full per-T numbers (also total variation) in the JSON.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits and 5,000 synthetic rows (a few minutes)")
    parser.add_argument("--workdir", help="scratch dir for caches, MLflow and Ray results (default: a new temp dir, removed at the end)")
    parser.add_argument("--synthetic-rows", type=int, help="override the synthetic row count")
    parser.add_argument("--skip-real", action="store_true", help="only the synthetic part (b)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    config, extra, topks, synth_rows = MODES[mode]
    synth_rows = args.synthetic_rows or synth_rows
    started, load_start = time.perf_counter(), loadavg()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.pop("RAY_ADDRESS", None)  # always a fresh local Ray, never another job's cluster
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="kd-storage-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"mode {mode}, workdir {work}, load average {load_start}")
    import ray

    from orchestrator.config import load_config
    from orchestrator.flows import job

    try:
        real, real_wall = None, 0.0
        if not args.skip_real:
            t0 = time.perf_counter()
            real = real_runs(config, extra, topks, work)
            real_wall = time.perf_counter() - t0
        else:
            job.init_ray(None, load_config(REPO / config))
        syn = synthetic(synth_rows, work)
    finally:
        ray.shutdown()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "command": " ".join([".venv/bin/python", "benchmarks/bench_storage.py", *(argv if argv is not None else sys.argv[1:])]),
        "finished_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "seed": SEED,
        "machine": machine(),
        "load_start": load_start,
        "load_end": loadavg(),
        "wall_s": round(time.perf_counter() - started, 1),
        "real_wall_s": round(real_wall, 1),
        "real": real,
        "synthetic": syn,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "storage"  # as bench_pipeline: --quick writes the same files, marked quick
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    if real is not None:
        (out / f"{stem}.md").write_text(markdown(report))
        print(markdown(report))
    log(f"done in {report['wall_s']:.0f} s; wrote {out / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
