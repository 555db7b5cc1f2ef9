"""Preprocessing throughput on the sample dataset: clips/s and seconds per minute of input video per stage, plus
scene-detection speed against the plain `scenedetect` CLI on the same files (one run, one machine).

    .venv/bin/python bench/preprocess.py [--preset tiny] [--workers 2]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easyanimate.config import load_config  # noqa: E402
from easyanimate.data.sample import write_sample_dataset  # noqa: E402
from easyanimate.preprocess.run import run_preprocess  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the scene-detection comparison")
    args = ap.parse_args()

    cfg = load_config(args.preset).preprocess
    if args.workers is not None:
        cfg = dataclasses.replace(cfg, workers=args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        raw = write_sample_dataset(Path(tmp) / "raw")
        summary = run_preprocess(raw, Path(tmp) / "out", cfg, progress=False)
        minutes = summary["input_video_seconds"] / 60.0
        per_minute = {k: round(v / minutes, 3) for k, v in summary["seconds_per_stage"].items()} if minutes else {}

        sys.argv = [sys.argv[0], "--repeats", str(args.repeats)]
        import io
        from contextlib import redirect_stdout

        import preprocess_scenes  # bench/preprocess_scenes.py: ours vs the scenedetect CLI

        buf = io.StringIO()
        with redirect_stdout(buf):
            preprocess_scenes.main()
        scenes = json.loads(buf.getvalue())

    print(json.dumps({
        "preset": args.preset,
        "workers": cfg.workers,
        "inputs": summary["inputs"],
        "clips_cut": summary["clips_cut"],
        "kept_videos": summary["kept_videos"],
        "kept_images": summary["kept_images"],
        "input_video_seconds": summary["input_video_seconds"],
        "wall_seconds": summary["wall_seconds"],
        "clips_per_second": summary["clips_per_second"],
        "seconds_per_stage": summary["seconds_per_stage"],
        "seconds_per_input_minute_per_stage": per_minute,
        "scene_detection_vs_cli": scenes,
    }, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
