# pgdispatch-postgres: Debian's postgresql-15 (the same major version and build the
# tests use) on debian:bookworm-slim, with pg_stat_statements preloaded
# (track = all), TCP keepalives, scram authentication for network clients, the
# data directory on a volume and a pg_isready healthcheck.
#
#   docker build -f docker/postgres.Dockerfile -t pgdispatch-postgres .
#
# Environment: POSTGRES_PASSWORD (superuser "postgres"; required on first start),
# POSTGRES_DB (database created on first start; default pgdispatch).
# Settings: docker/postgresql.conf; extra "-c name=value" arguments are passed on.
FROM debian:bookworm-slim

# Debian's packaging would create a "main" cluster at install time; the entry point
# makes the one cluster in the volume instead.
RUN mkdir -p /etc/postgresql-common/createcluster.d \
 && echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.d/pgdispatch.conf \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data \
 && install -d -o postgres -g postgres -m 2775 /var/run/postgresql \
 && install -d -m 0755 /etc/pgdispatch

COPY docker/postgresql.conf /etc/pgdispatch/postgresql.conf
COPY docker/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh

ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PGDATA=/var/lib/postgresql/data \
    POSTGRES_DB=pgdispatch
USER postgres
VOLUME /var/lib/postgresql/data
EXPOSE 5432
# SIGINT is PostgreSQL's fast shutdown: connected gateways and daemons do not
# hold it up (SIGTERM would wait for every client to disconnect).
STOPSIGNAL SIGINT
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=5 \
    CMD pg_isready -q -h 127.0.0.1 -p 5432 -d "$POSTGRES_DB" -U postgres
ENTRYPOINT ["/bin/bash", "/usr/local/bin/postgres-entrypoint.sh"]
