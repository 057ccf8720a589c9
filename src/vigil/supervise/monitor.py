"""Monitors: run a check command every ``interval`` and judge the package's health.

Exit 0 is healthy, 3 degraded, anything else (a timeout, a command that cannot be
started) a failure. When consecutive failures reach ``failures`` the verdict says
``act``: the agent takes the monitor's action, and the count starts again.

The judging part (:func:`classify`, :func:`evaluate`) is pure; :class:`MonitorRunner`
only runs commands and feeds it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from vigil.config import MonitorSpec
from vigil.model import MonitorStatus
from vigil.supervise.aio import cancel_and_wait
from vigil.supervise.command import CommandResult, run_command

if TYPE_CHECKING:
    from vigil.supervise.cgroup import Cgroup
    from vigil.supervise.sentinel import ProcessRegistry

log = logging.getLogger(__name__)

EXIT_HEALTHY = 0
EXIT_DEGRADED = 3

StatusName = Literal["unknown", "healthy", "degraded", "failing"]


class CheckOutcome(enum.StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    FAILED = "failed"


@dataclass(frozen=True)
class MonitorState:
    """What a monitor remembers between checks."""

    status: StatusName = "unknown"
    failures: int = 0  # consecutive failures not yet acted upon


@dataclass(frozen=True)
class MonitorVerdict:
    """Reported to the agent when the monitor's status or failure count changes.

    ``act`` is True when consecutive failures reached the threshold: the agent must take
    ``action`` now (``failures`` then equals the threshold; the count restarts at 0).
    """

    monitor: str
    status: StatusName
    failures: int
    act: bool
    action: Literal["restart", "failover", "log"]
    message: str = ""

    @property
    def action_required(self) -> bool:
        return self.act


def classify(exit_code: int | None, timed_out: bool) -> CheckOutcome:
    """0 → healthy, 3 → degraded; a timeout, a failed start or any other code → failed."""
    if timed_out or exit_code is None:
        return CheckOutcome.FAILED
    if exit_code == EXIT_HEALTHY:
        return CheckOutcome.HEALTHY
    if exit_code == EXIT_DEGRADED:
        return CheckOutcome.DEGRADED
    return CheckOutcome.FAILED


def evaluate(
    spec: MonitorSpec, state: MonitorState, outcome: CheckOutcome, message: str = ""
) -> tuple[MonitorState, MonitorVerdict | None]:
    """Fold one check's outcome into ``state``: the new state, and a verdict to report
    if anything changed (None otherwise). A healthy or degraded result ends a run of
    failures."""

    def verdict(status: StatusName, failures: int, act: bool = False) -> MonitorVerdict:
        return MonitorVerdict(spec.name, status, failures, act, spec.action, message)

    if outcome is CheckOutcome.FAILED:
        failures = state.failures + 1
        if failures >= spec.failures:
            return MonitorState("failing", 0), verdict("failing", failures, act=True)
        return MonitorState("failing", failures), verdict("failing", failures)
    status: StatusName = "healthy" if outcome is CheckOutcome.HEALTHY else "degraded"
    new = MonitorState(status, 0)
    if new == state:
        return state, None
    return new, verdict(status, 0)


class MonitorRunner:
    """Runs ``spec.command`` every ``spec.interval`` (measured start to start; a check
    never overlaps the previous one), with ``spec.timeout``."""

    def __init__(
        self,
        spec: MonitorSpec,
        *,
        env: Mapping[str, str],
        log_path: str | Path | None,
        registry: ProcessRegistry | None,
        on_result: Callable[[MonitorVerdict], None],
        kill_grace: float = 1.0,
        first_delay: float | None = None,
        cgroup: Cgroup | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self._env = dict(env)
        self._log_path = log_path
        self._registry = registry
        self._on_result = on_result
        self._kill_grace = kill_grace
        self._cgroup = cgroup
        self._first_delay = spec.interval if first_delay is None else first_delay
        self._state = MonitorState()
        self._task: asyncio.Task[None] | None = None
        self.checks = 0  # checks completed since start()

    @property
    def state(self) -> MonitorState:
        return self._state

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def status(self) -> MonitorStatus:
        return MonitorStatus(status=self._state.status, failures=self._state.failures)

    def start(self) -> None:
        """Start checking (the first check runs after ``interval``); needs a running loop."""
        if self.running:
            return
        self._state = MonitorState()
        self.checks = 0
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"monitor:{self.name}"
        )

    async def stop(self) -> None:
        """Stop checking; a check in progress is killed (its group SIGKILLed)."""
        task, self._task = self._task, None
        if task is None:
            return
        await cancel_and_wait(task)

    async def check_once(self) -> MonitorVerdict | None:
        """Run one check now and fold it in (what the loop does every interval)."""
        result = await run_command(
            self.spec.command,
            env=self._env,
            timeout=self.spec.timeout,
            log_path=self._log_path,
            registry=self._registry,
            kill_grace=self._kill_grace,
            cgroup=self._cgroup,
        )
        self.checks += 1
        outcome = classify(result.exit_code, result.timed_out)
        self._state, verdict = evaluate(
            self.spec, self._state, outcome, _message(result, self.spec)
        )
        if verdict is not None:
            if outcome is not CheckOutcome.HEALTHY:
                log.warning("monitor %s: %s (%s)", self.name, verdict.message, verdict.status)
            try:
                self._on_result(verdict)
            except Exception:
                log.exception("monitor %s: on_result callback failed", self.name)
        return verdict

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self._first_delay
        while True:
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            started = loop.time()
            try:
                await self.check_once()
            except Exception:  # never stop checking
                log.exception("monitor %s: the check could not be run", self.name)
            next_at = max(started + self.spec.interval, loop.time())


def _message(result: CommandResult, spec: MonitorSpec) -> str:
    text = result.describe(spec.timeout)
    if not result.timed_out and result.exit_code == EXIT_DEGRADED:
        text += " (degraded)"
    return text
