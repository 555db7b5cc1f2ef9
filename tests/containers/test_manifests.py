"""Offline validation of what the cluster and the image builds receive (cheap: runs in plain `make test`):

- every built-in Kubernetes resource in infra/k8s, and every kustomize build (base + overlays), against the
  Kubernetes 1.33 schemas with strict field checking (kubernetes-validate);
- the rendered TrainJob against the Kubeflow Trainer CRD schema of the pinned Trainer version;
- hadolint on every Dockerfile; the images' shape (shared layers, non-root, HEALTHCHECK, BASE_IMAGE default).
A broken manifest or Dockerfile must fail these checks: each check is also shown to reject a broken input.
"""

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
DOCKER = ROOT / "infra" / "docker"
KUBERNETES_VERSION = "1.33.0"
TRAINER_VERSION = "2.2.0"  # = infra/README.md's install notes
BIN = Path(sys.executable).parent
KUSTOMIZATIONS = [K8S, ROOT / "infra" / "overlays" / "registry", ROOT / "infra" / "overlays" / "cpu"]
DOCKERFILES = sorted(DOCKER.glob("*Dockerfile*"))


def _validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _manifest_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name in ("trainjob.yaml", "kustomization.yaml"):
            continue
        docs += [(f"{path.name}: {d['kind']}/{d['metadata']['name']}", d) for d in yaml.safe_load_all(path.read_text())
                 if d]
    return docs


def _kustomize(folder: Path) -> list[dict]:
    out = subprocess.run([str(BIN / "kubectl"), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kustomize build of {folder} failed: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_every_builtin_resource_is_valid_kubernetes():
    docs = _manifest_docs()
    assert len(docs) >= 20, f"expected the ~20 resources of infra/k8s, found {len(docs)}"
    errors = []
    for name, doc in docs:
        try:
            _validate(doc)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{name}: {exc}")
    assert not errors, "\n".join(errors)


def test_strict_validation_rejects_a_broken_manifest():
    name, deployment = next((n, d) for n, d in _manifest_docs() if d["kind"] == "Deployment")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolize"] = "Always"  # unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(typo)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(wrong_type)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_kustomize_builds_are_valid(folder):
    docs = _kustomize(folder)
    assert len(docs) == len(_manifest_docs())
    for doc in docs:
        _validate(doc)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "easyanimate"


def test_overlays_set_the_registry_images_and_drop_the_gpu():
    def triton(folder):
        dep = next(d for d in _kustomize(folder) if d["kind"] == "Deployment" and d["metadata"]["name"] ==
                   "easyanimate-triton")
        return dep["spec"]["template"]["spec"]

    gpu, cpu = triton(KUSTOMIZATIONS[1]), triton(KUSTOMIZATIONS[2])
    assert gpu["containers"][0]["image"] == "registry.example.com/ml/easyanimate-triton:0.1.0-cu126"
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert cpu["containers"][0]["image"] == "registry.example.com/ml/easyanimate-triton:0.1.0"
    assert "nvidia.com/gpu" not in json.dumps(cpu["containers"][0]["resources"]) and "tolerations" not in cpu
    args = cpu["containers"][0]["args"]
    assert args[args.index("--device") + 1] == "cpu"


def _trainjob_schema() -> dict:
    path = K8S / "schemas" / f"trainjob-v{TRAINER_VERSION}.schema.json"
    schema = json.loads(path.read_text())
    assert schema["x-trainer-version"] == TRAINER_VERSION
    return schema


def _trainjob() -> dict:
    from components.glue.trainjob import trainjob_manifest

    return trainjob_manifest(name="ea-dit-1", namespace="kubeflow", image="registry.example.com/ml/easyanimate-mlops:1",
                             preset="v2_512", overrides=["train.max_steps=10"], data="/mnt/work/r/data/meta.json",
                             output="/mnt/work/r/run", lora=False, nodes=2, gpus_per_node=8)


def test_install_notes_pin_the_trainer_version_of_the_schema():
    readme = (ROOT / "infra" / "README.md").read_text()
    assert f"TRAINER_VERSION=v{TRAINER_VERSION}" in readme, "infra/README.md must pin the Kubeflow Trainer version"


def test_trainjob_matches_the_pinned_trainer_crd():
    import jsonschema

    validator = jsonschema.Draft202012Validator(_trainjob_schema())
    manifest = _trainjob()
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
    assert not errors, "\n".join(errors)
    # the v2.1-only field the manifest used to carry, and a mistyped node count, are rejected
    old = copy.deepcopy(manifest)
    old["spec"]["podTemplateOverrides"] = [{"targetJobs": [{"name": "node"}], "spec": {}}]
    assert any("podTemplateOverrides" in e.message for e in validator.iter_errors(old))
    bad = copy.deepcopy(manifest)
    bad["spec"]["trainer"]["numNodes"] = "two"
    assert list(validator.iter_errors(bad))
    missing = copy.deepcopy(manifest)
    del missing["spec"]["runtimeRef"]
    assert list(validator.iter_errors(missing))
    # the embedded pod parts are real Kubernetes types: a pod-spec typo is caught too
    pod = copy.deepcopy(manifest)
    patch = pod["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    patch["template"]["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimNmae"] = "x"
    assert list(validator.iter_errors(pod))


def _hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "hadolint"), "--no-color", str(path)], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    result = _hadolint(dockerfile)
    assert result.returncode == 0, f"hadolint findings in {dockerfile.name}:\n{result.stdout}{result.stderr}"


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install curl\nRUN cd /tmp && pip install x\n")
    result = _hadolint(bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3015", "DL3013"):
        assert rule in result.stdout, f"expected hadolint to report {rule}, got:\n{result.stdout}"


def _split(dockerfile: Path) -> tuple[str, str]:
    text = dockerfile.read_text()
    head, marker, tail = text.partition("# ---- image-specific from here ----\n")
    assert marker, f"{dockerfile.name} lacks the image-specific marker"
    return head[head.index("ARG BASE_IMAGE="):], tail


def test_both_images_share_their_layers_and_run_as_non_root():
    comp_head, comp_tail = _split(DOCKER / "Dockerfile")
    triton_head, triton_tail = _split(DOCKER / "triton.Dockerfile")
    assert comp_head == triton_head, "the shared part of Dockerfile and triton.Dockerfile drifted apart"
    assert comp_head.startswith("ARG BASE_IMAGE=python:3.11-slim-bookworm\n")  # the public image by default
    assert "ARG FLAVOUR=cpu" in comp_head and "whl/${FLAVOUR}" in comp_head
    for tail in (comp_tail, triton_tail):
        users = re.findall(r"^USER (\S+)", tail, flags=re.M)
        assert users and users[-1].split(":")[0] not in ("0", "root")
        for label in ("org.opencontainers.image.version", "org.opencontainers.image.revision"):
            assert label in tail
    assert re.search(r"^HEALTHCHECK .*\n.*/v2/health/ready", triton_tail, flags=re.M)
    assert "HEALTHCHECK" not in comp_tail  # KFP steps are batch jobs


def test_dockerignore_keeps_the_context_to_the_sources():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "the root .dockerignore is an allow-list"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"requirements.lock", "pyproject.toml", "README.md", "easyanimate", "components", "pipelines",
                       "serving", "infra"}
    copied = set(re.findall(r"^COPY (\S+)", (DOCKER / "Dockerfile").read_text(), flags=re.M))
    assert copied <= allowed
