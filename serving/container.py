"""``easyanimate serve --docker``: the same server, run from the Triton image (``make images``) on this machine.

    argv = docker_serve_argv("models:/easyanimate@champion", tracking_uri="http://127.0.0.1:5000", http_port=8000,
                             grpc_port=8001, metrics_port=8002)
    subprocess.run(argv)   # blocks like `easyanimate serve`; Ctrl-C / SIGTERM stop the container

The container gets the host network and binds the given host (127.0.0.1 by default: loopback only), so MLflow on
this machine's loopback is reachable as is. A model given as a local pipeline folder is mounted read-only at
``/models/<name>``; registry models (``models:/…``) are downloaded by the container through the tracking server
(which must proxy artifacts) into the named volume ``easyanimate-model-cache`` (``/cache``), kept across runs.
Nothing else from this machine is mounted. Uses the docker CLI (no Python client needed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CACHE_VOLUME = "easyanimate-model-cache"


def triton_image() -> str:
    """``$EASYANIMATE_TRITON_IMAGE``, else ``easyanimate-triton:<package version>`` (what ``make images`` tags)."""
    from components import _package_version

    return os.environ.get("EASYANIMATE_TRITON_IMAGE") or f"easyanimate-triton:{_package_version()}"


def docker_serve_argv(model: str, *, image: str | None = None, name: str | None = None, host: str = "127.0.0.1",
                      http_port: int, grpc_port: int, metrics_port: int, tracking_uri: str | None = None,
                      serve_args: list[str] | None = None, shm_size: str = "1g",
                      env: dict[str, str] | None = None) -> list[str]:
    """The ``docker run`` command line serving ``model`` from the Triton image (see the module docstring)."""
    image = image or triton_image()
    argv = ["docker", "run", "--rm", "--init", "--network", "host", "--shm-size", shm_size,
            "-v", f"{CACHE_VOLUME}:/cache"]
    if name:
        argv += ["--name", name]
    if not model.startswith("models:/") and model != "tiny":
        folder = Path(model).resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"--model {model}: not a pipeline folder, 'tiny' or models:/NAME@ALIAS")
        inside = f"/models/{folder.name}"
        argv += ["-v", f"{folder}:{inside}:ro"]
        model = inside
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri:
        argv += ["-e", f"MLFLOW_TRACKING_URI={tracking_uri}"]
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        if key in os.environ:
            argv += ["-e", key]  # the value comes from this environment, not the command line
    # the image's HEALTHCHECK asks this port (host network: the server's port is the host's)
    argv += ["-e", f"EASYANIMATE_HTTP_PORT={http_port}"]
    for key, value in (env or {}).items():
        argv += ["-e", f"{key}={value}"]
    argv += [image, "serve", "--model", model, "--host", host, "--http-port", str(http_port),
             "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--log", "-",
             *(serve_args or [])]
    return argv


def serve_in_docker(model: str, *, image: str | None = None, **kwargs) -> int:
    """Run ``docker_serve_argv`` in the foreground and return the container's exit code."""
    if shutil.which("docker") is None:
        raise FileNotFoundError("--docker needs the docker CLI and a running Docker engine")
    image = image or triton_image()
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0:
        raise FileNotFoundError(f"Triton image {image} is not on this Docker engine; build it with `make images` "
                                f"(or set EASYANIMATE_TRITON_IMAGE)")
    import signal
    import uuid

    name = kwargs.pop("name", None) or f"easyanimate-serve-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(docker_serve_argv(model, image=image, name=name, **kwargs))

    def _stop(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # the container outlives a killed `docker run` client: stop it (SIGTERM: serve drains, then exits)
        subprocess.run(["docker", "stop", "-t", "40", name], capture_output=True, timeout=120)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
