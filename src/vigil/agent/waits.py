"""Remove the wait edges (CONCEPTS §8) of this node's commands that are gone.

A ``vigil ... --wait`` run by a package script removes its edge when it ends, also
on SIGTERM; one killed by SIGKILL (a script timeout's second step) cannot. Such an
edge would make a later, harmless wait look like a command loop, so the agent of
the node where the command ran removes it once its process is gone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from vigil import waits
from vigil.store import Compare, Delete

if TYPE_CHECKING:
    from vigil.agent.node import Agent
    from vigil.snapshot import Snapshot

log = logging.getLogger("vigil.agent")


class WaitEdgeCleanup:
    """Edges are read again only when the store changed; the processes of this node's
    edges are checked every tick (a process dying changes nothing in the store).
    The controller also removes the edges of nodes that are down."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._seen = -1
        self._mine: list[waits.StoredEdge] = []

    async def on_join(self) -> None:
        self._seen = -1

    async def tick(self, snap: Snapshot) -> None:
        a = self.agent
        gone: list[tuple[waits.StoredEdge, str]] = []
        if snap.revision != self._seen:
            edges = await waits.read_edges(a.store, a.keys)
            self._mine = [e for e in edges if e.edge.node == a.node]
            if snap.controller == a.node:
                gone = [(e, f"node {e.edge.node} is down") for e in edges
                        if e.edge.node not in snap.nodes]  # fmt: skip
            self._seen = snap.revision
        for e in [e for e in self._mine if waits.stale(e.edge, a.node)]:
            self._mine.remove(e)
            gone.append((e, f"its command (pid {e.edge.pid}) is gone"))
        for e, why in gone:
            key = a.keys.wait(e.edge.package)
            res = await a.store.txn([Compare.mod_revision(key, e.revision)], [Delete(key)])
            if res.succeeded:
                log.info("wait edge %s -> %s removed: %s", e.edge.package, e.edge.waits_for, why)
