"""The Store contract (see ``vigil.store.base``): one suite, run against every backend.

Each contract test is a plain sync test that runs its body with ``asyncio.run``
through a backend ``Harness``. To add a backend (etcd), write a Harness for it
and add it to ``HARNESSES``; the contract tests then run against it unchanged.
Backend-specific tests (history trimming, SQLite files and real processes) are
at the end.

Nothing here sleeps to wait for a condition: watches are read with a deadline
(``take``), other conditions are polled with ``vigil.testing.wait_for``. The
only sleeps are ``Harness.advance``, which lets lease time pass on backends
whose clock cannot be faked.

The etcd backend runs against one real 3-member etcd cluster per module
(``vigil.testing.etcd``); every test starts by deleting every key, so that
tests do not see each other's. Without an etcd binary those tests are skipped
(in CI, where ``.ci/run`` installs etcd-server, they fail instead).
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vigil.errors import Compacted, LeaseNotFound, StoreCorrupt, StoreUnavailable
from vigil.store import (
    Compare,
    Delete,
    EventType,
    Get,
    KeyValue,
    MemoryStore,
    Put,
    SQLiteStore,
    Store,
    WatchEvent,
    open_store,
)
from vigil.store.etcd import EtcdStore
from vigil.testing import FakeClock, wait_for
from vigil.testing.etcd import EtcdCluster, require_etcd

Body = Callable[[Store], Awaitable[None]]


# -- harnesses ----------------------------------------------------------------


class Harness:
    """What the contract tests need from a backend."""

    name = ""
    ttl = 0.0  # a lease ttl that ``advance(1.5 * ttl)`` outlasts cheaply
    keepalive_ttl = 0.0  # a ttl with room for scheduling delays (keepalive test)
    # The server pushes events to a live watcher as they happen (etcd), rather than
    # the watcher reading history when it is asked for the next event.
    pushes_events = False

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self._clients: list[Any] = []

    def new_client(self) -> Store:
        raise NotImplementedError

    def client(self) -> Store:
        """Another client of the same store; closed at the end of ``run``."""
        store = self.new_client()
        self._clients.append(store)
        return store

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` of lease time pass."""
        await asyncio.sleep(seconds)

    async def compact(self, store: Store, revision: int) -> None:
        await store.compact(revision)  # type: ignore[attr-defined]

    def run(self, body: Body, timeout: float = 30.0) -> None:
        async def main() -> None:
            try:
                async with asyncio.timeout(timeout):
                    await body(self.client())
            finally:
                for store in reversed(self._clients):
                    await store.close()
                self._clients.clear()

        asyncio.run(main())


class MemoryHarness(Harness):
    name = "memory"
    ttl = 10.0
    keepalive_ttl = 10.0

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.clock = FakeClock()
        self.store: MemoryStore | None = None

    def new_client(self) -> Store:
        # One shared in-process store: every "client" is the same object.
        if self.store is None:
            self.store = MemoryStore(clock=self.clock)
        return self.store

    def client(self) -> Store:
        store = self.new_client()
        if store not in self._clients:
            self._clients.append(store)
        return store

    def run(self, body: Body, timeout: float = 30.0) -> None:
        super().run(body, timeout)
        self.store = None

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        await asyncio.sleep(0)


class SQLiteHarness(Harness):
    name = "sqlite"
    ttl = 0.3
    keepalive_ttl = 1.0

    @property
    def path(self) -> Path:
        return self.tmp_path / "store.db"

    def new_client(self) -> Store:
        return SQLiteStore(self.path)


class EtcdHarness(Harness):
    name = "etcd"
    ttl = 1.0  # etcd leases are whole seconds; the test cluster's minimum is 1 s
    keepalive_ttl = 2.0
    pushes_events = True
    cluster: EtcdCluster  # set by the ``h`` fixture (one cluster per module)

    def new_client(self) -> Store:
        return EtcdStore(self.cluster.endpoints)

    def run(self, body: Body, timeout: float = 30.0) -> None:
        async def clean_body(store: Store) -> None:
            await store.delete("", prefix=True)  # the cluster is shared by the module
            await body(store)

        super().run(clean_body, timeout)


HARNESSES: dict[str, type[Harness]] = {
    "memory": MemoryHarness,
    "sqlite": SQLiteHarness,
    "etcd": EtcdHarness,
}


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    binary = require_etcd()
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), members=3, binary=binary) as cluster:
        yield cluster


