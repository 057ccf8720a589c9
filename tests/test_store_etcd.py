"""etcd-specific tests of ``EtcdStore``, against one real 3-member etcd cluster.

The contract itself is tested in ``test_store_contract.py``; here: several
endpoints, member restarts under a watch, compaction, unreachable endpoints,
lease expiry, and the places where the backend makes up for etcd's semantics.
Each test uses keys under its own prefix, and leaves every member running.
Without an etcd binary these tests are skipped (failed in CI).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from vigil.errors import Compacted, LeaseNotFound, StoreCorrupt, StoreUnavailable
from vigil.store import Compare, Delete, EventType, Get, Put, WatchEvent, open_store
from vigil.store.etcd import EtcdStore
from vigil.testing import wait_for
from vigil.testing.etcd import EtcdCluster, require_etcd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    binary = require_etcd()
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), members=3, binary=binary) as c:
        yield c


@pytest.fixture
def members_back(cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The cluster; every member stopped by the test is started again afterwards."""
    try:
        yield cluster
    finally:
        for i in range(cluster.members):
            if not cluster.running(i):
                cluster.start_member(i)


def closed_port_url() -> str:
    """An http:// URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def silent_endpoint() -> Iterator[str]:
    """An http:// URL on 127.0.0.1 that accepts connections and never answers, like
    a member whose host froze."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        yield f"http://127.0.0.1:{silent.getsockname()[1]}"


def run(coro: object) -> None:
    async def main() -> None:
        await coro  # type: ignore[misc]

    asyncio.run(main())


async def take(it: AsyncIterator[WatchEvent], n: int, timeout: float = 10.0) -> list[WatchEvent]:
    async with asyncio.timeout(timeout):
        return [await anext(it) for _ in range(n)]


def keys_revs(events: list[WatchEvent]) -> list[tuple[str, str, int]]:
    return [(e.type.value, e.key, e.revision) for e in events]


async def wait_leader(cluster: EtcdCluster) -> int:
    """Until the running members agree on a running leader; its index."""
    found: list[int] = []

    def agreed() -> bool:
        leader = cluster.leader()
        if leader is None or not cluster.running(leader):
            return False
        found.append(leader)
        return True

    await wait_for(lambda: asyncio.to_thread(agreed), 15, interval=0.05, what="an etcd leader")
    return found[-1]


# -- endpoints ----------------------------------------------------------------


def test_first_endpoint_dead_uses_the_next_and_remembers_it(cluster: EtcdCluster) -> None:
    dead = closed_port_url()

    async def main() -> None:
        async with EtcdStore([dead, *cluster.endpoints]) as store:
            revision = await store.put("ep/k", b"v")
            assert store.endpoint == cluster.endpoint(0)  # the one that answered
            kv = await store.get("ep/k")
            assert kv is not None and kv.mod_revision == revision
        url = cluster.url.replace("etcd://", f"etcd://{dead.removeprefix('http://')},")
        store2 = open_store(url)
        try:
            assert isinstance(store2, EtcdStore) and store2.endpoints[0] == dead
            assert (await store2.get("ep/k")) is not None
        finally:
            await store2.close()

    run(main())


def test_all_endpoints_down_is_unavailable_quickly() -> None:
    dead = [closed_port_url() for _ in range(3)]

    async def main() -> None:
        async with EtcdStore(dead, timeout=2) as store:
            start = time.monotonic()
            with pytest.raises(StoreUnavailable) as info:
                await store.get("k")
            assert time.monotonic() - start < 2
            assert all(url in str(info.value) for url in dead)
            with pytest.raises(StoreUnavailable):
                await store.put("k", b"")  # refused connections: not sent, so not "unknown"
        # A watch gives up after watch_reconnect seconds.
        async with EtcdStore(dead, watch_reconnect=0.5) as store:
            start = time.monotonic()
            with pytest.raises(StoreUnavailable, match="watch"):
                await take(store.watch("k", 0), 1)
            assert time.monotonic() - start < 5

    run(main())


def test_silent_endpoint_times_out() -> None:
    # A socket that listens but never answers: connecting works, the reply never comes.
    with silent_endpoint() as url:

        async def main() -> None:
            async with EtcdStore([url], timeout=0.5, watch_reconnect=0.5) as store:
                start = time.monotonic()
                with pytest.raises(StoreUnavailable, match=url):
                    await store.get("k")
                with pytest.raises(StoreUnavailable, match="may or may not have been applied"):
                    await store.put("k", b"")
                assert time.monotonic() - start < 3
                with pytest.raises(StoreUnavailable, match="watch"):
                    await take(store.watch("k", 0), 1)
                assert time.monotonic() - start < 8

        run(main())


