#!/usr/bin/python3
"""Instructions a PostgreSQL backend runs per call of the hot SQL functions.

Time per call moves with this machine's load by ±20 % between rounds, which hides
changes of 5-10 % to a statement. The number of instructions the backend runs does not:
this script starts a throwaway cluster under valgrind's callgrind, drives each
function from one session N times and again 6N times, and divides the difference by
5N (connecting, planning and the first calls cancel out). Two builds compare by running
it in each checkout; repeats agree to within about 1 %.

Shapes measured (each in its own session, on a queue of 200,000 jobs):
  exchange_10x10   the daemon's call that settles the 10 jobs it holds and leases 10
  exchange_light   under light load: a call that leases one job (nothing else
                   queued), then the call that settles it (a reply channel waits):
                   dispatch.settle asking for the wake time, as the daemon settles
                   after an exchange that found the queue empty (023)
  submit_one       the gateway's submit_many of one request (to an empty queue)
  submit_push      the same, handed to an idle node that takes pushed jobs (015)
  submit_16        the same with 16 requests, as the gateway batches them under load
  submit_one_8k    submit_one with a request of 8 kB (a chat with some context): what
                   a submit costs per byte of the requests it is given
  submit_key_8k    submit_one_8k with an idempotency key, which takes the general
                   path (as POST /v1/jobs with an Idempotency-Key does)
  exchange_10x10_4k  exchange_10x10 with results of 4 kB (a long answer): what
                   settling costs per byte of the results
  results_one      the gateway's read of one job (dispatch.results)
  stream_8         the daemon's relay of one stream piece of each of 8 jobs it holds
                   (dispatch.stream; each piece is a NOTIFY to the waiting gateway)

Usage: bench/sqlcost.py [--calls N] [--json FILE] [--shapes a,b] [--keep DIR]   (needs valgrind;
a few minutes). --keep copies the callgrind output of each shape's longer session to
DIR/<shape>.callgrind, for callgrind_annotate --inclusive=yes.
"""
import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psycopg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import pgharness  # noqa: E402

def result_of(content):
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "probe",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


def request_of(content):
    return {"model": "light", "payload": {"model": "light", "messages": [{"role": "user", "content": content}]}}


RESULT = result_of("hello")
REQUEST = request_of("hello")


def prose(size):
    """About `size` bytes of words in a fixed pseudo-random order: text that compresses
    about as well as a chat's (a repeated phrase would compress to almost nothing)."""
    words = ("the of and to in is that for it as with was on be by at this are from or have an "
             "they which one you had not but what all were when we there can more if will about "
             "model request server answer token queue node lease job time first after because").split()
    out, length, x = [], 0, 12345
    while length < size:
        x = (1103515245 * x + 12345) % 2 ** 31
        out.append(words[x % len(words)])
        length += len(out[-1]) + 1
    return " ".join(out)


# The size of a long answer and of a chat request that carries some context.
RESULT_4K = result_of(prose(4000))
REQUEST_8K = request_of(prose(8000))


def outcomes(rows, result=RESULT):
    return json.dumps([{"id": i, "attempt": a, "result": result} for i, a in rows]) if rows else None


def exchange_10x10(node, admin, calls, result=RESULT):
    held = []
    for _ in range(calls):
        held = node.execute("SELECT id, attempt FROM dispatch.exchange(%s, 10) WHERE kind = 'job'",
                            (outcomes(held, result),)).fetchall()
        node.commit()
        if len(held) != 10:
            raise SystemExit("sqlcost: exchange_10x10 leased %d jobs, expected 10" % len(held))


def exchange_10x10_4k(node, admin, calls):
    exchange_10x10(node, admin, calls, RESULT_4K)


def exchange_light(node, admin, calls):
    for _ in range(calls):
        admin.execute("""INSERT INTO dispatch.jobs (model, endpoint, payload, max_attempts, reply_channel)
                         VALUES ('light', '/v1/chat/completions', %s, 3, 'gw_reply')""",
                      (json.dumps(REQUEST["payload"]),))
        held = node.execute("SELECT id, attempt FROM dispatch.exchange(NULL, 10) WHERE kind = 'job'").fetchall()
        node.commit()
        if len(held) != 1:
            raise SystemExit("sqlcost: exchange_light leased %d jobs, expected 1" % len(held))
        node.execute("SELECT count(*) FROM dispatch.settle(%s, true)", (outcomes(held),))
        node.commit()


