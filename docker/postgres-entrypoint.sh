#!/bin/bash
# Entry point of the pgdispatch-postgres image (docker/postgres.Dockerfile).
# First start on an empty data volume: initdb (superuser "postgres" with
# POSTGRES_PASSWORD, scram for every network client, peer for the local socket),
# create POSTGRES_DB with pg_stat_statements. Every start: run postgres in the
# foreground with any extra arguments given ("-c name=value" ...).
set -euo pipefail

: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_DB:=pgdispatch}"

die() { echo "postgres-entrypoint: $*" >&2; exit 1; }

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    [ -n "${POSTGRES_PASSWORD:-}" ] || die "POSTGRES_PASSWORD is empty: set it to initialize the database"
    [[ "$POSTGRES_DB" =~ ^[a-z_][a-z0-9_]{0,62}$ ]] || die "POSTGRES_DB must be a lower-case identifier"
    [ -w "$PGDATA" ] || die "$PGDATA is not writable by $(id -un) (uid $(id -u)): fix the volume's owner"
    [ -z "$(ls -A "$PGDATA")" ] || die "$PGDATA is not empty but has no PG_VERSION: refusing to initialize over it"
    chmod 700 "$PGDATA"
    pwfile=$(mktemp)
    trap 'rm -f "$pwfile"' EXIT
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    echo "postgres-entrypoint: initializing $PGDATA"
    initdb -D "$PGDATA" -U postgres --pwfile="$pwfile" --auth-local=peer --auth-host=scram-sha-256 \
           --encoding=UTF8 --locale=C.UTF-8 --data-checksums >/dev/null
    rm -f "$pwfile"
    cat >"$PGDATA/pg_hba.conf" <<'HBA'
# TYPE  DATABASE  USER  ADDRESS     METHOD
local   all       all               peer
host    all       all   0.0.0.0/0   scram-sha-256
host    all       all   ::/0        scram-sha-256
HBA
    echo "include = '/etc/pgdispatch/postgresql.conf'" >>"$PGDATA/postgresql.conf"
    # Single-user mode: nothing listens until the database exists, so clients
    # (the migrate service) simply retry.
    single() {  # single-user mode exits 0 even when a statement fails: look for ERROR
        local out
        out=$(echo "$2" | postgres --single -D "$PGDATA" "$1" 2>&1) || die "$2: $out"
        ! grep -q 'ERROR:' <<<"$out" || die "$2: $out"
    }
    single postgres "CREATE DATABASE $POSTGRES_DB"
    single "$POSTGRES_DB" "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"
    echo "postgres-entrypoint: created database $POSTGRES_DB"
fi

exec postgres -D "$PGDATA" "$@"
