"""What one node should do next, decided from one snapshot. Pure: no I/O, no clock.

The agent calls ``decide`` after every store change and after every operation it
finishes, and carries out the decisions for packages that are not busy. Safety
does not rest on this function: a start happens only after the owner key was
created (create-if-absent, bound to the node lease), so two nodes that both
decide to start a package cannot both run it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from vigil.config import PackageSpec
from vigil.model import AdminRecord, HaltReason, PackageState, PackageStatus, StartReason
from vigil.plan.planner import eligible_nodes
from vigil.snapshot import Snapshot


class Verb(enum.StrEnum):
    START = "start"
    HALT = "halt"
    CLEAR = "clear"  # reset failed / halt_failed held by this node, release the owner key
    RELEASE = "release"  # a halted package held by this node: give the owner key back
    MAINTENANCE_ON = "maintenance_on"
    MAINTENANCE_OFF = "maintenance_off"
    DETACH = "detach"  # node halted with --detach: keep running, stop watching
    ATTACH = "attach"  # node started again: watch again
    WAIT = "wait"  # would start here, but an `up` dependency is not met yet
    RESTART = "restart"  # `vigil package restart`: halt and start again here


@dataclass(frozen=True)
class Decision:
    package: str
    verb: Verb
    reason: str
    start_reason: StartReason | None = None
    halt_reason: HaltReason | None = None


@dataclass(frozen=True)
class LocalPackage:
    """What the agent itself knows about a package it holds."""

    state: PackageState
    maintenance: bool
    cleared_generation: int
    restart_generation: int = 0  # the operator restarts carried out (AdminRecord's)


def start_reason(status: PackageStatus, node: str) -> StartReason:
    if status.node is None:
        return StartReason.BOOT
    if status.node != node and status.node_left:
        return StartReason.FAILOVER  # as plan.planner.start_reason_for
    if status.halt_reason == HaltReason.USER_HALT:
        return StartReason.USER
    if status.node != node:
        return StartReason.FAILOVER
    return StartReason.BOOT


def _decide_held(
    pkg: str, node: str, local: LocalPackage, snapshot: Snapshot, admin: AdminRecord
) -> Decision | None:
    if local.state in (PackageState.STARTING, PackageState.HALTING):
        return None
    if local.state in (PackageState.FAILED, PackageState.HALT_FAILED):
        if admin.clear_generation > local.cleared_generation:
            return Decision(pkg, Verb.CLEAR, "cleared by an operator")
        return None
    if local.state == PackageState.HALTED:
        return Decision(pkg, Verb.RELEASE, "halted")
    if pkg not in snapshot.packages:
        return Decision(
            pkg, Verb.HALT, "removed from the configuration", halt_reason=HaltReason.USER_HALT
        )
    target = snapshot.assignments.get(pkg)
    # An operator's halt (package or node) waits for the controller's plan: it halts
    # the package's dependents first (halt_wait) and then points it away from here.
    planned_away = target is None or target.node != node
    if admin.halt_requested:
        if not planned_away:
            return None
        return Decision(pkg, Verb.HALT, "halt requested", halt_reason=HaltReason.USER_HALT)
    node_admin = snapshot.node_admin.get(node)
    if local.state is PackageState.DETACHED:
        if node_admin is not None and node_admin.halted:
            return None
        return Decision(pkg, Verb.ATTACH, f"node {node} started again")
    if local.state is PackageState.RUNNING and node_admin is not None and node_admin.halted:
        if node_admin.mode == "detach":
            return Decision(pkg, Verb.DETACH, f"node {node} halted with --detach")
        if not planned_away:
            return None
        return Decision(pkg, Verb.HALT, f"node {node} halted by an operator",
                        halt_reason=HaltReason.USER_HALT)  # fmt: skip
    if local.state is PackageState.RUNNING and target is not None and target.node != node:
        return Decision(
            pkg,
            Verb.HALT,
            target.reason,
            halt_reason=target.halt_reason or HaltReason.AUTOMATIC_HALT,
        )
    if admin.maintenance and not local.maintenance:
        return Decision(pkg, Verb.MAINTENANCE_ON, "maintenance requested")
    if not admin.maintenance and local.maintenance:
        return Decision(pkg, Verb.MAINTENANCE_OFF, "maintenance ended")
    if local.state is PackageState.RUNNING and admin.restart_generation > local.restart_generation:
        return Decision(pkg, Verb.RESTART, "restart requested by an operator",
                        start_reason=StartReason.RESTART, halt_reason=HaltReason.USER_HALT)  # fmt: skip
    return None


def _decide_free(pkg: str, node: str, snapshot: Snapshot, admin: AdminRecord) -> Decision | None:
    """Start a package held by nobody when the controller assigned it here, after
    checking its preconditions again (the assignment may be a moment old)."""
    spec = snapshot.packages.get(pkg)
    target = snapshot.assignments.get(pkg)
    if spec is None or pkg in snapshot.owners or target is None or target.node != node:
        return None
    status = snapshot.status_of(pkg)
    fenced = status.state is PackageState.HALT_FAILED and spec.node_fail_fast
    if status.state in (PackageState.FAILED, PackageState.HALT_FAILED) and not fenced:
        return None  # blocked until an operator clears it (node_fail_fast: its node fenced)
    if not admin.auto_run or admin.maintenance or admin.halt_requested:
        return None
    if node not in eligible_nodes(spec, admin, snapshot):
        return None
    reason = target.start_reason or start_reason(status, node)
    return Decision(pkg, Verb.START, f"{reason.value} on {node}", start_reason=reason)


def decide(snapshot: Snapshot, node: str, local: Mapping[str, LocalPackage]) -> list[Decision]:
    """Every action ``node`` should take now, one per package at most, with its reason."""
    out: list[Decision] = []
    for pkg in sorted(set(snapshot.packages) | set(local)):
        admin = snapshot.admin_of(pkg)
        held = local.get(pkg)
        d = (
            _decide_held(pkg, node, held, snapshot, admin)
            if held is not None
            else _decide_free(pkg, node, snapshot, admin)
        )
        if d is not None:
            out.append(d)
    return out


@dataclass(frozen=True)
class AfterFailure:
    state: PackageState
    admin: AdminRecord
    reason: str


def after_start_failure(
    spec: PackageSpec,
    admin: AdminRecord,
    snapshot: Snapshot,
    node: str,
    failover: bool,
    wall: float,
) -> AfterFailure:
    """Where a package goes after it failed on ``node`` (CONCEPTS §3 exit-code table).

    ``failover=False`` (start exit 1, timeout): global switching off, ``failed``.
    ``failover=True`` (start exit 2, service budget spent, monitor): node switching for
    ``node`` off (ping-pong protection), then ``halted`` for another node to take it,
    or ``failed`` if no other node is eligible. The node is recorded in
    ``failed_nodes`` with ``wall`` (the failure's wall-clock time, for display), so
    that ``failure_timeout`` turns its switching on again; not when an operator had
    turned it off already (that stays off until an operator turns it on).
    """
    if not failover:
        new = admin.model_copy(update={"auto_run": False, "start_node": None})
        return AfterFailure(PackageState.FAILED, new, "global switching turned off")
    disabled = tuple(sorted({*admin.disabled_nodes, node}))
    failed = dict(admin.failed_nodes)
    if node not in admin.disabled_nodes or node in failed:
        failed[node] = wall
    new = admin.model_copy(
        update={"disabled_nodes": disabled, "failed_nodes": failed, "start_node": None}
    )
    cluster_off = snapshot.cluster is not None and snapshot.cluster.failover == "off"
    others = [] if cluster_off else eligible_nodes(spec, new, snapshot, exclude=node)
    if others and new.auto_run:
        return AfterFailure(PackageState.HALTED, new, f"failing over; next node {others[0]}")
    return AfterFailure(PackageState.FAILED, new, "no other eligible node")
