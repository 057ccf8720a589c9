"""The controller role: one agent at a time plans for the whole cluster.

The role is a leader key (``/vigil/CLUSTER/controller``) bound to the agent's node
lease and created only if absent, so it moves to another agent within about one
``node_timeout`` when its holder dies. The controller reads one snapshot, calls the
pure planner, and writes the assignments that changed in one transaction fenced on
the leader key's create revision: a deposed controller cannot write.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

from vigil.agent.timers import FailureClock, PlacementClock, earliest
from vigil.keys import Keys
from vigil.model import Assignment
from vigil.plan.planner import Plan, Verb, plan
from vigil.snapshot import Snapshot, encode, read_snapshot
from vigil.store import Compare, Delete, Op, Put, Store

log = logging.getLogger("vigil.controller")

MAX_OPS_PER_TXN = 100
TIMER_SLACK = 0.01  # a timer fires this much after its deadline, so that it has passed


def expected_nodes(snap: Snapshot) -> list[str]:
    """The nodes a forming cluster waits for: cluster.toml's ``nodes`` list, else every
    node named in a package's ``nodes`` list (``*`` names none)."""
    if snap.cluster is not None and snap.cluster.nodes:
        return sorted(snap.cluster.nodes)
    return sorted({n for spec in snap.packages.values() for n in spec.nodes if n != "*"})


class Controller:
    """``clock`` (monotonic) measures every time limit; ``wall`` only stamps records
    for display. Both are parameters so that tests can step them apart."""

    def __init__(
        self,
        store: Store,
        keys: Keys,
        node: str,
        node_timeout: float,
        replan: Callable[[], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.keys = keys
        self.node = node
        self.node_timeout = node_timeout
        self._replan = replan  # asks the agent for another reconcile
        self._clock = clock
        self._wall = wall
        self._since = clock()  # when this agent took the role (formation is counted from it)
        self._placements = PlacementClock()
        self._failures = FailureClock()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.wake_at: float | None = None  # the next deadline (monotonic), for tests

    async def step(self, snap: Snapshot, lease: int) -> Snapshot:
        """Take the role if it is free; plan if it is ours. Returns the snapshot to act
        on (with the assignments just written)."""
        if snap.controller is None:
            res = await self.store.txn(
                [Compare.absent(self.keys.controller), Compare.exists(self.keys.node(self.node))],
                [Put(self.keys.controller, self.node.encode(), lease=lease)],
            )
            if res.succeeded:
                log.info("node %s is now the controller of cluster %s", self.node,
                         self.keys.cluster)  # fmt: skip
                self._since = self._clock()
                self._placements = PlacementClock()
                self._failures = FailureClock()
                snap = await read_snapshot(self.store, self.keys)
        if snap.controller != self.node:
            self._set_timer(None)
            return snap
        return await self._control(snap)

    async def resign(self) -> None:
        """Give the role up (the agent is stopping): another agent takes it at once."""
        self._set_timer(None)
        await self.store.txn(
            [Compare.value_is(self.keys.controller, self.node.encode())],
            [Delete(self.keys.controller)],
        )

    def plan_for(
        self, snap: Snapshot, now: float, wall: float
    ) -> tuple[Plan, dict[str, Assignment]]:
        """The plan for ``snap`` at ``now`` (this controller's monotonic clock) and the
        assignments to keep in the store (``since`` on the wall clock). Sets
        ``wake_at``, the next deadline. No I/O."""
        local = dataclasses.replace(
            snap, assignments=self._placements.localize(snap.assignments, now)
        )
        result, formation_end = self._hold_for_formation(local, plan(local, now), now)
        stored = self._placements.to_store(result.assignments, snap.assignments, now, wall)
        _, failures_due = self._failures.expired(snap, now)
        self.wake_at = earliest([result.wake_at, formation_end, failures_due])
        return result, stored

    async def _control(self, snap: Snapshot) -> Snapshot:
        now = self._clock()
        await self._expire_failures(snap, now)
        result, stored = self.plan_for(snap, now, self._wall())
        self._set_timer(self.wake_at)
        ops: list[Op] = [
            Put(self.keys.assignment(pkg), encode(a))
            for pkg, a in stored.items()
            if snap.assignments.get(pkg) != a
        ]
        ops += [Delete(self.keys.assignment(p)) for p in snap.assignments if p not in snap.packages]
        if not ops:
            return snap
        # etcd allows 128 operations per transaction: write big plans in chunks, each
        # fenced on the leader key (assignments are independent of one another).
        revision = snap.revision
        for i in range(0, len(ops), MAX_OPS_PER_TXN):
            res = await self.store.txn(self._fence(snap), ops[i : i + MAX_OPS_PER_TXN])
            if not res.succeeded:
                log.warning("controller: lost the leader key; not writing the plan")
                return snap
            revision = res.revision
        for action in result.actions:
            if snap.assignments.get(action.package) != stored.get(action.package):
                log.info("controller: %s", action)
        return dataclasses.replace(snap, assignments=stored, revision=revision)

    def _fence(self, snap: Snapshot) -> list[Compare]:
        return [
            Compare(self.keys.controller, "create", "==", snap.controller_revision),
            Compare.value_is(self.keys.controller, self.node.encode()),
        ]

    async def _expire_failures(self, snap: Snapshot, now: float) -> None:
        """Turn node switching back on where a failure's ``failure_timeout`` passed; the
        write wakes every agent (and this one plans again with it)."""
        due, _ = self._failures.expired(snap, now)
        for pkg, node in due:
            key = self.keys.admin(pkg)
            admin = snap.admin_of(pkg)
            res = await self.store.txn(
                [*self._fence(snap), Compare.mod_revision(key, snap.raw_revisions.get(key, 0))],
                [Put(key, encode(admin.switching_on(node)))],
            )
            if res.succeeded:
                timeout = snap.packages[pkg].failure_timeout
                log.info("controller: package %s: node switching on %s is on again "
                         "(failure_timeout %gs passed)", pkg, node, timeout)  # fmt: skip

    def _set_timer(self, at: float | None) -> None:
        """One timer, for the earliest deadline: it asks for a reconcile then."""
        if at == self._timer_at and (at is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            delay = max(0.0, at - self._clock()) + TIMER_SLACK
            self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        self._replan()

    def _hold_for_formation(
        self, snap: Snapshot, result: Plan, now: float
    ) -> tuple[Plan, float | None]:
        """While expected nodes (``expected_nodes``) are still joining, for up to the
        formation bound (``formation_timeout``) after this controller took the role,
        packages that never ran anywhere are not placed yet, so that they start on their
        preferred node rather than on whichever node joined first (Pacemaker waits
        ``dc-deadtime`` the same way). Returns the plan and when the bound ends (None:
        nothing held)."""
        missing = [n for n in expected_nodes(snap) if n not in snap.nodes]
        limit = snap.cluster.formation_wait() if snap.cluster else 2 * self.node_timeout
        end = self._since + limit
        if not missing or now >= end:
            return result, None
        held = {
            a.package
            for a in result.actions
            if a.verb is Verb.START and snap.status_of(a.package).node is None
        }
        if not held:
            return result, None
        reason = f"start_wait: waiting for the cluster to form ({', '.join(missing)} not up yet)"
        assignments = dict(result.assignments)
        for pkg in held:
            prev = snap.assignments.get(pkg)
            since = prev.since if prev is not None and prev.reason == reason else now
            assignments[pkg] = Assignment(node=None, reason=reason, since=since)
        actions = [a for a in result.actions if a.package not in held]
        return Plan(assignments=assignments, actions=actions, wake_at=result.wake_at), end
