"""pgdispatch-gateway end to end: real PostgreSQL, the real gateway binary, and a
worker behind it. The worker is the real daemon in front of the fake provider when
both are built; otherwise (or with PGD_GATEWAY_WORKER=standin) a small Python
stand-in that acts as a node through the same SQL API (enroll, register, exchange).

The gateway logs in with its own role (member of dispatch_gateway, no superuser), as
in production, so pg_stat_statements counts what it runs."""
import asyncio
import http.client
import json
import re
import os
import select
import signal
import socket
import threading
import time
import urllib.request

import psycopg
import pytest

from conftest import ROOT, binary, free_port, http_get, port_open, wait_for

CHAT = "/v1/chat/completions"
GATEWAY_ROLE = "pgd_gateway_test"


# ---------------------------------------------------------------------------
# HTTP helpers
# ---------------------------------------------------------------------------

def request(port, method, path, body=None, headers=None, timeout=15, raw=None):
    """(status, headers dict (lower-case keys), body bytes) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        h = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def chat_body(model, text="hello"):
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def answer_text(body):
    doc = json.loads(body)
    choice = doc["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def assert_openai_error(body, code=None):
    doc = json.loads(body)
    err = doc["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    if code is not None:
        assert err["code"] == code, doc
    return err


# ---------------------------------------------------------------------------
# Workers: the real daemon + fake provider, or the Python stand-in
# ---------------------------------------------------------------------------

def _built(name):
    sub = os.path.join("build", "san") if os.environ.get("PGD_SANITIZE") == "1" else "build"
    return os.path.exists(os.path.join(ROOT, sub, name))


USE_REAL = (os.environ.get("PGD_GATEWAY_WORKER", "auto") != "standin"
            and _built("pgdispatch-daemon") and _built("fake-provider"))


class RealWorker:
    """pgdispatch-daemon serving `models` in front of build/fake-provider."""

    def __init__(self, procs, db, name, models, slots):
        self.port = free_port()
        self.fake = procs.start("fake-" + name, [
            binary("fake-provider"), "--port", str(self.port), "--models", ",".join(models),
            "--slots", str(slots), "--threads", "2"])
        wait_for(lambda: port_open(self.port), what="fake provider port")
        dsn = db.enroll(name)
        self.daemon = procs.start("daemon-" + name, [
            binary("pgdispatch-daemon"), "--database-url", dsn,
            "--provider-url", "http://127.0.0.1:%d" % self.port, "--models", ",".join(models),
            "--max-concurrency", str(slots), "--provider-family", "llamacpp"])

    def configure(self, **settings):
        req = urllib.request.Request("http://127.0.0.1:%d/_fake/config" % self.port,
                                     data=json.dumps(settings).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200

    def stop(self):
        self.daemon.stop()


class StandIn(threading.Thread):
    """A node written against the SQL API: leases with dispatch.exchange, answers
    like the fake provider ("echo: " + the last message), sleeps on LISTEN.
    configure(fault=..., latency_ms=...) mirrors the fake provider's /_fake/config."""

    def __init__(self, db, name, models, slots):
        super().__init__(daemon=True)
        self.conn = psycopg.connect(db.enroll(name), autocommit=True)
        row = self.conn.execute(
            "SELECT node_channel, model_channels FROM dispatch.register('standin', %s, %s)",
            (models, slots)).fetchone()
        for ch in [row[0]] + list(row[1]):
            self.conn.execute('LISTEN "%s"' % ch)
        self.slots = slots
        self.fault = "none"
        self.latency_ms = 0
        self.halt = threading.Event()
        self.start()

    def configure(self, fault=None, latency_ms=None):
        """Applies to jobs leased from now on."""
        if fault is not None:
            self.fault = fault
        if latency_ms is not None:
            self.latency_ms = latency_ms

    def outcome(self, job_id, attempt, endpoint, payload):
        fault = self.fault
        if fault == "400":
            return {"id": job_id, "attempt": attempt, "retryable": False, "error": {
                "code": "provider_4xx", "message": "provider said 400", "status": 400,
                "body": json.dumps({"error": {"message": "fake 400", "type": "invalid_request_error",
                                              "code": "fake_400"}})}}
        if fault in ("500", "503"):
            return {"id": job_id, "attempt": attempt, "retryable": False, "error": {
                "code": "provider_5xx", "message": "provider said %s" % fault, "status": int(fault)}}
        if fault == "malformed":
            return {"id": job_id, "attempt": attempt, "retryable": False, "error": {
                "code": "bad_response", "message": "provider answered 200 with a body that is not JSON"}}
        text = ""
        if isinstance(payload.get("messages"), list) and payload["messages"]:
            text = payload["messages"][-1].get("content", "")
        elif "prompt" in payload:
            text = payload["prompt"]
        if endpoint.endswith("/embeddings"):
            result = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                      "model": payload.get("model")}
        elif endpoint.endswith("/completions") and "messages" not in payload:
            result = {"id": "cmpl-%d" % job_id, "object": "text_completion", "model": payload.get("model"),
                      "choices": [{"index": 0, "text": "echo: " + text, "finish_reason": "stop"}]}
        else:
            result = {"id": "chatcmpl-%d" % job_id, "object": "chat.completion", "model": payload.get("model"),
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "echo: " + text},
                                   "finish_reason": "stop"}]}
        return {"id": job_id, "attempt": attempt, "result": result}

    def run(self):
        held = {}      # id -> (due or None for hang, outcome)
        look = True
        while not self.halt.is_set():
            now = time.monotonic()
            ready = [i for i, (due, _) in held.items() if due is not None and due <= now]
            outs = [held.pop(i)[1] for i in ready]
            if look or outs:
                rows = self.conn.execute(
                    "SELECT kind, id, attempt, endpoint, payload::text FROM dispatch.exchange(%s::json, %s)",
                    (json.dumps(outs), max(self.slots - len(held), 0))).fetchall()
                look = False
                for kind, job_id, attempt, endpoint, payload in rows:
                    if kind != "job":
                        continue
                    due = None if self.fault == "hang" else now + self.latency_ms / 1000.0
                    held[job_id] = (due, self.outcome(job_id, attempt, endpoint, json.loads(payload)))
                    look = len(held) < self.slots
            dues = [d for d, _ in held.values() if d is not None]
            timeout = max(0.0, min(dues) - time.monotonic()) if dues else 0.2
            r, _, _ = select.select([self.conn.fileno()], [], [], timeout)
            if r:
                self.conn.pgconn.consume_input()
                while True:
                    n = self.conn.pgconn.notifies()
                    if n is None:
                        break
                    payload = n.extra.decode()
                    if payload.isdigit():       # abort: the job was cancelled
                        held.pop(int(payload), None)
                    look = True

    def stop(self):
        self.halt.set()
        self.join(5)
        self.conn.close()


