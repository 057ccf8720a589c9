"""The embedded default backend: one SQLite file shared by the processes of one host.

Layout (schema version 1)::

    meta(name PRIMARY KEY, value)      application='vigil', schema_version, revision,
                                       first_rev (oldest revision kept in history), boot_id
    kv(key PRIMARY KEY, value, create_rev, mod_rev, version, lease)
    history(id, rev, key, type, value, create_rev, version, lease)    one row per event
    leases(id, ttl, expires_at)

Concurrency: WAL mode, every write is one ``BEGIN IMMEDIATE`` transaction (so
writers queue on the database lock, waiting up to ``busy_timeout``), reads run
in a deferred transaction and see one snapshot. Each ``SQLiteStore`` owns one
connection, used only by its own single-thread executor, so the event loop
never blocks on SQLite.

Leases: ``expires_at`` is ``time.monotonic()`` (CLOCK_MONOTONIC, shared by all
the processes of one boot and immune to wall-clock jumps). Expired leases are
reaped at the start of every write transaction, before every read, and by the
watchers' poller, so that the DELETE events of a lease whose holder died show
up even if nobody writes. The boot id is kept in ``meta``: leases left over
from a previous boot are all expired when the store is first opened after a
reboot.

Watchers share one poller per ``SQLiteStore``: every ``poll_interval`` it runs
``PRAGMA data_version`` (which changes when another connection commits) and
compares the earliest lease expiry with the clock; only when something changed
do the watchers query ``history``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from vigil.errors import (
    Compacted,
    LeaseNotFound,
    StoreCorrupt,
    StoreError,
    StoreUnavailable,
)
from vigil.store.base import (
    Compare,
    Delete,
    EventType,
    Get,
    KeyValue,
    Op,
    Put,
    TxnResult,
    WatchEvent,
    prefix_end,
)
from vigil.store.inotify import DirWatch
from vigil.store.memory import check_ops
from vigil.store.revoke import revoke_locked

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

T = TypeVar("T")

SCHEMA_VERSION = 1
_APPLICATION = "vigil"

_SCHEMA = """
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value
) WITHOUT ROWID;
CREATE TABLE kv (
    key        TEXT PRIMARY KEY,
    value      BLOB NOT NULL,
    create_rev INTEGER NOT NULL,
    mod_rev    INTEGER NOT NULL,
    version    INTEGER NOT NULL,
    lease      INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX kv_lease ON kv (lease) WHERE lease != 0;
CREATE TABLE history (
    id         INTEGER PRIMARY KEY,
    rev        INTEGER NOT NULL,
    key        TEXT NOT NULL,
    type       TEXT NOT NULL,
    value      BLOB NOT NULL,
    create_rev INTEGER NOT NULL,
    version    INTEGER NOT NULL,
    lease      INTEGER NOT NULL
);
CREATE INDEX history_rev ON history (rev);
CREATE TABLE leases (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl        REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX leases_expiry ON leases (expires_at);
"""

_COLUMNS = {
    "meta": {"name", "value"},
    "kv": {"key", "value", "create_rev", "mod_rev", "version", "lease"},
    "history": {"id", "rev", "key", "type", "value", "create_rev", "version", "lease"},
    "leases": {"id", "ttl", "expires_at"},
}

# sqlite3 primary result codes (exc.sqlite_errorcode & 0xff).
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _key_range(prefix: str) -> tuple[str, str | None]:
    """[lo, hi) bounds of the keys starting with ``prefix`` (hi None = unbounded)."""
    if not prefix:
        return "", None
    stripped = prefix.rstrip("\U0010ffff")
    if not stripped:
        return prefix, None
    return prefix, prefix_end(stripped)


def _as_bytes(value: object) -> bytes:
    """A value cell as bytes. vigil writes BLOBs; a cell edited by hand (the sqlite3
    shell stores ``'text'`` as TEXT, ``5`` as INTEGER) is read as the bytes of its text,
    and the record's decoder reports it, naming the key, instead of a TypeError (or,
    for an INTEGER N, N zero bytes) stopping every reader."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return str(value).encode()


def _where_prefix(prefix: str) -> tuple[str, tuple[str, ...]]:
    lo, hi = _key_range(prefix)
    if hi is None:
        return "key >= ?", (lo,)
    return "key >= ? AND key < ?", (lo, hi)


class _Tx:
    """Revision bookkeeping of one write transaction."""

    __slots__ = ("rev",)

    def __init__(self, rev: int) -> None:
        self.rev = rev


# With inotify, watchers re-check at least this often even if no event came.
IDLE_POLL = 1.0


class SQLiteStore:
    """A ``Store`` in one SQLite file, shared by several processes of one host.

    ``poll_interval``: how often watchers check for changes (seconds).
    ``busy_timeout``: how long a write waits for the database lock before
    ``StoreUnavailable``. ``history_limit``: how many revisions of watch history
    are kept (trimmed now and then; at least that many).
    The file is opened lazily, on the first operation, in the store's own thread.
    """

    leases_extended_on_election = False  # leases expire at their TTL (module docstring)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        poll_interval: float = 0.02,
        busy_timeout: float = 5.0,
        history_limit: int = 10_000,
    ) -> None:
        if history_limit < 1:
            raise ValueError("history_limit must be at least 1")
        self._path = os.path.abspath(os.fspath(path))
        self._check_parent()
        self._poll_interval = poll_interval
        self._busy_timeout = busy_timeout
        self._history_limit = history_limit
        self._trim_every = max(1, min(100, history_limit // 10))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vigil-sqlite")
        self._closed = False
        # Owned by the executor thread:
        self._conn: sqlite3.Connection | None = None
        self._commits = 0  # bumped after each local commit that changed the revision
        self._poll_data_version: int | None = None
        self._poll_seen: tuple[int, int] | None = None
        self._next_expiry: float | None = None
        self._expiry_stale = True
        # Owned by the event loop:
        self._notified_commits = 0
        self._changed = asyncio.Event()
        self._changed_loop: asyncio.AbstractEventLoop | None = None
        self._watchers = 0
        self._poller: asyncio.Task[None] | None = None

    @property
    def path(self) -> str:
        return self._path

    # -- Store protocol ---------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        return await self._run(self._read, lambda conn: self._get_kv(conn, key))

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        def read(conn: sqlite3.Connection) -> tuple[list[KeyValue], int]:
            return self._get_range(conn, prefix), self._meta_int(conn, "revision")

        return await self._run(self._read, read)

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        return (await self.txn((), (Put(key, value, lease),))).revision

    async def delete(self, key: str, prefix: bool = False) -> int:
        deleted = (await self.txn((), (Delete(key, prefix),))).responses[0]
        assert isinstance(deleted, int)
        return deleted

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        check_ops(success)
        check_ops(failure)
        compares = tuple(compares)
        success = tuple(success)
        failure = tuple(failure)

        def apply(conn: sqlite3.Connection, tx: _Tx) -> TxnResult:
            return self._apply_txn(conn, tx, compares, success, failure)

        return await self._run(self._write, apply)

    async def lease_grant(self, ttl: float) -> int:
        if not ttl > 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")

        def grant(conn: sqlite3.Connection, tx: _Tx) -> int:
            cur = conn.execute(
                "INSERT INTO leases (ttl, expires_at) VALUES (?, ?)",
                (float(ttl), time.monotonic() + ttl),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

        return await self._run(self._write, grant)

    async def lease_keepalive(self, lease_id: int) -> float:
        def keepalive(conn: sqlite3.Connection, tx: _Tx) -> float:
            row = conn.execute("SELECT ttl FROM leases WHERE id = ?", (lease_id,)).fetchone()
            if row is None:
                raise LeaseNotFound(f"lease {lease_id} not found (expired or revoked)")
            ttl = float(row[0])
            conn.execute(
                "UPDATE leases SET expires_at = ? WHERE id = ?",
                (time.monotonic() + ttl, lease_id),
            )
            return ttl

        return await self._run(self._write, keepalive)

    async def lease_revoke(self, lease_id: int) -> None:
        def revoke(conn: sqlite3.Connection, tx: _Tx) -> None:
            if conn.execute("SELECT 1 FROM leases WHERE id = ?", (lease_id,)).fetchone() is None:
                raise LeaseNotFound(f"lease {lease_id} not found (expired or revoked)")
            tx.rev = self._revoke_locked(conn, lease_id, tx.rev)

        await self._run(self._write, revoke)

    async def watch(self, prefix: str, after_revision: int) -> AsyncIterator[WatchEvent]:
        self._check_open()
        self._watcher_started()
        try:
            cursor = after_revision
            while True:
                self._check_open()
                changed = self._change_event()
                events, scanned = await self._run(self._read_history, prefix, cursor)
                for event in events:
                    yield event
                    cursor = event.revision
                cursor = max(cursor, scanned)
                if not events:
                    await changed.wait()
        finally:
            self._watcher_stopped()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        self._changed.set()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._close_conn)
        finally:
            self._executor.shutdown(wait=True)

    # -- extras -----------------------------------------------------------

    async def compact(self, revision: int) -> None:
        """Forget the history before ``revision``: watching from an older one raises Compacted."""

        def compact(conn: sqlite3.Connection, tx: _Tx) -> None:
            if revision > tx.rev:
                raise ValueError(f"cannot compact to future revision {revision} (now {tx.rev})")
            if revision > self._meta_int(conn, "first_rev"):
                self._drop_history(conn, revision)

        await self._run(self._write, compact)

    async def __aenter__(self) -> SQLiteStore:
        await self._run(lambda conn: None)  # open (and check) the file now
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- event loop side --------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"sqlite store {self._path} is closed")

    def _check_parent(self) -> None:
        parent = os.path.dirname(self._path)
        if not os.path.isdir(parent):
            raise StoreUnavailable(f"sqlite store {self._path}: directory {parent} does not exist")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in the store's thread, errors mapped to StoreError."""
        self._check_open()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, functools.partial(self._call, fn, *args)
            )
        finally:
            if self._commits != self._notified_commits:
                self._notified_commits = self._commits
                self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _change_event(self) -> asyncio.Event:
        """The event the next change sets, bound to the running loop."""
        loop = asyncio.get_running_loop()
        if self._changed_loop is not loop:  # first use, or the store moved to a new loop
            self._changed = asyncio.Event()
            self._changed_loop = loop
        return self._changed

    def _watcher_started(self) -> None:
        self._watchers += 1
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(
                self._poll_loop(), name=f"vigil-sqlite-poller {self._path}"
            )

    def _watcher_stopped(self) -> None:
        self._watchers -= 1
        if self._watchers == 0 and self._poller is not None:
            self._poller.cancel()
            self._poller = None

    async def _poll_loop(self) -> None:
        """Check for changes: woken by inotify when another process writes the database
        (then every ``IDLE_POLL`` s as a safety net), or every ``poll_interval`` s where
        inotify is missing; and in time for the next lease expiry either way."""
        loop = asyncio.get_running_loop()
        watch = DirWatch.open(os.path.dirname(self._path), os.path.basename(self._path))
        wake = asyncio.Event()
        if watch is not None:
            loop.add_reader(watch.fd, lambda: wake.set() if watch.drain() else None)
        try:
            await self._poll_forever(wake, watch is not None)
        finally:
            if watch is not None:
                loop.remove_reader(watch.fd)
                watch.close()

    async def _poll_forever(self, wake: asyncio.Event, notified: bool) -> None:
        while not self._closed:
            interval = IDLE_POLL if notified else self._poll_interval
            expiry = self._next_expiry
            if expiry is not None:
                interval = min(interval, max(0.0, expiry - time.monotonic()) + 0.001)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await wake.wait()
            wake.clear()
            try:
                changed = await self._run(self._poll)
            except StoreError:
                # Let the watchers query again: they surface the error if it persists.
                changed = True
            if changed:
                self._notify()

    # -- executor thread side ---------------------------------------------

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            conn = self._open()
            return fn(conn, *args)
        except sqlite3.Error as exc:
            raise self._map_error(exc) from exc

    def _map_error(self, exc: sqlite3.Error) -> StoreError:
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            return StoreCorrupt(f"sqlite store {self._path}: {exc} (not a readable vigil store)")
        if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
            return StoreUnavailable(
                f"sqlite store {self._path}: database is locked "
                f"(still busy after {self._busy_timeout:g} s)"
            )
        message = str(exc)
        if message.startswith(("no such table", "no such column")) or isinstance(
            exc, sqlite3.IntegrityError
        ):
            return StoreCorrupt(f"sqlite store {self._path}: bad schema: {message}")
        return StoreUnavailable(f"sqlite store {self._path}: {message}")

    def _open(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        self._check_open()
        self._check_parent()
        conn = sqlite3.connect(self._path, timeout=self._busy_timeout, isolation_level=None)
        try:
            self._init_schema(conn)
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            conn.execute("PRAGMA synchronous=NORMAL")
            self._check_boot(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        if not self._tables(conn):
            conn.execute("BEGIN IMMEDIATE")
            try:
                if not self._tables(conn):  # nobody else created it meanwhile
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.executemany(
                        "INSERT INTO meta (name, value) VALUES (?, ?)",
                        [
                            ("application", _APPLICATION),
                            ("schema_version", SCHEMA_VERSION),
                            ("revision", 0),
                            ("first_rev", 1),
                            ("boot_id", _boot_id()),
                        ],
                    )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        self._validate_schema(conn)

    @staticmethod
    def _tables(conn: sqlite3.Connection) -> set[str]:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return {name for (name,) in rows if not name.startswith("sqlite_")}

    def _validate_schema(self, conn: sqlite3.Connection) -> None:
        tables = self._tables(conn)
        where = f"sqlite store {self._path}"
        if "meta" not in tables:
            raise StoreCorrupt(f"{where}: not a vigil store (no meta table)")
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        if meta.get("application") != _APPLICATION:
            raise StoreCorrupt(f"{where}: not a vigil store (meta.application is not 'vigil')")
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreCorrupt(
                f"{where}: schema version {version!r}, this vigil reads version {SCHEMA_VERSION}"
            )
        for table, columns in _COLUMNS.items():
            if table not in tables:
                raise StoreCorrupt(f"{where}: bad schema: table {table} is missing")
            have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})").fetchall()}
            missing = sorted(columns - have)
            if missing:
                raise StoreCorrupt(
                    f"{where}: bad schema: table {table} lacks column(s) {', '.join(missing)}"
                )
        for name in ("revision", "first_rev"):
            if not isinstance(meta.get(name), int):
                raise StoreCorrupt(f"{where}: bad meta.{name}: {meta.get(name)!r}")

    def _check_boot(self, conn: sqlite3.Connection) -> None:
        """Leases from a previous boot carry stale monotonic times: expire them all."""
        boot = _boot_id()
        if not boot or self._meta(conn, "boot_id") == boot:
            return

        def new_boot(conn: sqlite3.Connection, tx: _Tx) -> None:
            if self._meta(conn, "boot_id") == boot:
                return
            for (lease_id,) in conn.execute("SELECT id FROM leases ORDER BY id").fetchall():
                tx.rev = self._revoke_locked(conn, lease_id, tx.rev)
            conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('boot_id', ?)", (boot,))

        self._write(conn, new_boot)

    @staticmethod
    def _meta(conn: sqlite3.Connection, name: str) -> Any:
        row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else row[0]

    def _meta_int(self, conn: sqlite3.Connection, name: str) -> int:
        value = self._meta(conn, name)
        if not isinstance(value, int):
            raise StoreCorrupt(f"sqlite store {self._path}: bad meta.{name}: {value!r}")
        return value

    def _write(self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection, _Tx], T]) -> T:
        """One BEGIN IMMEDIATE transaction: reap expired leases, then ``fn``."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            start = self._meta_int(conn, "revision")
            first = self._meta_int(conn, "first_rev")
            tx = _Tx(start)
            self._reap(conn, tx)
            result = fn(conn, tx)
            if tx.rev != start:
                conn.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (tx.rev,))
                if tx.rev // self._trim_every != start // self._trim_every:
                    self._drop_history(conn, tx.rev - self._history_limit + 1)
            changed = tx.rev != start or self._meta_int(conn, "first_rev") != first
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            self._expiry_stale = True
        if changed:
            self._commits += 1
        return result

    def _read(self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        """One read transaction (a consistent snapshot), after reaping expired leases."""
        expired = conn.execute(
            "SELECT 1 FROM leases WHERE expires_at <= ? LIMIT 1", (time.monotonic(),)
        ).fetchone()
        if expired is not None:
            self._write(conn, lambda conn, tx: None)
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def _drop_history(self, conn: sqlite3.Connection, first_kept: int) -> None:
        if first_kept <= self._meta_int(conn, "first_rev"):
            return
        conn.execute("DELETE FROM history WHERE rev < ?", (first_kept,))
        conn.execute("UPDATE meta SET value = ? WHERE name = 'first_rev'", (first_kept,))

    def _reap(self, conn: sqlite3.Connection, tx: _Tx) -> None:
        rows = conn.execute(
            "SELECT id FROM leases WHERE expires_at <= ? ORDER BY expires_at, id",
            (time.monotonic(),),
        ).fetchall()
        for (lease_id,) in rows:
            tx.rev = self._revoke_locked(conn, lease_id, tx.rev)

    @staticmethod
    def _revoke_locked(conn: sqlite3.Connection, lease_id: int, rev: int) -> int:
        """Delete the lease and its keys (one revision if there were keys)."""
        return revoke_locked(conn, lease_id, rev)

    @staticmethod
    def _row_kv(row: tuple[Any, ...]) -> KeyValue:
        key, value, create_rev, mod_rev, version, lease = row
        return KeyValue(key, _as_bytes(value), create_rev, mod_rev, version, lease)

    def _get_kv(self, conn: sqlite3.Connection, key: str) -> KeyValue | None:
        row = conn.execute(
            "SELECT key, value, create_rev, mod_rev, version, lease FROM kv WHERE key = ?",
            (key,),
        ).fetchone()
        return None if row is None else self._row_kv(row)

    def _get_range(self, conn: sqlite3.Connection, prefix: str) -> list[KeyValue]:
        where, params = _where_prefix(prefix)
        rows = conn.execute(
            "SELECT key, value, create_rev, mod_rev, version, lease FROM kv"
            f" WHERE {where} ORDER BY key",
            params,
        ).fetchall()
        return [self._row_kv(row) for row in rows]

    def _apply_txn(
        self,
        conn: sqlite3.Connection,
        tx: _Tx,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op],
    ) -> TxnResult:
        succeeded = all(c.holds(self._get_kv(conn, c.key)) for c in compares)
        ops = success if succeeded else failure
        rev = tx.rev + 1
        wrote = False
        responses: list[list[KeyValue] | int | None] = []
        for op in ops:
            if isinstance(op, Get):
                if op.prefix:
                    responses.append(self._get_range(conn, op.key))
                else:
                    kv = self._get_kv(conn, op.key)
                    responses.append([kv] if kv else [])
            elif isinstance(op, Put):
                self._put(conn, op, rev)
                wrote = True
                responses.append(None)
            else:
                responses.append(self._delete(conn, op, rev))
                wrote = wrote or responses[-1] != 0
        if wrote:
            tx.rev = rev
        return TxnResult(succeeded, tx.rev, responses)

    def _put(self, conn: sqlite3.Connection, op: Put, rev: int) -> None:
        if (
            op.lease
            and conn.execute("SELECT 1 FROM leases WHERE id = ?", (op.lease,)).fetchone() is None
        ):
            raise LeaseNotFound(f"lease {op.lease} not found (expired or revoked)")
        row = conn.execute("SELECT create_rev, version FROM kv WHERE key = ?", (op.key,)).fetchone()
        if row is None:
            create_rev, version = rev, 1
            conn.execute(
                "INSERT INTO kv (key, value, create_rev, mod_rev, version, lease)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (op.key, op.value, rev, rev, 1, op.lease),
            )
        else:
            create_rev, version = row[0], row[1] + 1
            conn.execute(
                "UPDATE kv SET value = ?, mod_rev = ?, version = ?, lease = ? WHERE key = ?",
                (op.value, rev, version, op.lease, op.key),
            )
        conn.execute(
            "INSERT INTO history (rev, key, type, value, create_rev, version, lease)"
            " VALUES (?, ?, 'put', ?, ?, ?, ?)",
            (rev, op.key, op.value, create_rev, version, op.lease),
        )

    def _delete(self, conn: sqlite3.Connection, op: Delete, rev: int) -> int:
        if op.prefix:
            where, params = _where_prefix(op.key)
        else:
            where, params = "key = ?", (op.key,)
        keys = conn.execute(f"SELECT key FROM kv WHERE {where} ORDER BY key", params).fetchall()
        if not keys:
            return 0
        conn.execute(f"DELETE FROM kv WHERE {where}", params)
        conn.executemany(
            "INSERT INTO history (rev, key, type, value, create_rev, version, lease)"
            " VALUES (?, ?, 'delete', x'', 0, 0, 0)",
            [(rev, key) for (key,) in keys],
        )
        return len(keys)

    def _read_history(
        self, conn: sqlite3.Connection, prefix: str, cursor: int
    ) -> tuple[list[WatchEvent], int]:
        """Events under ``prefix`` after ``cursor``, and the revision they were read at."""
        where, params = _where_prefix(prefix)
        conn.execute("BEGIN")
        try:
            first = self._meta_int(conn, "first_rev")
            if cursor + 1 < first:
                raise Compacted(cursor, first)
            revision = self._meta_int(conn, "revision")
            rows = conn.execute(
                "SELECT rev, key, type, value, create_rev, version, lease FROM history"
                f" WHERE rev > ? AND {where} ORDER BY rev, id",
                (cursor, *params),
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        events = []
        for rev, key, kind, value, create_rev, version, lease in rows:
            try:
                event_type = EventType(kind)
            except ValueError:
                raise StoreCorrupt(
                    f"sqlite store {self._path}: bad history event type {kind!r} at revision {rev}"
                ) from None
            events.append(
                WatchEvent(event_type, key, _as_bytes(value), rev, create_rev, version, lease)
            )
        return events, revision

    def _poll(self, conn: sqlite3.Connection) -> bool:
        """Cheap change check for the watchers; reaps expired leases. True if they must look."""
        changed = False
        (data_version,) = conn.execute("PRAGMA data_version").fetchone()
        if data_version != self._poll_data_version:
            self._poll_data_version = data_version
            conn.execute("BEGIN")
            try:
                seen = (self._meta_int(conn, "revision"), self._meta_int(conn, "first_rev"))
            finally:
                conn.execute("COMMIT")
            if seen != self._poll_seen:
                self._poll_seen = seen
                changed = True
            self._expiry_stale = True
        if self._expiry_stale:
            (self._next_expiry,) = conn.execute("SELECT MIN(expires_at) FROM leases").fetchone()
            self._expiry_stale = False
        if self._next_expiry is not None and self._next_expiry <= time.monotonic():
            self._write(conn, lambda conn, tx: None)  # reaps; counts as a local commit
        return changed
