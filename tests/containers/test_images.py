"""The built images (``make images``) for real — run by ``make test-containers`` (marker ``containers``):

1. both images run as a non-root user and carry version/commit labels; the Triton image has its HEALTHCHECK;
2. the pipeline with every step in the component image (kfp DockerRunner, host network, MLflow on this machine's
   loopback proxying artifacts) registers a version that becomes champion, with no path of this machine in it;
3. the Triton image serves that champion from MLflow: health (the Docker HEALTHCHECK turns healthy) and a video.
"""

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.containers

ROOT = Path(__file__).resolve().parents[2]
FAST_OVERRIDES = ["preprocess.workers=1", "data.validation_count=1", "train.max_steps=2", "train.validation_steps=0",
                  "train.checkpointing_steps=0", "train.log_every=1", "train.sample_steps=1", "evaluate.steps=1",
                  'evaluate.prompts=["In this video, waves roll onto a sandy beach at sunset."]']
# paths of THIS machine that must not reach a registered model (paths inside the image, /opt/venv/…, are fine)
HOST_MARKERS = (str(ROOT), sys.prefix, "/.venv/", str(Path.home()) + "/")


def _version() -> str:
    from components import _package_version

    return _package_version()


def _inspect(image: str) -> dict:
    out = subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True)
    assert out.returncode == 0, f"image {image} is not built: run `make images` ({out.stderr.strip()})"
    return json.loads(out.stdout)[0]


@pytest.fixture(scope="module")
def images() -> dict[str, dict]:
    return {name: _inspect(f"{name}:{_version()}") for name in ("easyanimate-mlops", "easyanimate-triton")}


def test_images_run_as_non_root_with_labels(images):
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for name, info in images.items():
        config = info["Config"]
        assert config["User"] and config["User"].split(":")[0] not in ("0", "root"), f"{name} runs as root"
        labels = config["Labels"]
        assert labels["org.opencontainers.image.version"] == _version()
        revision = labels["org.opencontainers.image.revision"]
        ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", revision, commit], cwd=ROOT)
        assert re.fullmatch(r"[0-9a-f]{40}", revision) and ancestor.returncode == 0, (
            f"{name} carries revision {revision!r}, not a commit of this checkout's history ({commit}): "
            f"rerun `make images`")
        uid = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "id", f"{name}:{_version()}",
                              "-u"], capture_output=True, text=True, timeout=120)
        assert uid.stdout.strip() == "1000", f"{name}: id -u gave {uid.stdout!r} {uid.stderr!r}"
    health = images["easyanimate-triton"]["Config"]["Healthcheck"]["Test"]
    assert "/v2/health/ready" in " ".join(health)
    # the build context was the allow-list: nothing from this checkout beyond the sources is in the image
    listing = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "ls",
                              f"easyanimate-mlops:{_version()}", "-A", "/opt/easyanimate"],
                             capture_output=True, text=True, timeout=120).stdout.split()
    assert not {".venv", ".git", "outputs", "tests", "mlruns", "data"} & set(listing), listing


