"""Store URLs: which backend and where, checked before anything is opened.

- ``sqlite:///ABSOLUTE/PATH`` — one SQLite file (the path names a file, not ``/``);
- ``memory://`` — a new in-process store (tests, demos, ``vigil simulate``);
- ``etcd://HOST[:PORT][,HOST[:PORT]...]`` — etcd members (port 2379 by default,
  1 to 65535), reached at ``http://HOST:PORT``.

``parse_store_url`` is pure: ``vigil check`` uses it to refuse a URL that can never
work (exit 2, naming cluster.toml: store), and ``open_store`` to pick the backend.
"""

from __future__ import annotations

import re
from typing import Literal

EXPECTED = "expected sqlite:///ABSOLUTE/PATH, memory:// or etcd://HOST:PORT[,HOST:PORT...]"
ETCD_PORT = 2379
_ETCD_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::([0-9]{1,5}))?", re.ASCII)

StoreKind = Literal["sqlite", "memory", "etcd"]


class StoreUrlError(ValueError):
    """An unusable store URL: ``problem`` says why."""

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(f"{EXPECTED}, got {url!r} ({problem})")
        self.url = url
        self.problem = problem


def parse_store_url(url: str) -> tuple[StoreKind, list[str]]:
    """``"etcd://h1:2379,h2"`` → ``("etcd", ["http://h1:2379", "http://h2:2379"])``;
    ``"sqlite:///var/lib/vigil/store.db"`` → ``("sqlite", ["/var/lib/vigil/store.db"])``;
    ``"memory://"`` → ``("memory", [])``. Raises StoreUrlError saying what is wrong."""
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        if not path.startswith("/"):
            raise StoreUrlError(url, "the path must be absolute")
        if path.endswith("/") or path.rsplit("/", 1)[-1] in (".", ".."):
            raise StoreUrlError(url, "the path must name a file")
        if "\0" in path:
            raise StoreUrlError(url, "NUL is not allowed in a path")
        return "sqlite", [path]
    if url == "memory://":
        return "memory", []
    if url.startswith("etcd://"):
        endpoints = []
        for host in url.removeprefix("etcd://").split(","):
            match = _ETCD_HOST.fullmatch(host)
            if match is None or not 0 < int(match.group(2) or ETCD_PORT) < 65536:
                raise StoreUrlError(url, f"bad etcd member {host!r}")
            endpoints.append(f"http://{match.group(1)}:{match.group(2) or ETCD_PORT}")
        return "etcd", endpoints
    raise StoreUrlError(url, "not supported")
