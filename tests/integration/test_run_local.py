"""`make run` works as the README says: it prints a curl line and a psql line that
work, Ctrl-C stops everything cleanly, and a second run starts from the same data."""
import os
import re
import signal
import subprocess
import shutil
import sys
import tempfile

import pytest

from conftest import ROOT, binary, free_port, wait_for


@pytest.fixture
def run_dir():
    # Not under pytest's tmp_path: as root the server runs as `postgres`, which
    # cannot enter pytest's private directory.
    d = tempfile.mkdtemp(prefix="pgdispatch-run-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start_run(tmp_path, ports, run_dir):
    env = dict(os.environ, PGDISPATCH_RUN_DIR=run_dir,
               PGDISPATCH_BIN_DIR=os.path.dirname(binary("pgdispatch-gateway")),
               PGDISPATCH_PORT=str(ports[0]), PGDISPATCH_PG_PORT=str(ports[1]),
               PGDISPATCH_PROVIDER_PORT=str(ports[2]))
    out = open(tmp_path / "run.out", "w+")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "run_local.py")], env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    printed = wait_for(lambda: "Stop: Ctrl-C" in open(tmp_path / "run.out").read() and open(tmp_path / "run.out").read(),
                       timeout=90, what="make run to print its instructions")
    return proc, printed


def stop_run(proc):
    os.killpg(proc.pid, signal.SIGINT)
    return proc.wait(60)


def test_make_run_prints_working_lines_and_restarts(tmp_path, run_dir):
    ports = [free_port(), free_port(), free_port()]
    proc, printed = start_run(tmp_path, ports, run_dir)
    try:
        curl = re.search(r"^\s*(curl .*?)\n\n", printed, re.S | re.M).group(1).replace("\\\n", " ")
        r = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert '"chat.completion"' in r.stdout and "echo: hello" in r.stdout, r.stdout
        psql = re.search(r"^\s*(psql .*)$", printed, re.M).group(1)
        r = subprocess.run(psql, shell=True, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "local" in r.stdout, r.stdout + r.stderr
    finally:
        assert stop_run(proc) == 0
    assert "stopped; data kept" in open(tmp_path / "run.out").read()

    # The second run finds the same data: the job the first run finished is there.
    proc, printed = start_run(tmp_path, ports, run_dir)
    try:
        psql = re.search(r"^\s*(psql \S+)", printed, re.M).group(1)
        r = subprocess.run(psql + " -Atc 'SELECT count(*) FROM dispatch.jobs WHERE state = $$succeeded$$'",
                           shell=True, capture_output=True, text=True, timeout=30)
        assert r.stdout.strip() == "1", r.stdout + r.stderr
    finally:
        assert stop_run(proc) == 0
