"""Teacher inference pieces: ensembles (pure) and the map_batches callable on a real Ray."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from test_uri_cache import s3_server  # noqa: F401  (a fixture: the moto S3 server)

from orchestrator.config import ModelSpec
from orchestrator.data.datasets import normalize_images
from orchestrator.data.views import ViewPolicy, views_of
from orchestrator.teachers.pool import TeacherPredictor, ensemble_logits, teacher_forward_rows
from orchestrator.teachers.soft_target_columns import gather_soft_targets
from orchestrator.teachers.soft_targets import decode_logits
from orchestrator.train.models import build_model


def test_logit_ensemble_is_weighted_mean():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    b = torch.tensor([[3.0, 0.0, -1.0]])
    out = ensemble_logits([a, b], [3.0, 1.0], rule="logits")
    assert torch.allclose(out, torch.tensor([[1.5, 1.5, 2.0]]))


def test_probability_ensemble_softmaxes_to_weighted_mean_of_probabilities():
    torch.manual_seed(0)
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    out = ensemble_logits([a, b], [0.25, 0.75], rule="probs")
    expected = 0.25 * a.softmax(-1) + 0.75 * b.softmax(-1)
    assert torch.allclose(out.softmax(-1), expected, atol=1e-6)
    # pinned (= log of the weighted probability mixture), so a change of formula is caught
    assert out[0, 0].item() == pytest.approx(-1.719162, abs=1e-5)


def test_unknown_rule():
    with pytest.raises(ValueError, match="unknown ensemble rule"):
        ensemble_logits([torch.zeros(1, 2)], [1.0], rule="median")


def test_gather_soft_targets_gathers_every_view_by_id():
    columns = {"teacher_logits": np.arange(24, dtype=np.float16).reshape(6, 2, 2)}  # 6 examples x 2 views x 2 classes
    out = gather_soft_targets(columns, np.array([5, 0, 3]))
    assert out["teacher_logits"].tolist() == [[[20, 21], [22, 23]], [[0, 1], [2, 3]], [[12, 13], [14, 15]]]
    assert set(out) == {"teacher_logits"}


def test_predictor_matches_the_model_and_counts_rows(ray_session):
    spec = ModelSpec(family="mlp", hidden=[8])
    torch.manual_seed(0)
    model = build_model(spec, (1, 4, 4), 3).eval()
    predictor = TeacherPredictor(
        [{"name": "t", "spec": spec.model_dump(), "state_dict": model.state_dict(), "weight": 1.0}],
        input_shape=(1, 4, 4), num_classes=3, mean=(0.5,), std=(0.25,), n_train=3,
        encoding="fp32", top_k=5, ensemble="logits", threads=1, use_gpu=False,
    )
    images = np.random.default_rng(0).integers(0, 256, size=(5, 1, 4, 4), dtype=np.uint8)
    before = teacher_forward_rows()
    out = predictor({"id": np.arange(5), "image": images, "label": np.array([0, 1, 2, 0, 1])})
    with torch.no_grad():
        expected = model(normalize_images(torch.from_numpy(images), (0.5,), (0.25,)))
    assert torch.allclose(decode_logits({"teacher_logits": out["teacher_logits"]}, num_classes=3), expected, atol=1e-6)
    assert out["id"].tolist() == [0, 1, 2, 3, 4] and out["view"].tolist() == [0] * 5
    # the counter is updated asynchronously by the actor; wait for it briefly
    for _ in range(50):
        if teacher_forward_rows() - before == 5:
            break
        time.sleep(0.1)
    assert teacher_forward_rows() - before == 5


def test_warm_actors_serve_two_queued_passes_each_with_its_own_teacher(ray_session):
    """Two passes queued on the same two actors before either finishes: every output row is its own pass's
    teacher's logits, and the actors are the same processes before and after (the pool stays warm)."""
    import pyarrow as pa
    import ray

    from orchestrator.data.datasets import Split
    from orchestrator.data.ray_objects import put_image_blocks
    from orchestrator.teachers.soft_targets import DENSE_COLUMN, column_to_numpy
    from orchestrator.teachers.warm_pool import run_pass, teacher_pool

    actors = teacher_pool(2, threads=1)
    pids = ray.get([actor.ready.remote() for actor in actors])
    spec = ModelSpec(family="mlp", hidden=[8])
    images = np.random.default_rng(1).integers(0, 256, size=(40, 1, 4, 4), dtype=np.uint8)
    blocks = put_image_blocks([Split(images, np.zeros(40, dtype=np.int64))], 8)
    models, passes = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_model(spec, (1, 4, 4), 3).eval())
        kwargs = {"teachers": [{"name": f"t{seed}", "spec": spec.model_dump(), "state_dict": models[-1].state_dict(), "weight": 1.0}],
                  "input_shape": (1, 4, 4), "num_classes": 3, "mean": (0.5,), "std": (0.25,), "n_train": 40, "encoding": "fp32",
                  "top_k": 5, "ensemble": "logits", "threads": 1, "use_gpu": False}
        passes.append(run_pass(actors, kwargs, blocks))
    for model, outputs in zip(models, passes):
        table = pa.concat_tables(ray.get(outputs))
        ids = column_to_numpy(table, "id")
        assert sorted(ids.tolist()) == list(range(40))
        with torch.no_grad():
            expected = model(normalize_images(torch.from_numpy(images[ids]), (0.5,), (0.25,))).numpy()
        np.testing.assert_allclose(column_to_numpy(table, DENSE_COLUMN), expected, atol=1e-6)
    assert teacher_pool(2, threads=1) == actors and ray.get([actor.ready.remote() for actor in actors]) == pids



