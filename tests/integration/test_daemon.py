"""pgdispatch-daemon against a real PostgreSQL and the real fake provider: leasing up
to max concurrency, sharing between daemons, result classification, health,
idleness, crashes, a database restart, shutdown, capacity discovery and identity.

Every wait is a wait_for with a deadline; the one fixed window is the 60 s idle
measurement, which is what it measures."""
import json
import os
import signal
import time

import pytest

from conftest import FakeProvider, binary, free_port, wait_for

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


# ---------------------------------------------------------------------------- helpers

Fake = FakeProvider


def daemon(procs, dsn, fake, *extra, name="daemon", env=None, provider_url=None):
    argv = [binary("pgdispatch-daemon"), "--database-url", dsn,
            "--provider-url", provider_url or fake.url, "--health-interval-ms", "200"] + list(extra)
    return procs.start(name, argv, env)


def node(db, name):
    rows = db.sql("SELECT live, health, max_concurrency, provider_family, models, in_flight, health_reason "
                  "FROM dispatch.nodes() WHERE name = %s", (name,))
    if not rows:
        return None
    keys = ("live", "health", "max_concurrency", "provider_family", "models", "in_flight", "health_reason")
    return dict(zip(keys, rows[0]))


def wait_live(db, name, timeout=10):
    wait_for(lambda: (node(db, name) or {}).get("live"), timeout, what="node %s live" % name)


def submit(db, n, model="demo", payload=None, **opts):
    reqs = []
    for i in range(n):
        p = dict(payload or CHAT)
        p.setdefault("user", "job-%d-%d" % (time.monotonic_ns(), i))   # the fake provider counts markers
        r = {"model": model, "payload": p}
        r.update(opts)
        reqs.append(r)
    rows = db.sql("SELECT id, sqlstate, message FROM dispatch.submit_many(%s)", (json.dumps(reqs),))
    for _, sqlstate, message in rows:
        assert sqlstate is None, message
    return [r[0] for r in rows]


def jobs(db, ids):
    rows = db.sql("SELECT id, state, attempt, result, error, leased_by, payload->>'user' "
                  "FROM dispatch.jobs WHERE id = ANY(%s) ORDER BY id", (ids,))
    keys = ("id", "state", "attempt", "result", "error", "leased_by", "marker")
    return [dict(zip(keys, r)) for r in rows]


def states(db, ids):
    return [j["state"] for j in jobs(db, ids)]


def all_in(db, ids, wanted=("succeeded",)):
    return all(s in wanted for s in states(db, ids))


def leased_count(db, ids):
    return sum(1 for s in states(db, ids) if s == "leased")


def node_id(db, name):
    return db.one("SELECT id FROM dispatch.nodes WHERE name = %s", (name,))


def drain_watching_leases(db, ids, timeout):
    """Waits until every job of ids succeeded; returns the most jobs found leased at
    once (each look is one snapshot of the table, taken back to back)."""
    most = 0
    deadline = time.monotonic() + timeout
    while True:
        leased, left = db.sql("SELECT count(*) FILTER (WHERE state = 'leased'), "
                              "count(*) FILTER (WHERE state <> 'succeeded') "
                              "FROM dispatch.jobs WHERE id = ANY(%s)", (ids,))[0]
        most = max(most, leased)
        if left == 0:
            return most
        assert time.monotonic() < deadline, "jobs still unfinished after %s s" % timeout


# ---------------------------------------------------------------------------- tests

