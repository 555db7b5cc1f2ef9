"""Multi-node DiT training as a Kubeflow Trainer ``TrainJob``: render ``infra/k8s/trainjob.yaml``, create (or
re-attach to) the job, wait for it, replay its JSONL tracking into the step's MLflow run.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import string
import time
from pathlib import Path
from typing import Any

from components.glue.artifacts import WORK_MOUNT
from components.glue.replay import replay_jsonl
from components.glue.settings import parse_overrides

TRAINJOB_TEMPLATE_ENV = "EASYANIMATE_TRAINJOB_TEMPLATE"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_IMAGE_INFRA = Path("/opt/easyanimate/infra")  # the Dockerfile copies infra/ here


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
