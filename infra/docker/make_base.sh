#!/usr/bin/env bash
# The local stand-in for the public base image, for machines that cannot pull from Docker Hub (this CI machine):
# Debian bookworm from Debian packages (debootstrap) + Python 3.11 (venv, shared libpython for Triton's stub) +
# this machine's apt source and CA bundle (its package registries sit behind that CA).
#
#   infra/docker/make_base.sh [IMAGE]          # default local/python:3.11-bookworm; prints the image name
#
# Idempotent and cached: when IMAGE exists and carries the recipe hash of this script + the CA bundle + the apt
# source, nothing is done. Real users never run this: the Dockerfiles default to python:3.11-slim-bookworm.
set -euo pipefail
IMAGE=${1:-local/python:3.11-bookworm}
ROOTFS_IMAGE=local/debian:bookworm
CA=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
SOURCES=$(ls /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)
MIRROR=${DEBIAN_MIRROR:-$( { [ -n "$SOURCES" ] && sed -n 's/^URIs: *\([^ ]*\).*/\1/p' "$SOURCES" | head -n1; } \
                           || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
export DOCKER_BUILDKIT=0

recipe=$( { cat "$0"; cat "$CA"; [ -n "$SOURCES" ] && cat "$SOURCES"; cat /etc/apt/sources.list 2>/dev/null || true; } \
          | sha256sum | cut -c1-16)
have=$(docker image inspect -f '{{ index .Config.Labels "io.easyanimate.base-recipe" }}' "$IMAGE" 2>/dev/null || true)
if [ "$have" = "$recipe" ]; then
    echo "$IMAGE" ; exit 0
fi

if ! docker image inspect "$ROOTFS_IMAGE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { echo "make_base.sh: debootstrap is missing (apt-get install debootstrap)" >&2; exit 2; }
    dir=$(mktemp -d /tmp/easyanimate-rootfs.XXXXXX)
    trap 'rm -rf "$dir"' EXIT
    echo "make_base.sh: debootstrap bookworm from $MIRROR (~1 min)" >&2
    debootstrap --variant=minbase bookworm "$dir" "$MIRROR" >/tmp/easyanimate-debootstrap.log 2>&1 \
        || { tail -20 /tmp/easyanimate-debootstrap.log >&2; exit 1; }
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
    tar -C "$dir" -c . | docker import - "$ROOTFS_IMAGE" >/dev/null
fi

ctx=$(mktemp -d /tmp/easyanimate-basectx.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
cp "$CA" "$ctx/machine-ca.crt"
if [ -n "$SOURCES" ]; then cp "$SOURCES" "$ctx/debian.sources"; else : >"$ctx/debian.sources"; fi
cp /etc/apt/sources.list "$ctx/sources.list" 2>/dev/null || : >"$ctx/sources.list"
cat >"$ctx/Dockerfile" <<'EOF'
FROM local/debian:bookworm
COPY debian.sources /etc/apt/sources.list.d/debian.sources
COPY sources.list /etc/apt/sources.list
COPY machine-ca.crt /usr/local/share/ca-certificates/machine-ca.crt
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       ca-certificates python3 python3-venv libpython3.11 \
    && update-ca-certificates \
    && ln -sf /usr/bin/python3 /usr/local/bin/python \
    && rm -rf /var/lib/apt/lists/*
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt
EOF
docker build --network host -q --label "io.easyanimate.base-recipe=$recipe" -t "$IMAGE" "$ctx" >/dev/null
echo "$IMAGE"
