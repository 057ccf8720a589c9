"""TxnBatcher (group commit) on a real in-process store: joins, falls back, keeps meaning."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from vigil.agent.batcher import TxnBatcher
from vigil.errors import StoreUnavailable
from vigil.store import Compare, MemoryStore, Put, TxnResult


def sync(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """A plain test that runs the coroutine ``fn`` in a fresh event loop."""

    @functools.wraps(fn)
    def run() -> None:
        asyncio.run(asyncio.wait_for(fn(), 30))

    return run


def claim(key: str) -> tuple[list[Compare], list[Put]]:
    return [Compare.absent(key)], [Put(key, b"n1"), Put(key + "/status", b"starting")]


@sync
async def test_concurrent_transactions_are_joined_at_one_revision() -> None:
    store = MemoryStore()
    b = TxnBatcher(store)
    results = await asyncio.gather(*(b.txn(*claim(f"/o/p{i}")) for i in range(50)))
    assert all(r.succeeded for r in results)
    # all 50 queued before the batcher ran: one transaction, one revision
    assert b.sent == 1 and b.joined == 50
    assert len({r.revision for r in results}) == 1
    for i in range(50):
        kv = await store.get(f"/o/p{i}")
        assert kv is not None and kv.mod_revision == results[i].revision


@sync
async def test_a_failing_compare_gives_each_its_own_answer() -> None:
    store = MemoryStore()
    await store.put("/o/p3", b"n2")  # someone else holds p3
    b = TxnBatcher(store)
    results = await asyncio.gather(*(b.txn(*claim(f"/o/p{i}")) for i in range(6)))
    assert [r.succeeded for r in results] == [True, True, True, False, True, True]
    assert (await store.get("/o/p3")).value == b"n2"  # type: ignore[union-attr]
    assert await store.get("/o/p3/status") is None


@sync
async def test_same_key_never_joined_and_op_limit_respected() -> None:
    store = MemoryStore()
    b = TxnBatcher(store, max_ops=4)
    seen: list[int] = []
    real = store.txn

    async def counting(compares, success, failure=()):  # type: ignore[no-untyped-def]
        seen.append(len(success))
        return await real(compares, success, failure)

    store.txn = counting  # type: ignore[method-assign]
    puts = [b.txn([], [Put("/k", str(i).encode())]) for i in range(3)]
    puts += [b.txn([], [Put(f"/x{i}", b"v")]) for i in range(8)]
    results: list[TxnResult] = await asyncio.gather(*puts)
    assert all(r.succeeded for r in results)
    assert max(seen) <= 4
    assert (await store.get("/k")).value == b"2"  # type: ignore[union-attr]  # in order


@sync
async def test_store_error_reaches_every_caller_of_the_batch() -> None:
    store = MemoryStore()
    b = TxnBatcher(store)

    async def down(*_a: object, **_k: object) -> TxnResult:
        raise StoreUnavailable("store down")

    store.txn = down  # type: ignore[method-assign]
    results = await asyncio.gather(*(b.txn(*claim(f"/o/p{i}")) for i in range(5)),
                                   return_exceptions=True)  # fmt: skip
    assert all(isinstance(r, StoreUnavailable) for r in results)


@sync
async def test_cancelled_caller_is_skipped() -> None:
    store = MemoryStore()
    b = TxnBatcher(store)
    first = asyncio.create_task(b.txn(*claim("/o/a")))
    second = asyncio.create_task(b.txn(*claim("/o/b")))
    await asyncio.sleep(0)
    second.cancel()
    assert (await first).succeeded
    with pytest.raises(asyncio.CancelledError):
        await second
