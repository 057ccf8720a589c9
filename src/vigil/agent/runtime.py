"""What one node's agent shares with its parts: the node runtime.

The agent builds one :class:`NodeRuntime` when it has opened its containment and
started its sentinel, and hands it to everything that acts for the node: package
operations, the fencer, the hook runner, the controller and the duties. None of
them imports the agent back, so imports go one way (``agent.node`` at the top).

The runtime itself is frozen. The two things that change while the agent runs are
cells inside it, each with one writer: the node lease (:class:`LeaseCell`, written
when the node joins) and the newest snapshot (:class:`Latest`, written by each
reconcile). Time is read only through :attr:`NodeRuntime.clock`, so that pure
decisions and unit tests can be given a clock of their own.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from vigil.agent.batcher import TxnBatcher
from vigil.agent.events import EventLog
from vigil.config import ClusterSpec
from vigil.keys import Keys
from vigil.snapshot import Snapshot
from vigil.store import Store
from vigil.supervise.sentinel import ProcessRegistry


class Clock(Protocol):
    """A source of time. ``monotonic()`` measures every time limit (seconds, never
    going back); ``wall()`` only stamps records shown to people (Unix seconds);
    ``sleep(s)`` waits ``s`` seconds of this clock."""

    def monotonic(self) -> float: ...

    def wall(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clocks: :func:`time.monotonic`, :func:`time.time`, :func:`asyncio.sleep`."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


@dataclass
class LeaseCell:
    """The node lease this agent holds now (0 before it joins). Written only by the
    agent's join; read by whoever binds a key to the lease or gives it up."""

    id: int = 0


@dataclass
class Latest:
    """The newest snapshot a reconcile acted on (None before the first). Written only
    by the reconcile; the duties and the hook runner read it."""

    snapshot: Snapshot | None = None


@dataclass(frozen=True)
class NodeRuntime:
    """One node's agent, as its parts see it.

    ``store`` carries every request but the lease renewals, which go through
    ``lease_store`` (its own client and connection: a renewal never waits behind a
    burst of package work). ``registry`` is the sentinel's client: every process a
    package, hook or cmdsync script starts is added to it, and it kills them all when
    the node fences. ``batcher`` joins concurrent small transactions; ``events`` writes
    the event log. ``log_dir`` is ``state_dir/log``; ``config_dir`` is told to scripts
    as ``VIGIL_CONFIG`` (None: not known).
    """

    store: Store
    lease_store: Store
    keys: Keys
    node: str
    cluster: ClusterSpec
    state_dir: Path
    config_dir: str | None
    registry: ProcessRegistry
    batcher: TxnBatcher
    events: EventLog
    clock: Clock = SYSTEM_CLOCK
    lease: LeaseCell = field(default_factory=LeaseCell)
    latest: Latest = field(default_factory=Latest)

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    @property
    def snapshot(self) -> Snapshot | None:
        """The newest snapshot acted on (see :class:`Latest`)."""
        return self.latest.snapshot