@pytest.mark.parametrize("where", ["local path", "file:// URI", "s3:// URI"])
def test_each_actor_writes_its_output_blocks_as_the_caches_parquet_files(ray_session, tmp_path, where, request):
    """With a shard directory, every block's soft-target rows are written by the actor that computed them, one
    parquet file per block with the cache's columns; the published entry holds exactly the rows the pass returned."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from orchestrator.data.datasets import Split
    from orchestrator.data.ray_objects import put_image_blocks
    from orchestrator.teachers.cache_manifest import entry_files
    from orchestrator.teachers.soft_targets import DENSE_COLUMN, load_table, publish_cache, read_cache
    from orchestrator.teachers.warm_pool import Shards, run_pass, teacher_pool

    spec = ModelSpec(family="mlp", hidden=[8])
    images = np.random.default_rng(2).integers(0, 256, size=(40, 1, 4, 4), dtype=np.uint8)
    blocks = put_image_blocks([Split(images, np.zeros(40, dtype=np.int64))], 8)
    kwargs = {"teachers": [{"name": "t", "spec": spec.model_dump(), "state_dict": build_model(spec, (1, 4, 4), 3).state_dict(), "weight": 1.0}],
              "input_shape": (1, 4, 4), "num_classes": 3, "mean": (0.5,), "std": (0.25,), "n_train": 40, "encoding": "fp16",
              "top_k": 5, "ensemble": "logits", "threads": 1, "use_gpu": False}
    columns = ["id", "view", DENSE_COLUMN]
    if where == "s3:// URI":  # a moto S3 server; the credentials ride in the URI, to the actors too
        root = request.getfixturevalue("s3_server")[0].replace("s3://", "s3://testing:testing@", 1)
    else:
        root = tmp_path.as_uri() + "/kd-cache" if where == "file:// URI" else str(tmp_path / "kd-cache")
    outputs: list = []

    def write(directory, filesystem):
        assert (filesystem is not None) == (where != "local path")
        outputs.extend(run_pass(teacher_pool(2, threads=1), kwargs, blocks, Shards(directory, columns, filesystem)))
        ray.wait(outputs, num_returns=len(outputs))  # every file written before the manifest describes them

    entry = publish_cache(write, root, "abc", columns=columns)
    tables = ray.get(outputs)
    names = [item["name"] for item in entry.manifest["files"]]
    assert [name.rsplit("/", 1)[-1] for name in names] == [f"part-{i:06d}.parquet" for i in range(len(blocks))]
    files = entry_files(entry)
    written = [pq.read_table(files.path(name), filesystem=files.filesystem) for name in names]
    assert [t.num_rows for t in written] == [t.num_rows for t in tables] and all(t.column_names == columns for t in written)
    assert load_table(read_cache(root, "abc")).equals(pa.concat_tables(tables).select(columns).sort_by("id"))

# Another driver on the same cluster, running the teacher on 7 rows: its own job, its own count.
OTHER_JOB = """
import sys, time
import numpy as np, ray, torch
from orchestrator.config import ModelSpec
from orchestrator.train.models import build_model
from orchestrator.teachers.pool import TeacherPredictor, forward_row_counter, teacher_forward_rows

