"""The shared store: the ``Store`` contract (see ``vigil.store.base``) and its backends.

``open_store(url)`` picks the backend from a URL:

- ``sqlite:///ABSOLUTE/PATH`` — the embedded default, one file shared by the
  processes of one host (``SQLiteStore``);
- ``memory://`` — a new in-process ``MemoryStore`` (tests, demos);
- ``etcd://HOST:PORT`` — not available yet.
"""

from __future__ import annotations

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
from vigil.store.memory import MemoryStore
from vigil.store.sqlite import SQLiteStore

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
    "prefix_end",
]

_EXPECTED = "expected sqlite:///ABSOLUTE/PATH, memory:// or etcd://HOST:PORT"


def open_store(url: str) -> Store:
    """The store named by ``url``; raises StoreUnavailable for an unusable URL.

    Opening is lazy: a SQLite file is opened (and checked) by the first operation.
    """
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        if not path.startswith("/"):
            raise StoreUnavailable(f"store url {url!r}: the path must be absolute; {_EXPECTED}")
        return SQLiteStore(path)
    if url == "memory://":
        return MemoryStore()
    if url.startswith("etcd://"):
        raise StoreUnavailable("etcd backend not available yet")
    raise StoreUnavailable(f"store url {url!r} is not supported; {_EXPECTED}")
