"""pgdispatch-daemon relaying "stream": true jobs (sql/002_streaming.sql): a Python
listener on the job's reply channel plays the gateway and checks that the provider's
events arrive as S<id>:<seq>:<m|e>:<token>:<data> notifications in seq order with
the job's stream token and the provider's own data strings, that the completion
notification comes after the last chunk, and that the job's result is the assembled
non-stream response. Also: a
provider dying mid-stream, a 500 before the first chunk, cancel and deadline
mid-stream, lease extension of a long stream, many concurrent streams, a long one.

Every wait is a wait_for with a deadline; there are no fixed sleeps."""
import http.server
import json
import secrets
import threading
import time
import urllib.request

import pytest

from conftest import free_port, wait_for
from test_daemon import Fake, daemon, jobs, wait_live

CHANNEL = "gw_test"


# ---------------------------------------------------------------------------- helpers

class Listener:
    """LISTENs on the reply channel in a thread and keeps every payload in order."""

    STOP = "__listener_stop__"

    def __init__(self, db, channel=CHANNEL):
        self.db = db
        self.channel = channel
        self.conn = db.connect()
        self.conn.execute('LISTEN "%s"' % channel)
        self.items = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        for n in self.conn.notifies():
            if n.payload == self.STOP:
                break
            with self.lock:
                self.items.append(n.payload)

    def close(self):
        self.db.sql("SELECT pg_notify(%s, %s)", (self.channel, self.STOP))
        self.thread.join(10)
        self.conn.close()

    def snapshot(self):
        with self.lock:
            return list(self.items)

    def pieces(self, job_id):
        """[(seq, more, data), ...] in arrival order (S<id>:<seq>:<m|e>:<token>:<data>)."""
        prefix = "S%d:" % job_id
        out = []
        for p in self.snapshot():
            if p.startswith(prefix):
                seq, flag, token, data = p[len(prefix):].split(":", 3)
                assert token == TOKENS.get(job_id, ""), (job_id, token)
                out.append((int(seq), flag == "m", data))
        return out

    def events(self, job_id):
        """Whole events (pieces joined), checking seq order without gaps."""
        events, current = [], []
        for i, (seq, more, data) in enumerate(self.pieces(job_id)):
            assert seq == i, "seq %d arrived at position %d" % (seq, i)
            current.append(data)
            if not more:
                events.append("".join(current))
                current = []
        assert not current, "the last piece said more would follow"
        return events

    def completion_index(self, job_id):
        for i, p in enumerate(self.snapshot()):
            if not p.startswith("S") and str(job_id) in p.split(","):
                return i
        return None

    def last_piece_index(self, job_id):
        prefix = "S%d:" % job_id
        idx = [i for i, p in enumerate(self.snapshot()) if p.startswith(prefix)]
        return idx[-1] if idx else None


@pytest.fixture
def listener(db):
    lst = Listener(db)
    yield lst
    lst.close()


# Stream jobs are submitted the gateway's way, with a stream token of their own that
# every piece must echo; the others through dispatch.submit, without one (pieces, if
# any, would carry an empty token).
TOKENS = {}


def submit(db, payload, endpoint="/v1/chat/completions", timeout_ms=None):
    if not payload.get("stream"):
        return db.one("SELECT dispatch.submit('demo', %s, %s::json, p_timeout => %s::interval, "
                      "p_reply_channel => %s)",
                      (endpoint, json.dumps(payload), None if timeout_ms is None else "%d ms" % timeout_ms, CHANNEL))
    token = secrets.token_hex(12)
    element = {"model": "demo", "endpoint": endpoint, "payload": payload, "stream_token": token}
    if timeout_ms is not None:
        element["timeout_ms"] = timeout_ms
    (jid, state, message), = db.sql("SELECT id, sqlstate, message FROM dispatch.submit_many(%s::json, %s)",
                                    (json.dumps([element]), CHANNEL))
    assert jid is not None, (state, message)
    TOKENS[jid] = token
    return jid


def job(db, job_id):
    return jobs(db, [job_id])[0]


def finished(db, job_id, wanted=("succeeded",)):
    return job(db, job_id)["state"] in wanted