def test_keepalive_asks_the_next_member_when_one_hangs(cluster: EtcdCluster) -> None:
    """A lease keepalive is hedged: with a first endpoint that accepts connections and
    never answers, the renewal is answered by the next member long before the
    request to the silent one times out, and the next renewal starts there."""
    with silent_endpoint() as url:

        async def main() -> None:
            async with EtcdStore(cluster.endpoints) as granter:
                lease = await granter.lease_grant(5)
                async with EtcdStore([url, *cluster.endpoints], timeout=2.0) as store:
                    start = time.monotonic()
                    assert await store.lease_keepalive(lease) == 5
                    took = time.monotonic() - start
                    assert took < 1.5, f"the keepalive waited {took:.2f}s on the silent member"
                    assert store.endpoint == cluster.endpoint(0)
                    await granter.lease_revoke(lease)
                    with pytest.raises(LeaseNotFound):
                        await store.lease_keepalive(lease)

        run(main())


def test_read_asks_the_next_member_when_one_hangs(cluster: EtcdCluster) -> None:
    """A read is hedged like a keepalive: with a first endpoint that accepts
    connections and never answers, it is answered by the next member after a fifth
    of the timeout, not after the timeout, and the next request starts there."""
    with silent_endpoint() as url:

        async def main() -> None:
            async with EtcdStore(cluster.endpoints) as writer:
                revision = await writer.put("hedge/k", b"v")
            async with EtcdStore([url, *cluster.endpoints], timeout=5.0) as store:
                start = time.monotonic()
                kv = await store.get("hedge/k")
                took = time.monotonic() - start
                assert kv is not None and kv.mod_revision == revision
                assert took < 2.5, f"the read waited {took:.2f}s on the silent member"
                assert store.endpoint == cluster.endpoint(0)

        run(main())


def test_stores_sharing_members_leave_a_frozen_member_together(
    members_back: EtcdCluster,
) -> None:
    """An agent's two clients (requests and watch with a 5 s timeout; lease renewals
    with a short one) ask the same member first. When that member freezes (its host
    died without closing a connection), the renewal finds it out in a fraction of a
    second, and from then on the other client's reads go elsewhere at once and its
    watch moves too: nothing waits for the 5 s timeout or for watch_idle."""
    cluster = members_back
    prefix = "shared/"

    async def main() -> None:
        leader = await wait_leader(cluster)
        victim = (leader + 1) % 3  # a follower: no election in this test
        others = [cluster.endpoint(i) for i in range(3) if i != victim]
        endpoints = [cluster.endpoint(victim), *others]
        store = EtcdStore(endpoints, timeout=5.0, watch_idle=5.0)
        renewer = EtcdStore(endpoints, timeout=1.0, share_with=store)
        writer = EtcdStore(others)
        try:
            lease = await writer.lease_grant(5)
            base = (await store.range(prefix))[1]
            watch = store.watch(prefix, base)
            first = await writer.put(f"{prefix}0", b"0")
            assert keys_revs(await take(watch, 1)) == [("put", f"{prefix}0", first)]
            assert store.endpoint == renewer.endpoint == cluster.endpoint(victim)
            cluster.pause_member(victim)
            try:
                start = time.monotonic()
                assert await renewer.lease_keepalive(lease) == 5  # hedged after 0.2 s
                assert time.monotonic() - start < 1.0
                assert store.endpoint != cluster.endpoint(victim)  # shared: moved too
                second = await writer.put(f"{prefix}1", b"1")
                assert keys_revs(await take(watch, 1, timeout=10)) == [
                    ("put", f"{prefix}1", second)
                ]
                kv = await store.get(f"{prefix}1")
                took = time.monotonic() - start
                assert kv is not None and kv.mod_revision == second
                assert took < 2.0, f"the watch and a read took {took:.2f}s to leave the member"
            finally:
                cluster.resume_member(victim)
            await watch.aclose()  # type: ignore[attr-defined]
        finally:
            for s in (store, renewer, writer):
                await s.close()

    run(main())


def test_share_with_needs_the_same_endpoints(cluster: EtcdCluster) -> None:
    store = EtcdStore(cluster.endpoints)
    with pytest.raises(ValueError, match="other endpoints"):
        EtcdStore(cluster.endpoints[:2], share_with=store)


