"""Monitors: the pure judging, then MonitorRunner on real commands."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vigil.config import MonitorSpec
from vigil.supervise import procfs
from vigil.supervise.monitor import (
    CheckOutcome,
    MonitorRunner,
    MonitorState,
    MonitorVerdict,
    classify,
    evaluate,
)
from vigil.supervise.sentinel import ProcessRegistry
from vigil.testing import wait_until

ENV = dict(os.environ)
H, D, F = CheckOutcome.HEALTHY, CheckOutcome.DEGRADED, CheckOutcome.FAILED


@pytest.fixture
def registry() -> Iterator[ProcessRegistry]:
    reg = ProcessRegistry()
    try:
        yield reg
    finally:
        reg.close()


def spec(**kw: Any) -> MonitorSpec:
    kw.setdefault("name", "mon")
    kw.setdefault("command", ["true"])
    return MonitorSpec(**kw)


# --------------------------------------------------------------------------- pure part


def test_classify() -> None:
    assert classify(0, False) is H
    assert classify(3, False) is D
    for code in (1, 2, 4, 127, -9):
        assert classify(code, False) is F
    assert classify(None, False) is F  # could not be started
    assert classify(0, True) is F  # timed out
    assert classify(-15, True) is F


def run(outcomes: list[CheckOutcome], threshold: int = 3) -> list[MonitorVerdict | None]:
    s = spec(failures=threshold)
    state = MonitorState()
    out = []
    for o in outcomes:
        state, verdict = evaluate(s, state, o)
        out.append(verdict)
    return out


def brief(v: MonitorVerdict | None) -> tuple[str, int, bool] | None:
    return None if v is None else (v.status, v.failures, v.act)


def test_healthy_and_degraded_transitions_are_reported_once() -> None:
    assert [brief(v) for v in run([H, H, D, D, H, H])] == [
        ("healthy", 0, False),
        None,
        ("degraded", 0, False),
        None,
        ("healthy", 0, False),
        None,
    ]


def test_consecutive_failures_trigger_action_and_reset() -> None:
    assert [brief(v) for v in run([F, F, F, F, F, F, F], threshold=3)] == [
        ("failing", 1, False),
        ("failing", 2, False),
        ("failing", 3, True),
        ("failing", 1, False),
        ("failing", 2, False),
        ("failing", 3, True),
        ("failing", 1, False),
    ]


def test_success_breaks_a_run_of_failures() -> None:
    verdicts = [brief(v) for v in run([F, F, H, F, F, D, F, F, F], threshold=3)]
    assert [v for v in verdicts if v and v[2]] == [("failing", 3, True)]
    assert verdicts[2] == ("healthy", 0, False)
    assert verdicts[5] == ("degraded", 0, False)


def test_threshold_one_acts_on_every_failure() -> None:
    assert [brief(v) for v in run([F, F], threshold=1)] == [
        ("failing", 1, True),
        ("failing", 1, True),
    ]


# --------------------------------------------------------------------------- runner


class Collect:
    def __init__(self) -> None:
        self.verdicts: list[MonitorVerdict] = []

    def __call__(self, v: MonitorVerdict) -> None:
        self.verdicts.append(v)


def runner(
    registry: ProcessRegistry, tmp_path: Path, command: list[str], **kw: Any
) -> tuple[MonitorRunner, Collect]:
    got = Collect()
    kw.setdefault("interval", 0.02)
    kill_grace = kw.pop("kill_grace", 1.0)
    m = MonitorRunner(
        spec(command=command, **kw),
        env={**ENV, "GC": str(tmp_path / "gc")},
        log_path=tmp_path / "mon.log",
        registry=registry,
        on_result=got,
        kill_grace=kill_grace,
    )
    return m, got


def test_healthy_monitor(registry: ProcessRegistry, tmp_path: Path) -> None:
    m, got = runner(registry, tmp_path, ["true"])

    async def scenario() -> None:
        m.start()
        await wait_until(lambda: m.checks >= 3, 5)
        await m.stop()
        assert [brief(v) for v in got.verdicts] == [("healthy", 0, False)]
        assert m.status().status == "healthy"
        assert not m.running
        assert len(registry) == 0

    asyncio.run(scenario())


def test_degraded_monitor(registry: ProcessRegistry, tmp_path: Path) -> None:
    m, got = runner(registry, tmp_path, ["sh", "-c", "exit 3"])

    async def scenario() -> None:
        m.start()
        await wait_until(lambda: m.checks >= 2, 5)
        await m.stop()
        assert [brief(v) for v in got.verdicts] == [("degraded", 0, False)]
        assert "degraded" in got.verdicts[0].message

    asyncio.run(scenario())


def test_consecutive_failures_trigger(registry: ProcessRegistry, tmp_path: Path) -> None:
    m, got = runner(registry, tmp_path, ["sh", "-c", "exit 1"], failures=3, action="failover")

    async def scenario() -> None:
        m.start()
        await wait_until(lambda: any(v.act for v in got.verdicts), 5)
        await m.stop()
        assert [brief(v) for v in got.verdicts[:3]] == [
            ("failing", 1, False),
            ("failing", 2, False),
            ("failing", 3, True),
        ]
        act = got.verdicts[2]
        assert act.action == "failover" and act.monitor == "mon"
        assert act.message == "exited with status 1"

    asyncio.run(scenario())


def test_timeout_counts_as_failure_and_kills_the_check(
    registry: ProcessRegistry, tmp_path: Path
) -> None:
    # The check ignores SIGTERM and leaves a grandchild: both must be gone.
    script = 'trap "" TERM; sleep 1000 & echo $! > "$GC"; wait'
    m, got = runner(
        registry, tmp_path, ["sh", "-c", script], timeout=0.1, failures=1, kill_grace=0.1
    )
    gc_file = tmp_path / "gc"

    async def scenario() -> None:
        m.start()
        t0 = time.monotonic()
        await wait_until(lambda: bool(got.verdicts), 5)
        assert time.monotonic() - t0 < 0.02 + 0.1 + 0.1 + 1.0
        await m.stop()
        v = got.verdicts[0]
        assert (v.status, v.failures, v.act) == ("failing", 1, True)
        assert "timed out" in v.message
        assert not procfs.pid_alive(int(gc_file.read_text()))
        assert len(registry) == 0

    asyncio.run(scenario())


def test_unrunnable_check_is_a_failure(registry: ProcessRegistry, tmp_path: Path) -> None:
    m, got = runner(registry, tmp_path, [str(tmp_path / "missing")], failures=2)

    async def scenario() -> None:
        m.start()
        await wait_until(lambda: any(v.act for v in got.verdicts), 5)
        await m.stop()
        assert "missing" in got.verdicts[0].message

    asyncio.run(scenario())


def test_stop_kills_a_running_check(registry: ProcessRegistry, tmp_path: Path) -> None:
    m, got = runner(registry, tmp_path, ["sleep", "1000"], interval=0.01, timeout=100)

    async def scenario() -> None:
        m.start()
        await wait_until(lambda: len(registry) == 1, 5)
        pgid = registry.pgids()[0]
        await m.stop()
        assert not procfs.pid_alive(pgid)
        assert len(registry) == 0
        assert got.verdicts == []

    asyncio.run(scenario())
