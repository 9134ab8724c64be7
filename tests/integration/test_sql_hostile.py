"""Hostile input at the SQL API: injection attempts through every text field are
stored verbatim and never executed, and a node's login role (dispatch_daemon) tries
every privilege escape there is. Each is refused, or harmless and asserted as such.

What the tests document (see the comments at each):
  * advisory locks are not access-controlled: a node role can take another node's
    liveness key while that node is down, which makes it look live and makes its
    daemon's next register fail with PD006 (naming the forger's role);
  * any role may NOTIFY any channel: a forged reply notification only makes the
    gateway re-read dispatch.results, so a waiting client still gets its own answer,
    and a forged stream piece lacks the request's secret stream token, so the
    gateway drops it (a role that LISTENs on the channel sees the token, though);
  * a node declares the models it serves itself (register/report): it leases only
    those, but nothing stops it from declaring any model."""
import json
import os
import select
import time

import psycopg
import pytest

from conftest import http_get, wait_for
from test_gateway import CHAT, answer_text, reply_channel, chat_body, gateway, gateway_dsn, request, workers  # noqa: F401

INJECTIONS = [
    "x'); DROP TABLE dispatch.jobs; --",
    "$$; DROP TABLE dispatch.jobs; $$",
    "$x$; DROP SCHEMA dispatch CASCADE; $x$",
    "%I %L %s %1$s %% %",
    "'; SELECT pg_sleep(10); --",
    "\" OR 1=1; DELETE FROM dispatch.nodes; --",
    "'; NOTIFY dispatch_x, 'forged'; --",
    "\\'; COMMIT; DROP TABLE dispatch.settings; --",
    "E'\\x27'); TRUNCATE dispatch.jobs; --",
    "`id`; $(id); ${HOME}",
    "\u202eevil\u200b \u00e9\u4e16\U0001F600",
    "}\"]}, {\"model\": \"other\"}], \"x\": [{\"a\": \"",
]
SQLSTATE_DENIED = "42501"


def sqlstate_of(conn, query, params=None):
    """The SQLSTATE a statement fails with (None when it succeeds); the connection
    stays usable (autocommit)."""
    try:
        conn.execute(query, params)
        return None
    except psycopg.Error as e:
        return e.sqlstate


def notifications(conn, until, timeout=5.0):
    """Payloads received on conn (LISTENing) until until(payloads) holds or the
    timeout passes; returns them all."""
    got = []
    deadline = time.monotonic() + timeout
    while not until(got):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([conn.fileno()], [], [], left)
        if r:
            conn.pgconn.consume_input()
            while True:
                n = conn.pgconn.notifies()
                if n is None:
                    break
                got.append(n.extra.decode())
    return got


