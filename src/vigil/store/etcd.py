"""The etcd backend: a ``Store`` on an etcd v3 cluster, through its JSON gateway.

``EtcdStore(["http://h1:2379", "http://h2:2379"])`` talks HTTP/1.1 (one
``httpx.AsyncClient`` per store, created on first use, closed by ``close()``) to
the gRPC-gateway every etcd member serves on its client URL: ``/v3/kv/range``,
``/v3/kv/put``, ``/v3/kv/deleterange``, ``/v3/kv/txn``, ``/v3/kv/compaction``,
``/v3/lease/grant``, ``/v3/lease/keepalive``, ``/v3/lease/revoke`` and the
streaming ``/v3/watch``. Keys are the UTF-8 bytes of vigil's ``str`` keys,
base64-encoded like values; etcd sorts keys by bytes, which for UTF-8 is the
order of ``str``. Tested with etcd 3.4 (Debian's ``etcd-server``) and 3.5.

Endpoints: requests go first to one member, the one that last worked ("asked
first"); a member that failed or was slower than another is not asked first again.
Idempotent requests (reads, lease grant and keepalive, compaction) are *hedged*:
asked of the next member too when the first has not answered within a fifth of the
timeout, at once when it cannot be reached or refuses (no leader), and the first
answer wins: a follower holds a keepalive while there is no leader (and answers as
soon as there is one), while a member whose host died never answers anything. A
write goes to the member asked first and to the next ones only while it surely was
not applied (the connection could not be made, or etcd refused before doing
anything); otherwise it raises ``StoreUnavailable`` saying that its outcome is
unknown. Every request carries the gRPC metadata ``hasleader``, so that a member cut
off from the quorum refuses at once (or closes a watch) instead of hanging.

Stores of one process can share which member they ask first (``share_with``): the
agent renews its lease through a store with a short timeout, every ``node_timeout``
/ 6, so it is the first to find a member dead; from then on its other requests go
elsewhere too, and its watch leaves that member at once (a watch is always on the
member asked first: when that changes, it is created again there, from its last
event). Each change is logged (``etcd: asking URL first from now on (...)``).

Where etcd differs from the contract, and what this backend does about it:

- Lease TTLs are whole seconds in etcd: ``lease_grant(ttl)`` asks for
  ``ceil(ttl)`` seconds, at least 1, and etcd may raise that to its own minimum
  (``ceil(1.5 * election timeout)``: 2 s with etcd's default settings).
  ``lease_keepalive`` returns the TTL etcd actually granted. etcd revokes
  expired leases every 500 ms, so expiry is seen up to ~0.5 s late.
- etcd fails a value compare on an absent key whatever the operand, while the
  contract compares ``b""``. A value compare that would hold for an absent key
  (``== b""``, ``!= x``, ``< x``) is evaluated here instead: the keys it names
  are read, then one etcd transaction guards their ``mod_revision`` and nests
  the requested transaction inside (the guard failing means a concurrent
  write: read again and retry). It is still one atomic transaction.
- etcd refuses a transaction branch that puts a key twice, or puts a key that
  a delete of the same branch covers: ``ValueError`` before anything is sent.
- Revisions: a fresh etcd cluster starts at revision 1, not 0.
- A live watcher is pushed its events as they happen, so compacting a revision
  that a live watch has already been sent does not raise ``Compacted`` in it;
  only a watch (re)started below the compaction revision does.
- Watches resume by themselves after a broken connection or a member restart,
  on any endpoint, from the revision of the last event they yielded (never a
  header revision: no event is skipped or repeated). If no endpoint lets the
  watch resume for ``watch_reconnect`` seconds it raises ``StoreUnavailable``.
  A watch that received nothing for ``watch_idle`` seconds (5 s) is created
  again from its last event: a member that froze or was cut off keeps the
  stream open and silent (sooner, when another request finds that member dead).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from vigil.errors import (
    Compacted,
    Conflict,
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
)
from vigil.store.memory import check_ops

__all__ = ["EtcdStore"]

log = logging.getLogger("vigil.store.etcd")

T = TypeVar("T")
Json = dict[str, Any]

# gRPC status codes that etcd's gateway reports in "code" / "grpc_code".
_NOT_FOUND = 5
_INVALID_ARGUMENT = 3
_OUT_OF_RANGE = 11
_DATA_LOSS = 15
# Codes after which another member may well answer.
_TRANSIENT = {1, 2, 4, 8, 10, 13, 14}

# Transport errors raised before the request left this host: safe to send elsewhere.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)

# How many times a transaction with emulated value compares is retried when a
# concurrent write changes the keys it read (see the module docstring).
_GUARD_ATTEMPTS = 64

_COMPARE_TARGETS = {
    "create": ("CREATE", "create_revision"),
    "mod": ("MOD", "mod_revision"),
    "version": ("VERSION", "version"),
    "value": ("VALUE", "value"),
}
_COMPARE_RESULTS = {"==": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}


class _BadData(Exception):
    """A reply vigil cannot read (turned into StoreCorrupt naming the endpoint)."""


class _Refused(Exception):
    """An error reply from etcd (gRPC code and message)."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def transient(self) -> bool:
        return self.code is None or self.code in _TRANSIENT

    @property
    def not_applied(self) -> bool:
        """Refused before etcd did anything: safe to send to another member."""
        return "no leader" in self.message or "not capable" in self.message


