"""Hostile input against the real gateway (with the real daemon and the fake provider
behind it): the generated corpus of tests/hostile/corpus.py, sent over raw sockets so
that malformed HTTP can be sent at all, concurrently with a small pool.

Every case must get the answer its category calls for (the right 4xx, or a closed
connection for what is not HTTP, or silence for a request that is not complete yet);
the gateway must answer /healthz after every batch; the refused requests must leave no
job behind (jobs are created only by the cases that are fine for the gateway and
refused by the provider, and those end failed); and the gateway must exit 0 with no
sanitizer report (the gateway fixture checks that at teardown)."""
import concurrent.futures
import json
import os
import select
import socket
import sys
import time

from conftest import ROOT, http_get, wait_for
from test_gateway import gateway, gateway_dsn, workers  # noqa: F401  (fixtures)

sys.path.insert(0, os.path.join(ROOT, "tests", "hostile"))
import corpus  # noqa: E402

POOL = 12
BATCH = 120


# ---------------------------------------------------------------------------
# Raw HTTP
# ---------------------------------------------------------------------------

class Outcome:
    def __init__(self, kind, status=None, headers=None, body=b"", elapsed=0.0):
        self.kind = kind          # "status", "close", "silence", "garbage"
        self.status = status
        self.headers = headers or {}
        self.body = body
        self.elapsed = elapsed

    @property
    def key(self):
        return self.status if self.kind == "status" else self.kind

    def __repr__(self):
        if self.kind == "status":
            return "%d %s" % (self.status, self.body[:160])
        if self.kind == "garbage":
            return "garbage %r" % self.body[:160]
        return self.kind


def _read_response(sock, deadline, head_only=False):
    data = b""
    while True:
        if b"\r\n\r\n" in data:
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
                return Outcome("garbage", body=data)
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
            want = 0 if head_only else int(headers.get("content-length", "0") or 0)
            while len(rest) < want and time.monotonic() < deadline:
                try:
                    sock.settimeout(max(0.05, deadline - time.monotonic()))
                    more = sock.recv(65536)
                except (socket.timeout, OSError):
                    break
                if not more:
                    break
                rest += more
            return Outcome("status", int(parts[1]), headers, rest)
        left = deadline - time.monotonic()
        if left <= 0:
            return Outcome("silence" if not data else "garbage", body=data)
        try:
            sock.settimeout(left)
            more = sock.recv(65536)
        except socket.timeout:
            return Outcome("silence" if not data else "garbage", body=data)
        except OSError:
            more = b""
        if not more:
            return Outcome("close" if not data else "garbage", body=data)
        data += more


def send_case(port, case):
    """Write the case's pieces on a fresh connection and read what comes back."""
    start = time.monotonic()
    head_only = case.data.startswith(b"HEAD ")
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        for data, pause in case.pieces:
            try:
                sock.sendall(data)
            except OSError:      # the server answered early and closed, or reset
                break
            if pause > 0:
                # A short wait for an early answer (413 before the body): not a sleep,
                # it returns as soon as the server says something.
                r, _, _ = select.select([sock], [], [], pause)
                if r:
                    break
        out = _read_response(sock, time.monotonic() + case.read_timeout, head_only)
    finally:
        sock.close()
    out.elapsed = time.monotonic() - start
    return out


def check_case(case, out):
    """None when out is what the case calls for, else a description."""
    if out.key not in case.expect:
        return "%s/%s: expected %s, got %r" % (case.category, case.name, sorted(map(str, case.expect)), out)
    if out.kind == "status" and out.status >= 400 and not case.forwards and out.body \
            and out.headers.get("content-type", "").startswith("application/json"):
        # The gateway's own refusals use the OpenAI error body.
        try:
            err = json.loads(out.body)["error"]
            assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
        except Exception as e:  # noqa: BLE001
            return "%s/%s: %d with a body that is not an OpenAI error (%s): %r" % (
                case.category, case.name, out.status, e, out.body[:200])
    return None


def healthz_ok(port):
    try:
        return http_get("http://127.0.0.1:%d/healthz" % port, timeout=5)[0] == 200
    except OSError:
        return False


