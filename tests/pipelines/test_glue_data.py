"""components/glue/data.py: lineage — the fan-out plan, the input's data version (DVC hash or a file-listing
digest), what a merged dataset artifact carries, the tags tying a model version to config and data."""

import hashlib
import json
from types import SimpleNamespace

import pytest

from components.glue import data, settings


def test_shard_plan_carries_the_data_version(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.png").write_bytes(b"png")
    assert data.shard_specs(3) == ["0/3", "1/3", "2/3"]
    with pytest.raises(ValueError, match="num_shards must be >= 1, got 0"):
        data.shard_specs(0)
    plan = data.shard_plan(tmp_path / "raw", 2)
    version = data.data_version(tmp_path / "raw")
    assert plan == [{"shard": "0/2", "data_version": version}, {"shard": "1/2", "data_version": version}]


def test_dataset_metadata_and_lineage_tags(tmp_path):
    (tmp_path / "meta.json").write_text("[]")
    shards = [SimpleNamespace(metadata={"dvc_data_hash": "h1", "data_version": "dvc:h1", "source": "/raw"}),
              SimpleNamespace(metadata={"dvc_data_hash": "h1", "data_version": "dvc:h1", "source": "/raw"})]
    meta = data.dataset_metadata(tmp_path, shards, {"kept_videos": 3, "other": 1})
    assert meta == {"meta_sha256": hashlib.sha256(b"[]").hexdigest(), "dvc_data_hash": "h1", "data_version": "dvc:h1",
                    "source": "/raw", "num_shards": 2, "kept_videos": 3}
    shards[1].metadata["data_version"] = "dvc:h2"  # shards that saw different inputs are flagged, not hidden
    assert data.dataset_metadata(tmp_path, shards, {})["data_version"] == "mixed:dvc:h1,dvc:h2"

    cfg = settings.config("tiny", '["train.max_steps=3"]')
    tags = data.lineage_tags(cfg, "tiny", '["train.max_steps=3"]', "parent-1", SimpleNamespace(metadata=meta))
    assert tags["config_sha256"] == hashlib.sha256(cfg.to_json().encode()).hexdigest()
    assert json.loads(tags["overrides"]) == ["train.max_steps=3"] and tags["pipeline_run_id"] == "parent-1"
    assert tags["data_version"] == "dvc:h1" and tags["data_meta_sha256"] == meta["meta_sha256"]


def test_data_version_tracks_the_input_folder(tmp_path):
    raw = tmp_path / "raw"
    (raw / "videos").mkdir(parents=True)
    (raw / "videos" / "a.mp4").write_bytes(b"1")
    (raw / "captions.json").write_text("[]")
    v1 = data.data_version(raw)
    assert v1.startswith("files:") and data.data_version(raw) == v1
    (raw / "captions.json").write_text('[{"file": "videos/a.mp4", "text": "a cat"}]')  # a caption edit counts
    v2 = data.data_version(raw)
    assert v2 != v1
    (raw / "videos" / "b.mp4").write_bytes(b"2")
    assert data.data_version(raw) != v2
    (tmp_path / "raw.dvc").write_text("outs:\n- md5: 0123abcd.dir\n  path: raw\n")
    assert data.data_version(raw) == "dvc:0123abcd.dir" and data.dvc_hash(raw) == "0123abcd.dir"
