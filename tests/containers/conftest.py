"""Container tests. Two kinds:

- cheap, always run (plain ``make test``): Kubernetes manifests against their schemas, kustomize builds, hadolint,
  the Dockerfiles' shape (test_manifests.py);
- heavy, marked ``containers`` (``make test-containers``, which builds the images first): the images themselves, the
  pipeline under kfp's DockerRunner, Triton from the image (test_images.py). They are skipped, with the reason, when
  ``-m containers`` was not asked for or no Docker engine answers.
"""

import shutil
import subprocess

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "containers: needs a Docker engine and the built images (make test-containers)")


def _engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no docker CLI on this machine (make test-containers installs and starts a Docker engine)"
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                              timeout=30)
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer `docker info` within 30 s"
    if info.returncode != 0 or not info.stdout.strip():
        return f"no Docker engine answers ({(info.stderr or info.stdout).strip()[:200]}); make test-containers starts one"
    return None


def pytest_collection_modifyitems(config, items):
    heavy = [item for item in items if item.get_closest_marker("containers")]
    if not heavy:
        return
    if "containers" not in (config.getoption("markexpr") or ""):
        reason = "heavy container test (builds/runs images): run `make test-containers`"
    else:
        reason = _engine_problem()
    if reason:
        for item in heavy:
            item.add_marker(pytest.mark.skip(reason=reason))
