"""Atomic file-system writes: a reader (or a resumed run) never sees half a file or half a folder."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_dir(src: str | Path, final: str | Path, old_name: str | None = None) -> Path:
    """Move the finished folder ``src`` to ``final``; an existing ``final`` is swapped out first, then deleted.

    ``old_name``: the name the previous folder takes while it is swapped out (default ``.<final>.old-<random>``),
    so a writer that cleans up its own temp names also cleans up after a kill between the two renames.
    """
    src, final = Path(src), Path(final)
    if final.exists():
        old = final.parent / (old_name or f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(src, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, final)
    return final
