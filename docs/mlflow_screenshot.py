"""A screenshot of the MLflow UI over a job's store, from headless Chromium (Debian's `chromium` package).

    apt-get install -y chromium                      # once
    make demo                                        # or any job: it leaves mlflow.db here
    .venv/bin/python docs/mlflow_screenshot.py       # -> docs/mlflow_runs.png
    .venv/bin/python docs/mlflow_screenshot.py --store /path/to/mlflow.db --experiment mnist_kd --out x.png

Starts `mlflow ui` (one worker, its own process group, on a free loopback port), waits for /health,
opens the experiment's runs table with every parent expanded and the Dataset column on, and
stops the whole process group afterwards. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {timeout_s:.0f} s")


def experiment_id(base: str, name: str) -> str:
    request = urllib.request.Request(f"{base}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name={name}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["experiment"]["experiment_id"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=str(REPO / "mlflow.db"), help="the SQLite MLflow store (default: ./mlflow.db of `make demo`)")
    parser.add_argument("--experiment", default="mnist_kd")
    parser.add_argument("--out", default=str(REPO / "docs" / "mlflow_runs.png"))
    parser.add_argument("--size", default="1600,900")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("mlflow_screenshot: no chromium on PATH (apt-get install -y chromium)", file=sys.stderr)
        return 2
    if not Path(args.store).is_file():
        print(f"mlflow_screenshot: no MLflow store at {args.store} (run `make demo` first)", file=sys.stderr)
        return 2
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{Path(args.store).resolve()}", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"{base}/health", 180)
        exp = experiment_id(base, args.experiment)
        # The runs table, parents expanded, the Dataset column shown (MLflow keeps these in the URL's search state).
        url = f"{base}/#/experiments/{exp}/runs?isPreview=false"
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={Path(args.out).parent / '.chromium-profile'}",
                        f"--window-size={args.size}", "--virtual-time-budget=30000", f"--screenshot={Path(args.out).resolve()}", url],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
        shutil.rmtree(Path(args.out).parent / ".chromium-profile", ignore_errors=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
