#!/usr/bin/python3
"""Static check of docker-compose.yml and the override files in docker/.

podman-compose 1.0.3 (what `make test-compose` runs the project with) ignores
`profiles`, `depends_on` conditions and has no `config` command, so what it does not
run is checked here instead (Debian's python3-yaml, no Docker needed):

- the YAML parses; top-level and service keys are compose-spec keys (typos fail);
- build contexts, Dockerfiles and `--target` stages exist;
- environment, ports, volumes, healthcheck, restart, deploy, profiles are well-formed;
- every ${VAR} uses the substitution forms both docker compose and podman-compose
  understand (no nested defaults) and is documented in a comment of its file (or of
  docker-compose.yml);
- every depends_on names a service, with a valid condition that the target can meet;
- merged with each override, no active service depends on one scaled to 0 or behind a
  profile;
- every PGDISPATCH_* / FAKE_PROVIDER_* variable handed to a program is one that program
  reads (its sources name it), and the migrate/postgres variables are read by their
  entry points.

Exit 0 and one line per file when all is well; otherwise every problem, then exit 1.
"""
import glob
import os
import re
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "docker-compose.yml")
OVERRIDES = sorted(glob.glob(os.path.join(ROOT, "docker", "compose.*.yml")))

TOP_KEYS = {"version", "name", "services", "volumes", "networks", "configs", "secrets"}
SERVICE_KEYS = {
    "build", "image", "command", "entrypoint", "environment", "env_file", "ports", "expose",
    "volumes", "depends_on", "healthcheck", "restart", "deploy", "profiles", "extra_hosts",
    "shm_size", "stop_signal", "stop_grace_period", "ipc", "networks", "user", "working_dir",
    "labels", "container_name", "logging", "ulimits", "cap_add", "cap_drop", "read_only",
    "tmpfs", "security_opt", "init", "devices", "hostname", "pid", "network_mode",
}
BUILD_KEYS = {"context", "dockerfile", "target", "args", "labels", "cache_from", "network", "shm_size"}
HEALTH_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PORT = re.compile(r"^((\[[0-9a-fA-F:]+\]|[0-9.]+|[A-Za-z0-9.-]+):)?(\d+(-\d+)?:)?\d+(-\d+)?(/(tcp|udp))?$")
# What docker compose and podman-compose 1.0.3 both substitute: $$, $VAR, ${VAR},
# ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err} with no "}" inside and a
# default that is not empty: podman-compose leaves "${VAR:-}" as it stands (to pass
# a variable through only when it is set, write "VAR:" with no value).
SUBST = re.compile(r"\$(?:(?P<escaped>\$)|(?P<named>[_a-zA-Z][_a-zA-Z0-9]*)|"
                   r"\{(?P<braced>[_a-zA-Z][_a-zA-Z0-9]*)(?::?-(?P<default>[^}$]+)|:?\?(?P<err>[^}$]+))?\})")

# Which sources read a program's variables, by build target.
PROGRAM_SOURCES = {
    "gateway": ["src/gateway", "src/common"],
    "daemon": ["daemon", "src/common"],
    "provider": ["tests/fake_provider", "src/common"],
    "migrate": ["docker/migrate-entrypoint.sh", "sql/migrate.sh"],
}
PROGRAM_PREFIXES = ("PGDISPATCH_", "FAKE_PROVIDER_")

problems = []


def problem(where, msg):
    problems.append("%s: %s" % (where, msg))


def rel(path):
    return os.path.relpath(path, ROOT)


def load(path):
    with open(path) as f:
        text = f.read()
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem(rel(path), "not YAML: %s" % e)
        return None, text
    if not isinstance(doc, dict):
        problem(rel(path), "no top-level mapping")
        return None, text
    return doc, text


def comments(text):
    return "\n".join(line.split("#", 1)[1] for line in text.splitlines() if "#" in line)


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def substitute(value, env=None):
    """Compose-style substitution with defaults (env: overrides), for shape checks."""
    env = env or {}

    def one(m):
        if m.group("escaped"):
            return "$"
        name = m.group("named") or m.group("braced")
        if name in env:
            return env[name]
        return m.group("default") or ""
    if isinstance(value, str):
        return SUBST.sub(one, value)
    if isinstance(value, dict):
        return {k: substitute(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, env) for v in value]
    return value


def check_variables(path, doc, text, documented):
    where = rel(path)
    for s in strings(doc):
        rest = SUBST.sub("", s)
        if "$" in rest:
            problem(where, "substitution that podman-compose/docker compose would misread "
                           "(nested or empty default, or a stray $?): %r" % s)
        for m in SUBST.finditer(s):
            name = m.group("named") or m.group("braced")
            if name and not re.search(r"\b%s\b" % re.escape(name), documented):
                problem(where, "${%s} is used but documented in no comment" % name)


def dockerfile_targets(path):
    targets = set()
    with open(path) as f:
        for line in f:
            m = re.match(r"\s*FROM\s+\S+(\s+AS\s+(\S+))?", line, re.I)
            if m and m.group(2):
                targets.add(m.group(2).lower())
    return targets


