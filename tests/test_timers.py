"""The controller's clock (agent/timers.py, agent/controller.py): pure, clocks passed in.

Every time limit the controller enforces is measured on its own monotonic clock, and
each has a deadline the controller wakes up for. Here the monotonic clock and the wall
clock are two fake clocks stepped apart: a wall-clock step (NTP, an operator's
``date -s``) must neither fire a limit early nor hold it up.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vigil.agent.controller import Controller, expected_nodes
from vigil.agent.timers import FailureClock, PlacementClock, earliest
from vigil.config import ClusterSpec, DependencySpec, PackageSpec
from vigil.keys import Keys
from vigil.model import (
    AdminRecord,
    Assignment,
    NodeRecord,
    PackageState,
    PackageStatus,
)
from vigil.plan.planner import Verb
from vigil.snapshot import Snapshot
from vigil.store.memory import MemoryStore
from vigil.testing import FakeClock

WALL = 1_700_000_000.0


def controller(mono: FakeClock, wall: FakeClock) -> Controller:
    return Controller(MemoryStore(), Keys("c"), "n1", 3.0, lambda: None, clock=mono, wall=wall)


def snap(packages: list[PackageSpec], up: list[str], **kw: Any) -> Snapshot:
    return Snapshot(
        revision=1,
        cluster=ClusterSpec(name="c", store="memory://", **kw.pop("cluster", {})),
        packages={p.name: p for p in packages},
        nodes={n: NodeRecord(name=n, pid=1) for n in up},
        owners=kw.pop("owners", {}),
        owner_revisions={},
        status=kw.pop("status", {}),
        admin=kw.pop("admin", {}),
        controller="n1",
        **kw,
    )


def moving_db(timeout: str = "5s") -> Snapshot:
    """db moved to n2 by an operator while app (up, same_node on db) runs on n1."""
    db = PackageSpec(name="db", nodes=["n1", "n2"], successor_halt_timeout=timeout)
    app = PackageSpec(name="app", nodes=["n1", "n2"], dependency=[DependencySpec(package="db")])
    running = {p: PackageStatus(state=PackageState.RUNNING, node="n1") for p in ("db", "app")}
    return snap(
        [db, app],
        ["n1", "n2"],
        owners={"db": "n1", "app": "n1"},
        status=running,
        admin={"db": AdminRecord(start_node="n2")},
    )


def step(c: Controller, s: Snapshot, mono: FakeClock, wall: FakeClock) -> Snapshot:
    """One controller round: plan, and keep what it would write in the store."""
    _, stored = c.plan_for(s, mono(), wall())
    return dataclasses.replace(s, assignments=stored)


def test_successor_halt_timeout_is_not_fired_early_by_a_wall_clock_step() -> None:
    mono, wall = FakeClock(500.0), FakeClock(WALL)
    c = controller(mono, wall)
    s = step(c, moving_db(), mono, wall)
    assert s.assignments["db"].reason.startswith("halt_wait")
    assert c.wake_at == 505.0  # a timer for the timeout, 5 s on this clock
    # the wall clock jumps an hour ahead, one second passes: still waiting
    wall.advance(3600)
    mono.advance(1)
    s = step(c, s, mono, wall)
    assert s.assignments["db"].node == "n1"
    assert s.assignments["db"].reason.startswith("halt_wait")
    assert c.wake_at == 505.0
    # ... and a step back does not hold it up: at 5 s it moves
    wall.now = WALL - 3600
    mono.advance(4)
    result, stored = c.plan_for(s, mono(), wall())
    assert stored["db"].node == "n2"
    assert "successor_halt_timeout passed for app" in stored["db"].reason
    assert [a.verb for a in result.actions if a.package == "db"] == [Verb.MOVE]


def test_the_store_keeps_wall_clock_times_for_display() -> None:
    mono, wall = FakeClock(500.0), FakeClock(WALL)
    c = controller(mono, wall)
    s = step(c, moving_db(), mono, wall)
    assert s.assignments["db"].since == WALL
    mono.advance(2)
    wall.advance(2)
    again = step(c, s, mono, wall)
    assert again.assignments["db"] == s.assignments["db"]  # unchanged: not written again


def test_a_new_controller_counts_the_wait_from_when_it_first_saw_it() -> None:
    """It cannot read its predecessor's monotonic clock: the wait may last longer
    across a controller change, never shorter, whatever the stored wall time says."""
    mono, wall = FakeClock(500.0), FakeClock(WALL)
    s = step(controller(mono, wall), moving_db(), mono, wall)
    mono.advance(4)
    wall.advance(4)
    other = FakeClock(80.0)  # another node, another clock
    successor = controller(other, wall)
    s = step(successor, s, other, wall)
    assert s.assignments["db"].reason.startswith("halt_wait")
    assert successor.wake_at == 85.0


def test_placement_clock_maps_only_its_own_records() -> None:
    pc = PlacementClock()
    mine = Assignment(node="n1", reason="halt_wait: x", since=WALL)
    pc.to_store({"db": mine.model_copy(update={"since": 10.0})}, {}, now=12.0, wall=WALL)
    stored = {"db": mine.model_copy(update={"since": WALL - 2.0})}
    assert pc.localize(stored, now=20.0)["db"].since == 10.0
    # the same assignment rewritten by somebody else: counted from now
    other = {"db": mine.model_copy(update={"since": WALL + 7.0})}
    assert pc.localize(other, now=21.0)["db"].since == 21.0


def test_failure_timeout_counts_on_the_monotonic_clock_from_the_first_sighting() -> None:
    spec = PackageSpec(name="web", failure_timeout="30s")
    failed = AdminRecord(disabled_nodes=("n1",), failed_nodes={"n1": WALL - 10_000.0})
    s = snap([spec], ["n1", "n2"], admin={"web": failed})
    fc = FailureClock()
    assert fc.expired(s, 100.0) == ([], 130.0)  # an old wall time means nothing
    assert fc.expired(s, 129.9) == ([], 130.0)
    assert fc.expired(s, 130.0) == ([("web", "n1")], None)
    # a new failure (another time stamp) starts its own clock
    again = AdminRecord(disabled_nodes=("n1",), failed_nodes={"n1": WALL})
    assert fc.expired(snap([spec], ["n1"], admin={"web": again}), 131.0) == ([], 161.0)


def test_failures_do_not_expire_without_failure_timeout() -> None:
    failed = AdminRecord(disabled_nodes=("n1",), failed_nodes={"n1": WALL})
    s = snap([PackageSpec(name="web")], ["n1", "n2"], admin={"web": failed})
    assert FailureClock().expired(s, 1e9) == ([], None)


def test_switching_on_clears_the_failure_but_not_other_nodes() -> None:
    a = AdminRecord(disabled_nodes=("n1", "n2"), failed_nodes={"n1": 1.0, "n2": 2.0})
    assert a.switching_on("n1") == AdminRecord(disabled_nodes=("n2",), failed_nodes={"n2": 2.0})


def test_the_controller_wakes_for_the_next_failure_expiry() -> None:
    mono, wall = FakeClock(500.0), FakeClock(WALL)
    c = controller(mono, wall)
    spec = PackageSpec(name="web", failure_timeout="30s")
    failed = AdminRecord(disabled_nodes=("n1",), failed_nodes={"n1": WALL})
    c.plan_for(snap([spec], ["n1", "n2"], admin={"web": failed}), mono(), wall())
    assert c.wake_at == 530.0


def test_formation_waits_for_the_nodes_named_in_packages() -> None:
    """No nodes list in cluster.toml: the nodes named in packages' lists are expected;
    a package that never ran waits for them up to the formation bound."""
    mono, wall = FakeClock(500.0), FakeClock(WALL)
    c = controller(mono, wall)
    web = PackageSpec(name="web", nodes=["n2", "n1"])
    s = snap([web, PackageSpec(name="any")], ["n1"])
    assert expected_nodes(s) == ["n1", "n2"]
    result, stored = c.plan_for(s, mono(), wall())
    assert stored["web"].node is None and "n2 not up yet" in stored["web"].reason
    assert c.wake_at == 506.0  # 2 x node_timeout, on a timer
    mono.advance(6)
    _, stored = c.plan_for(s, mono(), wall())
    assert stored["web"].node == "n1"  # n2 never came: the next node in the list
    assert c.wake_at is None


def test_formation_bound_is_a_setting() -> None:
    mono, wall = FakeClock(500.0), FakeClock(WALL)
    c = controller(mono, wall)
    s = snap([PackageSpec(name="web", nodes=["n2", "n1"])], ["n1"],
             cluster={"formation_timeout": "20s"})  # fmt: skip
    c.plan_for(s, mono(), wall())
    assert c.wake_at == 520.0
    # with cluster.toml's nodes list, only those are waited for
    listed = snap([PackageSpec(name="web", nodes=["n2", "n1"])], ["n1"],
                  cluster={"nodes": ["n1"]})  # fmt: skip
    assert expected_nodes(listed) == ["n1"]
    _, stored = c.plan_for(listed, mono(), wall())
    assert stored["web"].node == "n1"


def test_earliest() -> None:
    assert earliest([None, 3.0, 1.0]) == 1.0
    assert earliest([None]) is None
