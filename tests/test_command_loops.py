"""Command loops (CONCEPTS §8): package scripts running vigil commands.

Pure: the cycle finder and who breaks a cycle. Real: a 2-node cluster whose two
packages' start scripts each run ``vigil package disable OTHER --wait`` (the loop of
Serviceguard's manual, seed 001), both starting at once: one command fails within a
second naming the cycle, instead of both hanging until their script timeouts.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vigil.keys import Keys
from vigil.store import open_store
from vigil.testing.cluster import LocalCluster, _bin
from vigil.waits import breaks_cycle, find_cycle, format_cycle, loop_message

# --------------------------------------------------------------------------- pure


def test_find_cycle_two_packages() -> None:
    assert find_cycle({"pkg1": "pkg2", "pkg2": "pkg1"}, "pkg1") == ["pkg1", "pkg2", "pkg1"]
    assert find_cycle({"pkg1": "pkg2", "pkg2": "pkg1"}, "pkg2") == ["pkg2", "pkg1", "pkg2"]


def test_find_cycle_longer_and_none() -> None:
    edges = {"a": "b", "b": "c", "c": "a", "x": "a"}
    assert find_cycle(edges, "a") == ["a", "b", "c", "a"]
    assert find_cycle(edges, "x") is None  # x waits into a cycle it is not part of
    assert find_cycle({"a": "b", "b": "c"}, "a") is None
    assert find_cycle({}, "a") is None
    assert find_cycle({"a": "a"}, "a") == ["a", "a"]


def test_find_cycle_ignores_other_cycles() -> None:
    # a waits for b, which is stuck in a cycle with c: not a loop through a (no hang)
    assert find_cycle({"a": "b", "b": "c", "c": "b"}, "a") is None


def test_newest_edge_breaks_the_cycle() -> None:
    cycle = ["pkg1", "pkg2", "pkg1"]
    revisions = {"pkg1": 10, "pkg2": 12}
    assert breaks_cycle(cycle, revisions, "pkg2")
    assert not breaks_cycle(cycle, revisions, "pkg1")


def test_loop_message_names_the_cycle() -> None:
    assert format_cycle(["pkg1", "pkg2", "pkg1"]) == "pkg1 → pkg2 → pkg1"
    assert loop_message(["pkg1", "pkg2", "pkg1"]) == (
        "command loop: pkg1 → pkg2 → pkg1 (pkg1's script waits for pkg2 whose script "
        "waits for pkg1); not waiting"
    )


# --------------------------------------------------------------------------- cluster

# Seconds: the command closing a loop fails within this, not counting the CLI's own
# start-up (measured beside it: a no-op vigil run, ~0.4-0.9 s on a busy 2-core box).
LOOP_LIMIT = 1.0


@pytest.fixture
def two(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path, ["n1", "n2"], node_timeout="2s")
    try:
        c.start_agents()
        c.wait_nodes_up()
        yield c
    finally:
        c.close()
        for n in c.nodes:
            assert "Traceback" not in c.agent_log(n), c.agent_log(n)


def loop_package(c: LocalCluster, name: str, other: str, node: str) -> None:
    """A package whose start script disables ``other`` and waits for it, recording
    its command's exit status and duration."""
    c.write_script(
        f"{name}.sh",
        f"""\
        case "$1" in
        start)
            tb=$(date +%s%N)
            {_bin("vigil")} package disable --help > /dev/null
            t0=$(date +%s%N)
            {_bin("vigil")} package disable {other} --wait --timeout 30
            rc=$?
            t1=$(date +%s%N)
            ms=$(( (t1 - t0) / 1000000 ))
            base=$(( (t0 - tb) / 1000000 ))
            echo "$VIGIL_PACKAGE rc=$rc ms=$ms base=$base" >> {c.root}/record
            exit $rc ;;
        *) exit 0 ;;
        esac
        """,
    )
    c.write_package(
        f"""\
        name = "{name}"
        nodes = ["{node}"]
        run_script_timeout = "40s"
        [[external_script]]
        path = "{c.config}/scripts/{name}.sh"
        [[service]]
        name = "s"
        command = ["sleep", "1000"]
        """
    )


