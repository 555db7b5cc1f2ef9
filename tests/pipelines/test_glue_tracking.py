"""components/glue/tracking.py: the pipeline's parent run, nested step runs, the exit path that closes the parent."""

from mlflow.tracking import MlflowClient

from components.glue import settings, tracking


def test_failed_pipeline_closes_its_parent_run_failed(mlflow_server):
    cfg = settings.config("tiny", "[]")
    run_id = tracking.start_pipeline_run(mlflow_server, "runtime-test", "kfp-run-x", cfg, {"data": "/x"},
                                   tags={"kfp_run_id": "job-123"})
    with tracking.step_run(mlflow_server, run_id, "train_dit") as tracker:
        child = tracker.run_id
    assert tracking.find_pipeline_run(mlflow_server, "runtime-test", "job-123") == run_id
    status = tracking.end_pipeline_run(mlflow_server, "runtime-test", "job-123",
                                 {"state": "FAILED", "error": {"message": "Task train-dit failed."}})
    assert status == "FAILED"
    client = MlflowClient(mlflow_server)
    parent = client.get_run(run_id)
    assert parent.info.status == "FAILED" and parent.data.tags["kfp_error"] == "Task train-dit failed."
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == run_id
    assert tracking.end_pipeline_run(mlflow_server, "runtime-test", "no-such-job", None) == "NOT_FOUND"


def test_links_point_at_the_mlflow_ui_or_runs_uris(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.delenv(tracking.MLFLOW_UI_ENV, raising=False)
    http = SimpleNamespace(tracking_uri="http://127.0.0.1:5000/", experiment_id="3", run_id="abc")
    assert tracking.run_link(http) == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    links = tracking.sample_links(http, ["/tmp/x/prompt-00.mp4"])
    run = "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert links == {"sample prompt-00.mp4": f"{run}/artifacts/samples/prompt-00.mp4", "MLflow run": run}
    local = SimpleNamespace(tracking_uri="sqlite:///m.db", experiment_id="1", run_id="r1")
    assert tracking.run_link(local) == "runs:/r1" and tracking.artifact_link(local, "a/b.png") == "runs:/r1/a/b.png"
    # on a cluster the tracking URI is an in-cluster address: reports link to the UI address people open
    monkeypatch.setenv(tracking.MLFLOW_UI_ENV, "https://mlflow.example.org/")
    incluster = SimpleNamespace(tracking_uri="http://mlflow.easyanimate.svc:5000", experiment_id="3", run_id="abc")
    assert tracking.run_link(incluster) == "https://mlflow.example.org/#/experiments/3/runs/abc"
    assert tracking.artifact_link(local, "x.gif") == "https://mlflow.example.org/#/experiments/1/runs/r1/artifacts/x.gif"
