"""No service process outlives its agent: the sentinel, the state file, the registry."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vigil.supervise import procfs
from vigil.supervise.sentinel import (
    ProcessRegistry,
    RecordedGroup,
    cleanup_leftovers,
    parse_address,
    parse_line,
    read_state,
    write_state,
)
from vigil.supervise.spawner import Child, spawn
from vigil.testing import wait_until, wait_until_sync

ENV = dict(os.environ)

# A minimal agent: a registry with a sentinel, one service that forks a grandchild.
AGENT = """
import json, os, sys, time
from pathlib import Path
from vigil.supervise.sentinel import ProcessRegistry
from vigil.supervise.spawner import spawn

state, out, gc = sys.argv[1:4]
reg = ProcessRegistry.start(Path(state))
child = spawn(["sh", "-c", 'sleep 1000 & echo $! > "$GC"; wait'], env={**os.environ, "GC": gc})
reg.add(child)
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump({"leader": child.pid, "sentinel": reg.sentinel.pid}, f)
os.replace(tmp, out)
time.sleep(1000)
"""


def kill_quietly(pid: int, group: bool = False) -> None:
    try:
        if group:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def read_pid(path: Path) -> int:
    wait_until_sync(lambda: path.exists() and path.read_text().strip() != "", 10, what=str(path))
    return int(path.read_text())


@pytest.fixture
def children() -> Iterator[list[Child]]:
    spawned: list[Child] = []
    try:
        yield spawned
    finally:
        for child in spawned:
            assert child.kill_group_now()


def test_agent_killed_with_sigkill_takes_its_services_along(tmp_path: Path) -> None:
    out, gc_file, state = tmp_path / "pids.json", tmp_path / "gc", tmp_path / "processes.json"
    err = (tmp_path / "agent.err").open("wb")
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, str(state), str(out), str(gc_file)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=err,
    )
    pids: dict[str, int] = {}
    try:
        wait_until_sync(out.exists, 10, what=f"agent started: {tmp_path / 'agent.err'}")
        pids = json.loads(out.read_text())
        pids["grandchild"] = read_pid(gc_file)
        assert all(procfs.pid_alive(p) for p in pids.values()), pids
        recorded = read_state(state)
        assert recorded is not None
        assert [g.pgid for g in recorded.groups] == [pids["leader"]]

        agent.kill()
        agent.wait(5)

        wait_until_sync(
            lambda: not any(procfs.pid_alive(p) for p in pids.values()),
            5,
            what=f"leader, grandchild and sentinel gone: {pids}",
        )
        assert not state.exists()  # the sentinel cleaned up after its agent
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.wait(5)
        err.close()
        if "leader" in pids:
            kill_quietly(pids["leader"], group=True)
        for pid in pids.values():
            kill_quietly(pid)


def test_cleanup_leftovers_kills_recorded_group(tmp_path: Path, children: list[Child]) -> None:
    state = tmp_path / "processes.json"
    gc_file = tmp_path / "gc"
    # A group whose leader is gone but whose grandchild lives on: found by /proc scan.
    child = spawn(["sh", "-c", 'sleep 1000 & echo $! > "$GC"'], env={**ENV, "GC": str(gc_file)})
    children.append(child)
    reg = ProcessRegistry(state)
    reg.add(child)
    assert asyncio.run(child.wait()) == 0
    grandchild = read_pid(gc_file)
    assert procfs.pid_alive(grandchild)

    # The agent "dies" here without removing anything; the next one cleans up.
    assert cleanup_leftovers(state) == [child.pgid]
    wait_until_sync(lambda: not procfs.pid_alive(grandchild), 5, what="grandchild killed")
    assert not state.exists()
    assert cleanup_leftovers(state) == []


def test_cleanup_leaves_reused_pgid_alone(tmp_path: Path, children: list[Child]) -> None:
    state = tmp_path / "processes.json"
    child = spawn(["sleep", "1000"], env=ENV)
    children.append(child)
    assert child.start_time is not None
    write_state(state, [RecordedGroup(child.pgid, child.start_time + 1, "other")])
    assert cleanup_leftovers(state) == []
    assert procfs.pid_alive(child.pid)


def test_corrupt_state_file_is_ignored(tmp_path: Path) -> None:
    state = tmp_path / "processes.json"
    state.write_text("{not json")
    assert cleanup_leftovers(state) == []


def test_registry_keeps_state_file_and_sentinel_in_step(tmp_path: Path) -> None:
    state = tmp_path / "processes.json"
    reg = ProcessRegistry.start(state)
    try:
        assert reg.sentinel is not None
        sentinel = reg.sentinel.pid

        async def scenario() -> None:
            a = spawn(["sleep", "1000"], env=ENV)
            b = spawn(["sleep", "1000"], env=ENV)
            reg.add(a)
            reg.add(b)

            def recorded_groups() -> set[tuple[int, int | None]] | None:
                recorded = read_state(state)
                if recorded is None or recorded.agent_pid != os.getpid():
                    return None
                return {(g.pgid, g.start) for g in recorded.groups}

            # the state file follows within STATE_WRITE_DELAY (writes are batched)
            both = {(a.pgid, a.start_time), (b.pgid, b.start_time)}
            await wait_until(lambda: recorded_groups() == both, 2)
            assert await a.terminate_group(5)
            reg.remove(a)
            await wait_until(lambda: recorded_groups() == {(b.pgid, b.start_time)}, 2)

            # The sentinel dies: the next change starts a new one and replays the groups.
            os.kill(sentinel, signal.SIGKILL)
            await wait_until(lambda: not procfs.pid_alive(sentinel), 5)
            c = spawn(["sleep", "1000"], env=ENV)
            reg.add(c)
            assert reg.sentinel is not None and reg.sentinel.pid != sentinel
            assert reg.pgids() == sorted([b.pgid, c.pgid])
            # Clean shutdown: everything still registered is killed, the file goes away.
            reg.close()
            await wait_until(lambda: not (b.group_alive() or c.group_alive()), 5)
            assert not state.exists()

        asyncio.run(scenario())
    finally:
        reg.close()


def test_parse_line() -> None:
    groups: dict[int, int | None] = {}
    for line in ["+10 555", "+11", "+12 0", "garbage", "+x", "-", "-11", "-99", ""]:
        parse_line(line, groups)
    assert groups == {10: 555, 12: None}


def test_parse_address() -> None:
    addresses: set[tuple[str, str]] = set()
    for line in [
        "A+10.0.0.5/24 eth0",
        "A+10.0.0.6/24 eth0",
        "A+bad",
        "A?x y",
        "A-10.0.0.5/24 eth0",
    ]:
        parse_address(line, addresses)
    assert addresses == {("10.0.0.6/24", "eth0")}


def test_cleanup_leftovers_removes_recorded_addresses(tmp_path: Path) -> None:
    """A crashed agent's relocatable address is removed by the next agent at start."""
    ip = "127.77.0.11/32"
    subprocess.run(["ip", "addr", "add", ip, "dev", "lo"], capture_output=True, check=True)
    try:
        state = tmp_path / "processes.json"
        write_state(state, [], [(ip, "lo")])
        data = json.loads(state.read_text())
        data["agent_pid"] = 2**22 + 1  # an agent that is gone
        state.write_text(json.dumps(data))
        assert read_state(state).addresses == ((ip, "lo"),)  # type: ignore[union-attr]
        cleanup_leftovers(state)
        out = subprocess.run(["ip", "-o", "addr", "show", "dev", "lo"], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        assert f"inet {ip}" not in out
    finally:
        subprocess.run(["ip", "addr", "del", ip, "dev", "lo"], capture_output=True)
