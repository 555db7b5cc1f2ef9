"""The preprocessing run: inputs → scene cuts → clips → filters → captions → meta.json + reports.

Each input is one unit of work, done in a process pool. Its result (rows for every segment/clip, meta entries,
timings) is written atomically to ``<output>/.work/<key>.json``; a re-run skips inputs whose result is there for the
same source file and the same preprocess config (resume). One bad input becomes a reject with its reason, never a
crashed run. The final files are assembled from the per-input results and written atomically:

- ``meta.json``      kept clips/images in the EasyAnimate format (paths relative to the output folder)
- ``scores.parquet`` one row per clip cut from the inputs (kept or rejected) with every score
- ``rejects.csv``    input or clip, stage, reason
- ``summary.json``   counts per stage, seconds per stage, clips/s
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..config import PreprocessConfig
from ..data.meta import write_meta
from ..video import atomic_write_bytes, probe_video

logger = logging.getLogger(__name__)

VIDEO_EXTS = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".flv", ".mpg", ".mpeg", ".ts", ".wmv", ".3gp", ".gif"}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
WORK_DIR = ".work"
RESULT_VERSION = 1
STAGES = ("read", "duration", "format", "quality", "text", "motion", "caption")


# ---------------------------------------------------------------------------------------------------------------------
# inputs


def discover_inputs(source: str | Path) -> tuple[Path, list[Path]]:
    """(root, files): a folder searched recursively for videos/images, or a list file of paths (one per line).

    Relative paths in a list file are relative to the list file's folder, which becomes the root.
    """
    source = Path(source)
    if source.is_dir():
        root = source.resolve()
        files = [p for p in sorted(root.rglob("*"))
                 if p.is_file() and p.suffix.lower() in VIDEO_EXTS | IMAGE_EXTS
                 and WORK_DIR not in p.relative_to(root).parts and not p.name.startswith(".")]
        return root, files
    if source.is_file():
        root = source.parent.resolve()
        files = []
        for line in source.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line)
                files.append(p if p.is_absolute() else (root / p))
        return root, files
    raise FileNotFoundError(f"input {source} does not exist: expected a folder or a list file of video/image paths")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` → (i, n) with 0 <= i < n."""
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def rel_name(root: Path, path: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return path.resolve().as_posix()  # a list file may name files elsewhere


def in_shard(rel: str, shard: tuple[int, int] | None) -> bool:
    """Deterministic: a file's shard depends only on its relative name, so shards partition any listing."""
    if shard is None:
        return True
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % shard[1] == shard[0]


def _key(rel: str) -> str:
    return hashlib.sha1(rel.encode()).hexdigest()[:16]


def _safe_stem(rel: str) -> str:
    stem = Path(rel).stem
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:48] or "input"


def config_fingerprint(cfg: PreprocessConfig) -> str:
    data = dataclasses.asdict(cfg)
    data.pop("workers", None)  # parallelism does not change results
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# one input (runs in a worker process)

_MODELS = None


