"""The planner: one snapshot in, where every package should run out. Pure.

``plan(snapshot, now)`` returns a ``Plan``: an ``Assignment`` for every configured
package (``node`` None = it should not run) and the list of changes, each with its
reason. The controller writes the assignments; agents carry them out, checking
every precondition again on fresh data, and the owner key (create-if-absent,
bound to the node lease) keeps a package from ever running on two nodes.

Rules (CONCEPTS §3-4), in the order they are applied:

1. Packages are planned dependencies first, then by priority (1 is the most
   important, none is the least), then by name.
2. A package that is held by a node (owner key) stays there, unless
   - an ``up`` dependency is no longer met → halted (``automatic_halt``);
   - a ``down`` dependency excludes it and the other package is more
     important → halted (``automatic_halt``);
   - an operator asked to move it (``package move`` / ``start -n``);
   - ``failback_policy = "automatic"`` and a more preferred node is eligible →
     moved back (``failback``).
   A package that moves first waits (``halt_wait``) until the packages that
   depend on it on the same node have halted, at most ``successor_halt_timeout``.
3. A package that is held by nobody is started when global switching is on, it
   is neither ``failed`` nor ``halt_failed`` (those wait for an operator), the
   cluster's failover is on (or it has not run anywhere yet), and a node is
   eligible: up, not halted by an operator, node switching on, in the
   package's ``nodes`` list, dependencies satisfiable. The node is the first
   in preference order (``configured_node``) or the one running the fewest
   packages (``min_package_node``).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from vigil.config import DependencySpec, PackageSpec
from vigil.model import (
    AdminRecord,
    Assignment,
    HaltReason,
    PackageState,
    StartReason,
)
from vigil.snapshot import Snapshot

NO_PRIORITY = 10_000


class Verb(enum.StrEnum):
    START = "start"
    HALT = "halt"
    MOVE = "move"
    WAIT = "wait"  # start_wait / halt_wait: a dependency holds it back


@dataclass(frozen=True)
class Action:
    verb: Verb
    package: str
    node: str | None  # where it will run (start, move) or runs now (halt)
    from_node: str | None
    reason: str

    def __str__(self) -> str:
        where = {
            Verb.START: f"on {self.node}",
            Verb.MOVE: f"{self.from_node} -> {self.node}",
            Verb.HALT: f"on {self.node}",
            Verb.WAIT: f"on {self.node}" if self.node else "",
        }[self.verb]
        return f"{self.verb.value} {self.package} {where}: {self.reason}".replace("  ", " ")


@dataclass(frozen=True)
class Plan:
    assignments: dict[str, Assignment]
    actions: list[Action] = field(default_factory=list)


def node_order(spec: PackageSpec, snap: Snapshot) -> list[str]:
    """The package's node preference list with ``*`` expanded (every known node, by name)."""
    known = set(snap.nodes)
    if snap.cluster and snap.cluster.nodes:
        known |= set(snap.cluster.nodes)
    order: list[str] = []
    for entry in spec.nodes:
        names = sorted(known) if entry == "*" else [entry]
        order.extend(n for n in names if n not in order)
    return order


def eligible_nodes(
    spec: PackageSpec, admin: AdminRecord, snap: Snapshot, exclude: str | None = None
) -> list[str]:
    """Up nodes, not halted, node switching on, in the package's preference order."""
    return [
        n
        for n in node_order(spec, snap)
        if n in snap.nodes
        and not snap.node_halted(n)
        and n not in admin.disabled_nodes
        and n != exclude
    ]


def priority(spec: PackageSpec) -> int:
    return spec.priority if spec.priority is not None else NO_PRIORITY


def planning_order(packages: dict[str, PackageSpec]) -> list[str]:
    """Dependencies before dependents; otherwise by priority, then name."""
    ranked = sorted(packages, key=lambda p: (priority(packages[p]), p))
    done: list[str] = []
    seen: set[str] = set()
    visiting: set[str] = set()

    def visit(p: str) -> None:
        if p in seen or p in visiting:
            return  # a cycle (rejected by vigil check) falls back to priority order
        visiting.add(p)
        deps = [d.package for d in packages[p].dependency if d.condition == "up"]
        for d in sorted((d for d in deps if d in packages), key=ranked.index):
            visit(d)
        visiting.discard(p)
        seen.add(p)
        done.append(p)

    for p in ranked:
        visit(p)
    return done


def start_reason_for(snap: Snapshot, pkg: str, node: str) -> StartReason:
    st = snap.status_of(pkg)
    if st.node is None:
        return StartReason.BOOT
    if st.halt_reason == HaltReason.USER_HALT:
        return StartReason.USER
    if st.node != node:
        return StartReason.FAILOVER
    return StartReason.BOOT