@pytest.fixture(scope="module")
def docker_run(images, tmp_path_factory):
    """The pipeline in containers against a real MLflow server proxying artifacts; the server stays up for serving."""
    from easyanimate.data.sample import write_sample_dataset
    from pipelines.cli import run_local
    from serving.mlflow_local import MlflowServer

    base = tmp_path_factory.mktemp("containers")
    server = MlflowServer(base / "mlflow", proxy_artifacts=True).start()
    root = base / "kfp"
    full = write_sample_dataset(base / "sample_full")
    data = root / "data"
    for rel in ("videos/carphone_pristine.mp4", "images/astronaut.png", "images/chelsea.png", "images/rocket.jpg",
                "captions.json"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(full / rel, data / rel)
    name = f"containers-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    try:
        result = run_local(pipeline_root=root, data=str(data), preset="tiny", overrides=FAST_OVERRIDES, num_shards=2,
                           tracking_uri=server.uri, train_vae=False, experiment=name, model_name=name, docker=True)
        print(json.dumps({"bench": "pipeline_in_containers", "wall_s": round(time.perf_counter() - t0, 1)}))
        yield {"result": result, "server": server, "name": name}
    finally:
        assert server.stop(), "mlflow server left processes behind"


def test_pipeline_in_containers_registers_a_champion_without_host_paths(docker_run, images, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    result, server, name = docker_run["result"], docker_run["server"], docker_run["name"]
    assert result["model_version"] and result["champion"] is True, result
    client = MlflowClient(server.uri, registry_uri=server.uri)
    version = client.get_model_version_by_alias(name, "champion")
    assert version.version == result["model_version"]
    # provenance: the commit comes from the image's label (the image has no .git)
    revision = images["easyanimate-mlops"]["Config"]["Labels"]["org.opencontainers.image.revision"]
    assert version.tags.get("git_commit") == revision
    # the version's files went through the server (no path of this machine), and none names one
    assert version.source.startswith(("models:/", "mlflow-artifacts:", "runs:/")), version.source
    text = json.dumps({"tags": version.tags, "source": version.source,
                       "params": client.get_run(version.run_id).data.params})
    for marker in HOST_MARKERS:
        assert marker not in text, f"{marker} leaked into the registered version: {text[:2000]}"
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)  # models:/ resolves through the registry URI
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}@champion", dst_path=str(tmp_path)))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:
        if path.suffix in (".json", ".yaml", ".txt", ".md", ".MLmodel", "") and path.stat().st_size < 5_000_000:
            body = path.read_text(errors="replace")
            for marker in HOST_MARKERS:
                assert marker not in body, f"{marker} leaked into {path.relative_to(local)}"


def _free_port() -> int:
    from serving.mlflow_local import free_port

    return free_port()


def test_triton_image_serves_the_champion(docker_run, images, tmp_path):
    from serving.client import generate
    from serving.container import docker_serve_argv

    server, name = docker_run["server"], docker_run["name"]
    http, grpc, metrics = _free_port(), _free_port(), _free_port()
    container = f"easyanimate-test-{uuid.uuid4().hex[:8]}"
    argv = docker_serve_argv(f"models:/{name}@champion", name=container, http_port=http, grpc_port=grpc,
                             metrics_port=metrics, tracking_uri=server.uri,
                             serve_args=["--models", "easyanimate", "--device", "cpu", "--instances", "1"])
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"the Triton container exited:\n{(tmp_path / 'serve.log').read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=3) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"not ready in 300 s:\n{(tmp_path / 'serve.log').read_text()[-4000:]}"
            time.sleep(1)
        t0 = time.perf_counter()
        try:
            video = generate(f"http://127.0.0.1:{http}", "a red kite over a green hill", seed=1, steps=2,
                             num_frames=9, height=64, width=64, accel="exact", progress=False, timeout=300)
        except ConnectionError as exc:
            pytest.fail(f"generation failed: {exc}\n{(tmp_path / 'serve.log').read_text()[-4000:]}")
        print(json.dumps({"bench": "triton_container_generate", "wall_s": round(time.perf_counter() - t0, 1),
                          "timings": video.metadata.get("timings")}))
        assert video.data[4:8] == b"ftyp" and len(video.data) > 1000, "expected an MP4 from the champion"
        # Docker's own view: the HEALTHCHECK (on the served port) turns healthy
        deadline = time.monotonic() + 120
        while (status := subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", container],
                                        capture_output=True, text=True).stdout.strip()) != "healthy":
            assert status in ("starting", ""), f"container health is {status!r}"
            assert time.monotonic() < deadline, "the HEALTHCHECK did not report healthy within 120 s"
            time.sleep(2)
        user = subprocess.run(["docker", "exec", container, "id", "-u"], capture_output=True, text=True).stdout
        assert user.strip() == "1000"
    finally:
        subprocess.run(["docker", "stop", "-t", "40", container], capture_output=True, timeout=120)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    assert proc.returncode in (0, 130, 143), (f"serve exited {proc.returncode}:\n"
                                              f"{(tmp_path / 'serve.log').read_text()[-3000:]}")
