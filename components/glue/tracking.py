"""MLflow for the pipeline: one parent run per pipeline run (opened by ``start_tracking``, closed by the exit
handler ``finish_tracking``), one nested run per step (``components/mlflow_tracker.py``), links into the MLflow UI, and
the preprocessing run's dataset record.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from components.glue.artifacts import scalars

logger = logging.getLogger(__name__)


def start_pipeline_run(tracking_uri: str, experiment: str, run_name: str, cfg, params: dict[str, Any],
                       tags: dict[str, Any] | None = None) -> str:
    """Open the pipeline's parent run (RUNNING until ``end_pipeline_run``), log the resolved config and the pipeline
    parameters as params, and return its id."""
    from components.mlflow_tracker import MlflowTracker, start_parent_run

    run_id = start_parent_run(tracking_uri or None, experiment or None, run_name or None,
                              {"kind": "pipeline", "preset": cfg.name, **(tags or {})})
    tracker = MlflowTracker(run_id, tracking_uri=tracking_uri or None)
    tracker.log_params({**cfg.to_dict(), "pipeline": params})
    return run_id


def find_pipeline_run(tracking_uri: str, experiment: str, kfp_run_id: str) -> str | None:
    """The parent run that ``start_pipeline_run`` tagged with this KFP run id (an exit handler cannot take task
    outputs, so it finds the run by tag); None when there is none (e.g. ``start_tracking`` itself failed)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri or None)
    exp = client.get_experiment_by_name(experiment or "easyanimate")
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.kfp_run_id = '{kfp_run_id}'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def end_pipeline_run(tracking_uri: str, experiment: str, kfp_run_id: str,
                     final_status: dict[str, Any] | None) -> str:
    """Close the parent run of KFP run ``kfp_run_id`` with the pipeline's final state (KFP
    ``PipelineTaskFinalStatus``); returns the MLflow status written (FINISHED, FAILED, KILLED), NOT_FOUND, or
    UNREACHABLE when the tracking server does not answer."""
    from components.mlflow_tracker import MlflowTracker, TrackingUnavailable, bound_http_retries, check_tracking, end_run

    bound_http_retries()
    try:
        check_tracking(tracking_uri or None)
    except TrackingUnavailable as exc:  # the exit handler reports, it does not fail a second time
        logger.error("cannot close the pipeline's MLflow run: %s", exc)
        return "UNREACHABLE"
    run_id = find_pipeline_run(tracking_uri, experiment, kfp_run_id)
    if run_id is None:
        logger.warning("no MLflow run tagged kfp_run_id=%s in experiment %r: nothing to close", kfp_run_id, experiment)
        return "NOT_FOUND"
    state = str((final_status or {}).get("state") or "SUCCEEDED").upper()
    status = {"SUCCEEDED": "FINISHED", "CANCELLED": "KILLED", "CANCELED": "KILLED"}.get(state, "FAILED")
    error = (final_status or {}).get("error") or {}
    tags = {"kfp_final_state": state}
    if error.get("message"):
        tags["kfp_error"] = str(error["message"])
    MlflowTracker(run_id, tracking_uri=tracking_uri or None).set_tags(tags)
    end_run(tracking_uri or None, run_id, status)
    return status


def summarize_pipeline_run(tracking_uri: str, parent_run_id: str, metrics: dict[str, float], model_version: str,
                           promoted: bool) -> None:
    """The pipeline's parent run gets the outcome (what "compare runs" shows a pipeline run by): the evaluation
    metrics under the evaluate run's names (``eval/…``) and ``registry/champion`` 1/0; the registered version as a
    tag."""
    from components.mlflow_tracker import MlflowTracker

    parent = MlflowTracker(parent_run_id, tracking_uri=tracking_uri or None, metrics="eval")
    parent.log_metrics({**metrics, "registry/champion": float(promoted)}, step=0)
    parent.set_tags({"model_version": model_version, "champion": promoted})


# the metric names of each step's run (components/mlflow_tracker.py ``metric_name``): train/… and val/… for every
# trainer (VAE, DiT, LoRA), eval/… for the evaluation, data/… for the preprocessing counts
STEP_METRICS = {"train_vae": "train", "train_dit": "train", "evaluate": "eval", "preprocess": "data"}