@pytest.fixture
def workers(procs, db):
    started = []

    def start(name, models, slots=8):
        w = RealWorker(procs, db, name, models, slots) if USE_REAL else StandIn(db, name, models, slots)
        started.append(w)
        wait_for(lambda: db.one("SELECT count(*) FROM dispatch.models() WHERE model = ANY(%s)",
                                (list(models),)) == len(models), timeout=20, what="models served")
        return w

    yield start
    for w in started:
        w.stop()


# ---------------------------------------------------------------------------
# The gateway
# ---------------------------------------------------------------------------

def gateway_dsn(db):
    db.sql("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '%s') THEN "
           "CREATE ROLE %s LOGIN IN ROLE dispatch_gateway; END IF; END $$" % (GATEWAY_ROLE, GATEWAY_ROLE))
    return db.node_dsn(GATEWAY_ROLE)


@pytest.fixture
def gateway(procs, db):
    """gateway(*extra_flags, name=..., env=...) -> port, once /readyz answers 200."""
    count = [0]

    def start(*flags, name=None, env=None, ready=True):
        count[0] += 1
        port = free_port()
        p = procs.start(name or "gateway%d" % count[0], [
            binary("pgdispatch-gateway"), "--listen", "127.0.0.1:%d" % port,
            "--database-url", gateway_dsn(db), "--log-level", "debug"] + list(flags), env=env)
        start.procs[port] = p
        wait_for(lambda: port_open(port) or not p.alive(), what="gateway port")
        assert p.alive(), p.output()
        if ready:
            wait_for(lambda: http_get("http://127.0.0.1:%d/readyz" % port)[0] == 200, timeout=15,
                     what="gateway ready")
        return port

    start.procs = {}
    yield start
    # Every gateway must leave cleanly: SIGTERM -> exit 0, and (under PGD_SANITIZE=1)
    # no sanitizer report.
    for port, p in start.procs.items():
        rc = p.stop()
        out = p.output()
        assert rc == 0, "gateway on %d exited %s:\n%s" % (port, rc, out[-3000:])
        assert "Sanitizer" not in out and "runtime error" not in out, out[-6000:]


def reply_channel(gateway, port):
    """The gateway's reply channel, from its start line: it is not published over HTTP,
    because a database role listening there could read streamed answers."""
    m = re.search(r"reply_channel=(dispatch_r_[a-z0-9_]+)", gateway.procs[port].output())
    assert m, "no reply_channel in the gateway's log"
    return m.group(1)


def job_row(db, job_id):
    return db.sql("SELECT state, error->>'message', endpoint, priority, idempotency_key, deadline IS NOT NULL "
                  "FROM dispatch.jobs WHERE id = %s", (job_id,))[0]


# ---------------------------------------------------------------------------
# Success shapes
# ---------------------------------------------------------------------------

def test_openai_endpoints_answer_with_the_provider_result(db, workers, gateway):
    workers("n1", ["m1"])
    port = gateway()

    st, h, body = request(port, "POST", CHAT, chat_body("m1", "hi there"))
    assert st == 200, body
    assert h["content-type"].startswith("application/json")
    assert answer_text(body) == "echo: hi there"

    st, _, body = request(port, "POST", "/v1/completions", {"model": "m1", "prompt": "once upon"})
    assert st == 200, body
    assert answer_text(body) == "echo: once upon"

    st, _, body = request(port, "POST", "/v1/embeddings", {"model": "m1", "input": "vector me"})
    assert st == 200, body
    assert json.loads(body)["data"][0]["embedding"]

    # The body went to the queue as sent, for the endpoint it came on; deadline from the default.
    rows = db.sql("SELECT endpoint, payload::text, deadline > created_at FROM dispatch.jobs ORDER BY id")
    assert [r[0] for r in rows] == [CHAT, "/v1/completions", "/v1/embeddings"]
    assert json.loads(rows[0][1]) == chat_body("m1", "hi there")
    assert all(r[2] for r in rows)