def run_cases(port, cases):
    """Run cases concurrently in batches; /healthz must answer after each batch.
    Returns the list of problems."""
    problems = []
    with concurrent.futures.ThreadPoolExecutor(POOL) as pool:
        for i in range(0, len(cases), BATCH):
            batch = cases[i:i + BATCH]
            for case, out in zip(batch, pool.map(lambda c: send_case(port, c), batch)):
                p = check_case(case, out)
                if p:
                    problems.append(p)
            if not healthz_ok(port):
                problems.append("gateway stopped answering /healthz after batch %d (cases %s..)" % (
                    i // BATCH, batch[0].name))
                break
    return problems


def start_system(db, workers, gateway):  # noqa: F811
    workers("hostile", [corpus.KNOWN], slots=4)
    return gateway("--max-body-bytes", str(corpus.LIMIT), "--log-level", "info")


def unfinished_jobs(db):
    return db.one("SELECT count(*) FROM dispatch.jobs WHERE state IN ('queued', 'leased')")


# ---------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------

def test_corpus_is_large_and_covers_every_category():
    cases = corpus.corpus()
    assert len(cases) >= 500
    cats = {c.category for c in cases}
    assert cats == {"bad_json", "deep_nesting", "huge_strings", "wrong_types", "invalid_utf8", "nul_bytes",
                    "header_abuse", "slowloris", "chunked", "job_paths", "wrong_methods", "http_versions",
                    "absurd_urls"}
    for cat in cats:
        assert sum(c.category == cat for c in cases) >= 10, cat


def test_hostile_corpus_gets_the_right_answers_and_leaves_no_job(db, workers, gateway):  # noqa: F811
    port = start_system(db, workers, gateway)
    cases = corpus.corpus()
    started = time.monotonic()
    problems = run_cases(port, cases)
    elapsed = time.monotonic() - started
    sys.stderr.write("hostile corpus: %d cases in %.1f s, %d problems\n" % (len(cases), elapsed, len(problems)))
    assert not problems, "%d of %d cases were answered wrongly:\n  %s" % (
        len(problems), len(cases), "\n  ".join(problems[:80]))
    assert healthz_ok(port)

    # No job behind: only the forwarded cases made jobs, and every one of those has
    # ended, failed with the provider's 400. Nothing is queued or leased.
    forwarded = sum(c.forwards for c in cases)
    wait_for(lambda: unfinished_jobs(db) == 0, timeout=30, what="no queued or leased jobs")
    rows = db.sql("SELECT state, error->>'code', error->>'status' FROM dispatch.jobs")
    assert len(rows) == forwarded, "jobs created: %d, forwarded cases: %d" % (len(rows), forwarded)
    assert all(r == ("failed", "provider_4xx", "400") for r in rows), rows
    assert elapsed < 100, "the corpus took %.1f s" % elapsed


def test_slowloris_connections_do_not_starve_other_clients(db, workers, gateway):  # noqa: F811
    """100 connections that send part of a request and stall: others are still served
    at once, the stalled ones get nothing, and closing them leaves no job."""
    port = start_system(db, workers, gateway)
    body = corpus.body_for(corpus.CHAT, model=corpus.KNOWN)
    head = corpus.http("POST", corpus.CHAT, None, headers=[("Content-Length", str(len(body)))])
    held = []
    try:
        for i in range(100):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            # Half of them stop in the head, half in the body.
            s.sendall(head[:30] if i % 2 else head + body[:10])
            held.append(s)
        t0 = time.monotonic()
        assert healthz_ok(port)
        ok = corpus.Case("normal", "x", corpus.post(corpus.CHAT, body), 200)
        out = send_case(port, ok)
        assert out.key == 200, out
        assert time.monotonic() - t0 < 10
        # The stalled connections are held for a measured second: still no answer.
        r, _, _ = select.select(held, [], [], 1.0)
        assert r == [], "a stalled connection was answered: %r" % r[0].recv(200)
    finally:
        for s in held:
            s.close()
    assert healthz_ok(port)
    wait_for(lambda: unfinished_jobs(db) == 0, what="no queued or leased jobs")
    assert db.one("SELECT count(*) FROM dispatch.jobs") == 1


# ---------------------------------------------------------------------------
# Former known gaps (each case's `fixed` says what was wrong), on their own: a quick
# regression check that needs no other case to have passed.
# ---------------------------------------------------------------------------

def test_former_gaps_get_the_right_answer(db, workers, gateway):  # noqa: F811
    port = start_system(db, workers, gateway)
    cases = [c for c in corpus.corpus() if c.fixed]
    assert len(cases) >= 30
    problems = run_cases(port, cases)
    assert not problems, "%d of %d former gaps:\n  %s" % (len(problems), len(cases), "\n  ".join(problems))
    assert healthz_ok(port)
    # Every one of them was refused by the gateway itself: no job.
    assert db.one("SELECT count(*) FROM dispatch.jobs") == 0


def test_job_api_refuses_endpoints_outside_the_inference_surface(db, workers, gateway):  # noqa: F811
    """POST /v1/jobs must not let a client pick any path on the model server (admin
    endpoints such as Ollama's /api/pull or the fake provider's /_fake/config): only
    the inference routes are allowed."""
    port = start_system(db, workers, gateway)
    for ep in ("/_fake/config", "/api/pull", "/v1/chat/completions/../../_fake/config", "//evil/x",
               "/v1/chat/completions/", "/V1/chat/completions", "/v1/chat/completions?x=1", "/v1/models"):
        doc = {"model": corpus.KNOWN, "endpoint": ep, "payload": {"model": corpus.KNOWN}}
        case = corpus.Case("ep", "x", corpus.post("/v1/jobs", json.dumps(doc).encode()), 400)
        out = send_case(port, case)
        assert out.key == 400, "endpoint %s: %r" % (ep, out)
        assert check_case(case, out) is None
    assert db.one("SELECT count(*) FROM dispatch.jobs") == 0
    # The three inference routes are still accepted (the unknown model then gets 404).
    for ep in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        doc = {"model": corpus.UNKNOWN, "endpoint": ep, "payload": {"model": corpus.UNKNOWN}}
        out = send_case(port, corpus.Case("ep", "x", corpus.post("/v1/jobs", json.dumps(doc).encode()), 404))
        assert out.key == 404, "endpoint %s: %r" % (ep, out)
