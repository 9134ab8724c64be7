"""The control plane's SQL under several real sessions: concurrent leasing, liveness
by connection, NOTIFY payloads, migrations, lease expiry and backoff in real time,
and the plan of a lease against a deep queue.

Everything here talks to PostgreSQL directly (no binaries). Waits are bounded
conditions (wait_for, or a sentinel NOTIFY), never fixed sleeps."""
import json
import os
import re
import select
import subprocess
import threading
import time

import psycopg
import pytest

from conftest import ROOT, wait_for

PG_BIN = "/usr/lib/postgresql/15/bin"


# -- helpers ---------------------------------------------------------------------

def node(db, name, models, max_concurrency=None):
    """Enroll a node, connect as its role, register; return the connection and its
    node_session row (node_id, node_name, node_channel, model_channels)."""
    conn = psycopg.connect(db.enroll(name), autocommit=True)
    session = conn.execute("SELECT * FROM dispatch.register('llamacpp', %s, %s)",
                           (list(models), max_concurrency)).fetchone()
    return conn, session


def sqlstate_of(fn):
    """Run fn; return the SQLSTATE of the database error it raised (None if none)."""
    try:
        fn()
    except psycopg.Error as e:
        return e.sqlstate
    return None


class Listener:
    """A connection that LISTENs and collects notifications with deadlines."""

    def __init__(self, conn, *channels):
        self.conn = conn
        self.got = []
        conn.add_notify_handler(self.got.append)
        for ch in channels:
            conn.execute('LISTEN "%s"' % ch)

    def pump(self, timeout):
        """Wait up to timeout for the socket, then let psycopg dispatch what arrived."""
        select.select([self.conn.fileno()], [], [], timeout)
        self.conn.execute("SELECT 1")

    def until(self, predicate, timeout=10.0, what="notifications"):
        deadline = time.monotonic() + timeout
        while not predicate(self.got):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail("timed out waiting for %s; got %r" % (
                    what, [(n.channel, n.payload[:80]) for n in self.got]))
            self.pump(min(left, 0.5))
        return self.got

    def drain_through_sentinel(self, db, channel, timeout=10.0):
        """NOTIFY a sentinel from another transaction and collect everything up to it.
        Notifications arrive in commit order, so whatever an earlier transaction sent
        is in the returned list (without the sentinel)."""
        token = "sentinel-%d" % time.monotonic_ns()
        db.sql("SELECT pg_notify(%s, %s)", (channel, token))
        self.until(lambda got: any(n.channel == channel and n.payload == token for n in got),
                   timeout, what="sentinel on %s" % channel)
        idx = next(i for i, n in enumerate(self.got) if n.channel == channel and n.payload == token)
        before, self.got[:] = self.got[:idx], self.got[idx + 1:]
        return before


def submit_many(conn_or_db, requests, reply_channel=None):
    q = "SELECT idx, id, sqlstate, message FROM dispatch.submit_many(%s, %s) ORDER BY idx"
    if hasattr(conn_or_db, "sql"):
        rows = conn_or_db.sql(q, (json.dumps(requests), reply_channel))
    else:
        rows = conn_or_db.execute(q, (json.dumps(requests), reply_channel)).fetchall()
    bad = [r for r in rows if r[2] is not None]
    assert not bad, bad
    return [r[1] for r in rows]