def check_service(where, name, svc, top_volumes, partial):
    if not isinstance(svc, dict):
        problem(where, "service %s is not a mapping" % name)
        return
    for k in svc:
        if k not in SERVICE_KEYS:
            problem(where, "service %s: unknown key %r" % (name, k))
    if not partial and "image" not in svc and "build" not in svc:
        problem(where, "service %s has neither image nor build" % name)
    build = svc.get("build")
    if build is not None:
        if isinstance(build, str):
            build = {"context": build}
        for k in build:
            if k not in BUILD_KEYS:
                problem(where, "service %s: unknown build key %r" % (name, k))
        context = os.path.join(ROOT, build.get("context", "."))
        dockerfile = os.path.join(context, build.get("dockerfile", "Dockerfile"))
        if not os.path.isdir(context):
            problem(where, "service %s: build context %s does not exist" % (name, rel(context)))
        elif not os.path.isfile(dockerfile):
            problem(where, "service %s: %s does not exist" % (name, rel(dockerfile)))
        elif build.get("target") and build["target"].lower() not in dockerfile_targets(dockerfile):
            problem(where, "service %s: %s has no stage %r" % (name, rel(dockerfile), build["target"]))
    env = svc.get("environment")
    if env is not None:
        if isinstance(env, list):
            for item in env:
                if not isinstance(item, str) or not ENV_NAME.match(item.split("=", 1)[0]):
                    problem(where, "service %s: bad environment entry %r" % (name, item))
        elif isinstance(env, dict):
            for k, v in env.items():
                if not isinstance(k, str) or not ENV_NAME.match(k):
                    problem(where, "service %s: bad environment name %r" % (name, k))
                if not (v is None or isinstance(v, (str, int, float)) and not isinstance(v, bool)):
                    problem(where, "service %s: environment %s must be a string or number, not %r "
                                   "(quote it)" % (name, k, v))
        else:
            problem(where, "service %s: environment must be a mapping or a list" % name)
    for p in svc.get("ports", []) or []:
        if not isinstance(p, str) or not PORT.match(substitute(p)):
            problem(where, "service %s: bad port %r (quote ports as strings)" % (name, p))
    for v in svc.get("volumes", []) or []:
        if not isinstance(v, str):
            continue
        parts = substitute(v).split(":")
        if len(parts) < 2 or len(parts) > 3 or not parts[1].startswith("/"):
            problem(where, "service %s: bad volume %r" % (name, v))
            continue
        if len(parts) == 3 and parts[2] not in ("ro", "rw", "z", "Z", "ro,z", "ro,Z"):
            problem(where, "service %s: bad volume mode in %r" % (name, v))
        src = parts[0]
        if not src.startswith(("/", ".", "~")) and src not in top_volumes:
            problem(where, "service %s: volume %r is not declared under top-level volumes" % (name, src))
    hc = svc.get("healthcheck")
    if hc is not None:
        for k in hc:
            if k not in HEALTH_KEYS:
                problem(where, "service %s: unknown healthcheck key %r" % (name, k))
        test = hc.get("test")
        if isinstance(test, list):
            if not test or test[0] not in ("CMD", "CMD-SHELL", "NONE") or (test[0] == "CMD-SHELL" and len(test) != 2):
                problem(where, "service %s: healthcheck test must start with CMD, CMD-SHELL or NONE" % name)
            elif test[0] == "CMD" and any(("'" in str(a) or '"' in str(a) or " " in str(a)) for a in test[1:]):
                problem(where, "service %s: podman-compose 1.0.3 mangles CMD arguments holding quotes or "
                               "spaces: use [\"CMD-SHELL\", \"...\"]" % name)
        elif not isinstance(test, str) and not hc.get("disable"):
            problem(where, "service %s: healthcheck without a test" % name)
        for k in ("interval", "timeout", "start_period", "start_interval"):
            if k in hc and not DURATION.match(str(hc[k])):
                problem(where, "service %s: healthcheck %s %r is not a duration" % (name, k, hc[k]))
        if "retries" in hc and not isinstance(hc["retries"], int):
            problem(where, "service %s: healthcheck retries must be an integer" % name)
    for k in ("stop_grace_period",):
        if k in svc and not DURATION.match(str(svc[k])):
            problem(where, "service %s: %s %r is not a duration" % (name, k, svc[k]))
    if "stop_signal" in svc and not re.match(r"^SIG[A-Z0-9]+$", str(svc["stop_signal"])):
        problem(where, "service %s: bad stop_signal %r" % (name, svc["stop_signal"]))
    if "restart" in svc and not re.match(r"^(no|always|unless-stopped|on-failure(:\d+)?)$", str(svc["restart"])):
        problem(where, "service %s: bad restart %r (quote \"no\")" % (name, svc["restart"]))
    deploy = svc.get("deploy")
    if deploy is not None:
        if not isinstance(deploy, dict):
            problem(where, "service %s: deploy must be a mapping" % name)
        elif "replicas" in deploy and not (isinstance(deploy["replicas"], int) and deploy["replicas"] >= 0):
            problem(where, "service %s: deploy.replicas must be an integer >= 0" % name)
    profiles = svc.get("profiles")
    if profiles is not None and not (isinstance(profiles, list) and all(isinstance(p, str) for p in profiles)):
        problem(where, "service %s: profiles must be a list of names" % name)
    for h in svc.get("extra_hosts", []) or []:
        if not isinstance(h, str) or not re.match(r"^[A-Za-z0-9.-]+[:=]\S+$", h):
            problem(where, "service %s: bad extra_hosts entry %r" % (name, h))
    deps = svc.get("depends_on")
    if deps is not None and not isinstance(deps, (list, dict)):
        problem(where, "service %s: depends_on must be a list or a mapping" % name)
    if isinstance(deps, dict):
        for dep, spec in deps.items():
            cond = (spec or {}).get("condition", "service_started")
            if cond not in CONDITIONS:
                problem(where, "service %s: depends_on %s has unknown condition %r" % (name, dep, cond))


