"""The glue every KFP component shares, so that each component body stays a few lines.

A component imports this module inside its body (it runs in the component image, where ``easyanimate``, MLflow and
torch are installed); the heavy imports below are local to the functions that need them. What lives here:

- ``config``: preset + overrides (a JSON list of ``section.key=value``) → ``Config``;
- ``step_run``: the nested MLflow run of one step (``components/mlflow_tracker.py``), under the pipeline's parent run;
  ``start_pipeline_run`` / ``end_pipeline_run`` open and close that parent run;
- artifact handling: ``meta_path``, ``workdir`` (a per-step folder that survives a retried pod when the work PVC is
  mounted, so trainers resume from their checkpoints), ``publish`` (a folder → a KFP artifact), ``log_kfp_metrics``;
- model assembly between steps: ``pipeline_with_vae`` (the DiT trains on the VAE the pipeline just trained),
  ``export_pipeline`` (a LoRA run → a pipeline folder with the LoRA merged, the only model artifact format);
- lineage tags and promotion gates for the registry step;
- reports the Kubeflow UI renders (Markdown, or HTML with the contact sheet inline);
- the multi-node DiT launcher: a Kubeflow Trainer ``TrainJob`` rendered from ``infra/k8s/trainjob.yaml``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import json
import logging
import math
import os
import re
import shlex
import shutil
import string
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

WORK_MOUNT = "/mnt/work"  # where the pipeline mounts the work PVC (infra/k8s/pvc.yaml) on training tasks
WORKDIR_ENV = "EASYANIMATE_WORKDIR"  # overrides the work root (local runs point it into the pipeline root)
TRAINJOB_TEMPLATE_ENV = "EASYANIMATE_TRAINJOB_TEMPLATE"
_REPO_ROOT = Path(__file__).resolve().parent.parent
_IMAGE_INFRA = Path("/opt/easyanimate/infra")  # the Dockerfile copies infra/ here


# ---------------------------------------------------------------------------------------------------------------------
# configuration


def parse_overrides(text: str | None) -> list[str]:
    """``'["train.max_steps=2", "evaluate.steps=2"]'`` → the list; empty text → []."""
    text = (text or "").strip()
    if not text:
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"overrides must be a JSON list of 'section.key=value' strings, got {text!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"overrides must be a JSON list of 'section.key=value' strings, got {text!r}")
    return value


def config(preset: str, overrides: str | None):
    """The resolved ``Config`` of a preset and a JSON list of overrides (unknown keys are errors)."""
    from easyanimate.config import load_config

    return load_config(preset, parse_overrides(overrides))


def shard_specs(num_shards: int) -> list[str]:
    """``["0/n", …, "n-1/n"]``: the items the preprocess fan-out iterates over."""
    if int(num_shards) < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return [f"{i}/{int(num_shards)}" for i in range(int(num_shards))]


def shard_plan(source: str | os.PathLike, num_shards: int) -> list[dict[str, str]]:
    """The preprocess fan-out items: ``{"shard": "i/n", "data_version": …}`` per shard (see ``data_version``)."""
    version = data_version(source)
    return [{"shard": shard, "data_version": version} for shard in shard_specs(num_shards)]


# ---------------------------------------------------------------------------------------------------------------------
# MLflow: one parent run per pipeline run, one nested run per step


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


def step_run(tracking_uri: str, parent_run_id: str, step: str, cfg=None, tags: dict[str, Any] | None = None):
    """The nested MLflow run of one step, as a ``Tracker`` context manager (FINISHED on success, FAILED on an
    exception); the resolved config is logged as params when ``cfg`` is given."""
    from components.mlflow_tracker import MlflowTracker

    tracker = MlflowTracker(tracking_uri=tracking_uri or None, run_name=step, parent_run_id=parent_run_id or None,
                            tags={"step": step, "pipeline_run_id": parent_run_id, **(tags or {})})
    if cfg is not None:
        tracker.log_params(cfg.to_dict())
    return tracker


def run_link(tracker) -> str:
    """A link to the run in the MLflow UI (http tracking URIs), else its ``runs:/`` URI."""
    uri = str(tracker.tracking_uri)
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}"
    return f"runs:/{tracker.run_id}"


def artifact_link(tracker, path: str) -> str:
    """A link to one artifact of the run in the MLflow UI (or its ``runs:/`` URI)."""
    uri = str(tracker.tracking_uri)
    if uri.startswith(("http://", "https://")):
        return f"{run_link(tracker)}/artifacts/{path}"
    return f"runs:/{tracker.run_id}/{path}"


def sample_links(tracker, paths: list[str], folder: str = "samples") -> dict[str, str]:
    """Links to sample files logged under ``folder/`` of the run, plus the run itself."""
    links = {f"sample {Path(p).name}": artifact_link(tracker, f"{folder}/{Path(p).name}") for p in paths}
    links["MLflow run"] = run_link(tracker)
    return links


# ---------------------------------------------------------------------------------------------------------------------
# artifacts and folders


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


def log_dataset(tracker, dataset_dir: str | os.PathLike, shards: list, summary: dict[str, Any]) -> None:
    """The preprocessing run's record: merged counts as metrics; meta.json, summary.json, rejects.csv of the dataset
    and every shard's summary.json (``shards/<i>-of-<n>/``) as artifacts."""
    tracker.log_metrics(scalars(summary), step=0)
    for name in ("summary.json", "rejects.csv", "meta.json"):
        tracker.log_artifact(Path(dataset_dir) / name, "dataset")
    for shard in shards:
        label = str(shard.metadata.get("shard", Path(shard.path).name)).replace("/", "-of-")
        if (Path(shard.path) / "summary.json").is_file():
            tracker.log_artifact(Path(shard.path) / "summary.json", f"shards/{label}")


