"""The cluster as an operator sees it, derived from one snapshot. Pure.

This is the shape of ``vigil status --json`` (CONCEPTS §9)::

    {"cluster": NAME, "revision": INT,
     "nodes": {NAME: {"state": "up"|"down"|"halted", "pid": INT|null,
                      "containment": "cgroup"|"process-group"|null}},
     "packages": {NAME: {"state": ..., "node": NAME|null, "auto_run": bool,
                         "halt_reason": ..., "degraded": bool, "stale": bool,
                         "definition": DIGEST|null, "applied_definition": DIGEST|null,
                         "restarts": INT, ...,
                         "services": {NAME: {"pid": INT|null, "restarts": INT}}}},
     "problems": ["store key KEY: what is wrong", ...]}   # records left out

A node is listed while it is up, listed in cluster.toml's ``nodes``, or remembered as
a member (it joined once; ``vigil node remove`` forgets it): a member that is not up
is ``down``. A package is ``stale`` while it runs (or starts, halts, ...) with an
older definition than the applied one: ``vigil package restart`` applies it.
``definition`` is the fingerprint (``PackageSpec.digest()``) of the definition the
current run started with, ``applied_definition`` that of the applied one. A package's
``restarts`` counts its restarts in place by a monitor's action ``restart`` within its
restart window; each service's ``restarts`` its own process restarts (the table's
RESTARTS column is their sum).
"""

from __future__ import annotations

from typing import Any

from vigil.model import ACTIVE_STATES, NodeState, PackageState
from vigil.snapshot import UNREADABLE, Snapshot


def package_state(snap: Snapshot, pkg: str) -> tuple[PackageState, str | None, str]:
    """(state, node, message) as shown to operators.

    A package whose status says it is active on a node that no longer holds its owner
    key (the node died, its lease expired, its processes were fenced) is shown halted.
    """
    st = snap.status_of(pkg)
    owner = snap.owners.get(pkg)
    target = snap.assignments.get(pkg)
    if owner == UNREADABLE:
        return st.state, None, "its owner key cannot be read (see vigil status)"
    if st.state is PackageState.HALT_FAILED and owner != st.node:
        # its node is gone, but a failed stop may have left things behind: still blocked
        return st.state, st.node, f"{st.message}; node {st.node} is down"
    if st.state in ACTIVE_STATES and owner != st.node:
        if owner is None and target is not None and target.reason.startswith("start_wait"):
            return PackageState.START_WAIT, None, target.reason
        return PackageState.HALTED, None, f"node {st.node} is down; its processes were fenced"
    if owner is None and target is not None and target.reason.startswith("start_wait"):
        return PackageState.START_WAIT, None, target.reason
    if (
        st.state is PackageState.RUNNING
        and target is not None
        and target.reason.startswith("halt_wait")
    ):
        return PackageState.HALT_WAIT, st.node, target.reason
    node = st.node if st.state in ACTIVE_STATES or st.state is PackageState.FAILED else None
    return st.state, node, st.message


def known_nodes(snap: Snapshot) -> set[str]:
    """Up nodes, cluster.toml's ``nodes`` and the remembered members."""
    known = set(snap.nodes) | set(snap.members)
    if snap.cluster and snap.cluster.nodes:
        known |= set(snap.cluster.nodes)
    return known


def cluster_view(snap: Snapshot) -> dict[str, Any]:
    known = known_nodes(snap)
    nodes: dict[str, Any] = {}
    for name in sorted(known):
        rec = snap.nodes.get(name)
        node_state = NodeState.UP if rec else NodeState.DOWN
        if rec and snap.node_halted(name):
            node_state = NodeState.HALTED
        nodes[name] = {
            "state": node_state.value,
            "pid": rec.pid if rec else None,
            "containment": rec.containment if rec else None,
            "packages": sorted(p for p, n in snap.owners.items() if n == name),
            "controller": snap.controller == name,
            "flags": sorted(snap.flags.get(name, ())),
        }
    packages: dict[str, Any] = {}
    for pkg in sorted(set(snap.packages) | set(snap.status)):
        spec = snap.packages.get(pkg)
        st = snap.status_of(pkg)
        admin = snap.admin_of(pkg)
        state, node, message = package_state(snap, pkg)
        live = state in ACTIVE_STATES
        packages[pkg] = {
            "state": state.value,
            "node": node,
            "auto_run": admin.auto_run,
            "halt_reason": st.halt_reason.value if st.halt_reason else None,
            "start_reason": st.start_reason.value if st.start_reason and live else None,
            "degraded": st.degraded if live else False,
            "maintenance": admin.maintenance,
            "disabled_nodes": list(admin.disabled_nodes),
            "failed_nodes": sorted(admin.failed_nodes),
            "stale": bool(live and spec and st.definition and st.definition != spec.digest()),
            "definition": st.definition if live and st.definition else None,
            "applied_definition": spec.digest() if spec else None,
            "restart_generation": st.restart_generation,
            "configured": spec is not None,
            "message": message,
            "since": st.since,
            "restarts": st.restarts,
            "services": {
                name: {
                    "pid": s.pid if live else None,
                    "restarts": s.restarts,
                    "state": s.state if live else "stopped",
                }
                for name, s in st.services.items()
            }
            if live
            else {s.name: {"pid": None, "restarts": 0, "state": "stopped"} for s in spec.service}
            if spec
            else {},
            "monitors": {
                name: {"status": m.status, "failures": m.failures}
                for name, m in st.monitors.items()
            }
            if live
            else {},
        }
    return {
        "cluster": snap.cluster.name if snap.cluster else None,
        "revision": snap.revision,
        "nodes": nodes,
        "packages": packages,
        "problems": list(snap.problems),
    }
