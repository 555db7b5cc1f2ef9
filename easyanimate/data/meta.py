"""The EasyAnimate meta file: a JSON list (or CSV) of ``{"file_path", "text", "type": "video"|"image", …}``.

``file_path`` is relative to the dataset root (or absolute, only where allowed). Extra keys written by our
preprocessing: ``width``, ``height``, ``fps``, ``num_frames`` and the clip's origin ``source``, ``start_frame``,
``end_frame`` (source frame numbers, end exclusive).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..video import atomic_write_bytes

TYPES = ("video", "image")


def resolve_media_path(root: str | Path, file_path: str, allow_absolute: bool = False) -> Path:
    """The file a meta entry points to; refuses paths that leave the dataset root.

    Relative paths are joined to ``root``; ``..`` components or symlinks that lead outside it raise ``ValueError``.
    Absolute paths are refused unless ``allow_absolute`` (then they are used as they are).
    """
    root = Path(root).resolve()
    p = Path(file_path)
    if p.is_absolute():
        if not allow_absolute:
            raise ValueError(f"file_path {file_path!r} is absolute; expected a path inside {root} "
                             "(allow absolute paths explicitly to use it)")
        return p
    full = (root / p).resolve()
    if full != root and root not in full.parents:
        raise ValueError(f"file_path {file_path!r} points outside the dataset root {root}")
    return full


def validate_entry(entry: Any, index: int) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"meta entry {index}: expected an object, got {type(entry).__name__}")
    for key in ("file_path", "text"):
        if not isinstance(entry.get(key), str):
            raise ValueError(f"meta entry {index}: expected a string {key!r}, got {entry.get(key)!r}")
    kind = entry.get("type", "video")
    if kind not in TYPES:
        raise ValueError(f"meta entry {index}: type must be one of {TYPES}, got {kind!r}")
    return {**entry, "type": kind}


def load_meta(path: str | Path, root: str | Path | None = None, allow_absolute: bool = False) -> list[dict[str, Any]]:
    """Read and validate a meta JSON/CSV; every entry gets ``abs_path`` resolved safely against ``root``.

    ``root`` defaults to the meta file's folder.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as fh:
            raw: Any = list(csv.DictReader(fh))
    else:
        raw = json.loads(path.read_text())
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of entries, got {type(raw).__name__}")
    entries = []
    for i, item in enumerate(raw):
        entry = validate_entry(item, i)
        entry["abs_path"] = str(resolve_media_path(root, entry["file_path"], allow_absolute))
        entries.append(entry)
    return entries


def write_meta(path: str | Path, entries: list[dict[str, Any]]) -> Path:
    """Write the meta JSON atomically (no half-written file after a kill)."""
    clean = [{k: v for k, v in e.items() if k != "abs_path"} for e in entries]
    return atomic_write_bytes(path, (json.dumps(clean, indent=1, ensure_ascii=False) + "\n").encode())