def dataset_metadata(dataset_dir: str | os.PathLike, shards: list, summary: dict[str, Any]) -> dict[str, Any]:
    """What a merged dataset artifact carries: its meta.json digest, the input's DVC version, the counts."""
    hashes = sorted({s.metadata.get("dvc_data_hash", "unknown") for s in shards})
    versions = sorted({s.metadata.get("data_version", "unknown") for s in shards})
    return {"meta_sha256": file_sha256(Path(dataset_dir) / "meta.json"),
            "dvc_data_hash": hashes[0] if len(hashes) == 1 else "mixed:" + ",".join(hashes),
            "data_version": versions[0] if len(versions) == 1 else "mixed:" + ",".join(versions),
            "source": shards[0].metadata.get("source", "") if shards else "", "num_shards": len(shards),
            **{k: summary[k] for k in ("kept_videos", "kept_images", "clips_cut", "inputs") if k in summary}}


# ---------------------------------------------------------------------------------------------------------------------
# model assembly between steps


def pipeline_with_vae(cfg, vae_dir: str | None, work: Path):
    """``cfg`` training on the VAE folder ``vae_dir``: the base pipeline (``model.pretrained`` or fresh weights) with
    that VAE swapped in, saved once under ``work``; ``model.pretrained`` of the returned config points at it."""
    if not vae_dir:
        return cfg
    from easyanimate.models.autoencoder_magvit import AutoencoderKLMagvit
    from easyanimate.pipeline import build_pipeline

    base = work / "base_pipeline"
    if not (base / "model_index.json").is_file():
        pipe = build_pipeline(cfg.model, sampler=cfg.generate.sampler)
        vae = AutoencoderKLMagvit.from_pretrained(vae_dir).to(pipe.vae.dtype)
        pipe.register_modules(vae=vae)
        pipe.save_pretrained(base)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=str(base)))


def export_pipeline(cfg, final: str | os.PathLike, artifact, lora: bool, **metadata) -> str:
    """The trainer's ``final/`` → the model artifact, always a pipeline folder: a full run's folder as is; a LoRA
    run's base pipeline (``cfg.model``) with the LoRA merged at scale 1, its LoRA files kept under ``lora/``."""
    final = Path(final)
    if not lora:
        return publish(final, artifact, lora=False, **metadata)
    from easyanimate.models.lora import merge_lora
    from easyanimate.pipeline import build_pipeline

    dest = Path(artifact.path)
    pipe = build_pipeline(cfg.model, sampler=cfg.generate.sampler)
    merged = merge_lora(pipe.transformer, final / "lora.safetensors", 1.0)
    pipe.save_pretrained(dest)
    shutil.copytree(final, dest / "lora", dirs_exist_ok=True)
    artifact.metadata.update({"lora": True, "lora_layers_merged": merged, **metadata})
    return str(dest)


# ---------------------------------------------------------------------------------------------------------------------
# registry: lineage and gates


def gates(eval_cfg) -> tuple[dict[str, dict[str, float]], dict[str, bool]]:
    """``evaluate.gate_*`` as the registry's gates (``{"val_loss": {"max": x}, …}``) and their directions."""
    from easyanimate.evaluate import GATES

    limits = {name: {("max" if op == "<=" else "min"): float(getattr(eval_cfg, field))} for name, op, field in GATES}
    return limits, {name: op == ">=" for name, op, _ in GATES}


