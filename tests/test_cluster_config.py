"""cluster.yaml and its on-prem variant pass Ray's own launcher validation (offline, no cloud calls);
the KubeRay RayJob manifest has the shape the operator expects."""

from __future__ import annotations

import copy

import pytest
import yaml
from conftest import REPO_ROOT

CLOUD = REPO_ROOT / "cluster.yaml"
ON_PREM = REPO_ROOT / "deploy" / "cluster-local.yaml"
RAYJOB = REPO_ROOT / "deploy" / "kuberay-rayjob.yaml"


def _ray_validate(config: dict) -> dict:
    """What `ray up` does to a config before it touches a provider: fill defaults, then check the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _load(path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", [CLOUD, ON_PREM], ids=["cluster.yaml", "cluster-local.yaml"])
def test_launcher_configs_pass_ray_validation(path):
    prepared = _ray_validate(_load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert any("pip install" in c and "-e ~/kd-orchestrator" in c for c in prepared["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("--plasma-directory=/dev/shm" in c for c in prepared[key]), key
    assert {".venv", ".kd_cache", "mlflow.db", "ray_results", "mlartifacts"} <= set(prepared["rsync_exclude"])
    # Ray 2.60 token auth: the launcher does not distribute a token, so every node gets the same file.
    assert prepared["file_mounts"]["~/.ray/auth_token"] == "~/.ray/kd-cluster-token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[key] if " ray start " in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key


def test_cloud_shape_is_cpu_head_and_autoscaling_gpu_workers():
    config = _load(CLOUD)
    prepared = _ray_validate(config)
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # a CPU instance family
    workers = {k: v for k, v in prepared["available_node_types"].items() if k != prepared["head_node_type"]}
    assert len(workers) == 1
    (gpu,) = workers.values()
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))  # AWS GPU instance families
    assert 0 < gpu["min_workers"] < gpu["max_workers"] <= prepared["max_workers"]
    assert "--dashboard-host=127.0.0.1" in " ".join(prepared["head_start_ray_commands"])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(max_worker=4),  # misspelled top-level key
        lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=1),  # misspelled node-type key
        lambda c: c["docker"].update(imagee="x"),
        lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=9),  # min above the global max
    ],
    ids=["top-level", "node-type", "docker", "min>max"],
)
def test_validation_is_real(mutate):
    config = _load(CLOUD)
    mutate(config)
    import jsonschema

    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _ray_validate(config)


def test_kuberay_rayjob_manifest_shape():
    job = _load(RAYJOB)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert "jobs/distill.py" in spec["entrypoint"] and "/mnt/shared/" in spec["entrypoint"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http")  # a server, never a node-local SQLite file
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    pods = (cluster["headGroupSpec"]["template"]["spec"], group["template"]["spec"], spec["submitterPodTemplate"]["spec"])
    for pod in pods:  # one token for every pod (Ray 2.60 token auth)
        env = {e["name"]: e for c in pod["containers"] for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "kd-ray-token"
    for pod in pods[:2]:
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert "persistentVolumeClaim" in volumes[mounts["/mnt/shared"]]