class _StreamBroken(Exception):
    """A watch stream ended or failed: resume it elsewhere."""


class _Idle(Exception):
    """A watch stream sent nothing for ``watch_idle`` seconds: create it again."""


class _Moved(Exception):
    """Another member is asked first now: the watch follows it (see ``_Members``)."""


class _Unreachable(Exception):
    """One member could not be reached (see ``EtcdStore._ask``)."""


# -- encoding -----------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _key(key: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"store keys are str, got {type(key).__name__}")
    return _b64(key.encode("utf-8"))


def _prefix_range(prefix: str) -> Json:
    """``key``/``range_end`` of every key starting with ``prefix`` (etcd's prefix rule)."""
    raw = prefix.encode("utf-8")
    end = bytearray(raw)
    while end and end[-1] == 0xFF:
        end.pop()
    if end:
        end[-1] += 1
        return {"key": _b64(raw), "range_end": _b64(bytes(end))}
    # Empty prefix (or only 0xff bytes, impossible in UTF-8): every key from ``raw`` on.
    return {"key": _b64(raw or b"\0"), "range_end": _b64(b"\0")}


def _key_or_prefix(key: str, prefix: bool) -> Json:
    return _prefix_range(key) if prefix else {"key": _key(key)}


def _op(op: Op) -> Json:
    if isinstance(op, Get):
        return {"request_range": _key_or_prefix(op.key, op.prefix)}
    if isinstance(op, Put):
        put: Json = {"key": _key(op.key), "value": _b64(op.value)}
        if op.lease:
            put["lease"] = str(op.lease)
        return {"request_put": put}
    return {"request_delete_range": _key_or_prefix(op.key, op.prefix)}


def _compare(c: Compare) -> Json:
    if not isinstance(c, Compare):
        raise TypeError(f"not a store compare: {c!r}")
    if c.target not in _COMPARE_TARGETS:
        raise ValueError(f"unknown compare target {c.target!r}")
    if c.op not in _COMPARE_RESULTS:
        raise ValueError(f"unknown compare operator {c.op!r}")
    target, field = _COMPARE_TARGETS[c.target]
    operand: str
    if c.target == "value":
        if type(c.operand) is not bytes:
            raise TypeError(f"compare {c.target} with {type(c.operand).__name__}")
        operand = _b64(c.operand)
    else:
        if type(c.operand) is not int:
            raise TypeError(f"compare {c.target} with {type(c.operand).__name__}")
        operand = str(c.operand)
    return {
        "key": _key(c.key),
        "target": target,
        "result": _COMPARE_RESULTS[c.op],
        field: operand,
    }


def _check_branch(ops: Sequence[Op]) -> None:
    """etcd's rule for one branch: no key put twice, no put under a delete."""
    puts: set[str] = set()
    deletes = [op for op in ops if isinstance(op, Delete)]
    for op in ops:
        if not isinstance(op, Put):
            continue
        clash = op.key in puts or any(
            op.key.startswith(d.key) if d.prefix else op.key == d.key for d in deletes
        )
        if clash:
            raise ValueError(
                f"etcd store: a transaction cannot put key {op.key!r} twice, or put and "
                "delete it, in the same branch"
            )
        puts.add(op.key)


# -- decoding -----------------------------------------------------------------


