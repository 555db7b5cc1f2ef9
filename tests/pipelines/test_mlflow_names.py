"""components/mlflow_tracker.py: one mapping of metric names for every kind of run, the trainers' summary row as
tags, and sample MP4s logged at a size MLflow's artifact viewer shows (against the session's MLflow server)."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from components.mlflow_tracker import MlflowTracker, metric_name
from easyanimate.video import read_video, write_video


def test_metric_name_mapping():
    assert metric_name("loss", "train") == "train/loss"
    assert metric_name("grad_norm", "train") == "train/grad_norm"
    assert metric_name("val_psnr", "train") == "val/psnr" and metric_name("val_loss_t500", "train") == "val/loss_t500"
    assert metric_name("val_loss", "eval") == "eval/val_loss" and metric_name("kept_videos", "data") == "data/kept_videos"
    assert metric_name("system/cpu_utilization_percentage", "train") == "system/cpu_utilization_percentage"
    assert metric_name("loss", None) == "loss"
    with pytest.raises(ValueError, match="metrics must be one of"):
        MlflowTracker(tracking_uri="sqlite:///unused.db", metrics="training")


def test_training_run_names_series_and_summary(mlflow_server):
    client = MlflowClient(mlflow_server)
    with MlflowTracker(tracking_uri=mlflow_server, experiment="names-test", run_name="train_vae",
                       metrics="train") as tracker:
        tracker.log_metrics({"val_psnr": 11.0}, step=0)
        tracker.log_metrics({"loss": 0.5, "lr": 1e-4, "grad_norm": 2.0}, step=1)
        tracker.log_metrics({"loss": 0.25, "lr": 1e-4, "grad_norm": 1.0}, step=2)
        tracker.log_metrics({"val_psnr": 13.5}, step=2)
        # the DiT's end-of-run row: aggregates and single values
        tracker.log_metrics({"steps": 2, "steps_this_run": 2, "final_loss": 0.25, "loss_last_20pct": 0.25,
                             "samples_per_s": 3.5, "val_loss": None}, step=2)
    run = client.get_run(tracker.run_id)
    assert set(run.data.metrics) == {"train/loss", "train/lr", "train/grad_norm", "val/psnr"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(1, 0.5),
                                                                                                     (2, 0.25)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val/psnr")] == [11.0, 13.5]
    tags = run.data.tags
    assert tags["summary.steps"] == "2" and tags["summary.final_loss"] == "0.25"
    assert tags["summary.samples_per_s"] == "3.5" and "summary.val_loss" not in tags  # None: nothing to say


def _mp4(path, height, width, frames=9):
    rng = np.random.default_rng(0)
    return write_video(path, rng.integers(0, 255, (frames, height, width, 3), dtype=np.uint8), fps=8)


def test_small_sample_videos_are_logged_at_a_visible_size(mlflow_server, tmp_path, caplog):
    """MLflow's viewer plays an MP4 at its own size: a 64 px sample is logged enlarged by pixel repetition (same
    frames, same fps); a large one, a broken one and other files go up byte for byte; the file on disk is
    untouched."""
    small, large, side = _mp4(tmp_path / "s" / "prompt-00.mp4", 64, 64), _mp4(tmp_path / "l" / "big.mp4", 256, 320), \
        _mp4(tmp_path / "w" / "recon.mp4", 64, 128)
    broken = tmp_path / "b" / "broken.mp4"
    broken.parent.mkdir()
    broken.write_bytes(b"not a video")
    small_bytes = small.read_bytes()
    client = MlflowClient(mlflow_server)
    with MlflowTracker(tracking_uri=mlflow_server, experiment="names-test", run_name="evaluate",
                       metrics="eval") as tracker:
        for path in (small, large, side, broken):
            tracker.log_artifact(path, "samples")
    assert small.read_bytes() == small_bytes
    out = tmp_path / "down"
    got = {p: client.download_artifacts(tracker.run_id, f"samples/{p}", str(out)) for p in
           ("prompt-00.mp4", "big.mp4", "recon.mp4", "broken.mp4")}
    assert open(got["broken.mp4"], "rb").read() == b"not a video" and "could not enlarge it" in caplog.text
    shown = read_video(got["prompt-00.mp4"])
    assert shown.shape == (9, 256, 256, 3), shown.shape
    original = read_video(small)
    # pixel repetition: each 4x4 block of the enlarged video is one pixel of the original (up to H.264's loss)
    assert np.abs(shown[:, ::4, ::4].astype(int) - original.astype(int)).mean() < 12
    import av

    with av.open(got["prompt-00.mp4"]) as c:
        assert round(float(c.streams.video[0].average_rate)) == 8
    assert read_video(got["recon.mp4"]).shape == (9, 256, 512, 3)  # the VAE's side-by-side, both halves
    assert open(got["big.mp4"], "rb").read() == large.read_bytes()
