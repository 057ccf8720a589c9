"""The cluster's event log as one agent writes it: ``events/TIME_NS.NODE`` keys.

Every package state change is recorded in the same transaction as the status it
leads to (``op`` returns the ``Put`` to add to it), so ``vigil events`` never shows a
change the store does not hold. Times are this node's wall clock in nanoseconds,
strictly increasing per node; the node part of the key keeps two nodes' events
apart. Wall clocks of two nodes may differ, so the log's order is the store's: by
revision (``in_store_order``), never by the times in the keys. Every ``TRIM_EVERY``
events written, the log is cut back to its newest ``KEPT`` entries (whichever node
wrote them).
"""

from __future__ import annotations

import asyncio
import logging
import time

from vigil.errors import StoreError
from vigil.keys import Keys
from vigil.model import Event, PackageState, PackageStatus
from vigil.snapshot import encode
from vigil.store import Delete, KeyValue, Put, Store

log = logging.getLogger("vigil.agent")

KEPT = 2000
TRIM_EVERY = 200
TXN_OPS = 100  # deletes per transaction: etcd allows 128 operations by default


def in_store_order(kvs: list[KeyValue]) -> list[KeyValue]:
    """Events oldest first as the store recorded them: by revision (events written in
    one transaction share it; their keys keep one node's events in order)."""
    return sorted(kvs, key=lambda kv: (kv.mod_revision, kv.key))


class EventLog:
    def __init__(self, store: Store, keys: Keys, node: str) -> None:
        self.store = store
        self.keys = keys
        self.node = node
        self._last_ns = 0
        self._written = 0
        self._trimming: asyncio.Task[None] | None = None

    def op(self, pkg: str, old: PackageState | None, new: PackageStatus, why: str = "") -> Put:
        """The write recording ``pkg`` going from ``old`` to ``new`` (``why``: the
        reason shown, else the status message)."""
        now_ns = max(time.time_ns(), self._last_ns + 1)
        self._last_ns = now_ns
        self._written += 1
        if self._written % TRIM_EVERY == 0 and (self._trimming is None or self._trimming.done()):
            self._trimming = asyncio.get_running_loop().create_task(self.trim())
        event = Event(
            time=now_ns / 1e9,
            node=self.node,
            package=pkg,
            from_state=old.value if old else None,
            to_state=new.state.value,
            reason=why or new.message,
        )
        return Put(self.keys.event(now_ns, self.node), encode(event))

    async def trim(self) -> None:
        """Delete all but the newest ``KEPT`` events, ``TXN_OPS`` per transaction (best
        effort: a store error leaves the rest for the next trim)."""
        try:
            kvs, _ = await self.store.range(self.keys.events)
            kvs = in_store_order(kvs)
            old = kvs[: max(0, len(kvs) - KEPT)]
            for i in range(0, len(old), TXN_OPS):
                await self.store.txn([], [Delete(kv.key) for kv in old[i : i + TXN_OPS]], [])
        except StoreError as exc:
            log.warning("trimming the event log: %s", exc)