def direct_events(fake, payload, endpoint="/v1/chat/completions"):
    """The SSE data fields the fake provider sends for payload when called directly."""
    req = urllib.request.Request(fake.url + endpoint, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        body = r.read().decode()
    out = []
    for block in body.split("\n\n"):
        lines = [ln[len("data:"):].lstrip(" ") if ln.startswith("data:") else None for ln in block.split("\n")]
        data = [d for d in lines if d is not None]
        if data:
            out.append("\n".join(data))
    return out


def normalise(events):
    """Events with the per-request id and created replaced, which differ between two
    calls of the same request; everything else must match byte for byte."""
    first = json.loads(events[0])
    out = []
    for e in events:
        e = e.replace(json.dumps(first["id"]), '"ID"')
        e = e.replace('"created":%d' % first["created"], '"created":0')
        out.append(e)
    return out


def text_of(result):
    c = result["choices"][0]
    return c["message"]["content"] if "message" in c else c["text"]


def start(db, procs, fake, *extra, name="n1"):
    proc = daemon(procs, db.enroll(name), fake, "--models", "demo", "--max-concurrency", "4", *extra, name=name)
    wait_live(db, name)
    return proc


PROMPT = "stream me a sentence that is long enough to be cut into several deltas"
CHAT = {"model": "demo", "messages": [{"role": "user", "content": PROMPT}]}
COMPLETION = {"model": "demo", "prompt": PROMPT}


# ---------------------------------------------------------------------------- tests

@pytest.mark.parametrize("endpoint,base,obj", [("/v1/chat/completions", CHAT, "chat.completion"),
                                               ("/v1/completions", COMPLETION, "text_completion")])
def test_stream_relayed_in_order_then_completed_with_assembled_result(db, procs, listener, endpoint, base, obj):
    fake = Fake(procs, stream_chunks=6, stream_interval_ms=20)
    start(db, procs, fake)
    payload = dict(base, stream=True, stream_options={"include_usage": True})
    jid = submit(db, payload, endpoint)
    wait_for(lambda: finished(db, jid), 10, what="stream job succeeded")
    wait_for(lambda: listener.completion_index(jid) is not None, 5, what="completion notification")

    relayed = listener.events(jid)
    direct = direct_events(fake, payload, endpoint)
    assert direct[-1] == "[DONE]"
    assert "[DONE]" not in relayed                      # the gateway writes its own
    assert normalise(relayed) == normalise(direct[:-1])
    assert listener.completion_index(jid) > listener.last_piece_index(jid)

    j = job(db, jid)
    assert j["attempt"] == 1
    result = j["result"]
    first = json.loads(relayed[0])
    assert result["object"] == obj
    assert result["id"] == first["id"] and result["created"] == first["created"] and result["model"] == "demo"
    assert result["choices"][0]["finish_reason"] == "stop"
    assert result["usage"]["total_tokens"] > 0

    # The same request without stream, through the daemon: the same text.
    plain = submit(db, base, endpoint)
    wait_for(lambda: finished(db, plain), 10, what="non-stream job succeeded")
    assert text_of(result) == text_of(job(db, plain)["result"])
    assert job(db, plain)["result"]["object"] == obj
    assert listener.pieces(plain) == []


def test_provider_dying_mid_stream_fails_stream_broken_not_retried(db, procs, listener):
    fake = Fake(procs, stream_chunks=6, stream_interval_ms=20, fault="die-mid-stream")
    start(db, procs, fake)
    jid = submit(db, dict(CHAT, stream=True))
    wait_for(lambda: finished(db, jid, ("failed",)), 10, what="job failed")
    j = job(db, jid)
    assert j["attempt"] == 1
    assert j["error"]["code"] == "stream_broken", j["error"]
    assert "after 4 chunks" in j["error"]["message"], j["error"]
    assert fake.stats()["by_path"]["/v1/chat/completions"] == 1      # not retried
    wait_for(lambda: listener.completion_index(jid) is not None, 5, what="completion notification")
    assert len(listener.events(jid)) == 4
    assert listener.completion_index(jid) > listener.last_piece_index(jid)


def test_provider_500_before_first_chunk_is_retried(db, procs, listener):
    db.sql("SELECT dispatch.set_setting('retry_base_ms', 200)")
    fake = Fake(procs, stream_chunks=4, fault="500")
    start(db, procs, fake)
    jid = submit(db, dict(CHAT, stream=True))
    wait_for(lambda: fake.stats()["by_status"].get("500", 0) >= 1, 5, what="a 500 from the provider")
    fake.config(fault="none")
    wait_for(lambda: finished(db, jid), 10, what="job succeeded after a retry")
    j = job(db, jid)
    assert j["attempt"] >= 2
    assert fake.stats()["by_status"]["500"] == j["attempt"] - 1
    wait_for(lambda: listener.completion_index(jid) is not None, 5, what="completion notification")
    events = listener.events(jid)
    assert len(events) == 1 + 4 + 1                  # role, deltas, finish
    assert text_of(j["result"]) == "".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                                           for e in events)


