"""The node lease: renewing it, and deciding when this node must fence itself.

Every agent holds one lease (TTL ``node_timeout``) that binds its node key, its owner
keys and its admin lock entries. Other nodes may start this node's packages once the
lease has expired in the store, so the agent must have killed them before then. The
rules, in fractions of ``node_timeout``:

- renew every ``RENEW_EVERY``; after a failed renewal try again every ``RETRY_EVERY``
  (an etcd leader election ends at an unknown moment: the first renewal after it
  must not wait a whole interval);
- a renewal sent at ``t`` proves the lease lives until at least ``t + ttl``: the
  sentinel is armed to kill every package process at ``t + FENCE_AT * ttl`` unless a
  newer renewal re-arms it (even if the agent itself is stopped);
- the agent gives up at ``FENCE_SELF`` after its last good renewal, earlier than the
  sentinel, so that it usually acts first, and never waits for a renewal past that;
- where the store may keep a lease alive past its TTL (etcd, after an election), a
  renewal also writes the node's heartbeat (``heartbeat``, agent/reaper.py) and
  counts only if that succeeds too: peers expire the lease ``ttl`` after the last
  heartbeat they saw, which is no earlier than ``ttl`` after it was sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from vigil.errors import LeaseNotFound, StoreError
from vigil.store import Store

log = logging.getLogger("vigil.agent")

RENEW_EVERY = 1 / 6
RETRY_EVERY = 1 / 30
FENCE_SELF = 0.6
FENCE_AT = 0.8


def renewal_budget(ttl: float, last_ok: float, now: float) -> float:
    """How long a renewal sent at ``now`` may wait for its answer: at most a third of
    the TTL, and never past the moment this node must fence itself (``<= 0``: it must
    fence now)."""
    return min(ttl / 3, last_ok + ttl * FENCE_SELF - now)


class LeaseKeeper:
    """Renews ``lease`` through ``store`` until it is lost; ``arm(sent_at)`` is called
    after every good renewal, ``stalled()`` says the sentinel's deadline has passed
    (the agent was stopped or starved for too long). ``heartbeat()``, if given, is
    awaited after each keepalive, within the same budget; it raises LeaseNotFound
    once a peer has expired the lease."""

    def __init__(
        self,
        store: Store,
        lease: int,
        ttl: float,
        *,
        arm: Callable[[float], None],
        stalled: Callable[[], bool],
        heartbeat: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.lease = lease
        self.ttl = ttl
        self._arm = arm
        self._stalled = stalled
        self._heartbeat = heartbeat

    async def renew_until_lost(self) -> str:
        """Renew on schedule; return why the lease is lost (the node must fence)."""
        ttl = self.ttl
        last_ok = time.monotonic()
        pause = ttl * RENEW_EVERY
        failures = 0  # renewals failed in a row
        why = ""  # what the last one failed on
        while True:
            await asyncio.sleep(pause)
            pause = ttl * RETRY_EVERY  # until this renewal succeeds
            if self._stalled():
                return "the lease deadline passed (the agent was stalled)"
            sent = time.monotonic()
            budget = renewal_budget(ttl, last_ok, sent)
            if budget <= 0:  # no time left to wait for an answer
                return f"cannot renew the node lease: {why or 'no time left to renew'}"
            try:
                async with asyncio.timeout(budget):
                    await self.store.lease_keepalive(self.lease)
                    if self._heartbeat is not None:
                        await self._heartbeat()
            except LeaseNotFound as exc:
                return f"node lease expired ({exc})"
            except (StoreError, TimeoutError) as exc:
                why = str(exc) or f"no answer within {budget:.2f}s"
                # The lease runs from the last renewal the store saw, which was sent at
                # or after last_ok: kill everything while there is still margin.
                if time.monotonic() - last_ok >= ttl * FENCE_SELF - 0.001:
                    return f"cannot renew the node lease: {why}"
                failures += 1
                if failures == 1:  # the rest of the episode is summed up when it ends
                    log.warning("lease renewal failed (%s); retrying", why)
                continue
            if failures:
                log.info(
                    "lease renewed after %d failed attempts (%.2fs since the last renewal)",
                    failures,
                    sent - last_ok,
                )
            failures = 0
            last_ok = sent
            pause = ttl * RENEW_EVERY
            self._arm(sent)
