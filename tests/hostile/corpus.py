"""Hostile-input corpus for pgdispatch-gateway: malformed HTTP requests generated
from categories (not hand-written files), each with the answer it must get.

    python3 tests/hostile/corpus.py            # counts per category
    python3 tests/hostile/corpus.py --dump DIR # one file per case (raw bytes)

A case is the raw bytes to write on a fresh TCP connection (in one or more pieces,
with optional pauses between them for slowloris-style cases) and what must come back:
a set of acceptable outcomes, each an HTTP status (int) or one of
  "close"    the server closed (or reset) the connection without an HTTP response;
  "silence"  nothing came back within the case's read timeout (the server is still
             waiting for the rest of the request; the client then gives up).

Conventions the expectations rely on (the test starts the gateway this way):
  * the gateway runs with --max-body-bytes LIMIT (below) and no API keys;
  * model KNOWN is served by a live node; model UNKNOWN by nobody, so a request
    that passes every check is refused by the control plane with 404 and creates no
    job (that is how a "valid apart from X" request proves X was the problem);
  * cases with forwards=True are well-formed for the gateway and carry a field only
    the provider judges (messages, stream of the wrong type): they become a job the
    provider refuses, the client gets the provider's 400, and the job ends failed.
"""
import json
import os
import sys

LIMIT = 65536            # the gateway's --max-body-bytes in the hostile test
KNOWN = "m-hostile"      # served by the test's node
UNKNOWN = "no-such-model"
POST_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/jobs"]
OPENAI_ROUTES = POST_ROUTES[:3]
CHAT = "/v1/chat/completions"

# Invalid UTF-8 sequences: name -> bytes.
BAD_UTF8 = {
    "overlong_slash": b"\xc0\xaf",
    "overlong_nul": b"\xc0\x80",
    "overlong_3byte": b"\xe0\x80\xaf",
    "overlong_4byte": b"\xf0\x80\x80\xaf",
    "surrogate_high": b"\xed\xa0\x80",
    "surrogate_low": b"\xed\xbf\xbf",
    "surrogate_pair_cesu": b"\xed\xa0\xbd\xed\xb8\x80",
    "lone_continuation": b"\x80",
    "continuation_run": b"\x80\xbf\x80\xbf",
    "truncated_2of3": b"\xe2\x82",
    "truncated_3of4": b"\xf0\x9f\x98",
    "five_byte": b"\xf8\x88\x80\x80\x80",
    "six_byte": b"\xfc\x84\x80\x80\x80\x80",
    "ff": b"\xff",
    "fe_bom_like": b"\xfe\xff",
    "above_10ffff": b"\xf4\x90\x80\x80",
}


class Case:
    __slots__ = ("name", "category", "pieces", "expect", "forwards", "read_timeout", "fixed")

    def __init__(self, name, category, pieces, expect, forwards=False, read_timeout=10.0, fixed=None):
        self.name = name
        self.category = category
        # [(bytes, pause_after_seconds)]: pieces written in order, pausing after each.
        self.pieces = pieces if isinstance(pieces, list) else [(pieces, 0.0)]
        self.expect = frozenset(expect if isinstance(expect, (set, frozenset, list, tuple)) else [expect])
        self.forwards = forwards
        self.read_timeout = read_timeout
        # A former known gap, now answered right: what it was (the regression test
        # runs these cases on their own too).
        self.fixed = fixed

    @property
    def data(self):
        return b"".join(p for p, _ in self.pieces)

    def __repr__(self):
        return "<Case %s/%s expect=%s>" % (self.category, self.name, sorted(map(str, self.expect)))


def http(method, path, body=b"", headers=None, version=b"HTTP/1.1", content_type=b"application/json",
         content_length=True, host=True, close=True):
    """The raw bytes of one request. headers: list of (name, value) (bytes or str)."""
    def b(x):
        return x if isinstance(x, bytes) else x.encode()

    lines = [b(method) + b" " + b(path) + b" " + version]
    if host:
        lines.append(b"Host: 127.0.0.1")
    if content_type is not None:
        lines.append(b"Content-Type: " + content_type)
    if content_length and body is not None:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    for k, v in headers or []:
        lines.append(b(k) + b": " + b(v))
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def body_for(route, model=UNKNOWN, **extra):
    """A request body that every gateway check accepts, for route."""
    if route == "/v1/completions":
        doc = {"model": model, "prompt": "hi"}
    elif route == "/v1/embeddings":
        doc = {"model": model, "input": "hi"}
    else:
        doc = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    doc.update(extra)
    return json.dumps(doc).encode()


def lbl(route):
    return {"/v1/chat/completions": "chat", "/v1/completions": "cmpl", "/v1/embeddings": "emb",
            "/v1/jobs": "jobs"}.get(route, route.strip("/").replace("/", "_"))


def post(route, body, **kw):
    return http("POST", route, body, **kw)


# ---------------------------------------------------------------------------
# Categories
# ---------------------------------------------------------------------------

