"""The MLflow pyfunc wrapper of a pipeline folder, and the weight manifest that pins it.

The registered model's one artifact (key ``"pipeline"``) is either

- the pipeline folder itself (copied into the model), or
- a small folder holding ``pipeline_ref.json`` — ``{"path": <absolute folder>, "manifest": {...}}`` — for folders
  registered *by reference* (the official 16 GB weights): loading reads the folder at that path.

``predict`` takes a DataFrame (or a dict / list of dicts) with a ``prompt`` column and optional generation
columns, and returns one row per prompt with the base64 media (MP4, or PNG for one frame) and what produced it.
Generation is one call of ``EasyAnimatePipeline``; this file only parses rows and encodes results.

This module is copied into every registered model (MLflow ``code_paths``), so it imports nothing else of
``serving``: a fresh process needs only ``easyanimate`` installed to load a model.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

ARTIFACT_KEY = "pipeline"
POINTER_FILE = "pipeline_ref.json"
MANIFEST_FILE = "weights_manifest.json"
VERIFY_ENV = "EASYANIMATE_VERIFY_WEIGHTS"  # "1": full sha256 check of a by-reference folder at load (slow: 16 GB)

# request column → (MLflow type, python type); the pipeline's defaults apply where a column is missing or null
REQUEST_COLUMNS: dict[str, tuple[str, type]] = {
    "prompt": ("string", str),
    "negative_prompt": ("string", str),
    "num_frames": ("long", int),
    "height": ("long", int),
    "width": ("long", int),
    "steps": ("long", int),
    "guidance": ("double", float),
    "seed": ("long", int),
    "sampler": ("string", str),
    "fps": ("long", int),
}
RESPONSE_COLUMNS: dict[str, str] = {
    "media": "string",  # base64 of the MP4 (or PNG when num_frames == 1)
    "mime": "string",  # video/mp4 | image/png
    "prompt": "string",
    "num_frames": "long",
    "height": "long",
    "width": "long",
    "fps": "long",
    "steps": "long",
    "guidance": "double",
    "seed": "long",
    "sampler": "string",
    "seconds": "double",  # generation + encoding wall time
}


# ---------------------------------------------------------------------------------------------------------------------
# weight manifests


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """sha256 and size of every file of a pipeline folder (weights, configs, tokenizer files; hidden files skipped).

    Returns ``{"algorithm": "sha256", "files": {relative posix path: {"sha256": hex, "size": bytes}}}``, sorted.
    """
    root = Path(folder)
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        files[rel.as_posix()] = {"sha256": _sha256(path), "size": path.stat().st_size}
    if not files:
        raise FileNotFoundError(f"{root}: no files to record in a weight manifest")
    return {"algorithm": "sha256", "files": files}


def manifest_digest(manifest: dict[str, Any]) -> str:
    """One sha256 over the canonical JSON of a manifest (what the ``weights_sha256`` version tag holds)."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_manifest(folder: str | os.PathLike, manifest: dict[str, Any], full: bool = False) -> None:
    """Raise ``ValueError`` when a file of ``manifest`` is missing or differs in size (and in sha256 if ``full``)."""
    root = Path(folder)
    problems = []
    for rel, entry in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{rel}: {path.stat().st_size} bytes, expected {entry['size']}")
        elif full and _sha256(path) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the registered one")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; … {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"{root} does not match the registered weight manifest: {shown}")


def resolve_pipeline_folder(artifact_dir: str | os.PathLike) -> Path:
    """The pipeline folder behind a model's ``"pipeline"`` artifact: the artifact itself, or the folder its
    ``pipeline_ref.json`` points to (checked to exist and to match the manifest's file sizes)."""
    artifact = Path(artifact_dir)
    if (artifact / "model_index.json").is_file():
        return artifact
    pointer = artifact / POINTER_FILE
    if not pointer.is_file():
        raise FileNotFoundError(f"{artifact} holds neither a pipeline folder (model_index.json) nor {POINTER_FILE}")
    ref = json.loads(pointer.read_text())
    target = Path(ref["path"])
    if not (target / "model_index.json").is_file():
        count, digest = len(ref["manifest"]["files"]), ref.get("weights_sha256", "?")[:12]
        raise FileNotFoundError(
            f"this model was registered by reference to the pipeline folder {target}, which is not on this machine "
            f"({target / 'model_index.json'} does not exist): mount or copy that folder ({count} files, "
            f"weights_sha256 {digest}) to that path"
        )
    check_manifest(target, ref["manifest"], full=os.environ.get(VERIFY_ENV) == "1")
    return target


# ---------------------------------------------------------------------------------------------------------------------
# requests


