"""The agent's event log writer (agent/events.py) on a real SQLite store: keys that
always increase, and trimming back to the newest KEPT events in transactions small
enough for etcd."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from vigil.agent import events
from vigil.agent.events import EventLog
from vigil.keys import Keys
from vigil.model import PackageState, PackageStatus
from vigil.store import Compare, Op, Put, TxnResult, open_store


def test_events_are_ordered_and_trimmed_to_the_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "KEPT", 250)
    monkeypatch.setattr(events, "TRIM_EVERY", 100)
    keys = Keys("c")

    async def scenario() -> list[dict[str, object]]:
        store = open_store(f"sqlite:///{tmp_path}/store.db")
        try:
            log = EventLog(store, keys, "n1")
            status = PackageStatus(state=PackageState.RUNNING, node="n1", message="started")
            for i in range(399):  # the 300th write starts a trim in the background
                await store.txn([], [log.op(f"p{i}", PackageState.STARTING, status)], [])
            await log.trim()  # and the rest
            kvs, _ = await store.range(keys.events)
            return [json.loads(kv.value) for kv in kvs]
        finally:
            await store.close()

    kept = asyncio.run(scenario())
    assert [e["package"] for e in kept] == [f"p{i}" for i in range(149, 399)]
    times = [e["time"] for e in kept]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert kept[-1] == kept[-1] | {"node": "n1", "from_state": "starting", "to_state": "running"}
    assert kept[-1]["reason"] == "started"


def test_trim_uses_transactions_etcd_accepts(tmp_path: Path) -> None:
    """etcd refuses a transaction of more than 128 operations: 400 old events are
    deleted in several."""
    keys = Keys("c")
    sizes: list[int] = []

    async def scenario() -> int:
        store = open_store(f"sqlite:///{tmp_path}/store.db")
        real_txn = store.txn

        async def txn(
            compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
        ) -> TxnResult:
            sizes.append(len(success))
            return await real_txn(compares, success, failure)

        try:
            for start in range(0, events.KEPT + 400, 100):
                await store.txn(
                    [],
                    [Put(keys.event(n + 1, "n1"), b"{}") for n in range(start, start + 100)],
                    [],
                )
            store.txn = txn  # type: ignore[method-assign]  # count what trim sends
            await EventLog(store, keys, "n1").trim()
            kvs, _ = await store.range(keys.events)
            return len(kvs)
        finally:
            await store.close()

    assert asyncio.run(scenario()) == events.KEPT
    assert sum(sizes) == 400 and max(sizes) <= 128


def test_vigil_events_orders_nodes_by_store_order_not_their_clocks(tmp_path: Path) -> None:
    """n2's wall clock is an hour behind n1's: n2's event, written after n1's, is still
    shown after it (trimming keeps the newest by store order too)."""
    from vigil.testing.cluster import LocalCluster

    with LocalCluster(tmp_path, ["n1", "n2"]) as c:
        c.write_package('name = "web"\n')
        c.apply()
        keys = Keys("test")
        status = PackageStatus(state=PackageState.RUNNING, node="n1", message="on n1")
        behind = PackageStatus(state=PackageState.HALTED, node="n2", message="on n2, later")

        async def write() -> None:
            store = open_store(c.store_url)
            try:
                n1, n2 = EventLog(store, keys, "n1"), EventLog(store, keys, "n2")
                first = n1.op("web", PackageState.STARTING, status)
                await store.txn([], [first], [])
                later = n2.op("web", PackageState.RUNNING, behind)
                late_ns = int(first.key.rsplit("/", 1)[1].split(".")[0]) - 3600 * 10**9
                await store.txn([], [Put(keys.event(late_ns, "n2"), later.value)], [])
            finally:
                await store.close()

        asyncio.run(write())
        lines = c.vigil("events").stdout.splitlines()
        assert [line.split()[2] for line in lines] == ["n1", "n2"], lines
        shown = [json.loads(x) for x in c.vigil("events", "--json").stdout.splitlines()]
        assert [e["reason"] for e in shown] == ["on n1", "on n2, later"]
