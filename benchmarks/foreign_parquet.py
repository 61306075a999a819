"""A parquet dataset this project did not make, distilled end to end through the parquet source, beside the
same job on the bundled loader: same pixels and seed, so the same test errors, model by model.

    .venv/bin/python benchmarks/foreign_parquet.py            # full Fashion-MNIST, 60,000 + 10,000 rows
    .venv/bin/python benchmarks/foreign_parquet.py --quick    # 3,000 training rows: checks the plumbing only
    .venv/bin/python benchmarks/foreign_parquet.py --workdir DIR   # keep the parquet files, stores and caches in DIR
    .venv/bin/python benchmarks/foreign_parquet.py --local         # the parquet jobs read the local folder, not S3

The data is Fashion-MNIST as Debian's `dataset-fashion-mnist` ships it (IDX files), read here with gzip and
numpy, not with the project's loader, each image PNG-encoded by Pillow and written by pyarrow the way an
export job writes a table: the training rows shuffled into four part files of a folder, an `item_id` column
that restores their order, the class in a column called `category`. Then `distill run` twice, each in its
own directory (its own MLflow store and caches, so the second job reuses nothing of the first): once with
`dataset.name=fashion_mnist`, once with `dataset.name=parquet` on those files, read from an S3 URI (a moto
S3 server on 127.0.0.1, as the tests start one, the folder copied into a bucket; `--local` reads the
folder). A third job reads the same training rows written without their label column
(`dataset.train_labels: false`, a transfer set) and learns from the first job's teacher alone. Writes
benchmarks/results/foreign_parquet.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness
from harness import REPO, distill_run, header_lines, loadavg, log, report_header, table, write_result  # noqa: E402

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
CONFIG = REPO / "configs" / "fashion_mlp16.yaml"
# The fashion_mlp16 job made cheap enough to run twice: a small CNN teacher for 6 epochs without augmentation or
# dropout (with them, 3 epochs left it behind the students' label-only twin), the students for 5.
JOB = ["teachers.0.name=cnn8-16", "teachers.0.channels=[8, 16]", "teachers.0.hidden=[64]", "teachers.0.dropout=0", "teachers.0.train.input_jitter=0",
       "teachers.0.train.flip=false", "teachers.0.train.epochs=6", "train.epochs=5", "tracking.experiment=foreign-parquet"]
QUICK = ["dataset.limit=3000", "dataset.test_limit=1000", "teachers.0.train.epochs=1", "train.epochs=1"]
TRAIN_PARTS = 4


def read_debian_idx(path: Path) -> np.ndarray:
    """An IDX file as LeCun describes it (two zero bytes, a type byte, ndim, big-endian dims, the values)."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def write_parquet(root: Path) -> dict:
    """train/ (TRAIN_PARTS shuffled part files) and test.parquet, from Debian's files; what was written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.perf_counter()
    written = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_debian_idx(DEBIAN_FASHION / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_debian_idx(DEBIAN_FASHION / f"{prefix}-labels-idx1-ubyte.gz")
        order = np.random.default_rng(7).permutation(len(labels))  # stored out of order: item_id restores it
        parts = np.array_split(order, TRAIN_PARTS) if split == "train" else [order]
        if split == "train":
            (root / "train").mkdir(parents=True, exist_ok=True)
            (root / "train-unlabelled").mkdir(parents=True, exist_ok=True)
        for i, rows in enumerate(parts):
            part = pa.table({"item_id": pa.array(rows, pa.int64()), "category": pa.array(labels[rows], pa.int16()),
                             "png": pa.array([png(images[r]) for r in rows], pa.binary())})
            pq.write_table(part, root / "train" / f"part-{i:05d}.parquet" if split == "train" else root / "test.parquet")
            if split == "train":  # the same rows without their labels: a transfer set
                pq.write_table(part.drop_columns(["category"]), root / "train-unlabelled" / f"part-{i:05d}.parquet")
        written[split] = {"rows": int(len(labels)), "files": len(parts)}
    files = list(root.rglob("*.parquet"))
    return {**written, "bytes": sum(f.stat().st_size for f in files), "write_s": round(time.perf_counter() - started, 1),
            "writer": "pyarrow.parquet.write_table, PNG bytes from Pillow, labels int16 in `category`, ids in `item_id`"}


@contextlib.contextmanager
def s3_copy(root: Path) -> Iterator[Callable[[str], str]]:
    """The written files behind an S3 URI: a moto S3 server on 127.0.0.1 (as the tests start one), the folder copied
    into a bucket; yields name -> URI. The AWS variables it needs are set here, for this process and its jobs."""
    import pyarrow.fs as pafs

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):  # up to a minute for it to listen
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.3)
        os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"})
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        bucket = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                                   endpoint_override=f"127.0.0.1:{port}", allow_bucket_creation=True)
        bucket.create_dir("kd-bucket")
        pafs.copy_files(str(root), "kd-bucket/fashion", destination_filesystem=bucket)
        yield lambda name: f"s3://kd-bucket/fashion/{name}?{query}"
    finally:
        server.terminate()
        server.wait(timeout=20)


def parquet_overrides(at: Callable[[str], str], train: str = "train") -> list[str]:
    """`at`: the written file or folder of that name, as a path or a URI; `train`: the training folder's name."""
    return ["dataset.name=parquet", f"dataset.train_path={at(train)}", f"dataset.test_path={at('test.parquet')}",
            "dataset.image_column=png", "dataset.label_column=category", "dataset.id_column=item_id"]