ray.init(address=sys.argv[1])
forward_row_counter("job")
spec = ModelSpec(family="mlp", hidden=[8])
teacher = {"name": "t", "spec": spec.model_dump(), "state_dict": build_model(spec, (1, 4, 4), 3).state_dict(), "weight": 1.0}
predictor = TeacherPredictor([teacher], input_shape=(1, 4, 4), num_classes=3, mean=(0.5,), std=(0.25,), n_train=0,
                             encoding="fp32", top_k=5, ensemble="logits", threads=1, use_gpu=False)
predictor({"id": np.arange(7), "image": np.zeros((7, 1, 4, 4), np.uint8), "label": np.zeros(7, np.int64)})
for _ in range(50):
    if teacher_forward_rows("job") == 7:
        break
    time.sleep(0.1)
print("OTHER JOB ROWS", teacher_forward_rows("job"))
"""


def test_a_jobs_count_is_its_own_beside_another_job(ray_session, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from orchestrator.teachers.pool import forward_row_counter

    forward_row_counter("job")  # the driver makes its job's counter first, as soft_target_stage does
    cluster_before, job_before = teacher_forward_rows(), teacher_forward_rows("job")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RAY_ADDRESS", None)
    other = subprocess.run([sys.executable, "-c", OTHER_JOB, ray_session.get_runtime_context().gcs_address], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert "OTHER JOB ROWS 7" in other.stdout, other.stderr[-3000:]
    assert teacher_forward_rows() - cluster_before == 7  # the cluster saw the other job's rows
    assert teacher_forward_rows("job") == job_before  # this job did not


def test_predictor_gives_every_view_of_train_rows_and_view_0_of_test_rows(ray_session):
    """Each (id, view) row holds the teacher's logits for exactly that view of that image."""
    spec = ModelSpec(family="cnn", channels=[4], hidden=[])
    torch.manual_seed(0)
    model = build_model(spec, (1, 6, 6), 3).eval()
    views = {"max_shift": 1, "flip": True, "num_views": 5, "seed": 3, "fill": 9}
    predictor = TeacherPredictor(
        [{"name": "t", "spec": spec.model_dump(), "state_dict": model.state_dict(), "weight": 1.0}],
        input_shape=(1, 6, 6), num_classes=3, mean=(0.5,), std=(0.25,), n_train=2,
        encoding="fp32", top_k=5, ensemble="logits", threads=1, use_gpu=False, views=views, forward_batch=3,
    )
    images = np.random.default_rng(1).integers(0, 256, size=(3, 1, 6, 6), dtype=np.uint8)
    out = predictor({"id": np.array([7, 1, 2]), "image": images, "label": np.zeros(3, dtype=np.int64)})
    # n_train=2: id 1 is a training row (all 5 views), ids 7 and 2 are test rows (view 0 only)
    assert out["id"].tolist() == [7, 1, 1, 1, 1, 1, 2] and out["view"].tolist() == [0, 0, 1, 2, 3, 4, 0]
    policy = ViewPolicy(**views)
    for row, (i, v) in enumerate(zip(out["id"], out["view"])):
        source = torch.from_numpy(images[[7, 1, 2].index(int(i))])[None]
        view = views_of(source, torch.tensor([int(i)]), torch.tensor([int(v)]), policy)
        with torch.no_grad():
            expected = model(normalize_images(view, (0.5,), (0.25,)))[0]
        assert torch.allclose(torch.from_numpy(out["teacher_logits"][row]), expected, atol=1e-5)