def bad_json():
    out = []
    valid = b'{"model": "%s", "messages": [{"role": "user", "content": "hi \\u00e9"}], "n": 1.5e3}' % UNKNOWN.encode()
    # Every truncation of a valid body is invalid JSON (sent with an honest length).
    for i in range(0, len(valid)):
        out.append(Case("truncated_%03d" % i, "bad_json", post(CHAT, valid[:i]), 400))
    garbage = [b"x", b"}", b"]", b",", b"{}", b"[]", b'{"a":1}', b"\x00", b"null", b"// c", b"/* c */",
               b";", b"\xff", b"\n\n\n{", b"'"]
    for route in POST_ROUTES:
        for j, g in enumerate(garbage):
            out.append(Case("trailing_%s_%02d" % (lbl(route), j), "bad_json",
                            post(route, body_for(route) + g), 400))
    specials = {
        "nan": b'{"model": "%s", "temperature": NaN}',
        "infinity": b'{"model": "%s", "temperature": Infinity}',
        "neg_infinity": b'{"model": "%s", "temperature": -Infinity}',
        "nan_model": b'{"model": NaN, "x": "%s"}',
        "inf_top": b'Infinity',
        "huge_exponent": b'{"model": "%s", "temperature": 1e999999}',
        "tiny_overflow": b'{"model": "%s", "n": -1e400}',
        "hex_number": b'{"model": "%s", "n": 0x10}',
        "leading_zero": b'{"model": "%s", "n": 0012}',
        "plus_number": b'{"model": "%s", "n": +1}',
        "dot_number": b'{"model": "%s", "n": .5}',
        "trailing_dot": b'{"model": "%s", "n": 5.}',
        "bom": b'\xef\xbb\xbf{"model": "%s"}',
        "utf16_bom": b'\xff\xfe{\x00}\x00',
        "line_comment": b'{"model": "%s", // comment\n "n": 1}',
        "block_comment": b'{/* c */"model": "%s"}',
        "hash_comment": b'# c\n{"model": "%s"}',
        "single_quotes": b"{'model': '%s'}",
        "unquoted_keys": b'{model: "%s"}',
        "trailing_comma_obj": b'{"model": "%s",}',
        "trailing_comma_arr": b'{"model": "%s", "messages": [1,]}',
        "missing_colon": b'{"model" "%s"}',
        "missing_comma": b'{"model": "%s" "n": 1}',
        "double_colon": b'{"model":: "%s"}',
        "raw_control_char": b'{"model": "%s", "x": "a\x01b"}',
        "raw_newline_in_string": b'{"model": "%s", "x": "a\nb"}',
        "raw_tab_in_string": b'{"model": "%s", "x": "a\tb"}',
        "bad_escape": b'{"model": "%s", "x": "\\x41"}',
        "short_unicode_escape": b'{"model": "%s", "x": "\\u12"}',
        "nul_escape": b'{"model": "%s", "x": "\\u0000"}',
        "nul_escape_in_model": b'{"model": "ab\\u0000cd", "x": "%s"}',
        "lone_high_surrogate_escape": b'{"model": "%s", "x": "\\ud800"}',
        "lone_low_surrogate_escape": b'{"model": "%s", "x": "\\udc00"}',
        "reversed_surrogates_escape": b'{"model": "%s", "x": "\\udc00\\ud800"}',
        "unterminated_string": b'{"model": "%s}',
        "unclosed_object": b'{"model": "%s"',
        "unclosed_array": b'{"model": "%s", "messages": [',
        "extra_close": b'{"model": "%s"}}',
        "two_documents": b'{"model": "%s"} {"model": "x"}',
        "empty_key_only": b'{"":}',
        "true_literal_typo": b'{"model": "%s", "stream": tru}',
        "capital_true": b'{"model": "%s", "stream": True}',
        "undefined": b'{"model": "%s", "x": undefined}',
    }
    for name, tmpl in specials.items():
        body = tmpl.replace(b"%s", UNKNOWN.encode()) if b"%s" in tmpl else tmpl
        out.append(Case(name, "bad_json", post(CHAT, body), 400))
    # Not an object, or empty.
    for name, body in {"empty": b"", "spaces": b"   \r\n\t ", "null": b"null", "array": b"[]",
                       "array_of_object": b'[{"model": "%s"}]' % UNKNOWN.encode(),
                       "string": b'"model"', "number": b"42", "true": b"true"}.items():
        for route in POST_ROUTES:
            out.append(Case("%s_%s" % (name, lbl(route)), "bad_json", post(route, body), 400))
    # Duplicate keys: accepted as JSON; the last "model" is the one checked.
    dups = {
        "dup_model_last_bad_type": (b'{"model": "%s", "model": 7}' % UNKNOWN.encode(), 400),
        "dup_model_last_empty": (b'{"model": "%s", "model": ""}' % UNKNOWN.encode(), 400),
        "dup_model_first_bad_type": (b'{"model": 7, "model": "%s"}' % UNKNOWN.encode(), 404),
        "dup_model_both_unknown": (b'{"model": "a-unknown", "model": "%s"}' % UNKNOWN.encode(), 404),
        "dup_messages": (b'{"model": "%s", "messages": 1, "messages": []}' % UNKNOWN.encode(), 404),
    }
    for name, (body, status) in dups.items():
        out.append(Case(name, "bad_json", post(CHAT, body), status))
    return out


def deep_nesting():
    out = []
    for depth in (2049, 5000, 10000):
        for opener, closer, label in ((b"[", b"]", "arrays"), (b'{"a":', b"}", "objects"),
                                      (b'[{"a":', b"}]", "mixed")):
            inner = opener * depth + b"1" + closer * depth
            if len(inner) + 64 > LIMIT:
                continue
            for route in (CHAT, "/v1/jobs"):
                # As a field of an otherwise fine request, as the whole body, and unclosed.
                out.append(Case("field_%s_%d_%s" % (label, depth, lbl(route)), "deep_nesting",
                                post(route, b'{"model": "%s", "x": %s}' % (UNKNOWN.encode(), inner)), 400))
                out.append(Case("body_%s_%d_%s" % (label, depth, lbl(route)), "deep_nesting",
                                post(route, inner), 400))
                out.append(Case("unclosed_%s_%d_%s" % (label, depth, lbl(route)), "deep_nesting",
                                post(route, opener * depth), 400))
    # 10k levels of [ and { as asked, whatever their size: too deep, or too big.
    for label, inner in (("brackets_10k", b"[" * 10000 + b"]" * 10000),
                         ("braces_10k", b'{"a":' * 10000 + b"1" + b"}" * 10000)):
        body = b'{"model": "%s", "x": %s}' % (UNKNOWN.encode(), inner)
        out.append(Case(label, "deep_nesting", post(CHAT, body), 413 if len(body) > LIMIT else 400))
    # Deep but within the parser's limit: fine JSON, refused for the unknown model.
    for depth in (100, 1000, 2000):
        inner = b"[" * depth + b"]" * depth
        out.append(Case("within_limit_%d" % depth, "deep_nesting",
                        post(CHAT, b'{"model": "%s", "x": %s}' % (UNKNOWN.encode(), inner)), 404))
    return out


