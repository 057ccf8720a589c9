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
- Every agent notes, on its own monotonic clock, when it first saw each key's
  newest ``mod_revision``: in its watch (which shows a write as it is committed) or
  in a read of every heartbeat key, twice per renewal interval and when a ttl runs
  out (a watch can lag). Either way that is after the write was sent.
- Once the writer's ``ttl`` (in the record; never less than the agent's own
  ``node_timeout``, so that a forged record cannot shorten it) has passed since then with no newer
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from vigil.errors import LeaseNotFound, StoreError
from vigil.keys import Keys
from vigil.model import HeartbeatRecord
from vigil.store import Compare, Delete, KeyValue, Store

log = logging.getLogger("vigil.agent")

TIMER_SLACK = 0.005  # read a little after a ttl runs out, so that it has passed


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


@dataclass(slots=True)
class _Seen:
    mod_revision: int
    lease: int
    ttl: float
    since: float  # when this agent first saw this write


class HeartbeatClock:
    """When this agent first saw each node's newest heartbeat write, from reads of every
    heartbeat key (``observe``) and from the agent's watch (``saw``), whichever shows
    a write first. Pure: the caller passes ``now`` (monotonic seconds, read after
    the heartbeat was read or its event received)."""

    def __init__(self, skip: str = "", min_ttl: float = 0.0) -> None:
        self._skip = skip  # this agent's own heartbeat key
        # A record is only as trustworthy as whoever wrote it: a ttl below this
        # agent's own node_timeout (a forged or corrupt record) counts as that.
        self._min_ttl = min_ttl
        self._seen: dict[str, _Seen] = {}

    def saw(self, key: str, mod_revision: int, lease: int, value: bytes, now: float) -> None:
        """A heartbeat write (a read key or a watch event). An older write than one
        seen already (a lagging member's read) changes nothing."""
        if key == self._skip or not lease:
            return  # without a lease there is nothing to revoke: the store's expiry applies
        old = self._seen.get(key)
        if old is not None and old.mod_revision >= mod_revision:
            return
        try:
            rec = HeartbeatRecord.model_validate_json(value, strict=True)
        except ValidationError:
            self._seen.pop(key, None)  # unreadable: the same
            return
        self._seen[key] = _Seen(mod_revision, lease, max(rec.ttl, self._min_ttl), now)

    def observe(self, beats: Sequence[KeyValue], now: float) -> list[Silent]:
        """Note ``beats`` (every heartbeat key, read before ``now``; nodes missing from
        it are forgotten) and return the nodes silent for at least their ttl."""
        found = {kv.key for kv in beats}
        for kv in beats:
            self.saw(kv.key, kv.mod_revision, kv.lease, kv.value, now)
        for key in [k for k in self._seen if k not in found]:
            del self._seen[key]
        return self.silent(now)

    def silent(self, now: float) -> list[Silent]:
        """The nodes whose newest write seen is at least their ttl old, by ``now``."""
        return [
            Silent(key.rpartition("/")[2], key, s.mod_revision, s.lease, s.ttl, now - s.since)
            for key, s in sorted(self._seen.items())
            if now - s.since >= s.ttl
        ]

    def next_due(self) -> float | None:
        """When the first node seen so far would have been silent for its ttl, if none
        writes again (monotonic seconds; None: no heartbeat seen)."""
        return min((s.since + s.ttl for s in self._seen.values()), default=None)

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
    beats: HeartbeatClock,
    every: float,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Forever: read the heartbeats every ``every`` seconds, and also when a node's ttl
    runs out, and expire the lease of each node silent for its ttl (module
    docstring). ``beats`` may also be fed by the caller's watch. Store errors are
    retried."""
    unrevoked: set[int] = set()  # heartbeat deleted, lease revoke not confirmed yet
    pause = every
    while True:
        await asyncio.sleep(pause)
        pause = every
        try:
            found, _ = await store.range(keys.heartbeats)
            for s in beats.observe(found, clock()):
                if await reap(store, s):
                    unrevoked.add(s.lease)
                else:
                    beats.forget(s.key)
            for lease in sorted(unrevoked):  # those of this round, and any left before
                with contextlib.suppress(LeaseNotFound):
                    await store.lease_revoke(lease)
                unrevoked.discard(lease)
        except StoreError as exc:
            log.debug("heartbeat check: %s; trying again", exc)
            continue
        due = beats.next_due()
        if due is not None:
            pause = min(every, max(0.0, due - clock()) + TIMER_SLACK)
