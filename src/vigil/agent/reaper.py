"""Peer expiry of node leases: the agents expire a silent node's lease themselves
instead of waiting for the store to (etcd only).

Why: etcd expires a lease late exactly when it matters most. A new etcd leader
renews every lease (``lessor.Promote``: the whole TTL plus its election timeout from
the moment it took over), so when the host that dies also carried the etcd leader,
its node's lease outlives it by about the election on top of ``node_timeout``
(docs/benchmarks.md, layout A). In Pacemaker membership comes from corosync, not
from the CIB, so it has no such delay; in vigil membership is the node lease, so the
agents judge a node's silence themselves, by the rule below, with the same margin
the store's expiry gives.

- Every renewal of a node (agent/lease.py) also writes its heartbeat key
  ``heartbeat/NODE`` (bound to its lease) in a transaction that requires the key's
  create revision to be the one the node created when it joined. A renewal counts
  only if both the keepalive and this write succeed, and the node kills its
  packages by ``FENCE_AT * ttl`` after sending its last good one.
- Every agent reads the heartbeat keys every renewal interval and notes, on its own
  monotonic clock, when it first saw each key's current ``mod_revision``: after
  that write was committed, so after it was sent.
- Once the writer's ``ttl`` (in the record) has passed since then with no newer
  write, the agent deletes the key in a transaction that requires that same
  ``mod_revision``, then revokes the node's lease (its node key, owner keys, the
  controller role if it held it: the usual failover follows). The delete only
  succeeds if no write committed after the one seen, and afterwards none can (the
  key's create revision changed), so the node's last good renewal is the one seen,
  sent at least ``ttl`` earlier: its processes are dead already. Of agents racing
  to do it, one delete wins.

A failed delete (the node wrote again) restarts that node's clock from now; a record
that cannot be read is left alone (the store's own expiry still applies). Clocks of
different hosts are never compared, only the time each agent measures itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pydantic import ValidationError

from vigil.errors import LeaseNotFound, StoreError
from vigil.keys import Keys
from vigil.model import HeartbeatRecord
from vigil.store import Compare, Delete, KeyValue, Store

log = logging.getLogger("vigil.agent")


@dataclass(frozen=True, slots=True)
class Silent:
    """A node whose heartbeat write ``mod_revision`` has been the newest seen for
    ``silent_for`` seconds, at least its ``ttl``."""

    node: str
    key: str
    mod_revision: int
    lease: int
    ttl: float
    silent_for: float


class HeartbeatClock:
    """When this agent first saw each node's current heartbeat write. Pure: the caller
    passes ``now`` (monotonic seconds, read after the heartbeats were read)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, float]] = {}  # key -> (mod_revision, first seen)

    def observe(self, beats: Iterable[KeyValue], now: float, *, skip: str = "") -> list[Silent]:
        """Note ``beats`` (every heartbeat key, read before ``now``); return the nodes
        silent for at least their ``ttl``, except the one whose key is ``skip``."""
        current: dict[str, tuple[int, float]] = {}
        silent = []
        for kv in beats:
            if kv.key == skip:
                continue
            try:
                rec = HeartbeatRecord.model_validate_json(kv.value, strict=True)
            except ValidationError:
                continue  # unreadable: the store's own expiry applies
            rev, since = self._seen.get(kv.key, (0, now))
            if rev != kv.mod_revision:
                since = now
            current[kv.key] = (kv.mod_revision, since)
            if now - since >= rec.ttl and kv.lease:
                node = kv.key.rpartition("/")[2]
                silent.append(Silent(node, kv.key, kv.mod_revision, kv.lease, rec.ttl, now - since))
        self._seen = current
        return silent

    def forget(self, key: str) -> None:
        """The key was written again (or deleted) after it was seen: start over."""
        self._seen.pop(key, None)


async def reap(store: Store, s: Silent) -> bool:
    """Delete ``s``'s heartbeat key if it still holds the write seen; True if done
    (the caller then revokes ``s.lease``)."""
    res = await store.txn([Compare.mod_revision(s.key, s.mod_revision)], [Delete(s.key)])
    if res.succeeded:
        log.warning(
            "node %s: no heartbeat for %.2fs (its ttl is %gs): it is dead or fenced; "
            "revoking its lease %x",
            s.node,
            s.silent_for,
            s.ttl,
            s.lease,
        )
    return res.succeeded


async def reap_silent_nodes(
    store: Store,
    keys: Keys,
    node: str,
    every: float,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Forever: every ``every`` seconds read the heartbeats and expire the lease of
    each node silent for its ttl (module docstring). Store errors are retried."""
    beats = HeartbeatClock()
    own = keys.heartbeat(node)
    unrevoked: set[int] = set()  # heartbeat deleted, lease revoke not confirmed yet
    while True:
        await asyncio.sleep(every)
        try:
            for lease in sorted(unrevoked):
                with contextlib.suppress(LeaseNotFound):
                    await store.lease_revoke(lease)
                unrevoked.discard(lease)
            found, _ = await store.range(keys.heartbeats)
            for s in beats.observe(found, clock(), skip=own):
                if await reap(store, s):
                    unrevoked.add(s.lease)
                    with contextlib.suppress(LeaseNotFound):
                        await store.lease_revoke(s.lease)
                    unrevoked.discard(s.lease)
                else:
                    beats.forget(s.key)
        except StoreError as exc:
            log.debug("heartbeat check: %s; trying again", exc)