def test_help_lists_every_flag_with_env_and_default():
    import subprocess
    out = subprocess.run([binary("pgdispatch-daemon"), "--help"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0
    text = out.stdout + out.stderr
    for flag in ("database-url", "provider-url", "models", "max-concurrency", "default-slots", "lease-ahead",
                 "provider-family",
                 "region", "labels", "health-path", "health-interval-ms", "request-timeout-ms", "grace-ms",
                 "log-level"):
        assert "--" + flag in text
        assert "PGDISPATCH_" + flag.upper().replace("-", "_") in text
    assert "SIGHUP" in text


def test_jobs_run_concurrently_up_to_max_and_never_beyond(db, procs):
    fake = Fake(procs, latency_ms=150)
    dsn = db.enroll("n1")
    daemon(procs, dsn, fake, "--models", "demo", "--max-concurrency", "3", name="n1")
    wait_live(db, "n1")
    ids = submit(db, 18)
    most_leased = drain_watching_leases(db, ids, 20)
    stats = fake.stats()
    assert stats["max_in_flight"] == 3, stats
    done = jobs(db, ids)
    assert all(j["attempt"] == 1 for j in done)
    assert all(j["result"]["object"] == "chat.completion" for j in done), done[0]["result"]
    assert db.one("SELECT max_concurrency FROM dispatch.nodes WHERE name = 'n1'") == 3
    # 150 ms jobs are far slower than a round trip: no lease is held beyond the slots.
    assert most_leased == 3


def test_fast_jobs_are_leased_ahead_yet_never_run_beyond_max(db, procs):
    """With an instant provider the node holds more leases than slots (they wait in the
    daemon), up to four times its slots beyond them (what it tells the database it may
    hold), while the provider never sees more than max concurrency at once; every job
    runs exactly once."""
    fake = Fake(procs)
    dsn = db.enroll("n1")
    daemon(procs, dsn, fake, "--models", "demo", "--max-concurrency", "2", name="n1")
    wait_live(db, "n1")
    assert db.one("SELECT lease_ahead FROM dispatch.nodes WHERE name = 'n1'") == 8
    db.sql("SELECT dispatch.set_setting('queue_depth_per_slot', 1000)")
    ids = submit(db, 2000)
    most_leased = drain_watching_leases(db, ids, 60)
    stats = fake.stats()
    assert 1 <= stats["max_in_flight"] <= 2, stats   # an instant answer may end before the next request
    assert stats["by_path"]["/v1/chat/completions"] == 2000, stats
    assert all(j["attempt"] == 1 for j in jobs(db, ids))
    assert 2 < most_leased <= 2 + 8


def test_lease_ahead_0_keeps_to_the_slots(db, procs):
    fake = Fake(procs)
    dsn = db.enroll("n1")
    daemon(procs, dsn, fake, "--models", "demo", "--max-concurrency", "2", "--lease-ahead", "0", name="n1")
    wait_live(db, "n1")
    db.sql("SELECT dispatch.set_setting('queue_depth_per_slot', 1000)")
    ids = submit(db, 2000)
    most_leased = drain_watching_leases(db, ids, 60)
    assert db.one("SELECT lease_ahead FROM dispatch.nodes WHERE name = 'n1'") == 0
    assert most_leased == 2


def test_a_daemon_that_got_every_job_it_asked_for_leases_again_as_each_ends(db, procs):
    """One submit wakes the daemon once. With one slot and no lease-ahead its exchange
    gets all it asks for, so the queue may hold more: the call that settles each job
    must lease the next (dispatch.exchange), not only settle it (dispatch.settle, 023),
    or the rest would wait for a notification that never comes. Only once an exchange
    finds the queue empty does the next job (pushed to it) end with settle."""
    fake = Fake(procs)
    proc = daemon(procs, db.enroll("n1"), fake, "--models", "demo", "--max-concurrency", "1", "--lease-ahead", "0",
                  "--log-level", "debug", name="n1")
    wait_live(db, "n1")
    ids = submit(db, 4)
    wait_for(lambda: all_in(db, ids), 10, what="four jobs, one wake-up")
    assert "event=settle" not in proc.output()
    wait_for(lambda: "event=exchange outcomes=1 max_jobs=1" in proc.output().split("job=%d " % ids[-1])[-1], 5,
             what="the exchange that settles the last job and finds the queue empty")
    pushed = submit(db, 1)
    wait_for(lambda: all_in(db, pushed), 5, what="the pushed job")
    wait_for(lambda: "event=settle outcomes=1" in proc.output(), 5, what="the pushed job settled")
    assert "jobs_pushed" not in proc.output()
    proc.signal(signal.SIGTERM)
    assert proc.wait(8) == 0
    assert "jobs_started=5 jobs_pushed=1 jobs_finished=5" in proc.output()


def test_two_daemons_share_load_and_a_busy_one_blocks_nothing(db, procs):
    slow = Fake(procs, name="slow", latency_ms=4000)
    fast = Fake(procs, name="fast", latency_ms=100)
    daemon(procs, db.enroll("busy"), slow, "--models", "demo", "--max-concurrency", "1", name="busy")
    wait_live(db, "busy")
    first = submit(db, 1)
    wait_for(lambda: leased_count(db, first) == 1, 5, what="busy daemon took the first job")
    daemon(procs, db.enroll("idle"), fast, "--models", "demo", "--max-concurrency", "2", name="idle")
    wait_live(db, "idle")
    t0 = time.monotonic()
    second = submit(db, 1)
    wait_for(lambda: all_in(db, second), 3, what="the idle daemon ran the second job")
    assert time.monotonic() - t0 < 2.0
    assert jobs(db, second)[0]["leased_by"] == node_id(db, "idle")
    assert states(db, first) == ["leased"]           # still on the busy node

    # Under a burst both nodes work: each takes what its free slots allow.
    slow.config(latency_ms=300)
    wait_for(lambda: all_in(db, first), 8, what="the slow job finished")
    burst = submit(db, 12)
    wait_for(lambda: all_in(db, burst), 20, what="burst drained")
    by_node = {j["leased_by"] for j in jobs(db, burst)}
    assert by_node == {node_id(db, "busy"), node_id(db, "idle")}


@pytest.mark.parametrize("fault,fragment", [("malformed", "not valid JSON"), ("html", "not valid JSON"),
                                            ("empty", "empty body")])
def test_malformed_200_fails_at_once_not_retryable(db, procs, fault, fragment):
    fake = Fake(procs, fault=fault)
    daemon(procs, db.enroll("n1"), fake, "--models", "demo", "--max-concurrency", "2", name="n1")
    wait_live(db, "n1")
    t0 = time.monotonic()
    ids = submit(db, 1)
    wait_for(lambda: all_in(db, ids, ("failed",)), 5, what="job failed")
    assert time.monotonic() - t0 < 2.0
    job = jobs(db, ids)[0]
    assert job["attempt"] == 1
    assert job["error"]["code"] == "bad_response"
    assert fragment in job["error"]["message"], job["error"]
    assert job["error"]["status"] == 200
    assert node(db, "n1")["health"] == "healthy"


def test_provider_500_is_retried_and_then_succeeds(db, procs):
    db.sql("SELECT dispatch.set_setting('retry_base_ms', 200)")
    fake = Fake(procs, fault="500")
    daemon(procs, db.enroll("n1"), fake, "--models", "demo", "--max-concurrency", "2", name="n1")
    wait_live(db, "n1")
    ids = submit(db, 1)
    wait_for(lambda: fake.stats()["by_status"].get("500", 0) >= 1, 5, what="a 500 from the provider")
    fake.config(fault="none")
    wait_for(lambda: all_in(db, ids), 10, what="job succeeded after a retry")
    job = jobs(db, ids)[0]
    assert job["attempt"] >= 2
    assert job["result"]["object"] == "chat.completion"
    assert fake.stats()["by_status"]["500"] == job["attempt"] - 1


def test_provider_4xx_fails_with_status_and_does_not_touch_health(db, procs):
    fake = Fake(procs, fault="400")
    daemon(procs, db.enroll("n1"), fake, "--models", "demo", "--max-concurrency", "2", name="n1")
    wait_live(db, "n1")
    ids = submit(db, 3)
    wait_for(lambda: all_in(db, ids, ("failed",)), 5, what="jobs failed")
    for job in jobs(db, ids):
        assert job["attempt"] == 1
        assert job["error"]["code"] == "provider_4xx"
        assert job["error"]["status"] == 400
        assert "injected bad request" in job["error"]["body"]
        assert "injected bad request" in job["error"]["message"]
    assert node(db, "n1")["health"] == "healthy"


def test_deadline_passing_aborts_the_transfer(db, procs):
    fake = Fake(procs, latency_ms=10000)
    daemon(procs, db.enroll("n1"), fake, "--models", "demo", "--max-concurrency", "2", name="n1")
    wait_live(db, "n1")
    t0 = time.monotonic()
    ids = submit(db, 1, timeout_ms=700)
    wait_for(lambda: all_in(db, ids, ("expired",)), 5, what="job expired")
    assert time.monotonic() - t0 < 3
    assert jobs(db, ids)[0]["error"]["code"] == "deadline_exceeded"
    wait_for(lambda: fake.stats()["in_flight"] == 0, 5, what="transfer aborted at the provider")


def test_cancel_aborts_the_transfer(db, procs):
    fake = Fake(procs, latency_ms=20000)
    daemon(procs, db.enroll("n1"), fake, "--models", "demo", "--max-concurrency", "2", name="n1")
    wait_live(db, "n1")
    ids = submit(db, 1)
    wait_for(lambda: fake.stats()["in_flight"] == 1, 5, what="request at the provider")
    assert db.one("SELECT dispatch.cancel(%s, 'test')", (ids[0],)) == "cancelled"
    wait_for(lambda: fake.stats()["in_flight"] == 0, 5, what="transfer aborted")
    assert states(db, ids) == ["cancelled"]


def test_a_settle_rolled_back_by_a_lock_timeout_is_sent_again_unchanged(db, procs):
    """A failure of the moment (here 55P03: another session holds the job's row past the
    node's lock_timeout) keeps the provider's result and sends it again; it must not be
    taken for an outcome the database refuses (which is replaced by a bad_response error,
    or dropped when that is refused too)."""
    role = db.one("SELECT dispatch.enroll('n1')")
    db.sql('ALTER ROLE "%s" IN DATABASE "%s" SET lock_timeout = \'200ms\'' % (role, db.name))
    fake = Fake(procs, latency_ms=300)
    proc = daemon(procs, db.node_dsn(role), fake, "--models", "demo", "--max-concurrency", "2", name="n1")
    wait_live(db, "n1")
    ids = submit(db, 1)
    wait_for(lambda: fake.stats()["in_flight"] == 1, 5, what="request at the provider")
    with db.connect(autocommit=False) as holder:
        holder.execute("SELECT 1 FROM dispatch.jobs WHERE id = %s FOR UPDATE", (ids[0],))
        wait_for(lambda: proc.output().count("sqlstate=55P03") >= 3, 15,
                 what="the settle timed out on the lock three times")
        assert states(db, ids) == ["leased"]
        holder.rollback()
    wait_for(lambda: all_in(db, ids, ("succeeded", "failed")), 10, what="job finished")
    j = jobs(db, ids)[0]
    assert (j["state"], j["attempt"], j["error"]) == ("succeeded", 1, None)
    assert j["result"]["choices"][0]["message"]["content"]
    assert fake.stats()["by_path"]["/v1/chat/completions"] == 1


def test_long_job_lease_is_extended(db, procs):
    db.sql("SELECT dispatch.set_setting('lease_seconds', 1)")
    fake = Fake(procs, latency_ms=2500)
    daemon(procs, db.enroll("n1"), fake, "--models", "demo", "--max-concurrency", "2", name="n1")
    wait_live(db, "n1")
    ids = submit(db, 2)
    wait_for(lambda: all_in(db, ids), 10, what="long jobs succeeded")
    assert [j["attempt"] for j in jobs(db, ids)] == [1, 1]
    assert fake.stats()["by_path"]["/v1/chat/completions"] == 2


def test_provider_down_degrades_node_and_stops_leasing(db, procs):
    port = free_port()
    fake = Fake(procs, port=port)
    proc = daemon(procs, db.enroll("n1"), fake, "--models", "demo", "--max-concurrency", "3", name="n1")
    wait_live(db, "n1")
    assert db.one("SELECT capacity FROM dispatch.capacity() WHERE model = 'demo'") == 3

    # Health endpoint failing: degraded, capacity gone, nothing leased.
    fake.config(health="down")
    wait_for(lambda: node(db, "n1")["health"] == "degraded", 5, what="node degraded")
    assert "503" in node(db, "n1")["health_reason"]
    cap = db.sql("SELECT capacity, live_nodes FROM dispatch.capacity() WHERE model = 'demo'")[0]
    assert cap == (0, 0)
    db.sql("SELECT dispatch.set_capacity('demo', 5)")      # so a submit is accepted meanwhile
    ids = submit(db, 1)
    probes = fake.stats()["by_path"].get("/health", 0)
    wait_for(lambda: fake.stats()["by_path"].get("/health", 0) >= probes + 3, 5, what="three more probes")
    assert states(db, ids) == ["queued"]
    assert fake.stats()["by_path"].get("/v1/chat/completions", 0) == 0
    fake.config(health="ok")
    wait_for(lambda: node(db, "n1")["health"] == "healthy", 5, what="node healthy again")
    wait_for(lambda: all_in(db, ids), 5, what="queued job ran after recovery")
    db.sql("SELECT dispatch.clear_capacity('demo')")

    # Provider process gone (connection refused): degraded; back on the same port: healthy.
    fake.proc.kill9()
    wait_for(lambda: node(db, "n1")["health"] == "degraded", 5, what="node degraded on refused connection")
    assert "connect" in node(db, "n1")["health_reason"].lower()
    assert db.one("SELECT capacity FROM dispatch.capacity() WHERE model = 'demo'") == 0
    fake.start()
    wait_for(lambda: node(db, "n1")["health"] == "healthy", 5, what="healthy after restart")
    ids = submit(db, 2)
    wait_for(lambda: all_in(db, ids), 5, what="jobs run after provider restart")
    out = proc.output()
    assert out.count("event=provider_degraded") == 2 and out.count("event=provider_healthy") == 2
    assert proc.alive()


def test_idle_daemon_issues_no_statements_for_60s(db, procs):
    fake = Fake(procs)
    proc = daemon(procs, db.enroll("n1"), fake, "--models", "demo", "--max-concurrency", "2",
                  "--health-interval-ms", "500", name="n1")
    wait_live(db, "n1")
    ids = submit(db, 3)
    wait_for(lambda: all_in(db, ids), 5, what="warm-up jobs done")
    # The exchange that settled the last job may still be committing; wait until
    # the count stops moving for a moment, then measure a full minute.
    last = [db.statement_calls(), time.monotonic()]

    def settled():
        now = db.statement_calls()
        if now != last[0]:
            last[:] = [now, time.monotonic()]
        return time.monotonic() - last[1] > 1.0
    wait_for(settled, 10, what="statement count settled")
    before = db.statement_calls()
    probes_before = fake.stats()["by_path"].get("/health", 0)
    time.sleep(60)     # the measured window itself
    assert db.statement_calls() == before, "an idle daemon must issue no statements"
    assert fake.stats()["by_path"].get("/health", 0) > probes_before + 60   # it kept probing locally
    assert proc.alive()
    t0 = time.monotonic()
    ids = submit(db, 1)
    wait_for(lambda: all_in(db, ids), 2, interval=0.005, what="job after idleness")
    assert time.monotonic() - t0 < 1.0


def test_kill9_mid_job_then_another_daemon_finishes_it_exactly_once(db, procs):
    db.sql("SELECT dispatch.set_setting('lease_seconds', 2)")
    fake = Fake(procs, latency_ms=1500)
    victim = daemon(procs, db.enroll("victim"), fake, "--models", "demo", "--max-concurrency", "2", name="victim")
    wait_live(db, "victim")
    ids = submit(db, 6)
    wait_for(lambda: leased_count(db, ids) == 2, 5, what="victim holds two jobs")
    held = [j["id"] for j in jobs(db, ids) if j["state"] == "leased"]
    victim.kill9()
    fake.config(latency_ms=50)
    daemon(procs, db.enroll("rescuer"), fake, "--models", "demo", "--max-concurrency", "4", name="rescuer")
    wait_for(lambda: all_in(db, ids), 15, what="every job finished")
    done = {j["id"]: j for j in jobs(db, ids)}
    rescuer = node_id(db, "rescuer")
    for i in held:
        assert done[i]["attempt"] == 2, done[i]
        assert done[i]["leased_by"] == rescuer
    for i in set(ids) - set(held):
        assert done[i]["attempt"] == 1
    markers = fake.stats()["markers"]
    for j in done.values():
        assert markers[j["marker"]] == (2 if j["id"] in held else 1), (j, markers.get(j["marker"]))


def test_restarted_daemon_takes_back_its_dead_incarnations_leases_at_once(db, procs):
    """A daemon that comes back under the same identity registers with the attempts it
    holds (none): the leases of its dead incarnation are taken back immediately,
    not when they expire (lease_seconds is 300 here)."""
    db.sql("SELECT dispatch.set_setting('lease_seconds', 300)")
    fake = Fake(procs, latency_ms=30000)
    dsn = db.enroll("phoenix")
    first = daemon(procs, dsn, fake, "--models", "demo", "--max-concurrency", "2", name="phoenix1")
    wait_live(db, "phoenix")
    ids = submit(db, 2)
    wait_for(lambda: leased_count(db, ids) == 2, 5, what="the first incarnation holds both jobs")
    first.kill9()
    fake.config(latency_ms=0)
    daemon(procs, dsn, fake, "--models", "demo", "--max-concurrency", "2", name="phoenix2")
    wait_for(lambda: all_in(db, ids), 15, what="both jobs finished long before their leases would expire")
    for j in jobs(db, ids):
        assert j["attempt"] == 2, j


def test_postgres_restart_under_load_loses_and_doubles_nothing(pg, db, procs):
    db.sql("SELECT dispatch.set_setting('lease_seconds', 3)")
    db.sql("SELECT dispatch.set_setting('queue_depth_per_slot', 1000)")
    fake = Fake(procs, latency_ms=40)
    proc = daemon(procs, db.enroll("n1"), fake, "--models", "demo", "--max-concurrency", "4", name="n1")
    wait_live(db, "n1")
    ids = submit(db, 150)
    wait_for(lambda: sum(s == "succeeded" for s in states(db, ids)) >= 20, 10, what="some progress")
    pg.restart()
    wait_for(lambda: all_in(db, ids), 40, interval=0.2, what="every job finished after the restart")
    assert proc.alive()
    out = proc.output()
    assert "db_connection_lost" in out and "reregistered" in out
    done = jobs(db, ids)
    markers = fake.stats()["markers"]
    # Nothing lost: all succeeded. Nothing doubled: a job ran at the provider again only
    # when its attempt was taken back (attempt > 1), never twice for one attempt.
    for j in done:
        assert markers[j["marker"]] <= j["attempt"], (j, markers[j["marker"]])


def test_sigterm_lets_in_flight_finish_and_exits_0(db, procs):
    fake = Fake(procs, latency_ms=1000)
    proc = daemon(procs, db.enroll("n1"), fake, "--models", "demo", "--max-concurrency", "2",
                  "--grace-ms", "10000", name="n1")
    wait_live(db, "n1")
    ids = submit(db, 5)
    wait_for(lambda: leased_count(db, ids) == 2, 5, what="two in flight")
    running = [j["id"] for j in jobs(db, ids) if j["state"] == "leased"]
    proc.signal(signal.SIGTERM)
    assert proc.wait(8) == 0
    done = {j["id"]: j for j in jobs(db, ids)}
    for i in running:
        assert done[i]["state"] == "succeeded"
    for i in set(ids) - set(running):
        assert done[i]["state"] == "queued" and done[i]["attempt"] == 0
    assert node(db, "n1")["live"] is False
    assert "deregistered" in proc.output()


def test_sigterm_past_grace_hands_the_rest_back(db, procs):
    fake = Fake(procs, latency_ms=20000)
    proc = daemon(procs, db.enroll("n1"), fake, "--models", "demo", "--max-concurrency", "3",
                  "--grace-ms", "300", name="n1")
    wait_live(db, "n1")
    ids = submit(db, 3)
    wait_for(lambda: leased_count(db, ids) == 3, 5, what="three in flight")
    proc.signal(signal.SIGTERM)
    assert proc.wait(8) == 0
    for j in jobs(db, ids):
        assert j["state"] == "queued" and j["leased_by"] is None, j
    wait_for(lambda: fake.stats()["in_flight"] == 0, 5, what="transfers aborted")
    # Another node picks them up at once (the hand-back woke the model channel).
    fake.config(latency_ms=0)
    daemon(procs, db.enroll("n2"), fake, "--models", "demo", "--max-concurrency", "3", name="n2")
    wait_for(lambda: all_in(db, ids), 5, what="handed-back jobs finished elsewhere")
    assert [j["attempt"] for j in jobs(db, ids)] == [2, 2, 2]


def test_capacity_discovery_props_server_info_and_unreported(db, procs):
    llama = Fake(procs, name="llama", family="llamacpp", slots=7, models="demo")
    sglang = Fake(procs, name="sglang", family="sglang", slots=5, models="demo,other")
    vllm = Fake(procs, name="vllm", family="vllm", models="demo")
    daemon(procs, db.enroll("llama"), llama, name="llama")
    daemon(procs, db.enroll("sglang"), sglang, name="sglang")
    daemon(procs, db.enroll("vllm"), vllm, name="vllm")
    for n in ("llama", "sglang", "vllm"):
        wait_live(db, n)
    assert node(db, "llama")["max_concurrency"] == 7
    assert node(db, "llama")["provider_family"] == "llamacpp"
    assert node(db, "sglang")["max_concurrency"] == 5
    assert node(db, "sglang")["provider_family"] == "sglang"
    assert sorted(node(db, "sglang")["models"]) == ["demo", "other"]
    assert node(db, "vllm")["max_concurrency"] is None
    assert node(db, "vllm")["provider_family"] == "openai"
    cap = dict((m, (c, t)) for m, c, t in db.sql("SELECT model, capacity, tier FROM dispatch.capacity()"))
    assert cap["demo"] == (7 + 5 + 4, "mixed")      # the unreported node counts default_slots_per_node
    assert cap["other"] == (5, "reported")


def test_second_daemon_with_same_identity_exits_non_zero(db, procs):
    fake = Fake(procs)
    dsn = db.enroll("n1")
    first = daemon(procs, dsn, fake, "--models", "demo", name="first")
    wait_live(db, "n1")
    second = daemon(procs, dsn, fake, "--models", "demo", name="second")
    assert second.wait(10) == 3
    assert "already" in second.output() and "register_refused" in second.output()
    assert first.alive() and node(db, "n1")["live"]
    ids = submit(db, 2)
    wait_for(lambda: all_in(db, ids), 5, what="first daemon still works")


def test_unenrolled_role_exits_with_clear_error(db, procs):
    fake = Fake(procs)
    db.sql("CREATE ROLE pgd_stranger LOGIN IN ROLE dispatch_daemon")
    try:
        proc = daemon(procs, db.node_dsn("pgd_stranger"), fake, "--models", "demo", name="stranger")
        assert proc.wait(10) == 1
        out = proc.output()
        assert "PD005" in out and "not enrolled" in out and "dispatch.enroll" in out
    finally:
        db.sql("DROP ROLE IF EXISTS pgd_stranger")


def test_a_job_for_an_idle_daemon_is_pushed_to_it_and_run_without_a_lease_call(db, procs):
    """With the model's queue empty and a free slot, the submit stores the job leased to
    the node and hands it over on the node's channel (migration 015): the daemon starts
    it from the notification, and its only statement for the job is the call that
    settles it: dispatch.settle, for the daemon's last exchange found the queue empty
    (migration 023). The push's wake of the model's other nodes does not make it look
    at the queue a second later."""
    fake = Fake(procs)
    proc = daemon(procs, db.enroll("n1"), fake, "--models", "demo", "--max-concurrency", "2", "--log-level", "debug",
                  name="n1")
    wait_live(db, "n1")
    wait_for(lambda: db.one("SELECT push_pid IS NOT NULL FROM dispatch.nodes WHERE name = 'n1'"), 5,
             what="n1 accepts pushed jobs")
    listener = db.connect()
    notes = []
    listener.add_notify_handler(notes.append)
    listener.execute("LISTEN %s" % db.one("SELECT dispatch.node_channel(id) FROM dispatch.nodes WHERE name = 'n1'"))
    db.sql("SELECT pg_stat_statements_reset()")
    payload = dict(CHAT, user="pushed-%d" % time.monotonic_ns())
    ids = submit(db, 1, payload=payload, timeout_ms=30000)
    wait_for(lambda: all_in(db, ids), 5, what="pushed job done")
    [j] = jobs(db, ids)
    assert (j["attempt"], j["leased_by"], j["result"]["object"]) == (1, node_id(db, "n1"), "chat.completion")
    listener.execute("SELECT 1")    # reads what arrived meanwhile
    [note] = notes
    stored = db.one("SELECT payload::text FROM dispatch.jobs WHERE id = %s", (ids[0],))
    assert note.payload == "P%d:1:2000:30000:/v1/chat/completions:4:demo%s" % (ids[0], stored)
    calls = dict(db.sql("SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls FROM pg_stat_statements s "
                        "JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = 'dispatch_node_n1' AND s.toplevel"))
    assert sum(c for q, c in calls.items() if "dispatch.settle" in q) == 1, calls
    assert not [q for q in calls if "dispatch.exchange" in q], calls
    assert fake.stats()["markers"][payload["user"]] == 1
    assert "event=wake_skipped" in proc.output()
    proc.signal(signal.SIGTERM)
    assert proc.wait(8) == 0
    assert "jobs_pushed=1" in proc.output()


def test_a_pushed_job_that_outlives_its_first_lease_is_renewed_not_retried(db, procs):
    """A push leases for push_lease_seconds only (so a stuck node's pushes come back
    soon); a daemon that runs the job renews it like any lease."""
    db.sql("SELECT dispatch.set_setting('push_lease_seconds', 1)")
    fake = Fake(procs, latency_ms=2500)
    daemon(procs, db.enroll("n1"), fake, "--models", "demo", "--max-concurrency", "2", name="n1")
    wait_live(db, "n1")
    wait_for(lambda: db.one("SELECT push_pid IS NOT NULL FROM dispatch.nodes WHERE name = 'n1'"), 5,
             what="n1 accepts pushed jobs")
    ids = submit(db, 1)
    assert states(db, ids) == ["leased"]
    assert db.one("SELECT lease_expires_at - now() <= interval '1 second' FROM dispatch.jobs WHERE id = %s",
                  (ids[0],))
    wait_for(lambda: db.one("SELECT lease_expires_at - now() > interval '30 seconds' FROM dispatch.jobs "
                            "WHERE id = %s", (ids[0],)), 2, what="the first lease renewed to lease_seconds")
    wait_for(lambda: all_in(db, ids), 6, what="the job done")
    [j] = jobs(db, ids)
    assert j["attempt"] == 1
    assert fake.stats()["markers"][j["marker"]] == 1


def test_a_wake_aimed_at_a_frozen_node_is_covered_by_the_others(db, procs):
    """A submit wakes the node with the most free slots, or pushes the job to it. If
    that node cannot answer (here: stopped, its session still open, so it still counts
    as live), the other nodes heard the model's wake and look a second later
    themselves; a pushed job's first lease (push_lease_seconds, 2) runs out soon after,
    and they take it back."""
    fake = Fake(procs)
    frozen = daemon(procs, db.enroll("frozen"), fake, "--models", "demo", "--max-concurrency", "8", name="frozen")
    other = daemon(procs, db.enroll("other"), fake, "--models", "demo", "--max-concurrency", "2", name="other")
    wait_live(db, "frozen")
    wait_live(db, "other")
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        for _ in range(3):
            t0 = time.monotonic()
            ids = submit(db, 1)
            wait_for(lambda: all_in(db, ids), 5, interval=0.01, what="job done by the other node")
            took = time.monotonic() - t0
            assert 0.9 < took < 3.0, "the standby wake (1 s) took the job, in %.2f s" % took
            assert [j["leased_by"] for j in jobs(db, ids)] == [node_id(db, "other")]
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    # Awake again, the frozen node is the one woken (most free slots) and answers at once.
    t0 = time.monotonic()
    ids = submit(db, 1)
    wait_for(lambda: all_in(db, ids), 5, interval=0.01, what="job after thawing")
    assert time.monotonic() - t0 < 0.9
    assert [j["leased_by"] for j in jobs(db, ids)] == [node_id(db, "frozen")]
