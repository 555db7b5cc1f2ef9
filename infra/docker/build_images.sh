#!/usr/bin/env bash
# Build the component image and the Triton image from one CUDA flavour (`make images` runs this).
#
#   infra/docker/build_images.sh                      # FLAVOUR=cpu REGISTRY= (local tags)
#   FLAVOUR=cu128 REGISTRY=registry.example.com/ml/ infra/docker/build_images.sh
#
# Tags: $REGISTRY easyanimate-mlops:$VERSION[-$FLAVOUR] and easyanimate-triton:$VERSION[-$FLAVOUR] (no suffix for
# cpu). BASE_IMAGE: python:3.11-slim-bookworm unless set; when it cannot be pulled (no route to Docker Hub, as on CI
# here) the local Debian-package base from make_base.sh is used. When this machine's pip reads local package
# folders (file:// indexes, find-links), they are served read-only on 127.0.0.1 for the duration of the build and
# handed to pip through the PIP_* build args (host network), so the build installs exactly what `make setup` does.
set -euo pipefail
cd "$(dirname "$0")/../.."
export DOCKER_BUILDKIT=0
FLAVOUR=${FLAVOUR:-cpu}
case "$FLAVOUR" in cpu|cu126|cu128) ;; *) echo "FLAVOUR must be cpu, cu126 or cu128, got '$FLAVOUR'" >&2; exit 2;; esac
REGISTRY=${REGISTRY:-}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
SUFFIX=$([ "$FLAVOUR" = cpu ] && echo "" || echo "-$FLAVOUR")
GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
PY=${PY:-.venv/bin/python}; [ -x "$PY" ] || PY=python3

BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && ! timeout 60 docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "build_images: cannot pull $BASE_IMAGE; using the local Debian-package base" >&2
    BASE_IMAGE=$(infra/docker/make_base.sh)
fi

# local pip sources -> http://127.0.0.1:PORT/<path> (the build reaches the host's loopback through --network host)
mirror_args=()
mapfile -t cfg < <("$PY" - <<'EOF'
import os, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
vals = {}
for line in out.splitlines():
    key, _, val = line.partition("=")
    vals[key.split(".", 1)[-1]] = val.strip().strip("'\"")
for env, key in (("PIP_INDEX_URL", "index-url"), ("PIP_EXTRA_INDEX_URL", "extra-index-url"),
                 ("PIP_FIND_LINKS", "find-links")):
    val = os.environ.get(env) or vals.get(key, "")
    if val:
        print(f"{env}={val}")
EOF
)
dirs=(); declare -A urls=()
served=$(mktemp -d /tmp/easyanimate-pipmirror.XXXXXX)   # only the pip folders, as symlinks, are served
for kv in "${cfg[@]}"; do
    key=${kv%%=*}; vals=()
    for v in ${kv#*=}; do
        p=${v#file://}
        p=${p%/}
        if [ -d "$p" ]; then
            # serve an index's parent: its pages link to ../../files/… beside simple/
            if [ "$(basename "$p")" = simple ]; then ln -s "$(dirname "$p")" "$served/d${#dirs[@]}"; sub=/simple
            else ln -s "$p" "$served/d${#dirs[@]}"; sub=""; fi
            vals+=("@@d${#dirs[@]}@@$sub"); dirs+=("$p")
        else vals+=("$v"); fi
    done
    urls[$key]="${vals[*]}"
done
server_pid=""
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; rm -rf "$served"; }
trap cleanup EXIT
if [ ${#dirs[@]} -gt 0 ]; then
    # a fixed port: the mirror URLs are build args, part of the layer cache key (a random port = no cache)
    port=${PIP_MIRROR_PORT:-18741}
    "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null \
        && { echo "build_images: port $port is taken (set PIP_MIRROR_PORT)" >&2; exit 2; }
    "$PY" -m http.server --bind 127.0.0.1 --directory "$served" "$port" >/dev/null 2>&1 &
    server_pid=$!
    for _ in $(seq 50); do "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" 2>/dev/null && break; sleep 0.2; done
    declare -A rew=()
    for key in "${!urls[@]}"; do
        rew[$key]=$(echo "${urls[$key]}" | sed -E "s#@@(d[0-9]+)@@(/simple)?#http://127.0.0.1:$port/\1\2/#g")
        mirror_args+=(--build-arg "$key=${rew[$key]}")
    done
    # the flavour's torch index is out of reach as well: the local wheel folder (find-links) holds the CPU torch
    torch_index=${rew[PIP_EXTRA_INDEX_URL]:-${rew[PIP_INDEX_URL]:-}}
    [ "$FLAVOUR" = cpu ] && [ -n "$torch_index" ] && mirror_args+=(--build-arg "TORCH_INDEX_URL=${torch_index%% *}")
fi

common=(--network host --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "FLAVOUR=$FLAVOUR"
        --build-arg "VERSION=$VERSION" --build-arg "GIT_COMMIT=$GIT_COMMIT" "${mirror_args[@]}")
for spec in "Dockerfile:easyanimate-mlops" "triton.Dockerfile:easyanimate-triton"; do
    file=${spec%%:*}; tag="${REGISTRY}${spec#*:}:${VERSION}${SUFFIX}"
    start=$(date +%s)
    docker build "${common[@]}" -f "infra/docker/$file" -t "$tag" . >&2
    size=$(docker image inspect -f '{{.Size}}' "$tag")
    echo "{\"image\": \"$tag\", \"build_s\": $(( $(date +%s) - start )), \"size_mb\": $(( size / 1000000 )), \"base\": \"$BASE_IMAGE\"}"
done
