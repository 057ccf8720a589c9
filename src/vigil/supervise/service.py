"""One supervised service: spawn, watch, restart per policy, stop.

When the service's process exits, whatever it left in its process group is killed,
:func:`vigil.supervise.fsm.decide_restart` decides, and the new process is spawned
*before* anyone is notified: with ``restart_delay = 0`` the gap between exit and the
new process is the time to notice the exit (a pidfd on the event loop) plus one
fork/exec.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from vigil.config import ServiceSpec
from vigil.errors import SpawnError
from vigil.model import ServiceStatus
from vigil.supervise.aio import cancel_and_wait
from vigil.supervise.fsm import (
    GiveUp,
    RestartPolicy,
    ServiceState,
    decide_restart,
    prune_restarts,
    transition,
)
from vigil.supervise.spawner import Child, describe_exit, spawn, terminate_group

if TYPE_CHECKING:
    from vigil.supervise.sentinel import ProcessRegistry

log = logging.getLogger(__name__)


class ServiceSupervisor:
    """Keeps one service running. Callbacks are plain functions called on the event
    loop; an exception they raise is logged and does not stop the supervision."""

    def __init__(
        self,
        spec: ServiceSpec,
        *,
        env: Mapping[str, str],
        log_path: str | Path | None,
        registry: ProcessRegistry | None,
        on_change: Callable[[], None],
        on_failed: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self._env = dict(env)
        self._log_path = log_path
        self._registry = registry
        self._on_change = on_change
        self._on_failed = on_failed
        self._clock = clock
        self._policy = RestartPolicy.from_spec(spec)
        self._state = ServiceState.STOPPED
        self._child: Child | None = None
        self._task: asyncio.Task[None] | None = None
        self._restart_times: list[float] = []
        self._restarts = 0
        self._stopping = False
        self._failed_reported = False
        self.last_exit: int | None = None
        self.failure: str | None = None

    # ----------------------------------------------------------------- observation

    @property
    def state(self) -> ServiceState:
        return self._state

    @property
    def pid(self) -> int | None:
        """PID (and process group ID) of the running process, None when none runs."""
        return self._child.pid if self._child is not None else None

    @property
    def restarts(self) -> int:
        """Restarts since the last :meth:`start`."""
        return self._restarts

    @property
    def watching(self) -> bool:
        """True while a task watches the process (or waits to restart it)."""
        return self._task is not None and not self._task.done()

    def status(self) -> ServiceStatus:
        return ServiceStatus(pid=self.pid, restarts=self._restarts, state=self._state.value)

    def __repr__(self) -> str:
        return f"<ServiceSupervisor {self.name} {self._state} pid={self.pid}>"

    # ----------------------------------------------------------------- control

    async def start(self) -> None:
        """Spawn the service and start watching it. Raises :class:`SpawnError` (state
        becomes FAILED; ``on_failed`` is not called: the caller has the exception)."""
        if self._state not in (ServiceState.STOPPED, ServiceState.FAILED):
            transition(self._state, ServiceState.RUNNING)  # raises IllegalTransition
        self._stopping = False
        self._failed_reported = False
        self._restart_times = []
        self._restarts = 0
        self.failure = None
        try:
            self._spawn()
        except SpawnError as exc:
            self.failure = str(exc)
            self._set(ServiceState.FAILED)
            self._notify()
            raise
        self._set(ServiceState.RUNNING)
        self._notify()
        self._task = asyncio.create_task(self._watch(), name=f"service:{self.name}")

    async def stop(self) -> bool:
        """Stop for good: SIGTERM the group, SIGKILL after ``halt_timeout``; no restart.
        Returns False only if processes of the group survive SIGKILL."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            await cancel_and_wait(task)
        child = self._child
        if child is None:
            if self._state is ServiceState.BACKOFF:
                self._set(ServiceState.STOPPED)
                self._notify()
            return True
        self._set(ServiceState.STOPPING)
        self._notify()
        gone = await terminate_group(child, self.spec.halt_timeout)
        self.last_exit = child.returncode
        self._child = None
        if gone:
            if self._registry is not None:
                self._registry.remove(child)
            self._set(ServiceState.STOPPED)
        else:
            self.failure = f"processes of service {self.name} survived SIGKILL"
            self._set(ServiceState.FAILED)
        self._notify()
        return gone

    # ----------------------------------------------------------------- internals

    def _spawn(self) -> Child:
        if self._registry is not None and not self._registry.may_spawn():
            raise SpawnError(f"service {self.spec.name}: not started, this node is fenced")
        child = spawn(
            self.spec.command,
            env=self._env,
            cwd=self.spec.cwd,
            user=self.spec.user,
            log_path=self._log_path,
        )
        if self._registry is not None:
            self._registry.add(child, on_kill=self._killed_externally)
        self._child = child
        return child

    def _killed_externally(self) -> None:
        """The registry SIGKILLed our group (fencing): do not restart."""
        self._stopping = True

    async def _watch(self) -> None:
        try:
            while True:
                child = self._child
                assert child is not None
                rc = await child.wait()
                self._exited(child, rc)
                if self._stopping:
                    self._child = None
                    self._set(ServiceState.STOPPED)
                    self._notify()
                    return
                now = self._clock()
                self._restart_times = prune_restarts(self._policy, self._restart_times, now)
                decision = decide_restart(self._policy, self._restart_times, now)
                self._child = None
                if isinstance(decision, GiveUp):
                    self._give_up(ServiceState.FAILED, f"{describe_exit(rc)}; {decision.reason}")
                    return
                self._restart_times.append(now)
                self._set(ServiceState.BACKOFF)
                log.warning(
                    "service %s %s; restarting in %gs", self.name, describe_exit(rc), decision.delay
                )
                if decision.delay > 0:
                    self._notify()
                    await asyncio.sleep(decision.delay)
                    if self._stopping:
                        self._set(ServiceState.STOPPED)
                        self._notify()
                        return
                try:
                    self._spawn()
                except SpawnError as exc:
                    self._give_up(ServiceState.FAILED, f"cannot restart: {exc}")
                    return
                self._restarts += 1
                self._set(ServiceState.RUNNING)
                self._notify()  # after the spawn: writing the status must not delay it
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("service %s: supervision failed", self.name)
            self._give_up(ServiceState.FAILED, "internal error in its supervisor (see the log)")

    def _exited(self, child: Child, rc: int) -> None:
        """The leader exited: kill what it left in its group, forget the group."""
        self.last_exit = rc
        if child.group_alive():
            log.warning(
                "service %s %s leaving processes in its group; killing them",
                self.name,
                describe_exit(rc),
            )
            child.signal_group(signal.SIGKILL)
        if self._registry is not None:
            self._registry.remove(child)

    def _give_up(self, state: ServiceState, reason: str) -> None:
        self._child = None
        self.failure = reason
        self._set(state)
        self._notify()
        log.error("service %s failed: %s", self.name, reason)
        if not self._failed_reported:
            self._failed_reported = True
            try:
                self._on_failed(reason)
            except Exception:
                log.exception("service %s: on_failed callback failed", self.name)

    def _set(self, target: ServiceState) -> None:
        if target is not self._state:
            transition(self._state, target)
        self._state = target

    def _notify(self) -> None:
        try:
            self._on_change()
        except Exception:
            log.exception("service %s: on_change callback failed", self.name)
