"""Flags and admin locks kept true by every agent (CONCEPTS §5).

- On joining, the node removes every ``!nofailover!SELF`` flag: it is up again.
- Each tick, the node releases admin-lock entries whose process on this node is
  gone. Entries of a node that dies go with its lease (see ``vigil.locks``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vigil import flags, locks

if TYPE_CHECKING:
    from vigil.agent.node import Agent
    from vigil.snapshot import Snapshot


class Housekeeping:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._seen = -1
        self._mine: list[locks.Held] = []  # lock entries of processes on this node

    def _local(self, entries: list[locks.Held]) -> list[locks.Held]:
        ns = locks.pid_namespace()
        return [h for h in entries if h.entry.node == self.agent.node and h.entry.pid_ns == ns]

    async def on_join(self) -> None:
        a = self.agent
        found = await flags.list_flags(a.store, a.keys)
        mine = flags.nofailover(a.node)
        for node, named in found.items():
            if mine in named:
                await flags.remove(a.store, a.keys, node, mine)

    async def tick(self, snap: Snapshot) -> None:
        """Lock entries are read again only when the store changed; whether their
        processes on this node still live is checked every tick (a process dying
        changes nothing in the store)."""
        a = self.agent
        if snap.revision != self._seen:
            self._mine = self._local(await locks.queue(a.store, a.keys))
            self._seen = snap.revision
        if self._mine:
            self._mine = self._local(await locks.reap(a.store, a.keys, a.node, self._mine))
