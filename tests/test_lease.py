"""The node lease keeper (agent/lease.py) against a scripted store: renewals on
schedule, riding out a store that fails for a while (an etcd election), and giving
up, always before the lease could have expired in the store.

A pure unit test: the store is a fake whose ``lease_keepalive`` answers, fails or
hangs as each test says. The agents on real stores are covered in test_failover.py
(an etcd leader killed twice, nobody fences) and test_agent_fence.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

import pytest

from vigil.agent.lease import FENCE_SELF, LeaseKeeper, renewal_budget
from vigil.errors import LeaseNotFound, StoreUnavailable
from vigil.store import Store

TTL = 1.5


class ScriptedStore:
    """``lease_keepalive`` fails (``mode`` "fail"), hangs ("hang"), reports the lease
    gone ("gone") or answers ("ok"); every call is recorded with its time."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.calls: list[tuple[float, str]] = []

    async def lease_keepalive(self, lease_id: int) -> float:
        self.calls.append((time.monotonic(), self.mode))
        if self.mode == "fail":
            raise StoreUnavailable("etcd unavailable: etcdserver: no leader")
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "gone":
            raise LeaseNotFound(f"lease {lease_id:x} not found")
        return TTL


def keeper(store: ScriptedStore, armed: list[float], stalled: bool = False) -> LeaseKeeper:
    return LeaseKeeper(cast(Store, store), 0x42, TTL, arm=armed.append, stalled=lambda: stalled)


async def lost_within(k: LeaseKeeper, seconds: float) -> str | None:
    """Why the keeper gave up, or None if it still renews after ``seconds``."""
    task = asyncio.create_task(k.renew_until_lost())
    done, _ = await asyncio.wait([task], timeout=seconds)
    if not done:
        task.cancel()
        return None
    return task.result()


def test_budget_never_reaches_past_the_fence_point() -> None:
    assert renewal_budget(3.0, last_ok=0.0, now=0.5) == pytest.approx(1.0)  # a third of the TTL
    assert renewal_budget(3.0, last_ok=0.0, now=1.5) == pytest.approx(0.3)  # 1.8 - 1.5
    assert renewal_budget(3.0, last_ok=0.0, now=1.8) <= 0


def test_renews_on_schedule_and_arms_the_sentinel() -> None:
    store, armed = ScriptedStore(), []
    assert asyncio.run(lost_within(keeper(store, armed), 1.2)) is None
    assert 3 <= len(store.calls) <= 6  # every TTL/6 = 0.25 s
    assert len(armed) == len(store.calls)


def test_rides_out_a_store_that_fails_for_a_while(caplog: pytest.LogCaptureFixture) -> None:
    """An etcd election: renewals fail for 0.4 s (less than 0.6 x TTL minus one interval);
    the keeper retries every TTL/30, so the first renewal after the store is back comes
    at once, and the node does not fence."""
    store, armed = ScriptedStore(), []

    async def scenario() -> tuple[str | None, float]:
        async def election() -> float:
            await asyncio.sleep(0.3)
            store.mode = "fail"
            await asyncio.sleep(0.4)
            store.mode = "ok"
            return time.monotonic()

        back = asyncio.create_task(election())
        why = await lost_within(keeper(store, armed), 1.5)
        return why, await back

    caplog.set_level("INFO", logger="vigil.agent")
    why, back = asyncio.run(scenario())
    assert why is None
    failed = [t for t, mode in store.calls if mode == "fail"]
    assert len(failed) >= 3, store.calls  # retried, not one try per interval
    first_ok_after = min(t for t, mode in store.calls if mode == "ok" and t >= back)
    assert first_ok_after - back < 0.2
    warnings = [r.message for r in caplog.records if "renewal failed" in r.message]
    assert len(warnings) == 1  # one line per episode, then a summary when it ends
    assert any("lease renewed after" in r.message for r in caplog.records)


@pytest.mark.parametrize("mode", ["fail", "hang"])
def test_gives_up_before_the_lease_can_expire(mode: str) -> None:
    """The store fails (or hangs) for good: the keeper says why, after 0.6 x TTL since
    its last good renewal and well before the lease (TTL) could expire."""
    store, armed = ScriptedStore(), []

    async def scenario() -> tuple[str | None, float]:
        k = keeper(store, armed)
        task = asyncio.create_task(k.renew_until_lost())
        while not armed:
            await asyncio.sleep(0.01)
        store.mode = mode
        why = await asyncio.wait_for(task, TTL * 2)
        return why, time.monotonic()

    why, gave_up = asyncio.run(scenario())
    assert why is not None and why.startswith("cannot renew the node lease: "), why
    last_ok = armed[-1]
    assert TTL * FENCE_SELF - 0.01 <= gave_up - last_ok < TTL, (gave_up - last_ok, why)
    if mode == "fail":
        assert "no leader" in why
    else:
        assert "no answer within" in why


def test_lease_gone_and_stalled_agent_fence_at_once() -> None:
    store, armed = ScriptedStore(), []
    store.mode = "gone"
    assert (asyncio.run(lost_within(keeper(store, armed), 1.0)) or "").startswith(
        "node lease expired"
    )
    store.mode = "ok"
    why = asyncio.run(lost_within(keeper(store, armed, stalled=True), 1.0))
    assert why == "the lease deadline passed (the agent was stalled)"
    assert armed == []


def test_a_renewal_counts_only_with_its_heartbeat() -> None:
    """Where peers expire a silent node's lease (etcd, agent/reaper.py), a renewal also
    writes the heartbeat: while that write fails the sentinel is not re-armed, and
    once a peer has deleted the heartbeat key the node fences at once."""
    store, armed = ScriptedStore(), []
    beats: list[str] = []
    state = {"mode": "ok"}

    async def heartbeat() -> None:
        beats.append(state["mode"])
        if state["mode"] == "fail":
            raise StoreUnavailable("etcd unavailable: etcdserver: no leader")
        if state["mode"] == "gone":
            raise LeaseNotFound("this node's heartbeat key was deleted or replaced")

    def make() -> LeaseKeeper:
        return LeaseKeeper(
            cast(Store, store), 0x42, TTL, arm=armed.append, stalled=lambda: False,
            heartbeat=heartbeat,
        )  # fmt: skip

    async def failing() -> tuple[str, float]:
        task = asyncio.create_task(make().renew_until_lost())
        while not armed:
            await asyncio.sleep(0.01)
        state["mode"] = "fail"  # keepalives still succeed
        why = await asyncio.wait_for(task, TTL * 2)
        return why, time.monotonic()

    why, gave_up = asyncio.run(failing())
    assert why.startswith("cannot renew the node lease: etcd unavailable"), why
    assert TTL * FENCE_SELF - 0.01 <= gave_up - armed[-1] < TTL
    assert len(armed) == beats.index("fail")  # every ok round armed, no failed one did

    state["mode"] = "gone"
    why = asyncio.run(lost_within(make(), 1.0)) or ""
    assert why.startswith("node lease expired (this node's heartbeat key was deleted"), why
