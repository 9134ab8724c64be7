#!/usr/bin/python3
"""Throwaway PostgreSQL 15 servers for tests, benchmarks and `make run`.

Owns one cluster per `Cluster` object: initdb into a directory, a free TCP port on
127.0.0.1, its own unix socket directory, pg_stat_statements preloaded. As root the
server runs as the `postgres` user. Used as a library (pytest fixtures, bench) and
as a command: `pgharness.py run -- CMD...` starts a cluster, creates and migrates a
database, runs CMD with DATABASE_URL and PG* set, and always removes the cluster.
"""
import argparse
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

PG_BIN = "/usr/lib/postgresql/15/bin"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPERUSER = "postgres"


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user():
    """The account the server runs as: `postgres` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    return pwd.getpwnam("postgres")


class Cluster:
    """One PostgreSQL server. `start()` creates it (unless `datadir` already holds
    one), `stop()` stops it, `destroy()` stops it and removes what it created."""

    def __init__(self, basedir=None, port=None, settings=None, persistent=False):
        self.persistent = persistent
        self.basedir = basedir or tempfile.mkdtemp(prefix="pgdispatch-pg-")
        os.makedirs(self.basedir, exist_ok=True)
        self.datadir = os.path.join(self.basedir, "data")
        self.sockdir = os.path.join(self.basedir, "sock")
        self.logfile = os.path.join(self.basedir, "postgres.log")
        self.port = port or free_port()
        self.settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": "'%s'" % self.sockdir,
            "shared_preload_libraries": "'pg_stat_statements'",
            "pg_stat_statements.track": "all",
            "max_connections": "200",
            "shared_buffers": "256MB",
            "fsync": "on",
            "synchronous_commit": "on",
            "tcp_keepalives_idle": "10",
            "tcp_keepalives_interval": "5",
            "tcp_keepalives_count": "3",
            # Keepalives do not fire while unacknowledged data (a NOTIFY) is in flight;
            # this bounds a silently vanished client's session there too.
            "tcp_user_timeout": "25000",
            "log_min_messages": "warning",
            "log_line_prefix": "'%m [%p] %u@%d '",
        }
        if settings:
            self.settings.update(settings)
        self.user = _server_user()

    # -- helpers ---------------------------------------------------------------
    def _as_server_user(self, argv, **kw):
        if self.user is not None:
            argv = ["runuser", "-u", "postgres", "--"] + argv
        return subprocess.run(argv, check=True, **kw)

    def _chown(self, path):
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def dsn(self, dbname="postgres", user=SUPERUSER):
        return "postgresql://%s@127.0.0.1:%d/%s" % (user, self.port, dbname)

    def env(self, dbname="postgres"):
        e = dict(os.environ)
        e.update(PGHOST=self.sockdir, PGPORT=str(self.port), PGUSER=SUPERUSER,
                 PGDATABASE=dbname, DATABASE_URL=self.dsn(dbname))
        return e

    # -- lifecycle -------------------------------------------------------------
    def _check_reachable(self):
        """As root the server runs as `postgres`, which must be able to enter every
        directory above its data; say so plainly instead of letting initdb fail."""
        if self.user is None:
            return
        path = os.path.dirname(os.path.abspath(self.basedir))
        while True:
            st = os.stat(path)
            if not (st.st_mode & 0o001 or (st.st_mode & 0o010 and st.st_gid == self.user.pw_gid)
                    or st.st_uid == self.user.pw_uid):
                raise SystemExit(
                    "pgharness: PostgreSQL runs as the 'postgres' user, which cannot enter %s (mode %o). "
                    "Put the project (or PGDISPATCH_RUN_DIR) under a directory others may enter, "
                    "or run: chmod o+x %s" % (path, st.st_mode & 0o777, path))
            if path == "/":
                return
            path = os.path.dirname(path)

    def init(self):
        if os.path.exists(os.path.join(self.datadir, "PG_VERSION")):
            return
        self._check_reachable()
        self._chown(self.basedir)
        for d in (self.datadir, self.sockdir):
            os.makedirs(d, exist_ok=True)
            self._chown(d)
        self._as_server_user([os.path.join(PG_BIN, "initdb"), "-D", self.datadir,
                              "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                              "--locale=C.UTF-8", "--no-sync"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with open(os.path.join(self.datadir, "postgresql.conf"), "a") as f:
            for k, v in self.settings.items():
                f.write("%s = %s\n" % (k, v))

    def start(self, wait_seconds=30):
        self.init()
        os.makedirs(self.sockdir, exist_ok=True)
        self._chown(self.sockdir)
        if not os.path.exists(self.logfile):
            open(self.logfile, "a").close()
        self._chown(self.logfile)
        self._as_server_user([os.path.join(PG_BIN, "pg_ctl"), "-D", self.datadir,
                              "-l", self.logfile, "-o", "-p %d" % self.port,
                              "-w", "-t", str(wait_seconds), "start"],
                             stdout=subprocess.DEVNULL)
        return self

    def stop(self, mode="fast"):
        if not os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
            return
        self._as_server_user([os.path.join(PG_BIN, "pg_ctl"), "-D", self.datadir,
                              "-m", mode, "-w", "-t", "60", "stop"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def restart(self, mode="fast"):
        self.stop(mode)
        self.start()

    def destroy(self):
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        if not self.persistent:
            shutil.rmtree(self.basedir, ignore_errors=True)

    # -- databases -------------------------------------------------------------
    def psql(self, sql, dbname="postgres", check=True):
        return subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At",
                               "-h", self.sockdir, "-p", str(self.port),
                               "-U", SUPERUSER, "-d", dbname, "-c", sql],
                              check=check, capture_output=True, text=True).stdout

    def create_database(self, dbname):
        exists = self.psql("SELECT 1 FROM pg_database WHERE datname = '%s'" % dbname)
        if not exists.strip():
            self.psql('CREATE DATABASE "%s"' % dbname)
        self.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", dbname=dbname)

    def migrate(self, dbname):
        subprocess.run(["sh", os.path.join(ROOT, "sql", "migrate.sh")],
                       env=self.env(dbname), check=True, stdout=subprocess.DEVNULL)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="start a cluster, run a command against it, remove it")
    run.add_argument("--db", default="pgdispatch_test")
    run.add_argument("--no-migrate", action="store_true")
    run.add_argument("argv", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        ap.error("run needs a command after --")

    cluster = Cluster()
    # Make SIGTERM (CI timeout, Ctrl-C from make) take the normal cleanup path.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        cluster.start()
        cluster.create_database(args.db)
        if not args.no_migrate:
            cluster.migrate(args.db)
        rc = subprocess.call(argv, env=cluster.env(args.db))
    except subprocess.CalledProcessError as e:
        sys.stderr.write("pgharness: %s failed (exit %d)\n%s\n" % (
            " ".join(e.cmd), e.returncode, (e.stderr or b"").decode(errors="replace")
            if isinstance(e.stderr, bytes) else (e.stderr or "")))
        if os.path.exists(cluster.logfile):
            sys.stderr.write(open(cluster.logfile).read()[-4000:])
        rc = 1
    finally:
        cluster.destroy()
    sys.exit(rc)


if __name__ == "__main__":
    main()