def test_cancel_mid_stream_aborts_the_provider_transfer(db, procs, listener):
    fake = Fake(procs, stream_chunks=60, stream_interval_ms=100)
    start(db, procs, fake)
    jid = submit(db, dict(CHAT, stream=True))
    wait_for(lambda: len(listener.pieces(jid)) >= 3, 10, what="first chunks relayed")
    aborted = fake.stats()["aborted"]
    t0 = time.monotonic()
    assert db.one("SELECT dispatch.cancel(%s, 'client went away')", (jid,)) == "cancelled"
    wait_for(lambda: fake.stats()["aborted"] > aborted, 5, interval=0.01, what="transfer aborted at the provider")
    assert time.monotonic() - t0 < 1.0
    wait_for(lambda: fake.stats()["in_flight"] == 0, 5, what="nothing in flight")
    assert job(db, jid)["state"] == "cancelled"
    seen = len(listener.pieces(jid))
    assert seen < 40
    # Nothing more is relayed for it: a new job's chunks arrive, the cancelled one's do not.
    other = submit(db, dict(CHAT, stream=True))
    fake.config(stream_interval_ms=0)
    wait_for(lambda: finished(db, other), 10, what="next stream job")
    assert len(listener.pieces(jid)) == seen


def test_deadline_mid_stream_expires_and_aborts(db, procs, listener):
    fake = Fake(procs, stream_chunks=60, stream_interval_ms=100)
    start(db, procs, fake)
    jid = submit(db, dict(CHAT, stream=True), timeout_ms=800)
    wait_for(lambda: finished(db, jid, ("expired",)), 5, what="job expired")
    assert job(db, jid)["error"]["code"] == "deadline_exceeded"
    assert len(listener.pieces(jid)) >= 1
    wait_for(lambda: fake.stats()["in_flight"] == 0, 5, what="transfer aborted at the provider")
    wait_for(lambda: listener.completion_index(jid) is not None, 5, what="completion notification")
    assert listener.completion_index(jid) > listener.last_piece_index(jid)


def test_long_stream_keeps_its_lease(db, procs, listener):
    db.sql("SELECT dispatch.set_setting('lease_seconds', 1)")
    fake = Fake(procs, stream_chunks=25, stream_interval_ms=100)
    start(db, procs, fake)
    jid = submit(db, dict(CHAT, stream=True))
    wait_for(lambda: finished(db, jid), 15, what="long stream succeeded")
    assert job(db, jid)["attempt"] == 1
    assert len(listener.events(jid)) == 1 + 25 + 1
    assert fake.stats()["by_path"]["/v1/chat/completions"] == 1


def test_concurrent_streams_each_complete_after_their_chunks(db, procs, listener):
    fake = Fake(procs, stream_chunks=10, stream_interval_ms=5, latency_ms=20)
    daemon(procs, db.enroll("n1"), fake, "--models", "demo", "--max-concurrency", "30", name="n1")
    wait_live(db, "n1")
    ids = [submit(db, dict(CHAT, stream=True, user="s%d" % i)) for i in range(40)]
    wait_for(lambda: all(finished(db, i) for i in ids), 30, what="all streams succeeded")
    wait_for(lambda: all(listener.completion_index(i) is not None for i in ids), 5, what="all completions")
    for i in ids:
        events = listener.events(i)
        assert len(events) == 1 + 10 + 1
        assert listener.completion_index(i) > listener.last_piece_index(i)
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events)
        assert text_of(job(db, i)["result"]) == text


def test_stream_of_200_chunks_with_latency_arrives_complete(db, procs, listener):
    fake = Fake(procs, stream_chunks=200, stream_interval_ms=2, latency_ms=200)
    start(db, procs, fake)
    long_prompt = " ".join("word%d" % i for i in range(80))
    payload = {"model": "demo", "messages": [{"role": "user", "content": long_prompt}], "stream": True}
    jid = submit(db, payload)
    wait_for(lambda: finished(db, jid), 20, what="200-chunk stream succeeded")
    wait_for(lambda: listener.completion_index(jid) is not None, 5, what="completion notification")
    events = listener.events(jid)
    assert len(events) == 1 + 200 + 1
    plain = submit(db, {"model": "demo", "messages": payload["messages"]})
    wait_for(lambda: finished(db, plain), 10, what="non-stream job succeeded")
    expected = text_of(job(db, plain)["result"])
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events) == expected
    assert text_of(job(db, jid)["result"]) == expected


