"""The per-node decision function: pure, tested on hand-made snapshots."""

from __future__ import annotations

import dataclasses
from typing import Any

from vigil.agent.decide import LocalPackage, Verb, after_start_failure, decide
from vigil.config import ClusterSpec, PackageSpec
from vigil.model import (
    AdminRecord,
    Assignment,
    HaltReason,
    NodeRecord,
    PackageState,
    PackageStatus,
    StartReason,
)
from vigil.plan.planner import node_order, plan
from vigil.snapshot import Snapshot


def snap(
    packages: list[PackageSpec],
    up: list[str],
    *,
    owners: dict[str, str] | None = None,
    status: dict[str, PackageStatus] | None = None,
    admin: dict[str, AdminRecord] | None = None,
    cluster: dict[str, Any] | None = None,
    assignments: dict[str, Assignment] | None = None,
    planned: bool = True,
) -> Snapshot:
    s = Snapshot(
        revision=1,
        cluster=ClusterSpec(name="c", store="memory://", **(cluster or {})),
        packages={p.name: p for p in packages},
        nodes={n: NodeRecord(name=n, pid=1) for n in up},
        owners=owners or {},
        owner_revisions={p: 1 for p in (owners or {})},
        status=status or {},
        admin=admin or {},
        assignments=assignments or {},
    )
    if planned and assignments is None:  # what the controller would have assigned
        s = dataclasses.replace(s, assignments=plan(s, 0.0).assignments)
    return s


def pkg(name: str = "web", **kw: Any) -> PackageSpec:
    return PackageSpec(name=name, **kw)


def test_first_up_node_in_preference_order_starts_it() -> None:
    s = snap([pkg(nodes=["b", "a"])], up=["a", "b"])
    assert [d.verb for d in decide(s, "b", {})] == [Verb.START]
    assert decide(s, "a", {}) == []


def test_star_means_every_node_by_name() -> None:
    s = snap([pkg()], up=["n2", "n1"])
    assert node_order(s.packages["web"], s) == ["n1", "n2"]
    d = decide(s, "n1", {})
    assert d[0].verb is Verb.START
    assert d[0].start_reason is not None and d[0].start_reason.value == "boot"


def test_owned_elsewhere_is_left_alone() -> None:
    s = snap([pkg()], up=["n1", "n2"], owners={"web": "n2"})
    assert decide(s, "n1", {}) == []


def test_auto_run_off_failed_and_maintenance_do_not_start() -> None:
    for admin, status in [
        (AdminRecord(auto_run=False), None),
        (AdminRecord(maintenance=True), None),
        (AdminRecord(), PackageStatus(state=PackageState.FAILED, node="n1")),
        (AdminRecord(), PackageStatus(state=PackageState.HALT_FAILED, node="n1")),
    ]:
        s = snap([pkg()], up=["n1"], admin={"web": admin}, status={"web": status} if status else {})
        assert decide(s, "n1", {}) == [], (admin, status)


def test_node_switching_off_skips_node() -> None:
    s = snap([pkg()], up=["n1", "n2"], admin={"web": AdminRecord(disabled_nodes=("n1",))})
    assert decide(s, "n1", {}) == []
    assert decide(s, "n2", {})[0].verb is Verb.START


def test_failover_reason_and_cluster_failover_off() -> None:
    st = PackageStatus(state=PackageState.HALTED, node="n1", halt_reason=HaltReason.FAILURE)
    s = snap([pkg()], up=["n2"], status={"web": st})
    d = decide(s, "n2", {})
    assert d[0].start_reason is not None and d[0].start_reason.value == "failover"
    off = snap([pkg()], up=["n2"], status={"web": st}, cluster={"failover": "off"})
    assert decide(off, "n2", {}) == []


