"""The shared store: the ``Store`` contract (see ``vigil.store.base``) and its backends.

``open_store(url)`` picks the backend from a URL:

- ``sqlite:///ABSOLUTE/PATH`` — the embedded default, one file shared by the
  processes of one host (``SQLiteStore``);
- ``memory://`` — a new in-process ``MemoryStore`` (tests, demos);
- ``etcd://HOST[:PORT][,HOST[:PORT]...]`` — an etcd v3 cluster, reached at
  ``http://HOST:PORT`` (port 2379 by default) through its JSON gateway
  (``vigil.store.etcd.EtcdStore``, imported only when such a URL is opened).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vigil.errors import StoreUnavailable
from vigil.store.base import (
    Compare,
    CompareOp,
    CompareTarget,
    Delete,
    EventType,
    Get,
    KeyValue,
    Op,
    Put,
    Store,
    TxnResult,
    WatchEvent,
    prefix_end,
)
from vigil.store.url import EXPECTED, StoreUrlError, parse_store_url

if TYPE_CHECKING:
    from vigil.store.memory import MemoryStore
    from vigil.store.sqlite import SQLiteStore


def __getattr__(name: str) -> Any:
    """The backends are imported when first used, so that a small process that only
    needs :mod:`vigil.store.revoke` (the sentinel) does not load them."""
    if name == "MemoryStore":
        from vigil.store.memory import MemoryStore

        return MemoryStore
    if name == "SQLiteStore":
        from vigil.store.sqlite import SQLiteStore

        return SQLiteStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Compare",
    "CompareOp",
    "CompareTarget",
    "Delete",
    "EventType",
    "Get",
    "KeyValue",
    "MemoryStore",
    "Op",
    "Put",
    "SQLiteStore",
    "Store",
    "TxnResult",
    "WatchEvent",
    "open_store",
    "parse_store_url",
    "prefix_end",
]


def open_store(url: str, *, timeout: float | None = None, share_with: Store | None = None) -> Store:
    """The store named by ``url``; raises StoreUnavailable for an unusable URL.

    Opening is lazy: a SQLite file is opened (and checked), and etcd is
    connected to, by the first operation. ``timeout``: for etcd, seconds one
    request may wait for one member before the next is tried (default 5 s).
    ``share_with``: another store opened from ``url`` in this process; on etcd the
    two ask the same member first (one that did not answer either of them is not
    asked first by the other, and their watches leave it), each with its own
    connections and timeout. Ignored for the other backends.
    """
    try:
        kind, where = parse_store_url(url)
    except StoreUrlError as exc:
        raise StoreUnavailable(f"store url {url!r}: {exc.problem}; {EXPECTED}") from None
    if kind == "sqlite":
        from vigil.store.sqlite import SQLiteStore

        return SQLiteStore(where[0])
    if kind == "memory":
        from vigil.store.memory import MemoryStore

        return MemoryStore()
    from vigil.store.etcd import EtcdStore  # httpx is imported only for etcd

    peer = share_with if isinstance(share_with, EtcdStore) else None
    if timeout is None:
        return EtcdStore(where, share_with=peer)
    return EtcdStore(where, timeout=timeout, connect_timeout=timeout / 2, share_with=peer)
