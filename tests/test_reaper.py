"""Peer expiry of node leases (agent/reaper.py): a peer declares a node dead only once
it has seen no newer heartbeat write for the node's ttl, on its own clock, and only
if that write is still the newest when it acts.

Pure unit tests (the clock is a parameter) and the reaper loop on the memory store;
the agents on a real etcd are in test_failover.py
(test_host_of_the_etcd_leader_lost_fails_over_within_bound).
"""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from vigil.agent.reaper import HeartbeatClock, reap, reap_silent_nodes
from vigil.keys import Keys
from vigil.model import HeartbeatRecord
from vigil.snapshot import encode
from vigil.store import KeyValue, MemoryStore, Put

KEYS = Keys("c")


def beat(node: str, rev: int, ttl: float = 3.0, lease: int = 7) -> KeyValue:
    value = encode(HeartbeatRecord(ttl=ttl, seq=rev))
    return KeyValue(KEYS.heartbeat(node), value, 1, rev, rev, lease)


def test_silent_only_after_its_ttl_since_first_seen() -> None:
    clock = HeartbeatClock()
    assert clock.observe([beat("n2", 5)], 100.0) == []
    assert clock.observe([beat("n2", 5)], 102.9) == []
    [s] = clock.observe([beat("n2", 5)], 103.0)
    assert (s.node, s.mod_revision, s.lease, s.ttl) == ("n2", 5, 7, 3.0)
    assert s.silent_for == 3.0


def test_a_newer_write_restarts_the_clock() -> None:
    clock = HeartbeatClock()
    clock.observe([beat("n2", 5)], 100.0)
    assert clock.observe([beat("n2", 6)], 102.5) == []
    assert clock.observe([beat("n2", 6)], 105.4) == []
    assert [s.mod_revision for s in clock.observe([beat("n2", 6)], 105.5)] == [6]


def test_own_unreadable_and_leaseless_heartbeats_are_left_alone() -> None:
    clock = HeartbeatClock(skip=KEYS.heartbeat("n1"))
    junk = KeyValue(KEYS.heartbeat("n3"), b"{not json", 1, 4, 1, 7)
    beats = [beat("n1", 3), junk, beat("n4", 2, lease=0)]
    clock.observe(beats, 0.0)
    assert clock.observe(beats, 99.0) == []
    assert clock.next_due() is None


def test_the_watch_and_reads_count_whichever_shows_a_write_first() -> None:
    """The watch shows revision 9 at t=1; a read from a lagging member still shows 8 at
    t=2 (ignored) and then 9 at t=3 (seen already): n2 is silent from t=1 + ttl."""
    clock = HeartbeatClock()
    clock.observe([beat("n2", 8)], 0.0)
    b9 = beat("n2", 9)
    clock.saw(b9.key, b9.mod_revision, b9.lease, b9.value, 1.0)
    assert clock.observe([beat("n2", 8)], 2.0) == []
    assert clock.observe([b9], 3.9) == []
    assert [s.mod_revision for s in clock.observe([b9], 4.0)] == [9]
    clock.forget(b9.key)  # deleted (a watch DELETE event)
    assert clock.next_due() is None


def test_each_node_has_its_own_ttl_and_forgetting_starts_over() -> None:
    clock = HeartbeatClock()
    clock.observe([beat("n2", 5, ttl=2.0), beat("n3", 6, ttl=5.0)], 0.0)
    assert [s.node for s in clock.observe([beat("n2", 5, 2.0), beat("n3", 6, 5.0)], 2.0)] == ["n2"]
    clock.forget(KEYS.heartbeat("n2"))
    assert clock.observe([beat("n2", 5, 2.0), beat("n3", 6, 5.0)], 3.0) == []


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(0.0, 0.8), min_size=1, max_size=20),  # gaps between writes
    st.lists(st.tuples(st.floats(0.0, 0.6), st.integers(0, 3)), min_size=1, max_size=40),
    st.floats(0.5, 3.0),
)
def test_never_silent_before_ttl_after_the_write_was_sent(
    gaps: list[float], reads: list[tuple[float, int]], ttl: float
) -> None:
    """Writes are sent (and committed) at increasing times; each read returns one of the
    writes committed before it (the newest, or up to 3 older: a lagging member). Any
    node declared silent wrote its revision at least ttl before."""
    sent = []
    t = 0.0
    for gap in gaps:
        t += gap
        sent.append(t)
    clock = HeartbeatClock()
    now = 0.0
    for pause, lag in reads:
        now += pause
        committed = [i for i, at in enumerate(sent) if at <= now]
        if not committed:
            continue
        rev = committed[max(0, len(committed) - 1 - lag)]
        for s in clock.observe([beat("n2", rev + 1, ttl=ttl)], now):
            assert now - sent[s.mod_revision - 1] >= ttl


