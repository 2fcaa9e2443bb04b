#!/usr/bin/env bash
# Starts a Docker engine of CI's own and builds, with no registry, the images
# the Docker pass needs. Prints `export DOCKER_HOST=...` lines for eval.
#
# - The engine and Compose come from Debian's packages (docker.io,
#   docker-compose) when missing.
# - It listens on a socket of its own (/run/pgjournal-ci-docker), never the
#   default one: the other passes probe the default socket and must keep
#   choosing the embedded server.
# - --iptables=false --ip6tables=false --ip-forward=false: dockerd's own
#   iptables rules set the FORWARD policy to DROP, which (with
#   bridge-nf-call-iptables=1) cuts traffic between the network namespaces of
#   tests/test_netns.py. Published ports still work through docker-proxy;
#   build containers reach PyPI with --network host.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR=/run/pgjournal-ci-docker
SOCK="unix://$RUN_DIR/docker.sock"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

log() { echo "$@" >&2; }

if ! command -v dockerd >/dev/null 2>&1 || { ! command -v docker-compose >/dev/null 2>&1 \
        && ! docker compose version >/dev/null 2>&1; }; then
    log "installing docker.io and docker-compose (Debian)"
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker.io docker-compose >&2
fi

if ! DOCKER_HOST="$SOCK" docker info >/dev/null 2>&1; then
    $SUDO mkdir -p "$RUN_DIR"
    log "starting dockerd on $SOCK (log: $RUN_DIR/dockerd.log)"
    $SUDO sh -c "nohup dockerd -H '$SOCK' --pidfile '$RUN_DIR/docker.pid' \
        --exec-root '$RUN_DIR/exec' --data-root /var/lib/pgjournal-ci-docker --iptables=false --ip6tables=false --ip-forward=false \
        >'$RUN_DIR/dockerd.log' 2>&1 &"
    for _ in $(seq 1 60); do
        DOCKER_HOST="$SOCK" docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    if ! DOCKER_HOST="$SOCK" docker info >/dev/null 2>&1; then
        log "dockerd did not answer; its log:"
        tail -20 "$RUN_DIR/dockerd.log" >&2 || true
        exit 1
    fi
fi

DOCKER_HOST="$SOCK" docker/local-images.sh >&2
echo "export DOCKER_HOST=$SOCK"
