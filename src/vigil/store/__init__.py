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

import re

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

_EXPECTED = "expected sqlite:///ABSOLUTE/PATH, memory:// or etcd://HOST:PORT[,HOST:PORT...]"
_ETCD_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::([0-9]{1,5}))?")
_ETCD_PORT = 2379


def _etcd_endpoints(url: str) -> list[str]:
    """``etcd://h1:2379,h2`` → ``["http://h1:2379", "http://h2:2379"]``."""
    hosts = url.removeprefix("etcd://").split(",")
    endpoints = []
    for host in hosts:
        match = _ETCD_HOST.fullmatch(host.strip())
        if match is None or not 0 < int(match.group(2) or _ETCD_PORT) < 65536:
            raise StoreUnavailable(f"store url {url!r}: bad etcd member {host!r}; {_EXPECTED}")
        endpoints.append(f"http://{match.group(1)}:{match.group(2) or _ETCD_PORT}")
    return endpoints


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
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        if not path.startswith("/"):
            raise StoreUnavailable(f"store url {url!r}: the path must be absolute; {_EXPECTED}")
        return SQLiteStore(path)
    if url == "memory://":
        return MemoryStore()
    if url.startswith("etcd://"):
        from vigil.store.etcd import EtcdStore  # httpx is imported only for etcd

        peer = share_with if isinstance(share_with, EtcdStore) else None
        if timeout is None:
            return EtcdStore(_etcd_endpoints(url), share_with=peer)
        return EtcdStore(
            _etcd_endpoints(url), timeout=timeout, connect_timeout=timeout / 2, share_with=peer
        )
    raise StoreUnavailable(f"store url {url!r} is not supported; {_EXPECTED}")
