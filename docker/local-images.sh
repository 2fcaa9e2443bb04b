#!/usr/bin/env bash
# Builds, with no image registry, the two base images the Docker test pass and
# the compose test need, from this host's own files (Debian 12 packages):
#
#   pgjournal-local/postgres:15   the host's PostgreSQL server, psql, pg_isready
#                                 and an entrypoint that honours POSTGRES_USER,
#                                 POSTGRES_PASSWORD and POSTGRES_DB like the
#                                 official image (testcontainers' readiness check
#                                 runs `sh -c "psql ..."` inside the container)
#   pgjournal-local/python:3.11   the host's Python 3.11 with venv and pip, sh and
#                                 coreutils: a stand-in for python:3.11-slim as the
#                                 base of docker/Dockerfile (BASE_IMAGE build arg)
#
# Each is a root file system assembled from the files of a few programs plus
# every library `ldd` names for them, put in with `docker import`. Where an
# official image can be pulled, none of this is needed: use postgres:17 and
# python:3.11-slim.
#
# Usage: docker/local-images.sh [postgres|python]...   (both when none is named)
# Honours DOCKER_HOST. Prints each image's name and size.
set -euo pipefail

PG_IMAGE="${PGJOURNAL_LOCAL_PG_IMAGE:-pgjournal-local/postgres:15}"
PY_IMAGE="${PGJOURNAL_LOCAL_PY_IMAGE:-pgjournal-local/python:3.11}"
HERE="$(cd "$(dirname "$0")" && pwd)"

die() { echo "local-images: $*" >&2; exit 1; }
command -v docker >/dev/null || die "no docker client on PATH"
docker info >/dev/null 2>&1 || die "no Docker engine answers (DOCKER_HOST=${DOCKER_HOST:-unset})"

ROOT=""
new_root() {
    ROOT="$(mktemp -d /tmp/pgjournal-rootfs.XXXXXX)"
    mkdir -p "$ROOT"/usr/{bin,sbin,lib,lib64} "$ROOT"/{etc,tmp,var,run,root}
    chmod 1777 "$ROOT/tmp"
    # Debian 12 has a merged /usr: keep the same links so library paths agree.
    ln -s usr/bin "$ROOT/bin"; ln -s usr/sbin "$ROOT/sbin"
    ln -s usr/lib "$ROOT/lib"; ln -s usr/lib64 "$ROOT/lib64"
}