@pytest.fixture(params=list(HARNESSES))
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    harness: Harness = HARNESSES[request.param](tmp_path)
    if isinstance(harness, EtcdHarness):
        harness.cluster = request.getfixturevalue("etcd_cluster")
    return harness


@pytest.fixture(params=["memory", "sqlite"])
def local(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    """The backends implemented in this repository (history_limit, compact, close)."""
    harness: Harness = HARNESSES[request.param](tmp_path)
    return harness


# -- helpers ------------------------------------------------------------------


async def take(it: AsyncIterator[WatchEvent], n: int, timeout: float = 5.0) -> list[WatchEvent]:
    """The next ``n`` events of a watch; fails after ``timeout`` s."""
    async with asyncio.timeout(timeout):
        return [await anext(it) for _ in range(n)]


async def aclose(it: AsyncIterator[WatchEvent]) -> None:
    await it.aclose()  # type: ignore[attr-defined]


async def revision(store: Store) -> int:
    return (await store.range(""))[1]


def summary(events: list[WatchEvent]) -> list[tuple[str, str, bytes]]:
    return [(e.type.value, e.key, e.value) for e in events]


# -- keys, values, revisions --------------------------------------------------


def test_get_absent_is_none(h: Harness) -> None:
    async def body(s: Store) -> None:
        assert await s.get("nope") is None
        assert await s.range("nope") == ([], await revision(s))

    h.run(body)


def test_put_then_get_tracks_create_mod_version(h: Harness) -> None:
    async def body(s: Store) -> None:
        r1 = await s.put("a", b"1")
        assert await s.get("a") == KeyValue("a", b"1", r1, r1, 1, 0)
        r2 = await s.put("a", b"2")
        assert r2 == r1 + 1
        assert await s.get("a") == KeyValue("a", b"2", r1, r2, 2, 0)
        r3 = await s.put("b", b"")
        assert r3 == r2 + 1
        assert await s.get("b") == KeyValue("b", b"", r3, r3, 1, 0)
        assert await revision(s) == r3

    h.run(body)


def test_range_prefix_is_sorted_by_key(h: Harness) -> None:
    async def body(s: Store) -> None:
        for key in ["a/2", "b/1", "a/10", "a", "a/1", "a/", "ab", "a/\u00e9"]:
            await s.put(key, key.encode())
        kvs, rev = await s.range("a/")
        assert [kv.key for kv in kvs] == ["a/", "a/1", "a/10", "a/2", "a/\u00e9"]
        assert all(kv.value == kv.key.encode() for kv in kvs)
        assert rev == await revision(s) == max(kv.mod_revision for kv in (await s.range(""))[0])
        everything, _ = await s.range("")
        assert [kv.key for kv in everything] == sorted(
            ["a/2", "b/1", "a/10", "a", "a/1", "a/", "ab", "a/\u00e9"]
        )
        assert (await s.range("c"))[0] == []

    h.run(body)


def test_delete_key(h: Harness) -> None:
    async def body(s: Store) -> None:
        r1 = await s.put("k", b"v")
        await s.put("k", b"w")
        assert await s.delete("k") == 1
        assert await s.get("k") is None
        rev = await revision(s)
        assert rev == r1 + 2
        assert await s.delete("k") == 0
        assert await revision(s) == rev  # nothing deleted, no new revision
        r4 = await s.put("k", b"again")
        assert await s.get("k") == KeyValue("k", b"again", r4, r4, 1, 0)

    h.run(body)


def test_delete_prefix_is_one_revision(h: Harness) -> None:
    async def body(s: Store) -> None:
        for key in ["p/1", "p/2", "p/x/3", "p", "p0", "q"]:
            await s.put(key, b"")
        before = await revision(s)
        assert await s.delete("p/", prefix=True) == 3
        kvs, rev = await s.range("")
        assert rev == before + 1
        assert [kv.key for kv in kvs] == ["p", "p0", "q"]
        assert await s.delete("p/", prefix=True) == 0

    h.run(body)


def test_values_are_bytes(h: Harness) -> None:
    async def body(s: Store) -> None:
        data = bytes(range(256))
        await s.put("bin", data)
        kv = await s.get("bin")
        assert kv is not None and kv.value == data and type(kv.value) is bytes

    h.run(body)


# -- transactions -------------------------------------------------------------


def test_txn_create_if_absent_runs_once(h: Harness) -> None:
    async def body(s: Store) -> None:
        first = await s.txn([Compare.absent("lock")], [Put("lock", b"me")], [Get("lock")])
        assert first.succeeded
        assert first.responses == [None]
        kv = await s.get("lock")
        assert kv is not None and kv.mod_revision == first.revision
        second = await s.txn([Compare.absent("lock")], [Put("lock", b"you")], [Get("lock")])
        assert not second.succeeded
        assert second.revision == first.revision
        assert second.responses == [[kv]]

    h.run(body)


def test_txn_compare_targets(h: Harness) -> None:
    async def body(s: Store) -> None:
        r1 = await s.put("k", b"v1")
        r2 = await s.put("k", b"v2")
        cases: list[tuple[Compare, bool]] = [
            (Compare.exists("k"), True),
            (Compare.absent("k"), False),
            (Compare.exists("nokey"), False),
            (Compare.absent("nokey"), True),
            (Compare.mod_revision("k", r2), True),
            (Compare.mod_revision("k", r1), False),
            (Compare("k", "mod", "!=", r2), False),
            (Compare("k", "mod", ">", r1), True),
            (Compare("k", "create", "==", r1), True),
            (Compare("k", "create", "<", r1), False),
            (Compare.value_is("k", b"v2"), True),
            (Compare.value_is("k", b"v1"), False),
            (Compare("k", "value", "!=", b"v1"), True),
            (Compare("k", "value", ">", b"v1"), True),
            (Compare("k", "value", "<", b"v1"), False),
            (Compare("k", "version", "==", 2), True),
            (Compare("k", "version", "<", 2), False),
            (Compare("k", "version", ">", 1), True),
            (Compare("nokey", "version", "==", 0), True),
            (Compare("nokey", "mod", "==", 0), True),
            (Compare.value_is("nokey", b""), True),
        ]
        kv = await s.get("k")
        for compare, expected in cases:
            result = await s.txn([compare], [Get("k")], [Get("nokey")])
            assert result.succeeded is expected, compare
            assert result.responses == ([[kv]] if expected else [[]]), compare
            assert result.revision == r2, compare  # reads only: no new revision

    h.run(body)


def test_txn_all_compares_must_hold(h: Harness) -> None:
    async def body(s: Store) -> None:
        await s.put("a", b"1")
        await s.put("b", b"2")
        holds = [Compare.value_is("a", b"1"), Compare.value_is("b", b"2")]
        assert (await s.txn(holds, [])).succeeded
        fails = [Compare.value_is("a", b"1"), Compare.value_is("b", b"nope")]
        result = await s.txn(fails, [Put("s", b"")], [Put("f", b"")])
        assert not result.succeeded
        assert await s.get("s") is None
        assert await s.get("f") is not None
        assert (await s.txn([], [Get("a")])).succeeded  # no compares: success

    h.run(body)


def test_txn_is_atomic_and_one_revision(h: Harness) -> None:
    async def body(s: Store) -> None:
        await s.put("t/c", b"old")
        before = await revision(s)
        result = await s.txn(
            [Compare.exists("t/c")],
            [Put("t/a", b"A"), Put("t/b", b"B"), Delete("t/c"), Get("t/", prefix=True)],
        )
        assert result.succeeded
        assert result.revision == before + 1
        a, b = await s.get("t/a"), await s.get("t/b")
        assert a == KeyValue("t/a", b"A", before + 1, before + 1, 1, 0)
        assert b == KeyValue("t/b", b"B", before + 1, before + 1, 1, 0)
        assert result.responses == [None, None, 1, [a, b]]
        it = s.watch("t/", before)
        try:
            events = await take(it, 3)
        finally:
            await aclose(it)
        assert summary(events) == [
            ("put", "t/a", b"A"),
            ("put", "t/b", b"B"),
            ("delete", "t/c", b""),
        ]
        assert {e.revision for e in events} == {before + 1}

    h.run(body)


def test_txn_with_unknown_lease_changes_nothing(h: Harness) -> None:
    async def body(s: Store) -> None:
        before = await revision(s)
        with pytest.raises(LeaseNotFound):
            await s.txn([], [Put("x", b"1"), Put("y", b"2", lease=987654321)])
        assert await s.get("x") is None
        assert await revision(s) == before
        with pytest.raises(LeaseNotFound):
            await s.put("z", b"", lease=987654321)

    h.run(body)


# -- leases -------------------------------------------------------------------


def test_lease_grant_gives_distinct_ids(h: Harness) -> None:
    async def body(s: Store) -> None:
        ids = {await s.lease_grant(h.keepalive_ttl) for _ in range(3)}
        assert len(ids) == 3 and all(i > 0 for i in ids)

    h.run(body)


def test_lease_revoke_deletes_its_keys(h: Harness) -> None:
    async def body(s: Store) -> None:
        lease = await s.lease_grant(h.keepalive_ttl)
        await s.put("l/a", b"", lease=lease)
        await s.put("l/b", b"", lease=lease)
        await s.put("l/c", b"")
        kv = await s.get("l/a")
        assert kv is not None and kv.lease == lease
        before = await revision(s)
        await s.lease_revoke(lease)
        kvs, rev = await s.range("l/")
        assert [kv.key for kv in kvs] == ["l/c"]
        assert rev == before + 1
        with pytest.raises(LeaseNotFound):
            await s.lease_keepalive(lease)
        with pytest.raises(LeaseNotFound):
            await s.lease_revoke(lease)

    h.run(body)


def test_put_without_lease_detaches_key(h: Harness) -> None:
    async def body(s: Store) -> None:
        lease = await s.lease_grant(h.keepalive_ttl)
        await s.put("k", b"1", lease=lease)
        await s.put("k", b"2")
        await s.lease_revoke(lease)
        kv = await s.get("k")
        assert kv is not None and kv.value == b"2" and kv.lease == 0 and kv.version == 2

    h.run(body)


def test_lease_expiry_deletes_its_keys(h: Harness) -> None:
    async def body(s: Store) -> None:
        lease = await s.lease_grant(h.ttl)
        await s.put("e/1", b"", lease=lease)
        await s.put("e/2", b"")
        await h.advance(h.ttl * 1.5)

        async def expired() -> bool:
            return [kv.key for kv in (await s.range("e/"))[0]] == ["e/2"]

        await wait_for(expired, 5, what="keys of the expired lease are deleted")
        with pytest.raises(LeaseNotFound):
            await s.lease_keepalive(lease)

    h.run(body)


def test_lease_keepalive_extends(h: Harness) -> None:
    async def body(s: Store) -> None:
        ttl = h.keepalive_ttl
        lease = await s.lease_grant(ttl)
        await s.put("k", b"", lease=lease)
        await h.advance(ttl * 0.6)
        assert await s.lease_keepalive(lease) == pytest.approx(ttl)
        await h.advance(ttl * 0.6)  # 1.2 ttl since the grant, 0.6 since the keepalive
        assert await s.get("k") is not None
        assert await s.lease_keepalive(lease) == pytest.approx(ttl)

    h.run(body)


def test_lease_keepalive_after_expiry_raises(h: Harness) -> None:
    async def body(s: Store) -> None:
        lease = await s.lease_grant(h.ttl)
        await h.advance(h.ttl * 1.5)
        with pytest.raises(LeaseNotFound):
            await s.lease_keepalive(lease)

    h.run(body)


# -- watch --------------------------------------------------------------------


def test_watch_from_revision_sees_puts_and_deletes_in_order(h: Harness) -> None:
    async def body(s: Store) -> None:
        start = await s.put("w/a", b"1")
        await s.put("w/b", b"2")
        await s.put("w/a", b"3")
        await s.delete("w/b")
        await s.txn([], [Put("w/c", b"4"), Delete("w/a")])
        it = s.watch("w/", start)
        try:
            events = await take(it, 5)
        finally:
            await aclose(it)
        assert summary(events) == [
            ("put", "w/b", b"2"),
            ("put", "w/a", b"3"),
            ("delete", "w/b", b""),
            ("put", "w/c", b"4"),
            ("delete", "w/a", b""),
        ]
        assert [e.revision for e in events] == [
            start + 1,
            start + 2,
            start + 3,
            start + 4,
            start + 4,
        ]
        b, a = events[0], events[1]
        assert (b.create_revision, b.version) == (start + 1, 1)
        assert (a.create_revision, a.version) == (start, 2)

    h.run(body)


def test_watch_sees_live_events_from_another_client(h: Harness) -> None:
    async def body(s: Store) -> None:
        watcher = h.client()
        it = watcher.watch("live/", await revision(s))
        try:
            pending = asyncio.ensure_future(take(it, 3))
            await asyncio.sleep(0)
            lease = await s.lease_grant(h.keepalive_ttl)
            r1 = await s.put("live/x", b"1", lease=lease)
            await s.put("other", b"")
            await s.put("live/x", b"2")
            await s.delete("live/x")
            events = await pending
        finally:
            await aclose(it)
        assert summary(events) == [
            ("put", "live/x", b"1"),
            ("put", "live/x", b"2"),
            ("delete", "live/x", b""),
        ]
        assert events[0] == WatchEvent(EventType.PUT, "live/x", b"1", r1, r1, 1, lease)
        assert (events[1].lease, events[1].version) == (0, 2)

    h.run(body)


def test_watch_resume_from_last_seen_misses_and_repeats_nothing(h: Harness) -> None:
    async def body(s: Store) -> None:
        watcher = h.client()
        base = await revision(s)
        for i in range(3):
            await s.put(f"r/{i}", b"%d" % i)
        it = watcher.watch("r/", base)
        seen = await take(it, 2)  # from history
        for i in range(3, 6):
            await s.put(f"r/{i}", b"%d" % i)
        seen += await take(it, 2)  # r/2 (history), r/3 (live)
        await aclose(it)
        for i in range(6, 9):
            await s.put(f"r/{i}", b"%d" % i)
        it = watcher.watch("r/", seen[-1].revision)
        try:
            seen += await take(it, 5)
            await s.put("r/marker", b"")
            (marker,) = await take(it, 1)
        finally:
            await aclose(it)
        assert [e.key for e in seen] == [f"r/{i}" for i in range(9)]
        revisions = [e.revision for e in seen]
        assert revisions == sorted(set(revisions))
        assert marker.key == "r/marker"  # nothing repeated after r/8

    h.run(body)


def test_watch_filters_by_prefix(h: Harness) -> None:
    async def body(s: Store) -> None:
        base = await revision(s)
        for key in ["a/1", "b/1", "a", "ab", "a/2", "a/x/3"]:
            await s.put(key, b"")
        await s.delete("a", prefix=True)
        it = s.watch("a/", base)
        try:
            events = await take(it, 6)
            await s.put("b/2", b"")
            await s.put("a/end", b"")
            events += await take(it, 1)
        finally:
            await aclose(it)
        assert [(e.type.value, e.key) for e in events] == [
            ("put", "a/1"),
            ("put", "a/2"),
            ("put", "a/x/3"),
            ("delete", "a/1"),
            ("delete", "a/2"),
            ("delete", "a/x/3"),
            ("put", "a/end"),
        ]

    h.run(body)


def test_watch_empty_prefix_sees_everything(h: Harness) -> None:
    async def body(s: Store) -> None:
        base = await revision(s)
        await s.put("x", b"")
        await s.put("\u00ff", b"")
        it = s.watch("", base)
        try:
            events = await take(it, 2)
        finally:
            await aclose(it)
        assert [e.key for e in events] == ["x", "\u00ff"]

    h.run(body)


def test_watch_sees_lease_expiry_as_delete_events(h: Harness) -> None:
    async def body(s: Store) -> None:
        watcher = h.client()
        base = await revision(s)
        lease = await s.lease_grant(h.ttl)
        await s.put("svc/a", b"", lease=lease)
        await s.put("svc/b", b"", lease=lease)
        it = watcher.watch("svc/", base)
        try:
            puts = await take(it, 2)
            # Nobody touches the store from now on; only the watcher waits.
            await h.advance(h.ttl * 1.5)
            deletes = await take(it, 2)
        finally:
            await aclose(it)
        assert [e.type for e in puts] == [EventType.PUT, EventType.PUT]
        assert summary(deletes) == [("delete", "svc/a", b""), ("delete", "svc/b", b"")]
        assert deletes[0].revision == deletes[1].revision > puts[1].revision
        assert await s.get("svc/a") is None

    h.run(body)


def test_watch_from_compacted_revision_raises(h: Harness) -> None:
    async def body(s: Store) -> None:
        revs = [await s.put(f"c/{i}", b"") for i in range(5)]
        await h.compact(s, revs[3])
        it = s.watch("c/", revs[1])
        with pytest.raises(Compacted):
            await take(it, 1)
        it = s.watch("c/", revs[2])  # the next event, revs[3], is kept
        try:
            events = await take(it, 2)
        finally:
            await aclose(it)
        assert [e.key for e in events] == ["c/3", "c/4"]
        kvs, rev = await s.range("c/")  # recovery: snapshot + watch from its revision
        assert len(kvs) == 5 and rev == revs[4]

    h.run(body)


def test_watch_lagging_behind_compaction_raises(h: Harness) -> None:
    async def body(s: Store) -> None:
        base = await revision(s)
        it = s.watch("c/", base)
        try:
            await s.put("c/0", b"")
            await take(it, 1)
            revs = [await s.put(f"c/{i}", b"") for i in range(1, 5)]
            await h.compact(s, revs[-1])
            if h.pushes_events:
                # The server sent these events before the compaction: a live watcher
                # still yields every one of them, in order, none skipped.
                events = await take(it, 4)
                assert [(e.key, e.revision) for e in events] == [
                    (f"c/{i}", rev) for i, rev in zip(range(1, 5), revs, strict=True)
                ]
            else:
                with pytest.raises(Compacted):
                    await take(it, 1)
        finally:
            await aclose(it)

    h.run(body)


# -- backends of this repository ----------------------------------------------


def make_store(harness: Harness, **kwargs: Any) -> Store:
    if isinstance(harness, MemoryHarness):
        return MemoryStore(clock=harness.clock, **kwargs)
    assert isinstance(harness, SQLiteHarness)
    return SQLiteStore(harness.path, **kwargs)


def test_history_is_trimmed(local: Harness) -> None:
    store = make_store(local, history_limit=5)

    async def body(s: Store) -> None:
        try:
            revs = [await store.put(f"k/{i}", b"") for i in range(20)]
            with pytest.raises(Compacted) as info:
                await take(store.watch("k/", 0), 1)
            assert info.value.requested == 0
            assert revs[-5] - 1 <= info.value.oldest <= revs[-5]
            it = store.watch("k/", revs[-5])
            try:
                events = await take(it, 4)
            finally:
                await aclose(it)
            assert [e.key for e in events] == [f"k/{i}" for i in range(16, 20)]
        finally:
            await store.close()

    local.run(body)


def test_closed_store_raises_unavailable_and_ends_watches(local: Harness) -> None:
    async def body(s: Store) -> None:
        store = make_store(local)
        await store.put("k", b"")
        it = store.watch("k", 0)
        await take(it, 1)
        pending = asyncio.ensure_future(take(it, 1))
        await asyncio.sleep(0)
        await store.close()
        with pytest.raises(StoreUnavailable):
            await pending
        with pytest.raises(StoreUnavailable):
            await store.get("k")
        await store.close()  # idempotent

    local.run(body)


def test_store_survives_successive_event_loops(local: Harness) -> None:
    store = make_store(local)

    async def watch_once(key: str, put: bool) -> None:
        it = store.watch(key, await revision(store))
        pending = asyncio.ensure_future(take(it, 1))
        await asyncio.sleep(0.05)  # let the watcher block on this loop (timing, not a condition)
        if put:
            await store.put(key, b"")
            (event,) = await pending
            assert event.key == key
        else:
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
        await aclose(it)

    asyncio.run(watch_once("a", put=False))
    asyncio.run(watch_once("b", put=True))
    asyncio.run(store.close())


def test_memory_watcher_sees_expiry_quickly() -> None:
    clock = FakeClock()

    async def main() -> None:
        store = MemoryStore(clock=clock)
        lease = await store.lease_grant(5)
        await store.put("k", b"", lease=lease)
        it = store.watch("k", 0)
        try:
            await take(it, 1)
            pending = asyncio.ensure_future(take(it, 1))
            await asyncio.sleep(0)
            clock.advance(6)
            start = time.monotonic()
            (event,) = await pending
            assert event.type is EventType.DELETE
            assert time.monotonic() - start < 1.0  # ~20 ms normally
        finally:
            await aclose(it)
            await store.close()

    asyncio.run(main())


# -- open_store ---------------------------------------------------------------


def test_open_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    store = open_store(f"sqlite://{tmp_path}/s.db")
    assert isinstance(store, SQLiteStore) and store.path == f"{tmp_path}/s.db"
    with pytest.raises(StoreUnavailable, match="absolute"):
        open_store("sqlite://relative/s.db")
    etcd = open_store("etcd://127.0.0.1:2379,h2,[::1]:2380")
    assert isinstance(etcd, EtcdStore)
    assert etcd.endpoints == ["http://127.0.0.1:2379", "http://h2:2379", "http://[::1]:2380"]
    for bad in ["etcd://", "etcd://h1,", "etcd://h1:99999", "etcd://h1/x", "etcd://h:port"]:
        with pytest.raises(StoreUnavailable, match="expected sqlite:///"):
            open_store(bad)
    with pytest.raises(StoreUnavailable, match=r"redis://x.*expected sqlite:///"):
        open_store("redis://x")
    assert isinstance(open_store("memory://"), Store)


# -- SQLite: files ------------------------------------------------------------


def run(coro: Awaitable[None]) -> None:
    async def main() -> None:
        await coro

    asyncio.run(main())


def test_sqlite_missing_directory_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "store.db"
    with pytest.raises(StoreUnavailable, match=str(path)):
        SQLiteStore(path)
    with pytest.raises(StoreUnavailable, match=str(path)):
        open_store(f"sqlite://{path}")


def test_sqlite_unopenable_file_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "dir.db"
    path.mkdir()

    async def main() -> None:
        store = SQLiteStore(path)
        try:
            with pytest.raises(StoreUnavailable, match=str(path)):
                await store.get("k")
        finally:
            await store.close()

    run(main())


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("garbage", "not a readable vigil store"),
        ("foreign", "not a vigil store"),
        ("version", "schema version 99"),
        ("no-history", "table history is missing"),
        ("no-column", "table kv lacks column"),
    ],
)
def test_sqlite_bad_file_is_corrupt(tmp_path: Path, setup: str, message: str) -> None:
    path = tmp_path / "store.db"

    async def make_store() -> None:
        store = SQLiteStore(path)
        await store.put("k", b"")
        await store.close()

    if setup == "garbage":
        path.write_bytes(b"this is not an sqlite database, it is a text file\n" * 100)
    elif setup == "foreign":
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE t (x)")
        conn.close()
    else:
        run(make_store())
        statement = {
            "version": "UPDATE meta SET value = 99 WHERE name = 'schema_version'",
            "no-history": "DROP TABLE history",
            "no-column": "ALTER TABLE kv DROP COLUMN lease",
        }[setup]
        conn = sqlite3.connect(path, isolation_level=None)
        if setup == "no-column":
            conn.execute("DROP INDEX kv_lease")
        conn.execute(statement)
        conn.close()

    async def main() -> None:
        store = SQLiteStore(path)
        try:
            with pytest.raises(StoreCorrupt, match=message) as info:
                await store.get("k")
            assert str(path) in str(info.value)
        finally:
            await store.close()

    run(main())


