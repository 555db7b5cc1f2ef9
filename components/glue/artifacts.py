"""KFP artifacts and folders: the dataset's meta.json, a per-step work folder that survives a retried pod, a folder
published as an artifact, numbers to and from ``Metrics`` artifacts.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

WORK_MOUNT = "/mnt/work"  # where the pipeline mounts the work PVC (infra/k8s/pvc.yaml) on training tasks
WORKDIR_ENV = "EASYANIMATE_WORKDIR"  # overrides the work root (local runs point it into the pipeline root)


def meta_path(dataset) -> str:
    """The meta JSON of a dataset artifact (a folder written by ``merge``)."""
    path = Path(dataset.path) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"dataset artifact {dataset.path} has no meta.json: expected a merged dataset folder")
    return str(path)


def workdir(parent_run_id: str, step: str) -> Path:
    """A per-(pipeline run, step) folder for checkpoints and scratch files.

    The same path on every attempt of a step, so a retried (preempted) trainer resumes from its checkpoints when the
    root is persistent: ``$EASYANIMATE_WORKDIR``, else the work PVC at ``/mnt/work`` when mounted, else the
    system temp folder."""
    root = os.environ.get(WORKDIR_ENV) or (WORK_MOUNT if os.path.ismount(WORK_MOUNT)
                                           else os.path.join(tempfile.gettempdir(), "easyanimate-work"))
    path = Path(root) / (parent_run_id or "adhoc") / step
    path.mkdir(parents=True, exist_ok=True)
    return path


def publish(src: str | os.PathLike, artifact, **metadata) -> str:
    """Copy the folder (or file) ``src`` to the KFP artifact's path; ``metadata`` goes to the artifact."""
    src, dest = Path(src), Path(artifact.path)
    if dest.is_dir():
        shutil.rmtree(dest)
    elif dest.exists():
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dest)
    else:
        shutil.copy2(src, dest)
    artifact.metadata.update(metadata)
    return str(dest)


def scalars(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a summary dict (bools as 0/1), for metrics."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            out[str(key)] = float(value)
    return out


def log_kfp_metrics(metrics_artifact, values: dict[str, Any]) -> dict[str, float]:
    """Write the finite numbers of ``values`` to a KFP ``Metrics`` artifact (shown in the run's UI)."""
    numbers = scalars(values)
    for key, value in numbers.items():
        metrics_artifact.log_metric(key, value)
    return numbers


def metrics_of(metrics_artifact) -> dict[str, float]:
    """The numbers of an input ``Metrics`` artifact (its metadata)."""
    return scalars(dict(metrics_artifact.metadata))