def test_held_package_halt_clear_release_maintenance() -> None:
    running = LocalPackage(PackageState.RUNNING, maintenance=False, cleared_generation=0)
    s = snap(
        [pkg()], up=["n1"], owners={"web": "n1"}, admin={"web": AdminRecord(halt_requested=True)}
    )
    d = decide(s, "n1", {"web": running})
    assert d[0].verb is Verb.HALT and d[0].halt_reason is HaltReason.USER_HALT

    failed = LocalPackage(PackageState.HALT_FAILED, maintenance=False, cleared_generation=0)
    s = snap(
        [pkg()], up=["n1"], owners={"web": "n1"}, admin={"web": AdminRecord(clear_generation=1)}
    )
    assert decide(s, "n1", {"web": failed})[0].verb is Verb.CLEAR
    s = snap([pkg()], up=["n1"], owners={"web": "n1"})
    assert decide(s, "n1", {"web": failed}) == []

    s = snap([pkg()], up=["n1"], owners={"web": "n1"}, admin={"web": AdminRecord(maintenance=True)})
    assert decide(s, "n1", {"web": running})[0].verb is Verb.MAINTENANCE_ON

    s = snap([], up=["n1"], owners={"web": "n1"})
    assert decide(s, "n1", {"web": running})[0].verb is Verb.HALT


def test_busy_package_gets_no_decision() -> None:
    starting = LocalPackage(PackageState.STARTING, maintenance=False, cleared_generation=0)
    s = snap(
        [pkg()], up=["n1"], owners={"web": "n1"}, admin={"web": AdminRecord(halt_requested=True)}
    )
    assert decide(s, "n1", {"web": starting}) == []


def test_up_dependency_waits() -> None:
    web = pkg("web", dependency=[{"package": "db", "condition": "up", "location": "same_node"}])
    db = pkg("db")
    s = snap([web, db], up=["n1"])
    assert [(d.package, d.verb) for d in decide(s, "n1", {})] == [("db", Verb.START)]
    assert s.assignments["web"].node is None
    assert s.assignments["web"].reason.startswith("start_wait: needs db up on same node")
    running_db = PackageStatus(state=PackageState.RUNNING, node="n1")
    s = snap([web, db], up=["n1"], owners={"db": "n1"}, status={"db": running_db})
    assert [d.verb for d in decide(s, "n1", {})] == [Verb.START]


def test_min_package_node() -> None:
    a = pkg("a", failover_policy="min_package_node")
    s = snap([a, pkg("b")], up=["n1", "n2"], owners={"b": "n1"})
    assert decide(s, "n2", {})[0].package == "a"
    assert [d.package for d in decide(s, "n1", {})] == []


def test_after_start_failure_table() -> None:
    spec = pkg()
    one = snap([spec], up=["n1"])
    two = snap([spec], up=["n1", "n2"])
    # exit 1 / timeout: global switching off, failed
    r = after_start_failure(spec, AdminRecord(), two, "n1", failover=False, wall=5.0)
    assert r.state is PackageState.FAILED and r.admin.auto_run is False
    assert r.admin.failed_nodes == {}
    # exit 2 with another node: node switching off here, halted for n2 to take
    r = after_start_failure(spec, AdminRecord(), two, "n1", failover=True, wall=5.0)
    assert r.state is PackageState.HALTED and r.admin.disabled_nodes == ("n1",)
    assert r.admin.auto_run is True
    # ... recorded as a failure's (failure_timeout turns it on again), with its time
    assert r.admin.failed_nodes == {"n1": 5.0}
    # exit 2 alone: failed
    r = after_start_failure(spec, AdminRecord(), one, "n1", failover=True, wall=5.0)
    assert r.state is PackageState.FAILED and r.admin.disabled_nodes == ("n1",)


def test_failure_on_a_node_an_operator_switched_off_stays_the_operators() -> None:
    """`package disable -n n1` while it runs on n1, then it fails there: n1 stays off
    until an operator turns it on (failure_timeout does not expire an operator's off)."""
    spec = pkg()
    two = snap([spec], up=["n1", "n2"])
    off = AdminRecord(disabled_nodes=("n1",))
    r = after_start_failure(spec, off, two, "n1", failover=True, wall=5.0)
    assert r.admin.disabled_nodes == ("n1",) and r.admin.failed_nodes == {}
    # a node off after an earlier failure: the new failure restarts its clock
    failed = AdminRecord(disabled_nodes=("n1",), failed_nodes={"n1": 1.0})
    r = after_start_failure(spec, failed, two, "n1", failover=True, wall=5.0)
    assert r.admin.failed_nodes == {"n1": 5.0}


