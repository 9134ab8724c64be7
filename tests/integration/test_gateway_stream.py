"""Streaming ("stream": true) through pgdispatch-gateway end to end: real PostgreSQL,
the real gateway binary, and a worker that relays the provider's events through
dispatch.stream. The worker is the real daemon in front of the fake provider once
the daemon streams (daemon/ calls dispatch.stream) and both are built; otherwise, or
with PGD_STREAM_WORKER=standin, a Python stand-in node that uses the same SQL API
(register, dispatch.exchange to lease and finish, dispatch.stream to relay). Tests of
the relay protocol itself (pieces out of order, split events, a lost piece) always
use the stand-in, since only it can misbehave that way on purpose.

The official OpenAI Node SDK (tests/sdk, installed by `make deps` / `make sdk-deps`)
streams through the gateway and must reassemble the same text as a non-stream call."""
import glob
import http.client
import json
import os
import random
import re
import select
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT, wait_for
from test_gateway import (CHAT, reply_channel, USE_REAL, RealWorker, StandIn, answer_text, assert_openai_error, chat_body,
                          gateway, job_row, request)  # noqa: F401  (gateway is a fixture)

SDK_DIR = os.path.join(ROOT, "tests", "sdk")


def _daemon_streams():
    for path in glob.glob(os.path.join(ROOT, "daemon", "*.c")):
        with open(path, errors="replace") as f:
            if "dispatch.stream" in f.read():
                return True
    return False


USE_REAL_STREAM = USE_REAL and os.environ.get("PGD_STREAM_WORKER", "auto") != "standin" and _daemon_streams()


# ---------------------------------------------------------------------------
# The stand-in node, streaming
# ---------------------------------------------------------------------------

