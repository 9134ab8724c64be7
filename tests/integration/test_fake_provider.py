"""The fake provider (tests/fake_provider) over real HTTP: OpenAI shapes, streams that
reassemble to the non-stream answer, discovery endpoints per family, injected faults,
latency that does not block other requests, the /_fake/ control endpoints, and a clean
exit on SIGTERM. No PostgreSQL needed."""
import http.client
import json
import math
import threading
import time

import pytest

from conftest import binary, free_port, http_get, port_open, wait_for

CHAT = "/v1/chat/completions"


class Fake:
    def __init__(self, proc, port):
        self.proc = proc
        self.port = port
        self.base = "http://127.0.0.1:%d" % port

    def request(self, method, path, body=None, headers=None, timeout=10):
        """(status, headers dict, body bytes); connection errors propagate."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
            hdrs = {"Content-Type": "application/json"}
            hdrs.update(headers or {})
            conn.request(method, path, body=data, headers=hdrs)
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def post(self, path, body, headers=None, timeout=10):
        return self.request("POST", path, body, headers, timeout)

    def get_json(self, path):
        status, body, _ = http_get(self.base + path)
        return status, json.loads(body) if body else None

    def stats(self):
        return self.get_json("/_fake/stats")[1]

    def config(self, **changes):
        status, _, body = self.post("/_fake/config", changes)
        assert status == 200, body
        return json.loads(body)


@pytest.fixture
def fake(procs):
    """fake(*flags, env=None) starts a fake provider on a free port and waits for it.
    At teardown each one must exit 0 on SIGTERM (under ASan: also without leaks)."""
    started = []

    def start(*flags, env=None):
        port = free_port()
        p = procs.start("fake-provider-%d" % port,
                        [binary("fake-provider"), "--port", str(port)] + list(flags), env=env)
        wait_for(lambda: port_open(port) or not p.alive(), what="fake provider listening")
        assert p.alive(), p.output()
        started.append(p)
        return Fake(p, port)

    yield start
    for p in started:
        code = p.stop(timeout=10)
        assert code == 0, "fake provider exited %s:\n%s" % (code, p.output()[-4000:])


def chat_body(text, model="m1", **extra):
    body = {"model": model, "messages": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": text}]}
    body.update(extra)
    return body


def sse_events(raw):
    """The data payloads of an event stream, in order."""
    events = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            events.append(block[len("data: "):])
    return events


# ---- shapes -------------------------------------------------------------------------


def test_chat_completion_echoes_last_user_message(fake):
    f = fake()
    status, headers, body = f.post(CHAT, chat_body("hello wörld", model="llama-3"))
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert doc["id"].startswith("chatcmpl-")
    assert doc["object"] == "chat.completion"
    assert isinstance(doc["created"], int)
    assert doc["model"] == "llama-3"
    choice = doc["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "echo: hello wörld"}
    assert choice["finish_reason"] == "stop"
    usage = doc["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    # content given as parts counts too; ids differ per response
    status, _, body2 = f.post(CHAT, {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert status == 200
    doc2 = json.loads(body2)
    assert doc2["choices"][0]["message"]["content"] == "echo: ab"
    assert doc2["id"] != doc["id"]


def test_echo_is_truncated(fake):
    f = fake()
    _, _, body = f.post(CHAT, chat_body("x" * 5000))
    content = json.loads(body)["choices"][0]["message"]["content"]
    assert content == "echo: " + "x" * 256


def test_text_completion(fake):
    f = fake()
    status, _, body = f.post("/v1/completions", {"model": "m2", "prompt": "once upon"})
    assert status == 200
    doc = json.loads(body)
    assert doc["object"] == "text_completion"
    assert doc["model"] == "m2"
    assert doc["choices"][0]["text"] == "echo: once upon"
    assert doc["choices"][0]["finish_reason"] == "stop"
    assert doc["usage"]["total_tokens"] == doc["usage"]["prompt_tokens"] + doc["usage"]["completion_tokens"]


def test_embeddings_are_deterministic_unit_vectors(fake):
    f = fake()

    def embed(inp, **extra):
        status, _, body = f.post("/v1/embeddings", dict({"model": "e5", "input": inp}, **extra))
        assert status == 200, body
        return json.loads(body)

    doc = embed(["alpha", "beta", "alpha"])
    assert doc["object"] == "list" and doc["model"] == "e5"
    assert doc["usage"]["prompt_tokens"] > 0
    data = doc["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in data)
    a, b, a2 = (d["embedding"] for d in data)
    assert a == a2 and a != b
    assert abs(math.sqrt(sum(x * x for x in a)) - 1.0) < 1e-6
    assert embed("alpha")["data"][0]["embedding"] == a
    assert len(embed("alpha", dimensions=64)["data"][0]["embedding"]) == 64


def test_models_list(fake):
    f = fake("--models", "llama-3, qwen2", "--family", "vllm")
    status, doc = f.get_json("/v1/models")
    assert status == 200
    assert doc["object"] == "list"
    assert [m["id"] for m in doc["data"]] == ["llama-3", "qwen2"]
    for m in doc["data"]:
        assert m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"] == "vllm"


@pytest.mark.parametrize("family,slots,props,server_info", [
    ("llamacpp", 3, 3, None),
    ("llamacpp", 0, None, None),
    ("sglang", 5, None, 5),
    ("sglang", 0, None, None),
    ("vllm", 8, None, None),
])
def test_capacity_endpoints_follow_family(fake, family, slots, props, server_info):
    f = fake("--family", family, "--slots", str(slots), "--models", "m1")
    status, doc = f.get_json("/props")
    if props is None:
        assert status == 404 and doc["error"]["type"] == "invalid_request_error"
    else:
        assert status == 200
        assert doc["total_slots"] == props
        assert "default_generation_settings" in doc
    status, doc = f.get_json("/server_info")
    if server_info is None:
        assert status == 404
    else:
        assert status == 200 and doc["max_running_requests"] == server_info
        assert doc["model_path"] == "m1"
    assert f.get_json("/health") == (200, {"status": "ok"})


def test_ollama_family(fake):
    f = fake("--family", "ollama", "--models", "llama3:8b")
    status, body, _ = http_get(f.base + "/")
    assert status == 200 and body == b"Ollama is running"
    status, doc = f.get_json("/api/tags")
    assert status == 200 and doc["models"][0]["name"] == "llama3:8b"
    assert f.get_json("/v1/models")[1]["data"][0]["owned_by"] == "library"


def test_bad_requests_get_openai_errors(fake):
    f = fake()
    cases = [
        (f.post(CHAT, b"{not json"), 400),
        (f.post(CHAT, {"messages": [{"role": "user", "content": "hi"}]}), 400),   # no model
        (f.post(CHAT, {"model": "m"}), 400),                                      # no messages
        (f.post("/v1/completions", {"model": "m"}), 400),                         # no prompt
        (f.post("/v1/embeddings", {"model": "m"}), 400),                          # no input
        (f.request("GET", CHAT), 405),
        (f.request("GET", "/v1/nothing"), 404),
        (f.post("/nowhere", {"model": "m"}), 404),
    ]
    for (status, headers, body), want in cases:
        assert status == want, body
        err = json.loads(body)["error"]
        assert err["type"] == "invalid_request_error"
        assert err["message"] and "code" in err


# ---- streams --------------------------------------------------------------------------


def test_chat_stream_reassembles_the_non_stream_answer(fake):
    f = fake("--stream-chunks", "7")
    text = "stream me, please — ünïcode"
    _, _, plain = f.post(CHAT, chat_body(text))
    expected = json.loads(plain)["choices"][0]["message"]["content"]

    status, headers, raw = f.post(CHAT, chat_body(text, stream=True))
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream"
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m1" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert len([p for p in pieces if p]) == 7
    assert "".join(pieces) == expected


def test_stream_usage_chunk_when_asked(fake):
    f = fake()
    _, _, raw = f.post(CHAT, chat_body("u", stream=True, stream_options={"include_usage": True}))
    events = sse_events(raw)
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["total_tokens"] > 0


def test_completion_stream(fake):
    f = fake("--stream-chunks", "3")
    _, _, raw = f.post("/v1/completions", {"model": "m", "prompt": "abcdef", "stream": True})
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "echo: abcdef"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def read_events_timed(f, body, headers=None):
    """Streams a chat request; returns [(monotonic time, event payload)]."""
    conn = http.client.HTTPConnection("127.0.0.1", f.port, timeout=20)
    try:
        hdrs = {"Content-Type": "application/json"}
        hdrs.update(headers or {})
        conn.request("POST", CHAT, body=json.dumps(body).encode(), headers=hdrs)
        r = conn.getresponse()
        assert r.status == 200
        out = []
        while True:
            line = r.readline()
            if not line:
                return out
            if line.startswith(b"data: "):
                out.append((time.monotonic(), line[6:].strip().decode()))
    finally:
        conn.close()


def test_stream_interval_spaces_events(fake):
    f = fake("--stream-chunks", "4", "--stream-interval-ms", "60")
    events = read_events_timed(f, chat_body("spaced out", stream=True))
    assert events[-1][1] == "[DONE]"
    assert len(events) == 7  # role, 4 deltas, finish, [DONE]
    gaps = [b[0] - a[0] for a, b in zip(events, events[1:])]
    assert min(gaps) >= 0.05, gaps


def test_slow_fault_trickles(fake):
    f = fake("--stream-chunks", "3", "--slow-interval-ms", "150")
    events = read_events_timed(f, chat_body("slowly", stream=True), {"X-Fake-Fault": "slow"})
    gaps = [b[0] - a[0] for a, b in zip(events, events[1:])]
    assert len(events) == 6 and min(gaps) >= 0.13, gaps
    # non-stream: the same body, delivered in pieces over (chunks-1) intervals
    t0 = time.monotonic()
    status, _, body = f.post(CHAT, chat_body("slowly"), {"X-Fake-Fault": "slow"})
    assert status == 200 and time.monotonic() - t0 >= 0.28
    assert json.loads(body)["choices"][0]["message"]["content"] == "echo: slowly"


def test_die_mid_stream_cuts_the_connection(fake):
    f = fake("--stream-chunks", "6")
    conn = http.client.HTTPConnection("127.0.0.1", f.port, timeout=10)
    conn.request("POST", CHAT, body=json.dumps(chat_body("cut me off", stream=True)).encode(),
                 headers={"X-Fake-Fault": "die-mid-stream"})
    r = conn.getresponse()
    assert r.status == 200
    with pytest.raises(http.client.IncompleteRead) as exc:
        r.read()
    conn.close()
    events = sse_events(exc.value.partial)
    assert 1 < len(events) < 8 and "[DONE]" not in events
    # non-stream: Content-Length promised, half delivered
    with pytest.raises(http.client.IncompleteRead):
        f.post(CHAT, chat_body("x"), {"X-Fake-Fault": "die-mid-stream"})
    assert f.stats()["in_flight"] == 0
    wait_for(lambda: f.stats()["aborted"] == 2, what="2 aborted requests")


# ---- faults ------------------------------------------------------------------------------


@pytest.mark.parametrize("fault,status,etype", [
    ("500", 500, "server_error"),
    ("503", 503, "server_error"),
    ("400", 400, "invalid_request_error"),
    ("429", 429, "rate_limit_error"),
])
def test_error_faults(fake, fault, status, etype):
    f = fake()
    got, headers, body = f.post(CHAT, chat_body("x", stream=True), {"X-Fake-Fault": fault})
    assert got == status
    assert json.loads(body)["error"]["type"] == etype
    if fault == "429":
        assert headers["Retry-After"] == "1"


def test_malformed_html_and_empty_bodies_are_200(fake):
    f = fake()
    for fault in ("malformed", "html", "empty"):
        status, headers, body = f.post(CHAT, chat_body("x"), {"X-Fake-Fault": fault})
        assert status == 200, fault
        with pytest.raises(ValueError):
            json.loads(body)
    status, headers, body = f.post(CHAT, chat_body("x"), {"X-Fake-Fault": "malformed"})
    assert body.startswith(b'{"id":"chatcmpl-') and headers["Content-Type"] == "application/json"


def test_close_fault_sends_nothing(fake):
    f = fake()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        f.post(CHAT, chat_body("x"), {"X-Fake-Fault": "close"})
    assert f.post(CHAT, chat_body("x"))[0] == 200


def test_unknown_fault_header_is_a_400(fake):
    f = fake()
    status, _, body = f.post(CHAT, chat_body("x"), {"X-Fake-Fault": "explode"})
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_fake_header"
    status, _, _ = f.post(CHAT, chat_body("x"), {"X-Fake-Latency-Ms": "soon"})
    assert status == 400


def test_hang_ends_when_the_client_leaves(fake):
    f = fake()
    with pytest.raises(TimeoutError):
        f.post(CHAT, chat_body("x"), {"X-Fake-Fault": "hang"}, timeout=0.5)
    s = f.stats()
    assert s["in_flight"] in (0, 1)
    # the provider notices the hang-up and stops counting the request in flight
    wait_for(lambda: f.stats()["in_flight"] == 0, timeout=5, what="hung request released")
    wait_for(lambda: f.stats()["aborted"] == 1, what="the hang counted as aborted")
    assert f.post(CHAT, chat_body("still alive"))[0] == 200


def test_fault_flag_with_rate(fake):
    f = fake("--fault", "500", "--fault-rate", "0.5")
    statuses = [f.post(CHAT, chat_body("r%d" % i))[0] for i in range(200)]
    assert set(statuses) == {200, 500}
    assert 40 <= statuses.count(500) <= 160
    # a header beats the flag
    assert f.post(CHAT, chat_body("x"), {"X-Fake-Fault": "none"})[0] == 200


def test_fault_flag_applies_to_inference_only(fake):
    f = fake("--fault", "503")
    assert f.post(CHAT, chat_body("x"))[0] == 503
    assert f.post("/v1/embeddings", {"model": "e", "input": "x"})[0] == 503
    assert f.get_json("/v1/models")[0] == 200
    assert f.get_json("/health")[0] == 200


# ---- latency and concurrency ------------------------------------------------------------


def test_latency_flag(fake):
    f = fake("--latency-ms", "200", "--latency-jitter-ms", "50")
    t0 = time.monotonic()
    assert f.post(CHAT, chat_body("x"))[0] == 200
    elapsed = time.monotonic() - t0
    assert 0.19 <= elapsed < 2.0, elapsed
    t0 = time.monotonic()
    assert f.post(CHAT, chat_body("x"), {"X-Fake-Latency-Ms": "0"})[0] == 200
    assert time.monotonic() - t0 < 0.15


def test_latency_does_not_block_other_requests(fake):
    """One HTTP thread, 20 slow requests in flight: they wait together, a fast request
    passes them, and the stats see exactly 20 in flight at the peak."""
    f = fake("--threads", "1")
    n = 20
    results = []

    def slow():
        results.append(f.post(CHAT, chat_body("slow"), {"X-Fake-Latency-Ms": "1500"})[0])

    threads = [threading.Thread(target=slow) for _ in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    wait_for(lambda: f.stats()["in_flight"] == n, what="20 requests in flight")
    t_fast = time.monotonic()
    assert f.post(CHAT, chat_body("fast"))[0] == 200
    assert time.monotonic() - t_fast < 0.5
    for t in threads:
        t.join(10)
    elapsed = time.monotonic() - t0
    assert results == [200] * n
    assert elapsed < 4.0, elapsed  # serialized they would take 30 s
    s = f.stats()
    assert s["in_flight"] == 0
    assert s["max_in_flight"] == n + 1  # the 20 slow ones plus the fast one
    assert s["by_path"][CHAT] == n + 1


def test_in_flight_never_exceeds_client_concurrency(fake):
    """Back-to-back requests on N keep-alive connections: a request leaves in_flight
    before its client can see the answer, so max_in_flight stays <= N and in_flight is
    0 as soon as every client has its answer."""
    f = fake("--threads", "2")
    n, per = 6, 60
    failures = []

    def worker(i):
        conn = http.client.HTTPConnection("127.0.0.1", f.port, timeout=10)
        try:
            for j in range(per):
                body = chat_body("w%d-%d" % (i, j), stream=(j % 3 == 0))
                conn.request("POST", CHAT, body=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                if j % 3 == 0:  # streamed: the deltas reassemble the echo
                    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                                   for e in sse_events(data)[:-1])
                else:
                    text = json.loads(data)["choices"][0]["message"]["content"]
                if r.status != 200 or text != "echo: w%d-%d" % (i, j):
                    failures.append((r.status, data[:200]))
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []
    s = f.stats()
    assert s["in_flight"] == 0
    assert 1 <= s["max_in_flight"] <= n
    assert s["by_path"][CHAT] == n * per == s["by_status"]["200"]


def test_mixed_faults_under_concurrency(fake):
    """Every fault at once from several clients, some of which give up early; the
    provider keeps answering, releases everything and exits cleanly (run this suite with
    PGD_SANITIZE=1 for the ASan build)."""
    f = fake("--stream-interval-ms", "2", "--slow-interval-ms", "20")
    kinds = [({}, False), ({}, True), ({"X-Fake-Fault": "500"}, False),
             ({"X-Fake-Fault": "malformed"}, True), ({"X-Fake-Fault": "die-mid-stream"}, True),
             ({"X-Fake-Fault": "close"}, False), ({"X-Fake-Fault": "hang"}, False),
             ({"X-Fake-Fault": "slow"}, True), ({"X-Fake-Latency-Ms": "3"}, False),
             ({"X-Fake-Latency-Ms": "400"}, True)]

    def worker(i):
        for j in range(len(kinds) * 3):
            headers, stream = kinds[(i + j) % len(kinds)]
            try:
                f.post(CHAT, chat_body("m", stream=stream), headers, timeout=0.2)
            except (OSError, http.client.HTTPException):
                pass  # hangs, closes, cuts and impatient clients are the point

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    wait_for(lambda: f.stats()["in_flight"] == 0, what="everything released")
    assert f.post(CHAT, chat_body("after"))[0] == 200
    assert f.proc.stop() == 0


def test_in_flight_excludes_health_discovery_and_control(fake):
    f = fake()
    for path in ("/health", "/v1/models", "/props", "/_fake/stats"):
        http_get(f.base + path)
    s = f.stats()
    assert s["max_in_flight"] == 0
    assert "/_fake/stats" not in s["by_path"]
    assert s["by_path"]["/health"] == 1 and s["by_path"]["/props"] == 1


# ---- control endpoints ---------------------------------------------------------------


def test_runtime_config_health_and_reset(fake):
    f = fake("--slots", "2", "--models", "a")
    cfg = f.config(fault="503", latency_ms=0, slots=6, models=["a", "b"])
    assert cfg["fault"] == "503" and cfg["slots"] == 6 and cfg["models"] == ["a", "b"]
    assert f.post(CHAT, chat_body("x"))[0] == 503
    assert f.get_json("/props")[1]["total_slots"] == 6
    assert [m["id"] for m in f.get_json("/v1/models")[1]["data"]] == ["a", "b"]

    f.config(health="down", fault="none")
    status, doc = f.get_json("/health")
    assert status == 503 and doc["error"]["code"] == 503
    assert f.post(CHAT, chat_body("x"))[0] == 200
    f.config(health="ok")
    assert f.get_json("/health")[0] == 200

    # unknown keys and bad values are refused and change nothing
    for bad in ({"fualt": "500"}, {"fault": "explode"}, {"fault_rate": 2}, {"latency_ms": -1},
                {"health": "meh"}, {"models": []}):
        status, _, body = f.post("/_fake/config", bad)
        assert status == 400, bad
        assert json.loads(body)["error"]["code"] == "bad_config"
    assert f.get_json("/_fake/config")[1]["fault"] == "none"

    f.config(fault="500", health="down")
    status, _, body = f.post("/_fake/reset", {})
    assert status == 200
    cfg = json.loads(body)
    assert cfg["fault"] == "none" and cfg["health"] == "ok" and cfg["slots"] == 2
    assert cfg["models"] == ["a"]
    s = f.stats()
    assert s["requests_total"] == 0 and s["by_path"] == {} and s["max_in_flight"] == 0


def test_health_hang_times_probes_out(fake):
    f = fake()
    f.config(health="hang")
    with pytest.raises(TimeoutError):
        f.request("GET", "/health", timeout=0.3)
    assert f.post(CHAT, chat_body("x"))[0] == 200  # inference is unaffected
    f.config(health="ok")
    assert f.get_json("/health")[0] == 200
    assert f.stats()["max_in_flight"] == 1


def test_runtime_latency(fake):
    f = fake()
    f.config(latency_ms=300)
    t0 = time.monotonic()
    assert f.post(CHAT, chat_body("x"))[0] == 200
    assert time.monotonic() - t0 >= 0.29


def test_markers_count_requests_per_job(fake):
    f = fake()
    f.post(CHAT, chat_body("x", user="job-1"))
    f.post(CHAT, chat_body("x", user="job-1"), {"X-Fake-Fault": "500"})
    f.post("/v1/completions", {"model": "m", "prompt": "p"}, {"X-Fake-Marker": "job-2"})
    f.post(CHAT, chat_body("no marker"))
    s = f.stats()
    assert s["markers"] == {"job-1": 2, "job-2": 1}
    assert s["by_status"] == {"200": 3, "500": 1}
    assert s["aborted"] == 0 and s["in_flight"] == 0


def test_arrivals_record_marked_requests_with_wall_clock_time(fake):
    f = fake()
    f.config(latency_ms=300)
    t_before = time.time()
    assert f.post(CHAT, chat_body("x", user="job-a"))[0] == 200
    t_after = time.time()
    f.post(CHAT, chat_body("no marker"))
    f.post("/v1/completions", {"model": "m", "prompt": "p", "user": "job-b"}, {"X-Fake-Fault": "500"})
    f.post("/v1/embeddings", {"model": "m", "input": "i", "user": "job-c"})
    f.post("/v1/completions", {"model": "m", "prompt": "p"}, {"X-Fake-Marker": "job-d"})

    status, doc = f.get_json("/_fake/arrivals")
    assert status == 200
    arr = doc["arrivals"]
    # only marked requests, oldest first; faulted ones were still received
    assert [a["user"] for a in arr] == ["job-a", "job-b", "job-c", "job-d"]
    assert doc["dropped"] == 0
    assert all(isinstance(a["t_us"], int) for a in arr)
    assert [a["t_us"] for a in arr] == sorted(a["t_us"] for a in arr)
    # wall-clock µs, taken on arrival: before the 300 ms latency, not after it
    t_a = arr[0]["t_us"] / 1e6
    assert t_before - 0.05 <= t_a <= t_after
    assert t_a < t_after - 0.25
    # the control endpoint itself is not a counted request
    assert "/_fake/arrivals" not in f.stats()["by_path"]

    assert f.post("/_fake/reset", {})[0] == 200
    assert f.get_json("/_fake/arrivals")[1] == {"arrivals": [], "dropped": 0}


# ---- process ---------------------------------------------------------------------------


def test_sigterm_exits_zero_with_requests_waiting(fake):
    f = fake("--log-level", "debug")
    errors = []

    def waiting(headers):
        try:
            f.post(CHAT, chat_body("x", stream=True), headers, timeout=20)
        except Exception as e:  # the server goes away under it
            errors.append(e)

    threads = [threading.Thread(target=waiting, args=(h,)) for h in (
        {"X-Fake-Fault": "hang"}, {"X-Fake-Latency-Ms": "30000"}, {"X-Fake-Fault": "slow"})]
    for t in threads:
        t.start()
    wait_for(lambda: f.stats()["in_flight"] == 3, what="3 requests waiting")
    t0 = time.monotonic()
    assert f.proc.stop(timeout=10) == 0
    assert time.monotonic() - t0 < 5
    for t in threads:
        t.join(10)
    out = f.proc.output()
    assert "event=stopping signal=SIGTERM" in out and "event=stopped" in out


def test_start_line_port_from_env_and_help(procs):
    port = free_port()
    p = procs.start("fake-env", [binary("fake-provider")], env={"FAKE_PROVIDER_PORT": str(port)})
    wait_for(lambda: "event=listening" in p.output(), what="start line")
    line = [l for l in p.output().splitlines() if "event=listening" in l][0]
    assert "port=%d" % port in line
    assert http_get("http://127.0.0.1:%d/health" % port)[0] == 200
    assert p.stop() == 0

    h = procs.start("fake-help", [binary("fake-provider"), "--help"])
    assert h.wait(10) == 0
    for flag in ("--port", "FAKE_PROVIDER_PORT", "--family", "--slots", "--fault-rate",
                 "--stream-chunks", "--threads", "--latency-jitter-ms"):
        assert flag in h.output()

    bad = procs.start("fake-bad", [binary("fake-provider"), "--family", "tgi"])
    assert bad.wait(10) == 2