def huge_strings():
    out = []
    pad_fixed = len(b'{"model": "%s", "x": ""}' % UNKNOWN.encode())

    def padded(total, valid=True):
        body = b'{"model": "%s", "x": "%s"}' % (UNKNOWN.encode(), b"a" * (total - pad_fixed))
        assert len(body) == total
        return body if valid else body[:-1]

    for route in POST_ROUTES:
        r = lbl(route)
        out.append(Case("exactly_limit_%s" % r, "huge_strings", post(route, padded(LIMIT)), 404))
        out.append(Case("limit_minus_1_%s" % r, "huge_strings", post(route, padded(LIMIT - 1)), 404))
        out.append(Case("limit_minus_1_invalid_%s" % r, "huge_strings", post(route, padded(LIMIT - 1, False)), 400))
        # Over the limit with an honest Content-Length: refused before the body is read.
        for over in (1, 1000, 3 * LIMIT):
            data = post(route, padded(LIMIT + over))
            head, _, body = data.partition(b"\r\n\r\n")
            out.append(Case("limit_plus_%d_%s" % (over, r), "huge_strings",
                            [(head + b"\r\n\r\n", 0.3), (body, 0.0)], 413))
        # Over the limit chunked (no length up front): read, dropped, then 413.
        body = padded(LIMIT + 1000)
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 8192]), body[i:i + 8192])
                           for i in range(0, len(body), 8192)) + b"0\r\n\r\n"
        out.append(Case("limit_plus_1000_chunked_%s" % r, "huge_strings",
                        post(route, chunked, content_length=False, headers=[("Transfer-Encoding", "chunked")]),
                        413))
    # Content-Length far past the limit (no body sent): 413 at once.
    for n in (LIMIT + 1, 10 ** 9, 2 ** 63 - 1):
        out.append(Case("declared_%d" % n, "huge_strings",
                        http("POST", CHAT, None, headers=[("Content-Length", str(n))]), 413))
    # Oversized model names and keys.
    for n, status in ((256, 404), (257, 400), (10000, 400), (LIMIT - 100, 400)):
        out.append(Case("model_%d_chars" % n, "huge_strings",
                        post(CHAT, json.dumps({"model": "m" * n, "messages": []}).encode()), status))
    out.append(Case("key_60k", "huge_strings",
                    post(CHAT, b'{"model": "%s", "%s": 1}' % (UNKNOWN.encode(), b"k" * 60000)), 404))
    out.append(Case("many_keys", "huge_strings",
                    post(CHAT, b'{"model": "%s", %s}' % (UNKNOWN.encode(), b",".join(
                        b'"k%d": 1' % i for i in range(5000)))), 404))
    out.append(Case("many_array_items", "huge_strings",
                    post(CHAT, b'{"model": "%s", "x": [%s]}' % (UNKNOWN.encode(), b",".join([b"0"] * 30000))), 404))
    return out


def wrong_types():
    out = []
    bad_models = {"number": 7, "float": 1.5, "null": None, "true": True, "false": False, "array": ["m"],
                  "object": {"id": "m"}, "empty": "", "array_of_known": [KNOWN]}
    for route in POST_ROUTES:
        r = lbl(route)
        for name, v in bad_models.items():
            doc = json.loads(body_for(route))
            doc["model"] = v
            out.append(Case("model_%s_%s" % (name, r), "wrong_types", post(route, json.dumps(doc).encode()), 400))
        doc = json.loads(body_for(route))
        del doc["model"]
        out.append(Case("model_missing_%s" % r, "wrong_types", post(route, json.dumps(doc).encode()), 400))
    # /v1/jobs envelope: payload and endpoint of the wrong type or shape.
    for name, doc in {
        "payload_string": {"model": UNKNOWN, "payload": "x"},
        "payload_array": {"model": UNKNOWN, "payload": [1]},
        "payload_number": {"model": UNKNOWN, "payload": 1},
        "payload_true": {"model": UNKNOWN, "payload": True},
        "payload_no_model": {"payload": {"messages": []}},
        "payload_model_number": {"payload": {"model": 5}},
        "envelope_model_number": {"model": 5, "payload": {"model": UNKNOWN}},
        "endpoint_number": {"model": UNKNOWN, "endpoint": 5, "payload": {}},
        "endpoint_object": {"model": UNKNOWN, "endpoint": {}, "payload": {}},
        "endpoint_relative": {"model": UNKNOWN, "endpoint": "v1/chat", "payload": {}},
        "endpoint_empty": {"model": UNKNOWN, "endpoint": "", "payload": {}},
        "endpoint_url": {"model": UNKNOWN, "endpoint": "http://169.254.169.254/latest", "payload": {}},
        "endpoint_query": {"model": UNKNOWN, "endpoint": "/v1/x?a=b", "payload": {}},
        "endpoint_space": {"model": UNKNOWN, "endpoint": "/v1/x y", "payload": {}},
        "endpoint_crlf": {"model": UNKNOWN, "endpoint": "/v1/x\r\nHost: evil", "payload": {}},
        "endpoint_unicode": {"model": UNKNOWN, "endpoint": "/v1/\u00e9", "payload": {}},
        "endpoint_percent": {"model": UNKNOWN, "endpoint": "/v1/%2e%2e/x", "payload": {}},
        "endpoint_backslash": {"model": UNKNOWN, "endpoint": "/v1\\..\\x", "payload": {}},
        "endpoint_too_long": {"model": UNKNOWN, "endpoint": "/" + "a" * 256, "payload": {}},
    }.items():
        out.append(Case(name, "wrong_types", post("/v1/jobs", json.dumps(doc).encode()), 400))
    # Fields the provider judges: the gateway forwards, the provider refuses with 400.
    fwd = {
        "messages_string": {"messages": "hi"},
        "messages_number": {"messages": 5},
        "messages_null": {"messages": None},
        "messages_object": {"messages": {"role": "user"}},
        "messages_empty": {"messages": []},
        "messages_of_strings": {"messages": ["hi"]},
        "messages_of_numbers": {"messages": [1, 2]},
        "messages_role_number": {"messages": [{"role": 1, "content": "x"}]},
    }
    for name, extra in fwd.items():
        doc = {"model": KNOWN, "messages": [{"role": "user", "content": "hi"}]}
        doc.update(extra)
        out.append(Case(name, "wrong_types", post(CHAT, json.dumps(doc).encode()), 400, forwards=True))
    # "stream" must be a boolean: the gateway refuses anything else itself (it decides
    # whether to answer with an event stream), on every route.
    for name, v in {"string": "yes", "number": 1, "string_true": "true", "array": [True], "object": {}}.items():
        for route in OPENAI_ROUTES:
            doc = json.loads(body_for(route, model=KNOWN))
            doc["stream"] = v
            out.append(Case("stream_%s_%s" % (name, lbl(route)), "wrong_types", post(route, json.dumps(doc).encode()),
                            400))
    for name, doc in {"prompt_number": {"model": KNOWN, "prompt": 5},
                      "prompt_missing": {"model": KNOWN},
                      "prompt_object": {"model": KNOWN, "prompt": {}}}.items():
        out.append(Case(name, "wrong_types", post("/v1/completions", json.dumps(doc).encode()), 400, forwards=True))
    for name, doc in {"input_number": {"model": KNOWN, "input": 5},
                      "input_empty_array": {"model": KNOWN, "input": []},
                      "input_missing": {"model": KNOWN}}.items():
        out.append(Case(name, "wrong_types", post("/v1/embeddings", json.dumps(doc).encode()), 400, forwards=True))
    out.extend(max_tokens_types())
    return out


