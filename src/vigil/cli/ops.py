"""Operator requests: read-modify-write of a package's admin record, and --wait."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from vigil.errors import Conflict, NotFound, Timeout, UsageError, VigilError
from vigil.keys import Keys
from vigil.model import AdminRecord, PackageState, PackageStatus
from vigil.snapshot import UNREADABLE, Snapshot, encode, read_snapshot
from vigil.store import Compare, Delete, Op, Put, Store
from vigil.view import known_nodes, package_state

POLL = 0.05


def refuse_own_package(pkg: str) -> None:
    """A package's own scripts must not drive their own package (CONCEPTS §8)."""
    if os.environ.get("VIGIL_PACKAGE") == pkg:
        raise UsageError(
            f"package {pkg}: a script of this package cannot run vigil commands against "
            "its own package (command loop)"
        )


def require_package(snap: Snapshot, pkg: str) -> None:
    if pkg not in snap.packages:
        known = ", ".join(sorted(snap.packages)) or "none applied"
        raise NotFound(f"unknown package {pkg!r} (known: {known})")


def require_node(snap: Snapshot, node: str) -> None:
    known = known_nodes(snap) | {s.node for s in snap.status.values() if s.node}
    if node not in known:
        raise NotFound(f"unknown node {node!r} (known: {', '.join(sorted(known)) or 'none'})")


@dataclass(frozen=True)
class Change:
    admin: AdminRecord
    reset_status: bool = False  # an unowned failed/halt_failed package goes back to halted


async def change_admin(
    store: Store, keys: Keys, pkg: str, fn: Callable[[AdminRecord, Snapshot], Change]
) -> int:
    """Apply ``fn`` to the package's admin record with compare-and-swap; retry on races.
    Returns the store revision of the write (what came after it is newer)."""
    for _ in range(20):
        snap = await read_snapshot(store, keys)
        require_package(snap, pkg)
        change = fn(snap.admin_of(pkg), snap)
        akey = keys.admin(pkg)
        compares = [Compare.mod_revision(akey, snap.raw_revisions.get(akey, 0))]
        ops: list[Op] = [Put(akey, encode(change.admin))]
        if change.reset_status:
            compares, ops = _reset(keys, pkg, snap, compares, ops)
        res = await store.txn(compares, ops)
        if res.succeeded:
            return res.revision
    raise Conflict(f"package {pkg}: the store kept changing; try again")


def newer(snap: Snapshot, keys: Keys, pkg: str, revision: int) -> bool:
    """Whether the package's status was written after store revision ``revision``."""
    return snap.raw_revisions.get(keys.status(pkg), 0) > revision


def _reset(
    keys: Keys, pkg: str, snap: Snapshot, compares: list[Compare], ops: list[Op]
) -> tuple[list[Compare], list[Op]]:
    """An unowned failed / halt_failed package goes back to halted. The operator vouches
    that nothing of it runs: an owner key or a status that cannot be read (see
    vigil.snapshot) is replaced too, each guarded by the revision that was read."""
    okey, skey = keys.owner(pkg), keys.status(pkg)
    st = snap.status.get(pkg)
    owner = snap.owners.get(pkg)
    if owner == UNREADABLE:
        compares = [*compares, Compare.mod_revision(okey, snap.owner_revisions[pkg])]
        ops = [*ops, Delete(okey)]
    elif owner is not None:
        return compares, ops
    else:
        compares = [*compares, Compare.absent(okey)]
    unreadable = owner == UNREADABLE or (skey in snap.raw_revisions and st is None)
    failed = st is not None and st.state in (PackageState.FAILED, PackageState.HALT_FAILED)
    if not (unreadable or failed):
        return compares, ops
    new = (st or PackageStatus()).model_copy(
        update={
            "state": PackageState.HALTED,
            "message": "cleared by an operator",
            "since": time.time(),
        }
    )
    return (
        [*compares, Compare.mod_revision(skey, snap.raw_revisions.get(skey, 0))],
        [*ops, Put(skey, encode(new))],
    )


async def wait_for(
    store: Store,
    keys: Keys,
    pkg: str,
    want: set[PackageState],
    fail: set[PackageState],
    timeout: float,
    since: int,
) -> PackageState:
    """Poll until the package reaches a state in ``want``; a ``fail`` state written after
    store revision ``since`` ends the wait with an error naming it (store order, not
    clocks: the status may come from another host)."""
    deadline = time.monotonic() + timeout
    state = PackageState.HALTED
    while True:
        snap = await read_snapshot(store, keys)
        state, node, message = package_state(snap, pkg)
        if state in want:
            return state
        if state in fail and newer(snap, keys, pkg, since):
            where = f" on {node}" if node else ""
            raise VigilError(f"package {pkg} is {state.value}{where}: {message}")
        if time.monotonic() > deadline:
            raise Timeout(
                f"package {pkg} did not become {'/'.join(sorted(s.value for s in want))} "
                f"within {timeout:g}s (now {state.value}: {message})"
            )
        await asyncio.sleep(POLL)
