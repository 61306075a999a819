"""A screenshot of the MLflow UI over a job's store, from headless Chromium (Debian's `chromium` package).

    apt-get install -y chromium                      # once
    make demo                                        # or any job: it leaves mlflow.db here
    .venv/bin/python docs/mlflow_screenshot.py       # -> docs/mlflow_runs.png
    .venv/bin/python docs/mlflow_screenshot.py --store /path/to/mlflow.db --experiment mnist_kd --out x.png

Starts `mlflow ui` (one worker, its own process group, on a free loopback port), waits for /health,
opens the experiment's runs table in headless Chromium driven over the DevTools protocol, expands the
parent runs, and stops the whole process group afterwards. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


async def capture(chromium: str, url: str, out: Path, size: tuple[int, int], profile: Path) -> None:
    """Open `url` in headless Chromium, expand every parent run, close the assistant panel, screenshot.

    Driven over the DevTools protocol (aiohttp, already a dependency of Ray): the runs table only
    shows nested runs after a click on their parent's expander.
    """
    import base64

    import aiohttp

    port = free_port()
    browser = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
                                f"--window-size={size[0]},{size[1]}", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://127.0.0.1:{port}/json/version", 60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(t for t in json.loads(response.read()) if t["type"] == "page")
        async with aiohttp.ClientSession() as session, session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            ids = iter(range(1, 10_000))

            async def call(method: str, **params):
                number = next(ids)
                await ws.send_json({"id": number, "method": method, "params": params})
                async for message in ws:
                    data = json.loads(message.data)
                    if data.get("id") == number:
                        return data.get("result", {})

            async def js(expression: str):
                return (await call("Runtime.evaluate", expression=expression, awaitPromise=True)).get("result", {}).get("value")

            await call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1, mobile=False)
            await call("Page.navigate", url=url)
            for _ in range(120):  # the runs table renders after the app's own requests
                if await js("document.querySelectorAll('[role=row]').length > 1"):
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(2)
            # Expand the parent runs (the +/- button of their name cell), and close the assistant side panel.
            await js("""(() => {
                for (const b of document.querySelectorAll('button[data-component-id*="runnamecellrenderer"]')) b.click();
                for (const b of document.querySelectorAll('button[aria-label="Close"]')) b.click();
            })()""")
            await asyncio.sleep(3)
            shot = await call("Page.captureScreenshot", format="png")
            out.write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.terminate()
        browser.wait(timeout=30)


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
    out = Path(args.out).resolve()
    profile = Path(tempfile.mkdtemp(prefix="kd-chromium-"))
    try:
        wait_for(f"{base}/health", 180)
        exp = experiment_id(base, args.experiment)
        width, height = (int(v) for v in args.size.split(","))
        asyncio.run(capture(chromium, f"{base}/#/experiments/{exp}/runs", out, (width, height), profile))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