def max_tokens_types():
    """max_tokens on the completion routes must be a whole number from 1 to 2**31-1
    (or null); the gateway refuses anything else itself (the fake provider does not
    look at it). Embeddings take no max_tokens: it is not checked there."""
    out = []
    for route in OPENAI_ROUTES[:2]:
        for name, v in {"string": "100", "negative": -1, "zero": 0, "float": 1.5, "array": [1], "object": {},
                        "true": True, "huge": 1e30, "over_int32": 2 ** 31}.items():
            doc = json.loads(body_for(route))
            doc["max_tokens"] = v
            out.append(Case("max_tokens_%s_%s" % (name, lbl(route)), "wrong_types",
                            post(route, json.dumps(doc).encode()), 400,
                            fixed="max_tokens of the wrong type was not refused"))
        for name, v in {"one": 1, "int32_max": 2 ** 31 - 1, "null": None}.items():
            doc = json.loads(body_for(route))
            doc["max_tokens"] = v
            out.append(Case("max_tokens_ok_%s_%s" % (name, lbl(route)), "wrong_types",
                            post(route, json.dumps(doc).encode()), 404))
    out.append(Case("max_tokens_string_emb", "wrong_types",
                    post("/v1/embeddings", json.dumps(dict(json.loads(body_for("/v1/embeddings")),
                                                           max_tokens="x")).encode()), 404))
    return out


def invalid_utf8():
    out = []
    u = UNKNOWN.encode()
    for name, seq in BAD_UTF8.items():
        places = {
            "in_model": b'{"model": "%s%s", "messages": []}' % (u, seq),
            "in_content": b'{"model": "%s", "messages": [{"role": "user", "content": "a%sb"}]}' % (u, seq),
            "in_key": b'{"model": "%s", "k%s": 1}' % (u, seq),
            "outside_string": b'{"model": "%s"}%s' % (u, seq),
        }
        for where, body in places.items():
            out.append(Case("%s_%s" % (where, name), "invalid_utf8", post(CHAT, body), 400))
        job = b'{"model": "%s", "payload": {"model": "x", "c": "%s"}}' % (u, seq)
        out.append(Case("in_job_payload_%s" % name, "invalid_utf8", post("/v1/jobs", job), 400))
        # Header values: the option headers are validated (400), Content-Type must be
        # application/json (415), an unknown header is ignored (the request goes on: 404).
        hdr = {"X-Request-Timeout": (b"1" + seq, 400), "X-Priority": (b"1" + seq, 400),
               "Idempotency-Key": (b"key-" + seq, 400), "X-Whatever": (seq + b"x", 404)}
        for h, (value, status) in hdr.items():
            out.append(Case("header_%s_%s" % (h.lower(), name), "invalid_utf8",
                            post(CHAT, body_for(CHAT), headers=[(h, value)]), status))
        out.append(Case("content_type_%s" % name, "invalid_utf8",
                        post(CHAT, body_for(CHAT), content_type=b"application/json" + seq), 415))
        out.append(Case("path_%s" % name, "invalid_utf8", http("GET", b"/v1/jobs/1" + seq, None), 404))
    return out


