"""A local ``mlflow server`` (SQLite store, local artifact root, loopback) for the demo and the tests.

    with MlflowServer(root) as server:
        print(server.uri)          # http://127.0.0.1:<free port>

The server runs in its own process group so its gunicorn/uvicorn workers stop with it; ``stop()`` sends SIGTERM,
then SIGKILL after a timeout, and reports whether anything was left behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class MlflowServer:
    """``mlflow server`` on a free loopback port; the store and artifacts live under ``root``."""

    def __init__(self, root: str | Path, *, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout: float = 90.0, proxy_artifacts: bool = False):
        self.root = Path(root).resolve()
        # proxy_artifacts: clients up/download artifacts through the server (mlflow-artifacts:/) instead of writing
        # to its folder — what clients in containers need (they cannot see this machine's paths)
        self.proxy_artifacts = proxy_artifacts
        self.host, self.port = host, port or free_port(host)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.uri = f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def start(self) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        # job execution off: otherwise every server start leaves a folder in /dev/shm
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             *(["--artifacts-destination", str(self.root / "artifacts"), "--default-artifact-root",
                "mlflow-artifacts:/"] if self.proxy_artifacts else
               ["--default-artifact-root", str(self.root / "artifacts")]),
             "--host", self.host, "--port", str(self.port),
             "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server not healthy after {self.startup_timeout:.0f} s; see {self.log_path}")
            time.sleep(0.3)

    def stop(self, timeout: float = 20.0) -> bool:
        """Stop the server and its workers; True when nothing was left behind."""
        if self.proc is None:
            return True
        pgid = self.proc.pid
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        clean = not _group_alive(pgid)
        if not clean:
            os.killpg(pgid, signal.SIGKILL)
        self.proc = None
        return clean

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