def submit(gateway, admin, calls, requests, state="queued", request=REQUEST, keyed=False):
    for call in range(calls):
        # A key is new in each call: a repeated one would be a replay of the first.
        body = json.dumps([dict(request, idempotency_key="key-%d-%d" % (call, k)) if keyed else request
                           for k in range(requests)])
        rows = gateway.execute("SELECT id, sqlstate FROM dispatch.submit_many(%s, 'gw_reply')", (body,)).fetchall()
        gateway.commit()
        if len(rows) != requests or any(r[1] is not None for r in rows):
            raise SystemExit("sqlcost: submit_many refused a request: %s" % (rows,))
        # The queue stays empty, as in B2 and B4: a submit counts the model's queued
        # jobs (up to its queue limit) to know whether there is room.
        stored = admin.execute("DELETE FROM dispatch.jobs WHERE id = ANY (%s) RETURNING state",
                               ([r[0] for r in rows],)).fetchall()
        if stored != [(state,)] * requests:
            raise SystemExit("sqlcost: submitted jobs were stored %s, expected %s" % (stored, state))


def submit_one(gateway, admin, calls):
    submit(gateway, admin, calls, 1)


def submit_one_8k(gateway, admin, calls):
    submit(gateway, admin, calls, 1, request=REQUEST_8K)


def submit_key_8k(gateway, admin, calls):
    submit(gateway, admin, calls, 1, request=REQUEST_8K, keyed=True)


def submit_push(gateway, admin, calls):
    submit(gateway, admin, calls, 1, state="leased")


def submit_16(gateway, admin, calls):
    submit(gateway, admin, calls, 16)


def results_one(gateway, admin, calls):
    for i in range(calls):
        rows = gateway.execute("SELECT id, state, attempt, result, error FROM dispatch.results(%s)",
                               ([1 + 7919 * i % 200000],)).fetchall()
        gateway.commit()
        if len(rows) != 1:
            raise SystemExit("sqlcost: dispatch.results returned %d rows for one id" % len(rows))


def stream_8(node, admin, calls):
    admin.execute("""INSERT INTO dispatch.jobs (model, endpoint, payload, max_attempts, reply_channel, stream_token)
                     SELECT 'stream', '/v1/chat/completions', %s, 3, 'gw_reply', 'tok' || g
                     FROM generate_series(1, 8) AS g""", (json.dumps(REQUEST["payload"]),))
    held = node.execute("SELECT id, attempt FROM dispatch.exchange(NULL, 8) WHERE kind = 'job'").fetchall()
    node.commit()
    if len(held) != 8:
        raise SystemExit("sqlcost: stream_8 leased %d jobs, expected 8" % len(held))
    piece = 'data: {"choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":null}]}'
    for seq in range(calls):
        chunks = json.dumps([{"id": i, "attempt": a, "seq": seq, "more": True, "data": piece} for i, a in held])
        rows = node.execute("SELECT id, attempt, ok FROM dispatch.stream(%s)", (chunks,)).fetchall()
        node.commit()
        if len(rows) != 8 or not all(r[2] for r in rows):
            raise SystemExit("sqlcost: dispatch.stream refused pieces: %s" % (rows,))


# name -> (function, role of the measured session, whether that session is the node,
#          whether the helper node takes pushed jobs)
SHAPES = {
    "exchange_10x10": (exchange_10x10, "dispatch_node_probe", True, False),
    "exchange_light": (exchange_light, "dispatch_node_light", True, False),
    "submit_one": (submit_one, "sqlcost_gateway", False, False),
    "submit_push": (submit_push, "sqlcost_gateway", False, True),
    "submit_16": (submit_16, "sqlcost_gateway", False, False),
    "submit_one_8k": (submit_one_8k, "sqlcost_gateway", False, False),
    "submit_key_8k": (submit_key_8k, "sqlcost_gateway", False, False),
    "exchange_10x10_4k": (exchange_10x10_4k, "dispatch_node_probe", True, False),
    "results_one": (results_one, "sqlcost_gateway", False, False),
    "stream_8": (stream_8, "dispatch_node_stream", True, False),
}
NODE_MODELS = {"dispatch_node_probe": ["probe"], "dispatch_node_light": ["light"],
               "dispatch_node_stream": ["stream"]}