def _models(workers: int = 1):
    """One set of filter models per process; OCR threads split the cores between the pool's workers."""
    global _MODELS
    if _MODELS is None:
        from .filters import FilterModels

        _MODELS = FilterModels(ocr_threads=max(1, (os.cpu_count() or 1) // max(1, workers)))
    return _MODELS


def _row(rel: str, kind: str, start, end, fps, **extra) -> dict[str, Any]:
    row = {"source": rel, "type": kind, "start_frame": start, "end_frame": end,
           "seconds": round((end - start) / fps, 3) if (fps and start is not None) else None,
           "kept": False, "stage": "", "reason": "", "file_path": ""}
    row.update(extra)
    return row


def _caption(rel, start, end, frame_fn, sidecar, captioner) -> tuple[str | None, str]:
    text = sidecar.lookup(rel, start, end) if sidecar is not None else None
    if text:
        return text, "sidecar"
    if captioner is None:
        return None, "no caption: no sidecar entry and no VLM configured (preprocess.caption.vlm_url)"
    from .captions import CaptionError

    try:
        return captioner.caption(frame_fn()), "vlm"
    except CaptionError as exc:
        return None, f"captioning failed: {exc}"


def process_input(task: dict[str, Any]) -> dict[str, Any]:
    """Everything for one input file. Never raises: failures become rejects in the result."""
    rel, path, out = task["rel"], Path(task["path"]), Path(task["output"])
    cfg: PreprocessConfig = task["cfg"]
    kind = "image" if path.suffix.lower() in IMAGE_EXTS else "video"
    timings: dict[str, float] = {}
    result: dict[str, Any] = {"version": RESULT_VERSION, "source": rel, "type": kind, "rows": [], "meta": [],
                              "rejects": [], "timings": timings, "input_seconds": 0.0,
                              "fingerprint": task["fingerprint"], "stat": task["stat"]}

    def timed(stage, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0

    try:
        sidecar = task.get("sidecar")
        captioner = None
        if cfg.caption.vlm_url:
            from .captions import VLMCaptioner

            captioner = VLMCaptioner(cfg.caption)
        if kind == "image":
            _process_image(rel, path, out, cfg, result, timed, sidecar, captioner)
        else:
            _process_video(rel, path, out, cfg, result, timed, sidecar, captioner)
    except Exception as exc:  # one bad input must not stop the run: it becomes a reject with its reason
        logger.debug("input %s failed", rel, exc_info=True)
        for m in result["meta"]:  # nothing half-done stays behind
            Path(out / m["file_path"]).unlink(missing_ok=True)
        result.update(rows=[], meta=[])
        stage = "pixels" if type(exc).__name__ == "PixelLimitError" else "read"
        result["rejects"] = [{"item": rel, "stage": stage, "reason": f"{type(exc).__name__}: {exc}".strip()}]
    return result


def _process_image(rel, path, out, cfg, result, timed, sidecar, captioner):
    from .filters import load_image, run_filters

    image = timed("read", load_image, path, cfg.max_image_pixels)  # refused from its header past the cap
    h, w = image.shape[:2]
    info = {"width": w, "height": h, "fps": 0.0, "num_frames": 1}
    outcome = run_filters(path, info, cfg, _models(cfg.workers), is_image=True, timings=result["timings"])
    row = _row(rel, "image", None, None, None, width=w, height=h, **outcome.scores)
    result["rows"].append(row)
    if not outcome.passed:
        row.update(stage=outcome.stage, reason=outcome.reason)
        result["rejects"].append({"item": rel, "stage": outcome.stage, "reason": outcome.reason})
        return
    text, why = timed("caption", _caption, rel, None, None, lambda: image, sidecar, captioner)
    if text is None:
        row.update(stage="caption", reason=why)
        result["rejects"].append({"item": rel, "stage": "caption", "reason": why})
        return
    dest = f"images/{_safe_stem(rel)}_{_key(rel)[:8]}{path.suffix.lower()}"
    (out / dest).parent.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{dest}.tmp"
    shutil.copyfile(path, tmp)
    os.replace(tmp, out / dest)
    row.update(kept=True, file_path=dest, caption_source=why)
    result["meta"].append({"file_path": dest, "text": text, "type": "image", "width": w, "height": h,
                           "source": rel})


def _process_video(rel, path, out, cfg, result, timed, sidecar, captioner):
    from .filters import check_format, check_pixels, frame_size, run_filters
    from .scenes import plan_segments, scan_cuts, write_clips

    check_pixels(*timed("read", frame_size, path), cfg.max_frame_pixels, "video frame")  # before any decoding
    info = timed("read", probe_video, path)
    if not info["fps"]:
        raise ValueError(f"expected a video with a frame rate, got {info['fps']}")
    scan = timed("scene", scan_cuts, path, cfg.scene, verify=cfg.scene.verify)
    n, fps = scan.num_frames, info["fps"]  # the decoded count: container headers may over-count
    if n < 1:
        raise ValueError("expected a video with frames, decoded none")
    info = {**info, "num_frames": n}
    result["input_seconds"] = n / fps
    segments = plan_segments(scan.cuts, n, fps, cfg.min_seconds, cfg.max_seconds)
    clip_name = lambda s: f"{rel}[{s.start}:{s.end}]"  # noqa: E731

    source_format = check_format(info, cfg)
    kept_segments = []
    for seg in segments:
        if not seg.kept:
            result["rows"].append(_row(rel, "video", seg.start, seg.end, fps, stage="duration", reason=seg.reason))
            result["rejects"].append({"item": clip_name(seg), "stage": "duration", "reason": seg.reason})
        elif not source_format.passed:  # resolution/fps belong to the source: no clip is worth writing
            result["rows"].append(_row(rel, "video", seg.start, seg.end, fps, stage=source_format.stage,
                                       reason=source_format.reason, **source_format.scores))
            result["rejects"].append({"item": clip_name(seg), "stage": source_format.stage,
                                      "reason": source_format.reason})
        else:
            kept_segments.append(seg)
    if not kept_segments:
        return
    clip_dir = out / "clips"
    clips = timed("clip", write_clips, path, kept_segments, clip_dir, crf=cfg.scene.crf,
                  name_prefix=f"{_safe_stem(rel)}_{_key(rel)[:8]}")
    passed = []  # (clip, row) that passed every filter and now need a caption
    for clip in clips:
        clip_path = Path(clip["path"])
        cinfo = {k: clip[k] for k in ("width", "height", "fps", "num_frames")}
        outcome = run_filters(clip_path, cinfo, cfg, _models(cfg.workers), timings=result["timings"])
        row = _row(rel, "video", clip["start_frame"], clip["end_frame"], fps, width=clip["width"],
                   height=clip["height"], **outcome.scores)
        result["rows"].append(row)
        if outcome.passed:
            passed.append((clip, row))
        else:
            _reject_clip(result, rel, clip, row, outcome.stage, outcome.reason)
    captions = timed("caption", _caption_clips, rel, [c for c, _ in passed], sidecar, captioner)
    for (clip, row), (text, why) in zip(passed, captions, strict=True):
        if text is None:
            _reject_clip(result, rel, clip, row, "caption", why)
            continue
        rel_clip = Path(clip["path"]).resolve().relative_to(out.resolve()).as_posix()
        row.update(kept=True, file_path=rel_clip, caption_source=why)
        result["meta"].append({"file_path": rel_clip, "text": text, "type": "video", "width": clip["width"],
                               "height": clip["height"], "fps": clip["fps"], "num_frames": clip["num_frames"],
                               "source": rel, "start_frame": clip["start_frame"], "end_frame": clip["end_frame"]})


def _reject_clip(result, rel, clip, row, stage, reason):
    Path(clip["path"]).unlink(missing_ok=True)  # rejected clips are not kept on disk
    row.update(stage=stage, reason=reason)
    result["rejects"].append({"item": f"{rel}[{clip['start_frame']}:{clip['end_frame']}]", "stage": stage,
                              "reason": reason})


def _caption_clips(rel, clips, sidecar, captioner) -> list[tuple[str | None, str]]:
    """(text, source-or-reason) per clip: sidecar first; the rest from the VLM, ``caption.concurrency`` at a time."""
    from .filters import middle_frame

    out: list[tuple[str | None, str]] = []
    missing = []
    for i, clip in enumerate(clips):
        text = sidecar.lookup(rel, clip["start_frame"], clip["end_frame"]) if sidecar is not None else None
        out.append((text, "sidecar") if text else (None, ""))
        if not text:
            missing.append(i)
    if not missing:
        return out
    if captioner is None:
        for i in missing:
            out[i] = (None, "no caption: no sidecar entry and no VLM configured (preprocess.caption.vlm_url)")
        return out
    replies = captioner.caption_many([middle_frame(clips[i]["path"]) for i in missing])
    for i, reply in zip(missing, replies, strict=True):
        out[i] = (reply, "vlm") if isinstance(reply, str) else (None, f"captioning failed: {reply}")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the run


def _stat(path: Path) -> list:
    try:
        st = path.stat()
        return [st.st_size, int(st.st_mtime)]
    except OSError:
        return [None, None]


def _load_done(work: Path, key: str, fingerprint: str, stat: list) -> dict | None:
    f = work / f"{key}.json"
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("version") != RESULT_VERSION or data.get("fingerprint") != fingerprint or data.get("stat") != stat:
        return None
    return data


def run_preprocess(source: str | Path, output: str | Path, cfg: PreprocessConfig,
                   shard: tuple[int, int] | None = None, progress: bool = True) -> dict[str, Any]:
    """Preprocess a folder or list file into ``output``; returns the summary (also written to summary.json)."""
    t_start = time.perf_counter()
    root, files = discover_inputs(source)
    out = Path(output).resolve()
    work = out / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    fingerprint = config_fingerprint(cfg)
    sidecar = None
    if cfg.caption.sidecar:
        from .captions import SidecarCaptions

        sidecar = SidecarCaptions(root)

    selected = [(rel_name(root, p), p) for p in files]
    selected = [(rel, p) for rel, p in selected if in_shard(rel, shard)]
    results: dict[str, dict] = {}
    todo = []
    for rel, p in selected:
        stat = _stat(p)
        done = _load_done(work, _key(rel), fingerprint, stat)
        if done is not None:
            results[rel] = done
        else:
            todo.append({"rel": rel, "path": str(p), "output": str(out), "cfg": cfg, "fingerprint": fingerprint,
                         "stat": stat, "sidecar": sidecar})

    def finish(res):
        atomic_write_bytes(work / f"{_key(res['source'])}.json", json.dumps(res).encode())
        results[res["source"]] = res

    bar = tqdm(total=len(todo), desc="preprocess", unit="input", disable=not progress)
    if cfg.workers <= 1 or len(todo) <= 1:
        for task in todo:
            finish(process_input(task))
            bar.update()
    else:
        import multiprocessing as mp

        # spawn: workers must not inherit the parent's threads (torch/OpenMP pools deadlock after fork)
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(process_input, task): task for task in todo}
            for fut in as_completed(futures):
                task = futures[fut]
                try:
                    finish(fut.result())
                except Exception as exc:  # a worker died (e.g. killed by the OOM killer): reject, go on
                    finish({"version": RESULT_VERSION, "source": task["rel"], "type": "video", "rows": [],
                            "meta": [], "timings": {}, "input_seconds": 0.0, "fingerprint": fingerprint,
                            "stat": task["stat"],
                            "rejects": [{"item": task["rel"], "stage": "read",
                                         "reason": f"worker failed: {type(exc).__name__}: {exc}"}]})
                bar.update()
    bar.close()

    ordered = [results[rel] for rel, _ in selected if rel in results]
    summary = write_outputs(out, ordered, wall=time.perf_counter() - t_start,
                            extra={"inputs_processed": len(todo), "inputs_skipped": len(selected) - len(todo),
                                   "shard": f"{shard[0]}/{shard[1]}" if shard else None})
    return summary


def _sort_key(item: dict) -> tuple:
    return (item.get("source") or "", item.get("start_frame") if item.get("start_frame") is not None else -1)


def write_outputs(out: Path, results: list[dict], wall: float, extra: dict | None = None) -> dict[str, Any]:
    """Assemble meta.json, scores.parquet, rejects.csv and summary.json from per-input results (atomically)."""
    import pandas as pd

    meta = sorted((m for r in results for m in r["meta"]), key=_sort_key)
    rows = sorted((row for r in results for row in r["rows"]), key=_sort_key)
    rejects = [rej for r in results for rej in r["rejects"]]
    write_meta(out / "meta.json", meta)

    buf = io.BytesIO()
    frame = pd.DataFrame(rows, columns=_score_columns(rows))
    frame.to_parquet(buf, index=False)
    atomic_write_bytes(out / "scores.parquet", buf.getvalue())

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["item", "stage", "reason"])
    writer.writeheader()
    writer.writerows(rejects)
    atomic_write_bytes(out / "rejects.csv", text.getvalue().encode())

    seconds: dict[str, float] = {}
    for r in results:
        for stage, s in r["timings"].items():
            seconds[stage] = seconds.get(stage, 0.0) + s
    input_seconds = sum(r.get("input_seconds", 0.0) for r in results)
    rejected = {s: 0 for s in STAGES}
    for rej in rejects:
        rejected[rej["stage"]] = rejected.get(rej["stage"], 0) + 1
    n_clips = sum(1 for row in rows if row["type"] == "video")
    summary = {
        "inputs": len(results),
        "inputs_failed": rejected["read"],
        "clips_cut": n_clips,
        "images": sum(1 for row in rows if row["type"] == "image"),
        "kept_videos": sum(1 for m in meta if m["type"] == "video"),
        "kept_images": sum(1 for m in meta if m["type"] == "image"),
        "rejected_per_stage": rejected,
        "seconds_per_stage": {k: round(v, 3) for k, v in sorted(seconds.items())},
        "input_video_seconds": round(input_seconds, 2),
        "wall_seconds": round(wall, 3),
        "clips_per_second": round(n_clips / wall, 3) if wall > 0 else None,
        **(extra or {}),
    }
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def _score_columns(rows: list[dict]) -> list[str]:
    base = ["source", "type", "start_frame", "end_frame", "seconds", "width", "height"]
    scores = sorted({k for row in rows for k in row} - set(base) - {"kept", "stage", "reason", "file_path",
                                                                    "caption_source"})
    return base + scores + ["kept", "stage", "reason", "file_path", "caption_source"]


def merge_outputs(shard_outputs: list[str | Path], output: str | Path) -> dict[str, Any]:
    """Merge the outputs of sharded runs into one dataset folder (clips hard-linked, or copied across devices)."""
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    wall = 0.0
    for folder in map(Path, shard_outputs):
        work = folder / WORK_DIR
        if not work.is_dir():
            raise FileNotFoundError(f"{folder} is not a preprocess output (no {WORK_DIR}/ folder)")
        summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
        wall = max(wall, summary.get("wall_seconds", 0.0))
        for f in sorted(work.glob("*.json")):
            res = json.loads(f.read_text())
            for m in res["meta"]:
                src, dst = folder / m["file_path"], out / m["file_path"]
                if not dst.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copyfile(src, dst)
            (out / WORK_DIR).mkdir(exist_ok=True)
            atomic_write_bytes(out / WORK_DIR / f.name, f.read_bytes())
            results.append(res)
    results.sort(key=lambda r: r["source"])
    return write_outputs(out, results, wall=wall, extra={"merged_from": [str(p) for p in shard_outputs]})