# Where a path lives on a merged-/usr system (/lib/x -> /usr/lib/x).
usr_path() {
    case "$1" in
        /lib/*|/lib64/*|/bin/*|/sbin/*) echo "/usr$1" ;;
        *) echo "$1" ;;
    esac
}

# Copies paths (files, links, directories) into the root at the same place; a
# link's target comes along too.
add() {
    local p q
    for p in "$@"; do
        [ -e "$p" ] || [ -L "$p" ] || die "missing on this host: $p"
        q="$(usr_path "$p")"
        [ -e "$ROOT$q" ] || [ -L "$ROOT$q" ] && continue
        mkdir -p "$ROOT$(dirname "$q")"
        cp -a "$p" "$ROOT$q"
        if [ -L "$p" ]; then
            add "$(readlink -f "$p")"
        fi
    done
}

# Copies programs or shared objects and every library ldd names for them.
add_elf() {
    local f lib
    for f in "$@"; do
        add "$f"
        while read -r lib; do
            add "$lib"
        done < <(ldd "$f" 2>/dev/null | grep -o '/[^ )]*' | sort -u)
    done
}

add_base() {
    local b
    add_elf /usr/bin/dash
    ln -sf dash "$ROOT/usr/bin/sh"
    for b in cat chmod chown cp env id ls mkdir mktemp rm sleep ln head tail test true false \
             printf echo dirname basename readlink; do
        add_elf "/usr/bin/$b"
    done
    add /etc/ssl/certs/ca-certificates.crt /usr/share/zoneinfo
    # What manylinux wheels (psycopg-binary, pydantic-core) expect of any glibc
    # system, though ldd of the programs above names none of it.
    local lib
    for lib in libpthread.so.0 libdl.so.2 librt.so.1 libutil.so.1 libm.so.6 libresolv.so.2 \
               libnss_dns.so.2 libgcc_s.so.1 libstdc++.so.6 libz.so.1; do
        add_elf "/usr/lib/x86_64-linux-gnu/$lib"
    done
    add_elf /usr/lib/x86_64-linux-gnu/libnss_files.so.2
    cat >"$ROOT/etc/nsswitch.conf" <<'EOF'
passwd: files
group: files
hosts: files dns
EOF
    printf '127.0.0.1 localhost\n' >"$ROOT/etc/hosts"
}

import_root() {
    local image="$1"; shift
    tar -C "$ROOT" -c . | docker import "$@" - "$image" >/dev/null
    rm -rf "$ROOT"
    echo "built $image ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
}

build_postgres() {
    local pgbin
    pgbin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
    [ -n "$pgbin" ] || die "no PostgreSQL server on this host (/usr/lib/postgresql/*/bin)"
    local pgdir="${pgbin%/bin}" version
    version="$(basename "$pgdir")"
    new_root
    add_base
    add_elf "$pgbin"/{postgres,initdb,psql,pg_isready,pg_ctl}
    local so
    for so in "$pgdir"/lib/*.so; do
        case "$so" in */llvmjit*) continue ;; esac  # JIT: 100 MB of LLVM, off by default here
        add_elf "$so"
    done
    add "/usr/share/postgresql/$version"
    printf 'root:x:0:0:root:/root:/bin/sh\npostgres:x:999:999:PostgreSQL:/var/lib/postgresql:/bin/sh\n' \
        >"$ROOT/etc/passwd"
    printf 'root:x:0:\npostgres:x:999:\n' >"$ROOT/etc/group"
    mkdir -p "$ROOT/var/lib/postgresql/data" "$ROOT/var/run/postgresql"
    chown -R 999:999 "$ROOT/var/lib/postgresql" "$ROOT/var/run/postgresql"
    chmod 0700 "$ROOT/var/lib/postgresql/data"
    mkdir -p "$ROOT/usr/local/bin"
    install -m 0755 "$HERE/postgres-entrypoint.sh" "$ROOT/usr/local/bin/docker-entrypoint.sh"
    import_root "$PG_IMAGE" \
        --change "ENV PATH=$pgbin:/usr/local/bin:/usr/bin" \
        --change "ENV PGDATA=/var/lib/postgresql/data" \
        --change "USER postgres" \
        --change "EXPOSE 5432" \
        --change 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' \
        --change 'CMD ["postgres"]'
}

build_python() {
    [ -x /usr/bin/python3.11 ] || die "no /usr/bin/python3.11 on this host (Debian's python3.11)"
    new_root
    add_base
    add_elf /usr/bin/python3.11
    ln -sf python3.11 "$ROOT/usr/bin/python3"; ln -sf python3.11 "$ROOT/usr/bin/python"
    add /usr/lib/python3.11
    rm -rf "$ROOT/usr/lib/python3.11/test"
    local so
    while read -r so; do add_elf "$so"; done < <(find /usr/lib/python3.11/lib-dynload -name '*.so')
    # Debian's ensurepip installs pip from these wheels (python3 -m venv).
    [ -d /usr/share/python-wheels ] && add /usr/share/python-wheels
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ROOT/etc/passwd"
    printf 'root:x:0:\n' >"$ROOT/etc/group"
    import_root "$PY_IMAGE" \
        --change "ENV PATH=/usr/local/bin:/usr/bin" \
        --change "ENV LANG=C.UTF-8" \
        --change 'CMD ["python3"]'
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(postgres python)
for t in "${targets[@]}"; do
    case "$t" in
        postgres) build_postgres ;;
        python) build_python ;;
        *) die "unknown image '$t' (postgres or python)" ;;
    esac
done
