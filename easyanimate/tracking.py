"""Experiment tracking as the library sees it: a small ``Tracker`` protocol.

The library logs through a ``Tracker`` and never imports a tracking service: ``JsonlTracker`` (files in the run
folder) is the default for local runs, ``NullTracker`` drops everything, and ``components/mlflow_tracker.py``
implements the same protocol on MLflow.

Only the main process of a distributed run should log (trainers guard their calls).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Tracker(Protocol):
    """Where a run's parameters, metrics and files go."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Record run parameters (nested dicts allowed, e.g. ``Config.to_dict()``); later calls add/override keys."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record scalar metrics at a training step."""

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Record a file or folder produced by the run (``artifact_path``: a sub-folder name in the store)."""

    def close(self) -> None:
        """Flush and release resources; the tracker is not used afterwards."""


class NullTracker:
    """Logs nothing."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def _plain(value: Any) -> Any:
    """JSON-safe scalars: tensors/numpy numbers → Python numbers, non-finite floats → None (strict JSON)."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlTracker:
    """Files in ``folder``: ``params.json`` (merged parameters, rewritten atomically), ``metrics.jsonl`` (one JSON
    line per ``log_metrics``: ``{"step", "time", <metrics>}``) and ``artifacts.jsonl`` (one line per logged path;
    files are referenced where they are, not copied)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.params_path = self.folder / "params.json"
        self.metrics_path = self.folder / "metrics.jsonl"
        self.artifacts_path = self.folder / "artifacts.jsonl"

    def log_params(self, params: dict[str, Any]) -> None:
        current = json.loads(self.params_path.read_text()) if self.params_path.is_file() else {}
        current.update(params)
        fd, tmp = tempfile.mkstemp(prefix=".params.", dir=self.folder)
        with os.fdopen(fd, "w") as fh:
            json.dump(current, fh, indent=1, default=str)
        os.replace(tmp, self.params_path)

    def _append(self, path: Path, record: dict[str, Any]) -> None:
        with path.open("a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": int(step), "time": time.time()}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self._append(self.metrics_path, record)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._append(self.artifacts_path, {"path": str(Path(path).resolve()), "artifact_path": artifact_path,
                                           "time": time.time()})

    def close(self) -> None:
        pass

    def read_metrics(self) -> list[dict[str, Any]]:
        """All metric records logged so far (for tests and summaries)."""
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]


__all__ = ["JsonlTracker", "NullTracker", "Tracker"]
