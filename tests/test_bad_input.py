"""Bad input of each kind: one clear line, a non-zero exit, nothing changed or lost.

Real ``vigil`` and ``vigild`` processes on a real SQLite store (LocalCluster). Each
test is one kind (docs/operations.md, "What vigil accepts" and "Unreadable store
records"); tests/test_fuzz_input.py throws generated input at the same rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vigil.cli.main import run_guarded
from vigil.store import SQLiteStore
from vigil.testing.cluster import LocalCluster

SERVICE = '[[service]]\nname = "main"\ncommand = ["sleep", "1000"]\nhalt_timeout = "2s"\n'


def one_line(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The single stderr line of a rejected command (exit ``code``), without traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def dump(c: LocalCluster) -> dict[str, bytes]:
    if not c.db.exists():
        return {}
    with contextlib.closing(sqlite3.connect(c.db)) as conn:
        return {k: bytes(v) for k, v in conn.execute("SELECT key, value FROM kv")}


def settled_dump(c: LocalCluster, quiet: float = 0.5, timeout: float = 10.0) -> dict[str, bytes]:
    """``dump`` once nothing has changed for ``quiet`` seconds: after a start the
    controller still rewrites the assignment ("boot on N" becomes "running on N")."""
    deadline = time.monotonic() + timeout
    last, since = dump(c), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "the store kept changing"
        time.sleep(0.05)
        now = dump(c)
        if now != last:
            last, since = now, time.monotonic()
    return last


def put(c: LocalCluster, key: str, value: bytes) -> None:
    """Write through vigil's own store API (a revision and a watch event)."""

    async def go() -> None:
        store = SQLiteStore(str(c.db))
        try:
            await store.put(key, value)
        finally:
            await store.close()

    asyncio.run(go())


def rejected_by_check_and_apply(c: LocalCluster, *expect: str) -> str:
    before = dump(c)
    line = one_line(c.vigil("check", str(c.config), check=False))
    for text in expect:
        assert text in line, line
    applied = one_line(c.vigil("--node", "node1", "apply", str(c.config), check=False))
    assert applied.endswith("; nothing applied"), applied
    assert dump(c) == before
    return line


# --------------------------------------------------------------------------- configuration


def test_wrong_type_is_refused_not_converted(cluster: LocalCluster) -> None:
    cluster.write_package(f'name = "web"\nrestart_limit = "3"\n{SERVICE}')
    rejected_by_check_and_apply(
        cluster, "web.toml: restart_limit: expected an integer, got '3' (a string)"
    )
    cluster.write_package(f'name = "web"\nauto_run = "no"\n{SERVICE}')
    rejected_by_check_and_apply(cluster, "auto_run: expected true or false, got 'no' (a string)")


@pytest.mark.parametrize(
    ("line", "expect"),
    [
        ("interval = inf", 'monitor[0].interval: expected a duration like "500ms"'),
        ("interval = nan", "got nan (a number)"),
        ('interval = "0s"', "monitor[0].interval: expected a duration from 100ms to 720h"),
        ('interval = "\\u0663s"', "got '٣s' (a string)"),
        ('interval = "99999999999999999999h"', "expected a duration from 100ms to 720h"),
    ],
)
def test_durations_are_finite_and_in_range(cluster: LocalCluster, line: str, expect: str) -> None:
    cluster.write_package(
        f'name = "web"\n{SERVICE}[[monitor]]\nname = "m"\ncommand = ["true"]\n{line}\n'
    )
    rejected_by_check_and_apply(cluster, expect)


def test_timeout_option_must_be_finite(cluster: LocalCluster) -> None:
    cluster.write_package(f'name = "web"\n{SERVICE}')
    cluster.apply()
    for value in ("nan", "inf", "1e308", "-1"):
        line = one_line(cluster.vigil("package", "start", "web", "--wait", "--timeout", value,
                                      check=False))  # fmt: skip
        assert f"got '{value}'" in line, line
        line = one_line(cluster.vigil("--node", "node1", "lock", "acquire", "x", "--timeout",
                                      value, check=False))  # fmt: skip
        assert "--timeout" in line, line