def record(c: LocalCluster) -> dict[str, tuple[int, int, int]]:
    """package -> (exit status, milliseconds, milliseconds of a no-op vigil run just
    before: the CLI's start-up on this machine now) of its script's vigil command."""
    path = c.root / "record"
    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        m = re.fullmatch(r"(\S+) rc=(\d+) ms=(\d+) base=(\d+)", line)
        assert m, line
        out[m[1]] = (int(m[2]), int(m[3]), int(m[4]))
    return out


def wait_edges(c: LocalCluster) -> list[str]:
    async def go() -> list[str]:
        store = open_store(c.store_url)
        try:
            kvs, _ = await store.range(Keys(c.name).waits)
            return [kv.key for kv in kvs]
        finally:
            await store.close()

    return asyncio.run(go())


@pytest.mark.slow
def test_seed_001_loop_fails_at_once_naming_the_cycle(two: LocalCluster) -> None:
    c = two
    loop_package(c, "pkg1", "pkg2", "n1")
    loop_package(c, "pkg2", "pkg1", "n2")
    t0 = time.monotonic()
    c.apply()  # both start at once, each on its node
    c.wait(lambda v: len(record(c)) == 2, 20, "both scripts' commands ended")
    took = time.monotonic() - t0
    rec = record(c)
    failed = [p for p, (rc, _, _) in rec.items() if rc != 0]
    assert len(failed) == 1, rec  # exactly one breaks the loop; the other one goes on
    loser = failed[0]
    winner = "pkg2" if loser == "pkg1" else "pkg1"
    rc, ms, base = rec[loser]
    assert rc == 7  # CommandLoop
    print(f"\ncommand loop: {loser}'s command failed after {ms} ms (a no-op vigil: "
          f"{base} ms); {took:.1f}s from apply")  # fmt: skip
    assert ms - base < LOOP_LIMIT * 1000
    log = (c.config.parent / "state" / "n1" / "log" / "pkg1.log").read_text() + (
        c.config.parent / "state" / "n2" / "log" / "pkg2.log"
    ).read_text()
    cycle = f"{loser} → {winner} → {loser}"
    assert f"vigil: error: command loop: {cycle}" in log
    # the loser's start failed (exit 7 = 1: global switching off), the winner runs
    v = c.wait(lambda v: v["packages"][winner]["state"] == "running", 20, f"{winner} running")
    assert v["packages"][loser]["state"] in ("failed", "halted")
    assert rec[winner][0] == 0
    assert wait_edges(c) == []
    # the cluster stays usable
    c.vigil("package", "halt", winner, "--wait", "--timeout", "20")
    c.vigil("package", "clear", loser)
    c.write_package('name = "web"\nnodes = ["n2", "n1"]\n[[service]]\nname = "s"\n'
                    'command = ["sleep", "1000"]\n')  # fmt: skip
    c.apply()
    c.wait(lambda v: v["packages"]["web"]["state"] == "running", 20, "web running")


