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
   - an operator asked to halt it (``package halt``) → halted (``user_halt``);
   - it is in maintenance: then it is left alone, whatever else happens;
   - its node was halted by an operator (``node halt``, not ``--detach``) →
     moved to the next eligible node (``failover``), or halted if there is none;
   - a more important package needs it on another node (``up``,
     ``different_node``; see 4) → moved to another eligible node;
   - an ``up`` dependency is no longer met → halted (``automatic_halt``);
   - a ``down`` dependency excludes it and the other package is more
     important → halted (``automatic_halt``);
   - a more important package needs its node (see 4) → halted;
   - an operator asked to move it (``package move`` / ``start -n``);
   - ``failback_policy = "automatic"``, global switching and cluster failover
     are on, and a more preferred node is eligible → moved back (``failback``);
     with ``min_package_node``, only to a node running fewer packages than its
     own (Serviceguard's rule; otherwise failback would undo the balancing),
     counted where this plan leaves the packages; never onto a node flagged
     ``!nofailover!`` for the node it runs on or came from. A package that would
     fail back once the dependencies this plan starts run counts as leaving.
   A package that the planner halts or moves (an operator's halt included) first
   waits (``halt_wait``) until the held packages that depend on it (``up``;
   ``same_node`` ones on its node, the others anywhere) have halted: halts go in
   reverse dependency order, for at most ``successor_halt_timeout`` (counted from
   the start of the wait; the plan's ``wake_at`` says when it runs out).
3. A package that is held by nobody is started when global switching is on, it
   is neither ``failed`` nor ``halt_failed`` (those wait for an operator; a
   ``halt_failed`` ``node_fail_fast`` package is free again: its node fenced
   itself), it is not in maintenance, and a node is eligible: up, not halted by
   an operator, node switching on, in the package's ``nodes`` list, dependencies
   satisfiable. With cluster ``failover = "off"`` a package that ran somewhere
   (and was not halted by an operator) may only start again on that node. The
   node is the first in preference order (``configured_node``) or the one running
   the fewest packages (``min_package_node``; ties: preference order).
   A start needs its ``up`` dependencies running (``running``, ``maintenance``,
   ``detached``) where ``location`` says and not about to leave; it never goes
   where a package it excludes (``down``) is held, placed, or waits for room:
   the other one must have released the node first.
4. Priority: a package that cannot start (or fail back) only because of ``down``
   exclusions by less important packages has them halted where it will go
   (``automatic_halt``, "making room") and starts once they are gone. So does a
   package with automatic failback whose preferred node they hold (it would fail
   back there a moment later), and any package whose preferred node a less
   important one took earlier in the same plan (that one is simply not started).
   "Less important" is strict and counts what depends on them: a package that a
   more important one needs (and that runs or wants to) is not displaced, and
   without priorities nobody is. A package waiting to start (or to move) keeps its
   target node: packages it excludes do not start there meanwhile.
   The same through ``up`` + ``different_node``: a package that cannot start only
   because such a dependency sits on the node it could use, and that outranks it
   (and everything else that needs it), has it moved to another node; the
   dependency then avoids the nodes where more important such dependents run.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from vigil.config import DependencySpec, PackageSpec
from vigil.flags import NOFAILOVER
from vigil.model import (
    AdminRecord,
    Assignment,
    HaltReason,
    PackageState,
    StartReason,
)
from vigil.snapshot import Snapshot

NO_PRIORITY = 10_000
MAX_PASSES = 4

# A dependency in one of these states on its owner counts as up: its processes run.
UP_STATES = frozenset({PackageState.RUNNING, PackageState.MAINTENANCE, PackageState.DETACHED})


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
        if self.verb is Verb.MOVE:
            where = f" {self.from_node} -> {self.node}"
        else:
            where = f" on {self.node}" if self.node else ""
        return f"{self.verb.value} {self.package}{where}: {self.reason}"


@dataclass(frozen=True)
class Plan:
    """``wake_at``: the earliest ``now`` (the caller's clock) at which this plan would
    change by time alone (a ``successor_halt_timeout`` running out), None if never: the
    controller plans again then, whether or not anything else happens."""

    assignments: dict[str, Assignment]
    actions: list[Action] = field(default_factory=list)
    wake_at: float | None = None


def _known_nodes(snap: Snapshot) -> list[str]:
    known = set(snap.nodes)
    if snap.cluster and snap.cluster.nodes:
        known |= set(snap.cluster.nodes)
    return sorted(known)


def _expand(entries: Iterable[str], known_sorted: list[str]) -> list[str]:
    order: list[str] = []
    seen: set[str] = set()
    for entry in entries:
        for n in known_sorted if entry == "*" else (entry,):
            if n not in seen:
                seen.add(n)
                order.append(n)
    return order


def node_order(spec: PackageSpec, snap: Snapshot) -> list[str]:
    """The package's node preference list with ``*`` expanded (every known node, by name)."""
    return _expand(spec.nodes, _known_nodes(snap))


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
    rank = {p: i for i, p in enumerate(ranked)}
    done: list[str] = []
    seen: set[str] = set()
    visiting: set[str] = set()

    def visit(p: str) -> None:
        if p in seen or p in visiting:
            return  # a cycle (rejected by vigil check) falls back to priority order
        visiting.add(p)
        deps = {d.package for d in packages[p].dependency if d.condition == "up"}
        for d in sorted((d for d in deps if d in rank), key=rank.__getitem__):
            visit(d)
        visiting.discard(p)
        seen.add(p)
        done.append(p)

    for p in ranked:
        visit(p)
    return done


def start_reason_for(snap: Snapshot, pkg: str, node: str) -> StartReason:
    """Why ``pkg`` starts on ``node`` (``VIGIL_START_REASON``), from where it last ran:
    nowhere yet → boot; another node that was halted (``node halt --failover``) or whose
    agent stopped (``PackageStatus.node_left``) → failover, although that node halted it
    as ``user_halt``; halted by an operator → user; another node → failover; this
    node → boot."""
    st = snap.status_of(pkg)
    if st.node is None:
        return StartReason.BOOT
    if st.node != node and (snap.node_halted(st.node) or st.node_left):
        return StartReason.FAILOVER  # its node was halted with --failover, or left
    if st.halt_reason == HaltReason.USER_HALT:
        return StartReason.USER
    if st.node != node:
        return StartReason.FAILOVER
    return StartReason.BOOT


class _Planner:
    def __init__(
        self,
        snap: Snapshot,
        now: float,
        expected: dict[str, str] | None = None,
        no_push: frozenset[str] = frozenset(),
    ) -> None:
        self.snap = snap
        self.now = now
        self.packages = snap.packages
        self.known = _known_nodes(snap)
        self._orders: dict[tuple[str, ...], list[str]] = {}
        self._ranks: dict[tuple[str, ...], dict[str, int]] = {}
        self._eligible: dict[tuple[str, ...], list[str]] = {}
        # who holds each package now (owner key): the truth until it is released
        self.held_by: dict[str, str] = {p: n for p, n in snap.owners.items() if p in snap.packages}
        self.running: dict[str, str] = {}
        for p, n in self.held_by.items():
            st = snap.status_of(p)
            if st.node == n and st.state in UP_STATES:
                self.running[p] = n
        # package -> the packages with an `up` dependency on it
        self.dependents: dict[str, list[str]] = {}
        for q, spec in self.packages.items():
            for d in {d.package for d in spec.dependency if d.condition == "up"}:
                self.dependents.setdefault(d, []).append(q)
        self._effective: dict[str, int] = {}
        self.must_halt: dict[str, str] = {}  # package -> why it must halt (decided earlier)
        # package -> nodes it must leave or not go to, and why: a more important
        # package needs it up on a *different* node (priority through different_node)
        self.avoid: dict[str, dict[str, str]] = {}
        self._avoid_from: dict[str, list[tuple[str, str]]] = {}  # running a -> its entries
        self.released: set[str] = set()  # running packages that turned out not to stay
        for a, node in self.running.items():
            if a in no_push:
                continue
            for dep in self.packages[a].dependency:
                if self._pushes(a, dep):
                    why = f"more important package {a} needs it on another node than {node}"
                    self.avoid.setdefault(dep.package, {})[node] = why
                    self._avoid_from.setdefault(a, []).append((dep.package, node))
        # where a first plan left every package (min_package_node failback), or None
        self._expected = expected
        self._expected_load = Counter(expected.values()) if expected else Counter()
        self.reset()

    def reset(self) -> None:
        # where each package runs (or will run) as far as this plan knows
        self.placed: dict[str, str] = dict(self.held_by)
        self.load: Counter[str] = Counter(self.placed.values())
        self.assign: dict[str, Assignment] = {}
        self.actions: list[Action] = []
        self.planned: set[str] = set()
        self.leaving: set[str] = set()  # held, waiting to halt or move: no new dependents
        self.reserved: dict[str, str] = {}  # waits for room there: no new exclusions
        self.late = False  # a package planned already was told to halt: plan again
        self.wake_at: float | None = None  # see Plan.wake_at
        # min_package_node failbacks weighed in this pass: pkg -> (owner, nodes, kept)
        self._balanced: dict[str, tuple[str, list[str], list[str]]] = {}

    def _wake(self, at: float) -> None:
        if self.wake_at is None or at < self.wake_at:
            self.wake_at = at

    # -------------------------------------------------------------- helpers

    def _order(self, spec: PackageSpec) -> list[str]:
        key = tuple(spec.nodes)
        got = self._orders.get(key)
        if got is None:
            got = self._orders[key] = _expand(spec.nodes, self.known)
        return got

    def _rank(self, spec: PackageSpec) -> dict[str, int]:
        key = tuple(spec.nodes)
        got = self._ranks.get(key)
        if got is None:
            got = self._ranks[key] = {n: i for i, n in enumerate(self._order(spec))}
        return got

    def _eligible_nodes(self, spec: PackageSpec, admin: AdminRecord) -> list[str]:
        """``eligible_nodes`` with the per-``nodes``-list part computed once per plan."""
        key = tuple(spec.nodes)
        base = self._eligible.get(key)
        if base is None:
            snap = self.snap
            base = self._eligible[key] = [
                n for n in self._order(spec) if n in snap.nodes and not snap.node_halted(n)
            ]
        if admin.disabled_nodes:
            return [n for n in base if n not in admin.disabled_nodes]
        return base  # shared: callers build new lists, never change this one

    def _keep_since(
        self, pkg: str, node: str | None, reason: str, *, prefix: bool = False
    ) -> float:
        prev = self.snap.assignments.get(pkg)
        if (
            prev is not None
            and prev.node == node
            and (prev.reason == reason or (prefix and prev.reason.startswith(reason)))
        ):
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
        since: float | None = None,
    ) -> None:
        self.assign[pkg] = Assignment(
            node=node,
            reason=reason,
            start_reason=start_reason,
            halt_reason=halt_reason,
            since=self._keep_since(pkg, node, reason) if since is None else since,
        )

    def _unplace(self, pkg: str) -> None:
        node = self.placed.pop(pkg, None)
        if node is not None:
            self.load[node] -= 1

    def _place(self, pkg: str, node: str) -> None:
        self._unplace(pkg)
        self.placed[pkg] = node
        self.load[node] += 1

    def _mark(self, pkg: str, why: str) -> None:
        """``pkg`` must halt (or not start) in this plan; first reason wins."""
        if pkg not in self.must_halt:
            self.must_halt[pkg] = why
            if pkg in self.planned:
                self.late = True

    def _more_important(self, a: str, b: str) -> bool:
        """Who gives way when two running packages exclude each other (names break ties)."""
        return (priority(self.packages[a]), a) < (priority(self.packages[b]), b)

    def _effective_priority(self, pkg: str) -> int:
        """The priority of ``pkg`` or of the most important package that needs it
        (``up``, transitively) and runs or wants to: halting ``pkg`` halts them too."""
        got = self._effective.get(pkg)
        if got is None:
            got = self._effective[pkg] = priority(self.packages[pkg])  # cycle guard
            for q in self.dependents.get(pkg, ()):
                if q in self.held_by or self._wants_to_run(q):
                    got = min(got, self._effective_priority(q))
            self._effective[pkg] = got
        return got

    def _wants_to_run(self, pkg: str) -> bool:
        """Whether the cluster would start ``pkg`` if it could (switching on, not in
        maintenance, not waiting for an operator)."""
        admin = self.snap.admin_of(pkg)
        if not admin.auto_run or admin.halt_requested or admin.maintenance:
            return False
        st = self.snap.status_of(pkg)
        if st.state is PackageState.FAILED:
            return False
        return st.state is not PackageState.HALT_FAILED or self.packages[pkg].node_fail_fast

    def _outranks(self, a: str, b: str) -> bool:
        """Whether ``a`` may displace ``b``: a strictly better priority than ``b`` and
        everything depending on ``b``. Without priorities nobody displaces anybody."""
        return priority(self.packages[a]) < self._effective_priority(b)

    def _in_maintenance(self, pkg: str) -> bool:
        if self.snap.admin_of(pkg).maintenance:
            return True
        st = self.snap.status_of(pkg)
        return st.state is PackageState.MAINTENANCE and st.node == self.held_by.get(pkg)

    def _dep_allows(
        self,
        dep: DependencySpec,
        node: str,
        *,
        starting: bool = False,
        ignore: frozenset[str] = frozenset(),
        soon: bool = False,
    ) -> bool:
        """Whether ``dep`` allows running on ``node`` given current placements. A package
        about to start (``starting``) needs its ``up`` dependencies actually running,
        and the packages it excludes (``down``) gone from the node for real: released,
        not only planned away, nor waiting for room there. ``ignore``: excluded packages
        about to make room. ``soon``: where it could start once its ``up`` dependencies
        placed in this plan run, or waiting to start on a node they reserved (so that
        a chain of dependencies reserves its nodes a plan ahead)."""
        other = dep.package
        where = self.placed.get(other)
        if dep.condition == "up":
            if where is None and soon:
                where = self.reserved.get(other)
            if where is None or (starting and other in self.leaving):
                return False
            if starting and not soon and self.running.get(other) != where:
                return False
            if dep.location == "same_node":
                return where == node
            if dep.location == "different_node":
                return where != node
            return True
        if other in ignore:
            return True
        held = self.held_by.get(other) if starting else None
        reserved = self.reserved.get(other) if starting else None
        spots = {n for n in (where, held, reserved) if n is not None}
        if not spots:
            return True
        if dep.location == "same_node":
            return node not in spots
        if dep.location == "different_node":
            return spots == {node}
        return False

    def _candidates(
        self,
        pkg: str,
        nodes: Iterable[str],
        ignore: frozenset[str] = frozenset(),
        *,
        soon: bool = False,
    ) -> tuple[list[str], str | None]:
        """Nodes allowed by every dependency, or ([], why not)."""
        spec = self.packages[pkg]
        out = list(nodes)
        for dep in spec.dependency:
            if dep.package not in self.packages:
                continue
            before = out
            out = [
                n for n in out if self._dep_allows(dep, n, starting=True, ignore=ignore, soon=soon)
            ]
            if before and not out:
                return [], self._dep_text(dep)
        return out, None

    def _weaker_exclusions(self, pkg: str) -> frozenset[str]:
        """Less important packages ``pkg`` excludes (``down``) that could make room."""
        return frozenset(
            d.package
            for d in self.packages[pkg].dependency
            if d.condition == "down"
            and d.package in self.packages
            and d.package != pkg
            and (
                d.package in self.placed or d.package in self.held_by or d.package in self.reserved
            )
            and self._outranks(pkg, d.package)
            and not self._in_maintenance(d.package)
        )

    def _blockers_at(self, pkg: str, node: str, among: frozenset[str]) -> list[str]:
        return sorted(
            {
                d.package
                for d in self.packages[pkg].dependency
                if d.package in among and not self._dep_allows(d, node, starting=True)
            }
        )

    def _pick(self, spec: PackageSpec, nodes: list[str]) -> str:
        if spec.failover_policy == "min_package_node":
            load = self.load
            return nodes[min(range(len(nodes)), key=lambda i: (load[nodes[i]], i))]
        return nodes[0]

    def _dep_text(self, dep: DependencySpec) -> str:
        """Why ``dep`` is not met, for reasons and ``vigil status``."""
        other = dep.package
        loc = dep.location.replace("_", " ")
        where = self.placed.get(other)
        if dep.condition == "down":
            spots = sorted({n for n in (where, self.held_by.get(other)) if n is not None})
            parts = [f"runs on {', '.join(spots)}"] if spots else []
            reserved = self.reserved.get(other)
            if reserved is not None and reserved not in spots:
                parts.append(f"waits for room on {reserved}")
            return f"needs {other} down on {loc} ({other} {', '.join(parts) or 'is placed'})"
        if where is None:
            state = "not up"
        elif other in self.leaving:
            state = f"about to leave {where}"
        elif self.running.get(other) == where:
            state = f"running on {where}"
        else:
            state = f"placed on {where}, not running yet"
        return f"needs {other} up on {loc} ({other} is {state})"

    def _waiting_dependents(self, pkg: str, owner: str) -> list[str]:
        """Held packages that need ``pkg`` up (``same_node``: on ``owner``; other
        locations: anywhere) and so must halt before it does. Packages in maintenance
        are left alone (they would never halt)."""
        out = set()
        for q in self.dependents.get(pkg, ()):
            where = self.held_by.get(q)
            if where is None or q == pkg or self._in_maintenance(q):
                continue
            same = [
                d.location == "same_node"
                for d in self.packages[q].dependency
                if d.package == pkg and d.condition == "up"
            ]
            if all(same) and where != owner:
                continue  # a same_node dependent elsewhere does not run on pkg anyway
            out.add(q)
        return sorted(out)

    # -------------------------------------------------------------- held packages

    def held(self, pkg: str, owner: str) -> None:
        spec = self.packages[pkg]
        admin = self.snap.admin_of(pkg)
        st = self.snap.status_of(pkg)
        state = st.state if st.node == owner else PackageState.STARTING
        blocked = state in (PackageState.FAILED, PackageState.HALT_FAILED)
        if admin.halt_requested and not blocked:
            # an operator's halt is not undone; its dependents halt first (halt_wait)
            self._stop(pkg, owner, "halt requested by an operator",
                       halt_reason=HaltReason.USER_HALT)  # fmt: skip
            return
        if admin.maintenance and state in (PackageState.RUNNING, PackageState.MAINTENANCE):
            self._set(pkg, owner, f"in maintenance on {owner}")  # left alone
            return
        if pkg in self.must_halt:
            self._stop(pkg, owner, self.must_halt[pkg])
            return
        if state is not PackageState.RUNNING:
            prev = self.snap.assignments.get(pkg)
            if state is PackageState.HALTING and prev is not None and prev.node != owner:
                # A move or a halt is under way: keep pointing where it goes, or the
                # node halting it would start it again once it is released.
                if prev.node is None:
                    self._unplace(pkg)
                else:
                    self._place(pkg, prev.node)
                self.assign[pkg] = prev
                return
            self._set(pkg, owner, f"{state.value} on {owner}")
            return
        node_admin = self.snap.node_admin.get(owner)
        if node_admin is not None and node_admin.halted and node_admin.mode != "detach":
            self._leave_halted_node(pkg, spec, admin, owner)
            return
        for dep in spec.dependency:
            if dep.package in self.packages and not self._dep_allows(dep, owner):
                other = dep.package
                if dep.condition == "down" and self._more_important(pkg, other):
                    continue  # the other one gives way (handled when it is planned)
                self._stop(pkg, owner, self._dep_text(dep))
                return
        if owner in self.avoid.get(pkg, {}) and self._move_away(pkg, spec, admin, owner):
            return
        target, why, start_reason, displace = self._wanted_move(pkg, spec, admin, owner)
        if target is None:
            self._set(pkg, owner, f"running on {owner}{why}")
            return
        if displace:
            for b in displace:
                self._mark(b, f"making room for more important package {pkg} ({why})")
            reason = f"halt_wait: {why}; waiting for {', '.join(displace)} to make room"
            self.leaving.add(pkg)
            self._set(pkg, owner, reason)
            self.actions.append(Action(Verb.WAIT, pkg, owner, owner, reason))
            return
        assert start_reason is not None
        self._stop(
            pkg,
            owner,
            why,
            target=target,
            start_reason=start_reason,
            halt_reason=HaltReason.AUTOMATIC_HALT
            if start_reason is StartReason.FAILBACK
            else HaltReason.USER_HALT,
        )

    def _leave_halted_node(
        self, pkg: str, spec: PackageSpec, admin: AdminRecord, owner: str
    ) -> None:
        """``node halt`` (failover mode): every package there halts (``user_halt``),
        its dependents first; the plan says where each package goes next."""
        why = f"node {owner} halted by an operator"
        cands: list[str] = []
        if admin.auto_run:
            eligible = self._eligible_nodes(spec, admin)
            if admin.start_node is not None:
                eligible = [n for n in eligible if n == admin.start_node]
            eligible, _ = self._without_nofailover(pkg, eligible, moving=True)
            cands, _ = self._candidates(pkg, eligible)
        target = self._pick(spec, cands) if cands else None
        self._stop(pkg, owner, why, target=target, start_reason=StartReason.FAILOVER,
                   halt_reason=HaltReason.USER_HALT)  # fmt: skip

    def _wanted_move(
        self, pkg: str, spec: PackageSpec, admin: AdminRecord, owner: str
    ) -> tuple[str | None, str, StartReason | None, list[str]]:
        """Where a running package should move: (target, why, start reason, packages
        that must make room first); no target: (None, why it stays or "", ...)."""
        if admin.start_node is not None:
            if admin.start_node == owner:
                return None, "", None, []
            eligible = [n for n in self._eligible_nodes(spec, admin) if n == admin.start_node]
            cands, why = self._candidates(pkg, eligible)
            if cands:
                return cands[0], f"moved to {cands[0]} by an operator", StartReason.USER, []
            why = why or "not eligible"
            return None, f"; cannot move to {admin.start_node}: {why}", None, []
        cluster = self.snap.cluster
        if (
            spec.failback_policy != "automatic"
            or not admin.auto_run
            or (cluster is not None and cluster.failover == "off")
        ):
            return None, "", None, []
        rank = self._rank(spec)
        if owner not in rank:
            return None, "", None, []
        avoid = self.avoid.get(pkg, {})
        better = [
            n for n in self._eligible_nodes(spec, admin) if rank[n] < rank[owner] and n not in avoid
        ]
        better, _ = self._without_nofailover(pkg, better, moving=True)  # a failback moves too
        if spec.failover_policy == "min_package_node":
            # Serviceguard: "failback cannot occur until the primary node is running
            # fewer packages than the current node" (else it undoes the balancing),
            # counted where the plan leaves them (see _fewer_packages)
            kept = self._fewer_packages(pkg, owner, better, self._expected)
            self._balanced[pkg] = (owner, better, kept)
            better = kept
        if not better:
            return None, "", None, []
        cands, _ = self._candidates(pkg, better)
        if cands:
            return cands[0], f"failback to preferred node {cands[0]}", StartReason.FAILBACK, []
        soon, _ = self._candidates(pkg, better, soon=True)
        if soon:
            # it fails back as soon as the dependencies this plan starts run: nothing
            # new starts next to it meanwhile (it would only have to halt again)
            self.leaving.add(pkg)
            return None, f"; fails back to {soon[0]} once its dependencies run", None, []
        weaker = self._weaker_exclusions(pkg)
        if weaker:
            cands, _ = self._candidates(pkg, better, ignore=weaker)
            if cands:
                target = cands[0]
                self.reserved[pkg] = target
                return (
                    target,
                    f"failback to preferred node {target}",
                    StartReason.FAILBACK,
                    self._blockers_at(pkg, target, weaker),
                )
        return None, "", None, []

    def _fewer_packages(
        self, pkg: str, owner: str, nodes: list[str], placed: dict[str, str] | None
    ) -> list[str]:
        """The ``nodes`` running fewer packages than ``owner`` does with ``pkg``. With
        ``placed`` (where a first plan left every package), the other packages are
        counted there, not where they run now: a package started next to ``pkg`` in
        this plan, or halted, would otherwise make it fail back in the next plan (and
        what started with it halt again). ``pkg`` and the packages that follow it
        (``same_node``) count on neither node. None: as far as this pass got."""
        if placed is None:
            load = self.load  # counts pkg on owner (held: placed there)
            return [n for n in nodes if load[n] < load[owner]]
        load = Counter(self._expected_load)
        where = placed.get(pkg)
        for q in (pkg, *self._followers(pkg)):  # they go where pkg goes
            if where is not None and placed.get(q) == where:
                load[where] -= 1
        return [n for n in nodes if load[n] <= load[owner]]

    def balance_changed(self) -> bool:
        """After planning without ``expected``: would a ``min_package_node`` failback
        be decided otherwise with the packages where this plan leaves them?"""
        if self._expected is not None or not self._balanced:
            return False
        placed = dict(self.placed)
        self._expected_load = Counter(placed.values())
        try:
            return any(
                self._fewer_packages(pkg, owner, nodes, placed) != kept
                for pkg, (owner, nodes, kept) in self._balanced.items()
            )
        finally:
            self._expected_load = Counter()

    def _followers(self, pkg: str) -> set[str]:
        """The packages that run where ``pkg`` runs (``up``, ``same_node``, transitively)."""
        out: set[str] = set()
        todo = [pkg]
        while todo:
            p = todo.pop()
            for q in self.dependents.get(p, ()):
                same = any(
                    d.package == p and d.condition == "up" and d.location == "same_node"
                    for d in self.packages[q].dependency
                )
                if same and q not in out and q != pkg:
                    out.add(q)
                    todo.append(q)
        return out

    def _stop(
        self,
        pkg: str,
        owner: str,
        why: str,
        *,
        target: str | None = None,
        start_reason: StartReason | None = None,
        halt_reason: HaltReason = HaltReason.AUTOMATIC_HALT,
    ) -> None:
        """Halt ``pkg`` (``target`` None) or move it, once its dependents halted first."""
        waiting = self._waiting_dependents(pkg, owner)
        if waiting:
            verb = "moving" if target else "halting"
            for q in waiting:
                self._mark(q, f"its dependency {pkg} is {verb} ({why})")
            head = f"halt_wait: {why}; waiting for "
            reason = f"{head}{', '.join(waiting)} to halt first"
            since = self._keep_since(pkg, owner, head, prefix=True)
            limit = self.packages[pkg].successor_halt_timeout
            if limit is None or self.now - since < limit:
                if limit is not None:
                    self._wake(since + limit)  # the timeout has a timer of its own
                self.leaving.add(pkg)
                if target is not None:
                    self.reserved[pkg] = target
                self._set(pkg, owner, reason, since=since)
                self.actions.append(Action(Verb.WAIT, pkg, owner, owner, reason))
                return
            why += f"; successor_halt_timeout passed for {', '.join(waiting)}"
        if target is None:
            self._unplace(pkg)
            self._set(pkg, None, why, halt_reason=halt_reason)
            self.actions.append(Action(Verb.HALT, pkg, owner, owner, why))
            return
        self._place(pkg, target)
        self._set(pkg, target, why, start_reason=start_reason, halt_reason=halt_reason)
        self.actions.append(Action(Verb.MOVE, pkg, target, owner, why))

    # -------------------------------------------------------------- free packages

    def free(self, pkg: str) -> None:
        spec = self.packages[pkg]
        admin = self.snap.admin_of(pkg)
        st = self.snap.status_of(pkg)
        cluster = self.snap.cluster
        fenced = st.state is PackageState.HALT_FAILED and spec.node_fail_fast
        if st.state in (PackageState.FAILED, PackageState.HALT_FAILED) and not fenced:
            self._set(pkg, None, f"{st.state.value}: waiting for an operator (package clear)")
            return
        if not admin.auto_run or admin.halt_requested:
            self._set(pkg, None, "global switching is off")
            return
        if admin.maintenance:
            self._set(pkg, None, "in maintenance")
            return
        if pkg in self.must_halt:
            self._set(pkg, None, self.must_halt[pkg])
            return
        eligible = self._eligible_nodes(spec, admin)
        if (
            cluster is not None
            and cluster.failover == "off"
            and st.node is not None
            and st.halt_reason != HaltReason.USER_HALT
            and admin.start_node is None
        ):
            # no failover: it may start again only where it ran
            eligible = [n for n in eligible if n == st.node]
            if not eligible:
                self._set(pkg, None, f"cluster failover is off (it ran on {st.node})")
                return
        if admin.start_node is not None:
            eligible = [n for n in eligible if n == admin.start_node]
        eligible, note = self._without_nofailover(pkg, eligible)
        if not eligible:
            self._set(
                pkg, None, "no eligible node (its nodes are down, halted or switched off)" + note
            )
            return
        avoid = self.avoid.get(pkg, {})
        elsewhere = [n for n in eligible if n not in avoid]
        if avoid and self._candidates(pkg, elsewhere)[0]:
            eligible = elsewhere  # a more important package needs it elsewhere
        cands, why = self._candidates(pkg, eligible)
        if cands and spec.failover_policy == "configured_node":
            target, blockers = self._claim_preferred(pkg, spec, eligible, cands[0])
            if target is not None:
                reason = f"start_wait: waiting for {', '.join(blockers)} to make room on {target}"
                self._set(pkg, None, reason)
                self.actions.append(Action(Verb.WAIT, pkg, None, None, reason))
                return
        if not cands:
            self._make_room(pkg, spec, eligible)
            pushed = self._push_away(pkg, spec, eligible)
            reason = f"start_wait: {why}"
            if pushed:
                reason += f"; {pushed} moves away to make room"
            self._set(pkg, None, reason)
            self.actions.append(Action(Verb.WAIT, pkg, None, None, reason))
            return
        node = self._pick(spec, cands)
        reason = start_reason_for(self.snap, pkg, node)
        prev = self.snap.assignments.get(pkg)
        if prev is not None and prev.node == node and prev.start_reason is not None:
            reason = prev.start_reason
        self._place(pkg, node)
        self._set(pkg, node, f"{reason.value} on {node}{note}", start_reason=reason)
        self.actions.append(Action(Verb.START, pkg, node, st.node, reason.value + note))

    def _without_nofailover(
        self, pkg: str, eligible: list[str], *, moving: bool = False
    ) -> tuple[list[str], str]:
        """``eligible`` without the nodes flagged ``!nofailover!N``, N being the node the
        package last ran on; and a note naming the skipped nodes ("" if none). A running
        package that ``moving`` (failback, node halt) also keeps off the nodes flagged
        for the node it came from (``previous_node``): it failed over from there, and
        it would otherwise move onto them right after starting (a churn)."""
        st = self.snap.status_of(pkg)
        origins = [n for n in (st.node, st.previous_node if moving else None) if n is not None]
        if not origins or not self.snap.flags:
            return eligible, ""
        flags = {NOFAILOVER + n for n in origins}
        skipped = [
            n for n in eligible if n not in origins and any(self.snap.has_flag(n, f) for f in flags)
        ]
        if not skipped:
            return eligible, ""
        names = ", ".join(
            sorted(f for f in flags if any(self.snap.has_flag(n, f) for n in skipped))
        )
        note = f" (skipped {', '.join(skipped)}: flag {names})"
        return [n for n in eligible if n not in skipped], note

    def _claim_preferred(
        self, pkg: str, spec: PackageSpec, eligible: list[str], first: str
    ) -> tuple[str | None, list[str]]:
        """Less important packages that this plan placed (not started yet) do not keep
        a more important one off a node it prefers to ``first``: they are told not to
        start, and the next pass places the more important one first. With automatic
        failback, running ones make room too (failback would displace them a moment
        later): returns (the node it waits for, the packages to wait for) then."""
        weaker = self._weaker_exclusions(pkg)
        cluster = self.snap.cluster
        if spec.failback_policy != "automatic" or (
            cluster is not None and cluster.failover == "off"
        ):
            weaker = frozenset(b for b in weaker if b not in self.held_by)
        if not weaker:
            return None, []
        better = eligible[: eligible.index(first)]
        cands, _ = self._candidates(pkg, better, ignore=weaker)
        if not cands:
            return None, []
        blockers = self._blockers_at(pkg, cands[0], weaker)
        for b in blockers:
            self._mark(b, f"making room for more important package {pkg}")
        if any(b in self.held_by for b in blockers):
            self.reserved[pkg] = cands[0]
            return cands[0], blockers
        return None, []

    def _pushes(self, a: str, dep: DependencySpec) -> bool:
        """Whether ``a`` may push its ``up``, ``different_node`` dependency off a node
        (CONCEPTS §4: when packages compete for a node, through exclusions or
        ``different_node``, the more important one wins): ``a`` outranks the dependency
        and every other package that needs it (a move halts them too)."""
        d = dep.package
        if dep.condition != "up" or dep.location != "different_node" or d not in self.packages:
            return False
        mine = priority(self.packages[a])
        if mine >= priority(self.packages[d]):
            return False
        return all(
            mine < self._effective_priority(q)
            for q in self.dependents.get(d, ())
            if q != a and (q in self.held_by or self._wants_to_run(q))
        )

    def keep_avoid(self, a: str, owner: str) -> None:
        """After planning the held ``a``: if it does not stay where it runs, the nodes it
        kept its ``different_node`` dependencies off must be free for them again:
        ``plan`` plans again from scratch without them (no decision they caused stays)."""
        entries = self._avoid_from.get(a)
        if not entries or (self.assign[a].node == owner and a not in self.leaving):
            return
        self.released.add(a)

    def _push_away(self, pkg: str, spec: PackageSpec, eligible: list[str]) -> str | None:
        """``pkg`` cannot start anywhere: if only its ``up``, ``different_node``
        dependency D keeps it off a node (D runs there, or this plan just placed it
        there, or moves there) and ``pkg`` may push D (``_pushes``), D is told to avoid
        that node: it moves to (or stays on) another one, and ``pkg`` starts there once
        D runs elsewhere. Returns D's name, or None."""
        if self._candidates(pkg, eligible, soon=True)[0]:
            return None  # it starts once its dependencies run: nothing to push
        for dep in spec.dependency:
            d = dep.package
            if not self._pushes(pkg, dep):
                continue
            where = self.placed.get(d)
            held = self.held_by.get(d)
            if where is None or where not in eligible or where in self.avoid.get(d, {}):
                continue
            if held is not None and d not in self.running:
                continue  # starting or halting: wait and see where it ends up
            others_allow = all(
                self._dep_allows(o, where, starting=True, soon=True)
                for o in spec.dependency
                if o is not dep and o.package in self.packages
            )
            if not others_allow:
                continue
            self.avoid.setdefault(d, {})[where] = f"making room for more important package {pkg}"
            if d in self.planned:
                self.late = True
            return d
        return None

    def _move_away(self, pkg: str, spec: PackageSpec, admin: AdminRecord, owner: str) -> bool:
        """``pkg`` runs on a node a more important package needs it off (``avoid``):
        move it to another eligible node, its dependents halting first. False if there
        is none (it stays)."""
        avoid = self.avoid[pkg]
        others = [n for n in self._eligible_nodes(spec, admin) if n not in avoid]
        others, _ = self._without_nofailover(pkg, others, moving=True)
        cands, _ = self._candidates(pkg, others)
        if not cands:
            return False
        self._stop(pkg, owner, avoid[owner], target=self._pick(spec, cands),
                   start_reason=StartReason.FAILOVER)  # fmt: skip
        return True

    def _make_room(self, pkg: str, spec: PackageSpec, eligible: list[str]) -> None:
        """A package that cannot start yet reserves the node it would start on once its
        ``up`` dependencies placed in this plan run, and the less important packages it
        excludes (``down``) there are halted: it starts once they are gone. Packages it
        excludes do not start on the reserved node meanwhile."""
        weaker: frozenset[str] = frozenset()
        cands, _ = self._candidates(pkg, eligible, soon=True)
        if not cands:  # no node without displacing somebody
            weaker = self._weaker_exclusions(pkg)
            if weaker:
                cands, _ = self._candidates(pkg, eligible, ignore=weaker, soon=True)
        if not cands:
            return
        target = self._pick(spec, cands)
        self.reserved[pkg] = target  # nobody else it excludes starts there meanwhile
        for b in self._blockers_at(pkg, target, weaker):
            self._mark(b, f"making room for more important package {pkg}")


def plan(snap: Snapshot, now: float) -> Plan:
    """Where every configured package should run, and what changes, with reasons."""
    order = planning_order(snap.packages)
    no_push: frozenset[str] = frozenset()
    p = _passes(_Planner(snap, now), order)
    while p.released - no_push:  # see _Planner.keep_avoid
        no_push |= p.released
        p = _passes(_Planner(snap, now, no_push=no_push), order)
    if p.balance_changed():
        # min_package_node failback counts packages where the plan leaves them: plan
        # again knowing where that is (see _Planner._fewer_packages)
        p = _passes(_Planner(snap, now, dict(p.placed), no_push), order)
    return Plan(assignments=p.assign, actions=p.actions, wake_at=p.wake_at)


def _passes(p: _Planner, order: list[str]) -> _Planner:
    # Decisions made late (a more important package making room, a moving dependency)
    # can reach packages planned earlier: plan again with what was learnt, until
    # nothing new is learnt (a few passes at most; usually one).
    for _ in range(MAX_PASSES):
        p.reset()
        for pkg in order:
            owner = p.held_by.get(pkg)
            if owner is not None:
                p.held(pkg, owner)
                p.keep_avoid(pkg, owner)
            else:
                p.free(pkg)
            p.planned.add(pkg)
        if not p.late:
            break
    return p
