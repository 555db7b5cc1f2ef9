"""System metrics on a training run shorter than one sampling interval (MLflow's monitor would log none)."""

from __future__ import annotations


def test_a_run_shorter_than_the_sampling_interval_still_has_system_metrics(tmp_path):
    from mlflow.tracking import MlflowClient

    from components.mlflow_tracker import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(tracking_uri=uri, experiment="short", system_metrics=True, system_metrics_interval=60)
    tracker.close()
    keys = MlflowClient(uri).get_run(tracker.run_id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in keys), sorted(keys)
    assert any(k.startswith("system/system_memory_usage") for k in keys), sorted(keys)
