"""Flags and admin locks kept true by every agent (CONCEPTS §5).

- On joining, the node removes every ``!nofailover!SELF`` flag: it is up again.
- Each tick, the node releases admin-lock entries whose process on this node is
  gone, and the controller releases those whose node is down.
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

    async def on_join(self) -> None:
        a = self.agent
        found = await flags.list_flags(a.store, a.keys)
        mine = flags.nofailover(a.node)
        for node, named in found.items():
            if mine in named:
                await flags.remove(a.store, a.keys, node, mine)

    async def tick(self, snap: Snapshot) -> None:
        a = self.agent
        await locks.reap(a.store, a.keys, a.node, await locks.queue(a.store, a.keys))
