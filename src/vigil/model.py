"""States, reasons and the runtime records kept in the store.

The configuration objects (PackageSpec, ServiceSpec, ...) live in ``vigil.config``;
this module holds what the agents and the CLI exchange through the store. Every
record is a frozen pydantic model so that what is read back from the store is
validated exactly like a config file: bad store contents give a clear error.
"""

from __future__ import annotations

import enum
import time

from pydantic import BaseModel, ConfigDict, Field


class NodeState(enum.StrEnum):
    UP = "up"
    DOWN = "down"
    HALTED = "halted"


class PackageState(enum.StrEnum):
    HALTED = "halted"
    STARTING = "starting"
    RUNNING = "running"
    HALTING = "halting"
    FAILED = "failed"
    HALT_FAILED = "halt_failed"
    START_WAIT = "start_wait"
    HALT_WAIT = "halt_wait"
    MAINTENANCE = "maintenance"
    DETACHED = "detached"


# States in which the package may have processes on its node: it must not start elsewhere.
ACTIVE_STATES = frozenset(
    {
        PackageState.STARTING,
        PackageState.RUNNING,
        PackageState.HALTING,
        PackageState.HALT_FAILED,
        PackageState.MAINTENANCE,
        PackageState.DETACHED,
    }
)


class StartReason(enum.StrEnum):
    BOOT = "boot"
    USER = "user"
    FAILOVER = "failover"
    FAILBACK = "failback"
    RESTART = "restart"


class HaltReason(enum.StrEnum):
    FAILURE = "failure"
    USER_HALT = "user_halt"
    AUTOMATIC_HALT = "automatic_halt"


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class NodeRecord(_Record):
    """``nodes/NAME``, bound to the node's lease: present while the node is up."""

    name: str
    pid: int
    started_at: float = Field(default_factory=time.time)
    version: str = "0.1.0"
    #: How the node contains its packages' processes: "cgroup" (cgroup v2) or
    #: "process-group" (cgroups cannot be written there; see docs/operations.md).
    containment: str = "process-group"


class HeartbeatRecord(_Record):
    """``heartbeat/NAME`` (etcd only), bound to the node's lease and written again with
    every renewal. Its writer kills its packages within ``ttl`` seconds of sending the
    last write that succeeded, so a peer that has seen no newer write for ``ttl``
    seconds may revoke the node's lease (agent/reaper.py). ``seq`` counts the writes."""

    ttl: float = Field(gt=0)
    seq: int = Field(ge=0)


class ServiceStatus(_Record):
    pid: int | None = None
    restarts: int = 0
    state: str = "stopped"


class MonitorStatus(_Record):
    status: str = "unknown"  # unknown | healthy | degraded | failing
    failures: int = 0


class PackageStatus(_Record):
    """``status/PKG``: what the package is doing, written by the node that acts on it."""

    state: PackageState = PackageState.HALTED
    node: str | None = None
    halt_reason: HaltReason | None = None
    start_reason: StartReason | None = None
    previous_node: str | None = None
    degraded: bool = False
    message: str = ""
    since: float = Field(default_factory=time.time)
    restarts: int = 0  # package restarts in place (monitor action `restart`)
    # which applied definition this run started with (PackageSpec.digest(); "" before
    # it started): `vigil status` shows "stale" while the applied one differs
    definition: str = ""
    #: Halted because its node's agent was stopping (SIGTERM): the package moves on as
    #: after ``vigil node halt --failover``, and its next start elsewhere is a failover.
    node_left: bool = False
    restart_generation: int = 0  # the operator restarts (AdminRecord) carried out
    services: dict[str, ServiceStatus] = Field(default_factory=dict)
    monitors: dict[str, MonitorStatus] = Field(default_factory=dict)


