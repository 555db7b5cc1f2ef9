"""components/glue/artifacts.py: KFP artifacts and folders — meta.json, the per-step work folder, publishing a
folder, numbers to and from ``Metrics`` artifacts."""

import math
from types import SimpleNamespace

import pytest

from components.glue import artifacts


class FakeArtifact:
    """What KFP hands a component for an artifact: a path and a metadata dict."""

    def __init__(self, path, metadata=None):
        self.path, self.metadata = str(path), dict(metadata or {})

    def log_metric(self, key, value):
        self.metadata[key] = value


def test_meta_path_names_the_artifact_without_meta_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"dataset artifact {tmp_path} has no meta.json"):
        artifacts.meta_path(FakeArtifact(tmp_path))
    (tmp_path / "meta.json").write_text("[]")
    assert artifacts.meta_path(FakeArtifact(tmp_path)) == str(tmp_path / "meta.json")


def test_workdir_is_the_same_folder_on_every_attempt(tmp_path, monkeypatch):
    monkeypatch.setenv(artifacts.WORKDIR_ENV, str(tmp_path))
    first = artifacts.workdir("run-1", "train_dit")
    (first / "checkpoint").write_text("x")
    assert first == tmp_path / "run-1" / "train_dit" and artifacts.workdir("run-1", "train_dit") == first
    assert (first / "checkpoint").is_file() and artifacts.workdir("", "evaluate") == tmp_path / "adhoc" / "evaluate"


def test_publish_replaces_the_artifact_and_sets_metadata(tmp_path):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "w.safetensors").write_bytes(b"w")
    dest = FakeArtifact(tmp_path / "out" / "model")
    (tmp_path / "out" / "model").mkdir(parents=True)
    (tmp_path / "out" / "model" / "stale.txt").write_text("old attempt")
    artifacts.publish(tmp_path / "src", dest, steps=3)
    assert sorted(p.name for p in (tmp_path / "out" / "model").rglob("*")) == ["sub", "w.safetensors"]
    assert dest.metadata == {"steps": 3}


def test_metrics_keep_finite_numbers_only():
    values = {"loss": 0.5, "steps": 3, "ok": True, "bad": math.nan, "inf": math.inf, "name": "x", "final": "/p"}
    metrics = FakeArtifact("unused")
    assert artifacts.log_kfp_metrics(metrics, values) == {"loss": 0.5, "steps": 3.0, "ok": 1.0}
    assert artifacts.metrics_of(SimpleNamespace(metadata=metrics.metadata)) == {"loss": 0.5, "steps": 3.0, "ok": 1.0}