class _Planner:
    def __init__(self, snap: Snapshot, now: float) -> None:
        self.snap = snap
        self.now = now
        self.packages = snap.packages
        # where each package runs (or will run) as far as this plan knows
        self.placed: dict[str, str] = {p: n for p, n in snap.owners.items() if p in snap.packages}
        self.load: Counter[str] = Counter(self.placed.values())
        self.running: dict[str, str] = {
            p: n
            for p, n in self.placed.items()
            if snap.status_of(p).state is PackageState.RUNNING and snap.status_of(p).node == n
        }
        self.assign: dict[str, Assignment] = {}
        self.actions: list[Action] = []
        self.must_halt: dict[str, str] = {}  # package -> why it must halt (decided earlier)

    # -------------------------------------------------------------- helpers

    def _keep_since(self, pkg: str, node: str | None, reason: str) -> float:
        prev = self.snap.assignments.get(pkg)
        if prev is not None and prev.node == node and prev.reason == reason:
            return prev.since
        return self.now

    def _set(
        self,
        pkg: str,
        node: str | None,
        reason: str,
        *,
        start_reason: StartReason | None = None,
        halt_reason: HaltReason | None = None,
    ) -> None:
        self.assign[pkg] = Assignment(
            node=node,
            reason=reason,
            start_reason=start_reason,
            halt_reason=halt_reason,
            since=self._keep_since(pkg, node, reason),
        )

    def _unplace(self, pkg: str) -> None:
        node = self.placed.pop(pkg, None)
        if node is not None:
            self.load[node] -= 1

    def _place(self, pkg: str, node: str) -> None:
        self._unplace(pkg)
        self.placed[pkg] = node
        self.load[node] += 1

    def _more_important(self, a: str, b: str) -> bool:
        return (priority(self.packages[a]), a) < (priority(self.packages[b]), b)

    def _dep_allows(self, dep: DependencySpec, node: str, *, starting: bool = False) -> bool:
        """Whether ``dep`` allows running on ``node`` given current placements. A package
        about to start (``starting``) needs its ``up`` dependencies actually running."""
        where = self.placed.get(dep.package)
        if dep.condition == "up":
            if where is None:
                return False
            if starting and self.running.get(dep.package) != where:
                return False
            if dep.location == "same_node":
                return where == node
            if dep.location == "different_node":
                return where != node
            return True
        if where is None:
            return True
        if dep.location == "same_node":
            return where != node
        if dep.location == "different_node":
            return where == node
        return False

    def _candidates(self, pkg: str, nodes: Iterable[str]) -> tuple[list[str], str | None]:
        """Nodes allowed by every dependency, or ([], why not)."""
        spec = self.packages[pkg]
        out = list(nodes)
        for dep in spec.dependency:
            if dep.package not in self.packages:
                continue
            before = out
            out = [n for n in out if self._dep_allows(dep, n, starting=True)]
            if before and not out:
                return [], _dep_text(dep, self.placed.get(dep.package))
        return out, None

    def _pick(self, spec: PackageSpec, nodes: list[str]) -> str:
        if spec.failover_policy == "min_package_node":
            return min(nodes, key=lambda n: (self.load[n], nodes.index(n)))
        return nodes[0]

    # -------------------------------------------------------------- per package

    def held(self, pkg: str, owner: str) -> None:
        spec = self.packages[pkg]
        admin = self.snap.admin_of(pkg)
        st = self.snap.status_of(pkg)
        state = st.state if st.node == owner else PackageState.STARTING
        if pkg in self.must_halt:
            self._halt(pkg, owner, self.must_halt[pkg])
            return
        if state is not PackageState.RUNNING:
            self._set(pkg, owner, f"{state.value} on {owner}")
            return
        for dep in spec.dependency:
            if dep.package in self.packages and not self._dep_allows(dep, owner):
                other = dep.package
                if dep.condition == "down" and self._more_important(pkg, other):
                    continue  # the other one gives way (handled when it is planned)
                self._halt(pkg, owner, _dep_text(dep, self.placed.get(other)))
                return
        target, why, start_reason = self._wanted_move(pkg, spec, admin, owner)
        if target is None:
            self._set(pkg, owner, f"running on {owner}")
            return
        waiting = self._dependents_on(pkg, owner)
        limit = spec.successor_halt_timeout
        if waiting:
            reason = f"halt_wait: {why}; waiting for {', '.join(waiting)} to halt first"
            since = self._keep_since(pkg, owner, reason)
            if limit is None or self.now - since < limit:
                for q in waiting:
                    self.must_halt[q] = f"its dependency {pkg} is moving ({why})"
                self._set(pkg, owner, reason)
                self.actions.append(Action(Verb.WAIT, pkg, owner, owner, reason))
                return
            why += f"; successor_halt_timeout passed for {', '.join(waiting)}"
        self._place(pkg, target)
        self._set(
            pkg,
            target,
            why,
            start_reason=start_reason,
            halt_reason=HaltReason.AUTOMATIC_HALT
            if start_reason is StartReason.FAILBACK
            else HaltReason.USER_HALT,
        )
        self.actions.append(Action(Verb.MOVE, pkg, target, owner, why))

    def _wanted_move(
        self, pkg: str, spec: PackageSpec, admin: AdminRecord, owner: str
    ) -> tuple[str | None, str, StartReason | None]:
        eligible = eligible_nodes(spec, admin, self.snap)
        if admin.start_node is not None and admin.start_node != owner:
            cands, _ = self._candidates(pkg, [n for n in eligible if n == admin.start_node])
            if cands:
                return cands[0], f"moved to {cands[0]} by an operator", StartReason.USER
            return None, "", None
        if spec.failback_policy == "automatic" and admin.start_node is None:
            order = node_order(spec, self.snap)
            cands, _ = self._candidates(pkg, eligible)
            better = (
                [n for n in cands if order.index(n) < order.index(owner)] if owner in order else []
            )
            if better:
                return better[0], f"failback to preferred node {better[0]}", StartReason.FAILBACK
        return None, "", None

    def _dependents_on(self, pkg: str, node: str) -> list[str]:
        """Packages running on ``node`` that need ``pkg`` up there (or anywhere)."""
        out = []
        for q, spec in self.packages.items():
            if self.snap.owners.get(q) != node and self.placed.get(q) != node:
                continue
            if (
                any(
                    d.package == pkg and d.condition == "up" and d.location != "different_node"
                    for d in spec.dependency
                )
                and q in self.snap.owners
            ):
                out.append(q)
        return sorted(out)

    def _halt(self, pkg: str, owner: str, why: str) -> None:
        self._unplace(pkg)
        self._set(pkg, None, why, halt_reason=HaltReason.AUTOMATIC_HALT)
        self.actions.append(Action(Verb.HALT, pkg, owner, owner, why))

    def free(self, pkg: str) -> None:
        spec = self.packages[pkg]
        admin = self.snap.admin_of(pkg)
        st = self.snap.status_of(pkg)
        cluster = self.snap.cluster
        if st.state in (PackageState.FAILED, PackageState.HALT_FAILED):
            self._set(pkg, None, f"{st.state.value}: waiting for an operator (package clear)")
            return
        if not admin.auto_run or admin.halt_requested:
            self._set(pkg, None, "global switching is off")
            return
        if admin.maintenance:
            self._set(pkg, None, "in maintenance")
            return
        if (
            cluster is not None
            and cluster.failover == "off"
            and st.node is not None
            and st.halt_reason != HaltReason.USER_HALT
            and admin.start_node is None
        ):
            self._set(pkg, None, f"cluster failover is off (it ran on {st.node})")
            return
        eligible = eligible_nodes(spec, admin, self.snap)
        if admin.start_node is not None:
            eligible = [n for n in eligible if n == admin.start_node]
        if not eligible:
            self._set(pkg, None, "no eligible node is up")
            return
        cands, why = self._candidates(pkg, eligible)
        if not cands:
            self._preempt(pkg, eligible)
            reason = f"start_wait: {why}"
            self._set(pkg, None, reason)
            self.actions.append(Action(Verb.WAIT, pkg, None, None, reason))
            return
        node = self._pick(spec, cands)
        reason = start_reason_for(self.snap, pkg, node)
        prev = self.snap.assignments.get(pkg)
        if prev is not None and prev.node == node and prev.start_reason is not None:
            reason = prev.start_reason
        self._place(pkg, node)
        self._set(pkg, node, f"{reason.value} on {node}", start_reason=reason)
        self.actions.append(Action(Verb.START, pkg, node, st.node, f"{reason.value}"))

    def _preempt(self, pkg: str, eligible: list[str]) -> None:
        """A more important package excluded by `down` dependencies halts the others."""
        spec = self.packages[pkg]
        blockers = [
            d.package
            for d in spec.dependency
            if d.condition == "down"
            and d.package in self.placed
            and d.package in self.packages
            and self._more_important(pkg, d.package)
        ]
        if not blockers:
            return
        # would it fit once the less important blockers are gone?
        saved = {b: self.placed[b] for b in blockers}
        for b in blockers:
            self._unplace(b)
        cands, _ = self._candidates(pkg, eligible)
        for b, n in saved.items():
            self._place(b, n)
        if cands:
            for b in blockers:
                self.must_halt.setdefault(b, f"making room for more important package {pkg}")


def _dep_text(dep: DependencySpec, where: str | None) -> str:
    loc = dep.location.replace("_", " ")
    if dep.condition == "up":
        state = f"placed on {where}, not running yet" if where else "not up"
        return f"needs {dep.package} up on {loc} ({dep.package} is {state})"
    return f"needs {dep.package} down on {loc} ({dep.package} runs on {where})"


def plan(snap: Snapshot, now: float) -> Plan:
    """Where every configured package should run, and what changes, with reasons."""
    p = _Planner(snap, now)
    order = planning_order(snap.packages)
    # Two passes: decisions made late (a more important package preempting a less
    # important one, a moving dependency) reach packages planned earlier.
    for _ in range(2):
        p.assign.clear()
        p.actions.clear()
        p.placed = {q: n for q, n in snap.owners.items() if q in snap.packages}
        p.load = Counter(p.placed.values())
        for pkg in order:
            owner = snap.owners.get(pkg)
            if owner is not None:
                p.held(pkg, owner)
            else:
                p.free(pkg)
    return Plan(assignments=p.assign, actions=p.actions)