def test_sqlite_locked_past_busy_timeout_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "store.db"

    async def main() -> None:
        first = SQLiteStore(path)
        await first.put("k", b"1")
        await first.close()
        blocker = sqlite3.connect(path, isolation_level=None)
        store = SQLiteStore(path, busy_timeout=0.2)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            assert (await store.get("k")) is not None  # WAL: readers still read
            with pytest.raises(StoreUnavailable, match="locked") as info:
                await store.put("k", b"2")
            assert str(path) in str(info.value)
            blocker.execute("ROLLBACK")
            await store.put("k", b"3")
        finally:
            blocker.close()
            await store.close()

    run(main())


def test_sqlite_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "store.db"

    async def main() -> None:
        async with SQLiteStore(path) as store:
            r1 = await store.put("k", b"v")
        async with SQLiteStore(path) as store:
            assert await store.get("k") == KeyValue("k", b"v", r1, r1, 1, 0)
            assert await store.put("k2", b"") == r1 + 1
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()

    run(main())


def test_sqlite_leases_of_a_previous_boot_expire_on_open(tmp_path: Path) -> None:
    path = tmp_path / "store.db"

    async def before_reboot() -> None:
        async with SQLiteStore(path) as store:
            lease = await store.lease_grant(3600)
            await store.put("held", b"", lease=lease)

    run(before_reboot())
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE meta SET value = 'another-boot' WHERE name = 'boot_id'")
    conn.close()

    async def after_reboot() -> None:
        async with SQLiteStore(path) as store:
            assert await store.get("held") is None
            it = store.watch("held", 0)
            try:
                events = await take(it, 2)
            finally:
                await aclose(it)
            assert [e.type for e in events] == [EventType.PUT, EventType.DELETE]

    run(after_reboot())