def test_raw_body_bytes_are_forwarded_unchanged(db, workers, gateway):
    workers("n1", ["m1"])
    port = gateway()
    raw = b'{ "model" : "m1",\n  "messages": [{"role": "user", "content": "sp\\u00e4ce  kept"}], "temperature": 1.50 }'
    st, _, body = request(port, "POST", CHAT, raw=raw, headers={"Content-Type": "application/json; charset=utf-8"})
    assert st == 200, body
    assert db.one("SELECT payload::text FROM dispatch.jobs") == raw.decode()


def test_models_status_metrics_health(db, workers, gateway):
    workers("n1", ["m1", "m2"], slots=3)
    port = gateway()
    assert http_get("http://127.0.0.1:%d/healthz" % port)[0] == 200

    st, body, _ = http_get("http://127.0.0.1:%d/readyz" % port)
    assert st == 200 and json.loads(body)["schema_version"] >= 1

    st, body, _ = http_get("http://127.0.0.1:%d/v1/models" % port)
    assert st == 200
    doc = json.loads(body)
    assert doc["object"] == "list"
    assert [m["id"] for m in doc["data"]] == ["m1", "m2"]
    assert all(m["object"] == "model" for m in doc["data"])

    request(port, "POST", CHAT, chat_body("m1"))
    st, body, _ = http_get("http://127.0.0.1:%d/v1/status" % port)
    assert st == 200, body
    doc = json.loads(body)
    models = {m["model"]: m for m in doc["models"]}
    assert models["m1"]["capacity"] == 3 and models["m1"]["tier"] == "reported"
    assert doc["stuck_queues"] == [] and doc["node_counts"]["live"] == 1
    assert "notification_queue_usage" in doc
    assert "reply_channel" not in doc["gateway"]
    assert reply_channel(gateway, port).startswith("dispatch_r_")

    st, body, h = http_get("http://127.0.0.1:%d/metrics" % port)
    assert st == 200 and h["Content-Type"].startswith("text/plain")
    text = body.decode()
    assert 'pgdispatch_gateway_requests_total{endpoint="/v1/chat/completions",status="200"} 1' in text
    assert 'pgdispatch_gateway_request_duration_seconds_bucket{endpoint="/v1/chat/completions",le="+Inf"} 1' in text
    assert "pgdispatch_gateway_job_queue_wait_seconds_count 1" in text
    assert 'pgdispatch_model_capacity{model="m1",tier="reported"} 3' in text
    assert 'pgdispatch_nodes{state="live"} 1' in text
    assert "pgdispatch_gateway_db_reconnects_total 0" in text


def test_async_jobs_create_get_wait_and_cancel(db, workers, gateway):
    w = workers("n1", ["m1"])
    port = gateway()

    st, _, body = request(port, "POST", "/v1/jobs", {"model": "m1", "endpoint": "/v1/completions",
                                                     "payload": {"model": "m1", "prompt": "async"}})
    assert st == 202, body
    doc = json.loads(body)
    assert doc["object"] == "job" and doc["status"] == "queued" and isinstance(doc["id"], int)
    st, _, body = request(port, "GET", "/v1/jobs/%d?wait=10" % doc["id"])
    assert st == 200, body
    got = json.loads(body)
    assert got["status"] == "succeeded" and got["id"] == doc["id"]
    assert answer_text(json.dumps(got["result"])) == "echo: async"
    assert db.one("SELECT endpoint FROM dispatch.jobs WHERE id = %s", (doc["id"],)) == "/v1/completions"

    # A plain OpenAI body is a chat job; long-poll wakes on the notification.
    w.configure(latency_ms=700)
    st, _, body = request(port, "POST", "/v1/jobs", chat_body("m1", "later"))
    assert st == 202, body
    jid = json.loads(body)["id"]
    t0 = time.monotonic()
    st, _, body = request(port, "GET", "/v1/jobs/%d?wait=20" % jid)
    assert st == 200 and json.loads(body)["status"] == "succeeded", body
    assert time.monotonic() - t0 < 10

    # A long-poll that runs out answers with the current state.
    w.configure(fault="hang", latency_ms=0)
    st, _, body = request(port, "POST", "/v1/jobs", chat_body("m1", "stuck"))
    jid = json.loads(body)["id"]
    st, _, body = request(port, "GET", "/v1/jobs/%d?wait=0.5" % jid)
    assert st == 200 and json.loads(body)["status"] in ("queued", "leased"), body

    st, _, body = request(port, "DELETE", "/v1/jobs/%d" % jid)
    assert st == 200 and json.loads(body)["status"] == "cancelled", body
    st, _, body = request(port, "GET", "/v1/jobs/%d" % jid)
    assert json.loads(body)["status"] == "cancelled"
    assert json.loads(body)["error"]["code"] == "cancelled"

    st, _, body = request(port, "GET", "/v1/jobs/999999")
    assert st == 404, body
    assert_openai_error(body, "job_not_found")
    st, _, body = request(port, "DELETE", "/v1/jobs/999999")
    assert st == 404, body
    st, _, body = request(port, "GET", "/v1/jobs/1?wait=abc")
    assert st == 400, body


