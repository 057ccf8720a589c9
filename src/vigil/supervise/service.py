"""One supervised service: spawn, watch, restart per policy, stop.

The service's processes live in its own cgroup (``PACKAGE/service.NAME``, see
:mod:`vigil.supervise.containment`), or, where cgroups cannot be used, in the
process group of its main process. Its **main process** is the one whose life is
the service's: the spawned process (``type = "simple"``), or the daemon named in
``pid_file`` once the start command has exited (``type = "forking"``, systemd's
``Type=forking``).

When the main process exits, whatever is left of the service is killed (unless
``kill_mode = "process"``), :func:`vigil.supervise.fsm.decide_restart` decides, and
a simple service's new process is spawned *before* anyone is notified: with
``restart_delay = 0`` the gap between exit and the new process is the time to
notice the exit (a pidfd on the event loop) plus one fork/exec. A forking service
is restarted only after its whole cgroup is empty.

Stopping follows systemd's ``KillMode=``, with ``stop_signal`` (``KillSignal=``)
and ``halt_timeout`` (``TimeoutStopSec=``):

================  ========================================  ============================
kill_mode         stop_signal goes to                       after halt_timeout, SIGKILL
================  ========================================  ============================
control-group     the main process, then every other        every process left
                  process of the service once the main
                  one has exited (at most
                  :data:`GROUP_SIGNAL_DELAY` later)
mixed             the main process only                     every process left
process           the main process only                     the main process; the rest
                                                            is left to the package's
                                                            final sweep
================  ========================================  ============================

vigil's ``control-group`` differs from systemd's in one point: systemd signals every
process at once, so workers die before a main process can tell them to save their
work; vigil gives the main process up to a second to stop its own children first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from vigil.config import ServiceSpec
from vigil.errors import SpawnError
from vigil.model import ServiceStatus
from vigil.supervise.aio import cancel_and_wait, poll_until
from vigil.supervise.cgroup import Cgroup
from vigil.supervise.fsm import (
    GiveUp,
    RestartPolicy,
    ServiceState,
    decide_restart,
    prune_restarts,
    transition,
)
from vigil.supervise.spawner import (
    KILL_WAIT,
    Adopted,
    Child,
    describe_exit,
    spawn,
    wait_group_gone,
)

if TYPE_CHECKING:
    from vigil.supervise.sentinel import ProcessRegistry

log = logging.getLogger(__name__)

Main = Child | Adopted
_PID_FILE_POLL = 0.02
#: kill_mode "control-group": how long the other processes of a service wait for the
#: main process to exit after it got the stop signal, before they get it too.
GROUP_SIGNAL_DELAY = 1.0


class ServiceSupervisor:
    """Keeps one service running. Callbacks are plain functions called on the event
    loop; an exception they raise is logged and does not stop the supervision.

    ``cgroup``: the service's own cgroup (None: process groups only).
    """

    def __init__(
        self,
        spec: ServiceSpec,
        *,
        env: Mapping[str, str],
        log_path: str | Path | None,
        registry: ProcessRegistry | None,
        on_change: Callable[[], None],
        on_failed: Callable[[str], None],
        cgroup: Cgroup | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self._env = dict(env)
        self._log_path = log_path
        self._registry = registry
        self._on_change = on_change
        self._on_failed = on_failed
        self._cgroup = cgroup
        self._clock = clock
        self._policy = RestartPolicy.from_spec(spec)
        self._state = ServiceState.STOPPED
        self._main: Main | None = None
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
        """PID of the main process, None when none runs."""
        return self._main.pid if self._main is not None else None

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
            await self._launch()
        except SpawnError as exc:
            self.failure = str(exc)
            self._set(ServiceState.FAILED)
            self._notify()
            raise
        self._set(ServiceState.RUNNING)
        self._notify()
        self._task = asyncio.create_task(self._watch(), name=f"service:{self.name}")

    async def stop(self) -> bool:
        """Stop for good (see the module table); no restart. Returns False only if
        processes that had to stop survive SIGKILL."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            await cancel_and_wait(task)
        main = self._main
        if main is None:
            # Between two runs (backoff, a failed start) or given up: nothing to signal
            # gently, but a restart-in-waiting must not leave anything behind.
            gone = True
            if self.spec.kill_mode != "process" and self._leftovers():
                await self._kill_leftovers()
                gone = not self._leftovers()
            if self._state in (ServiceState.BACKOFF, ServiceState.STARTING):
                self._set(ServiceState.STOPPED)
                self._notify()
            return gone
        self._set(ServiceState.STOPPING)
        self._notify()
        gone = await self._terminate(main)
        if main is not None:
            self.last_exit = main.returncode
        self._main = None
        if gone:
            if main is not None:
                self._forget(main)
            self._remove_pid_file(main)
            self._set(ServiceState.STOPPED)
        else:
            self.failure = f"processes of service {self.name} survived SIGKILL"
            self._set(ServiceState.FAILED)
        self._notify()
        return gone

    def _remove_pid_file(self, main: Main) -> None:
        """After a forking service stopped: remove its ``pid_file`` if it still names
        the daemon that stopped (as systemd does for ``PIDFile=``), so that nothing
        takes a stale file for a live daemon. A file naming another PID is left."""
        if self.spec.type != "forking" or self.spec.pid_file is None:
            return
        pid_file = Path(self.spec.pid_file)
        if _read_pid(pid_file)[0] == main.pid:
            with contextlib.suppress(OSError):
                pid_file.unlink()

    # ----------------------------------------------------------------- starting

    async def _launch(self) -> None:
        """Start the main process (raises SpawnError). Simple: one spawn, no await
        before it (restart latency). Forking: run the command, wait for it to exit
        0 and for ``pid_file`` to name a live process of the service."""
        if self._registry is not None and not self._registry.may_spawn():
            raise SpawnError(f"service {self.spec.name}: not started, this node is fenced")
        if self.spec.type == "forking":
            await self._launch_forking()
            return
        self._adopt(self._spawn())

    def _spawn(self) -> Child:
        spec = self.spec
        return spawn(
            spec.command,
            env=self._env,
            cwd=spec.cwd or "/",  # systemd's default WorkingDirectory=, not the agent's
            user=spec.user,
            group=spec.group,
            umask=spec.umask,
            limits=spec.limits(),
            cgroup=self._cgroup,
            log_path=self._log_path,
        )

    def _adopt(self, main: Main) -> None:
        if self._registry is not None:
            self._registry.add(main, on_kill=self._killed_externally)
        self._main = main

    async def _launch_forking(self) -> None:
        spec = self.spec
        assert spec.pid_file is not None
        await self._kill_leftovers()  # a restart starts from an empty cgroup
        if self._state is not ServiceState.STARTING:
            self._set(ServiceState.STARTING)
        self._notify()
        pid_file = Path(spec.pid_file)
        with contextlib.suppress(OSError):
            pid_file.unlink()  # a stale file must not name the new daemon
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.start_timeout
        starter = self._spawn()
        if self._registry is not None:
            self._registry.add(starter)
        try:
            try:
                async with asyncio.timeout(spec.start_timeout):
                    rc = await starter.wait()
            except TimeoutError:
                raise SpawnError(
                    f"service {self.name}: start command did not exit within "
                    f"{spec.start_timeout:g}s (start_timeout)"
                ) from None
            if rc != 0:
                raise SpawnError(f"service {self.name}: start command {describe_exit(rc)}")
            main = await self._read_pid_file(pid_file, deadline, starter.start_time)
        except BaseException:
            await self._kill_leftovers()
            raise
        finally:
            if self._registry is not None and not starter.group_alive():
                self._registry.remove(starter)
        self._adopt(main)

    async def _read_pid_file(
        self, pid_file: Path, deadline: float, born_after: int | None
    ) -> Adopted:
        loop = asyncio.get_running_loop()
        problem: str | None = f"pid_file {pid_file} did not appear"
        while True:
            pid, text = _read_pid(pid_file)
            if pid is not None:
                problem = self._pid_problem(pid, pid_file, born_after)
                if problem is None:
                    try:
                        return Adopted(pid, self.spec.command, self._cgroup)
                    except OSError:
                        problem = f"pid_file {pid_file} names PID {pid}, which has exited"
            elif text is not None and text in ("0", "1"):
                problem = f"pid_file {pid_file} names PID {text}, which cannot be the service's"
            elif text is not None:
                problem = f"pid_file {pid_file} holds {text[:40]!r}, not a PID"
            if loop.time() >= deadline:
                raise SpawnError(
                    f"service {self.name}: {problem} "
                    f"(gave up after {self.spec.start_timeout:g}s, start_timeout)"
                )
            await asyncio.sleep(_PID_FILE_POLL)

    def _pid_problem(self, pid: int, pid_file: Path, born_after: int | None) -> str | None:
        """Why ``pid`` cannot be the service's daemon. With a cgroup: it must be in the
        service's cgroup. Without (process groups): it must have been started after
        the start command and run as the service's user, so a pid_file naming some
        other process is refused (it would be signalled and killed as the service)."""
        from vigil.supervise import procfs

        st = procfs.read_stat(pid)
        if st is None or st.dead:
            return f"pid_file {pid_file} names PID {pid}, which is not running"
        if self._cgroup is not None:
            if not self._cgroup.holds(pid):
                return (
                    f"pid_file {pid_file} names PID {pid}, which is not a process of the "
                    f"service (not in {self._cgroup.path})"
                )
            return None
        if born_after is not None and st.start_time < born_after:
            return (
                f"pid_file {pid_file} names PID {pid}, which was running before the "
                "service's start command: not its daemon"
            )
        uid = procfs.uid_of(pid)
        want = self._uid()
        if uid is not None and uid != want:
            return f"pid_file {pid_file} names PID {pid}, which runs as uid {uid}, not {want}"
        return None

    def _uid(self) -> int:
        import os

        from vigil.supervise.spawner import resolve_identity

        ident = resolve_identity(self.spec.user, self.spec.group)
        return ident.uid if ident is not None else os.geteuid()

    # ----------------------------------------------------------------- stopping

    def _leftovers(self) -> bool:
        """Processes of the service other than a main process we know of."""
        return self._cgroup is not None and self._cgroup.populated()

    def _signal_all(self, sig: int, main: Main | None) -> None:
        if self._cgroup is not None:
            self._cgroup.signal(sig)
        elif main is not None:
            main.signal_group(sig)

    def _kill_all(self, main: Main | None) -> None:
        if self._cgroup is not None:
            self._cgroup.kill()
        elif main is not None:
            main.signal_group(signal.SIGKILL)

    async def _wait_all_gone(self, main: Main | None, timeout: float) -> bool:
        if self._cgroup is None:
            if main is None:
                return True
            if isinstance(main, Child):
                return await wait_group_gone(main, timeout)
            return await _wait_main(main, timeout) and await _wait_group(main, timeout)
        if main is not None:
            await _wait_main(main, timeout)  # reap it (usually the cgroup empties with it)
        return await self._cgroup.wait_empty(timeout)

    async def _terminate(self, main: Main | None) -> bool:
        spec = self.spec
        sig = spec.stop_signum
        if main is not None:  # every mode: the main process hears it first
            main.signal(sig)
            main.signal(signal.SIGCONT)
        if spec.kill_mode == "process":
            if main is None or await _wait_main(main, spec.halt_timeout):
                return True
            self._log_kill(spec.halt_timeout, sig)
            main.signal(signal.SIGKILL)
            return await _wait_main(main, KILL_WAIT)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.halt_timeout
        if spec.kill_mode == "control-group":
            # The rest of the service once the main process has exited (it may have
            # stopped its workers its own way, as case "main tells its workers to save"
            # needs), or after GROUP_SIGNAL_DELAY at the latest.
            if main is not None:
                await _wait_main(main, min(GROUP_SIGNAL_DELAY, spec.halt_timeout))
            self._signal_all(sig, main)
            self._signal_all(signal.SIGCONT, main)
        if await self._wait_all_gone(main, max(0.0, deadline - loop.time())):
            return True
        self._log_kill(spec.halt_timeout, sig)
        self._kill_all(main)
        gone = await self._wait_all_gone(main, KILL_WAIT)
        if not gone:
            log.warning("service %s: processes survived SIGKILL", self.name)
        return gone

    def _log_kill(self, grace: float, sig: int) -> None:
        log.info(
            "service %s outlived %gs after %s: SIGKILL (kill_mode %s)",
            self.name,
            grace,
            signal.Signals(sig).name,
            self.spec.kill_mode,
        )

    async def _kill_leftovers(self) -> None:
        """Kill whatever is left of the service (a forking service's previous
        daemon) and wait for it to go."""
        if self._cgroup is not None and self._cgroup.populated():
            self._cgroup.kill()
            await self._cgroup.wait_empty(KILL_WAIT)

    def _forget(self, main: Main) -> None:
        if self._registry is not None:
            self._registry.remove(main)

    def _killed_externally(self) -> None:
        """The registry SIGKILLed our group (fencing): do not restart."""
        self._stopping = True

    # ----------------------------------------------------------------- watching

    async def _watch(self) -> None:
        try:
            while True:
                main = self._main
                assert main is not None
                rc = await main.wait()
                how = _how_it_ended(main, rc)
                self._exited(main, rc, how)
                if self._stopping:
                    self._main = None
                    self._set(ServiceState.STOPPED)
                    self._notify()
                    return
                now = self._clock()
                self._restart_times = prune_restarts(self._policy, self._restart_times, now)
                decision = decide_restart(self._policy, self._restart_times, now)
                self._main = None
                if isinstance(decision, GiveUp):
                    self._give_up(ServiceState.FAILED, f"{how}; {decision.reason}")
                    return
                self._restart_times.append(now)
                self._set(ServiceState.BACKOFF)
                log.warning("service %s %s; restarting in %gs", self.name, how, decision.delay)
                if decision.delay > 0:
                    self._notify()
                    await asyncio.sleep(decision.delay)
                    if self._stopping:
                        self._set(ServiceState.STOPPED)
                        self._notify()
                        return
                try:
                    await self._launch()
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

    def _exited(self, main: Main, rc: int, how: str) -> None:
        """The main process exited: kill what it left (not with kill_mode "process"),
        forget it."""
        self.last_exit = rc
        if self.spec.kill_mode != "process":
            left = self._cgroup.populated() if self._cgroup is not None else main.group_alive()
            if left:
                log.warning("service %s %s leaving processes behind; killing them", self.name, how)
                self._kill_all(main)
        self._forget(main)

    def _give_up(self, state: ServiceState, reason: str) -> None:
        self._main = None
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


def _read_pid(path: Path) -> tuple[int | None, str | None]:
    """(PID, None) if ``path`` holds one (> 1); (None, its text) if it holds something
    else; (None, None) if it cannot be read (not there yet)."""
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None, None
    if text.isascii() and text.isdigit() and int(text) > 1:
        return int(text), None
    return None, text if text else None


def _how_it_ended(main: Main, rc: int) -> str:
    """ "exited with status 1", or, for a daemon that is not the agent's child (its
    status is not ours to read), "its main process PID exited"."""
    if isinstance(main, Adopted) and not main.status_known:
        return f"its main process {main.pid} exited"
    return describe_exit(rc)


async def _wait_main(main: Main, timeout: float) -> bool:
    """Wait up to ``timeout`` s for the main process to exit (and reap it)."""
    if main.poll() is not None:
        return True
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await main.wait()
            return True
    return main.poll() is not None


async def _wait_group(main: Adopted, timeout: float) -> bool:
    return await poll_until(lambda: not main.group_alive(), timeout)