def test_operator_restart_is_carried_out_once_while_running() -> None:
    s = snap([pkg()], up=["n1"], owners={"web": "n1"},
             admin={"web": AdminRecord(restart_generation=2)})  # fmt: skip
    running = LocalPackage(PackageState.RUNNING, False, 0, restart_generation=1)
    [d] = decide(s, "n1", {"web": running})
    assert d.verb is Verb.RESTART and d.start_reason is StartReason.RESTART
    assert d.halt_reason is HaltReason.USER_HALT
    done = LocalPackage(PackageState.RUNNING, False, 0, restart_generation=2)
    assert decide(s, "n1", {"web": done}) == []
    starting = LocalPackage(PackageState.STARTING, False, 0, restart_generation=1)
    assert decide(s, "n1", {"web": starting}) == []


def test_no_assignment_no_start() -> None:
    s = snap([pkg()], up=["n1"], planned=False)
    assert decide(s, "n1", {}) == []


def test_assignment_is_checked_again_on_fresh_data() -> None:
    a = {"web": Assignment(node="n1", reason="boot on n1", start_reason=StartReason.BOOT)}
    assert decide(snap([pkg()], up=["n1"], assignments=a), "n1", {})[0].verb is Verb.START
    # the package got switched off after the controller planned: no start
    off = {"web": AdminRecord(auto_run=False)}
    assert decide(snap([pkg()], up=["n1"], assignments=a, admin=off), "n1", {}) == []
    disabled = {"web": AdminRecord(disabled_nodes=("n1",))}
    assert decide(snap([pkg()], up=["n1"], assignments=a, admin=disabled), "n1", {}) == []


def test_held_package_assigned_elsewhere_halts() -> None:
    running = LocalPackage(PackageState.RUNNING, maintenance=False, cleared_generation=0)
    a = {
        "web": Assignment(
            node="n2", reason="failback to preferred node n2", halt_reason=HaltReason.AUTOMATIC_HALT
        )
    }
    s = snap([pkg()], up=["n1", "n2"], owners={"web": "n1"}, assignments=a)
    d = decide(s, "n1", {"web": running})
    assert d[0].verb is Verb.HALT
    assert d[0].halt_reason is HaltReason.AUTOMATIC_HALT
    assert d[0].reason == "failback to preferred node n2"


def test_an_operator_halt_waits_for_the_plan_that_halts_dependents_first() -> None:
    """`package halt db` while web (up, same_node on db) runs: the controller halts web
    first (db halt_wait); db's node halts db only once the plan points it away."""
    db, web = pkg("db"), pkg("web", dependency=[{"package": "db"}])
    running = {p: PackageStatus(state=PackageState.RUNNING, node="n1") for p in ("db", "web")}
    local = {p: LocalPackage(PackageState.RUNNING, False, 0) for p in ("db", "web")}
    halt = {"db": AdminRecord(auto_run=False, halt_requested=True)}
    before = snap([db, web], up=["n1"], owners={"db": "n1", "web": "n1"}, status=running,
                  planned=False, assignments={p: Assignment(node="n1") for p in ("db", "web")})  # fmt: skip
    # the request is seen before the controller planned it: nothing yet
    assert decide(dataclasses.replace(before, admin=halt), "n1", local) == []
    planned = dataclasses.replace(before, admin=halt)
    planned = dataclasses.replace(planned, assignments=plan(planned, 0.0).assignments)
    assert planned.assignments["db"].reason.startswith("halt_wait")
    [d] = decide(planned, "n1", local)
    assert (d.package, d.verb, d.halt_reason) == ("web", Verb.HALT, HaltReason.AUTOMATIC_HALT)
    # web halted and released: now db halts
    gone = dataclasses.replace(
        planned, owners={"db": "n1"}, status={**running, "web": PackageStatus(node="n1")}
    )
    gone = dataclasses.replace(gone, assignments=plan(gone, 1.0).assignments)
    [d] = decide(gone, "n1", {"db": local["db"]})
    assert (d.package, d.verb, d.halt_reason) == ("db", Verb.HALT, HaltReason.USER_HALT)