def merge(base, over):
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if k in base else v
        return out
    return over


def deps_of(svc):
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {d: (spec or {}).get("condition", "service_started") for d, spec in deps.items()}


def active(svc):
    return not svc.get("profiles") and (svc.get("deploy") or {}).get("replicas", 1) != 0


def check_project(where, doc):
    services = doc.get("services") or {}
    for name, svc in services.items():
        for dep, cond in deps_of(svc).items():
            if dep not in services:
                problem(where, "service %s depends on %s, which does not exist" % (name, dep))
                continue
            target = services[dep]
            if active(svc) and not active(target):
                problem(where, "service %s depends on %s, which is scaled to 0 or behind a profile" % (name, dep))
            if cond == "service_healthy" and not target.get("healthcheck"):
                problem(where, "service %s waits for %s to be healthy, but it has no healthcheck" % (name, dep))
            if cond == "service_completed_successfully" and str(target.get("restart", "no")) != "no":
                problem(where, "service %s waits for %s to complete, but %s restarts" % (name, dep, dep))
    for name, svc in services.items():
        if not active(svc):
            continue
        build = svc.get("build") or {}
        target = build.get("target") if isinstance(build, dict) else None
        if target not in PROGRAM_SOURCES:
            continue
        env = svc.get("environment") or {}
        keys = env.keys() if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        for key in keys:
            if key.startswith(PROGRAM_PREFIXES) and not reads(target, key):
                problem(where, "service %s sets %s, which %s does not read" % (name, key, target))


_source_cache = {}


def reads(target, var):
    if target not in _source_cache:
        text = []
        for p in PROGRAM_SOURCES[target]:
            full = os.path.join(ROOT, p)
            files = [full] if os.path.isfile(full) else glob.glob(os.path.join(full, "*.[ch]"))
            for f in files:
                with open(f, errors="replace") as fh:
                    text.append(fh.read())
        _source_cache[target] = "\n".join(text)
    return re.search(r"\b%s\b" % re.escape(var), _source_cache[target]) is not None


def check_entrypoint_vars(where, doc):
    """Variables given to postgres are the ones its entry point reads."""
    for name, svc in (doc.get("services") or {}).items():
        build = svc.get("build") or {}
        if isinstance(build, dict) and build.get("dockerfile") == "docker/postgres.Dockerfile":
            with open(os.path.join(ROOT, "docker/postgres-entrypoint.sh")) as f:
                script = f.read()
            for key in (svc.get("environment") or {}):
                if key.startswith("POSTGRES_") and key not in script:
                    problem(where, "service %s sets %s, which postgres-entrypoint.sh does not read" % (name, key))


def main():
    base, base_text = load(BASE)
    if base is None:
        return report()
    base_comments = comments(base_text)
    docs = [(BASE, base, base_text)]
    for path in OVERRIDES:
        doc, text = load(path)
        if doc is not None:
            docs.append((path, doc, text))
    for path, doc, text in docs:
        where = rel(path)
        for k in doc:
            if k not in TOP_KEYS and not k.startswith("x-"):
                problem(where, "unknown top-level key %r" % k)
        if not isinstance(doc.get("services"), dict):
            problem(where, "no services")
            continue
        documented = comments(text) + ("\n" + base_comments if path != BASE else "")
        check_variables(path, doc, text, documented)
        top_volumes = set((base.get("volumes") or {}).keys()) | set((doc.get("volumes") or {}).keys())
        for name, svc in doc["services"].items():
            partial = path != BASE and name in (base.get("services") or {})
            check_service(where, name, svc, top_volumes, partial)
    check_project(rel(BASE), base)
    check_entrypoint_vars(rel(BASE), base)
    for path, doc, _ in docs[1:]:
        check_project("%s + %s" % (rel(BASE), rel(path)), merge(base, doc))
    base_services = base.get("services") or {}
    for want in ("postgres", "migrate", "gateway", "daemon", "provider"):
        if want not in base_services:
            problem(rel(BASE), "service %s is missing" % want)
    return report(docs)


def report(docs=()):
    if problems:
        for p in problems:
            print("check_compose: " + p)
        print("check_compose: %d problem(s)" % len(problems))
        return 1
    for path, doc, _ in docs:
        print("check_compose: %s ok (%d services)" % (rel(path), len(doc.get("services") or {})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
