"""Fixtures for the integration suites: one real PostgreSQL per test session (from
tests/pgharness.py), a fresh migrated database per test, and the real binaries
started as child processes that are always stopped at teardown.

Binaries come from build/ (or build/san/ when PGD_SANITIZE=1, so the suite can run
against the ASan/UBSan builds)."""
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psycopg
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import pgharness  # noqa: E402

TEMPLATE_DB = "pgd_template"
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:")
_db_counter = itertools.count(1)


def binary(name):
    sub = os.path.join("build", "san") if os.environ.get("PGD_SANITIZE") == "1" else "build"
    path = os.path.join(ROOT, sub, name)
    if not os.path.exists(path):
        pytest.fail("%s is not built; run make build" % path)
    return path


def wait_for(predicate, timeout=10.0, interval=0.02, what="condition"):
    """Poll predicate until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail("timed out after %.1fs waiting for %s (last value: %r)" % (timeout, what, last))


def free_port():
    return pgharness.free_port()


@pytest.fixture(scope="session")
def pg():
    cluster = pgharness.Cluster()
    cluster.start()
    cluster.create_database(TEMPLATE_DB)
    cluster.migrate(TEMPLATE_DB)
    yield cluster
    cluster.destroy()


class Database:
    """A fresh database cloned from the migrated template."""

    def __init__(self, cluster, name):
        self.cluster = cluster
        self.name = name
        self.dsn = cluster.dsn(name)

    def connect(self, user="postgres", autocommit=True):
        return psycopg.connect(self.cluster.dsn(self.name, user=user), autocommit=autocommit)

    def sql(self, query, params=None):
        """Run one statement as superuser; return all rows (or [] for none)."""
        with self.connect() as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def one(self, query, params=None):
        rows = self.sql(query, params)
        return rows[0][0] if rows else None

    def node_dsn(self, role):
        return self.cluster.dsn(self.name, user=role)

    def enroll(self, node_name):
        """Enroll a node and return its login role's connection string."""
        role = self.one("SELECT dispatch.enroll(%s)", (node_name,))
        return self.node_dsn(role)

    def statement_calls(self, exclude_user="postgres"):
        """Sum of pg_stat_statements calls by roles other than the harness's own."""
        return self.one(
            "SELECT coalesce(sum(s.calls), 0)::bigint FROM pg_stat_statements s "
            "JOIN pg_roles r ON r.oid = s.userid JOIN pg_database d ON d.oid = s.dbid "
            "WHERE d.datname = current_database() AND r.rolname <> %s", (exclude_user,))


@pytest.fixture
def db(pg):
    name = "pgd_t%d_%d" % (os.getpid(), next(_db_counter))
    pg.psql('CREATE DATABASE "%s" TEMPLATE "%s"' % (name, TEMPLATE_DB))
    database = Database(pg, name)
    yield database
    pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '%s' "
            "AND pid <> pg_backend_pid()" % name, check=False)
    pg.psql('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name, check=False)


class Process:
    def __init__(self, name, argv, env, logpath):
        # Checked at teardown: a process the test did not kill or wait for itself
        # must exit 0 on SIGTERM.
        self.expect_clean_exit = True
        self.name = name
        self.argv = argv
        self.logpath = logpath
        self.log = open(logpath, "ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def signal(self, sig):
        if self.alive():
            self.proc.send_signal(sig)

    def kill9(self):
        self.expect_clean_exit = False
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout=15):
        """SIGTERM, wait; SIGKILL if it does not exit. Returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def wait(self, timeout=15):
        self.expect_clean_exit = False
        return self.proc.wait(timeout)

    def output(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.logpath, "rb") as f:
            return f.read().decode(errors="replace")


@pytest.fixture
def procs(tmp_path, request):
    """Start real binaries: procs.start(name, argv, env=...). All are stopped at
    teardown; their logs are printed when the test failed."""
    started = []

    class Starter:
        def start(self, name, argv, env=None):
            e = dict(os.environ)
            e.update(env or {})
            p = Process(name, argv, e, str(tmp_path / ("%s.log" % name)))
            started.append(p)
            return p

    yield Starter()
    problems = []
    for p in reversed(started):
        was_alive = p.alive()
        rc = p.stop(timeout=10)
        if p.expect_clean_exit and (not was_alive or rc != 0) and rc != 0:
            problems.append("%s exited with status %s%s" % (p.name, rc, "" if was_alive else " before teardown"))
        out = p.output()
        for marker in SANITIZER_MARKERS:
            if marker in out:
                problems.append("%s reported %r (see its log)" % (p.name, marker))
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for p in started:
            sys.stderr.write("\n----- %s (%s) -----\n%s" % (p.name, " ".join(p.argv), p.output()[-6000:]))
    for p in started:
        p.log.close()
    if problems and not (rep is not None and rep.failed):
        for p in started:
            sys.stderr.write("\n----- %s (%s) -----\n%s" % (p.name, " ".join(p.argv), p.output()[-6000:]))
        pytest.fail("; ".join(problems))


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def http_get(url, timeout=5, headers=None):
    """(status, body bytes, headers) of a GET, without raising on HTTP errors."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def port_open(port, host="127.0.0.1"):
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class FakeProvider:
    """One fake provider process (tests/fake_provider) on its own port; flags are its
    command-line flags with _ for -, e.g. FakeProvider(procs, latency_ms=50)."""

    def __init__(self, procs, name="fake", port=None, **flags):
        self.procs = procs
        self.name = name
        self.port = port or free_port()
        self.flags = flags
        self.start()

    def start(self):
        argv = [binary("fake-provider"), "--port", str(self.port)]
        for k, v in self.flags.items():
            argv += ["--" + k.replace("_", "-"), str(v)]
        self.proc = self.procs.start(self.name, argv)
        wait_for(lambda: port_open(self.port), 10, what="%s listening" % self.name)

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def stats(self):
        status, body, _ = http_get(self.url + "/_fake/stats")
        assert status == 200, body
        return json.loads(body)

    def config(self, **patch):
        req = urllib.request.Request(self.url + "/_fake/config", data=json.dumps(patch).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200
