"""Replay a ``JsonlTracker`` folder (what a trainer outside this pod wrote, e.g. a TrainJob's) into a ``Tracker``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def replay_jsonl(folder: str | os.PathLike, tracker) -> dict[str, Any]:
    """Copy a ``JsonlTracker`` folder (what the TrainJob's trainer wrote) into ``tracker``; returns the last metrics."""
    folder = Path(folder)
    last: dict[str, Any] = {}
    if (folder / "params.json").is_file():
        tracker.log_params(json.loads((folder / "params.json").read_text()))
    if (folder / "metrics.jsonl").is_file():
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                step = int(record.pop("step", 0))
                record.pop("time", None)
                tracker.log_metrics({k: v for k, v in record.items() if v is not None}, step)
                last.update(record)
    for sample in sorted((folder / "samples").glob("*.mp4")):
        tracker.log_artifact(sample, "samples")
    return last
