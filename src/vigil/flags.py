"""Flags (CONCEPTS §5): named markers that live on a node and are seen cluster-wide.

A flag is the key ``flags/NODE/FLAG``; its value says who made it and when. Flags
are plain store keys without a lease, so they survive agent restarts and node loss.
The special flags vigil itself uses:

- ``!nofailover!NODE`` on node X: packages running on NODE must not fail over to X;
  removed by NODE's agent when NODE joins the cluster again;
- ``!restore`` / ``!remove`` / ``!delete`` on node X: X owes the matching post-hooks;
  ``!restore!NODE`` ... on X: NODE owes them for an action X took (see ``vigil.hooks``);
- ``!action!PID!TIMESTAMP!NODE:ID``: the admin lock's holder, shown by ``vigil flag
  list`` but kept in ``locks/`` (see ``vigil.locks``).
"""

from __future__ import annotations

import os

from vigil.errors import UsageError
from vigil.keys import Keys
from vigil.model import FlagRecord
from vigil.snapshot import decode_all, encode
from vigil.store import Compare, Delete, Put, Store

MAX_FLAG = 200
NOFAILOVER = "!nofailover!"
PENDING = ("restore", "remove", "delete")


def check_flag(flag: str) -> str:
    """``flag`` if it is a valid flag name, else a UsageError saying why."""
    if not flag:
        raise UsageError("flag name is empty")
    if len(flag) > MAX_FLAG:
        raise UsageError(f"flag {flag[:40]!r}...: longer than {MAX_FLAG} characters")
    bad = next((c for c in flag if not c.isprintable() or c.isspace() or c == "/"), None)
    if bad is not None:
        raise UsageError(
            f"flag {flag!r}: character {bad!r} not allowed (no spaces, control characters or '/')"
        )
    return flag


def nofailover(node: str) -> str:
    return NOFAILOVER + node


def pending(kind: str, node: str | None = None) -> str:
    """The pending post-hook flag ``!KIND`` or its remote form ``!KIND!NODE``."""
    return f"!{kind}" if node is None else f"!{kind}!{node}"


async def create(store: Store, keys: Keys, node: str, flag: str, by_node: str | None) -> bool:
    """Create ``flag`` on ``node``; False if it was already there (left unchanged)."""
    key = keys.flag(node, check_flag(flag))
    rec = FlagRecord(by_node=by_node, by_pid=os.getpid())
    res = await store.txn([Compare.absent(key)], [Put(key, encode(rec))])
    return res.succeeded


async def remove(store: Store, keys: Keys, node: str, flag: str) -> bool:
    """Remove ``flag`` from ``node``; False if it was not there."""
    return await store.delete(keys.flag(node, check_flag(flag))) > 0


async def test(store: Store, keys: Keys, node: str, flag: str) -> bool:
    return await store.get(keys.flag(node, check_flag(flag))) is not None


async def list_flags(
    store: Store, keys: Keys, node: str | None = None
) -> dict[str, dict[str, FlagRecord]]:
    """Flags by node (one node, or every node), each by name."""
    prefix = keys.node_flags(node) if node is not None else keys.flags
    kvs, _ = await store.range(prefix)
    out: dict[str, dict[str, FlagRecord]] = {}
    for kv, record in decode_all(FlagRecord, kvs):
        node_name, _, name = kv.key[len(keys.flags) :].partition("/")
        out.setdefault(node_name, {})[name] = record
    return out


def delete_ops(keys: Keys, pairs: list[tuple[str, str]]) -> list[Delete]:
    """Ops removing each (node, flag) pair, for a transaction."""
    return [Delete(keys.flag(node, flag)) for node, flag in pairs]