def nul_bytes():
    out = []
    u = UNKNOWN.encode()
    for name, body, status in (
            ("in_string", b'{"model": "%s", "x": "a\x00b"}' % u, 400),
            ("in_model", b'{"model": "ab\x00%s"}' % u, 400),
            ("before_body", b'\x00{"model": "%s"}' % u, 400),
            ("after_body", b'{"model": "%s"}\x00' % u, 400),
            ("only_nuls", b"\x00" * 64, 400),
            ("between_tokens", b'{"model":\x00"%s"}' % u, 400),
            # jansson 2.14 skips a NUL that follows a number: the body "parses".
            ("after_number", b'{"model": "%s", "n": 1\x00}' % u, 400),
            ("after_number_known", b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], '
                                   b'"n": 1\x00, "m": 2}' % KNOWN.encode(), 400)):
        for route in POST_ROUTES:
            out.append(Case("%s_%s" % (name, lbl(route)), "nul_bytes", post(route, body), status))
    # NUL in the request line and headers: not HTTP any more.
    for name, data in (
            ("in_method", b"PO\x00ST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            ("in_version", b"GET /healthz HTTP/1.\x001\r\nHost: x\r\nConnection: close\r\n\r\n"),
            ("in_header_name", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A\x00b: 1\r\nConnection: close\r\n\r\n")):
        # A NUL ends the method for libmicrohttpd: "PO" is then not allowed (405).
        out.append(Case(name, "nul_bytes", data, {400, 405, "close"}))
    # NUL in a path: never a job path, never traversal.
    for name, path in (("raw_in_path", b"/v1/jobs/987654321\x00/../../etc/passwd"),
                       ("raw_in_path_no_id", b"/v1/jobs/\x00/../../etc/passwd")):
        out.append(Case(name, "nul_bytes", http("GET", path, None), {400, 404, "close"}))
    # NUL in header values (RFC 9110 5.5: reject). libmicrohttpd 0.9.75 hands values
    # over cut at the NUL ("1\0 2" as "1"); the gateway finds the rest in the head and
    # refuses the headers it reads. A NUL in a header it ignores is ignored.
    fixed = "a header value with a NUL was read up to the NUL"
    for h in ("X-Request-Timeout", "X-Priority", "Idempotency-Key", "Authorization", "Host"):
        out.append(Case("in_value_%s" % h.lower(), "nul_bytes",
                        post(CHAT, body_for(CHAT), host=h != "Host", headers=[(h, b"1\x002")]), 400, fixed=fixed))
    out.append(Case("in_value_last_header", "nul_bytes",
                    post(CHAT, body_for(CHAT), close=False, headers=[("X-Priority", b"1\x00 2")]), 400, fixed=fixed))
    out.append(Case("in_value_bare_lf", "nul_bytes",
                    b"POST %s HTTP/1.1\nHost: x\nContent-Type: application/json\nContent-Length: %d\n"
                    b"X-Priority: 1\x00X-Other: 2\nConnection: close\n\n%s" % (CHAT.encode(), len(body_for(CHAT)),
                                                                          body_for(CHAT)), 400, fixed=fixed))
    out.append(Case("in_content_type", "nul_bytes",
                    post(CHAT, body_for(CHAT), content_type=b"application/json\x00; x"), 400, fixed=fixed))
    out.append(Case("in_content_length", "nul_bytes",
                    post(CHAT, body_for(CHAT), content_length=False,
                         headers=[("Content-Length", b"%d\x00 5" % len(body_for(CHAT)))]), 400, fixed=fixed))
    # A trailing NUL is a NUL replaced by a blank (RFC 9110 5.5) and trimmed: harmless.
    out.append(Case("in_value_trailing", "nul_bytes",
                    post(CHAT, body_for(CHAT), headers=[("X-Priority", b"1\x00")]), {400, 404}))
    out.append(Case("in_ignored_header", "nul_bytes",
                    post(CHAT, body_for(CHAT), headers=[("X-Whatever", b"1\x002")]), 404))
    # Bare LF line ends (no NUL) are still read as they were.
    out.append(Case("bare_lf_head", "nul_bytes",
                    b"POST %s HTTP/1.1\nHost: x\nContent-Type: application/json\nContent-Length: %d\n"
                    b"X-Priority: 1\nConnection: close\n\n%s" % (CHAT.encode(), len(body_for(CHAT)), body_for(CHAT)),
                    404))
    return out


def header_abuse():
    out = []
    body = body_for(CHAT)
    # Size: one huge header, many headers. libmicrohttpd answers 431 when the
    # request head does not fit its per-connection memory pool.
    for n in (40000, 100000, 1000000):
        out.append(Case("one_header_%d" % n, "header_abuse",
                        post(CHAT, body, headers=[("X-Big", "a" * n)]), {431, "close"}))
    out.append(Case("many_small_headers_ok", "header_abuse",
                    post(CHAT, body, headers=[("X-H%d" % i, "v") for i in range(300)]), 404))
    for n in (5000, 20000):
        out.append(Case("many_headers_%d" % n, "header_abuse",
                        post(CHAT, body, headers=[("X-H%d" % i, "v") for i in range(n)]), {431, "close"}))
    # Content-Length abuse: duplicates, conflicts, junk. Ambiguous framing is refused.
    cl_cases = {
        "dup_cl_differ": [("Content-Length", str(len(body) + 5))],
        "dup_cl_smaller": [("Content-Length", "5")],
    }
    for name, extra in cl_cases.items():
        out.append(Case(name, "header_abuse", post(CHAT, body, headers=extra), 400,
                        fixed="conflicting Content-Length headers were not refused (libmicrohttpd and http_begin "
                              "used the first)"))
    # The same length twice may be taken as one (RFC 9112 6.3); the gateway refuses
    # any second Content-Length field.
    out.append(Case("dup_cl_same", "header_abuse", post(CHAT, body, headers=[("Content-Length", str(len(body)))]),
                    400))
    for name, v in {"cl_letters": "abc", "cl_negative": "-1", "cl_plus": "+%d" % len(body),
                    "cl_hex": "0x10", "cl_overflow": "99999999999999999999999",
                    "cl_list": "%d, %d" % (len(body), len(body)), "cl_space_inside": "1 0",
                    "cl_empty": "", "cl_float": "%d.0" % len(body)}.items():
        out.append(Case(name, "header_abuse",
                        post(CHAT, body, content_length=False, headers=[("Content-Length", v)]), {400, 413}))
    # Content-Length together with Transfer-Encoding: chunked takes precedence (RFC
    # 9112 6.3), so the chunked body is read and the request judged on it.
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    out.append(Case("cl_and_te_chunked", "header_abuse",
                    post(CHAT, chunked, headers=[("Transfer-Encoding", "chunked")]), {400, 404}))
    out.append(Case("cl_small_and_te_chunked", "header_abuse",
                    post(CHAT, chunked, content_length=False,
                         headers=[("Content-Length", "3"), ("Transfer-Encoding", "chunked")]), {400, 404}))
    # Transfer-Encoding other than a lone chunked (RFC 9112): chunked not last, or no
    # chunked at all, leaves the length unknown: 400 (6.3, a MUST). chunked last after
    # a coding the gateway does not implement: 501 (6.1). chunked twice, an empty or
    # malformed list: 400.
    for name, te, status in (("te_gzip", "gzip", 400), ("te_gzip_chunked", "gzip, chunked", 501),
                             ("te_chunked_gzip", "chunked, gzip", 400), ("te_identity", "identity", 400),
                             ("te_junk", "x\x01y", 400), ("te_double_chunked", "chunked, chunked", 400),
                             ("te_empty", "", 400), ("te_commas", " , ", 400), ("te_chunked_param", "chunked;x=1", 400),
                             ("te_two_fields", None, 400), ("te_gzip_field_then_chunked", "gzip\r\nTransfer-Encoding: "
                                                                                          "chunked", 501)):
        extra = [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")] if te is None \
            else [("Transfer-Encoding", te)]
        out.append(Case(name, "header_abuse", post(CHAT, chunked, content_length=False, headers=extra),
                        status, read_timeout=2.0,
                        fixed="a Transfer-Encoding other than chunked was not refused; libmicrohttpd waited "
                              "for more body"))
    # chunked in any case is fine. libmicrohttpd 0.9.75 frames the body as chunked
    # only for a value that is exactly "chunked" (it keeps trailing blanks), so a lone
    # chunked with blanks or empty list elements around it is refused too.
    out.append(Case("te_chunked_upper", "header_abuse", post(CHAT, chunked, content_length=False,
                                                             headers=[("Transfer-Encoding", "CHUNKED")]), 404))
    for name, te in (("te_chunked_blanks", "chunked\t "), ("te_chunked_empty_elements", ", chunked ,")):
        out.append(Case(name, "header_abuse", post(CHAT, chunked, content_length=False,
                                                   headers=[("Transfer-Encoding", te)]), 400))
    # Content type: anything but application/json (with parameters) is 415.
    for ct in (b"text/plain", b"application/jsonx", b"application/json-patch+json", b"application/x-www-form-urlencoded",
               b"multipart/form-data; boundary=x", b"", b"json", b"application/", b"*/*", b"application/json,text/plain",
               b"text/json", b"application/xml", b"application/json\tx"):
        out.append(Case("content_type_%s" % (ct.decode().replace("/", "_") or "empty"), "header_abuse",
                        post(CHAT, body, content_type=ct), 415))
    for route in POST_ROUTES:
        out.append(Case("content_type_missing_%s" % lbl(route), "header_abuse",
                        post(route, body_for(route), content_type=None), 415))
    # Parameters and case are fine.
    out.append(Case("content_type_charset_ok", "header_abuse",
                    post(CHAT, body, content_type=b"Application/JSON; charset=utf-8"), 404))
    # The request option headers.
    for v in ("0", "-1", "abc", "1e3", "86401", "NaN", "inf", "", "5s", "0x10", "1.2.3", ".", "+5", "1,5",
              "99999999999999999999999999", "0.0000000000", "-0"):
        out.append(Case("timeout_%r" % v, "header_abuse", post(CHAT, body, headers=[("X-Request-Timeout", v)]), 400))
    for v in ("abc", "1.5", "9999999999", "", "+", "-", "0x1", "--1", "+-1", "1e3", "2147483648000", "１"):
        out.append(Case("priority_%r" % v, "header_abuse", post(CHAT, body, headers=[("X-Priority", v)]), 400))
    for name, v in {"empty": "", "256": "k" * 256, "tab": "a\tb", "del": "a\x7fb", "ctrl": "a\x01b",
                    "esc": "a\x1bb", "latin1": b"caf\xe9", "utf8": "caf\u00e9".encode()}.items():
        out.append(Case("idempotency_%s" % name, "header_abuse",
                        post(CHAT, body, headers=[("Idempotency-Key", v)]), {400, "close"}))
    # Valid option headers at their bounds still get to the model check.
    out.append(Case("options_at_bounds", "header_abuse",
                    post(CHAT, body, headers=[("X-Request-Timeout", "86400"), ("X-Priority", "-999999999"),
                                              ("Idempotency-Key", "~" * 255)]), 404))
    # Malformed header lines.
    for name, line in {"no_colon": b"X-Broken", "space_before_colon": b"Content-Type : application/json",
                       "empty_name": b": value", "obs_fold": b"X-A: 1\r\n folded",
                       "bare_cr": b"X-A: 1\rX-B: 2", "name_with_space": b"X A: 1"}.items():
        data = b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" \
               b"Content-Length: %d\r\n%s\r\nConnection: close\r\n\r\n%s" % (len(body), line, body)
        out.append(Case("line_%s" % name, "header_abuse", data, {400, 404, "close"}))
    # HTTP/1.1 without Host.
    out.append(Case("no_host", "header_abuse", post(CHAT, body, host=False), 400,
                    fixed="HTTP/1.1 without Host was served (RFC 9112 3.2: 400)"))
    out.append(Case("no_host_get", "header_abuse", http("GET", "/healthz", None, host=False), 400,
                    fixed="HTTP/1.1 without Host was served (RFC 9112 3.2: 400)"))
    out.append(Case("two_hosts", "header_abuse", post(CHAT, body, headers=[("Host", "evil")]), 400))
    return out


def slowloris():
    """Partial requests held open for a measured time (the read timeout), then closed
    by the client. Nothing may be answered for an incomplete request, and nothing
    may be queued for it."""
    out = []
    body = body_for(CHAT)
    head = http("POST", CHAT, None, headers=[("Content-Length", str(len(body)))])
    for k in (0, 1, len(body) // 2, len(body) - 1):
        out.append(Case("partial_body_%d_of_%d" % (k, len(body)), "slowloris",
                        [(head + body[:k], 0.0)], "silence", read_timeout=1.5))
    req = post(CHAT, body)
    for k in (1, 10, 40, len(req.split(b"\r\n\r\n")[0]) - 1):
        out.append(Case("partial_head_%d" % k, "slowloris", [(req[:k], 0.0)], "silence", read_timeout=1.5))
    # A whole request written a few bytes at a time is still answered.
    small = post(CHAT, body)
    pieces = [(small[i:i + 16], 0.02) for i in range(0, len(small), 16)]
    out.append(Case("trickled_complete", "slowloris", pieces, 404))
    # A chunked body that never ends.
    out.append(Case("chunked_never_ends", "slowloris",
                    [(http("POST", CHAT, None, headers=[("Transfer-Encoding", "chunked")]) + b"5\r\nabcde\r\n", 0.0)],
                    "silence", read_timeout=1.5))
    return out


def chunked():
    out = []
    u = UNKNOWN.encode()

    def te(raw):
        return post(CHAT, raw, content_length=False, headers=[("Transfer-Encoding", "chunked")])

    body = b'{"model": "%s", "messages": []}' % u
    bad = b'{"model": "%s", "messages": ' % u

    def chunks(data, size):
        return b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size]) for i in range(0, len(data), size))

    for size in (1, 7, 64, 4096):
        out.append(Case("valid_%d" % size, "chunked", te(chunks(body, size) + b"0\r\n\r\n"), 404))
        out.append(Case("valid_bad_json_%d" % size, "chunked", te(chunks(bad, size) + b"0\r\n\r\n"), 400))
    out.append(Case("uppercase_hex", "chunked", te(b"%X\r\n%s\r\n0\r\n\r\n" % (len(body), body)), 404))
    out.append(Case("extension", "chunked", te(b"%x;name=value\r\n%s\r\n0\r\n\r\n" % (len(body), body)), 404))
    out.append(Case("trailer", "chunked", te(chunks(body, 10) + b"0\r\nX-Trailer: 1\r\n\r\n"), 404))
    out.append(Case("leading_zeros", "chunked", te(b"000%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)), 404))
    malformed = {
        "size_letters": b"zz\r\n%s\r\n0\r\n\r\n" % body,
        "size_negative": b"-5\r\n%s\r\n0\r\n\r\n" % body,
        "size_huge": b"ffffffffffffffffffff\r\n%s\r\n0\r\n\r\n" % body,
        "size_2_63": b"8000000000000000\r\n%s\r\n0\r\n\r\n" % body,
        "size_empty": b"\r\n%s\r\n0\r\n\r\n" % body,
        "size_space_inside": b"1 0\r\n%s\r\n0\r\n\r\n" % body,
        "size_0x_prefix": b"0x%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
        "data_longer_than_size": b"5\r\n%s\r\n0\r\n\r\n" % body,
        "no_crlf_after_data": b"%x\r\n%sXX0\r\n\r\n" % (len(body), body),
        "lf_only": b"%x\n%s\n0\n\n" % (len(body), body),
        "junk_after_last": b"%x\r\n%s\r\n0\r\n\r\nGARBAGE" % (len(body), body),
    }
    for name, raw in malformed.items():
        out.append(Case(name, "chunked", te(raw), {400, 404, 413, "close", "silence"}, read_timeout=3.0))
    # Missing terminator: the server is still waiting; it must not answer early.
    out.append(Case("no_last_chunk", "chunked", te(b"%x\r\n%s\r\n" % (len(body), body)), "silence", read_timeout=1.5))
    out.append(Case("last_chunk_no_final_crlf", "chunked", te(b"%x\r\n%s\r\n0\r\n" % (len(body), body)),
                    "silence", read_timeout=1.5))
    return out


def job_paths():
    out = []
    paths = [b"/v1/jobs/../../etc/passwd", b"/v1/jobs/..%2F..%2Fetc%2Fpasswd", b"/v1/jobs/%2e%2e/%2e%2e/etc/passwd",
             b"/v1/jobs/%00", b"/v1/jobs/-1", b"/v1/jobs/0", b"/v1/jobs/00", b"/v1/jobs/99999999999999999999",
             b"/v1/jobs/9223372036854775808", b"/v1/jobs/18446744073709551616", b"/v1/jobs/1e3", b"/v1/jobs/0x10",
             b"/v1/jobs/+1", b"/v1/jobs/ 1", b"/v1/jobs/1.0", b"/v1/jobs/1/", b"/v1/jobs/1/..", b"/v1/jobs//1",
             b"/v1/jobs/\xd9\xa1\xd9\xa2", b"/v1/jobs/%D9%A1%D9%A2", b"/v1/jobs/\xef\xbc\x91", b"/v1/jobs/\xe2\x85\xa0",
             b"/v1/jobs/abc", b"/v1/jobs/", b"/v1/jobs/%", b"/v1/jobs/%zz", b"/v1/jobs/%39%38%37%36%35%34%33%32%31",
             b"/v1/jobs/1;2", b"/v1/jobs/1,2", b"/v1/jobs/" + b"9" * 5000, b"/v1/jobs/%252e%252e",
             b"/v1/jobs/..", b"/v1/jobs/.", b"/v1/jobs/1%0d%0aX-Injected:%201",
             b"/v1/jobs/987654321%00/../../etc/passwd", b"/v1/jobs/987654321/../../../etc/passwd"]
    for i, p in enumerate(paths):
        for method in ("GET", "DELETE", "HEAD"):
            out.append(Case("%02d_%s" % (i, method.lower()), "job_paths", http(method, p, None), 404))
    # A well-formed id that does not exist, with and without ?wait.
    out.append(Case("absent_id", "job_paths", http("GET", "/v1/jobs/987654321", None), 404))
    out.append(Case("absent_id_delete", "job_paths", http("DELETE", "/v1/jobs/987654321", None), 404))
    for v in ("-1", "abc", "601", "1e3", "NaN", "inf", "", "0x5", "1,5", "%00", "99999999999999999999"):
        out.append(Case("wait_%r" % v, "job_paths", http("GET", "/v1/jobs/987654321?wait=" + v, None), 400))
    return out


def wrong_methods():
    out = []
    for route in POST_ROUTES:
        for m in ("GET", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "HEAD"):
            out.append(Case("%s_%s" % (m.lower(), lbl(route)), "wrong_methods",
                            http(m, route, None if m in ("GET", "HEAD", "OPTIONS", "TRACE") else body_for(route)), 405))
    for route in ("/healthz", "/readyz", "/metrics", "/v1/models", "/v1/status"):
        for m in ("POST", "PUT", "DELETE", "PATCH"):
            out.append(Case("%s_%s" % (m.lower(), route.strip("/").replace("/", "_")), "wrong_methods",
                            http(m, route, b"{}"), 405))
    for m in ("FOO", "get", "Post", "GETT", "M" * 200, "PROPFIND", "MKCOL"):
        out.append(Case("method_%s" % m[:10], "wrong_methods", http(m, "/healthz", None), {400, 405, 501}))
    for m in (b"G@T", b"GE T", b"", b"\x01GET"):
        out.append(Case("method_bytes_%s" % m.hex(), "wrong_methods",
                        m + b" /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                        {400, 404, 405, 501, "close"}))
    out.append(Case("connect", "wrong_methods", b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    {400, 404, 405}))
    return out


def http_versions():
    out = []
    body = body_for(CHAT)
    out.append(Case("http10_post", "http_versions", post(CHAT, body, version=b"HTTP/1.0", host=False), 404))
    out.append(Case("http10_job_path", "http_versions", http("GET", "/v1/jobs/../x", None, version=b"HTTP/1.0",
                                                            host=False), 404))
    out.append(Case("http10_bad_json", "http_versions", post(CHAT, b"{", version=b"HTTP/1.0", host=False), 400))
    out.append(Case("http10_chunked", "http_versions",
                    post(CHAT, b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body), version=b"HTTP/1.0", host=False,
                         content_length=False, headers=[("Transfer-Encoding", "chunked")]),
                    {400, 404, 411, 415, "close"}))
    for v in (b"HTTP/2.0", b"HTTP/3", b"HTTP/9.9", b"HTTP/1.1x", b"HTTP/1", b"HTTPS/1.1", b"http/1.1", b"HTTP/01.1",
              b"HTTP/1.1 extra"):
        out.append(Case("version_%s" % v.decode().replace("/", "_").replace(" ", "_"), "http_versions",
                        http("GET", "/healthz", None, version=v), {400, 505, "close"}))
    out.append(Case("http09", "http_versions", b"GET /healthz\r\n\r\n", {400, 505, "close"}))
    out.append(Case("h2_preface", "http_versions", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400, 404, 405, 505, "close"}))
    # No request line yet (no CRLF; or a line starting with NUL, which libmicrohttpd
    # reads as an empty line): the server is still waiting, until its connection timeout.
    out.append(Case("tls_hello", "http_versions", bytes.fromhex("16030100a5010000a10303") + bytes(range(32)),
                    {400, "close", "silence"}, read_timeout=2.0))
    out.append(Case("garbage_line", "http_versions", b"\x00\x01\x02\x03\r\n\r\n", {400, "close", "silence"},
                    read_timeout=2.0))
    out.append(Case("just_crlf", "http_versions", b"\r\n" * 10, {400, "close", "silence"}, read_timeout=2.0))
    return out


def absurd_urls():
    out = []
    for name, path, expect in (
            ("long_8k", b"/" + b"a" * 8000, 404),
            ("long_30k", b"/" + b"a" * 30000, {404, 414, 431, "close"}),
            ("long_200k", b"/" + b"a" * 200000, {414, 431, "close"}),
            ("asterisk", b"*", {400, 404}),
            ("absolute_form", b"http://evil.example/v1/models", {400, 404}),
            ("no_slash", b"healthz", {400, 404}),
            ("dot_dot", b"/v1/../healthz", 404),
            ("double_slash", b"//healthz", 404),
            ("backslashes", b"\\v1\\models", {400, 404}),
            ("percent_junk", b"/%%%%%%", {400, 404}),
            ("percent_nul", b"/healthz%00", {200, 404}),
            ("unicode", "/v1/mod\u00e8ls".encode(), 404),
            ("crlf_encoded", b"/x%0d%0aSet-Cookie:%20a=b", 404),
            ("fragment", b"/v1/models#frag", {400, 404}),

            ("dup_wait", b"/v1/jobs/987654321?wait=1&wait=abc", {400, 404}),
            ("space_in_url", b"/v1/mo dels", {400, 404}),
            ("tab_in_url", b"/v1/mo\tdels", {400, 404}),
            ("empty_url", b"", {400, 404, "close"})):
        out.append(Case(name, "absurd_urls", http("GET", path, None), expect))
    # Past ~480 query arguments libmicrohttpd 0.9.75 runs out of its connection memory
    # pool, decides on 431, and then (when nothing else wakes its event loop) sends
    # nothing until the client closes or the connection times out (120 s). The gateway
    # refuses more than 64 arguments with 414 before libmicrohttpd parses them.
    fixed = "a query string with ~500+ arguments got no answer (libmicrohttpd 0.9.75 pool exhaustion)"
    for n in (65, 400, 500, 2000):
        out.append(Case("query_args_%d" % n, "absurd_urls", http("GET", b"/?" + b"a=b&" * n, None), 414,
                        read_timeout=2.0, fixed=fixed))
    out.append(Case("job_wait_many_args", "absurd_urls",
                    http("GET", b"/v1/jobs/987654321?" + b"&".join(b"w%d=1" % i for i in range(3000)), None),
                    414, read_timeout=2.0, fixed=fixed))
    out.append(Case("empty_args_3000", "absurd_urls", http("GET", b"/healthz?" + b"&" * 3000, None), 414,
                    read_timeout=2.0, fixed=fixed))
    out.append(Case("query_args_64", "absurd_urls", http("GET", b"/?" + b"a=b&" * 64, None), 404))
    out.append(Case("job_wait_64_args", "absurd_urls",
                    http("GET", b"/v1/jobs/987654321?" + b"&".join(b"w%d=1" % i for i in range(63)) + b"&wait=0",
                         None), 404))
    return out


CATEGORIES = [bad_json, deep_nesting, huge_strings, wrong_types, invalid_utf8, nul_bytes, header_abuse,
              slowloris, chunked, job_paths, wrong_methods, http_versions, absurd_urls]


def corpus():
    cases = []
    for gen in CATEGORIES:
        cases.extend(gen())
    names = set()
    for c in cases:
        key = (c.category, c.name)
        assert key not in names, "duplicate case name %s/%s" % key
        names.add(key)
    return cases


def main(argv):
    cases = corpus()
    counts = {}
    for c in cases:
        counts[c.category] = counts.get(c.category, 0) + 1
    for cat, n in counts.items():
        print("%-14s %4d" % (cat, n))
    print("%-14s %4d" % ("total", len(cases)))
    if len(argv) > 2 and argv[1] == "--dump":
        os.makedirs(argv[2], exist_ok=True)
        for c in cases:
            with open(os.path.join(argv[2], "%s__%s.http" % (c.category, c.name.replace("/", "_"))), "wb") as f:
                f.write(c.data)


if __name__ == "__main__":
    main(sys.argv)
