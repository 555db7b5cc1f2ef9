"""Lineage: which data a step saw. The preprocess fan-out plan, the input's version (DVC hash or a cheap file
listing digest), what a merged dataset artifact carries, and the tags tying a registered model to config and data.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from components.glue.settings import parse_overrides


def shard_specs(num_shards: int) -> list[str]:
    """``["0/n", …, "n-1/n"]``: the items the preprocess fan-out iterates over."""
    if int(num_shards) < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return [f"{i}/{int(num_shards)}" for i in range(int(num_shards))]


def shard_plan(source: str | os.PathLike, num_shards: int) -> list[dict[str, str]]:
    """The preprocess fan-out items: ``{"shard": "i/n", "data_version": …}`` per shard (see ``data_version``)."""
    version = data_version(source)
    return [{"shard": shard, "data_version": version} for shard in shard_specs(num_shards)]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dvc_hash(source: str | os.PathLike) -> str:
    """The DVC version of an input folder: the ``md5`` in ``<source>.dvc`` beside it (``dvc add``), else "unknown"."""
    dvc_file = Path(str(source).rstrip("/") + ".dvc")
    if not dvc_file.is_file():
        return "unknown"
    import yaml

    try:
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
        return str(outs[0].get("md5") or "unknown")
    except (yaml.YAMLError, AttributeError, IndexError, TypeError):
        return "unknown"


def data_version(source: str | os.PathLike) -> str:
    """A version of the raw input: ``dvc:<md5>`` when ``<source>.dvc`` exists, else ``files:<sha256>`` over every
    file's relative name, size and mtime (a folder: everything under it, captions included; a list file: itself and
    the files it lists). Cheap — no file is read — and it changes whenever an input is added, removed or rewritten."""
    md5 = dvc_hash(source)
    if md5 != "unknown":
        return f"dvc:{md5}"
    from easyanimate.preprocess.run import discover_inputs

    source = Path(source)
    root, files = discover_inputs(source)
    if source.is_dir():
        files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
    else:
        files = [source.resolve(), *files]
    h = hashlib.sha256()
    for path in sorted(files):
        st = path.stat()
        h.update(f"{path.relative_to(root) if path.is_relative_to(root) else path}\0{st.st_size}\0"
                 f"{st.st_mtime_ns}\n".encode())
    return f"files:{h.hexdigest()}"


def dataset_metadata(dataset_dir: str | os.PathLike, shards: list, summary: dict[str, Any]) -> dict[str, Any]:
    """What a merged dataset artifact carries: its meta.json digest, the input's DVC version, the counts."""
    hashes = sorted({s.metadata.get("dvc_data_hash", "unknown") for s in shards})
    versions = sorted({s.metadata.get("data_version", "unknown") for s in shards})
    return {"meta_sha256": file_sha256(Path(dataset_dir) / "meta.json"),
            "dvc_data_hash": hashes[0] if len(hashes) == 1 else "mixed:" + ",".join(hashes),
            "data_version": versions[0] if len(versions) == 1 else "mixed:" + ",".join(versions),
            "source": shards[0].metadata.get("source", "") if shards else "", "num_shards": len(shards),
            **{k: summary[k] for k in ("kept_videos", "kept_images", "clips_cut", "inputs") if k in summary}}


def lineage_tags(cfg, preset: str, overrides: str, parent_run_id: str, dataset) -> dict[str, str]:
    """Version tags tying a registered model to its pipeline run, config and data (the registry adds git commit and
    weight digests)."""
    return {"pipeline_run_id": parent_run_id, "preset": preset,
            "config_sha256": hashlib.sha256(cfg.to_json().encode()).hexdigest(),
            "overrides": json.dumps(parse_overrides(overrides))[:4000],
            "dvc_data_hash": str(dataset.metadata.get("dvc_data_hash") or "unknown"),
            "data_version": str(dataset.metadata.get("data_version") or "unknown"),
            "data_meta_sha256": str(dataset.metadata.get("meta_sha256") or "unknown")}