# -- SQLite: real processes ---------------------------------------------------

LEASE_HOLDER = """
import asyncio, sys
from vigil.store import SQLiteStore

async def main():
    store = SQLiteStore(sys.argv[1])
    ttl = float(sys.argv[2])
    lease = await store.lease_grant(ttl)
    await store.put("svc/holder", b"alive", lease=lease)
    print("ready", lease, flush=True)
    loop = asyncio.get_running_loop()
    start, announced = loop.time(), False
    while True:
        await asyncio.sleep(ttl / 5)
        await store.lease_keepalive(lease)
        if not announced and loop.time() - start > 2 * ttl:
            print("renewed", flush=True)
            announced = True

asyncio.run(main())
"""

CAS_INCREMENTER = """
import asyncio, sys
from vigil.store import Compare, Put, SQLiteStore

async def main(n):
    store = SQLiteStore(sys.argv[1])
    conflicts = 0
    try:
        for _ in range(n):
            while True:
                kv = await store.get("counter")
                if kv is None:
                    compare, value = Compare.absent("counter"), 0
                else:
                    compare, value = Compare.mod_revision("counter", kv.mod_revision), int(kv.value)
                result = await store.txn([compare], [Put("counter", b"%d" % (value + 1))])
                if result.succeeded:
                    break
                conflicts += 1
    finally:
        await store.close()
    print("done", conflicts, flush=True)

print("ready", flush=True)
sys.stdin.readline()
asyncio.run(main(int(sys.argv[2])))
"""