def test_submit_wakes_as_many_nodes_as_new_jobs_most_free_slots_first(db):
    nodes = {name: node(db, name, ["m-t"], 4) for name in ("wa", "wb", "wc")}
    ids = {name: sess[0] for name, (conn, sess) in nodes.items()}
    channel = nodes["wa"][1][3][0]
    listener = Listener(nodes["wa"][0], channel)
    submit_many(db, [{"model": "m-t", "payload": {}}] * 2)
    got = listener.drain_through_sentinel(db, channel)
    assert len(got) == 1 and got[0].payload != "", got
    # wa takes both jobs: 2 of its 4 slots are used, wb and wc have 4 free.
    leased = nodes["wa"][0].execute("SELECT count(*) FROM dispatch.exchange(NULL, 2) WHERE kind = 'job'").fetchone()[0]
    assert leased == 2

    for _ in range(5):
        submit_many(db, [{"model": "m-t", "payload": {}}])
        got = listener.drain_through_sentinel(db, channel)
        assert len(got) == 1 and got[0].payload in (str(ids["wb"]), str(ids["wc"])), \
            "one new job wakes one node, one with the most free slots: %r" % [n.payload for n in got]
    submit_many(db, [{"model": "m-t", "payload": {}}] * 2)
    got = listener.drain_through_sentinel(db, channel)
    assert [sorted(n.payload.split(",")) for n in got] == [sorted([str(ids["wb"]), str(ids["wc"])])], \
        [n.payload for n in got]
    # As many new jobs as serving nodes (or more): everyone, with an empty payload.
    submit_many(db, [{"model": "m-t", "payload": {}}] * 3)
    assert [n.payload for n in listener.drain_through_sentinel(db, channel)] == [""]
    # A node whose session is gone is never named.
    nodes["wb"][0].close()
    nodes["wc"][0].close()
    wait_for(lambda: db.one("SELECT count(*) FROM dispatch.nodes() WHERE live") == 1, 10, what="wb, wc gone")
    submit_many(db, [{"model": "m-t", "payload": {}}])
    assert [n.payload for n in listener.drain_through_sentinel(db, channel)] == [""]
    nodes["wa"][0].close()


def test_general_path_submit_wakes_each_model_like_the_short_path(db):
    """A batch for two models (or with idempotency keys) runs submit_many's general
    path (010); its NOTIFYs name nodes the same way, one per model."""
    nodes = {name: node(db, name, ["m-g1", "m-g2"], 4) for name in ("ga", "gb")}
    ids = {name: sess[0] for name, (conn, sess) in nodes.items()}
    ch1, ch2 = nodes["ga"][1][3]
    listener = Listener(nodes["ga"][0], ch1, ch2)
    submit_many(db, [{"model": "m-g1", "payload": {}}, {"model": "m-g2", "payload": {}, "idempotency_key": "g-1"}])
    got = listener.drain_through_sentinel(db, ch1)
    by_channel = {n.channel: n.payload for n in got}
    assert sorted(by_channel) == sorted([ch1, ch2]) and len(got) == 2, got
    assert all(p in (str(ids["ga"]), str(ids["gb"])) for p in by_channel.values()), \
        "one new job per model wakes one of its two nodes: %r" % by_channel
    submit_many(db, [{"model": "m-g1", "payload": {}, "idempotency_key": "g-%d" % i} for i in range(2, 4)])
    assert [n.payload for n in listener.drain_through_sentinel(db, ch1)] == [""], \
        "as many keyed jobs as serving nodes wake them all"
    for conn, _ in nodes.values():
        conn.close()

# -- concurrent leasing ------------------------------------------------------------

def test_four_sessions_lease_each_job_exactly_once(db):
    nodes = [node(db, "lease-%d" % i, ["m-race"], 10) for i in range(4)]
    ids = submit_many(db, [{"model": "m-race", "payload": {"n": i}} for i in range(1000)])
    assert len(set(ids)) == 1000

    barrier = threading.Barrier(4)
    leased = [[] for _ in nodes]
    errors = []

    def worker(i, conn):
        try:
            barrier.wait(timeout=10)
            outcomes = []
            while True:
                rows = conn.execute("SELECT kind, id, attempt FROM dispatch.exchange(%s, 10)",
                                    (json.dumps(outcomes),)).fetchall()
                stale = [r for r in rows if r[0] == "stale"]
                assert not stale, stale
                jobs = [r for r in rows if r[0] == "job"]
                leased[i].extend(r[1] for r in jobs)
                outcomes = [{"id": r[1], "attempt": r[2], "result": {"by": i}} for r in jobs]
                if not jobs:
                    break
        except Exception as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i, c)) for i, (c, _) in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a leasing session did not finish"
    assert not errors, errors

    everything = [j for per_node in leased for j in per_node]
    assert len(everything) == 1000, "jobs leased more than once or not at all"
    assert sorted(everything) == sorted(ids)
    assert db.sql("SELECT state, attempt, count(*) FROM dispatch.jobs GROUP BY 1, 2") == [("succeeded", 1, 1000)]
    # Each job was completed by the node that leased it.
    by_node = dict(db.sql("SELECT (result->>'by')::int, count(*) FROM dispatch.jobs GROUP BY 1"))
    assert by_node == {i: len(leased[i]) for i in range(4) if leased[i]}
    for c, _ in nodes:
        c.close()


