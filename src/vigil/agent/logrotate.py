"""The agent's duty of keeping package logs small (see :mod:`vigil.supervise.logfile`).

Every :data:`CHECK_EVERY` seconds the log of every package this node holds is rotated
if it is larger than the package's ``log_max_size`` (keeping ``log_keep`` old copies),
and a removed log a service still writes to is kept below that size;
the agent's own ``hooks.log`` and ``sentinel.log`` are kept to the defaults. The copy
runs in a thread: a large log never holds up the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vigil.config import PackageSpec
from vigil.supervise.logfile import rotate_if_needed, truncate_removed

if TYPE_CHECKING:
    from vigil.agent.node import Agent
    from vigil.snapshot import Snapshot

log = logging.getLogger("vigil.agent")

CHECK_EVERY = 5.0
_DEFAULTS = PackageSpec(name="defaults")


class LogRotation:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._next = 0.0

    async def on_join(self) -> None:
        return None

    async def tick(self, snap: Snapshot) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + CHECK_EVERY
        a = self.agent
        wanted: list[tuple[Path, int, int]] = [
            (a.log_dir / f"{pkg}.log", h.spec.log_max_size, h.spec.log_keep)
            for pkg, h in a.held.items()
        ]
        for name in ("hooks.log", "sentinel.log"):
            wanted.append((a.log_dir / name, _DEFAULTS.log_max_size, _DEFAULTS.log_keep))
        for path, max_size, keep in wanted:
            try:
                if await asyncio.to_thread(rotate_if_needed, path, max_size, keep):
                    log.info("rotated %s (larger than %d bytes; keeping %d)", path, max_size, keep)
            except OSError as exc:
                log.error("cannot rotate %s: %s", path, exc)
        for pkg, h in a.held.items():
            for step in h.runner.services:
                pid = step.supervisor.pid
                if pid is not None and truncate_removed(pid, h.spec.log_max_size):
                    log.warning(
                        "package %s: service %s writes to a removed log (larger than %d "
                        "bytes): truncated it; it writes to the new %s.log once restarted",
                        pkg,
                        step.spec.name,
                        h.spec.log_max_size,
                        pkg,
                    )
