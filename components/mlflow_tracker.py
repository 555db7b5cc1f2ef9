"""``MlflowTracker``: the library's ``Tracker`` protocol (``easyanimate.tracking``) on MLflow.

Everything goes through ``MlflowClient`` with an explicit run id: no fluent API and no global active run, so a
process may hold several trackers at once (a pipeline's parent run and a step's nested run, say).

    with MlflowTracker(tracking_uri=uri, experiment="easyanimate", run_name="train_dit", parent_run_id=parent) as t:
        t.log_params(cfg.to_dict())          # nested dicts become dotted keys
        t.log_metrics({"loss": 0.3}, step=10)
        t.log_artifact("samples/")           # a folder lands under "samples/" in the run

An unreachable tracking server fails fast instead of stalling a pipeline: MLflow's HTTP retries are bounded
(``bound_http_retries``: 2 retries, 1 s backoff, unless the environment sets them), and a tracker checks the server
first (``check_tracking``: a few ``/health`` probes, then ``TrackingUnavailable`` naming the URI).

Metric names are mapped here, in one place (``metric_name``): a tracker made with ``metrics="train"`` (VAE, DiT and
LoRA runs) logs ``loss`` as ``train/loss`` and ``val_psnr`` as ``val/psnr``; ``metrics="eval"`` logs ``eval/<name>``,
``metrics="data"`` ``data/<name>``; so "compare runs" charts line up across kinds of runs. The library's own files
(``metrics.jsonl``, the evaluation JSON) keep the plain names. A trainer's end-of-run summary row becomes
``summary.<name>`` tags instead of one-point charts. Sample MP4s smaller than ``video_min_side`` are logged enlarged
(pixel repetition) so MLflow's artifact viewer, which shows a video at its own size, shows them at a visible size.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

try:  # the store's limits (6000/8000 in MLflow 3.17); fall back to those if the private module moves
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH
except ImportError:  # pragma: no cover
    MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH = 6000, 8000

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "easyanimate"
_PARAMS_PER_BATCH = 100  # log_batch accepts at most 100 params and 1000 metrics per call
_METRICS_PER_BATCH = 1000
_STATUSES = {RunStatus.to_string(s) for s in RunStatus.all_status()}

# What a run's metrics are named in MLflow (README "MLflow", "Metric names"): the run's kind is the prefix, and a
# training run's validation metrics (``val_*``) go to ``val/``; names that already hold a "/" (``system/…``,
# ``registry/champion``) are kept.
METRIC_KINDS = ("train", "eval", "data")
# ``train_dit`` ends with one summary row at its last step (final/first-20 %/last-20 % loss, steps, seconds, world
# size, mean throughput): single values and aggregates of series already logged, recognised by this key and set as
# ``summary.<name>`` tags, where one-point charts would say nothing
SUMMARY_MARKER = "steps_this_run"
# MLflow 3.17's artifact viewer plays an MP4 in a <video> at the file's own size (max 100 % wide, 62.5 % of the
# window high, no minimum): a 64 px sample is a speck in a black panel. Smaller MP4s are logged enlarged.
VIDEO_MIN_SIDE = 256
VIDEO_MAX_SIDE = 1536


def metric_name(key: str, kind: str | None) -> str:
    """The MLflow name of the library's metric ``key`` in a run of ``kind`` (None: unchanged).

    ``("loss", "train")`` → ``train/loss``; ``("val_psnr", "train")`` → ``val/psnr``; ``("vae_psnr", "eval")`` →
    ``eval/vae_psnr``; ``("kept_videos", "data")`` → ``data/kept_videos``; ``("system/cpu", any)`` unchanged."""
    key = str(key)
    if kind is None or "/" in key:
        return key
    if kind == "train" and key.startswith("val_"):
        return f"val/{key[len('val_'):]}"
    return f"{kind}/{key}"


# MLflow's defaults retry a refused connection 7 times with backoff 2 (~4 minutes per call); a pipeline step makes
# dozens of calls. Bounded: a dead server fails a call in a few seconds (a user's explicit setting wins).
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5"}


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server does not answer: the message names its URI (without credentials)."""


def bound_http_retries() -> None:
    """Bound MLflow's HTTP retries for this process (``HTTP_RETRY_DEFAULTS``) unless the environment sets them."""
    for key, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)