def test_sigterm_past_grace_fails_a_half_relayed_stream_instead_of_handing_it_back(db, procs, listener):
    import signal
    fake = Fake(procs, stream_chunks=60, stream_interval_ms=100)
    proc = start(db, procs, fake, "--grace-ms", "300")
    jid = submit(db, dict(CHAT, stream=True))
    wait_for(lambda: len(listener.pieces(jid)) >= 2, 10, what="first chunks relayed")
    proc.signal(signal.SIGTERM)
    assert proc.wait(8) == 0
    j = job(db, jid)
    assert j["state"] == "failed" and j["error"]["code"] == "stream_broken", j
    wait_for(lambda: listener.completion_index(jid) is not None, 5, what="completion notification")
    assert listener.completion_index(jid) > listener.last_piece_index(jid)


# ---------------------------------------------------------------------------- scripted provider

class Scripted:
    """A provider whose inference answer is set per test (the fake provider always
    streams well-formed events when asked to stream)."""

    def __init__(self):
        self.answer = (200, "application/json", b"{}")
        self.port = free_port()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                status = 200 if self.path == "/health" else 404
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status, ctype, body = owner.answer
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.end_headers()     # HTTP/1.0: the body ends when the connection closes
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted():
    s = Scripted()
    yield s
    s.close()


def sse(*events):
    return "".join("data: %s\n\n" % e for e in events).encode()


def chunk(content=None, finish=None):
    delta = {} if content is None else {"content": content}
    return json.dumps({"id": "c-1", "object": "chat.completion.chunk", "created": 5, "model": "demo",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}, ensure_ascii=False)


def test_stream_request_answered_with_plain_json_completes_with_it(db, procs, listener, scripted):
    body = {"id": "x", "object": "chat.completion", "created": 1, "model": "demo",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "whole"}, "finish_reason": "stop"}]}
    scripted.answer = (200, "application/json", json.dumps(body).encode())
    start(db, procs, scripted)
    jid = submit(db, dict(CHAT, stream=True))
    wait_for(lambda: finished(db, jid), 10, what="job succeeded")
    assert job(db, jid)["result"] == body
    assert listener.pieces(jid) == []


def test_event_over_7000_bytes_is_relayed_in_pieces(db, procs, listener, scripted):
    content = "".join("é€😀a"[i % 4] for i in range(9000))        # ~20 kB of 1- to 4-byte characters
    big = chunk(content)
    scripted.answer = (200, "text/event-stream", sse(chunk(""), big, chunk(None, "stop"), "[DONE]"))
    start(db, procs, scripted)
    jid = submit(db, dict(CHAT, stream=True))
    wait_for(lambda: finished(db, jid), 10, what="job succeeded")
    pieces = listener.pieces(jid)
    flags = [more for _, more, _ in pieces]
    assert flags[0] is False and flags[-1] is False
    assert sum(flags) == len(pieces) - 3 >= 2          # the big event took several pieces
    assert all(len(d.encode()) <= 7000 for _, _, d in pieces)
    assert listener.events(jid) == [chunk(""), big, chunk(None, "stop")]
    result = job(db, jid)["result"]
    assert result["choices"][0]["message"]["content"] == content
    assert result["choices"][0]["finish_reason"] == "stop" and result["id"] == "c-1"


@pytest.mark.parametrize("body,code,fragment,relayed", [
    (sse("not json", "[DONE]"), "bad_response", "malformed event", 0),
    (sse(chunk("a"), "{\"choices\": [", "[DONE]"), "stream_broken", "malformed event", 1),
    (sse(chunk("a"), chunk("b")), "stream_broken", "without a finish_reason", 2),
    (sse(chunk("a"), json.dumps({"error": {"message": "out of KV cache"}})), "stream_broken", "out of KV cache", 1),
    (b"", "bad_response", "empty body", 0),
])
def test_unusable_streams_fail_at_once_not_retryable(db, procs, listener, scripted, body, code, fragment, relayed):
    scripted.answer = (200, "text/event-stream", body)
    start(db, procs, scripted)
    jid = submit(db, dict(CHAT, stream=True))
    wait_for(lambda: finished(db, jid, ("failed",)), 10, what="job failed")
    j = job(db, jid)
    assert j["attempt"] == 1
    assert j["error"]["code"] == code and fragment in j["error"]["message"], j["error"]
    wait_for(lambda: listener.completion_index(jid) is not None, 5, what="completion notification")
    assert len(listener.events(jid)) == relayed