class Callgrind:
    """The cluster's postmaster under callgrind; every backend writes its counts to
    out/cg.<pid> when it exits."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.out = os.path.join(cluster.basedir, "callgrind")
        os.makedirs(self.out, exist_ok=True)
        cluster._chown(self.out)
        argv = ["valgrind", "--tool=callgrind", "--trace-children=yes",
                "--callgrind-out-file=%s/cg.%%p" % self.out,
                os.path.join(pgharness.PG_BIN, "postgres"), "-D", cluster.datadir, "-p", str(cluster.port)]
        if cluster.user is not None:
            argv = ["runuser", "-u", "postgres", "--"] + argv
        self.log = open(os.path.join(cluster.basedir, "valgrind.log"), "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            try:
                psycopg.connect(cluster.dsn("bench"), connect_timeout=5).close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.log.flush()
                    with open(self.log.name) as f:
                        tail = f.read()[-1500:]
                    raise SystemExit("sqlcost: postgres under valgrind did not start:\n%s" % tail)
                time.sleep(1)

    def instructions(self, pid):
        """Total instructions of backend `pid`, once it has exited and written them."""
        path = os.path.join(self.out, "cg.%d" % pid)
        deadline = time.monotonic() + 120
        while True:
            if os.path.exists(path):
                with open(path) as f:
                    for line in f:
                        if line.startswith("totals:"):
                            return int(line.split()[1])
            if time.monotonic() > deadline:
                raise SystemExit("sqlcost: backend %d wrote no callgrind totals to %s" % (pid, path))
            time.sleep(0.5)

    def stop(self):
        self.cluster.stop()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def register(conn, role):
    conn.execute("SELECT dispatch.register('llamacpp', %s, 10)", (NODE_MODELS[role],))
    conn.commit()


def session_instructions(cg, cluster, shape, calls, keep=None):
    """Instructions of one measured session running `calls` calls of `shape`. A submit
    needs a live node serving its model: a second, unmeasured session is that node."""
    fn, role, is_node, pushes = SHAPES[shape]
    with psycopg.connect(cluster.dsn("bench")) as admin, \
            psycopg.connect(cluster.dsn("bench", user=role)) as s, \
            (contextlib.nullcontext() if is_node
             else psycopg.connect(cluster.dsn("bench", user="dispatch_node_light"))) as helper:
        admin.autocommit = True
        admin.execute("SELECT dispatch.requeue(array_agg(id)) FROM dispatch.jobs WHERE state = 'leased'")
        admin.execute("VACUUM dispatch.jobs")
        if is_node:
            register(s, role)
        else:
            register(helper, "dispatch_node_light")
            helper.execute("SELECT dispatch.accept_pushes(%s)", (pushes,))
            helper.commit()
        pid = s.execute("SELECT pg_backend_pid()").fetchone()[0]
        s.commit()  # a transaction left open would keep an older now() than the jobs' run_at
        fn(s, admin, calls)
    count = cg.instructions(pid)
    if keep:
        shutil.copy(os.path.join(cg.out, "cg.%d" % pid), os.path.join(keep, "%s.callgrind" % shape))
    return count


def measure(calls=20, log=print, shapes=None, keep=None):
    """Instructions per call of each shape (exchange_light: per lease-and-settle pair)."""
    if not shutil.which("valgrind"):
        raise SystemExit("sqlcost: valgrind is not installed (apt-get install valgrind)")
    cluster = pgharness.Cluster(basedir=tempfile.mkdtemp(prefix="pgdispatch-sqlcost-"),
                                settings={"autovacuum": "off"})
    cg = None
    try:
        cluster.start()
        cluster.create_database("bench")
        cluster.migrate("bench")
        for node in ("probe", "light", "stream"):
            cluster.psql("SELECT dispatch.enroll('%s')" % node, dbname="bench")
        cluster.psql("SELECT dispatch.set_setting('queue_depth_per_slot', 1000000)", dbname="bench")
        cluster.psql("CREATE ROLE sqlcost_gateway LOGIN IN ROLE dispatch_gateway", dbname="bench")
        cluster.psql("""INSERT INTO dispatch.jobs (model, endpoint, payload, max_attempts)
                        SELECT 'probe', '/v1/chat/completions', '{"model":"probe"}', 3
                        FROM generate_series(1, 200000)""", dbname="bench")
        cluster.psql("VACUUM ANALYZE dispatch.jobs", dbname="bench")
        cluster.stop()
        cg = Callgrind(cluster)
        figures = {}
        for shape in shapes or SHAPES:
            short = session_instructions(cg, cluster, shape, calls)
            long = session_instructions(cg, cluster, shape, 6 * calls, keep)
            figures[shape] = round((long - short) / (5 * calls))
            log("sqlcost: %s %d instructions per call" % (shape, figures[shape]))
        return figures
    finally:
        if cg is not None:
            cg.stop()
        cluster.destroy()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=20, help="N: sessions of N and 6N calls (default 20)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--shapes", help="comma-separated shapes to measure (default: all)")
    ap.add_argument("--keep", help="copy each shape's callgrind output (longer session) into this directory")
    args = ap.parse_args()
    shapes = args.shapes.split(",") if args.shapes else None
    unknown = [s for s in shapes or [] if s not in SHAPES]
    if unknown:
        ap.error("unknown shapes %s; known: %s" % (", ".join(unknown), ", ".join(SHAPES)))
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    figures = measure(args.calls, log=lambda line: print(line, flush=True), shapes=shapes, keep=args.keep)
    if args.json:
        commit = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                                capture_output=True, text=True).stdout.strip()
        with open(args.json, "w") as f:
            json.dump({"commit": commit, "calls": args.calls, "instructions_per_call": figures}, f, indent=2)


if __name__ == "__main__":
    main()
