#!/bin/bash
# `make test-compose`: runs the project's own docker-compose.yml for real, with
# Debian's podman + podman-compose (no Docker engine and no image registry needed),
# and checks the running system from the host.
#
#   docker/test-compose.sh          the whole test (what `make test-compose` runs)
#   docker/test-compose.sh static   only the static check of the compose files
#   docker/test-compose.sh base     only build + import the debian:bookworm-slim base
#
# Steps: install podman, podman-compose, runc, debootstrap, python3-yaml and
# docker-compose (Debian's 1.29, only for `config`) when missing; statically validate
# docker-compose.yml and the override files (docker/check_compose.py, then the compose
# schema with `docker-compose config`, then systemd-analyze verify on the units); build a
# debian:bookworm-slim base image from Debian's packages with debootstrap (cached in
# build/compose/, rebuilt only when missing or with REBUILD_BASE=1) and
# `podman import` it under the exact name the Dockerfiles use; `podman-compose up -d
# --build`; check the endpoints; stop and start the daemon; `podman-compose down -v`.
#
# Podman's settings come from docker/containers.conf through CONTAINERS_CONF; the
# machine's own configuration is never edited. Every wait has a deadline and the
# whole run is bounded by TEST_COMPOSE_TIMEOUT (default 520 s) plus at most a minute
# of teardown. On failure the containers' logs are printed; after any run they are
# kept in build/compose/logs/.
#
# Environment: COMPOSE_TEST_PORT (host port for the gateway; default: the first free
# one from 18080), TEST_COMPOSE_TIMEOUT, REBUILD_BASE=1, KEEP_UP=1 (leave the
# project running after a successful run, for poking at it).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE="$ROOT/build/compose"
BASE_IMAGE=docker.io/library/debian:bookworm-slim
BASE_LABEL=org.pgdispatch.base
PROJECT=pgdispatch_test
COMPOSE_FILE="$ROOT/docker-compose.yml"
MODEL=demo
TIMEOUT=${TEST_COMPOSE_TIMEOUT:-520}   # + up to 60 s of podman-compose down: under 10 minutes
export CONTAINERS_CONF="$ROOT/docker/containers.conf"

START=$(date +%s)
log() { printf '[test-compose %3ds] %s\n' "$(($(date +%s) - START))" "$*"; }
die() { log "FAIL: $*"; exit 1; }
PASSED=0 SKIPPED=0 UP=0
# The closing line CI reads: "compose: N passed, N failed, N skipped".
on_exit() {
    local rc=$?
    if [ "$UP" = 1 ]; then
        if [ $rc -ne 0 ]; then log "failed: container logs follow"; dump_logs; fi
        if [ "${KEEP_UP:-0}" = 1 ] && [ $rc -eq 0 ]; then
            log "KEEP_UP=1: left running; stop with: CONTAINERS_CONF=$CONTAINERS_CONF podman-compose -p $PROJECT down -v"
        else
            teardown
        fi
    fi
    echo "compose: $PASSED passed, $([ $rc -eq 0 ] && echo 0 || echo 1) failed, $SKIPPED skipped"
    exit $rc
}
# Seconds left before the run's deadline (at least 1: `timeout` needs a positive
# number; whatever starts after the deadline fails at once).
deadline_left() { local left=$((START + TIMEOUT - $(date +%s))); [ $left -gt 0 ] || left=1; echo $left; }

# ---------------------------------------------------------------- packages
ensure_packages() {
    local want=(podman podman-compose runc debootstrap python3-yaml docker-compose netavark aardvark-dns
                iptables uidmap slirp4netns fuse-overlayfs) missing=() p
    for p in "${want[@]}"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
        timeout "$(deadline_left)" $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive timeout "$(deadline_left)" $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    [ "$(id -u)" = 0 ] || die "podman-compose runs the project as root here; run as root"
}