def _int(data: Json, name: str) -> int:
    value = data.get(name, 0)
    if isinstance(value, bool):
        raise _BadData(f"field {name} is {value!r}, expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise _BadData(f"field {name} is {value!r}, expected an integer")


def _bytes(data: Json, name: str) -> bytes:
    value = data.get(name, "")
    if not isinstance(value, str):
        raise _BadData(f"field {name} is {value!r}, expected base64")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _BadData(f"field {name} is not base64: {value[:40]!r}") from exc


def _dict(data: Json, name: str) -> Json:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise _BadData(f"field {name} is {value!r}, expected an object")
    return value


def _list(data: Json, name: str) -> list[Json]:
    value = data.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _BadData(f"field {name} is {value!r}, expected a list of objects")
    return value


def _str_key(data: Json) -> str:
    raw = _bytes(data, "key")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadData(f"key {raw[:60]!r} is not UTF-8 (not written by vigil)") from exc


def _kv(data: Json) -> KeyValue:
    return KeyValue(
        _str_key(data),
        _bytes(data, "value"),
        _int(data, "create_revision"),
        _int(data, "mod_revision"),
        _int(data, "version"),
        _int(data, "lease"),
    )


def _kvs(data: Json) -> list[KeyValue]:
    return [_kv(kv) for kv in _list(data, "kvs")]


def _revision(data: Json) -> int:
    return _int(_dict(data, "header"), "revision")


def _event(data: Json) -> WatchEvent:
    kind = data.get("type", "PUT")
    kv = _dict(data, "kv")
    key = _str_key(kv)
    revision = _int(kv, "mod_revision")
    if kind in ("PUT", 0):
        return WatchEvent(
            EventType.PUT,
            key,
            _bytes(kv, "value"),
            revision,
            _int(kv, "create_revision"),
            _int(kv, "version"),
            _int(kv, "lease"),
        )
    if kind in ("DELETE", 1):
        return WatchEvent(EventType.DELETE, key, b"", revision)
    raise _BadData(f"unknown watch event type {kind!r}")


def _responses(data: Json, ops: Sequence[Op]) -> list[list[KeyValue] | int | None]:
    replies = _list(data, "responses")
    if len(replies) != len(ops):
        raise _BadData(f"{len(replies)} responses to a transaction of {len(ops)} ops")
    out: list[list[KeyValue] | int | None] = []
    for op, reply in zip(ops, replies, strict=True):
        if isinstance(op, Get):
            out.append(_kvs(_dict(reply, "response_range")))
        elif isinstance(op, Put):
            out.append(None)
        else:
            out.append(_int(_dict(reply, "response_delete_range"), "deleted"))
    return out


def _error_of(data: Any) -> _Refused | None:
    """The error in a gateway reply, if it is one (unary or stream form)."""
    if not isinstance(data, dict) or "error" not in data:
        return None
    error = data["error"]
    if isinstance(error, dict):  # in a stream: {"error": {"grpc_code": 14, "message": ...}}
        code = error.get("grpc_code", error.get("code"))
        message = error.get("message", "")
    else:  # unary: {"error": "...", "code": 5, "message": "..."}
        code = data.get("code")
        message = data.get("message") or error
    return _Refused(code if isinstance(code, int) else None, str(message))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, _Refused | _StreamBroken):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _socket_options() -> list[tuple[int, int, int]]:
    """TCP keepalive, so that a silently vanished member breaks idle watches."""
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return options


def _endpoint(url: str) -> str:
    if not isinstance(url, str):
        raise TypeError(f"etcd endpoints are str URLs, got {type(url).__name__}")
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
        raise ValueError(f"etcd endpoint {url!r}: expected http://HOST:PORT")
    return url