# ---------------------------------------------------------------------------
# Errors from hostile, malformed and oversized input
# ---------------------------------------------------------------------------

def test_client_errors_have_openai_shape(db, workers, gateway):
    workers("n1", ["m1"])
    port = gateway("--max-body-bytes", "8192")
    ct = {"Content-Type": "application/json"}

    cases = [
        (b"{not json", ct, 400, "invalid_json"),
        (b"", ct, 400, "invalid_json"),
        (b"[1, 2]", ct, 400, "invalid_request"),
        (b'"just a string"', ct, 400, "invalid_request"),
        (b'{"messages": []}', ct, 400, "missing_model"),
        (b'{"model": 42}', ct, 400, "invalid_model"),
        (b'{"model": ""}', ct, 400, "invalid_model"),
        (b'{"model": "m1", "stream": "yes"}', ct, 400, "invalid_request"),
        (b'{"model": "m1"} trailing', ct, 400, "invalid_json"),
        (b'{"model": "m1", "x": "\xff\xfe"}', ct, 400, "invalid_json"),
        (b"[" * 3000 + b"]" * 3000, ct, 400, None),
        (b'{"model": "no-such-model", "messages": []}', ct, 404, "model_not_found"),
        (json.dumps(chat_body("m1")).encode(), {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
        (json.dumps(chat_body("m1")).encode(), {}, 415, "unsupported_media_type"),
    ]
    for raw, headers, status, code in cases:
        st, h, body = request(port, "POST", CHAT, raw=raw, headers=headers)
        assert st == status, (raw[:60], st, body)
        assert h["content-type"].startswith("application/json")
        assert_openai_error(body, code)

    # 413 from Content-Length before the body is read, and while reading a chunked body.
    big = json.dumps(chat_body("m1", "x" * 10000)).encode()
    st, _, body = request(port, "POST", CHAT, raw=big, headers=ct)
    assert st == 413, body
    assert_openai_error(body, "request_too_large")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", CHAT, body=iter([big[:6000], big[6000:]]), headers=ct, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413
    assert_openai_error(r.read(), "request_too_large")
    conn.close()

    st, _, body = request(port, "GET", "/v1/nope")
    assert st == 404
    assert_openai_error(body, "unknown_path")
    st, h, body = request(port, "GET", CHAT)
    assert st == 405 and h["allow"] == "POST"
    assert_openai_error(body, "method_not_allowed")
    st, h, _ = request(port, "POST", "/v1/models", raw=b"{}", headers=ct)
    assert st == 405 and "GET" in h["allow"]

    for name, value in [("X-Request-Timeout", "soon"), ("X-Request-Timeout", "0"), ("X-Request-Timeout", "-1"),
                        ("X-Priority", "high"), ("X-Priority", "99999999999"), ("Idempotency-Key", "x" * 300)]:
        st, _, body = request(port, "POST", CHAT, chat_body("m1"), headers={name: value})
        assert st == 400, (name, value, body)
        assert_openai_error(body, "invalid_header")

    # Garbage on the socket does not hurt the gateway.
    for junk in [b"\x00\x01\x02 garbage\r\n\r\n", b"GET /" + b"a" * 100000 + b" HTTP/1.1\r\n\r\n",
                 b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n"]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            try:
                s.sendall(junk)
                s.recv(4096)
            except OSError:
                pass

    # Nothing above made a job, and the gateway still serves.
    assert db.one("SELECT count(*) FROM dispatch.jobs") == 0
    st, _, body = request(port, "POST", CHAT, chat_body("m1", "still alive"))
    assert st == 200 and answer_text(body) == "echo: still alive"


def test_request_options_become_job_fields(db, workers, gateway):
    workers("n1", ["m1"])
    port = gateway()
    st, _, body = request(port, "POST", CHAT, chat_body("m1"),
                          headers={"X-Priority": "7", "X-Request-Timeout": "42", "Idempotency-Key": "opt-1"})
    assert st == 200, body
    row = db.sql("SELECT priority, idempotency_key, round(extract(epoch FROM deadline - created_at)) "
                 "FROM dispatch.jobs")[0]
    assert row == (7, "opt-1", 42)


def test_no_live_node_is_503_and_full_queue_is_429(db, workers, gateway):
    port = gateway()
    # Known model (an enrolled node serves it) with no live node: 503.
    db.enroll("gone")
    db.sql("UPDATE dispatch.nodes SET models = '{m9}' WHERE name = 'gone'")
    st, h, body = request(port, "POST", CHAT, chat_body("m9"))
    assert st == 503, body
    assert_openai_error(body, "no_live_node")

    # Queue full: capacity pinned to 1, one queued job per slot.
    db.sql("SELECT dispatch.set_capacity('m9', 1)")
    db.sql("SELECT dispatch.set_setting('queue_depth_per_slot', 1)")
    st, _, body = request(port, "POST", "/v1/jobs", chat_body("m9", "first"))
    assert st == 202, body
    st, h, body = request(port, "POST", CHAT, chat_body("m9", "second"))
    assert st == 429, body
    assert h["retry-after"] == "1"
    err = assert_openai_error(body, "queue_full")
    assert "full" in err["message"]


def test_provider_failures_map_to_status(db, workers, gateway):
    w = workers("n1", ["m1"])
    port = gateway()

    w.configure(fault="400")
    st, _, body = request(port, "POST", CHAT, chat_body("m1"))
    assert st == 400, body
    assert "error" in json.loads(body)          # the provider's own body, passed through

    w.configure(fault="malformed")
    st, _, body = request(port, "POST", CHAT, chat_body("m1"))
    assert st == 502, body
    err = assert_openai_error(body)
    assert "failed" in err["message"]

    db.sql("SELECT dispatch.set_setting('retry_base_ms', 0)")
    w.configure(fault="500")
    st, _, body = request(port, "POST", CHAT, chat_body("m1"), headers={"X-Request-Timeout": "20"})
    assert st == 502, body
    assert_openai_error(body)

    w.configure(fault="none")
    st, _, body = request(port, "POST", CHAT, chat_body("m1", "ok again"))
    assert st == 200 and answer_text(body) == "echo: ok again"


# ---------------------------------------------------------------------------
# Deadlines, disconnects, idempotency
# ---------------------------------------------------------------------------

def test_deadline_gives_504_and_the_job_ends_expired(db, workers, gateway):
    w = workers("n1", ["m1"])
    port = gateway()
    w.configure(fault="hang")
    t0 = time.monotonic()
    st, _, body = request(port, "POST", CHAT, chat_body("m1"), headers={"X-Request-Timeout": "1"})
    elapsed = time.monotonic() - t0
    assert st == 504, body
    assert_openai_error(body, "deadline_exceeded")
    assert 0.9 < elapsed < 5
    jid = db.one("SELECT id FROM dispatch.jobs")
    wait_for(lambda: job_row(db, jid)[0] == "expired", what="job expired")


def test_client_disconnect_cancels_the_job(db, workers, gateway):
    w = workers("n1", ["m1"])
    port = gateway()
    w.configure(fault="hang")
    body = json.dumps(chat_body("m1", "bye")).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_for(lambda: db.one("SELECT state FROM dispatch.jobs") == "leased", what="job leased")
    s.close()
    jid = db.one("SELECT id FROM dispatch.jobs")
    wait_for(lambda: job_row(db, jid)[0] == "cancelled", what="job cancelled")
    assert job_row(db, jid)[1] == "client went away"
    # The gateway keeps serving.
    w.configure(fault="none")
    assert request(port, "POST", CHAT, chat_body("m1"))[0] == 200


def test_idempotency_key_returns_the_same_answer(db, workers, gateway):
    workers("n1", ["m1"])
    port = gateway()
    key = {"Idempotency-Key": "order-77"}
    st1, _, b1 = request(port, "POST", CHAT, chat_body("m1", "once"), headers=key)
    st2, _, b2 = request(port, "POST", CHAT, chat_body("m1", "once"), headers=key)
    assert st1 == st2 == 200
    assert b1 == b2
    assert db.one("SELECT count(*) FROM dispatch.jobs") == 1
    st, _, body = request(port, "POST", CHAT, chat_body("m1", "different"), headers=key)
    assert st == 409, body
    assert_openai_error(body, "idempotency_key_reused")


def test_only_jobs_and_keyed_requests_wait_for_the_disk_unless_durable_submits(db, workers, gateway, pg):
    """Which submits wait until their commit is safe: a synchronous standby that never
    comes (synchronous_standby_names) holds every commit that waits for durability,
    here only the gateway role's (the rest of this database commits with `local`). A
    request whose client waits is answered anyway; POST /v1/jobs, a request with an
    Idempotency-Key, and any request on a gateway with --durable-submits wait in
    SyncRep (or behind the one that does) until the standby requirement is lifted, then
    finish normally."""
    db.sql('ALTER DATABASE "%s" SET synchronous_commit = local' % db.name)
    gateway_dsn(db)
    db.sql('ALTER ROLE %s IN DATABASE "%s" SET synchronous_commit = on' % (GATEWAY_ROLE, db.name))
    workers("n1", ["m1"])
    plain, jobs, durable = gateway(), gateway(), gateway("--durable-submits")
    results = {}

    def send(tag, port, path, body, headers=None):
        results[tag] = request(port, "POST", path, body, headers=headers, timeout=60)

    def held_submits():
        """(waiting for the standby, running) submit_many statements of the gateways."""
        return tuple(db.sql("SELECT count(*) FILTER (WHERE wait_event = 'SyncRep'), count(*) FROM pg_stat_activity "
                            "WHERE usename = %s AND state = 'active' AND query LIKE '%%submit_many%%'",
                            (GATEWAY_ROLE,))[0])

    pg.psql("ALTER SYSTEM SET synchronous_standby_names = 'pgd_test_no_such_standby'")
    pg.psql("SELECT pg_reload_conf()")
    threads = []
    try:
        st, _, body = request(plain, "POST", CHAT, chat_body("m1", "not flushed"), timeout=20)
        assert st == 200, body
        assert answer_text(body) == "echo: not flushed"
        for tag, port, path, body, headers in (
                ("keyed", plain, CHAT, chat_body("m1", "keyed"), {"Idempotency-Key": "k-1"}),
                ("job", jobs, "/v1/jobs", {"model": "m1", "payload": chat_body("m1", "job")}, None),
                ("durable", durable, CHAT, chat_body("m1", "durable"), None)):
            threads.append(threading.Thread(target=send, args=(tag, port, path, body, headers)))
            threads[-1].start()
        # One waits in SyncRep, holding the database-wide lock of notifying commits;
        # the other two wait for that lock. Held there, none can answer before the
        # standby requirement is lifted.
        wait_for(lambda: held_submits() == (1, 3), timeout=10, what="three submits held")
        assert results == {} and held_submits() == (1, 3)
    finally:
        pg.psql("ALTER SYSTEM RESET synchronous_standby_names")
        pg.psql("SELECT pg_reload_conf()")
    for t in threads:
        t.join(60)
    assert results["keyed"][0] == 200 and answer_text(results["keyed"][2]) == "echo: keyed"
    assert results["durable"][0] == 200 and answer_text(results["durable"][2]) == "echo: durable"
    assert results["job"][0] == 202, results["job"]


def test_a_waiting_request_whose_job_is_gone_or_replaced_gets_503(db, workers, gateway):
    """After a crash of PostgreSQL, a waiting request's job may be gone (its submit had
    not reached the disk) and its id may name a newer job. Simulated as the superuser:
    one job deleted, the other's created_at changed (another job under the same id),
    each followed by a completion notification on the gateway's channel. Both clients
    get 503 database_unavailable; the other job is left alone (not cancelled)."""
    w = workers("n1", ["m1"])
    w.configure(latency_ms=3000)
    port = gateway()
    channel = reply_channel(gateway, port)
    results = {}

    def send(tag):
        results[tag] = request(port, "POST", CHAT, chat_body("m1", tag), timeout=30)

    for tag, change in (("deleted", "DELETE FROM dispatch.jobs WHERE id = %s"),
                        ("replaced", "UPDATE dispatch.jobs SET created_at = created_at - interval '1 s' "
                                     "WHERE id = %s")):
        t = threading.Thread(target=send, args=(tag,))
        t.start()
        wait_for(lambda: db.one("SELECT count(*) FROM dispatch.jobs WHERE state = 'leased' "
                                "AND payload->'messages'->0->>'content' = %s", (tag,)) == 1, what="job leased")
        jid = db.one("SELECT id FROM dispatch.jobs WHERE payload->'messages'->0->>'content' = %s", (tag,))
        db.sql(change, (jid,))
        db.sql("SELECT pg_notify(%s, %s)", (channel, str(jid)))
        t.join(10)
        st, h, body = results[tag]
        assert st == 503, body
        assert h.get("retry-after") == "1"
        err = assert_openai_error(body, "database_unavailable")
        assert "job %d is no longer in the database" % jid in err["message"]
        assert "send the request again" in err["message"]
    assert db.one("SELECT state FROM dispatch.jobs WHERE payload->'messages'->0->>'content' = 'replaced'") \
        in ("leased", "succeeded")
    assert "job_gone" in gateway.procs[port].output()


def test_a_submit_rolled_back_by_a_lock_timeout_answers_503_database_busy(db, workers, gateway):
    """A submit that waits past the gateway role's lock_timeout (here on an idempotency key
    that another transaction is inserting) is rolled back whole: 503 database_busy with
    Retry-After, nothing queued, and the same request succeeds once the lock is gone."""
    workers("n1", ["m1"])
    gateway_dsn(db)
    db.sql('ALTER ROLE %s IN DATABASE "%s" SET lock_timeout = \'200ms\'' % (GATEWAY_ROLE, db.name))
    port = gateway()
    key = {"Idempotency-Key": "held-1"}
    held = [{"model": "m1", "payload": chat_body("m1", "x"), "idempotency_key": "held-1"}]
    with db.connect(autocommit=False) as holder:
        holder.execute("SELECT count(*) FROM dispatch.submit_many(%s)", (json.dumps(held),))
        st, headers, body = request(port, "POST", CHAT, chat_body("m1", "x"), headers=key)
        holder.rollback()
    assert st == 503, body
    assert_openai_error(body, "database_busy")
    assert headers.get("retry-after") == "1"
    assert db.one("SELECT count(*) FROM dispatch.jobs") == 0
    st, _, body = request(port, "POST", CHAT, chat_body("m1", "x"), headers=key)
    assert st == 200, body
    assert db.one("SELECT count(*) FROM dispatch.jobs WHERE state = 'succeeded'") == 1


# ---------------------------------------------------------------------------
# Scale, isolation, idleness
# ---------------------------------------------------------------------------

async def _raw_post(port, body, timeout):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


def test_a_thousand_waiting_requests_are_all_answered(db, workers, gateway):
    w = workers("n1", ["m1"], slots=1000)
    port = gateway()
    w.configure(latency_ms=1500)
    n = 1000

    async def run():
        sem = asyncio.Semaphore(n)

        async def one(i):
            async with sem:
                return await _raw_post(port, json.dumps(chat_body("m1", "req-%d" % i)).encode(), 60)

        return await asyncio.gather(*(one(i) for i in range(n)))

    t0 = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - t0
    bad = [(i, st, body[:200]) for i, (st, body) in enumerate(results) if st != 200]
    assert not bad, bad[:5]
    for i, (_, body) in enumerate(results):
        assert answer_text(body) == "echo: req-%d" % i
    assert elapsed < 45
    # B7: the gateway holds 1,000 waiting requests in little memory (not measurable
    # under ASan, whose shadow memory dominates).
    if os.environ.get("PGD_SANITIZE") != "1":
        with open("/proc/%d/status" % gateway.procs[port].pid) as f:
            hwm_kb = int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
        assert hwm_kb <= 32 * 1024, "gateway peak RSS %d kB" % hwm_kb
    # Folded: far fewer submit_many calls than requests.
    calls = db.one("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid "
                   "WHERE r.rolname = %s AND s.query LIKE '%%submit_many%%'", (GATEWAY_ROLE,))
    assert calls < n / 2, calls


def test_two_gateways_each_get_only_their_own_answers(db, workers, gateway):
    w = workers("n1", ["m1"], slots=64)
    w.configure(latency_ms=200)
    ports = [gateway(name="gw-a"), gateway(name="gw-b")]
    channels = set()
    for p in ports:
        channels.add(reply_channel(gateway, p))
    assert len(channels) == 2

    async def run():
        async def one(i):
            port = ports[i % 2]
            return await _raw_post(port, json.dumps(chat_body("m1", "gw%d-req%d" % (i % 2, i))).encode(), 30)

        return await asyncio.gather(*(one(i) for i in range(100)))

    for i, (st, body) in enumerate(asyncio.run(run())):
        assert st == 200, body
        assert answer_text(body) == "echo: gw%d-req%d" % (i % 2, i)
    # Each gateway's jobs carry its own reply channel.
    assert db.one("SELECT count(DISTINCT reply_channel) FROM dispatch.jobs") == 2


def test_idle_gateway_issues_zero_statements(db, gateway):
    port = gateway()
    time.sleep(0.5)     # let the readiness probe's statement land in the statistics
    before = db.statement_calls()
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline:          # an idle window: nothing is asked of the gateway
        time.sleep(0.5)
        assert port_open(port)
    assert db.statement_calls() - before == 0


# ---------------------------------------------------------------------------
# Keys, database loss, shutdown
# ---------------------------------------------------------------------------

def test_api_keys_when_required(db, workers, gateway):
    workers("n1", ["m1"])
    port = gateway("--require-api-key")
    key = db.one("SELECT dispatch.create_api_key('team-a')")
    st, _, body = request(port, "POST", CHAT, chat_body("m1"))
    assert st == 401
    assert_openai_error(body, "missing_api_key")
    st, _, body = request(port, "POST", CHAT, chat_body("m1"), headers={"Authorization": "Bearer wrong"})
    assert st == 401, body
    assert_openai_error(body, "invalid_api_key")
    st, _, body = request(port, "POST", CHAT, chat_body("m1"), headers={"Authorization": "Bearer " + key})
    assert st == 200, body
    st, _, _ = request(port, "GET", "/v1/models", headers={"Authorization": "bearer " + key})
    assert st == 200
    assert http_get("http://127.0.0.1:%d/healthz" % port)[0] == 200
    assert http_get("http://127.0.0.1:%d/metrics" % port)[0] == 200


def test_lost_database_connection_is_survived(db, workers, gateway):
    w = workers("n1", ["m1"])
    port = gateway()
    w.configure(latency_ms=1500)
    result = {}

    def waiter():
        result["r"] = request(port, "POST", CHAT, chat_body("m1", "survivor"), timeout=30)

    t = threading.Thread(target=waiter)
    t.start()
    wait_for(lambda: db.one("SELECT state FROM dispatch.jobs") == "leased", what="job leased")
    db.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (GATEWAY_ROLE,))
    t.join(30)
    st, _, body = result["r"]
    assert st == 200, body
    assert answer_text(body) == "echo: survivor"
    wait_for(lambda: http_get("http://127.0.0.1:%d/readyz" % port)[0] == 200, what="ready again")
    text = http_get("http://127.0.0.1:%d/metrics" % port)[1].decode()
    assert "pgdispatch_gateway_db_reconnects_total 1" in text


def test_database_down_gives_503_and_readyz_false(db, gateway, procs):
    # A gateway pointed at a port where nothing listens: up, not ready, clear 503s.
    port = free_port()
    dead = free_port()
    p = procs.start("gw-nodb", [binary("pgdispatch-gateway"), "--listen", "127.0.0.1:%d" % port,
                                "--database-url", "postgresql://x@127.0.0.1:%d/none" % dead])
    wait_for(lambda: port_open(port), what="gateway port")
    assert http_get("http://127.0.0.1:%d/healthz" % port)[0] == 200
    st, body, _ = http_get("http://127.0.0.1:%d/readyz" % port)
    assert st == 503
    st, _, body = request(port, "POST", CHAT, chat_body("m1"))
    assert st == 503
    assert "database" in assert_openai_error(body, "database_unavailable")["message"]
    assert http_get("http://127.0.0.1:%d/metrics" % port)[0] == 200
    assert p.stop() == 0


def test_sigterm_lets_waiters_finish_then_exits_zero(db, workers, gateway):
    w = workers("n1", ["m1"])
    port = gateway("--grace-ms", "10000")
    w.configure(latency_ms=1000)
    result = {}

    def waiter():
        result["r"] = request(port, "POST", CHAT, chat_body("m1", "finish me"), timeout=30)

    t = threading.Thread(target=waiter)
    t.start()
    wait_for(lambda: db.one("SELECT state FROM dispatch.jobs") == "leased", what="job leased")
    proc = gateway.procs[port]
    proc.signal(signal.SIGTERM)
    t.join(30)
    st, _, body = result["r"]
    assert st == 200, body
    assert answer_text(body) == "echo: finish me"
    assert proc.wait(15) == 0
    assert "shutting_down" in proc.output()


def test_sigterm_after_grace_cancels_what_still_waits(db, workers, gateway):
    w = workers("n1", ["m1"])
    port = gateway("--grace-ms", "300")
    w.configure(fault="hang")
    result = {}

    def waiter():
        result["r"] = request(port, "POST", CHAT, chat_body("m1"), timeout=30)

    t = threading.Thread(target=waiter)
    t.start()
    wait_for(lambda: db.one("SELECT state FROM dispatch.jobs") == "leased", what="job leased")
    proc = gateway.procs[port]
    proc.signal(signal.SIGTERM)
    t.join(30)
    assert result["r"][0] == 503
    assert_openai_error(result["r"][2], "shutting_down")
    assert proc.wait(15) == 0
    wait_for(lambda: db.one("SELECT state FROM dispatch.jobs") == "cancelled", what="job cancelled")


def test_a_waiting_request_whose_job_is_cancelled_gets_409(db, workers, gateway):
    w = workers("n1", ["m1"])
    port = gateway()
    w.configure(fault="hang")
    result = {}

    def waiter():
        result["r"] = request(port, "POST", CHAT, chat_body("m1"), timeout=30)

    t = threading.Thread(target=waiter)
    t.start()
    wait_for(lambda: db.one("SELECT state FROM dispatch.jobs") == "leased", what="job leased")
    jid = db.one("SELECT id FROM dispatch.jobs")
    st, _, body = request(port, "DELETE", "/v1/jobs/%d" % jid)
    assert st == 200, body
    t.join(30)
    st, _, body = result["r"]
    assert st == 409, body
    assert_openai_error(body, "cancelled")


def test_stuck_queue_is_logged_on_transitions_only(db, gateway):
    port = gateway()
    db.sql("SELECT dispatch.set_capacity('m9', 5)")     # accepted, but no node serves it
    st, _, body = request(port, "POST", "/v1/jobs", chat_body("m9"))
    assert st == 202, body
    jid = json.loads(body)["id"]
    for path in ("/v1/status", "/metrics", "/v1/status"):
        assert http_get("http://127.0.0.1:%d%s" % (port, path))[0] == 200
    doc = json.loads(http_get("http://127.0.0.1:%d/v1/status" % port)[1])
    assert [q["model"] for q in doc["stuck_queues"]] == ["m9"]
    assert 'pgdispatch_model_stuck{model="m9"} 1' in http_get("http://127.0.0.1:%d/metrics" % port)[1].decode()
    out = gateway.procs[port].output()
    assert out.count("event=queue_stuck") == 1, out
    assert "event=queue_unstuck" not in out

    assert request(port, "DELETE", "/v1/jobs/%d" % jid)[0] == 200
    doc = json.loads(http_get("http://127.0.0.1:%d/v1/status" % port)[1])
    assert doc["stuck_queues"] == []
    http_get("http://127.0.0.1:%d/v1/status" % port)
    out = gateway.procs[port].output()
    assert out.count("event=queue_stuck") == 1 and out.count("event=queue_unstuck") == 1, out


def test_connections_kept_open_after_a_response_are_capped(db, gateway):
    """Each connection kept open for another request holds its whole HTTP buffer
    until it closes; past --max-keepalive-connections, responses close theirs. A
    place is freed when its connection closes."""
    port = gateway("--max-keepalive-connections", "1")

    def ask(conn):
        conn.request("GET", "/healthz")
        r = conn.getresponse()
        r.read()
        return r.status, (r.getheader("Connection") or "").lower()

    first = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    second = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    assert ask(first) == (200, "")                    # takes the one place
    assert ask(first) == (200, "")                    # and keeps it
    assert ask(second) == (200, "close")              # no place left: closed after the answer
    first.close()
    wait_for(lambda: ask(http.client.HTTPConnection("127.0.0.1", port, timeout=10))[1] == "",
             5, what="the closed connection's place to be free again")