async def readline(proc: asyncio.subprocess.Process, timeout: float = 20.0) -> str:
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        line = await proc.stdout.readline()
    assert line, "child process exited early"
    return line.decode().strip()


async def reap(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    await proc.communicate()


@pytest.mark.slow
def test_sqlite_lease_of_killed_process_expires_for_watchers(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    ttl = 0.5

    async def main() -> None:
        watcher = SQLiteStore(path)
        it = watcher.watch("svc/", 0)
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", LEASE_HOLDER, str(path), str(ttl), stdout=asyncio.subprocess.PIPE
        )
        try:
            word, lease = (await readline(child)).split()
            assert word == "ready"
            (put,) = await take(it, 1, timeout=10)
            assert (put.type, put.key, put.lease) == (EventType.PUT, "svc/holder", int(lease))
            assert await readline(child) == "renewed"  # kept alive past 2 ttl
            assert await watcher.get("svc/holder") is not None
            child.send_signal(signal.SIGKILL)
            await child.communicate()
            # This process only watches: its poller must reap the dead holder's lease.
            (gone,) = await take(it, 1, timeout=10)
            assert (gone.type, gone.key) == (EventType.DELETE, "svc/holder")
            with pytest.raises(LeaseNotFound):
                await watcher.lease_keepalive(int(lease))
        finally:
            await reap(child)
            await aclose(it)
            await watcher.close()

    run(main())


@pytest.mark.slow
def test_sqlite_concurrent_cas_increments_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    n = 200

    async def main() -> None:
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CAS_INCREMENTER,
                str(path),
                str(n),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            for _ in range(2)
        ]
        try:
            for proc in procs:
                assert await readline(proc) == "ready"
            for proc in procs:  # start both at once
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
            async with asyncio.timeout(60):
                outputs = await asyncio.gather(*(proc.communicate() for proc in procs))
            assert [proc.returncode for proc in procs] == [0, 0]
            assert all(out.startswith(b"done") for out, _ in outputs)
        finally:
            for proc in procs:
                await reap(proc)
        async with SQLiteStore(path) as store:
            kv = await store.get("counter")
            assert kv is not None
            assert (kv.value, kv.version) == (b"%d" % (2 * n), 2 * n)

    run(main())
