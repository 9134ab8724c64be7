#!/usr/bin/python3
"""`make run`: the whole demo system on this machine, in the foreground.

Owns .run/ under the project folder: a private PostgreSQL (kept between runs), the
logs, and the child processes (fake provider as the demo model server, daemon,
gateway). Ctrl-C stops everything; the next `make run` starts from the same data.
"""
import os
import signal
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import pgharness  # noqa: E402

RUN_DIR = os.environ.get("PGDISPATCH_RUN_DIR", os.path.join(ROOT, ".run"))
LOG_DIR = os.path.join(RUN_DIR, "logs")
DB = "pgdispatch"
PG_PORT = int(os.environ.get("PGDISPATCH_PG_PORT", "54329"))
GATEWAY_PORT = int(os.environ.get("PGDISPATCH_PORT", "8080"))
PROVIDER_PORT = int(os.environ.get("PGDISPATCH_PROVIDER_PORT", "8000"))
NODE = "local"
MODEL = "demo"


def fail(message):
    sys.stderr.write("make run: %s\n" % message)
    sys.exit(1)


def wait_http(url, what, proc, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail("%s exited with status %d; see its log in %s" % (what, proc.returncode, LOG_DIR))
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.1)
    fail("%s did not answer %s within %d s; see %s" % (what, url, seconds, LOG_DIR))


def main():
    for port, what in ((PG_PORT, "PostgreSQL"), (GATEWAY_PORT, "the gateway"), (PROVIDER_PORT, "the demo provider")):
        if pgharness_port_busy(port):
            fail("port %d for %s is in use (is another `make run` going?); set %s" % (
                port, what, {PG_PORT: "PGDISPATCH_PG_PORT", GATEWAY_PORT: "PGDISPATCH_PORT",
                             PROVIDER_PORT: "PGDISPATCH_PROVIDER_PORT"}[port]))
    os.makedirs(LOG_DIR, exist_ok=True)
    cluster = pgharness.Cluster(basedir=os.path.join(RUN_DIR, "pg"), port=PG_PORT, persistent=True)
    children = []

    def stop(*_):
        for name, p in reversed(children):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in reversed(children):
            try:
                p.wait(35)
            except subprocess.TimeoutExpired:
                p.kill()
        cluster.stop("fast")
        print("\nmake run: stopped; data kept in %s" % os.path.join(RUN_DIR, "pg"))
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    cluster.start()
    cluster.create_database(DB)
    cluster.migrate(DB)
    cluster.psql("""
        DO $$ BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgdispatch_gateway') THEN
                CREATE ROLE pgdispatch_gateway LOGIN IN ROLE dispatch_gateway;
            END IF;
            IF NOT EXISTS (SELECT 1 FROM dispatch.nodes() WHERE name = '%s') THEN
                PERFORM dispatch.enroll('%s');
            END IF;
        END $$;""" % (NODE, NODE), dbname=DB)
    node_role = cluster.psql("SELECT role_name FROM dispatch.nodes() WHERE name = '%s'" % NODE, dbname=DB).strip()

    def start(name, argv):
        log = open(os.path.join(LOG_DIR, name + ".log"), "ab")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        children.append((name, p))
        return p

    build = os.environ.get("PGDISPATCH_BIN_DIR", os.path.join(ROOT, "build"))
    provider = start("provider", [os.path.join(build, "fake-provider"), "--port", str(PROVIDER_PORT),
                                  "--models", MODEL, "--slots", "8"])
    wait_http("http://127.0.0.1:%d/health" % PROVIDER_PORT, "the demo provider", provider)
    start("daemon", [os.path.join(build, "pgdispatch-daemon"),
                     "--database-url", cluster.dsn(DB, user=node_role),
                     "--provider-url", "http://127.0.0.1:%d" % PROVIDER_PORT])
    gateway = start("gateway", [os.path.join(build, "pgdispatch-gateway"),
                                "--listen", "127.0.0.1:%d" % GATEWAY_PORT,
                                "--database-url", cluster.dsn(DB, user="pgdispatch_gateway")])
    wait_http("http://127.0.0.1:%d/readyz" % GATEWAY_PORT, "the gateway", gateway)
    deadline = time.monotonic() + 20
    while MODEL not in cluster.psql("SELECT model FROM dispatch.models()", dbname=DB).split():
        if time.monotonic() > deadline:
            fail("the daemon did not register model %s; see %s/daemon.log" % (MODEL, LOG_DIR))
        time.sleep(0.1)

    print("""
pgdispatch is running (gateway :%(gw)d, daemon node "%(node)s", demo provider :%(pp)d, PostgreSQL :%(pg)d).

  curl -s http://127.0.0.1:%(gw)d/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model":"%(model)s","messages":[{"role":"user","content":"hello"}]}'

  psql "%(dsn)s" -c 'SELECT * FROM dispatch.nodes()'

Logs: %(logs)s/{gateway,daemon,provider}.log and %(pglog)s
Stop: Ctrl-C (data is kept for the next make run)
""" % dict(gw=GATEWAY_PORT, node=NODE, pp=PROVIDER_PORT, pg=PG_PORT, model=MODEL,
           dsn=cluster.dsn(DB), logs=LOG_DIR, pglog=cluster.logfile), flush=True)

    # Block until a child exits (Ctrl-C runs stop() from the signal handler).
    pid, status = os.wait()
    name = next((n for n, p in children if p.pid == pid), "pid %d" % pid)
    sys.stderr.write("make run: %s exited (%s); stopping (see %s/%s.log)\n" % (
        name, os.waitstatus_to_exitcode(status), LOG_DIR, name))
    stop()


def pgharness_port_busy(port):
    import socket
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


if __name__ == "__main__":
    main()