async def _next_line(
    lines: AsyncIterator[str], moved: asyncio.Future[None], idle: float | None
) -> str | None:
    """The next line of a watch stream (None at its end). ``_Moved`` as soon as
    ``moved`` is done, TimeoutError after ``idle`` seconds without a line."""

    async def read() -> str | None:
        return await anext(lines, None)

    task = asyncio.ensure_future(read())
    try:
        done, _ = await asyncio.wait(
            (task, moved), timeout=idle, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            return task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if moved.done():
        raise _Moved
    raise TimeoutError


# -- which member to ask ------------------------------------------------------


class _Members:
    """Which member of an etcd cluster this process asks first, and who to tell when
    that changes. Shared by the stores of one agent (``EtcdStore(..., share_with=)``):
    a member that did not answer one of them is not asked first by the others either,
    and a watch on it moves to the member asked first now (see ``EtcdStore.watch``).
    """

    LOG_EVERY = 1.0  # seconds: moves closer together (no member answers) are logged at debug

    def __init__(self, endpoints: list[str]) -> None:
        self.endpoints = endpoints
        self.current = 0
        self._listeners: list[Callable[[], None]] = []
        self._logged = -math.inf

    def prefer(self, index: int, why: str, level: int = logging.WARNING) -> None:
        """Ask ``index`` first from now on, because of ``why`` (logged at ``level``)."""
        if index == self.current:
            return
        old, self.current = self.endpoints[self.current], index
        now = time.monotonic()
        if now - self._logged < self.LOG_EVERY:
            level = logging.DEBUG
        else:
            self._logged = now
        log.log(
            level, "etcd: asking %s first from now on (%s: %s)", self.endpoints[index], old, why
        )
        for listener in list(self._listeners):
            listener()

    def failed(self, index: int, why: str) -> None:
        """``index`` could not be reached: if it was asked first, the next one is."""
        if index == self.current:
            self.prefer((index + 1) % len(self.endpoints), why)

    def listen(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` whenever the member asked first changes; returns the
        function that stops it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)


# -- the store ----------------------------------------------------------------


class EtcdStore:
    """A ``Store`` on an etcd v3 cluster (see the module docstring).

    ``endpoints``: client URLs of the members (``http://HOST:PORT``), tried in
    turn. ``timeout``: seconds for one request to one endpoint (connecting,
    sending, waiting for the reply); ``connect_timeout`` bounds the connection
    part. When members answer but cannot serve (no leader: an election is under
    way), the request is tried again until ``timeout`` has passed; when no
    member can be reached at all it fails after one round, so a request takes at
    most about ``len(endpoints) * timeout``. ``watch_reconnect``: how long a
    watch keeps trying to resume before it raises ``StoreUnavailable``.
    ``watch_idle``: a watch that received nothing for that long is created again
    from its last event (on the member requests last worked on, then the next
    ones), because a member that hangs or is cut off keeps the stream open and
    silent; the kernel even answers TCP keepalives for a frozen process.
    ``share_with``: another store on the same endpoints whose choice of the member
    asked first this one shares (each keeps its own connections and timeouts).

    A store's connections belong to the event loop it is first used on: use
    (and close) it there; using it on another loop raises RuntimeError.
    """

    #: A new leader renews every lease: ``lessor.Promote`` gives each the full TTL
    #: plus the election timeout from the moment it took over.
    leases_extended_on_election = True

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 5.0,
        connect_timeout: float = 1.0,
        watch_reconnect: float = 30.0,
        watch_idle: float = 5.0,
        share_with: EtcdStore | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            raise TypeError("endpoints is a list of URLs, not one string")
        self._endpoints = [_endpoint(url) for url in endpoints]
        if not self._endpoints:
            raise ValueError("etcd store needs at least one endpoint")
        if share_with is not None and share_with._endpoints != self._endpoints:
            raise ValueError(
                f"share_with: {share_with!r} has other endpoints than {self._endpoints!r}"
            )
        if not timeout > 0 or not connect_timeout > 0 or not watch_idle > 0:
            raise ValueError("timeouts must be positive")
        self._timeout = timeout
        self._connect_timeout = min(connect_timeout, timeout)
        self._watch_reconnect = watch_reconnect
        self._watch_idle = watch_idle
        self._members: _Members = share_with._members if share_with else _Members(self._endpoints)
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    @property
    def endpoint(self) -> str:
        """The endpoint the next request goes to first (the last one that worked)."""
        return self._endpoints[self._members.current]

    def __repr__(self) -> str:
        return f"EtcdStore({self._endpoints!r})"

    # -- Store protocol ---------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        def parse(data: Json) -> KeyValue | None:
            kvs = _kvs(data)
            return kvs[0] if kvs else None

        return await self._call("/v3/kv/range", {"key": _key(key)}, parse, retry=True)

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        if not isinstance(prefix, str):
            raise TypeError(f"store keys are str, got {type(prefix).__name__}")

        def parse(data: Json) -> tuple[list[KeyValue], int]:
            return _kvs(data), _revision(data)

        return await self._call("/v3/kv/range", _prefix_range(prefix), parse, retry=True)

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
        _check_branch(success)
        _check_branch(failure)
        compares = tuple(compares)
        success = tuple(success)
        failure = tuple(failure)
        native = [_compare(c) for c in compares]  # also type-checks every compare
        # Value compares that hold for an absent key: etcd fails them, emulate.
        emulated = [c for c in compares if c.target == "value" and c.holds(None)]
        if not emulated:
            return await self._txn_native(native, success, failure)
        simple = [_compare(c) for c in compares if not (c.target == "value" and c.holds(None))]
        return await self._txn_guarded(emulated, simple, success, failure)

    async def lease_grant(self, ttl: float) -> int:
        if not ttl > 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        seconds = max(1, math.ceil(ttl))

        def parse(data: Json) -> int:
            if data.get("error"):
                raise _Refused(None, str(data["error"]))
            lease_id = _int(data, "ID")
            if lease_id <= 0:
                raise _BadData(f"lease grant returned id {lease_id}")
            return lease_id

        # Retried: a grant lost on the way back only leaves a lease that expires.
        return await self._call("/v3/lease/grant", {"TTL": str(seconds)}, parse, retry=True)

    async def lease_keepalive(self, lease_id: int) -> float:
        def parse(data: Json) -> float:
            ttl = _int(_dict(data, "result"), "TTL")
            if ttl <= 0:
                raise LeaseNotFound(f"lease {lease_id} not found (expired or revoked)")
            return float(ttl)

        return await self._hedged("/v3/lease/keepalive", {"ID": str(lease_id)}, parse, stream=True)

    async def lease_revoke(self, lease_id: int) -> None:
        def parse(data: Json) -> None:
            return None

        await self._call("/v3/lease/revoke", {"ID": str(lease_id)}, parse, retry=False)

    async def watch(self, prefix: str, after_revision: int) -> AsyncIterator[WatchEvent]:
        self._check_open()
        if not isinstance(prefix, str):
            raise TypeError(f"store keys are str, got {type(prefix).__name__}")
        request = _prefix_range(prefix)
        cursor = after_revision
        index = self._members.current
        failures: list[str] = []
        failing_since: float | None = None
        delay = 0.05
        while True:
            endpoint = self._endpoints[index]
            # start_revision 0 would mean "from now on": never ask for less than 1.
            start = max(cursor + 1, 1)
            body = {"create_request": {**request, "start_revision": str(start)}}
            try:
                stream = self._watch_stream(index, body, cursor)
                async with contextlib.aclosing(stream):
                    async for batch in stream:
                        if batch is None:  # the watch is created: this endpoint works
                            if failures:
                                self._members.prefer(index, failures[-1].split(": ", 1)[-1])
                            failures.clear()
                            failing_since = None
                            delay = 0.05
                            continue
                        seen = cursor  # a batch holds whole revisions
                        for event in batch:
                            if event.revision <= seen:
                                continue  # defensive: never repeat an event
                            yield event
                            cursor = event.revision
            except (_Idle, _Moved):
                index = self._members.current  # where requests last worked: maybe elsewhere
                continue
            except (httpx.TransportError, _StreamBroken, _Refused) as exc:
                self._check_open()
                if isinstance(exc, _Refused) and not exc.transient:
                    raise self._error(endpoint, exc) from None
                failures.append(f"{endpoint}: {_describe(exc)}")
                self._members.failed(index, _describe(exc))
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                elif now - failing_since > self._watch_reconnect:
                    raise StoreUnavailable(
                        f"etcd watch on {prefix!r} after revision {cursor}: no endpoint of "
                        f"{', '.join(self._endpoints)} answered for "
                        f"{self._watch_reconnect:g} s ({'; '.join(failures[-3:])})"
                    ) from exc
                index = (index + 1) % len(self._endpoints)
                if len(failures) % len(self._endpoints) == 0:  # tried them all: back off
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        client, self._client = self._client, None
        if client is not None and self._client_loop is asyncio.get_running_loop():
            await client.aclose()

    # -- extras -----------------------------------------------------------

    async def compact(self, revision: int) -> None:
        """Forget the history before ``revision``: watching from an older one raises Compacted."""

        def parse(data: Json) -> None:
            return None

        try:
            await self._call(
                "/v3/kv/compaction",
                {"revision": str(revision), "physical": True},
                parse,
                retry=True,
            )
        except Compacted:
            return  # already compacted at or past ``revision``
        except StoreError as exc:
            if "future revision" in str(exc):
                raise ValueError(f"cannot compact to future revision {revision}") from None
            raise

    async def __aenter__(self) -> EtcdStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- transactions -----------------------------------------------------

    async def _txn_native(
        self, compares: list[Json], success: Sequence[Op], failure: Sequence[Op]
    ) -> TxnResult:
        body = {
            "compare": compares,
            "success": [_op(op) for op in success],
            "failure": [_op(op) for op in failure],
        }

        def parse(data: Json) -> TxnResult:
            succeeded = data.get("succeeded", False) is True
            ops = success if succeeded else failure
            return TxnResult(succeeded, _revision(data), _responses(data, ops))

        read_only = all(isinstance(op, Get) for op in (*success, *failure))
        return await self._call("/v3/kv/txn", body, parse, retry=read_only)

    async def _txn_guarded(
        self,
        emulated: list[Compare],
        simple: list[Json],
        success: Sequence[Op],
        failure: Sequence[Op],
    ) -> TxnResult:
        """Evaluate ``emulated`` here, on keys the etcd transaction guards unchanged."""
        keys = sorted({c.key for c in emulated})
        read_only = all(isinstance(op, Get) for op in (*success, *failure))
        for _ in range(_GUARD_ATTEMPTS):
            seen = await self._txn_native([], [Get(key) for key in keys], ())
            current: dict[str, KeyValue] = {}
            for found in seen.responses:
                assert isinstance(found, list)
                current.update((kv.key, kv) for kv in found)
            holds = all(c.holds(current.get(c.key)) for c in emulated)
            guards = [
                _compare(
                    Compare(key, "mod", "==", current[key].mod_revision if key in current else 0)
                )
                for key in keys
            ]
            branch: list[Json]
            if holds:
                nested = {
                    "compare": simple,
                    "success": [_op(op) for op in success],
                    "failure": [_op(op) for op in failure],
                }
                branch = [{"request_txn": nested}]
            else:
                branch = [_op(op) for op in failure]
            body = {"compare": guards, "success": branch, "failure": []}

            def parse(data: Json, holds: bool = holds) -> TxnResult | None:
                if data.get("succeeded", False) is not True:
                    return None  # a guarded key changed meanwhile
                if not holds:
                    return TxnResult(False, _revision(data), _responses(data, failure))
                replies = _list(data, "responses")
                if len(replies) != 1:
                    raise _BadData(f"{len(replies)} responses to one nested transaction")
                inner = _dict(replies[0], "response_txn")
                succeeded = inner.get("succeeded", False) is True
                ops = success if succeeded else failure
                return TxnResult(succeeded, _revision(data), _responses(inner, ops))

            result = await self._call("/v3/kv/txn", body, parse, retry=read_only)
            if result is not None:
                return result
        raise Conflict(
            f"etcd transaction on {', '.join(keys)}: the keys kept changing "
            f"({_GUARD_ATTEMPTS} attempts)"
        )

    # -- HTTP -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"etcd store {', '.join(self._endpoints)} is closed")

    def _http(self) -> httpx.AsyncClient:
        self._check_open()
        loop = asyncio.get_running_loop()
        if self._client is None:
            https = any(url.startswith("https://") for url in self._endpoints)
            self._client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(socket_options=_socket_options(), verify=https),
                timeout=httpx.Timeout(self._timeout, connect=self._connect_timeout),
                headers={"Grpc-Metadata-hasleader": "true"},
                trust_env=False,
            )
            self._client_loop = loop
        elif self._client_loop is not loop:
            raise RuntimeError(
                f"{self!r} was first used on another event loop: its connections belong "
                "to that loop (open one store per event loop)"
            )
        return self._client

    def _error(self, endpoint: str, refused: _Refused) -> StoreError:
        """The vigil error for an error reply that is not worth another endpoint."""
        message = refused.message
        where = f"etcd {endpoint}"
        if refused.code == _NOT_FOUND and "lease not found" in message:
            return LeaseNotFound(f"{where}: {message}")
        if refused.code == _OUT_OF_RANGE and "compacted" in message:
            return Compacted(0, 0)
        if refused.code == _DATA_LOSS:
            return StoreCorrupt(f"{where}: {message}")
        if refused.code in (_INVALID_ARGUMENT, _OUT_OF_RANGE):
            return StoreError(f"{where} rejected the request: {message}")
        return StoreUnavailable(f"{where}: {message}")

    async def _call(
        self,
        path: str,
        body: Json,
        parse: Callable[[Json], T],
        *,
        retry: bool,
    ) -> T:
        """POST ``body`` to ``path`` and ``parse`` the reply.

        ``retry``: the request is idempotent (a read, a lease grant, a compaction), so it
        is hedged (see ``_hedged``). A write goes to the member asked first, and to the
        next ones only while it surely was not applied: its connection could not be
        made, or the member refused it before doing anything (no leader).
        """
        if retry:
            return await self._hedged(path, body, parse, stream=False)
        client = self._http()
        failures: list[str] = []
        count = len(self._endpoints)
        deadline = time.monotonic() + self._timeout
        delay = 0.05
        while True:
            # One round: every endpoint once, from the one asked first.
            answered = False  # some member answered but could not serve (an election)
            start = self._members.current
            for step in range(count):
                index = (start + step) % count
                endpoint = self._endpoints[index]
                try:
                    response = await client.post(endpoint + path, json=body)
                except httpx.TransportError as exc:
                    self._check_open()
                    self._members.failed(index, _describe(exc))
                    if not isinstance(exc, _NOT_SENT):
                        raise StoreUnavailable(
                            f"etcd {endpoint}{path}: {_describe(exc)}; the request may or may "
                            "not have been applied"
                        ) from exc
                    failures.append(f"{endpoint}: {_describe(exc)}")
                    continue
                try:
                    result = parse(self._decode(response, stream=False))
                except _Refused as refused:
                    if refused.transient and refused.not_applied:
                        failures.append(f"{endpoint}: {refused.message}")
                        answered = True
                        continue
                    raise self._error(endpoint, refused) from None
                except _BadData as exc:
                    raise StoreCorrupt(f"etcd {endpoint}{path}: {exc}") from None
                if failures:
                    self._members.prefer(index, failures[-1].split(": ", 1)[-1])
                return result
            if not answered or time.monotonic() + delay > deadline:
                raise StoreUnavailable(
                    f"etcd unavailable: no endpoint of {', '.join(self._endpoints)} answered "
                    f"({'; '.join(failures[-count:])})"
                )
            await asyncio.sleep(delay)  # a leader election takes about a second
            delay = min(delay * 2, 0.5)

    async def _hedged(
        self, path: str, body: Json, parse: Callable[[Json], T], *, stream: bool
    ) -> T:
        """An idempotent request (``stream``: its reply is a gateway stream, as for a
        lease keepalive), sent to the member asked first, then to the next one when
        none has answered within ``timeout / 5``, and at once when one cannot be
        reached or refuses it (no leader), or when another request of this process
        stopped asking that member first. The first answer wins, the others are
        cancelled; all within ``timeout``.

        A follower holds a keepalive while there is no leader (and answers it as soon
        as there is one) while a member that hangs or is cut off never answers
        anything: asking them side by side rides out an election without waiting on a
        dead member. The member that answered is asked first from now on.
        """
        count = len(self._endpoints)
        first = self._members.current
        order = [(first + k) % count for k in range(count)]
        running: dict[asyncio.Task[T], int] = {}
        failures: list[str] = []
        hedge_after = self._timeout / 5
        loop = asyncio.get_running_loop()
        started = loop.time()
        hurry: asyncio.Future[None] = loop.create_future()  # ask the next member now
        refusals: list[str] = []  # the members that could not serve it (no leader)

        def rush(why: str = "") -> None:
            if why:
                refusals.append(why)
            if not hurry.done():
                hurry.set_result(None)

        stop_listening = self._members.listen(rush)
        try:
            async with asyncio.timeout(self._timeout):
                while order or running:
                    if order:
                        index = order.pop(0)
                        ask = self._ask(index, path, body, parse, stream=stream, refused=rush)
                        running[asyncio.create_task(ask)] = index
                    if hurry.done():
                        hurry = loop.create_future()
                    waiting: set[asyncio.Future[Any]] = set(running)
                    if order:
                        waiting.add(hurry)
                    await asyncio.wait(
                        waiting,
                        timeout=hedge_after if order else None,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    for task in [t for t in running if t.done()]:
                        index = running.pop(task)
                        exc = task.exception()
                        if exc is None:
                            if index != first and refusals:
                                self._members.prefer(index, refusals[0])
                            elif index != first:  # slower than another, maybe not dead
                                why = f"no answer within {loop.time() - started:.2f} s"
                                self._members.prefer(index, why, logging.INFO)
                            return task.result()
                        if not isinstance(exc, _Unreachable):
                            raise exc
                        failures.append(str(exc))
                        self._members.failed(index, str(exc).split(": ", 1)[-1])
        except TimeoutError:
            failures.append(f"no answer within {self._timeout:g} s")
        finally:
            stop_listening()
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        self._check_open()
        raise StoreUnavailable(
            f"etcd unavailable: no endpoint of {', '.join(self._endpoints)} answered "
            f"({'; '.join(failures[-count:])})"
        )

    async def _ask(
        self,
        index: int,
        path: str,
        body: Json,
        parse: Callable[[Json], T],
        *,
        stream: bool,
        refused: Callable[[str], None],
    ) -> T:
        """One member, until it answers: a refusal that an election explains (no
        leader yet) is asked again, after calling ``refused(its message)``;
        ``_Unreachable`` if it cannot be reached."""
        endpoint = self._endpoints[index]
        delay = 0.02
        while True:
            try:
                response = await self._http().post(endpoint + path, json=body)
            except httpx.TransportError as exc:
                self._check_open()
                raise _Unreachable(f"{endpoint}: {_describe(exc)}") from None
            try:
                return parse(self._decode(response, stream=stream))
            except _Refused as exc:
                if not exc.transient:
                    raise self._error(endpoint, exc) from None
                refused(exc.message)
            except _BadData as exc:
                raise StoreCorrupt(f"etcd {endpoint}{path}: {exc}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    @staticmethod
    def _decode(response: httpx.Response, stream: bool) -> Json:
        text = response.text
        if stream:
            text = next((line for line in text.splitlines() if line.strip()), "")
        try:
            data = json.loads(text)
        except ValueError:
            if response.status_code == 200:
                raise _BadData(f"reply is not JSON: {text[:80]!r}") from None
            raise _Refused(
                None,
                f"HTTP {response.status_code} {text[:80]!r} (not an etcd v3 JSON gateway?)",
            ) from None
        refused = _error_of(data)
        if refused is not None:
            raise refused
        if not isinstance(data, dict):
            raise _BadData(f"reply is {type(data).__name__}, expected an object")
        if response.status_code != 200:
            raise _Refused(None, f"HTTP {response.status_code}: {text[:80]!r}")
        return data

    async def _watch_stream(
        self, index: int, body: Json, cursor: int
    ) -> AsyncGenerator[list[WatchEvent] | None, None]:
        """One watch connection to member ``index``: None once created, then each batch
        of events. ``_Moved`` as soon as another member is asked first (this one did not
        answer a request, or was slower than another), ``_Idle`` after ``watch_idle``
        seconds without a message."""
        endpoint = self._endpoints[index]
        client = self._http()
        timeout = httpx.Timeout(self._timeout, connect=self._connect_timeout, read=None)
        moved: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_move() -> None:
            if self._members.current != index and not moved.done():
                moved.set_result(None)

        stop_listening = self._members.listen(on_move)
        created = False
        try:
            on_move()
            if moved.done():  # another member is asked first since the watch chose this one
                raise _Moved
            # Until etcd confirms the watch, ``timeout`` bounds the wait; then watch_idle
            # bounds each wait for the next message (never the consumer's time: nothing
            # is timed while an event is handed out).
            async with (
                asyncio.timeout(self._timeout) as deadline,
                client.stream(
                    "POST", endpoint + "/v3/watch", json=body, timeout=timeout
                ) as response,
            ):
                if response.status_code != 200:
                    await response.aread()
                    self._decode(response, stream=True)  # raises the error it holds
                    raise _StreamBroken(f"HTTP {response.status_code}")
                lines = response.aiter_lines()
                idle = None  # until created
                while (line := await _next_line(lines, moved, idle)) is not None:
                    confirmed, events = self._watch_message(endpoint, line, cursor)
                    if confirmed and not created:
                        created = True
                        deadline.reschedule(None)
                        idle = self._watch_idle
                        yield None
                    if events:
                        if not created:
                            raise _StreamBroken("events before the watch was created")
                        yield events
                        cursor = events[-1].revision
        except TimeoutError:
            if created:
                raise _Idle from None
            raise _StreamBroken(
                f"no reply to the watch request within {self._timeout:g} s"
            ) from None
        finally:
            stop_listening()
        raise _StreamBroken("the watch stream ended")

    @staticmethod
    def _watch_message(endpoint: str, line: str, cursor: int) -> tuple[bool, list[WatchEvent]]:
        """Whether one watch stream message confirms the watch, and its events."""
        if not line.strip():
            return False, []
        try:
            message = json.loads(line)
        except ValueError:
            raise StoreCorrupt(f"etcd {endpoint}/v3/watch: not JSON: {line[:80]!r}") from None
        refused = _error_of(message)
        if refused is not None:
            raise _StreamBroken(f"{refused.message} (code {refused.code})")
        try:
            if not isinstance(message, dict):
                raise _BadData(f"message is {type(message).__name__}")
            result = _dict(message, "result")
            compacted = _int(result, "compact_revision")
            if compacted:
                raise Compacted(cursor, compacted)
            if result.get("canceled"):
                reason = result.get("cancel_reason") or "no reason given"
                raise _StreamBroken(f"watch canceled: {reason}")
            return result.get("created") is True, [_event(e) for e in _list(result, "events")]
        except _BadData as exc:
            raise StoreCorrupt(f"etcd {endpoint}/v3/watch: {exc}") from None