def schema_fingerprint(db):
    return db.sql("SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                  "WHERE n.nspname = 'dispatch' ORDER BY 1") + \
        db.sql("SELECT rolname FROM pg_roles ORDER BY 1") + \
        db.sql("SELECT key, value FROM dispatch.settings ORDER BY 1")


@pytest.fixture
def nodes(db):
    """Two registered nodes, a (model ma) and b (model mb), and a gateway session."""
    conns = []

    def node(name, models, **kw):
        c = psycopg.connect(db.enroll(name), autocommit=True)
        conns.append(c)
        c.execute("SELECT * FROM dispatch.register('llamacpp', %s, 4, %s, %s)",
                  (models, kw.get("region"), json.dumps(kw.get("labels", {}))))
        return c

    class N:
        pass

    n = N()
    n.node = node
    n.a = node("a", ["ma"])
    n.b = node("b", ["mb"])
    n.gw = psycopg.connect(gateway_dsn(db), autocommit=True)
    conns.append(n.gw)
    yield n
    for c in conns:
        c.close()


# ---------------------------------------------------------------------------
# Injection: stored verbatim, never executed
# ---------------------------------------------------------------------------

def test_injection_through_every_text_field_is_stored_verbatim(db, nodes):
    before = schema_fingerprint(db)
    models = [s[:256] for s in INJECTIONS]
    # Region (<= 64 characters) and labels (keys and values) of a node.
    for i, inj in enumerate(INJECTIONS):
        c = psycopg.connect(db.enroll("inj%d" % i), autocommit=True)
        c.execute("SELECT * FROM dispatch.register('llamacpp', %s, 4, %s, %s)",
                  (models, inj[:64], json.dumps({inj: inj, "k": [inj]})))
        row = db.sql("SELECT models, region, labels::text FROM dispatch.nodes WHERE name = %s", ("inj%d" % i,))[0]
        assert row[0] == models and row[1] == inj[:64]
        assert json.loads(row[2]) == {inj: inj, "k": [inj]}
        # Health reason.
        c.execute("SELECT * FROM dispatch.report('degraded', %s, 4, NULL)", (inj,))
        assert db.one("SELECT health_reason FROM dispatch.nodes WHERE name = %s", ("inj%d" % i,)) == inj
        c.execute("SELECT * FROM dispatch.report('healthy', NULL, 4, NULL)")
        if i:
            c.close()
        else:
            worker = c

    channel = "dispatch_r_hostile"
    listener = psycopg.connect(db.dsn, autocommit=True)
    listener.execute("LISTEN %s" % channel)
    for i, inj in enumerate(INJECTIONS):
        model = models[i]
        payload = {"model": model, "messages": [{"role": "user", "content": inj}], inj: inj}
        key = inj[:255]
        job = nodes.gw.execute("SELECT dispatch.submit(%s, '/v1/chat/completions', %s, 0, '60 s', NULL, %s, %s)",
                               (model, json.dumps(payload), key, channel)).fetchone()[0]
        row = db.sql("SELECT model, payload::text, idempotency_key, reply_channel FROM dispatch.jobs WHERE id = %s",
                     (job,))[0]
        assert row[0] == model and json.loads(row[1]) == payload and row[2] == key and row[3] == channel
        # The same key again is a replay (the same job), not an injection.
        again = nodes.gw.execute("SELECT dispatch.submit(%s, '/v1/chat/completions', %s, 0, '60 s', NULL, %s, %s)",
                                 (model, json.dumps(payload), key, channel)).fetchone()[0]
        assert again == job
        # Reused for a different request: refused with the key in the message, verbatim.
        with pytest.raises(psycopg.Error) as e:
            nodes.gw.execute("SELECT dispatch.submit(%s, '/v1/chat/completions', '{}', 0, '60 s', NULL, %s, %s)",
                             (model, key, channel))
        assert e.value.sqlstate == "PD008" and key in e.value.diag.message_primary
        # Unknown model: the format() specifiers in the name are data, not a format.
        with pytest.raises(psycopg.Error) as e:
            nodes.gw.execute("SELECT dispatch.submit(%s, '/v1/chat/completions', '{}')", ("zz" + model[:250],))
        assert e.value.sqlstate == "PD001" and ("zz" + model[:250]) in e.value.diag.message_primary

        # The node leases it, gets the payload as sent, and completes it with a result
        # full of the same text; the result comes back verbatim.
        rows = worker.execute("SELECT id, attempt, payload::text FROM dispatch.lease(10)").fetchall()
        assert [r[0] for r in rows] == [job] and json.loads(rows[0][2]) == payload
        result = {"choices": [{"message": {"content": inj}}], inj: [inj]}
        worker.execute("SELECT dispatch.complete(%s, %s, %s)", (job, rows[0][1], json.dumps(result)))
        got = nodes.gw.execute("SELECT state, result::text FROM dispatch.results(ARRAY[%s]::bigint[])",
                               (job,)).fetchone()
        assert got[0] == "succeeded" and json.loads(got[1]) == result

    # Failures and cancels: error messages and reasons verbatim.
    for inj in INJECTIONS:
        job = nodes.gw.execute("SELECT dispatch.submit(%s, '/v1/chat/completions', '{}', 0, '60 s')",
                               (models[0],)).fetchone()[0]
        (jid, attempt), = worker.execute("SELECT id, attempt FROM dispatch.lease(1)").fetchall()
        worker.execute("SELECT dispatch.fail(%s, %s, %s, false)",
                       (jid, attempt, json.dumps({"code": inj, "message": inj, "body": inj})))
        assert db.one("SELECT error::text FROM dispatch.jobs WHERE id = %s", (jid,)) == \
            json.dumps({"body": inj, "code": inj, "message": inj}, ensure_ascii=False)
        job = nodes.gw.execute("SELECT dispatch.submit(%s, '/v1/chat/completions', '{}', 0, '60 s')",
                               (models[0],)).fetchone()[0]
        assert nodes.gw.execute("SELECT dispatch.cancel(%s, %s)", (job, inj)).fetchone()[0] == "cancelled"
        assert db.one("SELECT error->>'message' FROM dispatch.jobs WHERE id = %s", (job,)) == inj

    # Fields with a fixed shape refuse what does not fit it (22023), and run nothing.
    for inj in INJECTIONS:
        for query, params in (
                ("SELECT dispatch.submit('ma', %s, '{}')", (inj,)),                       # endpoint
                ("SELECT dispatch.submit('ma', '/v1/x', '{}', 0, NULL, NULL, NULL, %s)", (inj,)),  # reply channel
                ("SELECT * FROM dispatch.submit_many('[]', %s)", (inj,))):
            assert sqlstate_of(nodes.gw, query, params) == "22023", (query, inj)
        assert sqlstate_of(worker, "SELECT * FROM dispatch.register(%s, '{ma}')", (inj,)) == "22023"
        assert sqlstate_of(worker, "SELECT * FROM dispatch.report(%s)", (inj,)) == "22023"
        assert sqlstate_of(db.connect(), "SELECT dispatch.enroll(%s)", (inj,)) == "22023"
        assert sqlstate_of(db.connect(), "SELECT dispatch.drain(%s)", (inj,)) == "PD007"
        assert sqlstate_of(db.connect(), "SELECT dispatch.set_setting(%s, 1)", (inj,)) is not None

    # Operator side: API key names, capacity overrides.
    with db.connect() as admin:
        for inj in INJECTIONS:
            name = inj[:100]
            key = admin.execute("SELECT dispatch.create_api_key(%s)", (name,)).fetchone()[0]
            assert admin.execute("SELECT name FROM dispatch.api_keys() WHERE name = %s", (name,)).fetchone()
            assert nodes.gw.execute("SELECT dispatch.check_api_key(%s)", (key,)).fetchone()[0] is True
            assert nodes.gw.execute("SELECT dispatch.check_api_key(%s)", (inj,)).fetchone()[0] is False
            assert admin.execute("SELECT dispatch.revoke_api_key(%s)", (name,)).fetchone()[0] is True
            admin.execute("SELECT dispatch.set_capacity(%s, 3)", (models[0],))
            assert db.one("SELECT capacity FROM dispatch.capacity_overrides WHERE model = %s", (models[0],)) == 3
            admin.execute("SELECT dispatch.clear_capacity(%s)", (models[0],))

    # A stream token is letters and digits only: anything else is refused (22023), and
    # nothing of it is stored.
    for inj in INJECTIONS:
        rows = nodes.gw.execute("SELECT id, sqlstate FROM dispatch.submit_many(%s::json, %s)",
                                (json.dumps([{"model": models[0], "payload": {}, "stream_token": inj}]),
                                 channel)).fetchall()
        assert rows == [(None, "22023")], (inj, rows)
    assert db.one("SELECT count(*) FROM dispatch.jobs WHERE stream_token IS NOT NULL") == 0

    # Text bound for a channel: a streamed piece full of quotes arrives as it was sent,
    # with the job's stream token.
    (job, state), = nodes.gw.execute(
        "SELECT id, sqlstate FROM dispatch.submit_many(%s::json, %s)",
        (json.dumps([{"model": models[0], "payload": {}, "timeout_ms": 60000, "stream_token": "Tok3nOfTheGateway"}]),
         channel)).fetchall()
    assert state is None
    (jid, attempt), = worker.execute("SELECT id, attempt FROM dispatch.lease(1)").fetchall()
    assert jid == job
    piece = "'); NOTIFY dispatch_x; -- \" $$ %s %I \u00e9"
    worker.execute("SELECT * FROM dispatch.stream(%s)",
                   (json.dumps([{"id": jid, "attempt": attempt, "seq": 0, "more": False, "data": piece}]),))
    got = notifications(listener, lambda got: any(p.startswith("S") for p in got))
    assert "S%d:0:e:Tok3nOfTheGateway:%s" % (jid, piece) in got, got
    listener.close()
    worker.close()

    # Nothing ran: same tables, roles (but the inj* node roles) and settings.
    after = schema_fingerprint(db)
    assert [r for r in after if not (len(r) == 1 and str(r[0]).startswith("dispatch_node_inj"))] == before
    assert db.one("SELECT to_regclass('dispatch.jobs') IS NOT NULL")


# ---------------------------------------------------------------------------
# The daemon role's privilege escapes
# ---------------------------------------------------------------------------

DENIED_FOR_NODE = [
    # Tables, directly.
    "SELECT * FROM dispatch.jobs",
    "SELECT * FROM dispatch.nodes",
    "SELECT * FROM dispatch.api_keys",
    "SELECT * FROM dispatch.settings",
    "SELECT * FROM dispatch.capacity_overrides",
    "UPDATE dispatch.jobs SET state = 'succeeded'",
    "DELETE FROM dispatch.jobs",
    "INSERT INTO dispatch.settings VALUES ('x', 1, 0, 2, 'x')",
    "COPY dispatch.jobs TO STDOUT",
    "TRUNCATE dispatch.jobs",
    "CREATE TABLE dispatch.mine (x int)",
    "CREATE FUNCTION dispatch.exchange(int) RETURNS int LANGUAGE sql AS 'SELECT 1'",
    # Operator functions.
    "SELECT dispatch.enroll('evil')",
    "SELECT dispatch.revoke('b')",
    "SELECT dispatch.drain('b')",
    "SELECT dispatch.disable('b')",
    "SELECT dispatch.enable('b')",
    "SELECT dispatch.set_setting('lease_seconds', 1)",
    "SELECT dispatch.set_capacity('ma', 1000)",
    "SELECT dispatch.clear_capacity('ma')",
    "SELECT dispatch.create_api_key('evil')",
    "SELECT dispatch.revoke_api_key('x')",
    "SELECT * FROM dispatch.api_keys()",
    "SELECT * FROM dispatch.nodes()",
    "SELECT * FROM dispatch.queues()",
    "SELECT * FROM dispatch.settings()",
    "SELECT dispatch.prune(0)",
    "SELECT * FROM dispatch.requeue(ARRAY[1]::bigint[])",
    # Gateway functions (a node cannot read results or submit).
    "SELECT * FROM dispatch.results(ARRAY[1]::bigint[])",
    "SELECT dispatch.submit('mb', '/v1/x', '{}')",
    "SELECT * FROM dispatch.submit_many('[]')",
    "SELECT dispatch.cancel(1)",
    "SELECT dispatch.check_api_key('x')",
    "SELECT * FROM dispatch.health()",
    "SELECT * FROM dispatch.metrics()",
    "SELECT * FROM dispatch.models()",
    "SELECT * FROM dispatch.capacity()",
    # Internal functions.
    "SELECT dispatch._setting('lease_seconds')",
    "SELECT dispatch._session_node(false)",
    "SELECT dispatch._hand_back(2)",
    "SELECT * FROM dispatch._take_back_expired(NULL, 1000)",
    "SELECT dispatch._notify_replies(ARRAY['dispatch_r_x'], ARRAY[1]::bigint[])",
    "SELECT dispatch._notify_models(ARRAY['mb'])",
    "SELECT dispatch._set_admin_state('b', 'disabled')",
    "SELECT dispatch._node_by_name('b')",
    "SELECT * FROM dispatch._live_nodes()",
    "SELECT dispatch._node_live(2, 1)",
    "SELECT * FROM dispatch._serving_nodes()",
    "SELECT dispatch._settle_one(1, 1, '{}')",
    "SELECT dispatch._fields_problem('{}', NULL)",
    "SELECT dispatch._check_text('x', 'y', 1, true)",
    "SELECT dispatch._lock_class()",
    "SELECT * FROM dispatch._capacity('mb')",
    # Becoming someone else.
    "SET ROLE dispatch_admin",
    "SET ROLE dispatch_gateway",
    "SET ROLE postgres",
    "SET SESSION AUTHORIZATION postgres",
    "SET SESSION AUTHORIZATION dispatch_node_b",
    "GRANT dispatch_admin TO CURRENT_USER",
    "ALTER ROLE CURRENT_USER SUPERUSER",
    "ALTER ROLE CURRENT_USER CREATEROLE",
    "CREATE ROLE evil LOGIN SUPERUSER",
    # Escapes through the server.
    "SELECT pg_read_file('/etc/passwd')",
    "COPY (SELECT 1) TO '/tmp/pgd_evil'",
    "SELECT lo_import('/etc/passwd')",
    "CREATE EXTENSION IF NOT EXISTS dblink",
]


def test_node_role_privilege_escapes_are_refused(db, nodes):
    a = nodes.a
    for query in DENIED_FOR_NODE:
        state = sqlstate_of(a, query)
        assert state == SQLSTATE_DENIED, "%s: expected %s, got %s" % (query, SQLSTATE_DENIED, state)
    # Ending the gateway's or another node's session: not allowed either.
    pid_b = nodes.b.info.backend_pid
    assert sqlstate_of(a, "SELECT pg_terminate_backend(%s)" % pid_b) == SQLSTATE_DENIED
    assert sqlstate_of(a, "SELECT pg_cancel_backend(%s)" % pid_b) == SQLSTATE_DENIED
    assert nodes.b.execute("SELECT 1").fetchone()[0] == 1


def test_node_cannot_touch_another_nodes_job_or_lease_other_models(db, nodes):
    a, b = nodes.a, nodes.b
    job = nodes.gw.execute("SELECT dispatch.submit('mb', '/v1/chat/completions', '{\"model\":\"mb\"}', 0, "
                           "'60 s', NULL, NULL, 'dispatch_r_gw')").fetchone()[0]
    # a serves ma only: it leases nothing of mb, however it asks.
    assert a.execute("SELECT * FROM dispatch.lease(100)").fetchall() == []
    assert [r[0] for r in a.execute("SELECT kind FROM dispatch.exchange(NULL, 100)").fetchall()] == ["wake"]
    (jid, attempt), = b.execute("SELECT id, attempt FROM dispatch.lease(1)").fetchall()
    assert jid == job

    # a tries to settle, extend, stream or hand back b's job: fenced, nothing changes.
    assert sqlstate_of(a, "SELECT dispatch.complete(%s, %s, '{\"forged\": true}')" % (jid, attempt)) == "PD004"
    assert sqlstate_of(a, "SELECT dispatch.fail(%s, %s, '{\"code\": \"x\"}', false)" % (jid, attempt)) == "PD004"
    rows = a.execute("SELECT kind, id FROM dispatch.exchange(%s, 0)",
                     (json.dumps([{"id": jid, "attempt": attempt, "result": {"forged": True}}]),)).fetchall()
    assert rows == [("stale", jid)]
    assert a.execute("SELECT ok FROM dispatch.extend(ARRAY[%s]::bigint[], ARRAY[%s])", (jid, attempt)).fetchone() \
        == (False,)
    # A streamed piece for b's job is refused (ok = false) and notifies nobody.
    listener = psycopg.connect(db.dsn, autocommit=True)
    listener.execute("LISTEN dispatch_r_gw")
    assert a.execute("SELECT ok FROM dispatch.stream(%s)", (json.dumps(
        [{"id": jid, "attempt": attempt, "seq": 0, "more": False, "data": "forged"}]),)).fetchone() == (False,)
    db.sql("NOTIFY dispatch_r_gw, 'marker'")   # from another session, after the stream call
    got = notifications(listener, lambda got: "marker" in got)
    assert got == ["marker"], got   # the marker came, and nothing before it
    listener.close()
    # a's deregister hands back only its own jobs.
    assert a.execute("SELECT dispatch.deregister()").fetchone()[0] == 0
    assert db.sql("SELECT state, leased_by, attempt, result FROM dispatch.jobs WHERE id = %s", (jid,)) == \
        [("leased", db.one("SELECT id FROM dispatch.nodes WHERE name = 'b'"), attempt, None)]
    # b finishes its own job normally.
    b.execute("SELECT dispatch.complete(%s, %s, '{\"ok\": true}')", (jid, attempt))
    assert db.one("SELECT state FROM dispatch.jobs WHERE id = %s", (jid,)) == "succeeded"

    # Documented: the models a node serves are its own declaration (register/report).
    # Declaring mb lets a lease mb's work: an operator trusts an enrolled node with
    # the models it claims (there is no per-node allowlist).
    a.execute("SELECT * FROM dispatch.register('llamacpp', ARRAY['ma', 'mb'], 4)")
    job2 = nodes.gw.execute("SELECT dispatch.submit('mb', '/v1/x', '{}', 0, '60 s')").fetchone()[0]
    assert [r[0] for r in a.execute("SELECT id FROM dispatch.lease(1)").fetchall()] == [job2]


def test_temp_objects_cannot_shadow_what_the_functions_use(db, nodes):
    """SECURITY DEFINER functions run with search_path = pg_catalog, pg_temp: a node's
    temporary tables and functions named like what they use change nothing."""
    a = nodes.a
    a.execute("CREATE TEMP TABLE jobs (id bigint, state text)")
    a.execute("CREATE TEMP TABLE settings (key text, value numeric)")
    a.execute("CREATE TEMP TABLE pg_locks (locktype text)")
    a.execute("CREATE FUNCTION pg_temp.now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT 'epoch'::timestamptz $$")
    a.execute("CREATE FUNCTION pg_temp.md5(text) RETURNS text LANGUAGE sql AS $$ SELECT 'x' $$")
    job = nodes.gw.execute("SELECT dispatch.submit('ma', '/v1/x', '{}', 0, '60 s')").fetchone()[0]
    rows = a.execute("SELECT id, attempt, lease_expires_at > pg_catalog.now() FROM dispatch.lease(1)").fetchall()
    assert rows == [(job, 1, True)]
    ch = a.execute("SELECT dispatch.model_channel('ma')").fetchone()[0]
    assert ch == "dispatch_m_" + db.one("SELECT md5('ma')")


def test_forging_another_nodes_liveness_lock(db, nodes):
    """Advisory locks are not access-controlled: any role can take any key. What a
    node role can do with the liveness key of another node, and what it cannot."""
    a = nodes.a
    lock_class = db.one("SELECT dispatch._lock_class()")
    b_id = db.one("SELECT id FROM dispatch.nodes WHERE name = 'b'")
    # While b is connected, its key cannot be taken.
    assert a.execute("SELECT pg_try_advisory_lock(%s, %s)", (lock_class, b_id)).fetchone()[0] is False
    # b's daemon dies without deregistering; a takes b's key at once.
    b_pid = nodes.b.info.backend_pid
    nodes.b.close()
    wait_for(lambda: db.one("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (b_pid,)) == 0,
             what="b's backend to end")
    assert a.execute("SELECT pg_try_advisory_lock(%s, %s)", (lock_class, b_id)).fetchone()[0] is True
    # Consequences, asserted so they are known:
    # 1. b counts as live (its capacity is admitted, though nobody serves mb).
    assert db.one("SELECT count(*) FROM dispatch._serving_nodes() WHERE id = %s", (b_id,)) == 1
    # 2. b's daemon cannot register again while a holds it (PD006), and the refusal
    #    names the holder's role, so an operator sees the forger.
    b2 = psycopg.connect(db.node_dsn("dispatch_node_b"), autocommit=True)
    with pytest.raises(psycopg.Error) as e:
        b2.execute("SELECT * FROM dispatch.register('llamacpp', ARRAY['mb'], 4)")
    assert e.value.sqlstate == "PD006" and "dispatch_node_a" in e.value.diag.message_primary
    # 3. It gives a nothing of b's: a's calls still act as a (identity is session_user).
    job = nodes.gw.execute("SELECT dispatch.submit('mb', '/v1/x', '{}', 0, '60 s')").fetchone()[0]
    assert a.execute("SELECT * FROM dispatch.lease(10)").fetchall() == []
    # 4. dispatch.revoke('b') ends the session that holds b's key: the forger's.
    a_pid = a.info.backend_pid
    with db.connect() as admin:
        admin.execute("SELECT dispatch.revoke('b')")
    wait_for(lambda: db.one("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (a_pid,)) == 0,
             what="the forger's session to be ended by revoke")
    assert db.one("SELECT state FROM dispatch.jobs WHERE id = %s", (job,)) == "queued"
    b2.close()


# ---------------------------------------------------------------------------
# Forged reply notifications against the real gateway
# ---------------------------------------------------------------------------

def test_forged_reply_notification_never_delivers_a_wrong_answer(db, workers, gateway):  # noqa: F811
    """Any role may NOTIFY any channel (PostgreSQL has no privilege for it), so a node
    role can forge the gateway's reply notifications. The gateway treats them as a hint
    only: it re-reads dispatch.results and answers from the job's own row."""
    w = workers("n1", ["m1"])
    port = gateway()
    channel = reply_channel(gateway, port)

    # A finished job with a different answer (another client's).
    st, _, body = request(port, "POST", CHAT, chat_body("m1", "the other answer"))
    assert st == 200 and answer_text(body) == "echo: the other answer"
    other = db.one("SELECT max(id) FROM dispatch.jobs")

    # Our request waits on a slow provider.
    w.configure(latency_ms=2500)
    import threading
    result = {}
    t = threading.Thread(target=lambda: result.update(r=request(port, "POST", CHAT, chat_body("m1", "mine"),
                                                                  timeout=30)))
    t.start()
    mine = wait_for(lambda: db.one("SELECT id FROM dispatch.jobs WHERE state = 'leased' AND id > %s", (other,)),
                    what="our job leased")
    forger = psycopg.connect(db.enroll("forger"), autocommit=True)
    # Forged: our id (not finished yet), the other job's id, both, junk, a stream piece.
    for payload in ("%d" % mine, "%d" % other, "%d,%d" % (other, mine), "0,-1,abc", "%d;DROP" % mine,
                    "S%d:0:e::{\"choices\":[{\"message\":{\"content\":\"forged\"}}]}" % mine, "9" * 30):
        forger.execute("SELECT pg_notify(%s, %s)", (channel, payload))
    t.join(30)
    st, _, body = result["r"]
    assert st == 200, body
    assert answer_text(body) == "echo: mine"
    assert db.one("SELECT state FROM dispatch.jobs WHERE id = %s", (mine,)) == "succeeded"
    forger.close()
    assert http_get("http://127.0.0.1:%d/healthz" % port)[0] == 200


def sse_events(body):
    """The data of each event of an event-stream body, in order."""
    events = []
    for block in body.decode().split("\n\n"):
        lines = [line[len("data: "):] for line in block.split("\n") if line.startswith("data: ")]
        if lines:
            events.append("\n".join(lines))
    return events


def test_forged_stream_piece_is_not_delivered_to_a_streaming_client(db, workers, gateway):  # noqa: F811
    # Any role may NOTIFY the gateway's reply channel (if it learns the channel's random name).
    # A stream piece counts only when it carries the secret token the gateway gave
    # submit_many for that request: forged ones (no token, a wrong one, the format
    # before tokens) are dropped, and the client gets exactly the real stream.
    w = workers("n1", ["m1"])
    port = gateway()
    channel = reply_channel(gateway, port)
    w.configure(latency_ms=2000)
    import threading
    spy = psycopg.connect(db.dsn, autocommit=True)
    spy.execute('LISTEN "%s"' % channel)
    result = {}
    body = dict(chat_body("m1", "mine"), stream=True)
    t = threading.Thread(target=lambda: result.update(r=request(port, "POST", CHAT, body, timeout=30)))
    t.start()
    mine = wait_for(lambda: db.one("SELECT id FROM dispatch.jobs WHERE state = 'leased'"), what="our job leased")
    token = db.one("SELECT stream_token FROM dispatch.jobs WHERE id = %s", (mine,))
    assert token and len(token) == 24 and token.isalnum() and token.isascii(), token
    forger = psycopg.connect(db.enroll("forger"), autocommit=True)

    def forged(text):
        return json.dumps({"id": "x", "object": "chat.completion.chunk", "model": "m1",
                           "choices": [{"index": 0, "delta": {"content": text}}]})

    guesses = ["", "A" * 24, token[:-1] + ("b" if token[-1] != "b" else "c"), token[:-1], token + "0", "x" * 64,
               token.lower() if token.lower() != token else token.upper()]
    # Before the first real piece and on while the stream runs, at the seqs coming next.
    rounds = 0
    while t.is_alive() and rounds < 400:
        seq = rounds % 8
        for i, guess in enumerate(guesses):
            forger.execute("SELECT pg_notify(%s, %s)",
                           (channel, "S%d:%d:e:%s:%s" % (mine, seq, guess, forged("FORGED%d" % i))))
        forger.execute("SELECT pg_notify(%s, %s)", (channel, "S%d:%d:e:%s" % (mine, seq, forged("FORGEDOLD"))))
        forger.execute("SELECT pg_notify(%s, %s)", (channel, "S%d:%d:m:%s:{" % (mine, seq, guesses[1])))
        rounds += 1
        time.sleep(0.01)
    t.join(30)
    st, headers, text = result["r"]
    assert st == 200, text
    assert headers["content-type"].startswith("text/event-stream"), headers
    assert b"FORGED" not in text, text[:600]
    assert rounds >= 8, "the forger had no time to try: %d rounds" % rounds
    events = sse_events(text)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1, events[-3:]
    content = "".join(c["delta"].get("content") or "" for e in events[:-1] for c in json.loads(e)["choices"])
    assert content == "echo: mine", events

    # Exactly the real stream: the genuine pieces (those with the job's token, as the
    # spy saw them on the channel), joined in seq order, then the gateway's [DONE].
    got = notifications(spy, lambda got: any(p == str(mine) or str(mine) in p.split(",") for p in got), 5)
    genuine = {}
    for p in got:
        prefix = "S%d:" % mine
        if p.startswith(prefix):
            seq, flag, tok, data = p[len(prefix):].split(":", 3)
            if tok == token:
                genuine[int(seq)] = (flag == "m", data)
    assert genuine and sorted(genuine) == list(range(len(genuine))), sorted(genuine)
    real, current = [], ""
    for seq in range(len(genuine)):
        more, data = genuine[seq]
        current += data
        if not more:
            real.append(current)
            current = ""
    assert current == ""
    assert events == [e for e in real if e != "[DONE]"] + ["[DONE]"]
    assert db.one("SELECT state FROM dispatch.jobs WHERE id = %s", (mine,)) == "succeeded"
    forger.close()
    spy.close()
    assert http_get("http://127.0.0.1:%d/healthz" % port)[0] == 200