def lineage_tags(cfg, preset: str, overrides: str, parent_run_id: str, dataset) -> dict[str, str]:
    """Version tags tying a registered model to its pipeline run, config and data (the registry adds git commit and
    weight digests)."""
    return {"pipeline_run_id": parent_run_id, "preset": preset,
            "config_sha256": hashlib.sha256(cfg.to_json().encode()).hexdigest(),
            "overrides": json.dumps(parse_overrides(overrides))[:4000],
            "dvc_data_hash": str(dataset.metadata.get("dvc_data_hash") or "unknown"),
            "data_version": str(dataset.metadata.get("data_version") or "unknown"),
            "data_meta_sha256": str(dataset.metadata.get("meta_sha256") or "unknown")}


def metrics_of(metrics_artifact) -> dict[str, float]:
    """The numbers of an input ``Metrics`` artifact (its metadata)."""
    return scalars(dict(metrics_artifact.metadata))


# ---------------------------------------------------------------------------------------------------------------------
# reports the Kubeflow UI renders


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def markdown_report(artifact, title: str, values: dict[str, Any] | None = None, links: dict[str, str] | None = None,
                    notes: list[str] | tuple[str, ...] = ()) -> str:
    """A Markdown report (``dsl.Markdown``): title, a table of values, links, notes."""
    lines = [f"# {title}", ""]
    if values:
        lines += ["| key | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v).replace('|', '/')} |" for k, v in values.items()]
        lines.append("")
    for name, url in (links or {}).items():
        lines.append(f"- [{name}]({url})")
    if links:
        lines.append("")
    lines += [f"- {n}" for n in notes]
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text("\n".join(lines) + "\n")
    return artifact.path


def html_report(artifact, title: str, values: dict[str, Any], links: dict[str, str] | None = None,
                image: str | os.PathLike | None = None, notes: list[str] | tuple[str, ...] = ()) -> str:
    """A self-contained HTML report (``dsl.HTML``): metrics table, links (e.g. sample MP4s in MLflow), notes and the
    contact sheet inline (the Kubeflow UI shows HTML in a sandboxed frame: no external files)."""
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(_fmt(v))}</td></tr>" for k, v in values.items())
    items = "".join(f'<li><a href="{esc(u)}" target="_blank">{esc(n)}</a></li>' for n, u in (links or {}).items())
    items += "".join(f"<li>{esc(n)}</li>" for n in notes)
    img = ""
    if image and Path(image).is_file():
        data = base64.b64encode(Path(image).read_bytes()).decode()
        img = f'<h2>Contact sheet</h2><img alt="contact sheet" src="data:image/png;base64,{data}">'
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
            "body{font-family:sans-serif}td{padding:2px 10px;border-bottom:1px solid #ddd}</style></head><body>"
            f"<h1>{esc(title)}</h1><table>{rows}</table><ul>{items}</ul>{img}</body></html>")
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(page)
    return artifact.path


# ---------------------------------------------------------------------------------------------------------------------
# multi-node DiT training: a Kubeflow Trainer TrainJob


def trainjob_template() -> Path:
    """``$EASYANIMATE_TRAINJOB_TEMPLATE``, else ``infra/k8s/trainjob.yaml`` in the image or this checkout."""
    if os.environ.get(TRAINJOB_TEMPLATE_ENV):
        return Path(os.environ[TRAINJOB_TEMPLATE_ENV])
    for root in (_IMAGE_INFRA, _REPO_ROOT / "infra"):
        if (root / "k8s" / "trainjob.yaml").is_file():
            return root / "k8s" / "trainjob.yaml"
    raise FileNotFoundError("infra/k8s/trainjob.yaml not found: set EASYANIMATE_TRAINJOB_TEMPLATE")


def trainjob_manifest(*, name: str, namespace: str, image: str, preset: str, overrides: list[str], data: str,
                      output: str, lora: bool, nodes: int, gpus_per_node: int,
                      template: str | os.PathLike | None = None) -> dict[str, Any]:
    """Render the TrainJob template (``${EA_*}`` placeholders; the shell's own ``$PET_*`` variables stay)."""
    import yaml

    args = ["--data", data, "--output", output, "--preset", preset, "--resume", "latest"]
    args += ["--lora"] if lora else []
    for item in overrides:
        args += ["--set", item]
    values = {"EA_NAME": name, "EA_NAMESPACE": namespace, "EA_IMAGE": image, "EA_NUM_NODES": str(int(nodes)),
              "EA_GPUS_PER_NODE": str(int(gpus_per_node)), "EA_TRAIN_ARGS": " ".join(shlex.quote(a) for a in args)}
    text = string.Template(Path(template or trainjob_template()).read_text()).safe_substitute(values)
    left = sorted(set(re.findall(r"\$\{(EA_[A-Z0-9_]+)\}", text)))
    if left:
        raise ValueError(f"TrainJob template has placeholders this code does not fill: {left}")
    return yaml.safe_load(text)


def _namespace() -> str:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.is_file() else "kubeflow"


