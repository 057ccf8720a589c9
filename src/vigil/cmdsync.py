"""Command synchronization (CONCEPTS §7): resumable operator scripts.

An entry ``cmdsync/DESCRIPTOR`` (a :class:`CmdsyncEntry`) says that a script runs on
a node and how far it got (its last saved marker). When that node goes down, the
controller gives the entry to an up node with ``launch`` set, and that node's agent
runs the script again (see ``vigil.agent.cmdsync``): ``init`` scripts resume from
their marker, ``run`` scripts start over.

Every write is a compare-and-swap on the entry's mod revision, so the controller
reassigning an entry and the script saving a marker cannot overwrite each other.
The pure parts (:func:`unavailable`, :func:`reassign`) decide; the rest does I/O.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from vigil.config import ClusterSpec
from vigil.errors import CmdsyncUnavailable, Conflict, NotFound, UsageError
from vigil.keys import Keys
from vigil.model import CmdsyncEntry
from vigil.snapshot import Snapshot, decode, decode_all, encode
from vigil.store import Compare, Delete, Put, Store

RETRIES = 20


@dataclass(frozen=True)
class Stored:
    """An entry and the mod revision it was read at (for compare-and-swap)."""

    entry: CmdsyncEntry
    revision: int


def unavailable(cluster: ClusterSpec | None, up_nodes: Sequence[str]) -> str | None:
    """Why scripts cannot be rerun elsewhere in this cluster, or None if they can.

    A single-node cluster is one whose ``cluster.toml`` lists at most one node, or,
    without a ``nodes`` list, one with fewer than two nodes up."""
    if cluster is None:
        return "no configuration applied"
    if cluster.failover == "off":
        return f'cluster {cluster.name} has failover = "off"'
    known = cluster.nodes or list(up_nodes)
    if len(known) < 2:
        return f"cluster {cluster.name} has a single node: there is nowhere to rerun a script"
    return None


def require_available(snap: Snapshot, node: str) -> None:
    """Raise CmdsyncUnavailable unless scripts on ``node`` can be rerun elsewhere."""
    why = unavailable(snap.cluster, sorted(snap.nodes))
    if why is not None:
        raise CmdsyncUnavailable(f"cmdsync: {why}; the script is not protected")
    if node not in snap.nodes:
        up = ", ".join(sorted(snap.nodes)) or "none"
        raise CmdsyncUnavailable(
            f"cmdsync: this command's node {node} is not up (up: {up}); "
            "set --node or VIGIL_NODE to the vigil node the script runs on"
        )


def reassign(entries: Sequence[CmdsyncEntry], up_nodes: Sequence[str]) -> dict[str, CmdsyncEntry]:
    """Entries whose node is down, given to an up node with ``launch`` set. Pure.

    The target is the up node with the fewest entries (counting those just given),
    ties broken by the order of ``up_nodes`` (the cluster's node order)."""
    if not up_nodes:
        return {}
    load = {n: 0 for n in up_nodes}
    for e in entries:
        if e.node in load:
            load[e.node] += 1
    out: dict[str, CmdsyncEntry] = {}
    for e in sorted(entries, key=lambda e: (e.created_at, e.descriptor)):
        if e.node in load:
            continue
        target = min(up_nodes, key=lambda n: load[n])  # min keeps the first of equals
        load[target] += 1
        out[e.descriptor] = e.model_copy(
            update={
                "node": target,
                "launch": True,
                "by_agent": False,
                "pid": None,
                "reruns": e.reruns + 1,
            }
        )
    return out


def check_marker(text: str) -> int:
    """``-M`` must be a positive integer (digits only)."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise UsageError(f"cmdsync save: -M: expected a positive integer, got {text!r}")
    return int(text)


def new_descriptor(node: str) -> str:
    return f"{node}-{secrets.token_hex(4)}"


# ----------------------------------------------------------------------------- store


async def list_entries(store: Store, keys: Keys) -> list[Stored]:
    kvs, _ = await store.range(keys.cmdsyncs)
    return [Stored(entry, kv.mod_revision) for kv, entry in decode_all(CmdsyncEntry, kvs)]


async def get(store: Store, keys: Keys, descriptor: str) -> Stored:
    kv = await store.get(keys.cmdsync(descriptor))
    if kv is None:
        raise NotFound(f"cmdsync: no such descriptor {descriptor!r} (see vigil cmdsync list)")
    return Stored(decode(CmdsyncEntry, kv), kv.mod_revision)


async def put_if(store: Store, keys: Keys, entry: CmdsyncEntry, revision: int) -> bool:
    """Write ``entry`` if its key is still at ``revision`` (0: absent)."""
    key = keys.cmdsync(entry.descriptor)
    res = await store.txn([Compare.mod_revision(key, revision)], [Put(key, encode(entry))])
    return res.succeeded


async def delete_if(store: Store, keys: Keys, descriptor: str, revision: int) -> bool:
    key = keys.cmdsync(descriptor)
    res = await store.txn([Compare.mod_revision(key, revision)], [Delete(key)])
    return res.succeeded


async def register(
    store: Store,
    keys: Keys,
    *,
    node: str,
    script: str,
    params: Sequence[str],
    pid: int,
    mode: str,
    descriptor: str | None = None,
) -> str:
    """Create an entry and return its descriptor. With ``descriptor`` (a rerun: the
    script got VIGIL_CMDSYNC_DESCRIPTOR) an existing entry is kept, with its marker,
    and only its node and pid are brought up to date."""
    if descriptor is not None:
        for _ in range(RETRIES):
            kv = await store.get(keys.cmdsync(descriptor))
            if kv is None:
                break
            old = decode(CmdsyncEntry, kv)
            new = old.model_copy(update={"node": node, "pid": pid, "launch": False})
            if await put_if(store, keys, new, kv.mod_revision):
                return descriptor
        else:
            raise Conflict(f"cmdsync: descriptor {descriptor}: the store kept changing")
    entry = CmdsyncEntry(
        descriptor=descriptor or new_descriptor(node),
        script=script,
        params=tuple(params),
        node=node,
        mode=mode,
        pid=pid,
    )
    for _ in range(RETRIES):
        if await put_if(store, keys, entry, 0):
            return entry.descriptor
        entry = entry.model_copy(update={"descriptor": new_descriptor(node)})
    raise Conflict("cmdsync: could not find a free descriptor")


async def save(store: Store, keys: Keys, descriptor: str, marker: int, node: str) -> CmdsyncEntry:
    """Record ``marker``. Refused if the entry now belongs to another node: its node
    was taken for dead and the script is rerun there; this run must stop."""
    for _ in range(RETRIES):
        cur = await get(store, keys, descriptor)
        if cur.entry.node != node:
            raise UsageError(
                f"cmdsync: descriptor {descriptor} now belongs to node {cur.entry.node} "
                f"(its script is rerun there), not {node}; this run should stop"
            )
        new = cur.entry.model_copy(update={"marker": marker})
        if await put_if(store, keys, new, cur.revision):
            return new
    raise Conflict(f"cmdsync: descriptor {descriptor}: the store kept changing")


async def cancel(store: Store, keys: Keys, descriptor: str) -> bool:
    """Remove the entry; False if there was none."""
    return await store.delete(keys.cmdsync(descriptor)) > 0


async def remove_own(store: Store, keys: Keys, descriptor: str, node: str) -> bool:
    """Remove the entry once its script ended on ``node``; kept if another node took
    it over meanwhile (the script is rerun there). True if this call removed it."""
    for _ in range(RETRIES):
        kv = await store.get(keys.cmdsync(descriptor))
        if kv is None or decode(CmdsyncEntry, kv).node != node:
            return False
        if await delete_if(store, keys, descriptor, kv.mod_revision):
            return True
    raise Conflict(f"cmdsync: descriptor {descriptor}: the store kept changing")
