"""Run a command to completion with a timeout: the part monitors and scripts share."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vigil.errors import SpawnError
from vigil.supervise.spawner import Child, describe_exit, spawn, terminate_group, wait_group_gone

if TYPE_CHECKING:
    from vigil.supervise.cgroup import Cgroup
    from vigil.supervise.sentinel import ProcessRegistry


@dataclass(frozen=True)
class CommandResult:
    """How a command ended. ``exit_code`` is None only if it could not be started
    (``error`` says why); after a timeout it is the status the kill produced."""

    exit_code: int | None
    timed_out: bool
    duration: float
    error: str | None = None
    #: With ``keep_leftovers``: the command's process group, if it exited leaving
    #: processes in it (process-group containment keeps track of them through it).
    left: Child | None = None

    def describe(self, timeout: float | None = None) -> str:
        if self.error is not None:
            return self.error
        if self.timed_out:
            return f"timed out after {timeout:g}s" if timeout is not None else "timed out"
        return describe_exit(self.exit_code)


async def run_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float | None,
    log_path: str | Path | None = None,
    registry: ProcessRegistry | None = None,
    kill_grace: float = 3.0,
    cwd: str | Path | None = None,
    user: str | None = None,
    cgroup: Cgroup | None = None,
    keep_leftovers: bool = False,
) -> CommandResult:
    """Run ``argv`` in its own process group (and ``cgroup``) and wait for it, at most
    ``timeout`` s.

    On timeout the group gets SIGTERM, then SIGKILL after ``kill_grace`` s. Processes the
    command leaves behind in its group when it exits are terminated the same way,
    unless ``keep_leftovers`` (a package script's daemons belong to the package and
    live until it halts: see ``PackageScope``). If the caller is cancelled, the group
    is killed before the cancellation propagates.
    """
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    if registry is not None and not registry.may_spawn():
        return CommandResult(None, False, 0.0, f"{argv[0]}: not run, this node is fenced")
    try:
        child = spawn(
            argv,
            env=env,
            cwd=cwd,
            user=user,
            log_path=log_path,
            cgroup=cgroup,
            die_with_parent=False,  # the sentinel kills it with its cgroup / group
        )
    except SpawnError as exc:
        return CommandResult(None, False, loop.time() - t0, str(exc))
    if registry is not None:
        registry.add(child)
    timed_out = False
    gone: bool | None = None
    left: Child | None = None
    try:
        try:
            async with asyncio.timeout(timeout):
                await child.wait()
        except TimeoutError:
            timed_out = True
        if keep_leftovers and not timed_out and child.group_alive():
            left = child
            # In a cgroup the package holds them; only process groups need the entry.
            gone = cgroup is not None
        else:
            # Timed out, or exited leaving processes in its group: the same treatment.
            gone = await terminate_group(child, kill_grace)
    finally:
        if gone is None:  # cancelled (or failed) on the way
            gone = await _kill_on_the_way_out(child)
        if registry is not None and gone:
            registry.remove(child)  # survivors of SIGKILL stay known to the sentinel
    return CommandResult(child.returncode, timed_out, loop.time() - t0, left=left)


async def _kill_on_the_way_out(child: Child) -> bool:
    """SIGKILL the group and reap the leader, even if the caller is being cancelled."""
    child.signal_group(signal.SIGKILL)
    task = asyncio.ensure_future(wait_group_gone(child, 2.0))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])  # finish reaping, then let the cancellation go on
        raise


async def run_captured(
    argv: Sequence[str],
    *,
    timeout: float,
    registry: ProcessRegistry | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[CommandResult, str]:
    """Run a short system command (``ip``, ``arping``, ``fence_command``) through the
    spawner with a timeout, and return its result and its output (stdout and stderr,
    at most 4 KiB). Never blocks the event loop."""
    fd = os.memfd_create("vigil-output", os.MFD_CLOEXEC)
    try:
        res = await run_command(
            argv,
            env=os.environ if env is None else env,
            timeout=timeout,
            log_path=f"/proc/self/fd/{fd}",
            registry=registry,
            kill_grace=1.0,
        )
        os.lseek(fd, 0, os.SEEK_SET)
        out = os.read(fd, 4096).decode(errors="replace").strip()
    finally:
        os.close(fd)
    return res, out