def step_run(tracking_uri: str, parent_run_id: str, step: str, cfg=None, tags: dict[str, Any] | None = None,
             dataset=None, system_metrics: bool = False):
    """The nested MLflow run of one step, as a ``Tracker`` context manager (FINISHED on success, FAILED on an
    exception); the resolved config is logged as params when ``cfg`` is given, the KFP ``dataset`` artifact the step
    reads as the run's MLflow input, and ``system_metrics`` samples CPU/memory/GPU while the step runs. Metric names
    follow ``STEP_METRICS``."""
    from components.mlflow_tracker import MlflowTracker

    tracker = MlflowTracker(tracking_uri=tracking_uri or None, run_name=step, parent_run_id=parent_run_id or None,
                            tags={"step": step, "pipeline_run_id": parent_run_id, **(tags or {})},
                            system_metrics=system_metrics, metrics=STEP_METRICS.get(step))
    if cfg is not None:
        tracker.log_params(cfg.to_dict())
    if dataset is not None:
        log_dataset_input(tracker, dataset.path, dict(dataset.metadata),
                          "evaluation" if step == "evaluate" else "training")
    return tracker


# the columns of a meta.json row (easyanimate/data/meta.py), as the dataset's schema in MLflow
META_SCHEMA = [{"type": "string", "name": "file_path", "required": True},
               {"type": "string", "name": "text", "required": True},
               {"type": "string", "name": "type", "required": False}]


def log_dataset_input(tracker, dataset_dir: str | os.PathLike, metadata: dict[str, Any], context: str) -> None:
    """The merged dataset as an MLflow input of the run: source = the raw input folder, digest = its data version
    (DVC hash or file digest), schema = meta.json's columns, profile = the counts."""
    version = str(metadata.get("data_version") or f"sha256:{metadata.get('meta_sha256', 'unknown')}")
    profile = {k: metadata[k] for k in ("kept_videos", "kept_images", "clips_cut", "inputs", "num_shards",
                                        "dvc_data_hash", "meta_sha256") if k in metadata}
    tracker.log_input(Path(str(metadata.get("source") or dataset_dir)).name or "dataset", digest=version,
                      source=str(metadata.get("source") or dataset_dir), context=context, schema=META_SCHEMA,
                      profile={"meta_json": str(Path(dataset_dir) / "meta.json"), **profile})


MLFLOW_UI_ENV = "EASYANIMATE_MLFLOW_UI_URL"  # the MLflow UI address a browser opens (pipelines/train_pipeline.py)


def _ui_base(tracker) -> str | None:
    """``$EASYANIMATE_MLFLOW_UI_URL`` (the address outside the cluster), else an http(s) tracking URI, else None."""
    uri = os.environ.get(MLFLOW_UI_ENV) or str(tracker.tracking_uri)
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def run_link(tracker) -> str:
    """A link to the run in the MLflow UI (``$EASYANIMATE_MLFLOW_UI_URL`` or an http tracking URI), else its
    ``runs:/`` URI."""
    base = _ui_base(tracker)
    if base:
        return f"{base}/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}"
    return f"runs:/{tracker.run_id}"


def artifact_link(tracker, path: str) -> str:
    """A link to one artifact of the run in the MLflow UI (or its ``runs:/`` URI)."""
    if _ui_base(tracker):
        return f"{run_link(tracker)}/artifacts/{path}"
    return f"runs:/{tracker.run_id}/{path}"


def sample_links(tracker, paths: list[str], folder: str = "samples") -> dict[str, str]:
    """Links to sample files logged under ``folder/`` of the run, plus the run itself."""
    links = {f"sample {Path(p).name}": artifact_link(tracker, f"{folder}/{Path(p).name}") for p in paths}
    links["MLflow run"] = run_link(tracker)
    return links


def log_dataset(tracker, dataset_dir: str | os.PathLike, shards: list, summary: dict[str, Any],
                metadata: dict[str, Any] | None = None) -> None:
    """The preprocessing run's record: merged counts as metrics (``data/…`` in a ``step_run``); meta.json,
    summary.json, rejects.csv of the dataset and every shard's summary.json (``shards/<i>-of-<n>/``) as artifacts;
    with the dataset artifact's ``metadata`` (``data.dataset_metadata``), the dataset as the run's MLflow input
    (context "preprocessing")."""
    if metadata is not None:
        log_dataset_input(tracker, dataset_dir, metadata, "preprocessing")
    tracker.log_metrics(scalars(summary), step=0)
    for name in ("summary.json", "rejects.csv", "meta.json"):
        tracker.log_artifact(Path(dataset_dir) / name, "dataset")
    for shard in shards:
        label = str(shard.metadata.get("shard", Path(shard.path).name)).replace("/", "-of-")
        if (Path(shard.path) / "summary.json").is_file():
            tracker.log_artifact(Path(shard.path) / "summary.json", f"shards/{label}")
