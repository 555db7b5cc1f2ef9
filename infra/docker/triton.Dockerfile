# The Triton serving image: `easyanimate serve` runs the tritonserver 2.51 bundled in the nvidia-pytriton wheel
# (self-contained: its libraries ship in the wheel) with the Python-backend models of serving/model_repository
# behind the validating front, on the same Python 3.11 + requirements.lock stack as the component image (every layer
# up to the "image-specific" marker is identical to infra/docker/Dockerfile, so the two share them). Runs as uid 1000.
#
#   make images                                       # both images, CPU flavour
#   docker build -f infra/docker/triton.Dockerfile --build-arg FLAVOUR=cu126 \
#       --build-arg VERSION=$VERSION --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t easyanimate-triton:$VERSION-cu126 .
#
#   docker run --gpus 1 --shm-size 2g -p 8000:8000 -p 8001:8001 \
#       -e EASYANIMATE_MODEL_URI=models:/easyanimate@champion -e MLFLOW_TRACKING_URI=http://mlflow:5000 \
#       -v easyanimate-models:/cache easyanimate-triton:$VERSION-cu126
#   easyanimate serve --docker --model models:/easyanimate@champion     # the same, from this checkout (loopback)
#
# --shm-size: the Python-backend stubs exchange tensors through /dev/shm (Docker's default 64 MB is too small for
# two models and multi-MB videos). /cache keeps downloaded model versions across restarts (mount a volume).
# BASE_IMAGE, FLAVOUR and the PIP_* mirror arguments: see infra/docker/Dockerfile.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# libGL/glib: the GUI opencv wheel that scenedetect pulls in shares cv2/ with the headless one and links them.
# Versions: the base image fixes the Debian point release; exact apt pins would break every rebuild once the
# security pocket supersedes a version (Debian keeps only the newest), so the packages follow the base.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --home-dir /home/easyanimate --uid 1000 --user-group easyanimate \
    && mkdir -p /cache /opt/easyanimate && chown easyanimate:easyanimate /cache

ARG FLAVOUR=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${FLAVOUR}
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    EASYANIMATE_MODEL_CACHE=/cache \
    EASYANIMATE_TRAINJOB_TEMPLATE=/opt/easyanimate/infra/k8s/trainjob.yaml

WORKDIR /opt/easyanimate

# torch first and exact from the flavour's index (an unpinned torch would resolve to another build); the lock's
# torch==2.13.0 then matches the installed 2.13.0(+cpu/+cu…) wheel and is left alone. numpy stays 1.26.4 (the lock):
# the Triton 2.51 Python-backend stub breaks with numpy 2.
RUN python3 -m venv /opt/venv \
    && pip install --extra-index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY requirements.lock ./
# a few pins are sdists with C/C++ extensions (libsvm-official): a compiler (and the Python headers where the base
# lacks them) only for this step, removed in the same layer ($build_deps is a package list: split on purpose)
# hadolint ignore=DL3008,SC2086
RUN apt-get update \
    && build_deps="g++ $(test -f "/usr/local/include/python3.11/Python.h" || echo python3-dev)" \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $build_deps \
    && pip install -r requirements.lock \
    && apt-get purge -y --auto-remove $build_deps \
    && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md ./
COPY easyanimate ./easyanimate
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
COPY infra ./infra
# editable: the launcher finds serving/model_repository beside serving/launch.py (it is not package data)
RUN pip install --no-deps -e . \
    && python -c "import easyanimate, components, pipelines, serving, kfp, mlflow, torch; print(torch.__version__)" \
    && python -c "from serving.launch import REPOSITORY, bundled_tritonserver; bundled_tritonserver(); \
assert (REPOSITORY / 'easyanimate' / 'config.pbtxt').is_file()"

# ---- image-specific from here ----
ARG VERSION=0.0.0
ARG GIT_COMMIT=unknown
ARG FLAVOUR
LABEL org.opencontainers.image.title="easyanimate-triton" \
      org.opencontainers.image.description="EasyAnimate text-to-video on Triton (KServe v2 HTTP/gRPC)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      io.easyanimate.flavour="${FLAVOUR}"
ENV EASYANIMATE_GIT_COMMIT=${GIT_COMMIT}
USER 1000:1000
ENV HOME=/home/easyanimate
EXPOSE 8000 8001 8002
# ready = the front is up, tritonserver and the models are ready (503 while a model loads or restarts); the first
# load of a real model can take minutes: start-period covers it
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('EASYANIMATE_HTTP_PORT', '8000') + '/v2/health/ready', timeout=4)"]
# KServe v2 HTTP on 8000, gRPC on 8001, Prometheus metrics on 8002. The model comes from $EASYANIMATE_MODEL_URI
# (tiny | a mounted pipeline folder | models:/NAME@ALIAS) and $MLFLOW_TRACKING_URI; --watch-alias follows the alias.
# SIGTERM drains in-flight requests (up to 30 s) then stops everything.
ENTRYPOINT ["easyanimate"]
CMD ["serve", "--host", "0.0.0.0", "--http-port", "8000", "--grpc-port", "8001", "--metrics-port", "8002", \
     "--watch-alias", "--poll-interval", "30", "--device", "auto"]
