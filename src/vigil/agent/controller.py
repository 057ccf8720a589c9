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

from vigil.keys import Keys
from vigil.model import Assignment
from vigil.plan.planner import Plan, Verb, plan
from vigil.snapshot import Snapshot, encode, read_snapshot
from vigil.store import Compare, Delete, Op, Put, Store

log = logging.getLogger("vigil.controller")

# A new controller waits up to this many node_timeouts for the nodes listed in
# cluster.toml before placing packages that never ran (cluster formation).
FORMATION_WAIT = 2
MAX_OPS_PER_TXN = 100


class Controller:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        node: str,
        node_timeout: float,
        replan: Callable[[], None],
    ) -> None:
        self.store = store
        self.keys = keys
        self.node = node
        self.node_timeout = node_timeout
        self._replan = replan  # asks the agent for another reconcile
        self._since = time.monotonic()
        self._formation_timer: asyncio.TimerHandle | None = None

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
                self._since = time.monotonic()
                snap = await read_snapshot(self.store, self.keys)
        if snap.controller != self.node:
            return snap
        return await self._control(snap)

    async def resign(self) -> None:
        """Give the role up (the agent is stopping): another agent takes it at once."""
        await self.store.txn(
            [Compare.value_is(self.keys.controller, self.node.encode())],
            [Delete(self.keys.controller)],
        )

    async def _control(self, snap: Snapshot) -> Snapshot:
        result = self._hold_for_formation(snap, plan(snap, time.time()))
        ops: list[Op] = [
            Put(self.keys.assignment(pkg), encode(a))
            for pkg, a in result.assignments.items()
            if snap.assignments.get(pkg) != a
        ]
        ops += [Delete(self.keys.assignment(p)) for p in snap.assignments if p not in snap.packages]
        if not ops:
            return snap
        fence = [
            Compare(self.keys.controller, "create", "==", snap.controller_revision),
            Compare.value_is(self.keys.controller, self.node.encode()),
        ]
        # etcd allows 128 operations per transaction: write big plans in chunks, each
        # fenced on the leader key (assignments are independent of one another).
        revision = snap.revision
        for i in range(0, len(ops), MAX_OPS_PER_TXN):
            res = await self.store.txn(fence, ops[i : i + MAX_OPS_PER_TXN])
            if not res.succeeded:
                log.warning("controller: lost the leader key; not writing the plan")
                return snap
            revision = res.revision
        for action in result.actions:
            if snap.assignments.get(action.package) != result.assignments.get(action.package):
                log.info("controller: %s", action)
        return dataclasses.replace(snap, assignments=result.assignments, revision=revision)

    def _hold_for_formation(self, snap: Snapshot, result: Plan) -> Plan:
        """While nodes listed in cluster.toml are still joining (for up to
        FORMATION_WAIT x node_timeout after this controller started), packages that
        never ran anywhere are not placed yet, so that they start on their preferred
        node rather than on whichever node joined first."""
        listed = snap.cluster.nodes if snap.cluster and snap.cluster.nodes else []
        missing = sorted(n for n in listed if n not in snap.nodes)
        waited = time.monotonic() - self._since
        limit = FORMATION_WAIT * self.node_timeout
        if not missing or waited > limit:
            return result
        held = {
            a.package
            for a in result.actions
            if a.verb is Verb.START and snap.status_of(a.package).node is None
        }
        if not held:
            return result
        if self._formation_timer is None:
            loop = asyncio.get_running_loop()
            self._formation_timer = loop.call_later(limit - waited + 0.05, self._replan)
        reason = f"waiting for the cluster to form ({', '.join(missing)} not up yet)"
        assignments = dict(result.assignments)
        for pkg in held:
            assignments[pkg] = Assignment(node=None, reason=reason)
        actions = [a for a in result.actions if a.package not in held]
        return Plan(assignments=assignments, actions=actions)