# -- liveness ------------------------------------------------------------------------

def test_second_live_session_refused_until_first_disconnects(db):
    dsn = db.enroll("solo")
    first = psycopg.connect(dsn, autocommit=True)
    first.execute("SELECT dispatch.register('llamacpp', ARRAY['m1'])")
    second = psycopg.connect(dsn, autocommit=True)
    try:
        second.execute("SELECT dispatch.register('llamacpp', ARRAY['m1'])")
        pytest.fail("a second live session was accepted")
    except psycopg.Error as e:
        assert e.sqlstate == "PD006"
        assert 'node "solo" already has a live session (backend pid %d' % first.info.backend_pid in str(e)
    assert db.sql("SELECT live, backend_pid FROM dispatch.nodes() WHERE name = 'solo'") == [
        (True, first.info.backend_pid)]

    first.close()

    def registers():
        return sqlstate_of(lambda: second.execute(
            "SELECT dispatch.register('llamacpp', ARRAY['m1'])")) is None
    wait_for(registers, timeout=10, what="register after the first session closed")
    assert db.sql("SELECT live, backend_pid FROM dispatch.nodes() WHERE name = 'solo'") == [
        (True, second.info.backend_pid)]
    second.close()


def test_liveness_drops_when_the_connection_closes(db):
    db.sql("SELECT dispatch.set_setting('fallback_capacity', 2)")
    conn, _ = node(db, "fleeting", ["m-live"], 8)
    assert db.sql("SELECT capacity, tier, live_nodes FROM dispatch.capacity() WHERE model = 'm-live'") == [
        (8, "reported", 1)]
    conn.close()
    wait_for(lambda: db.sql("SELECT capacity, tier, live_nodes FROM dispatch.capacity() WHERE model = 'm-live'")
             == [(2, "fallback", 0)], timeout=10, what="capacity to fall to the fallback tier")
    assert db.one("SELECT live FROM dispatch.nodes() WHERE name = 'fleeting'") is False
    # With no live node and fallback 2 x 32 the queue still admits work, then refuses.
    db.sql("SELECT dispatch.set_setting('fallback_capacity', 0)")
    with pytest.raises(psycopg.Error) as e:
        db.sql("SELECT dispatch.submit('m-live', NULL, '{}')")
    assert e.value.sqlstate == "PD002"


