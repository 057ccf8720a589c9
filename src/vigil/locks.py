"""The cluster-wide admin lock (CONCEPTS §5, LifeKeeper's getlocks/rlslocks).

Each holder or waiter is one key under ``locks/admin/``; the entry with the lowest
create revision holds the lock, the others wait in that order (FIFO). An entry
names the process it belongs to (node, PID, PID start time, PID namespace):

- its node's death releases it: the entry is bound to the node's lease when the
  node's agent is up, so it goes when that lease expires;
- its process's death releases it: the node's agent (every tick) and any waiter on
  the same node (while it waits) delete entries whose process is gone.

A process that already holds the lock through an ancestor (a script that ran
``vigil lock acquire`` and then ``vigil apply``) is let through: the lock is
re-entrant along the process tree, so nested global operations never deadlock.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from dataclasses import dataclass

from vigil.errors import NotFound, Timeout, UsageError
from vigil.keys import Keys
from vigil.model import LockEntry
from vigil.snapshot import decode_all, encode
from vigil.store import Store

POLL = 0.1
MAX_ID = 100


@dataclass(frozen=True)
class Held:
    key: str
    entry: LockEntry
    create_revision: int


def check_id(lock_id: str) -> str:
    if not lock_id or len(lock_id) > MAX_ID:
        raise UsageError(f"lock id {lock_id[:40]!r}: must be 1 to {MAX_ID} characters")
    bad = next((c for c in lock_id if not c.isprintable() or c.isspace() or c in "/!"), None)
    if bad is not None:
        raise UsageError(f"lock id {lock_id!r}: character {bad!r} not allowed")
    return lock_id


# ---------------------------------------------------------------- local processes


def pid_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot; None if there is no such process
    or it has ended (a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def ancestors(pid: int) -> list[int]:
    """``pid`` and its ancestors, nearest first."""
    out: list[int] = []
    while pid > 0 and pid not in out:
        out.append(pid)
        parent = parent_of(pid)
        if parent is None:
            break
        pid = parent
    return out


def pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def alive_here(entry: LockEntry, node: str, ns: str) -> bool | None:
    """Whether the entry's process is alive, if this process can tell (same node and
    PID namespace), else None."""
    if entry.node != node or entry.pid_ns != ns:
        return None
    start = pid_start(entry.pid)
    return start is not None and (entry.pid_start is None or start == entry.pid_start)


# ---------------------------------------------------------------- store


async def queue(store: Store, keys: Keys) -> list[Held]:
    """The holder first, then the waiters in order."""
    kvs, _ = await store.range(keys.admin_lock)
    kvs.sort(key=lambda kv: kv.create_revision)
    return [Held(kv.key, e, kv.create_revision) for kv, e in decode_all(LockEntry, kvs)]


async def reap(store: Store, keys: Keys, node: str, entries: list[Held]) -> list[Held]:
    """Delete the entries whose process this process can see is gone; the rest."""
    ns = pid_namespace()
    kept: list[Held] = []
    for h in entries:
        if alive_here(h.entry, node, ns) is False:
            await store.delete(h.key)
        else:
            kept.append(h)
    return kept


async def _node_lease(store: Store, keys: Keys, node: str) -> int:
    kv = await store.get(keys.node(node))
    return kv.lease if kv is not None else 0


async def acquire(
    store: Store,
    keys: Keys,
    lock_id: str,
    node: str,
    pid: int,
    timeout: float | None,
) -> Held | None:
    """Wait (FIFO) for the admin lock on behalf of ``pid`` on ``node``.

    Returns the new entry, or None if ``pid`` or an ancestor already holds the lock.
    Raises Timeout (after removing its entry) if ``timeout`` seconds pass first.
    """
    check_id(lock_id)
    ns = pid_namespace()
    lineage = set(ancestors(pid))
    current = await queue(store, keys)
    if current:
        top = current[0].entry
        if (
            top.node == node
            and top.pid_ns == ns
            and top.pid in lineage
            and alive_here(top, node, ns)
        ):
            return None
    entry = LockEntry(id=lock_id, node=node, pid=pid, pid_start=pid_start(pid), pid_ns=ns)
    key = keys.admin_lock + f"{node}.{pid}.{secrets.token_hex(4)}"
    await store.put(key, encode(entry), lease=await _node_lease(store, keys, node))
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            current = await reap(store, keys, node, await queue(store, keys))
            mine = next((h for h in current if h.key == key), None)
            if mine is None:
                raise NotFound(f"admin lock entry {key} vanished while waiting (node lease lost?)")
            if current[0].key == key:
                return mine
            if deadline is not None and time.monotonic() >= deadline:
                holder = current[0].entry
                raise Timeout(
                    f"admin lock: still held by {holder.flag} after {timeout:g}s "
                    f"({len(current) - 1} waiting)"
                )
            await asyncio.sleep(POLL)
    except BaseException:
        await asyncio.shield(store.delete(key))
        raise


async def release(
    store: Store, keys: Keys, node: str, pids: list[int], lock_id: str | None
) -> list[LockEntry]:
    """Delete the entries of the first of ``pids`` (nearest process first) that has any
    on ``node`` (and with ``lock_id``, if given); what was released."""
    entries = await queue(store, keys)
    ns = pid_namespace()
    for pid in pids:
        mine = [
            h
            for h in entries
            if h.entry.node == node
            and h.entry.pid == pid
            and h.entry.pid_ns == ns
            and (lock_id is None or h.entry.id == lock_id)
        ]
        if mine:
            for h in mine:
                await store.delete(h.key)
            return [h.entry for h in mine]
    return []


class AdminLock:
    """``async with AdminLock(...)``: hold the admin lock for this process's own work
    (apply, recover); a no-op if an ancestor already holds it."""

    def __init__(
        self, store: Store, keys: Keys, lock_id: str, node: str, timeout: float | None
    ) -> None:
        self.store, self.keys, self.lock_id, self.node, self.timeout = (
            store,
            keys,
            lock_id,
            node,
            timeout,
        )
        self.held: Held | None = None

    async def __aenter__(self) -> AdminLock:
        self.held = await acquire(
            self.store, self.keys, self.lock_id, self.node, os.getpid(), self.timeout
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.held is not None:
            await asyncio.shield(self.store.delete(self.held.key))