def run_trainjob(manifest: dict[str, Any], poll_s: float = 30.0, timeout_s: float | None = None) -> dict[str, Any]:
    """Create the TrainJob (or re-attach to it when a retried step finds it) and wait for ``Complete``; a ``Failed``
    job found at start is deleted and recreated (its trainer resumes from the checkpoints on the work PVC)."""
    from kubernetes import client
    from kubernetes import config as kube_config

    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    api = client.CustomObjectsApi()
    group, version = manifest["apiVersion"].split("/")
    ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    ref = (group, version, ns, "trainjobs", name)

    def conditions() -> dict[str, dict]:
        obj = api.get_namespaced_custom_object(*ref)
        return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}

    try:
        api.create_namespaced_custom_object(group, version, ns, "trainjobs", manifest)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
        if "Failed" in conditions():
            api.delete_namespaced_custom_object(*ref, propagation_policy="Foreground")
            while True:  # wait until it is gone, then recreate
                try:
                    api.get_namespaced_custom_object(*ref)
                except client.ApiException as gone:
                    if gone.status == 404:
                        break
                    raise
                time.sleep(5)
            api.create_namespaced_custom_object(group, version, ns, "trainjobs", manifest)
    started = time.monotonic()
    while True:
        found = conditions()
        if "Complete" in found:
            return found["Complete"]
        if "Failed" in found:
            raise RuntimeError(f"TrainJob {ns}/{name} failed: {found['Failed'].get('message', '')}")
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise TimeoutError(f"TrainJob {ns}/{name} not complete after {timeout_s:.0f} s")
        time.sleep(poll_s)


def replay_jsonl(folder: str | os.PathLike, tracker) -> dict[str, Any]:
    """Copy a ``JsonlTracker`` folder (what the TrainJob's trainer wrote) into ``tracker``; returns the last metrics."""
    folder = Path(folder)
    last: dict[str, Any] = {}
    if (folder / "params.json").is_file():
        tracker.log_params(json.loads((folder / "params.json").read_text()))
    if (folder / "metrics.jsonl").is_file():
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                step = int(record.pop("step", 0))
                record.pop("time", None)
                tracker.log_metrics({k: v for k, v in record.items() if v is not None}, step)
                last.update(record)
    for sample in sorted((folder / "samples").glob("*.mp4")):
        tracker.log_artifact(sample, "samples")
    return last


def train_dit_trainjob(cfg, preset: str, overrides: str, data_meta: str, work: Path, lora: bool, nodes: int,
                       gpus_per_node: int, image: str, tracker) -> dict[str, Any]:
    """Multi-node ``train_dit`` as a TrainJob on the work PVC: copy the dataset there, launch ``accelerate launch …
    -m easyanimate train-dit`` on ``nodes`` × ``gpus_per_node`` GPUs, wait, replay its metrics into ``tracker``.
    Needs the work PVC mounted at ``/mnt/work`` (ReadWriteMany) in this pod and in the TrainJob's pods."""
    if not str(work).startswith(WORK_MOUNT + "/"):
        raise RuntimeError(f"launcher=trainjob needs the shared work PVC at {WORK_MOUNT} (got workdir {work})")
    data_dir = work / "data"
    if not (data_dir / "meta.json").is_file():
        shutil.copytree(Path(data_meta).parent, data_dir, dirs_exist_ok=True)
    overrides_list = parse_overrides(overrides)
    if cfg.model.pretrained:  # e.g. the base pipeline with the freshly trained VAE
        overrides_list.append(f"model.pretrained={cfg.model.pretrained}")
    name = "ea-dit-" + hashlib.sha1(str(work).encode()).hexdigest()[:12]
    manifest = trainjob_manifest(name=name, namespace=_namespace(), image=image, preset=preset,
                                 overrides=overrides_list, data=str(data_dir / "meta.json"), output=str(work / "run"),
                                 lora=lora, nodes=nodes, gpus_per_node=gpus_per_node)
    tracker.set_tags({"trainjob": f"{manifest['metadata']['namespace']}/{name}"})
    run_trainjob(manifest)
    last = replay_jsonl(work / "run", tracker)
    return {**last, "final": str(work / "run" / "final"), "trainjob": name}


__all__ = [
    "artifact_link", "config", "data_version", "dataset_metadata", "dvc_hash", "end_pipeline_run",
    "export_pipeline", "find_pipeline_run", "gates", "html_report", "lineage_tags", "log_dataset",
    "log_kfp_metrics", "markdown_report", "meta_path", "metrics_of", "parse_overrides", "pipeline_with_vae",
    "publish", "replay_jsonl", "run_link", "run_trainjob", "sample_links", "scalars", "shard_plan", "shard_specs",
    "start_pipeline_run", "step_run", "train_dit_trainjob", "trainjob_manifest", "workdir",
]
