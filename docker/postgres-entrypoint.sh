#!/bin/sh
# Entrypoint of the locally built pgjournal-local/postgres image
# (docker/local-images.sh): on an empty data directory it creates the cluster
# with POSTGRES_USER (default postgres) as superuser, POSTGRES_PASSWORD for
# password logins over TCP, and POSTGRES_DB (default: the user's name), like
# the official image; then it runs the server, listening on all addresses.
set -eu
PGDATA="${PGDATA:-/var/lib/postgresql/data}"
user="${POSTGRES_USER:-postgres}"
db="${POSTGRES_DB:-$user}"

if [ "${1:-postgres}" = "postgres" ] && [ "$#" -gt 0 ]; then shift; fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "${POSTGRES_HOST_AUTH_METHOD:-}" != "trust" ]; then
        echo "error: set POSTGRES_PASSWORD (or POSTGRES_HOST_AUTH_METHOD=trust)" >&2
        exit 1
    fi
    pwfile="$(mktemp)"
    printf '%s\n' "${POSTGRES_PASSWORD:-unused}" >"$pwfile"
    initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" -E UTF8 --locale=C \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    method="scram-sha-256"
    [ "${POSTGRES_HOST_AUTH_METHOD:-}" = "trust" ] && method="trust"
    printf 'host all all all %s\n' "$method" >>"$PGDATA/pg_hba.conf"
    if [ "$db" != "postgres" ]; then
        # Single-user mode: no temporary server, nothing listens before we are ready.
        echo "CREATE DATABASE \"$db\"" | postgres --single -D "$PGDATA" -j postgres >/dev/null
    fi
    echo "database cluster ready (user $user, database $db)"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