@pytest.mark.slow
def test_loop_is_found_within_a_second_of_closing_it(two: LocalCluster) -> None:
    """The loop closed by a command whose CLI is already running: measure from the
    moment the second edge could be written (the first command waits) to the failure."""
    c = two
    c.write_script(
        "slow.sh",
        f"""\
        case "$1" in
        start)
            while [ ! -e {c.root}/go ]; do sleep 0.05; done
            exit 0 ;;
        *) exit 0 ;;
        esac
        """,
    )
    c.write_package(
        f'name = "a"\nnodes = ["n1"]\n[[external_script]]\npath = "{c.config}/scripts/slow.sh"\n'
    )
    c.write_package(
        f'name = "b"\nnodes = ["n2"]\n[[external_script]]\npath = "{c.config}/scripts/slow.sh"\n'
    )
    c.apply()
    c.wait(lambda v: {v["packages"][p]["state"] for p in "ab"} == {"starting"}, 20, "starting")
    # a's script (pretend: VIGIL_PACKAGE=a on n1) waits for b ...
    first = subprocess.Popen(
        [_bin("vigil"), "package", "disable", "b", "--wait", "--timeout", "30"],
        env=c.env(VIGIL_PACKAGE="a", VIGIL_NODE="n1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    c.wait(lambda v: len(wait_edges(c)) == 1, 20, "a's wait edge")
    # ... and b's script waits for a: the loop closes
    t0 = time.monotonic()
    c.vigil("package", "disable", "--help")
    base = time.monotonic() - t0
    t0 = time.monotonic()
    second = c.vigil("package", "disable", "a", "--wait", "--timeout", "30", check=False,
                     VIGIL_PACKAGE="b", VIGIL_NODE="n2")  # fmt: skip
    elapsed = time.monotonic() - t0
    print(f"\nthe command closing the loop failed after {elapsed:.2f}s (no-op: {base:.2f}s)")
    assert second.returncode == 7, second.stderr
    assert second.stderr.strip() == (
        "vigil: error: command loop: b → a → b (b's script waits for a whose script "
        "waits for b); not waiting"
    )
    assert elapsed - base < LOOP_LIMIT
    assert first.poll() is None  # the other one still waits (for b to be stable)
    (c.root / "go").touch()
    out, err = first.communicate(timeout=20)
    assert first.returncode == 0, err
    assert b"package b: disable done (running)" in out
    assert wait_edges(c) == []


@pytest.mark.slow
def test_own_package_commands_are_refused(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path, ["n1"])
    try:
        for args in (
            ["start", "web"],
            ["halt", "web"],
            ["move", "web", "-n", "n1"],
            ["enable", "web"],
            ["disable", "web", "--wait"],
            ["maintenance", "web"],
            ["clear", "web"],
        ):
            out = c.vigil("package", *args, check=False, VIGIL_PACKAGE="web")
            assert out.returncode == 2, (args, out.stderr)
            assert "a script of this package cannot run vigil commands against its own" in (
                out.stderr
            )
        # halting the node where its own package runs would halt that package too
        c.write_package('name = "web"\n[[service]]\nname = "s"\ncommand = ["sleep", "1000"]\n')
        c.start_agents()
        c.wait_nodes_up()
        c.apply()
        c.wait(lambda v: v["packages"]["web"]["state"] == "running", 20, "web running")
        out = c.vigil("node", "halt", "n1", "--failover", check=False, VIGIL_PACKAGE="web")
        assert out.returncode == 2, out.stderr
        assert "would halt its own package (command loop)" in out.stderr
        assert c.view()["nodes"]["n1"]["state"] == "up"
        c.vigil("node", "halt", "n1", "--detach", VIGIL_PACKAGE="web")  # left running: fine
    finally:
        c.close()


@pytest.mark.slow
def test_wait_edges_go_away_on_sigterm_and_after_sigkill(two: LocalCluster) -> None:
    c = two
    c.write_script(
        "slow.sh",
        f'[ "$1" = start ] || exit 0\nwhile [ ! -e {c.root}/go ]; do sleep 0.05; done\n',
    )
    c.write_package(
        f'name = "b"\nnodes = ["n2"]\n[[external_script]]\npath = "{c.config}/scripts/slow.sh"\n'
    )
    c.apply()
    c.wait(lambda v: v["packages"]["b"]["state"] == "starting", 20, "b starting")

    def waiter() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [_bin("vigil"), "package", "halt", "b", "--wait", "--timeout", "30"],
            env=c.env(VIGIL_PACKAGE="a", VIGIL_NODE="n1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    # SIGTERM (a script timeout's first step): the command removes its edge itself
    first = waiter()
    c.wait(lambda v: len(wait_edges(c)) == 1, 20, "a's wait edge")
    first.terminate()
    _, err = first.communicate(timeout=20)
    assert first.returncode == 1
    assert err.decode().strip() == "vigil: error: package b: wait interrupted by SIGTERM"
    assert wait_edges(c) == []
    # SIGKILL: the agent of n1 (where the command ran) removes the edge it left
    second = waiter()
    c.wait(lambda v: len(wait_edges(c)) == 1, 20, "a's wait edge again")
    second.kill()
    second.communicate(timeout=20)
    c.wait(lambda v: wait_edges(c) == [], 10, "the dead command's edge removed by n1's agent")
    assert "wait edge a -> b removed: its command (pid" in c.agent_log("n1")
    (c.root / "go").touch()