# ---------------------------------------------------------------- base image
# The Debian archive this machine uses (first deb source for bookworm, and for
# bookworm-security), from /etc/apt/sources.list and sources.list.d.
debian_mirrors() {
    python3 - <<'PY'
import glob, re
pairs = []  # (uri, suite)
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        line = line.split("#", 1)[0].strip()
        m = re.match(r"deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
        if m:
            pairs.append((m.group(1), m.group(2)))
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[0].isspace():
                continue
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.split()
        if "deb" not in fields.get("types", []) or fields.get("enabled", ["yes"])[0] == "no":
            continue
        for uri in fields.get("uris", []):
            for suite in fields.get("suites", []):
                pairs.append((uri, suite))
main = next((u for u, s in pairs if s == "bookworm"), "http://deb.debian.org/debian")
sec = next((u for u, s in pairs if s == "bookworm-security"), None)
if sec is None:
    sec = main.rstrip("/") + "-security" if main.rstrip("/").endswith("/debian") else "http://deb.debian.org/debian-security"
print(main.rstrip("/"), sec.rstrip("/"))
PY
}

build_base() {
    local tarball="$CACHE/debian-bookworm-slim.tar"
    if [ "${REBUILD_BASE:-0}" != 1 ] && podman image exists "$BASE_IMAGE"; then
        if [ -z "$(podman image inspect --format "{{index .Labels \"$BASE_LABEL\"}}" "$BASE_IMAGE" 2>/dev/null)" ]; then
            log "using the existing $BASE_IMAGE (not ours: left as it is)"
        else
            log "using the cached $BASE_IMAGE"
        fi
        return
    fi
    mkdir -p "$CACHE"
    if [ "${REBUILD_BASE:-0}" = 1 ] || [ ! -s "$tarball" ]; then
        local mirror security rootfs="$CACHE/rootfs"
        read -r mirror security < <(debian_mirrors)
        log "debootstrap bookworm (minbase) from $mirror"
        rm -rf "$rootfs"
        timeout "$(deadline_left)" debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE/debootstrap.log"; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
        # Make it what debian:bookworm-slim is: Debian's sources in deb822 form, no
        # docs/man/locales installed later, apt caches cleaned, no host identity.
        rm -f "$rootfs/etc/apt/sources.list"
        cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
        cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
        echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
        echo 'APT::AutoRemove::SuggestsImportant "false";' >"$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
        # Point-release and security updates, as the published image has them.
        chroot "$rootfs" /bin/sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get -y -qq upgrade' \
            >>"$CACHE/debootstrap.log" 2>&1 || die "apt-get upgrade in the new base failed (log: $CACHE/debootstrap.log)"
        find "$rootfs/usr/share/doc" -mindepth 2 -not -name copyright -not -type d -delete 2>/dev/null || true
        rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
               "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
               "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/tmp/* "$rootfs"/debootstrap
        : >"$rootfs/etc/resolv.conf"
        echo localhost >"$rootfs/etc/hostname"
        : >"$rootfs/etc/machine-id"
        tar --numeric-owner --xattrs -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    log "podman import $tarball as $BASE_IMAGE"
    podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' \
        --change "LABEL $BASE_LABEL=debootstrap-minbase-bookworm" \
        "$tarball" "$BASE_IMAGE" >/dev/null
}

# ---------------------------------------------------------------- static check
static_check() {
    log "static check of docker-compose.yml and docker/compose.*.yml"
    python3 "$ROOT/docker/check_compose.py" || die "the compose files have problems (above)"
    # The compose JSON schema, as Debian's docker-compose (1.29) knows it: the file and
    # the file with each override (the external-db one needs its variables set).
    local f
    for f in "" $(cd "$ROOT" && ls docker/compose.*.yml); do
        (cd "$ROOT" && PGDISPATCH_DB_HOST=db.invalid PGDISPATCH_DB_ADMIN_USER=x PGDISPATCH_DB_ADMIN_PASSWORD=x \
            PGDISPATCH_GATEWAY_PASSWORD=x PGDISPATCH_NODE_PASSWORD=x \
            docker-compose -f docker-compose.yml ${f:+-f "$f"} config -q) \
            || die "docker-compose config rejects docker-compose.yml${f:+ + $f}"
    done
    echo "docker-compose config: docker-compose.yml and $(cd "$ROOT" && ls docker/compose.*.yml | wc -l) overrides ok"
    sh -n "$ROOT/docker/migrate-entrypoint.sh" && bash -n "$ROOT/docker/postgres-entrypoint.sh" \
        || die "an entry point script does not parse"
    if command -v systemd-analyze >/dev/null; then
        # The units name /usr/local/bin/..., not installed here: verify copies whose
        # ExecStart is /bin/true.
        local tmp unit out; tmp=$(mktemp -d)
        for unit in pgdispatch-gateway pgdispatch-daemon; do
            sed "s|/usr/local/bin/$unit|/bin/true|" "$ROOT/docker/$unit.service" >"$tmp/$unit.service"
        done
        if ! out=$(cd "$tmp" && SYSTEMD_LOG_LEVEL=warning systemd-analyze verify ./*.service 2>&1) ||
           grep -v -e 'not found' -e 'No such file' <<<"$out" | grep -q .; then
            echo "$out"; rm -rf "$tmp"; die "systemd-analyze verify found problems in the unit files"
        fi
        rm -rf "$tmp"
    fi
}

# ---------------------------------------------------------------- the running project
container() { echo "${PROJECT}_$1_1"; }
project_containers() { podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'; }

dump_logs() {
    local c
    for c in $(project_containers); do
        echo "======== $c ($(podman inspect --format '{{.State.Status}} exit={{.State.ExitCode}}' "$c" 2>/dev/null))"
        podman logs --tail 80 "$c" 2>&1 | sed 's/^/    /'
    done
}

save_logs() {
    local c cs
    cs=$(project_containers)
    [ -n "$cs" ] || return 0
    rm -rf "$CACHE/logs"; mkdir -p "$CACHE/logs"
    for c in $cs; do podman logs "$c" >"$CACHE/logs/$c.log" 2>&1 || true; done
}

teardown() {
    save_logs
    (cd "$ROOT" && timeout 60 podman-compose -p "$PROJECT" -f "$COMPOSE_FILE" down -v -t 5) \
        >"$CACHE/teardown.log" 2>&1 </dev/null || true
    local n
    for n in $(podman network ls --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Name}}'); do
        podman network rm -f "$n" >/dev/null 2>&1 || true
    done
}

free_port() {
    python3 - <<'PY'
import socket
for port in range(18080, 18180):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(port)
        break
PY
}

# One HTTP check, bounded: python3 from the host against the published port.
#   http_check ready | models-has M | models-lacks M | chat STATUS | embeddings | stream | metrics
http_check() {
    python3 - "$PORT" "$@" <<'PY'
import json, sys, time, urllib.error, urllib.request
port, what, arg = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
base = "http://127.0.0.1:%s" % port

def call(path, body=None, timeout=20):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()

def fail(msg):
    print("    " + msg)
    sys.exit(1)

if what == "ready":
    status, text = call("/readyz")
    sys.exit(0 if status == 200 else 1)
if what in ("models-has", "models-lacks"):
    status, text = call("/v1/models")
    if status != 200:
        fail("/v1/models answered %d: %s" % (status, text[:300]))
    doc = json.loads(text)
    if doc.get("object") != "list" or not isinstance(doc.get("data"), list):
        fail("/v1/models is not an OpenAI list: %s" % text[:300])
    ids = [m.get("id") for m in doc["data"]]
    if all(m.get("object") == "model" for m in doc["data"]) and (arg in ids) == (what == "models-has"):
        print("    /v1/models: %s" % ids)
        sys.exit(0)
    sys.exit(1)
if what == "chat":
    status, text = call("/v1/chat/completions",
                        {"model": "demo", "messages": [{"role": "user", "content": "hello from test-compose"}]})
    if status != int(arg):
        fail("chat completion answered %d, wanted %s: %s" % (status, arg, text[:300]))
    doc = json.loads(text)
    if status == 200:
        msg = doc["choices"][0]["message"]
        if doc.get("object") != "chat.completion" or msg.get("role") != "assistant" or not isinstance(msg.get("content"), str):
            fail("not an OpenAI chat.completion: %s" % text[:300])
        print("    chat: %r" % msg["content"][:60])
    else:
        err = doc.get("error") or {}
        if not isinstance(err.get("message"), str):
            fail("not an OpenAI error body: %s" % text[:300])
        print("    chat: %d %s (%s)" % (status, err.get("code"), err.get("message")[:80]))
    sys.exit(0)
if what == "embeddings":
    status, text = call("/v1/embeddings", {"model": "demo", "input": ["hello", "world"]})
    if status != 200:
        fail("embeddings answered %d: %s" % (status, text[:300]))
    doc = json.loads(text)
    data = doc.get("data")
    if doc.get("object") != "list" or not isinstance(data, list) or len(data) != 2 or \
       any(d.get("object") != "embedding" or not d.get("embedding") or
           not all(isinstance(x, (int, float)) for x in d["embedding"]) for d in data):
        fail("not an OpenAI embeddings list: %s" % text[:300])
    print("    embeddings: 2 vectors of %d" % len(data[0]["embedding"]))
    sys.exit(0)
if what == "stream":
    # Checked once the gateway streams; until then it must refuse clearly (400).
    req = urllib.request.Request(base + "/v1/chat/completions", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "demo", "stream": True,
                                                  "messages": [{"role": "user", "content": "stream please"}]}).encode())
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            ctype, text = r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        body = e.read().decode()
        if e.code == 400 and "stream" in body:
            print("    streaming: not supported by the gateway yet (400); check skipped")
            sys.exit(0)
        fail("streamed chat completion answered %d: %s" % (e.code, body[:300]))
    events = [l[len("data: "):] for l in text.splitlines() if l.startswith("data: ")]
    if not ctype.startswith("text/event-stream") or not events or events[-1] != "[DONE]":
        fail("not an SSE stream ending with data: [DONE] (%s): %s" % (ctype, text[-300:]))
    chunks = [json.loads(e) for e in events[:-1]]
    if not chunks or any(c.get("object") != "chat.completion.chunk" for c in chunks):
        fail("stream events are not chat.completion.chunk objects: %s" % text[:300])
    print("    streaming: %d chunks, then data: [DONE]" % len(chunks))
    sys.exit(0)
if what == "metrics":
    status, text = call("/metrics")
    if status != 200 or "pgdispatch_" not in text or "# TYPE" not in text:
        fail("/metrics answered %d: %s" % (status, text[:300]))
    print("    metrics: %d lines" % len(text.splitlines()))
    sys.exit(0)
fail("unknown check " + what)
PY
}

# wait_for SECONDS DESCRIPTION COMMAND...: retries COMMAND until it succeeds, then
# counts one check passed (or skipped, when it says "check skipped").
wait_for() {
    local seconds=$1 what=$2 out; shift 2
    local until=$(($(date +%s) + seconds))
    [ "$until" -le $((START + TIMEOUT)) ] || until=$((START + TIMEOUT))
    until out=$("$@" 2>&1); do
        if [ "$(date +%s)" -ge "$until" ]; then
            [ -z "$out" ] || echo "$out"
            die "timed out waiting for $what"
        fi
        sleep 1
    done
    [ -z "$out" ] || echo "$out"
    if grep -q 'check skipped' <<<"$out"; then
        SKIPPED=$((SKIPPED + 1)); log "skipped: $what"
    else
        PASSED=$((PASSED + 1)); log "ok: $what"
    fi
}

run_test() {
    trap on_exit EXIT
    ensure_packages
    static_check
    PASSED=$((PASSED + 1))
    build_base
    mkdir -p "$CACHE"
    PORT=${COMPOSE_TEST_PORT:-$(free_port)}
    [ -n "$PORT" ] || die "no free port in 18080..18179"
    # The compose file's own defaults, whatever the caller's environment says.
    local v
    for v in $(compgen -e | grep -E '^(PGDISPATCH_|POSTGRES_|DEMO_)' || true); do unset "$v"; done
    export PGDISPATCH_PORT=$PORT PGDISPATCH_PUBLISH_ADDR=127.0.0.1
    [ ! -e "$ROOT/.env" ] || log "note: $ROOT/.env is read by podman-compose and may change what is tested"

    teardown   # whatever an interrupted earlier run left
    UP=1

    log "podman-compose up -d --build (project $PROJECT, gateway on 127.0.0.1:$PORT; log: $CACHE/up.log)"
    if ! timeout "$(deadline_left)" podman-compose -p "$PROJECT" -f "$COMPOSE_FILE" up -d --build \
            >"$CACHE/up.log" 2>&1 </dev/null; then
        grep -E -i -B2 -A8 'error|failed' "$CACHE/up.log" | tail -60
        die "podman-compose up failed (full log: $CACHE/up.log)"
    fi
    # podman-compose 1.0.3 reports a failed build only in its output.
    ! grep -q -E '^Error: (building|creating build container)|exit code: [1-9]' "$CACHE/up.log" \
        || { grep -E -B15 '^Error:|exit code: [1-9]' "$CACHE/up.log" | tail -60; die "a podman-compose step failed (log: $CACHE/up.log)"; }
    log "up: $(project_containers | tr '\n' ' ')"

    wait_for 120 "the gateway answers /readyz" http_check ready
    wait_for 60 "migrate exited 0" bash -c "[ \"\$(podman inspect --format '{{.State.Status}} {{.State.ExitCode}}' $(container migrate))\" = 'exited 0' ]"
    wait_for 60 "/v1/models lists $MODEL" http_check models-has "$MODEL"
    wait_for 30 "a chat completion answers 200" http_check chat 200
    wait_for 30 "an embeddings call answers 200" http_check embeddings
    wait_for 30 "a streamed chat completion ends with data: [DONE] (or is refused: not built yet)" http_check stream
    wait_for 30 "/metrics answers" http_check metrics
    wait_for 30 "an admin function answers through psql in the postgres container" \
        podman exec "$(container postgres)" psql -X -At -d pgdispatch \
            -c "SELECT 'nodes: ' || string_agg(name || '/' || admin_state || '/' || health, ', ') FROM dispatch.nodes()" \
            -c "SELECT 'health: ' || count(*) FROM dispatch.health()"
    local svc
    for svc in postgres gateway provider; do
        wait_for 30 "the $svc healthcheck passes" podman healthcheck run "$(container "$svc")"
    done

    log "stopping the daemon"
    podman stop -t 45 "$(container daemon)" >/dev/null
    wait_for 40 "$MODEL left /v1/models" http_check models-lacks "$MODEL"
    wait_for 20 "a new request gets 503" http_check chat 503
    log "starting the daemon again"
    podman start "$(container daemon)" >/dev/null
    wait_for 60 "$MODEL is back in /v1/models" http_check models-has "$MODEL"
    wait_for 30 "a chat completion answers 200 again" http_check chat 200

    [ "${KEEP_UP:-0}" = 1 ] && { log "PASS in $(($(date +%s) - START))s"; return 0; }
    log "podman-compose down -v"
    save_logs
    timeout 60 podman-compose -p "$PROJECT" -f "$COMPOSE_FILE" down -v >"$CACHE/down.log" 2>&1 \
        || die "podman-compose down failed (log: $CACHE/down.log)"
    UP=0
    teardown
    local left
    left=$(project_containers; podman volume ls --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Name}}';
           podman network ls --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Name}}')
    [ -z "$left" ] || die "left behind after down: $left"
    log "nothing of $PROJECT is left (container logs kept in $CACHE/logs/)"
    PASSED=$((PASSED + 1))
    log "PASS in $(($(date +%s) - START))s"
}

case "${1:-all}" in
    base) ensure_packages; build_base ;;
    static) ensure_packages; static_check ;;
    all) run_test ;;
    *) echo "usage: $0 [all|static|base]" >&2; exit 2 ;;
esac