def test_member_without_quorum_refuses_in_bounded_time(members_back: EtcdCluster) -> None:
    cluster = members_back

    async def main() -> None:
        async with EtcdStore([cluster.endpoint(0)], timeout=1, watch_reconnect=1) as store:
            base = await store.put("quorum/a", b"")
            it = store.watch("quorum/", base - 1)
            assert [e.key for e in await take(it, 1)] == ["quorum/a"]
            for i in (1, 2):
                await asyncio.to_thread(cluster.kill_member, i)
            start = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.get("quorum/a")
            with pytest.raises(StoreUnavailable):
                await store.put("quorum/b", b"")
            # The member closes the watch once it has no leader ("hasleader" metadata).
            with pytest.raises(StoreUnavailable, match="watch"):
                await take(it, 1, timeout=20)
            assert time.monotonic() - start < 15
            for i in (1, 2):
                await asyncio.to_thread(cluster.start_member, i)
            await wait_leader(cluster)
            assert (await store.get("quorum/a")) is not None

    run(main())


# -- watches across member restarts -------------------------------------------


@pytest.mark.parametrize("how", ["stop-leader", "kill-leader", "kill-follower"])
def test_watch_survives_restart_of_its_member(members_back: EtcdCluster, how: str) -> None:
    cluster = members_back
    prefix = f"restart-{how}/"

    async def main() -> None:
        leader = await wait_leader(cluster)
        victim = leader if how.endswith("leader") else (leader + 1) % 3
        others = [cluster.endpoint(i) for i in range(3) if i != victim]
        # Both watchers are connected to the victim; one knows no other member.
        any_member = EtcdStore([cluster.endpoint(victim), *others])
        only_victim = EtcdStore([cluster.endpoint(victim)])
        writer = EtcdStore(others)
        late = EtcdStore([cluster.endpoint(victim), *others])  # prefers the victim
        try:
            base = (await late.range(prefix))[1]
            expected: list[tuple[str, str, int]] = []

            async def put(i: int) -> None:
                revision = await writer.put(f"{prefix}{i:02}", b"%d" % i)
                expected.append(("put", f"{prefix}{i:02}", revision))

            for i in range(3):
                await put(i)
            watches = [any_member.watch(prefix, base), only_victim.watch(prefix, base)]
            seen: list[list[WatchEvent]] = [await take(w, 3) for w in watches]
            assert any_member.endpoint == cluster.endpoint(victim)
            if how.startswith("stop"):
                await asyncio.to_thread(cluster.stop_member, victim)
            else:
                await asyncio.to_thread(cluster.kill_member, victim)
            await wait_leader(cluster)  # a new one if the victim led
            # A store whose preferred member died moves on to the next one.
            revision = await late.put(f"{prefix}03", b"3")
            expected.append(("put", f"{prefix}03", revision))
            assert late.endpoint != cluster.endpoint(victim)
            for i in range(4, 6):
                await put(i)
            result = await writer.txn(
                [], [Put(f"{prefix}a", b""), Put(f"{prefix}b", b""), Delete(f"{prefix}00")]
            )
            expected += [
                ("put", f"{prefix}a", result.revision),
                ("put", f"{prefix}b", result.revision),
                ("delete", f"{prefix}00", result.revision),
            ]
            # The watcher that knows other members goes on while the victim is down.
            seen[0] += await take(watches[0], 6)
            assert any_member.endpoint != cluster.endpoint(victim)
            await asyncio.to_thread(cluster.start_member, victim)
            for i in range(6, 9):
                await put(i)
            seen[0] += await take(watches[0], 3)
            seen[1] += await take(watches[1], 9)  # resumed on the victim once it was back
            for events in seen:
                assert keys_revs(events) == expected
            # Nothing repeated after the last one either.
            await put(9)
            for w in watches:
                assert keys_revs(await take(w, 1)) == expected[-1:]
            for w in watches:
                await w.aclose()  # type: ignore[attr-defined]
        finally:
            for store in (any_member, only_victim, writer, late):
                await store.close()

    run(main())


