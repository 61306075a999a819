"""A real two-node Ray cluster and a real MLflow server on loopback, started and stopped by this test run only.

Everything runs as subprocesses with one controlled environment: its own Ray temp dir, its own
ports, its own auth token file. Nothing is stopped by name (`ray stop` would kill every Ray on the
host, other developers' too): processes are found by PID, as those whose command line or
environment names this cluster's private temp dir, and signalled one by one.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:  # it answers (401 without the token is an answer)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


def _pids_mentioning(marker: str) -> list[int]:
    """PIDs whose command line or environment contains `marker` (this cluster's private dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        for name in ("cmdline", "environ"):
            try:
                if marker.encode() in (entry / name).read_bytes():
                    found.append(int(entry.name))
                    break
            except OSError:
                continue
    return found


def kill_pids(pids: list[int], grace_s: float = 10.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and _state(p) != "Z"]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


@dataclass
class LocalCluster:
    """`ray start --head` + a second `ray start --address` node + `distill mlflow-server`, all on 127.0.0.1."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kdc", dir="/tmp")))  # short: Unix socket paths
    head_cpus: int = 1
    worker_cpus: int = 1
    env: dict[str, str] = field(default_factory=dict)
    gcs_address: str = ""
    dashboard_url: str = ""
    mlflow_url: str = ""
    mlflow_proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_")) and k != "DISTILL_SHARED_STORAGE"}
        env.update({
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # job entrypoints run `python` from the node's PATH
            "RAY_AUTH_MODE": "token",  # Ray 2.60's default, with a token of this cluster's own
            "RAY_AUTH_TOKEN_PATH": str(token),
            "KD_TEST_CLUSTER": str(self.root),  # marks every process of this cluster (inherited environment)
            "RAY_USAGE_STATS_ENABLED": "0",
        })
        self.env = env

    @property
    def shared(self) -> Path:
        """Stands in for an NFS mount: both nodes run on this host, so they do see the same directory."""
        path = self.root / "shared"
        path.mkdir(exist_ok=True)
        return path

    def _ray_start(self, *args: str) -> None:
        done = subprocess.run([str(VENV_BIN / "ray"), "start", *args, "--disable-usage-stats"], env=self.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)
        if done.returncode:  # what `ray start` said, in the failure's message, not only its exit status
            raise RuntimeError(f"`ray start {args[0]}` exited {done.returncode}; its output ends:\n{done.stdout[-4000:]}")

    def start_ray(self) -> None:
        gcs, dash, client, *head_ports = free_ports(8)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard_url = f"http://127.0.0.1:{dash}"
        self._ray_start(
            "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--num-cpus={self.head_cpus}", "--num-gpus=0",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
            f"--temp-dir={self.root / 'ray'}", *self._node_ports(head_ports),
        )
        self._ray_start(
            f"--address={self.gcs_address}", "--node-ip-address=127.0.0.1", f"--num-cpus={self.worker_cpus}", "--num-gpus=0",
            # A temp dir of its own: with the head's, both nodes' runtime-env agents would manage (and garbage-collect)
            # the same unpacked working_dir, deleting it under the running job's driver.
            f"--temp-dir={self.root / 'ray2'}",
            *self._node_ports(free_ports(5)),
        )
        wait_http(self.dashboard_url + "/api/version", 60)

    @staticmethod
    def _node_ports(ports: list[int]) -> list[str]:
        names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "metrics-export-port", "runtime-env-agent-port")
        return [f"--{name}={port}" for name, port in zip(names, ports)]

    def start_mlflow(self, wait: bool = True) -> None:
        (port,) = free_ports(1)
        self.mlflow_url = f"http://127.0.0.1:{port}"
        self.mlflow_proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "mlflow-server", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination", str(self.root / "mlartifacts")],
            env=self.env, cwd=self.root, stdout=subprocess.DEVNULL, stderr=open(self.root / "mlflow-server.log", "w"),
        )
        if wait:
            self.wait_mlflow()

    def wait_mlflow(self) -> None:
        wait_http(self.mlflow_url + "/health", 180, self.mlflow_proc)

    def distill(self, *args: str, timeout_s: float = 600, **env: str) -> subprocess.CompletedProcess:
        """`distill ...` in a fresh process, against this cluster and this MLflow server."""
        run_env = {**self.env, "RAY_ADDRESS": self.dashboard_url, "MLFLOW_TRACKING_URI": self.mlflow_url, **env}
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=run_env, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=timeout_s)

    def stop(self) -> None:
        if self.mlflow_proc is not None and self.mlflow_proc.poll() is None:
            self.mlflow_proc.send_signal(signal.SIGTERM)  # `distill mlflow-server` stops its server's process group
            try:
                self.mlflow_proc.wait(20)
            except subprocess.TimeoutExpired:
                self.mlflow_proc.kill()
        for _ in range(5):  # a dying raylet can still spawn a worker: scan again until nothing is left
            pids = self.leftover_pids()
            if not pids:
                return
            kill_pids(pids, grace_s=3.0)  # a test cluster's state is thrown away: no need to wait long for a clean exit

    def leftover_pids(self) -> list[int]:
        return [p for p in _pids_mentioning(str(self.root)) if _state(p) != "Z"]
