"""Without MLflow the pipeline fails fast with a message naming the tracking URI, instead of retrying for minutes.

- ``pipeline run --local`` against a tracking server that is not there: exit code 2 and one clear line, long before a
  minute (a subprocess timeout of 60 s bounds it: MLflow's default retries alone would take ~4 minutes a call);
- a server killed mid-step: the step's next MLflow call fails in seconds with MLflow's own error (not hidden behind
  the failed attempt to mark the run), and a run whose step fails while MLflow answers is marked FAILED;
- the exit handler reports an unreachable server instead of failing a second time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.glue import tracking
from components.mlflow_tracker import TrackingUnavailable, check_tracking, redact_uri
from serving.mlflow_local import MlflowServer, free_port

REPO = Path(__file__).resolve().parents[2]


def test_pipeline_run_without_mlflow_fails_fast_naming_the_uri(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "easyanimate", "pipeline", "run", "--local", "--pipeline-root",
                           str(tmp_path / "root"), "--tracking-uri", uri, "--data", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith(f"error: MLflow tracking server {uri} is unreachable (3 attempts"), done.stderr[-2000:]
    assert "start it or pass the right --tracking-uri" in lines[-1] and "Traceback" not in done.stderr
    assert not list((tmp_path / "root").glob("easyanimate-train-*"))  # no task started


def test_check_tracking_redacts_credentials():
    uri = f"http://alice:s3cret@127.0.0.1:{free_port()}"
    with pytest.raises(TrackingUnavailable) as info:
        check_tracking(uri, attempts=1)
    assert "s3cret" not in str(info.value) and "http://***@127.0.0.1" in str(info.value)
    assert redact_uri("https://u:p@mlflow.example/x") == "https://***@mlflow.example/x"
    check_tracking("sqlite:///nowhere.db")  # local stores are not probed


def test_server_killed_mid_step_fails_the_step_fast_and_runs_are_marked_failed(tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        from easyanimate.config import load_config

        cfg = load_config("tiny")
        parent = tracking.start_pipeline_run(server.uri, "down-test", "run-1", cfg, {"data": "x"},
                                             tags={"kfp_run_id": "k1"})
        with pytest.raises(ValueError, match="bad data"), tracking.step_run(server.uri, parent, "merge") as tracker:
            failed_id = tracker.run_id
            raise ValueError("bad data")
        assert MlflowClient(server.uri).get_run(failed_id).info.status == "FAILED"

        step = tracking.step_run(server.uri, parent, "train_dit")
        step.log_metrics({"loss": 1.0}, step=1)
    finally:
        assert server.stop()
    with pytest.raises(MlflowException, match=f"{server.port}"), step:  # the error is MLflow's, naming the server
        step.log_metrics({"loss": 0.5}, step=2)
    assert tracking.end_pipeline_run(server.uri, "down-test", "k1", {"state": "FAILED"}) == "UNREACHABLE"
    with pytest.raises(TrackingUnavailable, match=f"MLflow tracking server {server.uri} is unreachable"):
        tracking.step_run(server.uri, parent, "evaluate")