def test_names_are_matched_whole_and_quoted_escaped(cluster: LocalCluster) -> None:
    cluster.write_package(f'name = "web\\n"\n{SERVICE}', "web.toml")
    line = rejected_by_check_and_apply(cluster, "name: expected a name matching")
    assert "'web\\n'" in line  # escaped: the message stays one line
    (cluster.config / "packages" / "web.toml").unlink()
    line = one_line(cluster.vigil("package", "start", "web\nx", check=False))
    assert "'web\\nx'" in line
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "vigild"), "--node", "n1\n", "-c", str(cluster.config)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert one_line(proc).startswith("vigild: error: ")


def test_special_files_never_block_and_never_count_as_empty(cluster: LocalCluster) -> None:
    cluster.write_package(f'name = "web"\n{SERVICE}')
    cluster.apply()
    pkgs = cluster.config / "packages"
    os.mkfifo(pkgs / "x.toml")
    t0 = time.monotonic()
    rejected_by_check_and_apply(cluster, "x.toml: not a regular file (a FIFO)")
    assert time.monotonic() - t0 < 20
    (pkgs / "x.toml").unlink()
    (pkgs / "x.toml").symlink_to("/dev/zero")
    rejected_by_check_and_apply(cluster, "x.toml: not a regular file (a character device)")
    (pkgs / "x.toml").unlink()
    (pkgs / "x.toml").symlink_to(cluster.root / "gone.toml")
    rejected_by_check_and_apply(cluster, "x.toml: dangling symbolic link")
    (pkgs / "x.toml").unlink()
    # packages/ broken: a dangling link, a file, missing; nothing is removed
    pkgs.rename(cluster.root / "saved")
    for broken in ("link", "file", "missing"):
        if broken == "link":
            pkgs.symlink_to(cluster.root / "nonexistent-release")
        elif broken == "file":
            pkgs.write_text("")
        rejected_by_check_and_apply(cluster, "packages: ", "expected a directory")
        if broken != "missing":
            pkgs.unlink()
    assert set(cluster.status_json()["packages"]) == {"web"}
    (cluster.root / "saved").rename(pkgs)
    cluster_toml = cluster.config / "cluster.toml"
    cluster_toml.rename(cluster.root / "cluster.saved")
    os.mkfifo(cluster_toml)
    line = one_line(cluster.vigil("status", check=False))
    assert "cluster.toml: not a regular file (a FIFO)" in line


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        (b'name = "web"\n# caf\xe9\n', "not valid UTF-8 (byte 0xe9 at offset 18)"),
        (b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested more than 16 levels deep"),
        (b'name = "web"\n[env]\nA = "x\\u0000y"\n', "env.A: NUL (\\u0000) is not allowed"),
        (
            b'name = "web"\n[[service]]\nname = "s"\ncommand = ["sleep", "1\\u0000"]\n',
            "service[0].command[1]: NUL",
        ),
    ],
)
def test_unreadable_files_and_nul(cluster: LocalCluster, data: bytes, expect: str) -> None:
    (cluster.config / "packages" / "web.toml").write_bytes(data)
    rejected_by_check_and_apply(cluster, expect)


@pytest.mark.parametrize(
    "url", ["etcd://host:99999", "etcd://", "etcd://a,,b", "sqlite:///", "memory://", "mysql://x"]
)
def test_unusable_store_url_is_a_configuration_error(cluster: LocalCluster, url: str) -> None:
    toml = cluster.config / "cluster.toml"
    toml.write_text(toml.read_text().replace(f'store = "{cluster.store_url}"', f'store = "{url}"'))
    rejected_by_check_and_apply(cluster, "cluster.toml: store: expected sqlite:///ABSOLUTE/PATH")


def test_one_bad_file_is_not_blamed_on_another(cluster: LocalCluster) -> None:
    cluster.write_package('name = "db"\n[[service]]\nname = "m"\ncommand = "sleep 1"\n')
    cluster.write_package(f'name = "web"\n{SERVICE}[[dependency]]\npackage = "db"\n')
    line = rejected_by_check_and_apply(cluster, "db.toml: service[0].command: expected a list")
    assert "web.toml" not in line


