"""ServiceSupervisor on real processes: restarts, budgets, delays, halt_timeout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vigil.config import ServiceSpec
from vigil.errors import SpawnError
from vigil.supervise import procfs
from vigil.supervise.aio import cancel_and_wait
from vigil.supervise.fsm import ServiceState
from vigil.supervise.sentinel import ProcessRegistry
from vigil.supervise.service import ServiceSupervisor
from vigil.testing import wait_until

ENV = dict(os.environ)


@pytest.fixture
def registry() -> Iterator[ProcessRegistry]:
    reg = ProcessRegistry()
    try:
        yield reg
    finally:
        reg.close()  # SIGKILLs and reaps whatever a failed test left registered


class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[ServiceState, int | None, int]] = []
        self.failures: list[str] = []
        self.sup: ServiceSupervisor | None = None

    def on_change(self) -> None:
        assert self.sup is not None
        self.changes.append((self.sup.state, self.sup.pid, self.sup.restarts))

    def on_failed(self, reason: str) -> None:
        self.failures.append(reason)

    @property
    def states(self) -> list[ServiceState]:
        return [c[0] for c in self.changes]


def supervisor(
    registry: ProcessRegistry, tmp_path: Path, command: list[str], **spec: Any
) -> tuple[ServiceSupervisor, Recorder]:
    rec = Recorder()
    sup = ServiceSupervisor(
        ServiceSpec(name="svc", command=command, **spec),
        env={**ENV, "GC": str(tmp_path / "gc")},
        log_path=tmp_path / "svc.log",
        registry=registry,
        on_change=rec.on_change,
        on_failed=rec.on_failed,
    )
    rec.sup = sup
    return sup, rec


def replaced(sup: ServiceSupervisor, old: int) -> Callable[[], bool]:
    return lambda: sup.pid not in (None, old)


def test_killed_service_is_restarted(registry: ProcessRegistry, tmp_path: Path) -> None:
    sup, rec = supervisor(registry, tmp_path, ["sleep", "1000"], restart=5)

    async def scenario() -> None:
        await sup.start()
        first = sup.pid
        assert first is not None and procfs.pid_alive(first)
        assert registry.pgids() == [first]
        for n in (1, 2):
            old = sup.pid
            assert old is not None
            t0 = time.monotonic()
            os.kill(old, signal.SIGKILL)
            await wait_until(replaced(sup, old), 5, interval=0.001)
            latency = time.monotonic() - t0
            assert latency < 0.5, latency
            assert sup.restarts == n
            assert sup.state is ServiceState.RUNNING
            assert sup.last_exit == -signal.SIGKILL
            assert registry.pgids() == [sup.pid]
        assert rec.changes[-1] == (ServiceState.RUNNING, sup.pid, 2)
        assert ServiceState.BACKOFF not in rec.states  # delay 0: no backoff to report
        assert await sup.stop()
        assert sup.state is ServiceState.STOPPED and sup.pid is None
        assert len(registry) == 0
        assert rec.failures == []

    asyncio.run(scenario())


def test_budget_spent_fails_once(registry: ProcessRegistry, tmp_path: Path) -> None:
    sup, rec = supervisor(registry, tmp_path, ["sh", "-c", "exit 7"], restart=2)

    async def scenario() -> None:
        await sup.start()
        await wait_until(lambda: sup.state is ServiceState.FAILED, 5)
        await wait_until(lambda: not sup.watching, 5)
        assert sup.restarts == 2
        assert sup.pid is None
        assert len(rec.failures) == 1
        assert "exited with status 7" in rec.failures[0]
        assert "restart budget is spent" in rec.failures[0]
        assert len(registry) == 0
        assert await sup.stop()  # nothing left to stop
        assert sup.state is ServiceState.FAILED
        assert len(rec.failures) == 1

    asyncio.run(scenario())


def test_restart_none_gives_up_at_first_exit(registry: ProcessRegistry, tmp_path: Path) -> None:
    sup, rec = supervisor(registry, tmp_path, ["sh", "-c", "exit 1"])  # restart = 0

    async def scenario() -> None:
        await sup.start()
        await wait_until(lambda: bool(rec.failures), 5)
        assert sup.restarts == 0
        assert rec.states == [ServiceState.RUNNING, ServiceState.FAILED]
        assert 'restart is "none"' in rec.failures[0]

    asyncio.run(scenario())


def test_restart_delay_doubles(registry: ProcessRegistry, tmp_path: Path) -> None:
    sup, rec = supervisor(registry, tmp_path, ["sh", "-c", "exit 1"], restart=3, restart_delay=0.05)

    async def scenario() -> None:
        t0 = time.monotonic()
        await sup.start()
        await wait_until(lambda: sup.state is ServiceState.FAILED, 10)
        elapsed = time.monotonic() - t0
        assert elapsed >= 0.05 + 0.1 + 0.2
        assert sup.restarts == 3
        assert rec.states.count(ServiceState.BACKOFF) == 3
        assert len(rec.failures) == 1

    asyncio.run(scenario())


def test_halt_timeout_kills_whole_group(registry: ProcessRegistry, tmp_path: Path) -> None:
    script = 'trap "" TERM; sleep 1000 & echo $! > "$GC"; wait'
    sup, rec = supervisor(registry, tmp_path, ["sh", "-c", script], halt_timeout=0.3)
    gc_file = tmp_path / "gc"

    async def scenario() -> None:
        await sup.start()
        leader = sup.pid
        assert leader is not None
        await wait_until(lambda: gc_file.exists() and gc_file.read_text().strip() != "", 5)
        grandchild = int(gc_file.read_text())
        assert procfs.pid_alive(grandchild)
        t0 = time.monotonic()
        assert await sup.stop()
        elapsed = time.monotonic() - t0
        assert 0.3 <= elapsed < 3.0
        assert sup.last_exit == -signal.SIGKILL
        assert not procfs.pid_alive(leader)
        assert not procfs.pid_alive(grandchild)
        assert procfs.group_members(leader) == []
        assert rec.states[-2:] == [ServiceState.STOPPING, ServiceState.STOPPED]
        assert sup.restarts == 0 and rec.failures == []
        assert len(registry) == 0

    asyncio.run(scenario())


def test_stop_is_quick_for_a_polite_service(registry: ProcessRegistry, tmp_path: Path) -> None:
    sup, _ = supervisor(registry, tmp_path, ["sleep", "1000"], restart="unlimited", halt_timeout=10)

    async def scenario() -> None:
        await sup.start()
        t0 = time.monotonic()
        assert await sup.stop()
        assert time.monotonic() - t0 < 2.0
        assert sup.last_exit == -signal.SIGTERM
        assert sup.restarts == 0

    asyncio.run(scenario())


def test_stop_during_backoff(registry: ProcessRegistry, tmp_path: Path) -> None:
    sup, rec = supervisor(registry, tmp_path, ["sh", "-c", "exit 1"], restart=3, restart_delay=30)

    async def scenario() -> None:
        await sup.start()
        await wait_until(lambda: sup.state is ServiceState.BACKOFF, 5)
        assert await sup.stop()
        assert sup.state is ServiceState.STOPPED
        assert not sup.watching
        assert sup.restarts == 0 and rec.failures == []

    asyncio.run(scenario())


def test_leftovers_of_an_exited_service_are_killed(
    registry: ProcessRegistry, tmp_path: Path
) -> None:
    sup, rec = supervisor(registry, tmp_path, ["sh", "-c", 'sleep 1000 & echo $! > "$GC"; exit 4'])
    gc_file = tmp_path / "gc"

    async def scenario() -> None:
        await sup.start()
        await wait_until(lambda: bool(rec.failures), 5)
        grandchild = int(gc_file.read_text())
        await wait_until(lambda: not procfs.pid_alive(grandchild), 5)
        assert len(registry) == 0

    asyncio.run(scenario())


def test_spawn_error_on_start(registry: ProcessRegistry, tmp_path: Path) -> None:
    sup, rec = supervisor(registry, tmp_path, [str(tmp_path / "missing")], restart=3)

    async def scenario() -> None:
        with pytest.raises(SpawnError, match="missing"):
            await sup.start()
        assert sup.state is ServiceState.FAILED
        assert rec.failures == []  # the caller got the exception
        assert len(registry) == 0

    asyncio.run(scenario())


def test_kill_all_means_no_restart(registry: ProcessRegistry, tmp_path: Path) -> None:
    sup, rec = supervisor(registry, tmp_path, ["sleep", "1000"], restart="unlimited")

    async def scenario() -> None:
        await sup.start()
        pid = sup.pid
        assert pid is not None
        assert registry.kill_all(only={pid}) == [pid]
        await wait_until(lambda: sup.state is ServiceState.STOPPED, 5)
        assert sup.restarts == 0 and rec.failures == []
        assert not procfs.pid_alive(pid)

    asyncio.run(scenario())


def test_status_record(registry: ProcessRegistry, tmp_path: Path) -> None:
    sup, _ = supervisor(registry, tmp_path, ["sleep", "1000"], restart=1)

    async def scenario() -> None:
        assert sup.status().state == "stopped"
        await sup.start()
        status = sup.status()
        assert (status.pid, status.restarts, status.state) == (sup.pid, 0, "running")
        assert await sup.stop()

    asyncio.run(scenario())


def test_cancel_and_wait_insists() -> None:
    """Python 3.11's wait_for can swallow a cancellation; stopping must still stop."""

    async def stubborn() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # swallowed once, like wait_for
            await asyncio.sleep(100)
        await asyncio.sleep(100)

    async def scenario() -> None:
        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)  # let it start
        await cancel_and_wait(task, retry=0.01)
        assert task.cancelled()

    asyncio.run(scenario())