class AdminRecord(_Record):
    """``admin/PKG``: what operators asked for. Written only by the CLI.

    ``auto_run`` is global switching; ``disabled_nodes`` are the nodes whose node
    switching is off; ``failed_nodes`` are those of them that a failure turned off
    (node -> wall-clock time of the failure, for display and to tell one failure from
    the next: the controller measures ``failure_timeout`` with its own monotonic clock
    from when it first saw the entry); ``halt_requested`` asks the owning node to halt
    the package; ``clear_generation`` is bumped by ``vigil package clear`` and
    ``package start`` so that the node holding a failed / halt_failed package resets it
    once; ``restart_generation`` is bumped by ``vigil package restart``.
    """

    auto_run: bool = True
    disabled_nodes: tuple[str, ...] = ()
    failed_nodes: dict[str, float] = Field(default_factory=dict)
    halt_requested: bool = False
    maintenance: bool = False
    clear_generation: int = 0
    start_node: str | None = None
    restart_generation: int = 0

    def switching_on(self, node: str) -> AdminRecord:
        """Node switching for ``node`` on again (an operator, or its failure expired)."""
        return self.model_copy(
            update={
                "disabled_nodes": tuple(n for n in self.disabled_nodes if n != node),
                "failed_nodes": {n: t for n, t in self.failed_nodes.items() if n != node},
            }
        )


class Assignment(_Record):
    """``assign/PKG``: where the controller wants the package (``node`` None = halted).

    Written only by the controller, fenced on its leader key. Agents still check
    every precondition on fresh data before they start anything.
    """

    node: str | None
    reason: str = ""
    start_reason: StartReason | None = None
    halt_reason: HaltReason | None = None
    since: float = 0.0  # wall-clock time this placement was first decided


class MemberRecord(_Record):
    """``members/NODE``: a node that has joined the cluster at least once (no lease: it
    stays while the node is down, so ``vigil status`` shows it ``down``). Removed only
    by ``vigil node remove NODE``."""

    name: str
    joined_at: float = Field(default_factory=time.time)  # its last join (display only)


class NodeAdmin(_Record):
    """``nodeadmin/NODE``: an operator's ``vigil node halt`` (``halted``) and how."""

    halted: bool = False
    mode: str = "failover"  # failover | detach


class Event(_Record):
    """``events/...``: one state change, as shown by ``vigil events``."""

    time: float
    node: str | None
    package: str | None
    from_state: str | None
    to_state: str
    reason: str = ""


class FlagRecord(_Record):
    """``flags/NODE/FLAG``: a flag on NODE (CONCEPTS §5); the key holds its name."""

    created_at: float = Field(default_factory=time.time)
    by_node: str | None = None  # the node of the command that created it
    by_pid: int | None = None


class LockEntry(_Record):
    """``locks/admin/SEQ``: one holder or waiter of the cluster-wide admin lock.

    The entry with the lowest SEQ holds the lock; the others wait in SEQ order (FIFO).
    ``pid`` is the process the lock belongs to (the script that ran ``vigil lock
    acquire``, or the ``vigil`` command itself for apply/recover) on ``node``;
    ``pid_start`` (clock ticks since boot, /proc/PID/stat field 22) tells a reused PID
    from the original one.
    """

    id: str
    node: str
    pid: int
    pid_start: int | None = None
    pid_ns: str = ""  # /proc/PID/ns/pid of the process: PIDs mean something only there
    timestamp: int = Field(default_factory=lambda: int(time.time()))

    @property
    def flag(self) -> str:
        """How the holder shows among the flags: ``!action!PID!TIMESTAMP!NODE:ID``."""
        return f"!action!{self.pid:05d}!{self.timestamp}!{self.node}:{self.id}"


class CmdsyncEntry(_Record):
    """``cmdsync/DESCRIPTOR``: a resumable operator script (CONCEPTS §7).

    ``marker`` is the last point the script saved (-1: none yet). ``mode`` ``init``
    scripts resume from their marker; ``run`` scripts start over. ``launch`` asks the
    agent of ``node`` to (re)start the script there: set when its node went down.
    """

    descriptor: str
    script: str
    params: tuple[str, ...] = ()
    node: str
    marker: int = -1
    mode: str = "init"  # init | run
    pid: int | None = None
    launch: bool = False
    by_agent: bool = False  # the current run was started by the agent of ``node``
    reruns: int = 0
    created_at: float = Field(default_factory=time.time)


class WaitEdge(_Record):
    """``waits/PKG``: a script of PKG runs a ``--wait`` command on ``waits_for`` (§8)."""

    package: str
    waits_for: str
    node: str
    pid: int
    pid_ns: str = ""  # /proc/PID/ns/pid of the waiting command: its PID means something only there
    since: float = Field(default_factory=time.time)
