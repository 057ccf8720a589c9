"""What-if: hypothetical events applied to a snapshot, then planned until stable. Pure.

Used by ``vigil simulate``. Each event changes a snapshot the way the real event
would change the store; ``converge`` then plays the plan forward (as if every
start and halt succeeded) round by round, so cascades (dependents waiting, then
starting) show up in order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vigil.model import HaltReason, NodeRecord, PackageState, PackageStatus
from vigil.plan.planner import Action, Plan, Verb, plan
from vigil.snapshot import Snapshot

MAX_ROUNDS = 10


def node_fails(snap: Snapshot, node: str) -> Snapshot:
    """``node`` loses its lease: its owner keys vanish, its packages were fenced."""
    owners = {p: n for p, n in snap.owners.items() if n != node}
    status = dict(snap.status)
    for pkg, n in snap.owners.items():
        if n == node:
            status[pkg] = snap.status_of(pkg).model_copy(
                update={"state": PackageState.RUNNING, "node": node}
            )
    nodes = {n: r for n, r in snap.nodes.items() if n != node}
    return dataclasses.replace(snap, nodes=nodes, owners=owners, status=status,
                               controller=None if snap.controller == node else snap.controller)  # fmt: skip


def package_fails(snap: Snapshot, pkg: str) -> Snapshot:
    """``pkg`` fails where it runs (service budget spent, monitor): it halts with reason
    failure and node switching for that node goes off (ping-pong protection)."""
    node = snap.owners.get(pkg)
    if node is None:
        return snap
    owners = {p: n for p, n in snap.owners.items() if p != pkg}
    status = dict(snap.status)
    status[pkg] = PackageStatus(
        state=PackageState.HALTED, node=node, halt_reason=HaltReason.FAILURE
    )
    admin = dict(snap.admin)
    a = snap.admin_of(pkg)
    admin[pkg] = a.model_copy(update={"disabled_nodes": tuple(sorted({*a.disabled_nodes, node}))})
    return dataclasses.replace(snap, owners=owners, status=status, admin=admin)


def node_returns(snap: Snapshot, node: str) -> Snapshot:
    nodes = dict(snap.nodes)
    nodes.setdefault(node, NodeRecord(name=node, pid=0))
    node_admin = {n: a for n, a in snap.node_admin.items() if n != node}
    return dataclasses.replace(snap, nodes=nodes, node_admin=node_admin)


def _play(snap: Snapshot, result: Plan) -> Snapshot:
    """The snapshot after every start/halt/move of ``result`` succeeded."""
    owners = dict(snap.owners)
    status = dict(snap.status)
    for action in result.actions:
        pkg = action.package
        if action.verb in (Verb.START, Verb.MOVE) and action.node is not None:
            if action.verb is Verb.MOVE and pkg in owners:
                # first the halt on the old node ...
                owners.pop(pkg)
            owners[pkg] = action.node
            status[pkg] = PackageStatus(
                state=PackageState.RUNNING, node=action.node, message=action.reason
            )
        elif action.verb is Verb.HALT:
            owners.pop(pkg, None)
            status[pkg] = PackageStatus(
                state=PackageState.HALTED,
                node=action.node,
                halt_reason=HaltReason.AUTOMATIC_HALT,
                message=action.reason,
            )
    return dataclasses.replace(
        snap,
        owners=owners,
        owner_revisions={p: 1 for p in owners},
        status=status,
        assignments=result.assignments,
    )


@dataclass(frozen=True)
class Simulation:
    rounds: list[list[Action]]
    final: Snapshot


def converge(snap: Snapshot, now: float) -> Simulation:
    rounds: list[list[Action]] = []
    for _ in range(MAX_ROUNDS):
        result = plan(snap, now)
        changes = [a for a in result.actions if a.verb is not Verb.WAIT]
        waits = [a for a in result.actions if a.verb is Verb.WAIT]
        if not changes:
            if waits and (not rounds or waits != [a for a in rounds[-1] if a.verb is Verb.WAIT]):
                rounds.append(waits)
            snap = dataclasses.replace(snap, assignments=result.assignments)
            break
        rounds.append(result.actions)
        snap = _play(snap, result)
    return Simulation(rounds, snap)
