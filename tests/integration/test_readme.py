"""The README's psql examples run as written against a migrated database, so the
operator documentation cannot drift from the SQL API."""
import re
import subprocess

README = __import__("os").path.join(__import__("conftest").ROOT, "README.md")


def sql_blocks():
    text = open(README).read()
    return re.findall(r"```sql\n(.*?)```", text, re.S)


def test_readme_has_admin_examples():
    blocks = sql_blocks()
    joined = "\n".join(blocks)
    for fn in ("enroll", "nodes", "drain", "disable", "enable", "revoke", "capacity", "queues",
               "set_capacity", "clear_capacity", "settings", "set_setting", "health", "requeue",
               "prune", "create_api_key", "revoke_api_key"):
        assert "dispatch.%s(" % fn in joined, "README shows no example of dispatch.%s" % fn


def test_readme_sql_examples_run(db):
    for block in sql_blocks():
        r = subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-q", db.dsn],
                           input=block, capture_output=True, text=True)
        assert r.returncode == 0, "README example failed:\n%s\n%s" % (block, r.stderr)


def test_readme_configuration_reference_matches_help():
    """Every flag of both programs, with its environment variable and default, is in
    the README's reference table exactly as --help prints it."""
    import re
    import conftest
    text = open(README).read()
    for prog in ("pgdispatch-gateway", "pgdispatch-daemon"):
        out = subprocess.run([conftest.binary(prog), "--help"], capture_output=True, text=True).stdout
        flags = re.findall(r"^  --(\S+)(?: \S+)?\n      .*?\n      env (\S+), default (unset|'[^']*')", out, re.M)
        assert flags, "no flags parsed from %s --help" % prog
        for flag, env, default in flags:
            if flag == "help":
                continue
            default = default.strip("'")
            row = [line for line in text.splitlines() if line.startswith("| `--%s" % flag) and "`%s`" % env in line]
            assert row, "README has no reference row for %s --%s (%s)" % (prog, flag, env)
            shown = "unset" if default == "unset" else "`%s`" % default
            assert any(shown in r for r in row), "README shows another default for --%s: %s" % (flag, row)