class StreamStandIn(StandIn):
    """StandIn that streams: a job whose payload has "stream": true gets the events the
    fake provider would send (a role event, the reply text in stream_chunks pieces, a
    finish event, then the provider's own [DONE]) relayed with dispatch.stream, one
    event per stream_interval_ms, and then completes with the assembled response.
    Faults, applying to jobs leased from then on: none, 400, 500, 503 (fail before
    any event), hang (never answer), stall (two events, then nothing), die-mid-stream
    (half the events, then a failure), shuffle (all pieces in one call, in reverse
    order), split (each event in 'm' pieces of 7 bytes), gap (one piece never sent),
    nostream (complete without relaying anything)."""

    def __init__(self, db, name, models, slots):
        self.stream_chunks = 4
        self.stream_interval_ms = 0
        super().__init__(db, name, models, slots)

    def configure(self, fault=None, latency_ms=None, stream_chunks=None, stream_interval_ms=None):
        super().configure(fault=fault, latency_ms=latency_ms)
        if stream_chunks is not None:
            self.stream_chunks = stream_chunks
        if stream_interval_ms is not None:
            self.stream_interval_ms = stream_interval_ms

    def events(self, job_id, endpoint, payload, final):
        """The events' data fields, as a provider would stream the final result."""
        text = answer_text(json.dumps(final["result"]))
        chat = "messages" in payload
        k = max(1, min(self.stream_chunks, len(text)))
        bounds = [len(text) * i // k for i in range(k + 1)]
        base = {"id": "chatcmpl-%d" % job_id if chat else "cmpl-%d" % job_id,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": 1700000000, "model": payload.get("model")}

        def event(delta_text, role=None, finish=None):
            if chat:
                delta = {}
                if role:
                    delta["role"] = role
                if delta_text is not None:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
            return json.dumps(dict(base, choices=[choice]))

        out = [event("", role="assistant")] if chat else []
        out += [event(text[bounds[i]:bounds[i + 1]]) for i in range(k)]
        out.append(event(None if chat else "", finish="stop"))
        out.append("[DONE]")
        return out

    def plan(self, job_id, attempt, endpoint, payload):
        """(steps, final): steps is a list of lists of pieces to relay, one list per
        tick; final the exchange outcome after them (None: hold the job forever)."""
        fault = self.fault
        final = self.outcome(job_id, attempt, endpoint, payload)
        if fault == "hang":
            return [], None
        if "error" in final or not payload.get("stream"):
            return [], final
        if fault == "nostream":
            return [], final
        events = self.events(job_id, endpoint, payload, final)
        seq = iter(range(1 << 30))

        def pieces(data):
            if fault != "split":
                return [{"id": job_id, "attempt": attempt, "seq": next(seq), "more": False, "data": data}]
            parts = [data[i:i + 7] for i in range(0, len(data), 7)] or [""]
            return [{"id": job_id, "attempt": attempt, "seq": next(seq), "more": i < len(parts) - 1, "data": p}
                    for i, p in enumerate(parts)]

        steps = [pieces(e) for e in events]
        if fault == "shuffle":
            flat = [p for s in steps for p in s]
            steps = [list(reversed(flat))]
        elif fault == "gap":
            steps[2] = []
        elif fault == "stall":
            return steps[:2], None
        elif fault == "die-mid-stream":
            half = 1 + (len(steps) - 2) // 2
            return steps[:half], {"id": job_id, "attempt": attempt, "retryable": False, "error": {
                "code": "provider_stream_broken", "message": "the provider closed the stream mid-way"}}
        return steps, final

    def run(self):
        held = {}      # id -> {"steps": [...], "final": outcome or None, "due": t or None}
        look = True
        while not self.halt.is_set():
            now = time.monotonic()
            chunks, outs = [], []
            interval = self.stream_interval_ms / 1000.0
            for job_id in list(held):
                h = held[job_id]
                while h["due"] is not None and h["due"] <= now:
                    if h["steps"]:
                        chunks.extend(h["steps"].pop(0))
                        if interval > 0:
                            h["due"] = now + interval
                            break
                        continue
                    if h["final"] is not None:
                        outs.append(h["final"])
                        del held[job_id]
                    else:
                        h["due"] = None
                    break
            if chunks:
                for job_id, _attempt, ok in self.conn.execute(
                        "SELECT id, attempt, ok FROM dispatch.stream(%s::json)", (json.dumps(chunks),)).fetchall():
                    if not ok:
                        held.pop(job_id, None)
            if look or outs:
                rows = self.conn.execute(
                    "SELECT kind, id, attempt, endpoint, payload::text FROM dispatch.exchange(%s::json, %s)",
                    (json.dumps(outs), max(self.slots - len(held), 0))).fetchall()
                look = False
                for kind, job_id, attempt, endpoint, payload in rows:
                    if kind != "job":
                        continue
                    steps, final = self.plan(job_id, attempt, endpoint, json.loads(payload))
                    due = now + self.latency_ms / 1000.0
                    held[job_id] = {"steps": steps, "final": final,
                                    "due": None if (not steps and final is None) else due}
                    look = len(held) < self.slots
            dues = [h["due"] for h in held.values() if h["due"] is not None]
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


@pytest.fixture
def workers(procs, db):
    """workers(name, models, slots=8, standin=False): the real daemon + fake provider
    when the daemon streams, else (or with standin=True) the streaming stand-in."""
    started = []

    def start(name, models, slots=8, standin=False):
        if USE_REAL_STREAM and not standin:
            w = RealWorker(procs, db, name, models, slots)
        else:
            w = StreamStandIn(db, name, models, slots)
        started.append(w)
        wait_for(lambda: db.one("SELECT count(*) FROM dispatch.models() WHERE model = ANY(%s)",
                                (list(models),)) == len(models), timeout=20, what="models served")
        return w

    yield start
    for w in started:
        w.stop()


# ---------------------------------------------------------------------------
# An SSE client
# ---------------------------------------------------------------------------

class Stream:
    """POST with "stream": true; status, headers (lower-case), then events() yields
    (arrival time, data) per event until the server ends the response."""

    def __init__(self, port, body, path=CHAT, headers=None, timeout=30):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        self.t0 = time.monotonic()
        self.conn.request("POST", path, body=json.dumps(dict(body, stream=True)).encode(), headers=h)
        self.sock = self.conn.sock
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = {k.lower(): v for k, v in self.resp.getheaders()}

    def events(self):
        lines = []
        while True:
            line = self.resp.readline()
            if not line:
                assert not lines, "the stream ended inside an event: %r" % lines
                return
            line = line.decode().rstrip("\r\n")
            if line == "":
                if lines:
                    yield time.monotonic(), "\n".join(lines)
                    lines = []
                continue
            assert line.startswith("data: "), "not an SSE data line: %r" % line
            lines.append(line[6:])

    def all(self):
        return [data for _, data in self.events()]

    def close(self):
        self.conn.close()


def stream_all(port, body, path=CHAT, headers=None):
    s = Stream(port, body, path, headers)
    try:
        if s.status != 200:
            return s.status, s.headers, s.resp.read()
        return s.status, s.headers, s.all()
    finally:
        s.close()


def text_of(events):
    """The reply text the chunks add up to (chat deltas or completion texts)."""
    out = []
    for data in events:
        if data == "[DONE]":
            continue
        doc = json.loads(data)
        assert "error" not in doc, doc
        for c in doc.get("choices", []):
            out.append(c["delta"].get("content") or "" if "delta" in c else c.get("text") or "")
    return "".join(out)


def assert_done_stream(events):
    assert events, "no events"
    assert events[-1] == "[DONE]", events[-3:]
    assert events.count("[DONE]") == 1, events
    for data in events[:-1]:
        assert "error" not in json.loads(data), data


def assert_error_end(events, code=None):
    """The stream ended with an error event and no [DONE]."""
    assert "[DONE]" not in events, events
    err = json.loads(events[-1])["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    if code is not None:
        assert err["code"] == code, err
    return err


def cpu_seconds(pid):
    """User + system CPU time a process has used."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(port, name):
    _, _, body = request(port, "GET", "/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------------------
# Shape
# ---------------------------------------------------------------------------

def test_stream_shape_headers_and_text_equal_the_non_stream_answer(db, workers, gateway):
    workers("n1", ["m1"])
    port = gateway()

    st, _, body = request(port, "POST", CHAT, chat_body("m1", "stream me please"))
    assert st == 200, body
    whole = answer_text(body)

    st, h, events = stream_all(port, chat_body("m1", "stream me please"))
    assert st == 200, events
    assert h["content-type"].startswith("text/event-stream")
    assert h["cache-control"] == "no-cache"
    assert h["x-accel-buffering"] == "no"
    assert "content-length" not in h
    assert_done_stream(events)
    assert len(events) >= 4             # role, content pieces, finish, [DONE]
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert text_of(events) == whole == "echo: stream me please"

    # /v1/completions streams too.
    st, _, body = request(port, "POST", "/v1/completions", {"model": "m1", "prompt": "once upon"})
    whole = answer_text(body)
    st, h, events = stream_all(port, {"model": "m1", "prompt": "once upon"}, path="/v1/completions")
    assert st == 200 and h["content-type"].startswith("text/event-stream")
    assert_done_stream(events)
    assert text_of(events) == whole == "echo: once upon"

    # The job went out as sent (with "stream": true) and ended with the assembled answer.
    jid, payload, state, result = db.sql("SELECT id, payload::text, state, result::text FROM dispatch.jobs "
                                         "WHERE endpoint = %s ORDER BY id DESC LIMIT 1", (CHAT,))[0]
    assert json.loads(payload)["stream"] is True
    assert state == "succeeded"
    assert answer_text(result) == "echo: stream me please"

    # Embeddings do not stream.
    st, _, body = request(port, "POST", "/v1/embeddings", {"model": "m1", "input": "x", "stream": True})
    assert st == 400
    assert_openai_error(body, "stream_unsupported")

    # Metrics: streamed requests and time to the first event.
    assert metric(port, "pgdispatch_gateway_stream_requests_total") == 2
    assert metric(port, "pgdispatch_gateway_stream_first_event_seconds_count") == 2
    assert metric(port, "pgdispatch_gateway_streams_ended_total") == 2


def test_many_chunks_and_the_gateway_keeps_serving(db, workers, gateway):
    w = workers("n1", ["m1"])
    port = gateway()
    w.configure(stream_chunks=200)
    prompt = "a fairly long prompt that is echoed back in many small pieces " * 3
    st, _, events = stream_all(port, chat_body("m1", prompt))
    assert st == 200
    assert_done_stream(events)
    assert text_of(events) == ("echo: " + prompt)[:6 + 256]
    assert len(events) > 100
    # Keep-alive connection after a stream, and plain requests still work.
    st, _, body = request(port, "POST", CHAT, chat_body("m1", "plain"))
    assert st == 200 and answer_text(body) == "echo: plain"


def test_the_statements_sent_per_request_are_planned_once_per_connection(db, workers, gateway):
    """What the gateway sends for every request (submit, results) and what the daemon
    sends for every job and stream piece is prepared once on each connection: with
    pg_stat_statements.track_planning on, such a statement is planned a few times per
    connection (custom plans, then the generic one), however often it runs. Sent as
    text, it would be planned at every call."""
    db.sql('ALTER DATABASE "%s" SET pg_stat_statements.track_planning = on' % db.name)
    w = workers("n1", ["m1"])
    port = gateway()                      # 2 database connections
    w.configure(stream_chunks=4)
    for i in range(40):
        st, _, events = stream_all(port, chat_body("m1", "streamed %d" % i))
        assert st == 200 and text_of(events) == "echo: streamed %d" % i
        st, _, body = request(port, "POST", CHAT, chat_body("m1", "plain %d" % i))
        assert st == 200 and answer_text(body) == "echo: plain %d" % i
    rows = db.sql(
        "SELECT substring(s.query FROM 'dispatch\\.([a-z_]+)\\('), sum(s.calls)::int, sum(s.plans)::int "
        "FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
        "WHERE d.datname = current_database() AND s.toplevel AND s.userid <> 'postgres'::regrole "
        "AND s.query ~ 'dispatch\\.(submit_many|results|stream|exchange|settle)\\(' GROUP BY 1")
    counts = {fn: (calls, plans) for fn, calls, plans in rows}
    # The daemon's statements only when the real daemon runs (not the stand-in).
    daemon = ["stream", "exchange", "settle"] if USE_REAL_STREAM else []
    for fn in ["submit_many", "results"] + daemon[:1]:
        assert counts.get(fn, (0, 0))[0] >= 40, counts
    if daemon:
        assert sum(counts.get(fn, (0, 0))[0] for fn in daemon[1:]) >= 40, counts
    for fn in ["submit_many", "results"] + daemon:
        calls, plans = counts.get(fn, (0, 0))
        assert plans <= 2 * 6, "%s: %d plans for %d calls (%s)" % (fn, plans, calls, counts)


# ---------------------------------------------------------------------------
# The relay protocol (stand-in only)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["shuffle", "split"])
def test_pieces_out_of_order_or_split_are_put_back_together(db, workers, gateway, fault):
    w = workers("n1", ["m1"], standin=True)
    port = gateway()
    w.configure(fault=fault, stream_chunks=12)
    st, _, events = stream_all(port, chat_body("m1", "put me back in order"))
    assert st == 200
    assert_done_stream(events)
    assert text_of(events) == "echo: put me back in order"


def test_a_lost_piece_ends_the_stream_with_an_error_event(db, workers, gateway):
    w = workers("n1", ["m1"], standin=True)
    port = gateway()
    w.configure(fault="gap", stream_chunks=6)
    st, h, events = stream_all(port, chat_body("m1", "something goes missing"))
    assert st == 200 and h["content-type"].startswith("text/event-stream")
    err = assert_error_end(events, "stream_incomplete")
    assert "incomplete" in err["message"]
    # What did go out is the part before the gap, in order, nothing after it.
    assert "echo: something goes missing".startswith(text_of(events[:-1]))


def test_a_job_finished_without_relayed_events_is_sent_whole(db, workers, gateway):
    w = workers("n1", ["m1"], standin=True)
    port = gateway()
    w.configure(fault="nostream")
    st, h, events = stream_all(port, chat_body("m1", "all at once"))
    assert st == 200 and h["content-type"].startswith("text/event-stream")
    assert h["x-accel-buffering"] == "no"
    assert_done_stream(events)
    assert len(events) == 2
    assert json.loads(events[0])["object"] == "chat.completion.chunk"
    assert text_of(events) == "echo: all at once"
    assert metric(port, 'pgdispatch_gateway_streams_ended_total{how="whole"}') == 1


def test_stray_and_malformed_pieces_are_ignored(db, workers, gateway):
    workers("n1", ["m1"], standin=True)
    port = gateway()
    channel = reply_channel(gateway, port)
    for payload in ["S999999:0:e:abcdefgh12345678abcdefgh:{}", "S999999:0:e::{}", "S1:x:e::{}", "Sgarbage",
                    "S5:0:q::{}", "S5:0:e:{}", "S5:0:e:bad-token:{}"]:
        db.sql("SELECT pg_notify(%s, %s)", (channel, payload))
    st, _, events = stream_all(port, chat_body("m1", "still fine"))
    assert st == 200
    assert_done_stream(events)
    assert text_of(events) == "echo: still fine"


# ---------------------------------------------------------------------------
# Load and time
# ---------------------------------------------------------------------------

def test_two_hundred_concurrent_streams(db, workers, gateway):
    w = workers("n1", ["m1"], slots=256)
    port = gateway("--threads", "4")      # MHD's thread pool: suspend/resume across threads
    w.configure(stream_chunks=8, stream_interval_ms=20)

    def one(i):
        st, _, events = stream_all(port, chat_body("m1", "stream %d" % i))
        return st, events

    with ThreadPoolExecutor(200) as pool:
        results = list(pool.map(one, range(200)))
    for i, (st, events) in enumerate(results):
        assert st == 200, (i, events)
        assert_done_stream(events)
        assert text_of(events) == "echo: stream %d" % i
    assert db.one("SELECT count(*) FROM dispatch.jobs WHERE state = 'succeeded'") == 200
    assert metric(port, 'pgdispatch_gateway_streams_ended_total{how="done"}') == 200


def test_slow_stream_events_are_written_as_they_come(db, workers, gateway):
    w = workers("n1", ["m1"])
    port = gateway()
    w.configure(stream_chunks=5, stream_interval_ms=300)
    s = Stream(port, chat_body("m1", "slowly now"))
    try:
        assert s.status == 200
        got = []
        for t, data in s.events():
            if not got:
                # The first event is here while the job is still running.
                assert db.one("SELECT state FROM dispatch.jobs") == "leased"
            got.append((t, data))
    finally:
        s.close()
    events = [d for _, d in got]
    assert_done_stream(events)
    assert text_of(events) == "echo: slowly now"
    times = [t for t, _ in got]
    # 5 content events + role + finish at 300 ms apart: spread over well over a second.
    assert times[-1] - times[0] > 1.2, times
    gaps = [b - a for a, b in zip(times[:-2], times[1:-1])]
    assert sum(1 for g in gaps if g > 0.15) >= 4, gaps


def test_deadline_before_and_after_the_first_event(db, workers, gateway):
    w = workers("n1", ["m1"], standin=True)
    port = gateway()
    # Nothing streamed before the deadline: the usual 504.
    w.configure(fault="hang")
    st, h, body = stream_all(port, chat_body("m1"), headers={"X-Request-Timeout": "1"})
    assert st == 504, body
    assert h["content-type"].startswith("application/json")
    assert_openai_error(body, "deadline_exceeded")

    # Two events, then nothing: an error event when the deadline passes. Meanwhile the
    # connection waits suspended: the gateway burns no CPU (no busy loop).
    w.configure(fault="stall")
    pid = gateway.procs[port].pid
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    st, h, events = stream_all(port, chat_body("m1", "stalls"), headers={"X-Request-Timeout": "1.5"})
    assert st == 200
    assert 1.3 < time.monotonic() - t0 < 6
    assert cpu_seconds(pid) - cpu0 < 0.5
    assert len(events) == 3
    assert_error_end(events, "deadline_exceeded")
    jid = db.one("SELECT max(id) FROM dispatch.jobs")
    wait_for(lambda: job_row(db, jid)[0] in ("expired", "cancelled"), what="job ended")


# ---------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------

def long_stream(w):
    """Streams from now on go on for many seconds after their first event: 50 events
    500 ms apart from the fake provider, or a stall after the first from the stand-in."""
    if USE_REAL_STREAM:
        w.configure(stream_chunks=50, stream_interval_ms=500)
    else:
        w.configure(fault="stall")


def test_disconnect_mid_stream_cancels_the_job(db, workers, gateway):
    w = workers("n1", ["m1"])
    port = gateway()
    long_stream(w)
    s = Stream(port, chat_body("m1", "bye now, I leave early"))
    assert s.status == 200
    first = next(s.events())
    assert json.loads(first[1])["choices"]
    s.sock.shutdown(socket.SHUT_RDWR)
    s.close()
    jid = db.one("SELECT id FROM dispatch.jobs")
    wait_for(lambda: job_row(db, jid)[0] == "cancelled", what="job cancelled")
    assert job_row(db, jid)[1] == "client went away"
    wait_for(lambda: metric(port, 'pgdispatch_gateway_streams_ended_total{how="client_gone"}') == 1,
             what="stream counted as client_gone")
    # The gateway keeps serving, streams included.
    w.configure(**({"stream_interval_ms": 0} if USE_REAL_STREAM else {"fault": "none"}))
    st, _, events = stream_all(port, chat_body("m1", "again"))
    assert st == 200 and text_of(events) == "echo: again"


def test_a_stream_whose_job_is_replaced_ends_with_an_error_event(db, workers, gateway):
    """A relaying stream whose job id comes to name another job (a crash lost its
    submit; simulated by changing the job's created_at) ends with an error event
    `database_unavailable` when the gateway next reads that id, and leaves the job
    that now has the id alone (not cancelled)."""
    w = workers("n1", ["m1"])
    port = gateway()
    long_stream(w)
    s = Stream(port, chat_body("m1", "a long answer"))
    try:
        assert s.status == 200
        events = s.events()
        assert json.loads(next(events)[1])["choices"]
        jid = db.one("SELECT id FROM dispatch.jobs")
        db.sql("UPDATE dispatch.jobs SET created_at = created_at - interval '1 s' WHERE id = %s", (jid,))
        db.sql("SELECT pg_notify(%s, %s)", (reply_channel(gateway, port), str(jid)))
        rest = [data for _, data in events]
    finally:
        s.close()
    err = assert_error_end(rest, "database_unavailable")
    assert "job %d is no longer in the database" % jid in err["message"]
    assert db.one("SELECT state FROM dispatch.jobs WHERE id = %s", (jid,)) in ("leased", "succeeded")


def test_provider_dying_mid_stream_gives_an_error_event(db, workers, gateway):
    w = workers("n1", ["m1"])
    port = gateway()
    db.sql("SELECT dispatch.set_setting('retry_base_ms', 0)")
    w.configure(fault="die-mid-stream", stream_chunks=8)
    st, h, events = stream_all(port, chat_body("m1", "this will break halfway"), headers={"X-Request-Timeout": "20"})
    assert st == 200 and h["content-type"].startswith("text/event-stream")
    assert len(events) >= 2
    assert_error_end(events)
    assert "echo: this will break halfway".startswith(text_of(events[:-1]))
    assert metric(port, 'pgdispatch_gateway_streams_ended_total{how="error"}') == 1


def test_provider_errors_before_the_first_event_are_http_errors(db, workers, gateway):
    w = workers("n1", ["m1"])
    port = gateway()
    db.sql("SELECT dispatch.set_setting('retry_base_ms', 0)")

    w.configure(fault="500")
    st, h, body = stream_all(port, chat_body("m1"), headers={"X-Request-Timeout": "20"})
    assert st == 502, body
    assert h["content-type"].startswith("application/json")
    assert_openai_error(body)

    w.configure(fault="400")
    st, h, body = stream_all(port, chat_body("m1"))
    assert st == 400, body
    assert "error" in json.loads(body)          # the provider's own body, passed through

    # Refused at submit: unknown model.
    st, _, body = stream_all(port, chat_body("no-such-model"))
    assert st == 404
    assert_openai_error(body, "model_not_found")

    w.configure(fault="none")
    st, _, events = stream_all(port, chat_body("m1", "ok again"))
    assert st == 200 and text_of(events) == "echo: ok again"


def test_sigterm_ends_open_streams_and_exits_zero(db, workers, gateway):
    w = workers("n1", ["m1"], standin=True)
    port = gateway("--grace-ms", "300")
    w.configure(fault="stall")
    s = Stream(port, chat_body("m1", "shutdown comes"))
    assert s.status == 200
    it = s.events()
    next(it)
    gateway.procs[port].signal(15)
    events = [d for _, d in it]
    s.close()
    assert_error_end(events, "shutting_down")
    assert gateway.procs[port].proc.wait(15) == 0
    jid = db.one("SELECT id FROM dispatch.jobs")
    wait_for(lambda: job_row(db, jid)[0] == "cancelled", what="job cancelled")


# ---------------------------------------------------------------------------
# The official OpenAI Node SDK
# ---------------------------------------------------------------------------

def run_sdk(port, *args):
    if not shutil.which("node"):
        pytest.fail("node is not installed; run make deps")
    if not os.path.isdir(os.path.join(SDK_DIR, "node_modules", "openai")):
        pytest.fail("the OpenAI Node SDK is not installed in tests/sdk; run make sdk-deps")
    r = subprocess.run(["node", os.path.join(SDK_DIR, "stream_check.mjs"), "--port", str(port)] + list(args),
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_openai_node_sdk_streams_the_same_text(db, workers, gateway):
    w = workers("n1", ["m1"])
    port = gateway()
    w.configure(stream_chunks=6)
    prompt = "Tell me about PostgreSQL, please."
    whole = run_sdk(port, "--model", "m1", "--prompt", prompt, "--no-stream")
    streamed = run_sdk(port, "--model", "m1", "--prompt", prompt)
    assert whole["error"] is None and streamed["error"] is None, (whole, streamed)
    assert streamed["text"] == whole["text"] == "echo: " + prompt
    assert streamed["chunks"] >= 3
    assert streamed["finish_reason"] == "stop"

    # Text completions as well.
    whole = run_sdk(port, "--model", "m1", "--prompt", "once upon a time", "--api", "completions", "--no-stream")
    streamed = run_sdk(port, "--model", "m1", "--prompt", "once upon a time", "--api", "completions")
    assert streamed["error"] is None, streamed
    assert streamed["text"] == whole["text"] == "echo: once upon a time"

    # An error event mid-stream surfaces as an SDK error after the partial text.
    db.sql("SELECT dispatch.set_setting('retry_base_ms', 0)")
    w.configure(fault="die-mid-stream", stream_chunks=8)
    broken = run_sdk(port, "--model", "m1", "--prompt", "this will break halfway")
    assert broken["error"] is not None, broken
    assert "echo: this will break halfway".startswith(broken["text"])

    # And an HTTP error before the first event as an APIError with its status.
    w.configure(fault="400")
    refused = run_sdk(port, "--model", "m1", "--prompt", "no")
    assert refused["error"] is not None and refused["error"]["status"] == 400, refused