def unlabelled_overrides(at: Callable[[str], str], teacher_run_id: str) -> list[str]:
    """The training rows without labels; the bundled job's teacher (from its MLflow run) teaches, the student learns from it alone."""
    return [*parquet_overrides(at, train="train-unlabelled"), "dataset.train_labels=false", "transfer.labels=false",
            "baseline=false", f"teachers.0.mlflow_model=runs:/{teacher_run_id}/model", "tracking.experiment=foreign-parquet-unlabelled"]


def same_pixels(at: Callable[[str], str], extra: list[str]) -> bool:
    """Both sources hold the same images and labels in the same order: the parquet files read by the driver's reader
    here (the jobs read them in Ray tasks, the default; tests/test_ray_reader.py holds those rows to the driver reader's)."""
    from orchestrator.config import load_config
    from orchestrator.data.datasets import load_arrays

    bundled = load_arrays(load_config(CONFIG, [*JOB, *extra, "dataset.reader=driver"]).dataset)
    parquet = load_arrays(load_config(CONFIG, [*JOB, *extra, *parquet_overrides(at), "dataset.reader=driver"]).dataset)
    return all(np.array_equal(getattr(getattr(bundled, s), a), getattr(getattr(parquet, s), a)) for s in ("train", "test") for a in ("images", "labels"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3,000 training rows, 1 epoch each: the plumbing only")
    parser.add_argument("--workdir", help="keep the parquet files, MLflow stores and caches here (default: a temporary folder)")
    parser.add_argument("--local", action="store_true", help="read the parquet files from the local folder, not from an S3 URI")
    args = parser.parse_args(argv)
    load_start, t0 = loadavg(), time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="foreign-parquet-"))
    log(f"writing Debian's Fashion-MNIST as parquet under {work / 'parquet'}")
    written = write_parquet(work / "parquet")
    with contextlib.nullcontext(lambda name: str(work / "parquet" / name)) if args.local else s3_copy(work / "parquet") as at:
        log(f"the parquet jobs read {at('train')}")
        jobs, identical_pixels = run_jobs(work, at, QUICK if args.quick else [])
    errors = {source: {r["name"]: r["test_errors"] for r in jobs[source]["rows"]} for source in ("bundled", "parquet")}
    reader = "driver" if any(o == "dataset.reader=driver" for o in jobs["parquet"]["command"].split()) else "ray"
    report = {**report_header(load_start), "quick": args.quick, "parquet_reader": reader, "bundled_reader": bundled_reader(),
              "wall_s": round(time.perf_counter() - t0, 1), "written": written,
              "read_from": "local folder" if args.local else "S3 URI (moto server on 127.0.0.1)", "identical_pixels": identical_pixels,
              "identical_test_errors": errors["bundled"] == errors["parquet"], "jobs": jobs}
    path = write_result("foreign_parquet", report)
    print("\n".join(render(report).splitlines()[3:]))
    log(f"wrote {path}")
    return 0 if identical_pixels else 1


def run_jobs(work: Path, at: Callable[[str], str], extra: list[str]) -> tuple[dict, bool]:
    """The bundled job, the parquet job and the job on the rows without labels; whether both sources load the same arrays."""
    identical_pixels = same_pixels(at, extra)
    log(f"same pixels and labels from both sources: {identical_pixels}")
    jobs = {}
    for source, overrides in (("bundled", []), ("parquet", parquet_overrides(at))):
        workdir = work / source
        workdir.mkdir(exist_ok=True)
        log(f"distill run ({source} source) in {workdir}")
        jobs[source] = distill_run(CONFIG, [*JOB, *extra, *overrides], workdir=workdir, summary=workdir / "summary.json", log=workdir / "job.log")
    # Third: the transfer set without labels, in the bundled job's directory (its MLflow store holds the teacher).
    teacher_run = next(r["mlflow_run_id"] for r in jobs["bundled"]["rows"] if r["role"] == "teacher")
    log("distill run (parquet source without labels, the bundled job's teacher)")
    workdir = work / "bundled"
    jobs["unlabelled"] = distill_run(CONFIG, [*JOB, *extra, *unlabelled_overrides(at, teacher_run)], workdir=workdir,
                                     summary=workdir / "summary-unlabelled.json", log=workdir / "job-unlabelled.log")
    return jobs, identical_pixels