def test_watch_on_a_frozen_member_moves_on(members_back: EtcdCluster) -> None:
    """A member frozen by SIGSTOP keeps its connections open and silent (the kernel
    even answers TCP keepalives): the watch on it is created again after watch_idle
    seconds without a message, the frozen member does not confirm it within the
    timeout, and the watch goes on on another member without losing an event; a
    request that timed out on the frozen member is not sent there first again."""
    cluster = members_back
    prefix = "frozen/"

    async def main() -> None:
        leader = await wait_leader(cluster)
        victim = (leader + 1) % 3  # a follower: no election in this test
        others = [cluster.endpoint(i) for i in range(3) if i != victim]
        store = EtcdStore([cluster.endpoint(victim), *others], timeout=1, watch_idle=1)
        writer = EtcdStore(others)
        try:
            base = (await store.range(prefix))[1]
            watch = store.watch(prefix, base)
            first = await writer.put(f"{prefix}0", b"0")
            assert keys_revs(await take(watch, 1)) == [("put", f"{prefix}0", first)]
            assert store.endpoint == cluster.endpoint(victim)
            cluster.pause_member(victim)
            try:
                second = await writer.put(f"{prefix}1", b"1")
                start = time.monotonic()
                assert keys_revs(await take(watch, 1, timeout=10)) == [
                    ("put", f"{prefix}1", second)
                ]
                took = time.monotonic() - start
                assert took < 5, f"the watch moved on only after {took:.1f}s"
                kv = await store.get(f"{prefix}1")  # the watch moved on already
                assert kv is not None and store.endpoint != cluster.endpoint(victim)
            finally:
                cluster.resume_member(victim)
            await watch.aclose()  # type: ignore[attr-defined]
        finally:
            for s in (store, writer):
                await s.close()

    run(main())


# -- compaction ---------------------------------------------------------------


def test_compaction_raises_compacted(members_back: EtcdCluster) -> None:
    cluster = members_back

    async def main() -> None:
        async with EtcdStore(cluster.endpoints) as store:
            revs = [await store.put(f"compact/{i}", b"") for i in range(4)]
            await store.compact(revs[2])
            await store.compact(revs[1])  # older than the last compaction: nothing to do
            with pytest.raises(ValueError, match="future"):
                await store.compact(revs[-1] + 1000)
            with pytest.raises(Compacted) as info:
                await take(store.watch("compact/", revs[0]), 1)
            assert (info.value.requested, info.value.oldest) == (revs[0], revs[2])
            it = store.watch("compact/", revs[1])  # the next event is at revs[2]: kept
            assert [e.key for e in await take(it, 2)] == ["compact/2", "compact/3"]
            await it.aclose()  # type: ignore[attr-defined]

    run(main())


def test_watch_resuming_below_a_compaction_raises_compacted(members_back: EtcdCluster) -> None:
    cluster = members_back

    async def main() -> None:
        watcher = EtcdStore([cluster.endpoint(0)])
        writer = EtcdStore([cluster.endpoint(1), cluster.endpoint(2)])
        try:
            base = await writer.put("gone/0", b"")
            it = watcher.watch("gone/", base - 1)
            assert [e.key for e in await take(it, 1)] == ["gone/0"]
            await asyncio.to_thread(cluster.kill_member, 0)
            await wait_leader(cluster)
            revs = [await writer.put(f"gone/{i}", b"") for i in range(1, 4)]
            await writer.compact(revs[-1])  # the watcher's next event is gone
            await asyncio.to_thread(cluster.start_member, 0)
            with pytest.raises(Compacted) as info:
                await take(it, 1)
            assert info.value.requested == base
            # Recovery: a snapshot, then a watch from its revision.
            kvs, rev = await watcher.range("gone/")
            assert len(kvs) == 4
            it = watcher.watch("gone/", rev)
            await writer.delete("gone/", prefix=True)
            assert len(await take(it, 4)) == 4
            await it.aclose()  # type: ignore[attr-defined]
        finally:
            await watcher.close()
            await writer.close()

    run(main())


# -- leases -------------------------------------------------------------------


def test_lease_expiry_is_seen_by_a_watcher(cluster: EtcdCluster) -> None:
    async def main() -> None:
        holder = EtcdStore([cluster.endpoint(1)])
        watcher = EtcdStore([cluster.endpoint(2)])
        try:
            base = (await watcher.range("expiry/"))[1]
            lease = await holder.lease_grant(1)
            await holder.put("expiry/holder", b"alive", lease=lease)
            await holder.close()  # the holder is gone: nobody renews
            start = time.monotonic()
            events = await take(watcher.watch("expiry/", base), 2, timeout=10)
            assert [(e.type, e.key) for e in events] == [
                (EventType.PUT, "expiry/holder"),
                (EventType.DELETE, "expiry/holder"),
            ]
            assert events[0].lease == lease
            assert time.monotonic() - start < 4
            with pytest.raises(LeaseNotFound):
                await watcher.lease_keepalive(lease)
        finally:
            await holder.close()
            await watcher.close()

    run(main())


