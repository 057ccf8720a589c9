"""In-process reference backend: one event loop, no persistence.

Every operation is synchronous under the hood (no ``await`` while the state
changes), so each one is atomic with respect to the other tasks of the loop.
Lease expiry follows the ``clock`` given to the constructor (``time.monotonic``
by default, a ``vigil.testing.FakeClock`` in tests): it is checked at the start
of every operation and, while watchers exist, every ``_TICK`` seconds by the
watchers themselves, so that a watcher sees the DELETE events of an expired
lease even when nobody else touches the store.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType

from vigil.errors import Compacted, LeaseNotFound, StoreUnavailable
from vigil.store.base import (
    Compare,
    Delete,
    EventType,
    Get,
    KeyValue,
    Op,
    Put,
    TxnResult,
    WatchEvent,
)

__all__ = ["MemoryStore"]

# How often (real seconds) a waiting watcher re-checks lease expiry.
_TICK = 0.02


@dataclass(slots=True)
class _Lease:
    ttl: float
    expires_at: float
    keys: set[str] = field(default_factory=set)


def check_ops(ops: Sequence[Op]) -> None:
    """Reject ill-typed ops before anything changes (shared by the backends)."""
    for op in ops:
        if not isinstance(op, Put | Delete | Get):
            raise TypeError(f"not a store op: {op!r}")
        if not isinstance(op.key, str):
            raise TypeError(f"store keys are str, got {type(op.key).__name__}")
        if isinstance(op, Put) and not isinstance(op.value, bytes):
            raise TypeError(f"store values are bytes, got {type(op.value).__name__}")


class MemoryStore:
    """The reference ``Store``: state lives in this object, for one event loop.

    ``history_limit`` bounds how many watch events are kept (at least that many,
    whole revisions); ``compact(revision)`` drops older history on demand.
    Its leases expire exactly at their TTL; tests that need etcd's behaviour for the
    agents set ``leases_extended_on_election`` on an instance.
    """

    leases_extended_on_election = False

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, *, history_limit: int = 10_000
    ) -> None:
        if history_limit < 1:
            raise ValueError("history_limit must be at least 1")
        self._clock = clock
        self._history_limit = history_limit
        self._kv: dict[str, KeyValue] = {}
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(1)
        self._rev = 0
        self._history: list[WatchEvent] = []
        self._first_rev = 1  # oldest revision whose events are all still in _history
        self._changed = asyncio.Event()
        self._changed_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- Store protocol ---------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        self._begin()
        return self._kv.get(key)

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        self._begin()
        return self._range(prefix), self._rev

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        return self._txn((), (Put(key, value, lease),), ()).revision

    async def delete(self, key: str, prefix: bool = False) -> int:
        deleted = self._txn((), (Delete(key, prefix),), ()).responses[0]
        assert isinstance(deleted, int)
        return deleted

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        return self._txn(compares, success, failure)

    async def lease_grant(self, ttl: float) -> int:
        if not ttl > 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        self._begin()
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = _Lease(float(ttl), self._clock() + ttl)
        return lease_id

    async def lease_keepalive(self, lease_id: int) -> float:
        self._begin()
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(f"lease {lease_id} not found (expired or revoked)")
        lease.expires_at = self._clock() + lease.ttl
        return lease.ttl

    async def lease_revoke(self, lease_id: int) -> None:
        self._begin()
        if lease_id not in self._leases:
            raise LeaseNotFound(f"lease {lease_id} not found (expired or revoked)")
        self._revoke(lease_id)

    async def watch(self, prefix: str, after_revision: int) -> AsyncIterator[WatchEvent]:
        cursor = after_revision
        while True:
            self._begin()
            if cursor + 1 < self._first_rev:
                raise Compacted(cursor, self._first_rev)
            changed = self._change_event()
            start = bisect.bisect_right(self._history, cursor, key=lambda e: e.revision)
            batch = [e for e in self._history[start:] if e.key.startswith(prefix)]
            scanned = self._rev
            for event in batch:
                yield event
                cursor = event.revision
            cursor = max(cursor, scanned)
            if not batch:
                try:
                    async with asyncio.timeout(_TICK):
                        await changed.wait()
                except TimeoutError:
                    pass

    async def close(self) -> None:
        self._closed = True
        self._notify()

    # -- extras -----------------------------------------------------------

    @property
    def revision(self) -> int:
        """The current revision (no lease expiry check)."""
        return self._rev

    async def compact(self, revision: int) -> None:
        """Forget the history before ``revision``: watching from an older one raises Compacted."""
        self._begin()
        if revision > self._rev:
            raise ValueError(f"cannot compact to future revision {revision} (now {self._rev})")
        if revision <= self._first_rev:
            return
        cut = bisect.bisect_left(self._history, revision, key=lambda e: e.revision)
        del self._history[:cut]
        self._first_rev = revision
        self._notify()

    async def __aenter__(self) -> MemoryStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- internals --------------------------------------------------------

    def _begin(self) -> None:
        if self._closed:
            raise StoreUnavailable("memory store is closed")
        self._expire()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _change_event(self) -> asyncio.Event:
        """The event the next change sets, bound to the running loop."""
        loop = asyncio.get_running_loop()
        if self._changed_loop is not loop:  # first use, or the store moved to a new loop
            self._changed = asyncio.Event()
            self._changed_loop = loop
        return self._changed

    def _range(self, prefix: str) -> list[KeyValue]:
        return [self._kv[k] for k in sorted(self._kv) if k.startswith(prefix)]

    def _expire(self) -> None:
        now = self._clock()
        expired = [
            (lease.expires_at, i) for i, lease in self._leases.items() if lease.expires_at <= now
        ]
        for _, lease_id in sorted(expired):
            self._revoke(lease_id)

    def _revoke(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id)
        if not lease.keys:
            return
        self._rev += 1
        events = []
        for key in sorted(lease.keys):
            del self._kv[key]
            events.append(WatchEvent(EventType.DELETE, key, b"", self._rev))
        self._record(events)

    def _record(self, events: list[WatchEvent]) -> None:
        self._history.extend(events)
        excess = len(self._history) - self._history_limit
        if excess > self._history_limit // 10:
            cut = excess
            # Drop whole revisions only.
            while cut < len(self._history) and (
                self._history[cut].revision == self._history[cut - 1].revision
            ):
                cut += 1
            self._first_rev = self._history[cut - 1].revision + 1
            del self._history[:cut]
        self._notify()

    def _txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]
    ) -> TxnResult:
        check_ops(success)
        check_ops(failure)
        self._begin()
        succeeded = all(c.holds(self._kv.get(c.key)) for c in compares)
        ops = success if succeeded else failure
        for op in ops:
            if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                raise LeaseNotFound(f"lease {op.lease} not found (expired or revoked)")
        rev = self._rev + 1
        events: list[WatchEvent] = []
        responses: list[list[KeyValue] | int | None] = []
        for op in ops:
            if isinstance(op, Get):
                if op.prefix:
                    responses.append(self._range(op.key))
                else:
                    kv = self._kv.get(op.key)
                    responses.append([kv] if kv else [])
            elif isinstance(op, Put):
                old = self._kv.get(op.key)
                if old is None:
                    kv = KeyValue(op.key, op.value, rev, rev, 1, op.lease)
                else:
                    kv = replace(
                        old,
                        value=op.value,
                        mod_revision=rev,
                        version=old.version + 1,
                        lease=op.lease,
                    )
                    if old.lease:
                        self._leases[old.lease].keys.discard(op.key)
                if op.lease:
                    self._leases[op.lease].keys.add(op.key)
                self._kv[op.key] = kv
                events.append(
                    WatchEvent(
                        EventType.PUT,
                        op.key,
                        op.value,
                        rev,
                        kv.create_revision,
                        kv.version,
                        op.lease,
                    )
                )
                responses.append(None)
            else:
                keys = [k for k in sorted(self._kv) if k.startswith(op.key)] if op.prefix else []
                if not op.prefix and op.key in self._kv:
                    keys = [op.key]
                for key in keys:
                    old = self._kv.pop(key)
                    if old.lease:
                        self._leases[old.lease].keys.discard(key)
                    events.append(WatchEvent(EventType.DELETE, key, b"", rev))
                responses.append(len(keys))
        if events:
            self._rev = rev
            self._record(events)
        return TxnResult(succeeded, self._rev, responses)
