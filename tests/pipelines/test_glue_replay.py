"""components/glue/replay.py: a trainer's JSONL tracking folder replayed into a tracker."""

from types import SimpleNamespace

from components.glue import replay


def test_replay_jsonl_copies_a_trainjob_run_into_a_tracker(tmp_path):
    from easyanimate.tracking import JsonlTracker

    src = JsonlTracker(tmp_path / "run")
    src.log_params({"train": {"max_steps": 2}})
    src.log_metrics({"loss": 1.5}, 1)
    src.log_metrics({"loss": 1.2, "val_loss": 1.3}, 2)
    (tmp_path / "run" / "samples").mkdir()
    (tmp_path / "run" / "samples" / "step-2.mp4").write_bytes(b"x")
    got = SimpleNamespace(params={}, metrics=[], artifacts=[])
    tracker = SimpleNamespace(log_params=got.params.update, log_metrics=lambda m, s: got.metrics.append((s, m)),
                              log_artifact=lambda p, a=None: got.artifacts.append((p.name, a)))
    last = replay.replay_jsonl(tmp_path / "run", tracker)
    assert got.params == {"train": {"max_steps": 2}}
    assert got.metrics == [(1, {"loss": 1.5}), (2, {"loss": 1.2, "val_loss": 1.3})]
    assert got.artifacts == [("step-2.mp4", "samples")] and last == {"loss": 1.2, "val_loss": 1.3}
