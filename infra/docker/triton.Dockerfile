# The Triton serving image: `easyanimate serve` runs the tritonserver 2.51 bundled in the nvidia-pytriton wheel
# (self-contained: its CUDA runtime and libraries ship in the wheel) with the Python-backend models of
# serving/model_repository, on the same Python 3.11 + requirements.lock stack as everything else. Serving the
# registered model:
#
#   docker build -f infra/docker/triton.Dockerfile -t easyanimate-triton:$VERSION \
#       --build-arg GIT_COMMIT=$(git rev-parse HEAD) .                            # CUDA 12.6 torch wheels (default)
#   docker build -f infra/docker/triton.Dockerfile -t easyanimate-triton:$VERSION-cpu \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .        # CPU only (tiny model, CI)
#
#   docker run --gpus 1 --shm-size 2g -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#       -e EASYANIMATE_MODEL_URI=models:/easyanimate@champion -e MLFLOW_TRACKING_URI=http://mlflow:5000 \
#       -v easyanimate-models:/cache easyanimate-triton:$VERSION
#   docker run --shm-size 1g -p 8000:8000 -p 8001:8001 easyanimate-triton:$VERSION-cpu serve --model tiny \
#       --host 0.0.0.0 --http-port 8000 --grpc-port 8001 --metrics-port 8002
#
# --shm-size: the Python-backend stubs exchange tensors through /dev/shm (Docker's default 64 MB is too small for
# two models and multi-MB videos). The model cache (/cache) keeps downloaded versions across restarts.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG GIT_COMMIT=unknown

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    EASYANIMATE_GIT_COMMIT=${GIT_COMMIT} \
    EASYANIMATE_MODEL_CACHE=/cache \
    HOME=/home/triton

# libGL/glib: the GUI opencv wheel (pulled in by scenedetect) links them; curl: for probing by hand
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --home-dir /home/triton --uid 1000 triton \
    && mkdir -p /cache && chown triton /cache

WORKDIR /opt/easyanimate

# torch first and exact (an unpinned torch would resolve to another build); numpy stays 1.26.4 (the lock): the
# Triton 2.51 Python-backend stub breaks with numpy 2
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY requirements.lock ./
RUN pip install -r requirements.lock

COPY pyproject.toml README.md ./
COPY easyanimate ./easyanimate
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
# editable: the launcher finds serving/model_repository beside serving/launch.py (it is not package data)
RUN pip install --no-deps -e . \
    && python -c "from serving.launch import REPOSITORY, bundled_tritonserver; bundled_tritonserver(); \
assert (REPOSITORY / 'easyanimate' / 'config.pbtxt').is_file() and (REPOSITORY / 'easyanimate_stream').is_dir()"

USER triton
EXPOSE 8000 8001 8002
# KServe v2 HTTP on 8000, gRPC on 8001, Prometheus metrics on 8002. The model comes from $EASYANIMATE_MODEL_URI
# (tiny | a mounted pipeline folder | models:/NAME@ALIAS) and $MLFLOW_TRACKING_URI; --watch-alias follows the alias
# and reloads a crashed model. SIGTERM drains in-flight requests (up to 30 s) then stops everything.
ENTRYPOINT ["easyanimate"]
CMD ["serve", "--host", "0.0.0.0", "--http-port", "8000", "--grpc-port", "8001", "--metrics-port", "8002", \
     "--watch-alias", "--poll-interval", "30", "--device", "auto"]
