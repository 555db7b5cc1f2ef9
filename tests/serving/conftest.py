"""A real ``mlflow server`` (SQLite store, local artifact root) and a tiny pipeline folder, shared by the session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """Start ``mlflow server`` on a free port, wait for /health, yield its URI; stop it and every worker after."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    # job execution off: otherwise every server start leaves a folder in /dev/shm
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # own group: workers die with it
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{(root / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not healthy after 90 s:\n{(root / 'server.log').read_text()}")
            time.sleep(0.3)
        yield uri
    finally:
        pgid = proc.pid
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftover = _group_alive(pgid)
        if leftover:
            os.killpg(pgid, signal.SIGKILL)
        log.close()
        assert not leftover, "mlflow server left processes behind after SIGTERM"


@pytest.fixture(scope="session")
def tiny_pipeline_folder(tmp_path_factory, tiny_config) -> Path:
    """A saved tiny pipeline (random DiT/VAE; MiniLM by reference): the model artifact the registry handles."""
    import torch

    from easyanimate.pipeline import build_pipeline

    torch.set_num_threads(2)
    folder = tmp_path_factory.mktemp("registry") / "tiny_pipe"
    build_pipeline(tiny_config.model).save_pretrained(folder)
    return folder