def test_lease_ttl_is_whole_seconds_rounded_up(cluster: EtcdCluster) -> None:
    async def main() -> None:
        async with EtcdStore(cluster.endpoints) as store:
            short = await store.lease_grant(0.2)
            assert await store.lease_keepalive(short) == 1.0
            longer = await store.lease_grant(1.5)
            assert await store.lease_keepalive(longer) == 2.0
            with pytest.raises(ValueError):
                await store.lease_grant(0)
            for lease in (short, longer):
                await store.lease_revoke(lease)
                with pytest.raises(LeaseNotFound):
                    await store.lease_revoke(lease)

    run(main())


# -- transactions -------------------------------------------------------------


def test_value_compare_on_absent_key_is_atomic_under_contention(cluster: EtcdCluster) -> None:
    """``value == b""`` holds for an absent key (emulated): exactly one writer wins."""

    async def main() -> None:
        stores = [EtcdStore(cluster.endpoints[i % 3 :]) for i in range(6)]
        try:
            await stores[0].delete("race/", prefix=True)

            async def attempt(i: int) -> bool:
                result = await stores[i].txn(
                    [Compare.value_is("race/lock", b"")],
                    [Put("race/lock", b"%d" % i), Get("race/lock")],
                    [Get("race/lock")],
                )
                return result.succeeded

            wins = await asyncio.gather(*(attempt(i) for i in range(len(stores))))
            assert sum(wins) == 1
            kv = await stores[0].get("race/lock")
            assert kv is not None and kv.value == b"%d" % wins.index(True) and kv.version == 1
            # Present with an empty value: the compare holds again (etcd's own compare).
            await stores[0].put("race/lock", b"")
            assert (await stores[0].txn([Compare.value_is("race/lock", b"")], [])).succeeded
            assert not (
                await stores[0].txn([Compare("race/lock", "value", "!=", b"")], [])
            ).succeeded
        finally:
            for store in stores:
                await store.close()

    run(main())


def test_txn_that_etcd_refuses_is_rejected_before_sending(cluster: EtcdCluster) -> None:
    async def main() -> None:
        async with EtcdStore(cluster.endpoints) as store:
            before = (await store.range(""))[1]
            with pytest.raises(ValueError, match="twice"):
                await store.txn([], [Put("dup/a", b"1"), Put("dup/a", b"2")])
            with pytest.raises(ValueError, match="twice"):
                await store.txn([], [], [Delete("dup/", prefix=True), Put("dup/x", b"")])
            with pytest.raises(TypeError):
                await store.txn([Compare("dup/a", "mod", "==", b"1")], [])
            assert (await store.range(""))[1] == before

    run(main())


# -- errors -------------------------------------------------------------------


def test_key_that_is_not_utf8_is_corrupt(cluster: EtcdCluster) -> None:
    raw_key = base64.b64encode(b"corrupt/\xff\xfe").decode()

    async def main() -> None:
        async with httpx.AsyncClient() as http:
            reply = await http.post(
                cluster.endpoint(0) + "/v3/kv/put", json={"key": raw_key, "value": ""}
            )
            assert reply.status_code == 200
        async with EtcdStore(cluster.endpoints) as store:
            try:
                with pytest.raises(StoreCorrupt, match="not UTF-8"):
                    await store.range("corrupt/")
            finally:
                assert await store.delete("corrupt/", prefix=True) == 1

    run(main())


def test_close_ends_a_pending_watch(cluster: EtcdCluster) -> None:
    async def main() -> None:
        store = EtcdStore(cluster.endpoints)
        revision = await store.put("closing/k", b"")
        it = store.watch("closing/", revision - 1)
        await take(it, 1)
        pending = asyncio.ensure_future(take(it, 1))
        await asyncio.sleep(0.05)  # let the watcher block on its stream (timing, not a condition)
        await store.close()
        with pytest.raises(StoreUnavailable, match="closed"):
            await pending
        with pytest.raises(StoreUnavailable, match="closed"):
            await store.get("closing/k")
        await store.close()  # idempotent

    run(main())


def test_cluster_helper(cluster: EtcdCluster) -> None:
    assert len(cluster.endpoints) == 3
    assert cluster.url == "etcd://" + ",".join(e.removeprefix("http://") for e in cluster.endpoints)
    assert all(cluster.healthy(i) for i in range(3))