def test_contradictory_dependencies_and_repeated_nodes(cluster: LocalCluster) -> None:
    cluster.write_package(
        f'name = "db"\n{SERVICE}[[dependency]]\npackage = "web"\ncondition = "down"\n'
    )
    cluster.write_package(
        f'name = "web"\n{SERVICE}'
        '[[dependency]]\npackage = "db"\ncondition = "up"\n'
        '[[dependency]]\npackage = "db"\ncondition = "down"\n'
    )
    rejected_by_check_and_apply(
        cluster, "web.toml: dependency[1]: contradicts dependency[0] on 'db' (up and down)"
    )
    cluster.write_package(f'name = "web"\nnodes = ["node1", "node1"]\n{SERVICE}')
    (cluster.config / "packages" / "db.toml").unlink()
    rejected_by_check_and_apply(cluster, "web.toml: nodes[1]: 'node1' is listed twice")


def test_script_errors_name_their_cause(cluster: LocalCluster) -> None:
    crlf = cluster.config / "scripts" / "crlf.sh"
    crlf.write_bytes(b"#!/bin/sh\r\nexit 0\r\n")
    crlf.chmod(0o755)
    cluster.write_script("explain.sh", 'echo "DOCROOT must be set" >&2; exit 1\n')
    cluster.write_script("killed.sh", "kill -9 $$\n")
    for name in ("crlf", "explain", "killed"):
        cluster.write_package(f'name = "{name}"\n[[external_script]]\npath = "scripts/{name}.sh"\n')
    proc = cluster.vigil("check", str(cluster.config), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 3, proc.stderr  # one per file
    assert "crlf.sh: its interpreter line ends in \\r (CRLF line endings" in lines[0]
    assert "explain.sh validate exited with status 1: DOCROOT must be set" in lines[1]
    assert "killed.sh validate was killed by SIGKILL" in lines[2]


def test_simulate_from_a_file_that_is_not_a_snapshot(cluster: LocalCluster) -> None:
    deep = cluster.root / "deep.toml"
    deep.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    for path, expect in (
        ("/bin/true", "not valid UTF-8"),
        (str(deep), "not valid TOML: nested more than"),
    ):
        line = one_line(cluster.vigil("simulate", "--from", path, check=False))
        assert f"{path}: {expect}" in line
    line = one_line(cluster.vigil("simulate", "--save", "/proc/x/y", check=False))
    assert "--save /proc/x/y: cannot write" in line


# --------------------------------------------------------------------------- command line


def test_contradictory_and_meaningless_options(cluster: LocalCluster) -> None:
    cluster.write_package(f'name = "web"\n{SERVICE}')
    cluster.apply()
    cluster.start_agents()
    cluster.wait_state("web", "running")
    before = settled_dump(cluster)
    line = one_line(cluster.vigil("node", "halt", "node1", "--failover", "--detach", check=False))
    assert "--failover and --detach exclude each other" in line
    line = one_line(
        cluster.vigil("--node", "node1", "lock", "acquire", "m", "--pid", "1", check=False)
    )
    assert "--pid 1: PID 1 (init) never ends" in line
    gone = subprocess.Popen(["true"])
    gone.wait()
    line = one_line(
        cluster.vigil("--node", "node1", "lock", "acquire", "m", "--pid", str(gone.pid),
                      check=False)
    )  # fmt: skip
    assert f"--pid {gone.pid}: no such process here" in line
    assert dump(cluster) == before
    assert cluster.package("web")["state"] == "running"


def test_error_boundary_turns_a_bug_into_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def bug() -> int:
        raise KeyError("surprise\nsecond line")

    assert run_guarded("vigil", bug) == 70
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("vigil: error: internal error: KeyError: ")
    assert "this is a bug in vigil; please report it" in err


def test_vigild_bad_settings_one_line(cluster: LocalCluster) -> None:
    vigild = str(Path(sys.executable).parent / "vigild")
    cfg = str(cluster.config)
    for argv, expect in (
        ([vigild, "-n", "node1", "-c", cfg, "--log-level", "bogus"], "'--log-level'"),
        (
            [
                str(Path(sys.executable).parent / "vigil"),
                "-c",
                cfg,
                "agent",
                "-n",
                "node1",
                "--log-level",
                "bogus",
            ],
            "'--log-level'",
        ),  # fmt: skip
        (
            [vigild, "-n", "node1", "-c", cfg, "--state-dir", "/proc/vigil"],
            "state_dir /proc/vigil: cannot create or write",
        ),  # fmt: skip
    ):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        line = one_line(proc)
        assert line.startswith("vigild: error: ") and expect in line, line


# --------------------------------------------------------------------------- store records


def test_unreadable_records_are_named_skipped_and_repaired(cluster: LocalCluster) -> None:
    cluster.write_package(f'name = "a"\n{SERVICE}')
    cluster.write_package(f'name = "b"\n{SERVICE}')
    cluster.apply()
    cluster.start_agents()
    cluster.wait_state("a", "running")
    b = cluster.wait_state("b", "running")
    b_pid = b["services"]["main"]["pid"]
    cluster.vigil("package", "enable", "b")  # b has an admin record now
    agent = cluster.agents["node1"]
    # an owner key that does not name a node: a's holder lets a go, nothing else moves
    put(cluster, "/vigil/test/owner/a", b"\xff\xfe")
    cluster.wait(lambda v: v["packages"]["a"]["message"].startswith("its owner key cannot"))
    line = one_line(cluster.vigil("status", check=False), code=4)
    assert "store key /vigil/test/owner/a: expected a node name, got b'\\xff\\xfe'" in line
    view = cluster.vigil("status", "--json", check=False)
    assert '"problems"' in view.stdout
    # a TEXT value edited into the SQLite file: named, skipped; a status still works
    with contextlib.closing(sqlite3.connect(cluster.db)) as conn, conn:
        conn.execute("UPDATE kv SET value = 'garbage' WHERE key = '/vigil/test/admin/b'")
    put(cluster, "/vigil/test/poke", b"x")
    time.sleep(1.0)  # let the agent reconcile over both records (it must stay up)
    assert agent.poll() is None, cluster.agent_log("node1")
    assert cluster.package("b")["services"]["main"]["pid"] == b_pid
    proc = cluster.vigil("status", check=False)
    assert proc.returncode == 4 and "(and 1 more unreadable)" in proc.stderr
    assert "b" in proc.stdout and "running" in proc.stdout
    # an operator vouches for a: clear replaces the unreadable owner key
    cluster.vigil("package", "clear", "a")
    cluster.vigil("package", "enable", "b")  # rewrites b's admin record
    cluster.wait_state("a", "running")
    assert cluster.vigil("status", check=False).returncode == 0
    log = cluster.agent_log("node1")
    assert log.count("unreadable store record, skipped: store key /vigil/test/owner/a") == 1


def test_corrupt_status_of_a_held_package_is_rewritten(cluster: LocalCluster) -> None:
    cluster.write_package(f'name = "a"\n{SERVICE}')
    cluster.apply()
    cluster.start_agents()
    cluster.wait_state("a", "running")
    put(cluster, "/vigil/test/status/a", b"garbage")
    cluster.wait(lambda v: not v["problems"] and v["packages"]["a"]["state"] == "running")
    assert cluster.vigil("status", check=False).returncode == 0


def test_unreadable_configuration_stops_no_package_and_apply_repairs_it(
    cluster: LocalCluster,
) -> None:
    cluster.write_package(f'name = "a"\n{SERVICE}')
    cluster.apply()
    cluster.start_agents()
    pid = cluster.wait_state("a", "running")["services"]["main"]["pid"]
    put(cluster, "/vigil/test/config/bundle/00000", b'[{"name": "a", "priority": "high"}]')
    cluster.wait(lambda v: len(v["problems"]) == 1)
    time.sleep(1.0)  # the agent sees a configuration without "a": it must not halt it
    assert cluster.package("a")["state"] == "running"
    assert cluster.package("a")["services"]["main"]["pid"] == pid
    assert "acting on nothing until `vigil apply`" in cluster.agent_log("node1")
    cluster.apply()
    assert cluster.vigil("status", check=False).returncode == 0
    assert cluster.package("a")["services"]["main"]["pid"] == pid


def test_unreadable_controller_key_is_replaced(cluster: LocalCluster) -> None:
    cluster.write_package(f'name = "a"\n{SERVICE}')
    cluster.apply()
    cluster.start_agents()
    cluster.wait_state("a", "running")
    put(cluster, "/vigil/test/controller", b"\x00\xff")  # no lease: it would stay for good
    cluster.wait(lambda v: v["nodes"]["node1"]["controller"] and not v["problems"])
    assert "unreadable store record, skipped: store key /vigil/test/controller" in (
        cluster.agent_log("node1")
    )