def request_rows(model_input: Any) -> list[dict[str, Any]]:
    """DataFrame / dict (of scalars or of columns) / list of dicts → one dict per request, nulls dropped."""
    if isinstance(model_input, pd.DataFrame):
        records = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        is_columns = any(isinstance(v, (list, tuple)) for v in model_input.values())
        records = pd.DataFrame(model_input).to_dict(orient="records") if is_columns else [model_input]
    elif isinstance(model_input, (list, tuple)) and all(isinstance(r, dict) for r in model_input):
        records = list(model_input)
    else:
        raise TypeError(f"model_input must be a DataFrame, a dict or a list of dicts, got {type(model_input).__name__}")
    rows = []
    for i, record in enumerate(records):
        unknown = sorted(set(record) - set(REQUEST_COLUMNS))
        if unknown:
            raise ValueError(f"request {i}: unknown columns {unknown}; expected some of {list(REQUEST_COLUMNS)}")
        row = {}
        for key, value in record.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            row[key] = REQUEST_COLUMNS[key][1](value.item() if hasattr(value, "item") else value)
        if not row.get("prompt"):
            raise ValueError(f"request {i}: a non-empty 'prompt' is required")
        rows.append(row)
    if not rows:
        raise ValueError("model_input holds no requests")
    return rows


def default_request() -> dict[str, Any]:
    """The generation defaults of ``easyanimate.config.GenerateConfig`` under the request's column names."""
    from easyanimate.config import GenerateConfig

    g = asdict(GenerateConfig())
    return {"negative_prompt": g["negative_prompt"], "num_frames": g["num_frames"], "height": g["height"],
            "width": g["width"], "steps": g["steps"], "guidance": g["guidance_scale"], "seed": g["seed"],
            "sampler": g["sampler"], "fps": g["fps"]}


def generate_one(pipe, request: dict[str, Any]) -> dict[str, Any]:
    """Run the pipeline for one complete request → a response row (base64 media + what produced it)."""
    import torch

    from easyanimate.video import encode_media

    start = time.perf_counter()
    pipe.set_sampler(request["sampler"])  # a fresh scheduler per request: no state carried over
    generator = torch.Generator("cpu").manual_seed(request["seed"])
    videos = pipe(
        request["prompt"], negative_prompt=request["negative_prompt"], num_frames=request["num_frames"],
        height=request["height"], width=request["width"], num_inference_steps=request["steps"],
        guidance_scale=request["guidance"], generator=generator, output_type="pt", show_progress=False,
        accel=request.get("accel"),  # the version's generate_defaults "accel" (easyanimate.accel spec); None = exact
    ).videos
    data, suffix = encode_media(videos[0], fps=request["fps"])
    return {
        "media": base64.b64encode(data).decode("ascii"),
        "mime": "image/png" if suffix == ".png" else "video/mp4",
        **{k: request[k] for k in ("prompt", "num_frames", "height", "width", "fps", "steps", "guidance", "seed",
                                   "sampler")},
        "seconds": round(time.perf_counter() - start, 3),
    }


# ---------------------------------------------------------------------------------------------------------------------
# the pyfunc


class EasyAnimatePyfunc(mlflow.pyfunc.PythonModel):
    """Text → video. Artifact ``"pipeline"``: a pipeline folder or a by-reference pointer to one.

    ``model_config`` (optional, set at logging time): generation defaults under the request column names
    (e.g. ``{"num_frames": 9, "height": 64, "width": 64, "steps": 5}``), plus ``"torch_dtype"`` and ``"accel"``
    (an ``easyanimate.accel`` spec such as ``"default"`` or ``"cache=first_block,threshold=0.08"``).
    """

    def load_context(self, context) -> None:
        from easyanimate.pipeline import EasyAnimatePipeline

        config = dict(getattr(context, "model_config", None) or {})
        self.folder = resolve_pipeline_folder(context.artifacts[ARTIFACT_KEY])
        self.pipe = EasyAnimatePipeline.from_pretrained(self.folder, torch_dtype=config.pop("torch_dtype", None))
        self.defaults = {**default_request(), **{k: v for k, v in config.items() if k in REQUEST_COLUMNS}}
        self.defaults["accel"] = str(config.get("accel", "default"))  # speed setting (easyanimate.accel spec)
        self._lock = threading.Lock()  # one generation at a time: the pipeline and its scheduler are stateful

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One response row per request row (MLflow hands a DataFrame; direct callers may pass dicts/lists)."""
        rows = request_rows(model_input)
        out = []
        with self._lock:
            for row in rows:
                out.append(generate_one(self.pipe, {**self.defaults, **row}))
        return pd.DataFrame(out, columns=list(RESPONSE_COLUMNS))


def model_signature() -> ModelSignature:
    """Inputs: ``prompt`` (required) and the optional generation columns; outputs: ``RESPONSE_COLUMNS``."""
    inputs = Schema([ColSpec(t, name, required=(name == "prompt")) for name, (t, _) in REQUEST_COLUMNS.items()])
    outputs = Schema([ColSpec(t, name) for name, t in RESPONSE_COLUMNS.items()])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example() -> pd.DataFrame:
    return pd.DataFrame([{"prompt": "A cat walks on the grass, realistic style.", "num_frames": 9, "height": 64,
                          "width": 64, "steps": 5, "guidance": 6.0, "seed": 43, "sampler": "DPM++", "fps": 8}])


__all__ = ["ARTIFACT_KEY", "EasyAnimatePyfunc", "MANIFEST_FILE", "POINTER_FILE", "check_manifest", "generate_one",
           "input_example", "manifest_digest", "model_signature", "request_rows", "resolve_pipeline_folder",
           "weights_manifest"]
