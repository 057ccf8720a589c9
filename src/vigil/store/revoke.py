"""Revoke a node's lease from outside the agent: what the sentinel does when its agent
died and every process of the node's packages is confirmed dead.

Revoking the lease deletes the node's key and every owner key bound to it at once, so
the other nodes take the packages over at once instead of waiting ``node_timeout``
for the lease to expire. Only the standard library is used (``sqlite3``,
``http.client``): the sentinel is a small process and must not load the store
clients. The SQLite statement is the one :class:`vigil.store.sqlite.SQLiteStore`
uses itself (:func:`revoke_locked`).
"""

from __future__ import annotations

import http.client
import json
import sqlite3
from urllib.parse import urlsplit


class RevokeFailed(Exception):
    """The lease could not be revoked (no member answered, the store is locked...)."""


def revoke_locked(conn: sqlite3.Connection, lease_id: int, rev: int) -> int:
    """Inside a write transaction of the SQLite store at revision ``rev``: delete the
    lease and its keys (one revision, with a DELETE event per key, if it had keys).
    Returns the new revision."""
    conn.execute("DELETE FROM leases WHERE id = ?", (lease_id,))
    keys = conn.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease_id,)).fetchall()
    if not keys:
        return rev
    rev += 1
    conn.execute("DELETE FROM kv WHERE lease = ?", (lease_id,))
    conn.executemany(
        "INSERT INTO history (rev, key, type, value, create_rev, version, lease)"
        " VALUES (?, ?, 'delete', x'', 0, 0, 0)",
        [(rev, key) for (key,) in keys],
    )
    return rev


def revoke_lease(url: str, lease_id: int, *, timeout: float = 2.0) -> bool:
    """Revoke ``lease_id`` in the store at ``url`` (``sqlite:///PATH`` or
    ``etcd://H:P,...``). True if it was revoked, False if it did not exist (expired
    or revoked already). Raises :class:`RevokeFailed` with a one-line reason."""
    if url.startswith("sqlite://"):
        return _revoke_sqlite(url.removeprefix("sqlite://"), lease_id, timeout)
    if url.startswith("etcd://"):
        return _revoke_etcd(url.removeprefix("etcd://").split(","), lease_id, timeout)
    raise RevokeFailed(f"cannot revoke a lease in store {url!r}")


def _revoke_sqlite(path: str, lease_id: int, timeout: float) -> bool:
    try:
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    except sqlite3.Error as exc:
        raise RevokeFailed(f"sqlite store {path}: {exc}") from None
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("SELECT 1 FROM leases WHERE id = ?", (lease_id,)).fetchone() is None:
                return False
            row = conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
            if row is None or not isinstance(row[0], int):
                raise RevokeFailed(f"sqlite store {path}: bad meta.revision")
            rev = revoke_locked(conn, lease_id, row[0])
            if rev != row[0]:
                conn.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (rev,))
            conn.execute("COMMIT")
            return True
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        raise RevokeFailed(f"sqlite store {path}: {exc}") from None
    finally:
        conn.close()


def _revoke_etcd(hosts: list[str], lease_id: int, timeout: float) -> bool:
    body = json.dumps({"ID": str(lease_id)})
    errors = []
    for host in hosts:
        parts = urlsplit("//" + host.strip())
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 2379, timeout=timeout)
        try:
            conn.request("POST", "/v3/lease/revoke", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{host}: {exc}")
            continue
        finally:
            conn.close()
        if resp.status == 200:
            return True
        text = data.decode(errors="replace")
        if "lease not found" in text:
            return False
        errors.append(f"{host}: HTTP {resp.status} {text[:120]}")
    raise RevokeFailed("etcd: " + "; ".join(errors))