def test_reap_loses_to_a_newer_heartbeat() -> None:
    """The node wrote again between the check and the delete: nothing is deleted."""

    async def scenario() -> tuple[bool, bool]:
        store = MemoryStore()
        lease = await store.lease_grant(60)
        key = KEYS.heartbeat("n2")
        await store.put(key, encode(HeartbeatRecord(ttl=1.0, seq=0)), lease)
        found, _ = await store.range(KEYS.heartbeats)
        clock = HeartbeatClock()
        clock.observe(found, 0.0)
        [s] = clock.observe(found, 1.0)
        await store.put(key, encode(HeartbeatRecord(ttl=1.0, seq=1)), lease)
        lost = await reap(store, s)
        return lost, await store.get(key) is not None

    assert asyncio.run(scenario()) == (False, True)


def test_loop_revokes_a_silent_node_and_spares_a_live_one() -> None:
    """n2 stops writing, n3 keeps writing; the reaper of n1 (fake clock) deletes n2's
    heartbeat and revokes its lease (its node key goes with it) once ttl has passed
    since it first saw n2's last write, and never touches n3 or itself."""

    async def scenario() -> tuple[list[str], list[str]]:
        store = MemoryStore()
        now = [0.0]
        leases = {}
        for node in ("n1", "n2", "n3"):
            leases[node] = await store.lease_grant(600)  # the store itself never expires them
            rec = encode(HeartbeatRecord(ttl=1.0, seq=0))
            await store.txn(
                [],
                [
                    Put(KEYS.node(node), b"{}", leases[node]),
                    Put(KEYS.heartbeat(node), rec, leases[node]),
                ],
            )
        beats = HeartbeatClock(skip=KEYS.heartbeat("n1"))
        task = asyncio.create_task(
            reap_silent_nodes(store, KEYS, beats, 0.005, clock=lambda: now[0])
        )
        before: list[str] = []
        for step in range(40):
            now[0] = step * 0.05
            rec = encode(HeartbeatRecord(ttl=1.0, seq=step + 1))
            await store.put(KEYS.heartbeat("n3"), rec, leases["n3"])
            await asyncio.sleep(0.02)
            if now[0] < 0.95:
                found, _ = await store.range(KEYS.nodes)
                before = [kv.key for kv in found]
        task.cancel()
        found, _ = await store.range(KEYS.nodes)
        return before, [kv.key for kv in found]

    before, after = asyncio.run(scenario())
    assert before == [KEYS.node("n1"), KEYS.node("n2"), KEYS.node("n3")]
    assert after == [KEYS.node("n1"), KEYS.node("n3")]


def test_a_forged_short_ttl_counts_as_this_agents_node_timeout() -> None:
    """Any etcd client can write a heartbeat record: a ttl shorter than the agent's own
    node_timeout must not make a live (or merely stalled) node look dead sooner."""
    clock = HeartbeatClock(min_ttl=3.0)
    clock.observe([beat("n2", 5, ttl=0.001)], 0.0)
    assert clock.observe([beat("n2", 5, ttl=0.001)], 2.9) == []
    [s] = clock.observe([beat("n2", 5, ttl=0.001)], 3.0)
    assert s.ttl == 3.0
    clock.observe([beat("n2", 5, ttl=0.001), beat("n3", 1, ttl=5.0)], 3.0)  # longer: the writer's
    assert clock.next_due() == 3.0 and [x.node for x in clock.silent(7.9)] == ["n2"]


def test_next_due_is_the_earliest_ttl_end_of_what_can_be_revoked() -> None:
    clock = HeartbeatClock()
    assert clock.next_due() is None
    clock.observe([beat("n2", 5, ttl=2.0), beat("n3", 6, ttl=5.0), beat("n4", 1, lease=0)], 10.0)
    assert clock.next_due() == 12.0
    clock.observe([beat("n2", 7, ttl=2.0), beat("n3", 6, ttl=5.0)], 11.0)
    assert clock.next_due() == 13.0
