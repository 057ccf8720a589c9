"""Service supervision decisions, kept pure: no I/O, no clock (``now`` is a parameter).

* :func:`decide_restart`: after a service's process exited, restart it (after how
  long) or give up. Restarts are counted within ``restart_window`` (``None``: since
  the package started); the delay doubles with each restart inside the window and is
  capped at :data:`MAX_DELAY` (or at ``restart_delay`` itself if that is larger).
* :class:`ServiceState` and :data:`TRANSITIONS`: the explicit states of a supervised
  service; :func:`transition` raises :class:`IllegalTransition` on anything else.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vigil.config import format_duration

if TYPE_CHECKING:
    from vigil.config import ServiceSpec

#: Upper bound of the doubled restart delay, in seconds.
MAX_DELAY = 60.0
#: Beyond this many recent restarts the doubled delay is at its cap for any base delay.
_DOUBLING_LIMIT = 64


@dataclass(frozen=True)
class RestartPolicy:
    """``budget``: restarts allowed (None: unlimited, 0: never); ``window``: seconds over
    which they are counted (None: since the package started); ``delay``: first delay."""

    budget: int | None
    window: float | None
    delay: float

    @classmethod
    def from_spec(cls, spec: ServiceSpec) -> RestartPolicy:
        return cls(budget=spec.restart, window=spec.restart_window, delay=spec.restart_delay)


@dataclass(frozen=True)
class Restart:
    delay: float


@dataclass(frozen=True)
class GiveUp:
    reason: str


Decision = Restart | GiveUp


def recent_restarts(policy: RestartPolicy, restarts: Sequence[float], now: float) -> int:
    """How many of ``restarts`` (times) count at ``now``: those less than ``window`` ago."""
    if policy.window is None:
        return len(restarts)
    return sum(1 for t in restarts if now - t < policy.window)


def restart_delay(policy: RestartPolicy, recent: int) -> float:
    """The delay before the restart that follows ``recent`` counted restarts."""
    if policy.delay <= 0:
        return 0.0
    cap = max(MAX_DELAY, policy.delay)
    return min(policy.delay * 2.0 ** min(recent, _DOUBLING_LIMIT), cap)


def decide_restart(policy: RestartPolicy, restarts: Sequence[float], now: float) -> Decision:
    """The process just exited at ``now``; ``restarts`` are the times of the previous
    restarts (since the package started). Restart after ``delay`` or give up."""
    if policy.budget == 0:
        return GiveUp('restart is "none"')
    recent = recent_restarts(policy, restarts, now)
    if policy.budget is not None and recent >= policy.budget:
        within = (
            "since the package started"
            if policy.window is None
            else f"within {format_duration(policy.window)}"
        )
        return GiveUp(f"restarted {recent} times {within}; the restart budget is spent")
    return Restart(restart_delay(policy, recent))


def prune_restarts(policy: RestartPolicy, restarts: Sequence[float], now: float) -> list[float]:
    """Drop the restart times that can no longer change a decision (bounds memory in a
    crash loop): those out of the window, and all but the last ``budget`` (or 64)."""
    kept = [t for t in restarts if policy.window is None or now - t < policy.window]
    limit = policy.budget if policy.budget is not None else _DOUBLING_LIMIT
    return kept[-limit:] if limit > 0 else []


# --------------------------------------------------------------------------- states


class ServiceState(enum.StrEnum):
    STOPPED = "stopped"  # not started, or stopped on request
    STARTING = "starting"  # type "forking": start command running, waiting for pid_file
    RUNNING = "running"  # a process is running
    BACKOFF = "backoff"  # exited; waiting restart_delay before the restart
    STOPPING = "stopping"  # stop requested: SIGTERM sent, waiting halt_timeout
    FAILED = "failed"  # gave up (budget spent, cannot spawn), or survived SIGKILL


class IllegalTransition(RuntimeError):
    """A transition missing from :data:`TRANSITIONS`: a bug in vigil, not a user error."""

    def __init__(self, current: ServiceState, target: ServiceState) -> None:
        super().__init__(f"illegal service state transition {current} -> {target}")
        self.current = current
        self.target = target


S = ServiceState

#: Every legal transition, with its label.
TRANSITIONS: dict[tuple[ServiceState, ServiceState], str] = {
    (S.STOPPED, S.RUNNING): "start",  # STOPPED -> RUNNING
    (S.STOPPED, S.FAILED): "spawn_failed",  # STOPPED -> FAILED
    (S.FAILED, S.RUNNING): "start_again",  # FAILED -> RUNNING
    (S.FAILED, S.FAILED): "spawn_failed_again",  # FAILED -> FAILED
    (S.RUNNING, S.BACKOFF): "exited_will_restart",  # RUNNING -> BACKOFF
    (S.RUNNING, S.FAILED): "exited_give_up",  # RUNNING -> FAILED
    (S.RUNNING, S.STOPPING): "stop",  # RUNNING -> STOPPING
    (S.RUNNING, S.STOPPED): "killed_by_agent",  # RUNNING -> STOPPED
    (S.BACKOFF, S.RUNNING): "restarted",  # BACKOFF -> RUNNING
    (S.BACKOFF, S.FAILED): "respawn_failed",  # BACKOFF -> FAILED
    (S.BACKOFF, S.STOPPED): "stop_during_backoff",  # BACKOFF -> STOPPED
    (S.STOPPED, S.STARTING): "start_forking",  # STOPPED -> STARTING
    (S.FAILED, S.STARTING): "start_forking_again",  # FAILED -> STARTING
    (S.BACKOFF, S.STARTING): "restart_forking",  # BACKOFF -> STARTING
    (S.STARTING, S.RUNNING): "pid_file_read",  # STARTING -> RUNNING
    (S.STARTING, S.FAILED): "start_failed",  # STARTING -> FAILED
    (S.STARTING, S.STOPPED): "stop_during_start",  # STARTING -> STOPPED
    (S.STOPPING, S.STOPPED): "stopped",  # STOPPING -> STOPPED
    (S.STOPPING, S.FAILED): "survived_sigkill",  # STOPPING -> FAILED
}


def transition(current: ServiceState, target: ServiceState) -> str:
    """The label of ``current -> target``; raises :class:`IllegalTransition` if illegal."""
    try:
        return TRANSITIONS[(current, target)]
    except KeyError:
        raise IllegalTransition(current, target) from None