def test_revoke_ends_the_node_session_and_requeues_its_jobs(db):
    conn, _ = node(db, "revoked", ["m-rv"], 4)
    pid = conn.info.backend_pid
    job = db.one("SELECT dispatch.submit('m-rv', NULL, '{}', 0, NULL, 1)")
    assert conn.execute("SELECT id, attempt FROM dispatch.lease(4)").fetchall() == [(job, 1)]

    assert db.one("SELECT dispatch.revoke('revoked')") == 1
    wait_for(lambda: not db.one("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)),
             timeout=10, what="the node's backend to end")
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    assert db.sql("SELECT state, attempt, max_attempts, leased_by FROM dispatch.jobs WHERE id = %s", (job,)) == [
        ("queued", 1, 2, None)]
    assert db.sql("SELECT count(*) FROM pg_roles WHERE rolname = 'dispatch_node_revoked'") == [(0,)]
    assert db.sql("SELECT count(*) FROM dispatch.nodes WHERE name = 'revoked'") == [(0,)]
    conn.close()


def test_a_node_sitting_in_an_open_transaction_is_stale(db):
    db.sql("SELECT dispatch.set_setting('stale_seconds', 1)")
    conn, _ = node(db, "wedged", ["m-w"], 4)
    assert db.sql("SELECT * FROM dispatch.health()") == []
    conn.execute("BEGIN")
    conn.execute("SELECT 1")

    def stale():
        return db.sql("SELECT kind, subject, detail FROM dispatch.health()")
    rows = wait_for(stale, timeout=10, what="the node in an open transaction to be called stale")
    assert [(k, s_) for k, s_, _ in rows] == [("stale_node", "wedged")]
    assert rows[0][2].startswith("transaction open since ")
    conn.execute("ROLLBACK")
    assert db.sql("SELECT * FROM dispatch.health()") == []
    conn.close()


# -- NOTIFY payloads -----------------------------------------------------------------

def test_submit_notifies_the_model_channel_once_per_transaction(db):
    conn, session = node(db, "notified", ["m-n1", "m-n2"], 8)
    ch1, ch2 = session[3]
    assert ch1 == db.one("SELECT dispatch.model_channel('m-n1')")
    listener = Listener(conn, ch1, ch2)

    with db.connect(autocommit=False) as gw:
        for _ in range(5):
            gw.execute("SELECT dispatch.submit('m-n1', NULL, '{}')")
        submit_many(gw, [{"model": "m-n1", "payload": {}}, {"model": "m-n2", "payload": {}},
                         {"model": "m-n1", "payload": {}}])
        gw.commit()
    got = listener.drain_through_sentinel(db, ch1)
    assert sorted((n.channel, n.payload) for n in got) == sorted([(ch1, ""), (ch2, "")]), \
        "one NOTIFY per model channel per submitting transaction"

    db.sql("SELECT dispatch.submit('m-n2', NULL, '{}')")
    got = listener.drain_through_sentinel(db, ch1)
    assert [(n.channel, n.payload) for n in got] == [(ch2, "")], "the next transaction notifies again"

    # A refused submit notifies nobody.
    with pytest.raises(psycopg.Error):
        db.sql("SELECT dispatch.submit('m-n1', NULL, NULL)")
    assert listener.drain_through_sentinel(db, ch1) == []
    conn.close()


# The daemon settles with exchange when it may lease and with settle (023) when it
# knows its queue is empty: both tell the waiting gateways the same way.
SETTLE_CALLS = {"exchange": "SELECT kind FROM dispatch.exchange(%s, 0)", "settle": "SELECT kind FROM dispatch.settle(%s)"}


@pytest.mark.parametrize("call", sorted(SETTLE_CALLS))
def test_completion_notifies_the_reply_channel_split_past_350_ids(db, call):
    conn, _ = node(db, "replier", ["m-r"], 1000)
    watcher = Listener(db.connect(), "gw_reply", "gw_other")
    ids = submit_many(db, [{"model": "m-r", "payload": {"n": i}} for i in range(400)], "gw_reply")
    other = submit_many(db, [{"model": "m-r", "payload": {"n": "other"}}], "gw_other")
    # Submitting tells no reply channel anything.
    assert watcher.drain_through_sentinel(db, "gw_reply") == []

    jobs = conn.execute("SELECT id, attempt FROM dispatch.lease(1000)").fetchall()
    assert len(jobs) == 401
    outcomes = [{"id": i, "attempt": a, "result": {"ok": True}} for i, a in jobs]
    rows = conn.execute(SETTLE_CALLS[call], (json.dumps(outcomes),)).fetchall()
    assert rows == []

    got = watcher.drain_through_sentinel(db, "gw_reply")
    reply = [n.payload for n in got if n.channel == "gw_reply"]
    assert len(reply) == 2, "401 finished ids on two channels: 350 + 50 on gw_reply"
    chunks = [[int(x) for x in p.split(",")] for p in reply]
    assert sorted(len(c) for c in chunks) == [50, 350]
    assert all(len(p.encode()) < 8000 for p in reply)
    assert sorted(i for c in chunks for i in c) == sorted(ids)
    assert [(n.channel, n.payload) for n in got if n.channel == "gw_other"] == [("gw_other", str(other[0]))], \
        "a gateway hears only about its own jobs"
    conn.close()
    watcher.conn.close()


def test_stream_pieces_reach_the_reply_channel_each_job_in_sent_order(db):
    """dispatch.stream sends one NOTIFY per piece of a held job on its reply channel,
    S<id>:<seq>:<m|e>:<token>:<data>, each job's pieces in the order sent (the calls
    interleave jobs, as the daemon's do); pieces of a job the node does not hold
    send nothing, and the answer is one row per (id, attempt) in id order."""
    conn, _ = node(db, "relay", ["m-s"], 4)
    watcher = Listener(db.connect(), "gw_stream")
    a, b = submit_many(db, [{"model": "m-s", "payload": {}, "stream_token": "tokA1234"},
                            {"model": "m-s", "payload": {}, "stream_token": "tokB1234"}], "gw_stream")
    assert sorted(r[0] for r in conn.execute("SELECT id FROM dispatch.lease(2)").fetchall()) == [a, b]
    stale = b + 1000
    pieces = [(b, 1, 0, True, "b0"), (a, 1, 0, True, "a0"), (stale, 1, 0, False, "x"), (a, 1, 1, True, "a1"),
              (b, 1, 1, False, "b1"), (a, 1, 2, False, 'a2 "quoted": ok')]
    rows = conn.execute("SELECT id, attempt, ok FROM dispatch.stream(%s)", (json.dumps(
        [{"id": i, "attempt": t, "seq": q, "more": m, "data": d} for i, t, q, m, d in pieces]),)).fetchall()
    assert rows == [(a, 1, True), (b, 1, True), (stale, 1, False)]
    got = [n.payload for n in watcher.drain_through_sentinel(db, "gw_stream")]
    assert [p for p in got if p.startswith("S%d:" % a)] == [
        "S%d:0:m:tokA1234:a0" % a, "S%d:1:m:tokA1234:a1" % a, 'S%d:2:e:tokA1234:a2 "quoted": ok' % a]
    assert [p for p in got if p.startswith("S%d:" % b)] == ["S%d:0:m:tokB1234:b0" % b, "S%d:1:e:tokB1234:b1" % b]
    assert len(got) == 5
    conn.close()
    watcher.conn.close()


def test_cancel_of_a_leased_job_notifies_the_node_channel(db):
    conn, session = node(db, "aborter", ["m-c"], 4)
    node_channel = session[2]
    assert node_channel == "dispatch_n_%d" % session[0]
    listener = Listener(conn, node_channel)
    queued, leased = submit_many(db, [{"model": "m-c", "payload": {}}, {"model": "m-c", "payload": {}, "priority": 5}])
    assert conn.execute("SELECT id FROM dispatch.lease(1)").fetchall() == [(leased,)]

    assert db.one("SELECT dispatch.cancel(%s, 'client went away')", (queued,)) == "cancelled"
    assert listener.drain_through_sentinel(db, node_channel) == [], "a queued job's cancel tells no node"

    assert db.one("SELECT dispatch.cancel(%s, 'client went away')", (leased,)) == "cancelled"
    got = listener.drain_through_sentinel(db, node_channel)
    assert [(n.channel, n.payload) for n in got] == [(node_channel, str(leased))]
    with pytest.raises(psycopg.Error) as e:
        conn.execute("SELECT dispatch.complete(%s, 1, '{}')", (leased,))
    assert e.value.sqlstate == "PD004"
    conn.close()


def test_a_200_character_model_name_maps_to_a_channel_one_can_listen_on(db):
    model = ("meta-llama/Llama-3.1-70B-Instruct:q4_K_M/модель/模型/ünïcødé:" * 5)[:200]
    assert len(model) == 200 and len(model.encode()) > 200
    conn, session = node(db, "longname", [model], 2)
    channel = session[3][0]
    assert channel == db.one("SELECT dispatch.model_channel(%s)", (model,))
    assert re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", channel)
    listener = Listener(conn, channel)
    job = db.one("SELECT dispatch.submit(%s, NULL, '{}')", (model,))
    listener.until(lambda got: any(n.channel == channel for n in got), what="the model channel")
    assert conn.execute("SELECT id, model FROM dispatch.lease(1)").fetchall() == [(job, model)]
    conn.close()


# -- migrations ------------------------------------------------------------------------

def migrate(pg, dbname):
    return subprocess.run(["sh", os.path.join(ROOT, "sql", "migrate.sh")], env=pg.env(dbname),
                          capture_output=True, text=True, timeout=120)


def schema_dump(pg, dbname):
    out = subprocess.run([os.path.join(PG_BIN, "pg_dump"), "--schema-only", "-d", pg.dsn(dbname)],
                         capture_output=True, text=True, check=True).stdout
    # pg_dump brackets its output with \restrict <random key>: not a catalog object.
    return "\n".join(line for line in out.splitlines() if not re.match(r"\\(un)?restrict ", line))


def test_migrating_twice_applies_nothing_and_changes_nothing(pg, db):
    before = schema_dump(pg, db.name)
    applied = db.sql("SELECT version, name, applied_at FROM dispatch.migrations ORDER BY version")
    roles = db.sql("SELECT rolname FROM pg_roles WHERE rolname LIKE 'dispatch%' ORDER BY 1")
    assert "CREATE FUNCTION dispatch.exchange" in before

    r = migrate(pg, db.name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "migrate: 0 migration(s) applied"
    assert r.stderr == ""

    assert schema_dump(pg, db.name) == before
    assert db.sql("SELECT version, name, applied_at FROM dispatch.migrations ORDER BY version") == applied
    assert db.sql("SELECT rolname FROM pg_roles WHERE rolname LIKE 'dispatch%' ORDER BY 1") == roles


def test_two_migrators_in_parallel_apply_each_migration_once(pg):
    files = sorted(f for f in os.listdir(os.path.join(ROOT, "sql")) if re.match(r"\d{3}_.*\.sql$", f))
    for round_ in range(3):
        name = "pgd_mig_%d_%d" % (os.getpid(), round_)
        pg.psql('DROP DATABASE IF EXISTS "%s"' % name)
        pg.psql('CREATE DATABASE "%s"' % name)
        try:
            env = pg.env(name)
            procs = [subprocess.Popen(["sh", os.path.join(ROOT, "sql", "migrate.sh")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for _ in range(2)]
            outs = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
            for out, err, rc in outs:
                assert rc == 0, "a parallel migrator failed: %s" % err
            applying = [line for out, _, _ in outs for line in out.splitlines() if line.startswith("applying ")]
            assert sorted(applying) == ["applying %s" % f[:-4] for f in files], "each migration applied once"
            rows = pg.psql("SELECT version || ':' || name FROM dispatch.migrations ORDER BY version", dbname=name)
            assert rows.split() == ["%d:%s" % (int(f[:3]), f[4:-4]) for f in files]
        finally:
            pg.psql('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name, check=False)


# -- time: lease expiry, backoff ---------------------------------------------------------

def test_lease_expiry_takes_the_job_back_then_fails_it(db):
    db.sql("SELECT dispatch.set_setting('lease_seconds', 1)")
    a, _ = node(db, "exp-a", ["m-e"], 4)
    b, _ = node(db, "exp-b", ["m-e"], 4)
    watcher = Listener(db.connect(), "gw_exp")
    job = db.one("SELECT dispatch.submit('m-e', NULL, '{}', 0, NULL, 2, NULL, 'gw_exp')")

    first = a.execute("SELECT id, attempt, lease_expires_at FROM dispatch.lease(1)").fetchall()
    assert [(r[0], r[1]) for r in first] == [(job, 1)]
    assert b.execute("SELECT id FROM dispatch.lease(4)").fetchall() == [], "a live lease is not taken back"

    def expired():
        return db.one("SELECT lease_expires_at < now() FROM dispatch.jobs WHERE id = %s", (job,))
    wait_for(expired, timeout=10, what="the first lease to run out")
    rows = b.execute("SELECT kind, id, attempt FROM dispatch.exchange(NULL, 4)").fetchall()
    assert rows[0] == ("job", job, 2), rows
    assert db.sql("SELECT state, attempt, leased_by = (SELECT id FROM dispatch.nodes WHERE name = 'exp-b'), "
                  "error->>'code' FROM dispatch.jobs WHERE id = %s", (job,)) == [("leased", 2, True, "lease_expired")]
    assert sqlstate_of(lambda: a.execute("SELECT dispatch.complete(%s, 1, '{}')", (job,))) == "PD004"

    wait_for(expired, timeout=10, what="the second lease to run out")
    assert a.execute("SELECT id FROM dispatch.lease(4)").fetchall() == []
    assert db.sql("SELECT state, attempt, error->>'code', finished_at IS NOT NULL, lease_expires_at "
                  "FROM dispatch.jobs WHERE id = %s", (job,)) == [("failed", 2, "lease_expired", True, None)]
    got = watcher.until(lambda got: any(n.channel == "gw_exp" for n in got), what="the waiter to be told")
    assert [n.payload for n in got] == [str(job)]
    assert sqlstate_of(lambda: b.execute("SELECT dispatch.complete(%s, 2, '{}')", (job,))) == "PD004"
    for c in (a, b, watcher.conn):
        c.close()


def test_retryable_fail_backs_off_as_configured_and_next_wake_reports_it(db):
    db.sql("SELECT dispatch.set_setting('retry_base_ms', 1500)")
    db.sql("SELECT dispatch.set_setting('retry_factor', 2)")
    db.sql("SELECT dispatch.set_setting('retry_cap_ms', 2000)")
    conn, _ = node(db, "retrier", ["m-b"], 4)
    job = db.one("SELECT dispatch.submit('m-b', NULL, '{}', 0, NULL, 3)")
    assert conn.execute("SELECT id, attempt FROM dispatch.lease(1)").fetchall() == [(job, 1)]

    def fail_and_read(attempt):
        with conn.transaction():
            conn.execute("SELECT dispatch.fail(%s, %s, '{\"code\": \"provider_5xx\"}', true)", (job, attempt))
            now = conn.execute("SELECT now()").fetchone()[0]
            wake = conn.execute("SELECT dispatch.next_wake()").fetchone()[0]
            wake_row = conn.execute("SELECT kind, lease_expires_at FROM dispatch.exchange(NULL, 1)").fetchall()
        run_at = db.one("SELECT run_at FROM dispatch.jobs WHERE id = %s", (job,))
        return now, run_at, wake, wake_row

    now, run_at, wake, wake_row = fail_and_read(1)
    assert (run_at - now).total_seconds() == 1.5, "backoff after attempt 1 = retry_base_ms"
    assert wake == run_at, "next_wake reports the retry's run_at"
    assert wake_row == [("wake", run_at)], "not due yet: exchange leases nothing and says when to wake"
    assert db.one("SELECT state FROM dispatch.jobs WHERE id = %s", (job,)) == "queued"

    def leased_again():
        return conn.execute("SELECT id, attempt, now() FROM dispatch.lease(1)").fetchall()
    rows = wait_for(leased_again, timeout=10, interval=0.05, what="the retry to become due")
    assert [(r[0], r[1]) for r in rows] == [(job, 2)]
    assert rows[0][2] >= run_at, "not leased before its run_at"

    now, run_at, wake, _ = fail_and_read(2)
    assert (run_at - now).total_seconds() == 2.0, "1500 x 2 = 3000 ms, capped at retry_cap_ms = 2000"
    assert wake == run_at
    conn.close()


# -- the deep queue -------------------------------------------------------------------------

def _explained(notices):
    """(duration ms, plan JSON) of each auto_explain notice."""
    out = []
    for text in notices:
        m = re.match(r"duration: ([0-9.]+) ms\s+plan:\s*(\{.*\})\s*$", text, re.S)
        if m:
            out.append((float(m.group(1)), json.loads(m.group(2))))
    return out


def _nodes(plan):
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def test_deep_queue_lease_uses_the_index_and_few_buffers(db):
    started = time.monotonic()
    db.sql("INSERT INTO dispatch.jobs (model, endpoint, payload, priority, max_attempts) "
           "SELECT 'deep-' || (g % 20), '/v1/chat/completions', '{\"n\": 1}', g % 3, 3 "
           "FROM generate_series(1, 1000000) g")
    db.sql("VACUUM ANALYZE dispatch.jobs")
    db.enroll("deep")
    role = db.one("SELECT role_name FROM dispatch.nodes WHERE name = 'deep'")

    notices = []
    with db.connect() as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("LOAD 'auto_explain'")
        for setting, value in (("log_min_duration", "0"), ("log_analyze", "on"), ("log_buffers", "on"),
                               ("log_timing", "on"), ("log_nested_statements", "on"), ("log_format", "json"),
                               ("log_level", "notice")):
            conn.execute("SET auto_explain.%s = %s" % (setting, value))
        conn.execute('SET SESSION AUTHORIZATION "%s"' % role)
        conn.execute("SELECT dispatch.register('llamacpp', ARRAY['deep-3', 'deep-7'], 10000)")

        totals = []
        for _ in range(8):  # exchange runs on generic plans only: the first call must already be good
            notices.clear()
            plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT * FROM dispatch.lease(4)").fetchone()[0]
            top = plan[0]
            totals.append((top["Execution Time"], top["Plan"]["Shared Hit Blocks"] + top["Plan"]["Shared Read Blocks"]))
            picks = [(ms, p) for ms, p in _explained(notices) if "ORDER BY c.priority DESC" in p.get("Query Text", "")]
            assert picks, "auto_explain showed no plan of the lease statement"
            for ms, p in picks:
                scans = list(_nodes(p["Plan"]))
                assert any(n.get("Index Name") == "jobs_queued" for n in scans), json.dumps(p)[:3000]
                assert not any(n.get("Node Type") == "Seq Scan" for n in scans), json.dumps(p)[:3000]
                assert ms < 50, "lease statement took %.1f ms" % ms
        leased = db.one("SELECT count(*) FROM dispatch.jobs WHERE state = 'leased'")
        assert leased == 32
        # (The first call also reads the catalog and fills the plan cache.)
        for ms, buffers in totals:
            assert buffers < 2000, totals
            assert ms < 50, totals
        assert all(buffers < 500 for _, buffers in totals[1:]), totals

        # The wake computation (a node whose slots are full still asks when to look)
        # must not walk the deep queue either: scanning the ready jobs of two models
        # for a future run_at costs ~1100 buffers here, the jobs_delayed index ~20.
        conn.execute("SELECT dispatch.report('healthy', NULL, 32)")
        for query in ("SELECT * FROM dispatch.exchange(NULL, 4)", "SELECT dispatch.next_wake()"):
            for _ in range(2):
                plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query).fetchone()[0][0]
                buffers = plan["Plan"]["Shared Hit Blocks"] + plan["Plan"]["Shared Read Blocks"]
                assert buffers < 200, (query, buffers)
                assert plan["Execution Time"] < 50, (query, plan["Execution Time"])
    assert time.monotonic() - started < 60