def redact_uri(uri: str) -> str:
    """``http://user:secret@host`` → ``http://***@host`` (URIs go into messages and logs)."""
    return re.sub(r"//[^/@]*@", "//***@", str(uri))


def check_tracking(tracking_uri: str | None, attempts: int = 3, delay: float = 1.0, timeout: float = 5.0) -> None:
    """Raise ``TrackingUnavailable`` when an ``http(s)://`` tracking server does not answer ``GET /health`` within
    ``attempts`` tries ``delay`` s apart (``timeout`` s each); other URIs (sqlite, file, databricks) are not probed."""
    uri = str(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "")
    if not uri.startswith(("http://", "https://")):
        return
    url = re.sub(r"//[^/@]*@", "//", uri).rstrip("/") + "/health"  # credentials go in MLFLOW_TRACKING_* env vars
    started, error = time.monotonic(), ""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                if resp.status == 200:
                    return
                error = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):  # an authenticating server is up; the client's credentials are MLflow's job
                return
            error = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"
        if attempt + 1 < attempts:
            time.sleep(delay)
    raise TrackingUnavailable(
        f"MLflow tracking server {redact_uri(uri)} is unreachable ({attempts} attempts over "
        f"{time.monotonic() - started:.0f} s; last: {error}); start it or pass the right --tracking-uri")


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` → ``{"a.b": "1", "c": "[1, 2]"}``; values truncated to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        if isinstance(value, (list, tuple, dict)):
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        flat[name] = _truncate(text, MAX_PARAM_VAL_LENGTH)
    return flat


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_float(value: Any) -> float | None:
    """Python/numpy/torch scalars → float; None when it is not a number."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return float(value)


def enlarged_video(path: Path, folder: Path, min_side: int = VIDEO_MIN_SIDE,
                   max_side: int = VIDEO_MAX_SIDE) -> Path | None:
    """``folder/<name>``: the MP4 ``path`` enlarged k× by pixel repetition (same frames, same fps; k the smallest
    whole factor that brings its shorter side to ``min_side``, bounded so the longer side stays ≤ ``max_side``);
    None when ``path`` is not an MP4, is large enough, or ``min_side`` is 0."""
    if min_side <= 0 or path.suffix.lower() != ".mp4":
        return None
    import av
    import numpy as np

    from easyanimate.video import read_video, video_to_mp4_bytes

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        height, width = stream.codec_context.height, stream.codec_context.width
        fps = max(1, round(float(stream.average_rate or stream.guessed_rate or 24)))
    factor = min(math.ceil(min_side / max(1, min(height, width))), max(1, max_side // max(1, height, width)))
    if factor <= 1:
        return None
    frames = np.repeat(np.repeat(read_video(path), factor, axis=1), factor, axis=2)
    out = folder / path.name
    out.write_bytes(video_to_mp4_bytes(frames, fps))
    return out


def _experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created by someone else in the meantime
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class MlflowTracker:
    """A ``Tracker`` writing to one MLflow run.

    Args:
        run_id (`str`, optional): attach to this existing run instead of creating one. An attached run is not
            ended by ``close()`` unless ``end_on_close=True``.
        tracking_uri (`str`, optional): MLflow tracking URI (default: ``MLFLOW_TRACKING_URI`` / MLflow's default).
        experiment (`str`, optional): experiment name for a new run; created when missing. Default: the parent
            run's experiment when ``parent_run_id`` is given, else ``MLFLOW_EXPERIMENT_NAME`` or "easyanimate".
        run_name (`str`, optional): display name of a new run.
        parent_run_id (`str`, optional): nest the new run under this run (MLflow's ``mlflow.parentRunId`` tag).
        tags (`dict`, optional): tags set on the run (new or attached).
        end_on_close (`bool`, optional): whether ``close()`` terminates the run; default True for a run this tracker
            created, False for an attached one.
        system_metrics (`bool`, optional): sample CPU/memory/disk/network (and GPU when present) into the run's
            ``system/*`` metrics every ``system_metrics_interval`` seconds until ``close()`` (MLflow's
            ``SystemMetricsMonitor``; default: ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``, else 10 s); for training
            runs.
        metrics (`str`, optional): the run's kind for metric names (``METRIC_KINDS``: "train", "eval", "data";
            see ``metric_name``); None (default) logs names as given.
        video_min_side (`int`, optional): an MP4 logged as a file whose shorter side is below this is uploaded
            enlarged by a whole factor (default ``VIDEO_MIN_SIDE``; 0 uploads every file as it is).
    """

    def __init__(
        self,
        run_id: str | None = None,
        *,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, Any] | None = None,
        end_on_close: bool | None = None,
        system_metrics: bool = False,
        system_metrics_interval: float | None = None,
        metrics: str | None = None,
        video_min_side: int = VIDEO_MIN_SIDE,
    ) -> None:
        if metrics is not None and metrics not in METRIC_KINDS:
            raise ValueError(f"metrics must be one of {list(METRIC_KINDS)} or None, got {metrics!r}")
        self.metric_kind = metrics
        self.video_min_side = int(video_min_side)
        bound_http_retries()
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = self.client.tracking_uri
        check_tracking(self.tracking_uri)
        tags = {str(k): _truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in (tags or {}).items()}
        if run_id is not None:
            run = self.client.get_run(run_id)  # fails early with MLflow's RESOURCE_DOES_NOT_EXIST
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)
            self._params = dict(run.data.params)
            self.end_on_close = bool(end_on_close)
        else:
            if experiment is None and parent_run_id is not None:
                experiment_id = self.client.get_run(parent_run_id).info.experiment_id
            else:
                name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
                experiment_id = _experiment_id(self.client, name)
            if parent_run_id is not None:
                tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
            run = self.client.create_run(experiment_id, tags=tags, run_name=run_name)
            self._params = {}
            self.end_on_close = True if end_on_close is None else bool(end_on_close)
        self.run_id: str = run.info.run_id
        self.experiment_id: str = run.info.experiment_id
        self.closed = False
        self._monitor = None
        self._monitor_step0 = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            interval = system_metrics_interval or float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or 10)
            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval,
                                                 tracking_uri=self.tracking_uri)
            self._monitor.start()
            self._monitor_step0 = getattr(self._monitor, "_logging_step", None)

    # ------------------------------------------------------------------------------------------------------------------
    # the Tracker protocol

    def log_params(self, params: dict[str, Any]) -> None:
        """Log (nested) params as dotted keys. Keys already logged with the same value are skipped; MLflow cannot
        change a logged param, so a different value is warned about and kept as the tag ``param_changed.<key>``."""
        new: dict[str, str] = {}
        for key, value in flatten_params(params).items():
            old = self._params.get(key)
            if old is None:
                new[key] = value
            elif old != value:
                logger.warning("param %r was logged as %r; MLflow keeps it, the new value %r goes to a tag",
                               key, old, value)
                self.client.set_tag(self.run_id, f"param_changed.{key}", _truncate(value, MAX_TAG_VAL_LENGTH))
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            chunk = items[i: i + _PARAMS_PER_BATCH]
            try:
                self.client.log_batch(self.run_id, params=chunk)
            except MlflowException:
                # another writer of this run may have logged some of these keys: re-read, then compare again
                self._params = dict(self.client.get_run(self.run_id).data.params)
                if not any(p.key in self._params for p in chunk):
                    raise
                self.log_params({p.key: p.value for p in chunk})
                continue
            self._params.update({p.key: p.value for p in chunk})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log scalar metrics at ``step`` in one ``log_batch``, named by ``metric_name`` for this run's kind;
        NaN/inf and non-numbers are dropped with a warning. A training run's summary row (``SUMMARY_MARKER``) is set
        as ``summary.<name>`` tags instead."""
        if self.metric_kind == "train" and SUMMARY_MARKER in metrics:
            numbers = {k: _as_float(v) for k, v in metrics.items()}
            self.set_tags({f"summary.{k}": f"{v:.6g}" for k, v in numbers.items() if v is not None})
            return
        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            number = _as_float(value)
            if number is None or not math.isfinite(number):
                logger.warning("dropping metric %r=%r at step %d: not a finite number", key, value, step)
                continue
            items.append(Metric(key=metric_name(key, self.metric_kind), value=number, timestamp=now, step=int(step)))
        for i in range(0, len(items), _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i: i + _METRICS_PER_BATCH])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file (to ``artifact_path/<name>``) or a folder (to ``artifact_path/<folder name>/...``)."""
        path = Path(path)
        if path.is_dir():
            dest = posixpath.join(artifact_path, path.name) if artifact_path else path.name
            self.client.log_artifacts(self.run_id, str(path), dest)
        elif path.is_file() and path.suffix.lower() == ".mp4" and self.video_min_side > 0:
            with tempfile.TemporaryDirectory(prefix="mlflow-video-") as tmp:
                try:
                    shown = enlarged_video(path, Path(tmp), self.video_min_side)
                except Exception as exc:  # a display nicety: never fail the run for it, log the file as it is
                    logger.warning("logging %s at its own size: could not enlarge it (%s)", path, exc)
                    shown = None
                self.client.log_artifact(self.run_id, str(shown or path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"cannot log artifact {path}: expected a file or folder")

    def close(self, status: str = "FINISHED") -> None:
        """End the run (when this tracker owns it) with ``status``: FINISHED, FAILED or KILLED. Idempotent."""
        if self.closed:
            return
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {sorted(_STATUSES)}, got {status!r}")
        self.closed = True
        if self._monitor is not None:  # the last samples are flushed before the run ends
            monitor, self._monitor = self._monitor, None
            step0 = self._monitor_step0
            monitor.finish()
            if getattr(monitor, "_logging_step", step0) == step0:
                # a run shorter than one sampling interval: MLflow's loop stops before its first publish, so
                # take one sample now; the run still shows its CPU/memory/disk figures
                try:
                    monitor.collect_metrics()
                    monitor.publish_metrics(monitor.aggregate_metrics())
                    monitor.mlflow_logger.flush()
                except Exception as exc:  # system metrics are a nicety: never fail the run for them
                    logger.warning("could not log the final system metrics sample: %s", exc)
        if self.end_on_close:
            self.client.set_terminated(self.run_id, status=status)

    # ------------------------------------------------------------------------------------------------------------------

    def log_input(self, name: str, *, digest: str, source: str, source_type: str = "local", context: str = "training",
                  schema: dict[str, Any] | None = None, profile: dict[str, Any] | None = None) -> None:
        """Record a dataset this run read (``mlflow.log_input``: the run's Dataset column and the "Datasets used"
        panel). ``digest`` is the data version; MLflow keeps 36 characters of it (the full value goes to
        ``profile["data_version"]``). ``schema``: an MLflow ``Schema.to_dict()`` list; ``context``: training,
        evaluation, preprocessing…"""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        profile = {"data_version": digest, **(profile or {})}
        short = digest.split(":", 1)[-1][:36]
        dataset = Dataset(name=name, digest=short, source_type=source_type, source=json.dumps({"uri": source}),
                          schema=json.dumps({"mlflow_colspec": schema}) if schema else None,
                          profile=json.dumps(profile))
        self.client.log_inputs(self.run_id, [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags (overwritable, unlike params)."""
        items = [RunTag(str(k), _truncate(str(v), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("FINISHED")
            return
        try:  # mark the run when MLflow still answers; never hide the step's own error behind MLflow's
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        except Exception as close_exc:
            logger.warning("could not mark MLflow run %s as failed at %s: %s", self.run_id,
                           redact_uri(self.tracking_uri), close_exc)

    def __repr__(self) -> str:
        return f"MlflowTracker(run_id={self.run_id!r}, tracking_uri={self.tracking_uri!r})"


def start_parent_run(tracking_uri: str | None, experiment: str | None = None, run_name: str | None = None,
                     tags: dict[str, Any] | None = None) -> str:
    """Create a RUNNING run that steps nest under (``MlflowTracker(parent_run_id=...)``); returns its id."""
    tracker = MlflowTracker(tracking_uri=tracking_uri, experiment=experiment, run_name=run_name, tags=tags)
    return tracker.run_id


def end_run(tracking_uri: str | None, run_id: str, status: str = "FINISHED") -> None:
    """Terminate a run created by ``start_parent_run`` (status FINISHED, FAILED or KILLED)."""
    if status not in _STATUSES:
        raise ValueError(f"status must be one of {sorted(_STATUSES)}, got {status!r}")
    bound_http_retries()
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


__all__ = ["HTTP_RETRY_DEFAULTS", "METRIC_KINDS", "MlflowTracker", "SUMMARY_MARKER", "TrackingUnavailable",
           "VIDEO_MIN_SIDE", "bound_http_retries", "check_tracking", "end_run", "enlarged_video", "flatten_params",
           "metric_name", "redact_uri", "start_parent_run"]