def bundled_reader() -> str:
    """Where the bundled job's images are read, by the code that ran it (its command leaves dataset.reader unset)."""
    from orchestrator.config import load_config

    return "ray" if load_config(CONFIG, JOB).dataset.read_in_ray else "driver"


# What the report says of the bundled job's reader (older reports have no bundled_reader: the driver's was the only one).
BUNDLED_READERS = {"ray": "The bundled job's images were read by Ray tasks too (`dataset.reader` unset; the default for `fashion_mnist` since 2026-12-03).",
                   "driver": "The bundled job's images were read by the driver."}
# What the report says of the parquet jobs' reader (older reports have no parquet_reader: the driver's was the default).
READERS = {"ray": "The parquet jobs' images were read by Ray tasks (`dataset.reader` unset: the default), not by the driver.",
           "driver": "The parquet jobs' images were read by the driver (`dataset.reader: driver`)."}

def render(report: dict) -> str:
    jobs = report["jobs"]
    written = report["written"]
    rows = []
    for row in jobs["parquet"]["rows"]:
        bundled = next(r for r in jobs["bundled"]["rows"] if r["name"] == row["name"])
        rows.append([row["role"], row["name"], bundled["test_errors"], row["test_errors"], "yes" if bundled["test_errors"] == row["test_errors"] else "**no**"])
    rows.append(["job wall s", "", f"{jobs['bundled']['wall_s']:.0f}", f"{jobs['parquet']['wall_s']:.0f}", ""])
    by_role = {r["role"]: r for r in jobs["bundled"]["rows"]}
    unlabelled = next(r for r in jobs["unlabelled"]["rows"] if r["role"] == "student")
    transfer_rows = [["the bundled job's teacher", by_role["teacher"]["test_errors"], "labels"],
                     [f"{by_role['baseline']['name']} (label-only twin, bundled job)", by_role["baseline"]["test_errors"], "labels"],
                     [f"{by_role['student']['name']} distilled (bundled job)", by_role["student"]["test_errors"], "labels and the teacher"],
                     [f"{unlabelled['name']} from the transfer set without labels", unlabelled["test_errors"], "the teacher alone"]]
    lines = header_lines(report) + [
        "",
        f"Written: {written['train']['rows']:,} training rows in {written['train']['files']} part files and {written['test']['rows']:,} test rows, "
        f"{written['bytes'] / 1e6:.1f} MB, in {written['write_s']:.0f} s ({written['writer']}), from Debian's IDX files, not through this project's loader. "
        f"The parquet jobs read them from {report.get('read_from', 'the local folder')}. "
        f"Same images and labels, in the same order, from both sources: {'yes' if report['identical_pixels'] else '**no**'}.",
        "",
        *table(["role", "name", "test errors, bundled `fashion_mnist`", "test errors, `parquet` source", "same"], rows, "llrrl"),
        "",
        "Transfer set without labels: the same training rows written again without their `category` column, read with "
        "`dataset.train_labels=false transfer.labels=false baseline=false` and the bundled job's teacher (`teachers.0.mlflow_model`, no "
        "training); the student learns from the teacher's soft targets alone. Its row beside the bundled job's, on the same training images "
        "(one seed each: this shows the path works, it is not a quality claim):",
        "",
        *table(["model", "test errors", "learnt from"], transfer_rows, "lrl"),
        "",
        f"- Each job: `{jobs['parquet']['command'].split(' dataset.name=parquet')[0]}`, the parquet one with `dataset.name=parquet` and its "
        "train_path (the folder, as a path or URI), test_path, image_column=png, label_column=category, id_column=item_id; each in its own directory "
        "(MLflow store, teacher and soft-target caches), so the parquet job trained its own teacher. "
        + READERS.get(report.get("parquet_reader"), "The parquet jobs' images were read by the driver (the default then).") + " "
        + BUNDLED_READERS.get(report.get("bundled_reader"), "The bundled job's images were read by the driver (the only reader then)."),
        f"- Load average per job: bundled {jobs['bundled']['load_start']} -> {jobs['bundled']['load_end']}, "
        f"parquet {jobs['parquet']['load_start']} -> {jobs['parquet']['load_end']}, "
        f"without labels {jobs['unlabelled']['load_start']} -> {jobs['unlabelled']['load_end']} ({jobs['unlabelled']['wall_s']:.0f} s).",
    ]
    if report.get("quick"):
        lines.append("- **Quick run** (3,000 training rows, 1 epoch): the plumbing, not a result.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
