"""The agent of one node: lease, watch, reconcile, and the packages it holds.

Loop: every store change (and every finished operation) triggers one reconcile:
read one snapshot → ``decide`` (pure) → carry out the decisions for packages that
are not busy. Each decision is logged as one line with its reason.

Safety rules kept here:
- a package is started only after this node created its owner key, bound to the
  node lease, in a transaction requiring the key to be absent;
- every status write is fenced on the owner key's revision: losing the key
  (lease expired) means losing the right to write, and the package is killed;
- if the lease cannot be renewed before it could expire elsewhere, the node kills
  every package process (self-fencing) and rejoins when the store is back;
- on etcd the agents also expire a silent peer's lease themselves, from its
  heartbeats (agent/reaper.py), since a new etcd leader extends every lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vigil.agent.batcher import TxnBatcher
from vigil.agent.controller import Controller
from vigil.agent.decide import (
    Decision,
    LocalPackage,
    Verb,
    after_start_failure,
    decide,
)
from vigil.agent.duties import default_duties, duty_loop, run_on_join
from vigil.agent.events import EventLog
from vigil.agent.hooks import HookRunner
from vigil.agent.lease import FENCE_AT, RENEW_EVERY, LeaseKeeper
from vigil.agent.package import (
    IP_TIMEOUT,
    AddressStep,
    Context,
    Outcome,
    PackageRunner,
    del_address,
)
from vigil.agent.reaper import HeartbeatClock, reap_silent_nodes
from vigil.config import ClusterSpec, PackageSpec
from vigil.errors import Compacted, LeaseNotFound, StoreError, UsageError
from vigil.keys import Keys
from vigil.model import (
    HaltReason,
    HeartbeatRecord,
    MemberRecord,
    MonitorStatus,
    NodeRecord,
    PackageState,
    PackageStatus,
    StartReason,
)
from vigil.snapshot import UNREADABLE, Snapshot, encode, read_snapshot
from vigil.store import Compare, Delete, EventType, Get, Op, Put, Store, WatchEvent
from vigil.supervise.command import run_captured
from vigil.supervise.containment import KILL_WAIT, Mode, NodeContainment, PackageScope
from vigil.supervise.monitor import MonitorVerdict
from vigil.supervise.sentinel import ProcessRegistry, cleanup_leftovers

log = logging.getLogger("vigil.agent")

RECONCILE_PACE_MAX = 0.2
RESYNC_EVERY = 1.0  # reconcile at least this often (a fraction of node_timeout)
# At most this many package starts run at once, and at most this many other package
# operations (halts, failure handling, restarts in place, ...): a burst of hundreds
# must not starve the loop that renews the lease. Halts and failure handling have
# slots of their own, so they never queue behind slow starts.
MAX_CONCURRENT_OPS = 16
STATUS_FLUSH_INTERVAL = 0.05
# TEST-ONLY: a deliberately broken build for the fault lab (lab/, docs/reliability.md),
# which must catch the double runs it causes. Never set it in production: with it the
# sentinel is never armed and self-fencing kills nothing.
TEST_DISABLE_FENCING = os.environ.get("VIGIL_TEST_DISABLE_FENCING") == "1"
# TEST-ONLY, the same kind: no cgroups, process groups only (as where cgroup v2 cannot
# be written), so that the lab's setsid'ed witness escapes and is caught double-running.
TEST_DISABLE_CONTAINMENT = os.environ.get("VIGIL_TEST_DISABLE_CONTAINMENT") == "1"
#: How long fence_command may run before it counts as failed.
FENCE_COMMAND_TIMEOUT = 60.0


@dataclass
class Held:
    """A package this node holds (its owner key is ours)."""

    spec: PackageSpec
    runner: PackageRunner
    owner_rev: int
    state: PackageState
    start_reason: StartReason
    previous_node: str | None
    halt_reason: HaltReason | None = None
    message: str = ""
    maintenance: bool = False
    cleared_generation: int = 0
    restart_generation: int = 0
    definition: str = ""  # spec.digest() of the definition this run started with
    node_left: bool = False  # halted because this agent is stopping (PackageStatus)
    degraded: bool = False
    since: float = field(default_factory=time.time)
    monitors: dict[str, MonitorStatus] = field(default_factory=dict)
    package_restarts: list[float] = field(default_factory=list)
    busy: asyncio.Task[None] | None = None
    # what a failure asked for while ``busy`` (a service that died at once, while its
    # start was still finishing): carried out as soon as that operation ends
    deferred: Coroutine[Any, Any, None] | None = None

    def local(self) -> LocalPackage:
        return LocalPackage(
            self.state, self.maintenance, self.cleared_generation, self.restart_generation
        )


_LEAVE_ALONE = {Verb.MAINTENANCE_ON: PackageState.MAINTENANCE, Verb.DETACH: PackageState.DETACHED}


class Agent:
    def __init__(
        self,
        store: Store,
        cluster: ClusterSpec,
        node: str,
        *,
        state_dir: Path,
        config_dir: str | None = None,
        lease_store: Store | None = None,
        cgroup_root: Path | None = None,
    ) -> None:
        self.store = store
        # The lease is renewed through its own store client (its own connection and,
        # for SQLite, its own thread) so that a renewal never waits behind a burst of
        # package work queued on the main client; on etcd that client gives up on a
        # member after one renewal interval (see daemon.py). Grants and revokes, which
        # go through raft, use the main client and its longer timeout.
        self.lease_store = lease_store or store
        self.cluster = cluster
        self.node = node
        self.keys = Keys(cluster.name)
        self.state_dir = state_dir
        self.config_dir = config_dir
        self.log_dir = state_dir / "log"
        self.cgroup_root = cgroup_root
        self.containment: NodeContainment | None = None
        self.registry: ProcessRegistry | None = None
        self.lease = 0
        # peer expiry (agent/reaper.py): where the store may keep a lease alive past its
        # TTL, every renewal also writes the heartbeat key created at join (revision)
        self.peer_expiry = store.leases_extended_on_election
        self._heartbeat_created = 0
        self._heartbeats = 0
        # the peers' heartbeats as this agent saw them: kept across a fence and rejoin
        # (what was seen stays true), so that a peer lost in the same event that
        # fenced this node is not given a whole new ttl from the rejoin
        self.beats = HeartbeatClock(self.keys.heartbeat(node), min_ttl=cluster.node_timeout)
        self.held: dict[str, Held] = {}
        self.snapshot: Snapshot | None = None
        self._reconciled_at = -1  # the store revision the last reconcile read
        self._trigger = asyncio.Event()
        self._dirty: set[str] = set()
        self._dirty_event = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False
        self._fenced = asyncio.Event()
        self.left_cluster = False  # set by fence_node: the agent exits instead of rejoining
        self._problems: set[str] = set()  # unreadable store records logged already
        self._claiming: set[str] = set()  # packages whose START is between decision and claim
        self._claim_tasks: dict[str, asyncio.Task[None]] = {}
        self._start_slots = asyncio.Semaphore(MAX_CONCURRENT_OPS)
        self._other_slots = asyncio.Semaphore(MAX_CONCURRENT_OPS)  # never behind starts
        self.controller = Controller(
            store, self.keys, node, cluster.node_timeout, replan=self._trigger.set
        )
        self._background: set[asyncio.Task[None]] = set()  # see _abandon
        # claims, status writes and releases of concurrent package operations are
        # joined into fewer store transactions (see agent/batcher.py)
        self.batcher = TxnBatcher(store)
        self.events = EventLog(store, self.keys, node)
        self.hooks = HookRunner(self)
        self.duties = [self.hooks, *default_duties(self)]

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        state_file = self.state_dir / "processes.json"
        # These may wait (for the lock, for killed processes to go): not on the loop.
        containment = await asyncio.to_thread(self._open_containment)
        killed = await asyncio.to_thread(cleanup_leftovers, state_file)
        if killed:
            log.warning("killed %d leftover process group(s) of a previous agent", len(killed))
        found = await asyncio.to_thread(containment.cleanup_leftovers)
        if found:
            log.warning("killed %d leftover process(es) in this node's cgroups", found)
        self.registry = ProcessRegistry.start(
            state_file, log_path=self.log_dir / "sentinel.log", containment=containment
        )
        try:
            while not stop.is_set():
                await self._join()
                self._fenced.clear()
                self._tasks = [
                    asyncio.create_task(self._keepalive(), name="keepalive"),
                    asyncio.create_task(self._watch(), name="watch"),
                    asyncio.create_task(self._reconcile_loop(), name="reconcile"),
                    asyncio.create_task(self._flush_loop(), name="flush"),
                    asyncio.create_task(duty_loop(self, self.duties), name="duties"),
                ]
                if self.peer_expiry:
                    every = self.cluster.node_timeout * RENEW_EVERY / 2
                    reaper = reap_silent_nodes(self.store, self.keys, self.beats, every)
                    self._tasks.append(asyncio.create_task(reaper, name="reaper"))
                stopped = asyncio.create_task(stop.wait())
                fenced = asyncio.create_task(self._fenced.wait())
                done, _ = await asyncio.wait(
                    [stopped, fenced, *self._tasks], return_when=asyncio.FIRST_COMPLETED
                )
                for t in (stopped, fenced):
                    t.cancel()
                for t in done:
                    if t in self._tasks and not t.cancelled() and t.exception():
                        # Nothing is watching this node's packages any more: fence (kill
                        # them) before the lease goes, or they would run twice.
                        self._fence(f"agent task {t.get_name()} died: {t.exception()!r}")
                if self._fenced.is_set() and self.left_cluster:
                    await self._cancel_tasks()
                    return
                if self._fenced.is_set() and not stop.is_set():
                    await self._cancel_tasks()
                    # Everything was killed: once it is gone, give the lease up at once
                    # (if it is still alive) so other nodes need not wait for it to expire.
                    if await self._fence_settled():
                        await self._give_up_lease()
                    await self._wait_for_store()
                    continue
                break
            await self._shutdown()
        finally:
            await self._cancel_tasks()
            if self.registry is not None:
                self.registry.close()

    def _open_containment(self) -> NodeContainment:
        """cgroup v2 for this node's packages, or process groups (said once, here)."""
        try:
            c = NodeContainment.open(
                self.cluster.name,
                self.node,
                state_dir=self.state_dir,
                root=self.cgroup_root,
                disabled=TEST_DISABLE_CONTAINMENT,
            )
        except Exception as exc:  # NodeLocked, ContainmentError, an unusable state dir
            raise UsageError(str(exc)) from None
        if c.mode is Mode.CGROUP:
            log.info("containment: %s", c.describe())
        else:
            log.warning("containment: %s", c.describe())
        self.containment = c
        return c

    async def _join(self) -> None:
        ttl = self.cluster.node_timeout
        mode = self.containment.mode.value if self.containment is not None else "process-group"
        record = encode(NodeRecord(name=self.node, pid=os.getpid(), containment=mode))
        member = Put(self.keys.member(self.node), encode(MemberRecord(name=self.node)))
        ops: list[Op] = [member]
        deadline = time.monotonic() + 2 * ttl + 1
        granted = time.monotonic()
        self.lease = await self.store.lease_grant(ttl)
        self._arm(granted)
        if self.peer_expiry:
            self._heartbeats = 0
            beat = encode(HeartbeatRecord(ttl=ttl, seq=0))
            hb = self.keys.heartbeat(self.node)
            ops += [Put(hb, beat, lease=self.lease), Get(hb)]  # its create revision
        while True:
            key = self.keys.node(self.node)
            res = await self.store.txn(
                [Compare.absent(key)], [Put(key, record, lease=self.lease), *ops], []
            )
            if res.succeeded:
                found = res.responses[-1]
                if self.peer_expiry and isinstance(found, list) and found:
                    self._heartbeat_created = found[0].create_revision
                break
            if time.monotonic() > deadline:
                await self.store.lease_revoke(self.lease)
                raise UsageError(
                    f"node {self.node} is already up in cluster {self.cluster.name} "
                    "(another vigild with this --node is running)"
                )
            # a previous incarnation's lease has not expired yet; keep ours alive meanwhile
            sent = time.monotonic()
            await self.lease_store.lease_keepalive(self.lease)
            self._arm(sent)
            await asyncio.sleep(0.1)
        log.info("node %s joined cluster %s (lease %x)", self.node, self.cluster.name, self.lease)
        if self.registry is not None:
            self.registry.set_lease(self.lease, self.cluster.store)
        await self._adopt_stale_statuses()
        await run_on_join(self.duties)

    async def _adopt_stale_statuses(self) -> None:
        """Packages that ran here before a crash or fence and whose owner key is gone."""
        snap = await read_snapshot(self.store, self.keys)
        for pkg, st in snap.status.items():
            if st.node == self.node and pkg not in snap.owners and pkg not in self.held:
                if st.state in (
                    PackageState.FAILED,
                    PackageState.HALTED,
                    PackageState.HALT_FAILED,  # blocked until an operator clears it
                ):
                    continue
                new = st.model_copy(
                    update={
                        "state": PackageState.HALTED,
                        "halt_reason": HaltReason.FAILURE,
                        "message": "the agent on this node stopped; its processes were killed",
                        "since": time.time(),
                        "services": {},
                        "monitors": {},
                    }
                )
                await self.store.txn(
                    [Compare.absent(self.keys.owner(pkg))],
                    [Put(self.keys.status(pkg), encode(new)), self.events.op(pkg, st.state, new)],
                )

    async def _wait_for_store(self) -> None:
        while True:
            try:
                await self.store.get(self.keys.config_cluster)
                return
            except StoreError as exc:
                log.warning("store still unreachable: %s", exc)
                await asyncio.sleep(self.cluster.node_timeout / 3)

    async def _cancel_tasks(self) -> None:
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []

    async def _shutdown(self) -> None:
        """vigild was asked to stop: halt what runs here, then leave the cluster.

        Reconciling stops first, so nothing is started again while packages halt; the
        lease is kept alive (and status written) until every halt has finished.
        """
        self._stopping = True
        for t in self._tasks:
            if t.get_name() in ("watch", "reconcile"):
                t.cancel()
        with contextlib.suppress(StoreError):
            await self.controller.resign()
        for h in list(self.held.values()):  # awaiting lets operations finish and release
            if h.busy is not None:
                with contextlib.suppress(Exception):
                    await h.busy
        for pkg in list(self.held):
            h = self.held[pkg]
            if h.state in (
                PackageState.RUNNING,
                PackageState.MAINTENANCE,
                PackageState.DETACHED,
            ):
                h.node_left = True
                await self._halt(pkg, HaltReason.USER_HALT, "node agent stopping")
        await self._flush_dirty()
        await self._give_up_lease()
        log.info("node %s left cluster %s", self.node, self.cluster.name)

    # ------------------------------------------------------------------ lease

    def _arm(self, renewed_at: float) -> None:
        """The lease was renewed by a request sent at ``renewed_at``: it cannot expire
        before renewed_at + ttl. The sentinel kills every package process if no newer
        renewal is reported by FENCE_AT of that (even if this agent is stopped);
        see agent/lease.py for the timing rules."""
        if self.registry is not None and not TEST_DISABLE_FENCING:
            self.registry.arm(renewed_at + self.cluster.node_timeout * FENCE_AT)

    async def _keepalive(self) -> None:
        ttl = self.cluster.node_timeout
        keeper = LeaseKeeper(
            self.lease_store,
            self.lease,
            ttl,
            arm=self._arm,
            stalled=self._deadline_passed,
            heartbeat=(lambda: self._heartbeat(ttl)) if self.peer_expiry else None,
        )
        self._fence(await keeper.renew_until_lost())

    async def _heartbeat(self, ttl: float) -> None:
        """Write this node's heartbeat (agent/reaper.py): only over the key this node
        created when it joined; if a peer deleted it, the lease is as good as gone."""
        self._heartbeats += 1
        key = self.keys.heartbeat(self.node)
        res = await self.lease_store.txn(
            [Compare(key, "create", "==", self._heartbeat_created)],
            [Put(key, encode(HeartbeatRecord(ttl=ttl, seq=self._heartbeats)), lease=self.lease)],
        )
        if not res.succeeded:
            raise LeaseNotFound(
                "this node's heartbeat key was deleted or replaced (by a peer that saw no "
                "heartbeat from it for its ttl, or by hand)"
            )

    def _deadline_passed(self) -> bool:
        """True once the sentinel's lease deadline passed: it has killed (or is killing)
        every package process, so this node must fence and rejoin, not fail over."""
        return self.registry is not None and not self.registry.may_spawn()

    def _fence(self, why: str) -> None:
        """Self-fencing: kill every package process now, forget what we held."""
        if self._fenced.is_set():
            return
        log.error("FENCING node %s: %s; killing every package process", self.node, why)
        for task in self._claim_tasks.values():
            task.cancel()  # a start whose claim is in flight must not go on
        self._claim_tasks.clear()
        # A claim task cancelled before it ran never reaches its own cleanup: forget
        # every claim here, or the package would be skipped on this node for good.
        self._claiming.clear()
        if self.registry is not None and not TEST_DISABLE_FENCING:
            self.registry.kill_all()  # the node's cgroups and every known group
            self._in_background(self._drop_addresses())
        for h in self.held.values():
            self._abandon(h)
        self.held.clear()
        self._dirty.clear()
        self._fenced.set()

    def _abandon(self, h: Held) -> None:
        """Stop supervising a package this node no longer holds (fenced, or its owner
        key lost): no service restart and no monitor check, now or after the node has
        rejoined. ``kill_all`` stops the supervisors of the groups it kills, but not
        that of a service whose process was already gone (killed by the sentinel while
        the agent was stopped, or waiting out its restart_delay): that supervisor would
        restart it here, once this node rejoined, while another node runs the package."""
        if h.deferred is not None:
            h.deferred.close()
            h.deferred = None
        if h.busy is not None and h.busy is not asyncio.current_task():
            h.busy.cancel()
        if not TEST_DISABLE_FENCING:
            scope = h.runner.ctx.scope
            scope.kill_now()
            self._in_background(self._remove_when_empty(scope))
            for step in h.runner.steps:
                if isinstance(step, AddressStep):
                    self._in_background(step.abandon())
        for step in h.runner.services:
            self._in_background(step.supervisor.stop())
        for monitor in h.runner.monitors.values():
            self._in_background(monitor.stop())

    @staticmethod
    async def _remove_when_empty(scope: PackageScope) -> None:
        if await scope.wait_empty(KILL_WAIT):
            scope.remove()

    async def _drop_addresses(self) -> None:
        """Fencing: remove every relocatable address this node has up, concurrently,
        without blocking the loop (each ``ip`` with a timeout)."""
        reg = self.registry
        if reg is None:
            return
        addrs = sorted(reg.addresses())
        results = await asyncio.gather(*(del_address(reg, ip, dev) for ip, dev in addrs))
        for (ip, dev), ok in zip(addrs, results, strict=True):
            if ok:
                log.warning("fencing: removed address %s on %s", ip, dev)

    async def _fence_settled(self, timeout: float = IP_TIMEOUT + 1) -> bool:
        """After a fence: wait (up to about ``timeout`` + KILL_WAIT s) until the
        addresses are removed and the node's cgroups are empty. True if nothing of a
        package is left, so the lease may go now."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout)
        if self.registry is not None and self.registry.addresses():
            return False
        c = self.containment
        if c is not None and c.packages_cgroup is not None:
            return await c.packages_cgroup.wait_empty(KILL_WAIT)
        return True

    async def _give_up_lease(self) -> None:
        """Revoke the node's lease (the node leaves at once); the sentinel need not."""
        with contextlib.suppress(StoreError):
            await self.store.lease_revoke(self.lease)
        if self.registry is not None:
            self.registry.clear_lease()

    def _in_background(self, coro: Coroutine[Any, Any, Any]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception:
                log.exception("stopping the supervision of an abandoned package failed")

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ watch & reconcile

    async def _watch(self) -> None:
        _, rev = await self.store.range(self.keys.config_cluster)
        self._trigger.set()
        seen: dict[str, tuple[object, ...]] = {}
        while True:
            try:
                async for ev in self.store.watch(self.keys.root, rev):
                    rev = ev.revision
                    if ev.key.startswith(self.keys.heartbeats):
                        self._saw_heartbeat(ev)
                        continue
                    if self._matters(ev.key, ev.value, seen):
                        self._trigger.set()
            except Compacted:
                _, rev = await self.store.range(self.keys.config_cluster)
                seen.clear()
                self._trigger.set()
            except StoreError as exc:
                # The keepalive decides about fencing; the watch just resumes from the
                # last event it saw once the store answers again.
                log.warning("watch interrupted (%s); resuming from revision %d", exc, rev)
                await asyncio.sleep(self.cluster.node_timeout / 6)
                self._trigger.set()

    def _saw_heartbeat(self, ev: WatchEvent) -> None:
        """A peer's heartbeat write, as it was committed (agent/reaper.py)."""
        if ev.type is EventType.PUT:
            self.beats.saw(ev.key, ev.revision, ev.lease, ev.value, time.monotonic())
        else:
            self.beats.forget(ev.key)

    def _matters(self, key: str, value: bytes, seen: dict[str, tuple[object, ...]]) -> bool:
        """Whether a store change can change a decision. Events never do; a status
        write only when the state, node or degraded flag changed (service restart
        counts and monitor details are for operators)."""
        if key.startswith(self.keys.events):
            return False
        if key.startswith(self.keys.statuses) and value:
            try:
                st = PackageStatus.model_validate_json(value, strict=True)
            except ValueError:
                # another writer left the status of a package this node holds
                # unreadable: this node, its writer, writes it again
                if self.keys.leaf(key) in self.held:
                    self._mark_dirty(self.keys.leaf(key))
                return True
            summary: tuple[object, ...] = (st.state, st.node)
            if seen.get(key) == summary:
                return False
            seen[key] = summary
        return True

    async def _reconcile_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Every store change triggers a reconcile, and so does node_timeout without
            # one if the store has changed since the last: a watch can go silent without
            # breaking (an etcd member that hangs or is cut off keeps its connection
            # open), and an assignment must not wait for the watch to notice.
            resync = False
            try:
                async with asyncio.timeout(self.cluster.node_timeout * RESYNC_EVERY):
                    await self._trigger.wait()
            except TimeoutError:
                resync = True
            # a trigger set just as the timeout ran out (a controller timer, say) is a
            # reason to reconcile, whether or not the store changed
            resync = resync and not self._trigger.is_set()
            self._trigger.clear()
            if resync and await self._store_unchanged():
                continue
            started = loop.time()
            try:
                await self.reconcile()
            except StoreError as exc:
                # The keepalive decides about fencing; reconciling just tries again
                # once the store answers (another endpoint, etcd back in quorum).
                log.warning("reconcile: %s; trying again", exc)
                await asyncio.sleep(self.cluster.node_timeout / 6)
                self._trigger.set()
                continue
            # Pace reconciles under a burst of changes: each one reads and plans the
            # whole cluster, so leave the loop at least as much time for everything else
            # (starting processes, renewing the lease) as the reconcile took.
            await asyncio.sleep(min(RECONCILE_PACE_MAX, loop.time() - started))

    async def _store_unchanged(self) -> bool:
        """No write reached the store since the last reconcile read it (one small
        read instead of a whole snapshot; on a shared etcd, other clusters' writes
        count as changes)."""
        try:
            _, revision = await self.store.range(self.keys.controller)
        except StoreError:
            return False  # the reconcile will say what is wrong
        return revision == self._reconciled_at

    async def reconcile(self) -> None:
        if self._stopping:
            return
        snap = await read_snapshot(self.store, self.keys)
        read_at = snap.revision  # the owners in snap are as of this revision
        self._reconciled_at = read_at
        self._log_problems(snap)
        if snap.controller == UNREADABLE:
            # no agent is the controller an unreadable leader key names: remove that key
            # (only that very key) so that the role can be taken again
            key = self.keys.controller
            await self.store.txn(
                [Compare(key, "create", "==", snap.controller_revision)], [Delete(key)]
            )
            self._trigger.set()
            return
        if not snap.config_readable:
            # a package missing from a configuration that cannot be read in full is not
            # "removed": decide nothing (ownership still holds) until apply rewrites it
            self._check_ownership(snap, read_at)
            return
        snap = await self.controller.step(snap, self.lease)
        self.snapshot = snap
        self._check_ownership(snap, read_at)
        local = {p: h.local() for p, h in self.held.items()}
        for d in decide(snap, self.node, local):
            held = self.held.get(d.package)
            if held is not None and held.busy is not None:
                continue
            if d.verb is Verb.WAIT or d.package in self._claiming:
                continue
            if d.verb is Verb.START:
                self._claiming.add(d.package)
            log.info("package %s: %s (%s)", d.package, d.verb.value, d.reason)
            task = self._launch(d.package, self._carry_out(d, snap), start=d.verb is Verb.START)
            if d.verb is Verb.START:
                self._claim_tasks[d.package] = task

    def _log_problems(self, snap: Snapshot) -> None:
        """Log each unreadable store record once (and once more when it is gone)."""
        now = set(snap.problems)
        for problem in sorted(now - self._problems):
            log.warning("unreadable store record, skipped: %s", problem)
        for problem in sorted(self._problems - now):
            log.info("store record readable again: %s", problem.partition(": ")[0])
        if now and not snap.config_readable and self._problems == set():
            log.warning("the configuration in the store cannot be read in full: acting on "
                        "nothing until `vigil apply` writes it again")  # fmt: skip
        self._problems = now

    def _check_ownership(self, snap: Snapshot, read_at: int) -> None:
        for pkg, h in list(self.held.items()):
            if h.owner_rev > read_at:
                # claimed by one of our own tasks while this snapshot was being read (or
                # while the controller wrote its plan): the snapshot cannot know it yet
                continue
            if snap.owners.get(pkg) != self.node or snap.owner_revisions.get(pkg) != h.owner_rev:
                log.error("package %s: lost its owner key; killing its processes", pkg)
                if self.registry is not None:
                    self.registry.kill_all(only=self._pgids_of(h))
                self._abandon(h)  # and its cgroup
                del self.held[pkg]

    def _pgids_of(self, h: Held) -> set[int]:
        return {s.supervisor.pid for s in h.runner.services if s.supervisor.pid is not None}

    def _launch(
        self, pkg: str, coro: Coroutine[Any, Any, None], *, start: bool = False
    ) -> asyncio.Task[None]:
        slots = self._start_slots if start else self._other_slots
        task = asyncio.create_task(self._guard(pkg, coro, slots), name=f"pkg-{pkg}")
        # a task cancelled before it started never awaits ``coro``: close it then
        task.add_done_callback(lambda _t: coro.close())
        held = self.held.get(pkg)
        if held is not None:
            held.busy = task
        return task

    async def _guard(
        self, pkg: str, coro: Coroutine[Any, Any, None], slots: asyncio.Semaphore
    ) -> None:
        try:
            async with slots:
                await coro
        except asyncio.CancelledError:
            raise
        except StoreError as exc:
            log.error("package %s: store error: %s", pkg, exc)
        except Exception:
            log.exception("package %s: operation failed unexpectedly", pkg)
        finally:
            held = self.held.get(pkg)
            if held is not None and held.busy is asyncio.current_task():
                held.busy = None
                deferred, held.deferred = held.deferred, None
                if deferred is not None and not self._stopping:
                    self._launch(pkg, deferred)
                elif deferred is not None:
                    deferred.close()
            self._trigger.set()

    async def _carry_out(self, d: Decision, snap: Snapshot) -> None:
        if d.verb is Verb.START:
            assert d.start_reason is not None
            await self._start(d.package, d.start_reason, snap)
        elif d.verb is Verb.HALT:
            await self._halt(d.package, d.halt_reason or HaltReason.USER_HALT, d.reason)
        elif d.verb is Verb.CLEAR:
            await self._clear(d.package, snap)
        elif d.verb is Verb.RELEASE:
            await self._release(d.package, PackageState.HALTED, d.reason)
        elif d.verb in _LEAVE_ALONE:
            await self._leave_alone(d.package, _LEAVE_ALONE[d.verb], d.reason)
        elif d.verb in (Verb.MAINTENANCE_OFF, Verb.ATTACH):
            await self._leave_alone(d.package, None, d.reason)
        elif d.verb is Verb.RESTART:
            await self._operator_restart(d.package, d.reason, snap)

    async def _leave_alone(self, pkg: str, state: PackageState | None, why: str) -> None:
        """Maintenance and detach (``state``) stop monitoring and failure handling;
        ``state=None`` resumes them and the package is running again."""
        h = self.held[pkg]
        h.maintenance = state is not None
        if state is not None:
            await h.runner.pause_monitors()
        else:
            await h.runner.resume_monitors()
        await self._set_state(pkg, state or PackageState.RUNNING, why)

    # ------------------------------------------------------------------ operations

    def _context(self, spec: PackageSpec, reason: StartReason, prev: str | None) -> Context:
        assert self.registry is not None
        return Context(
            cluster=self.cluster,
            spec=spec,
            node=self.node,
            log_path=self.log_dir / f"{spec.name}.log",
            registry=self.registry,
            config_dir=self.config_dir,
            scope=self.containment.package(spec.name)
            if self.containment is not None
            else PackageScope(spec.name, None),
            start_reason=reason,
            previous_node=prev,
        )

    def _runner(self, spec: PackageSpec, reason: StartReason, prev: str | None) -> PackageRunner:
        """A runner for one start of ``spec``: built anew for every start (a restart in
        place too), so that each start runs the applied definition and tells its
        scripts and services its own start reason."""
        pkg = spec.name
        return PackageRunner(
            self._context(spec, reason, prev),
            on_change=lambda: self._mark_dirty(pkg),
            on_service_failed=lambda svc, why: self._on_service_failed(pkg, svc, why),
            on_monitor=lambda name, v: self._on_monitor(pkg, name, v),
        )

    async def _start(self, pkg: str, reason: StartReason, snap: Snapshot) -> None:
        try:
            await self._claim_and_start(pkg, reason, snap)
        finally:
            self._claiming.discard(pkg)
            if self._claim_tasks.get(pkg) is asyncio.current_task():
                del self._claim_tasks[pkg]

    async def _claim_and_start(self, pkg: str, reason: StartReason, snap: Snapshot) -> None:
        spec = snap.packages[pkg]
        old = snap.status_of(pkg)
        runner = self._runner(spec, reason, old.node)
        admin = snap.admin_of(pkg)
        definition = spec.digest()
        status = PackageStatus(
            state=PackageState.STARTING,
            node=self.node,
            start_reason=reason,
            previous_node=old.node,
            message=f"starting ({reason.value})",
            definition=definition,
            restart_generation=admin.restart_generation,
        )
        owner_key = self.keys.owner(pkg)
        res = await self.batcher.txn(
            [Compare.absent(owner_key), Compare.exists(self.keys.node(self.node))],
            [
                Put(owner_key, self.node.encode(), lease=self.lease),
                Put(self.keys.status(pkg), encode(status)),
                self.events.op(pkg, old.state, status, reason.value),
            ],
        )
        if not res.succeeded:
            log.info("package %s: another node claimed it first", pkg)
            return
        held = Held(
            spec=spec,
            runner=runner,
            owner_rev=res.revision,
            state=PackageState.STARTING,
            start_reason=reason,
            previous_node=old.node,
            cleared_generation=admin.clear_generation,
            restart_generation=admin.restart_generation,
            definition=definition,
            package_restarts=[],
        )
        held.busy = asyncio.current_task()
        self.held[pkg] = held
        await self._run_start(pkg, held, snap)

    async def _run_start(self, pkg: str, held: Held, snap: Snapshot) -> None:
        async with self.hooks.around("restore", pkg, held.runner.ctx.scope.run()):
            result = await held.runner.start()
        if self._deadline_passed():
            self._fence(f"package {pkg}: start interrupted, the lease deadline passed")
            return
        if result.outcome is Outcome.OK:
            await self._set_state(pkg, PackageState.RUNNING, f"started ({held.start_reason.value})")
            if snap.admin_of(pkg).start_node == self.node:
                await self._done_with_start_node(pkg)
            return
        held.halt_reason = HaltReason.FAILURE
        if held.runner.done > 0:  # undo did not finish: processes may be left
            await self._halt_failed(pkg, f"{result.detail}")
            return
        await self._after_failure(pkg, result.outcome is Outcome.FAILOVER, result.detail)

    async def _done_with_start_node(self, pkg: str) -> None:
        """``package start/move -n NODE`` is one-shot: once running there, forget it, so
        that failover and failback work as usual afterwards."""
        for _ in range(5):
            snap = await read_snapshot(self.store, self.keys)
            admin = snap.admin_of(pkg)
            if admin.start_node != self.node:
                return
            key = self.keys.admin(pkg)
            res = await self.store.txn(
                [Compare.mod_revision(key, snap.raw_revisions.get(key, 0))],
                [Put(key, encode(admin.model_copy(update={"start_node": None})))],
            )
            if res.succeeded:
                return

    async def _after_failure(self, pkg: str, failover: bool, detail: str) -> None:
        snap = await read_snapshot(self.store, self.keys)
        held = self.held[pkg]
        admin = snap.admin_of(pkg)
        after = after_start_failure(held.spec, admin, snap, self.node, failover, time.time())
        admin_key = self.keys.admin(pkg)
        admin_rev = snap.raw_revisions.get(admin_key, 0)
        extra: list[Op] = [Put(admin_key, encode(after.admin))]
        compares = [Compare.mod_revision(admin_key, admin_rev)]
        ok = await self._release(
            pkg, after.state, f"{detail}; {after.reason}", extra=extra, compares=compares
        )
        if not ok:  # the admin record changed under us: decide again with fresh data
            snap = await read_snapshot(self.store, self.keys)
            after = after_start_failure(
                held.spec, snap.admin_of(pkg), snap, self.node, failover, time.time()
            )
            await self._release(
                pkg,
                after.state,
                f"{detail}; {after.reason}",
                extra=[Put(admin_key, encode(after.admin))],
            )

    async def _halt(self, pkg: str, reason: HaltReason, why: str) -> bool:
        held = self.held[pkg]
        held.busy = held.busy or asyncio.current_task()
        held.halt_reason = reason
        held.runner.ctx.halt_reason = reason
        await self._set_state(pkg, PackageState.HALTING, why)
        async with self.hooks.around("remove", pkg, held.runner.ctx.scope.run()):
            ok = await held.runner.halt()
        if not ok:
            await self._halt_failed(pkg, f"{held.runner.problem} while halting ({why})")
            return False
        held.runner.ctx.scope.remove()  # the post_remove hooks ran in it
        await self._release(pkg, PackageState.HALTED, why)
        return True

    async def _halt_failed(self, pkg: str, why: str) -> None:
        held = self.held[pkg]
        if held.spec.node_fail_fast:
            await self._set_state(pkg, PackageState.HALT_FAILED, why + "; node_fail_fast: fencing")
            await self.fence_node(f"package {pkg}: {why}")
            return
        await self._set_state(pkg, PackageState.HALT_FAILED, why + "; blocked until cleared")

    async def _clear(self, pkg: str, snap: Snapshot) -> None:
        held = self.held[pkg]
        held.cleared_generation = snap.admin_of(pkg).clear_generation
        held.runner.done = 0  # an operator vouches that nothing is left running
        await self._release(pkg, PackageState.HALTED, "cleared by an operator")

    async def _release(
        self,
        pkg: str,
        state: PackageState,
        why: str,
        *,
        extra: list[Op] | None = None,
        compares: list[Compare] | None = None,
    ) -> bool:
        """Write the final status and give the owner key back, in one fenced txn."""
        held = self.held[pkg]
        old = held.state
        held.state = state
        held.message = why
        held.since = time.time()
        status = self._status(pkg, held)
        status = status.model_copy(update={"services": {}, "monitors": {}, "degraded": False})
        res = await self.batcher.txn(
            [Compare.mod_revision(self.keys.owner(pkg), held.owner_rev), *(compares or [])],
            [
                Delete(self.keys.owner(pkg)),
                Put(self.keys.status(pkg), encode(status)),
                self.events.op(pkg, old, status, why),
                *(extra or []),
            ],
        )
        if res.succeeded or not compares:
            gone = self.held.pop(pkg, None)
            if gone is not None and gone.deferred is not None:
                gone.deferred.close()  # a failure of what just halted: nothing left to do
                gone.deferred = None
            self._dirty.discard(pkg)
        return res.succeeded

    async def _set_state(self, pkg: str, state: PackageState, why: str) -> None:
        held = self.held.get(pkg)
        if held is None:
            return
        old = held.state
        held.state = state
        held.message = why
        held.since = time.time()
        log.info("package %s: %s -> %s (%s)", pkg, old.value, state.value, why)
        await self._write_status(pkg, held, event_from=old, why=why)

    def _status(self, pkg: str, held: Held) -> PackageStatus:
        return PackageStatus(
            state=held.state,
            node=self.node,
            halt_reason=held.halt_reason,
            start_reason=held.start_reason,
            previous_node=held.previous_node,
            degraded=held.degraded,
            message=held.message,
            since=held.since,
            restarts=len(held.package_restarts),
            definition=held.definition,
            node_left=held.node_left,
            restart_generation=held.restart_generation,
            services=held.runner.service_status(),
            monitors=held.runner.monitor_status(held.monitors),
        )

    async def _write_status(
        self, pkg: str, held: Held, *, event_from: PackageState | None = None, why: str = ""
    ) -> None:
        status = self._status(pkg, held)
        ops: list[Op] = [Put(self.keys.status(pkg), encode(status))]
        if event_from is not None:
            ops.append(self.events.op(pkg, event_from, status, why))
        res = await self.batcher.txn(
            [Compare.mod_revision(self.keys.owner(pkg), held.owner_rev)], ops
        )
        self._dirty.discard(pkg)
        if not res.succeeded:
            log.error("package %s: owner key lost; killing its processes", pkg)
            self._trigger.set()

    # ------------------------------------------------------------------ runtime failures

    def _mark_dirty(self, pkg: str) -> None:
        self._dirty.add(pkg)
        self._dirty_event.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._dirty_event.wait()
            self._dirty_event.clear()
            pending = set(self._dirty)
            try:
                await self._flush_dirty()
            except StoreError as exc:  # written again once the store answers
                log.warning("status flush: %s; trying again", exc)
                self._dirty |= {p for p in pending if p in self.held}
                self._dirty_event.set()
                await asyncio.sleep(self.cluster.node_timeout / 6)
            await asyncio.sleep(STATUS_FLUSH_INTERVAL)  # rate limit: crash loops are cheap

    async def _flush_dirty(self) -> None:
        for pkg in list(self._dirty):
            held = self.held.get(pkg)
            self._dirty.discard(pkg)
            if held is not None and held.state not in (PackageState.HALTED,):
                await self._write_status(pkg, held)

    def _on_service_failed(self, pkg: str, svc: str, why: str) -> None:
        held = self.held.get(pkg)
        if held is None or self._stopping:
            return
        if self._deadline_passed():
            self._fence(f"service {svc} of {pkg} died after the lease deadline passed")
            return
        if held.maintenance:
            log.warning(
                "package %s: service %s failed (%s); in maintenance, ignored", pkg, svc, why
            )
            self._mark_dirty(pkg)
            return
        spec = next(s for s in held.spec.service if s.name == svc)
        if spec.fail_fast:
            self._launch(pkg, self.fence_node(f"package {pkg}: service {svc} failed: {why}"))
            return
        log.error("package %s: service %s failed for good: %s", pkg, svc, why)
        self._launch_when_idle(pkg, self._fail(pkg, f"service {svc} failed: {why}"))

    def _on_monitor(self, pkg: str, name: str, v: MonitorVerdict) -> None:
        held = self.held.get(pkg)
        if held is None or held.maintenance:
            return
        held.monitors[name] = MonitorStatus(status=v.status, failures=v.failures)
        degraded = any(m.status == "degraded" for m in held.monitors.values())
        if degraded != held.degraded:
            held.degraded = degraded
            log.warning("package %s: %s", pkg, "degraded" if degraded else "no longer degraded")
        self._mark_dirty(pkg)
        if not v.act:
            return
        spec = next(m for m in held.spec.monitor if m.name == name)
        why = f"monitor {name} failed {v.failures} times"
        if spec.action == "log":
            log.error("package %s: %s (action log)", pkg, why)
            return
        if spec.action == "restart":
            now = time.monotonic()
            window = held.spec.restart_window
            held.package_restarts = [t for t in held.package_restarts if now - t < window]
            if len(held.package_restarts) < held.spec.restart_limit:
                held.package_restarts.append(now)
                self._launch_when_idle(pkg, self._restart_in_place(pkg, why))
                return
            why += f"; restart_limit {held.spec.restart_limit} reached"
        self._launch_when_idle(pkg, self._fail(pkg, why))

    def _launch_when_idle(self, pkg: str, coro: Coroutine[Any, Any, None]) -> None:
        """Carry ``coro`` out now, or, if an operation on the package is under way,
        as soon as it ends (the latest such request wins)."""
        held = self.held[pkg]
        if held.busy is not None:
            if held.deferred is not None:
                held.deferred.close()
            held.deferred = coro
            return
        self._launch(pkg, coro)

    async def _fail(self, pkg: str, why: str) -> None:
        held = self.held[pkg]
        held.halt_reason = HaltReason.FAILURE
        held.runner.ctx.halt_reason = HaltReason.FAILURE
        await self._set_state(pkg, PackageState.HALTING, why)
        if not await held.runner.halt():
            await self._halt_failed(pkg, f"{why}; then {held.runner.problem}")
            return
        await self._after_failure(pkg, True, why)

    async def _restart_in_place(
        self, pkg: str, why: str, reason: HaltReason = HaltReason.FAILURE
    ) -> None:
        """Halt and start again on this node (start reason ``restart``), with the
        definition applied now: the halt stops what the old one started."""
        held = self.held[pkg]
        held.halt_reason = reason
        held.runner.ctx.halt_reason = reason
        await self._set_state(pkg, PackageState.HALTING, f"{why}; restarting in place")
        if not await held.runner.halt():
            await self._halt_failed(pkg, f"{why}; {held.runner.problem}")
            return
        snap = await read_snapshot(self.store, self.keys)
        spec = snap.packages.get(pkg)
        if spec is None:  # removed from the configuration meanwhile: it stays halted
            await self._release(pkg, PackageState.HALTED, "removed from the configuration")
            return
        held.spec = spec
        held.definition = spec.digest()
        held.start_reason = StartReason.RESTART
        held.runner = self._runner(spec, StartReason.RESTART, held.previous_node)
        await self._set_state(pkg, PackageState.STARTING, "restart in place")
        await self._run_start(pkg, held, snap)

    async def _operator_restart(self, pkg: str, why: str, snap: Snapshot) -> None:
        """``vigil package restart``: a restart in place asked for by an operator."""
        self.held[pkg].restart_generation = snap.admin_of(pkg).restart_generation
        await self._restart_in_place(pkg, why, HaltReason.USER_HALT)

    async def fence_node(self, why: str) -> None:
        """node_fail_fast / service fail_fast: run fence_command (through the spawner,
        with a timeout), or kill all and leave."""
        log.error("node %s fences itself: %s", self.node, why)
        cmd = self.cluster.fence_command
        if cmd:
            res, out = await run_captured(cmd, timeout=FENCE_COMMAND_TIMEOUT)
            if res.exit_code != 0 or res.timed_out:
                log.error(
                    "fence_command %s: %s %s", cmd[0], res.describe(FENCE_COMMAND_TIMEOUT), out
                )
        if self.registry is not None:
            self.registry.kill_all()
            self._in_background(self._drop_addresses())
        for h in self.held.values():
            self._abandon(h)
        self.held.clear()
        if await self._fence_settled():
            await self._give_up_lease()
        self.left_cluster = True
        self._fenced.set()
