"""The Store contract: the only shared state of a vigil cluster.

Every backend (memory, sqlite, etcd) implements ``Store`` with the same meaning,
and passes the one contract suite in ``tests/test_store_contract.py``:

- Keys are ``str``, values ``bytes``. Every write (put, delete, lease expiry)
  bumps one global revision; a transaction is one revision however many keys
  it touches. A key keeps ``create_revision`` (0 means absent), ``mod_revision``
  and ``version`` (number of puts since creation), like etcd.
- ``txn(compares, success, failure)`` is atomic: if every compare holds, the
  ``success`` ops run, else the ``failure`` ops. A compare on an absent key sees
  create_revision 0, mod_revision 0, version 0 and value ``b""``.
- Leases: ``lease_grant(ttl)`` returns an id; ``lease_keepalive(id)`` renews it
  for another ttl and raises ``LeaseNotFound`` once it expired or was revoked;
  keys put with a lease are deleted (each a DELETE event) when it expires or
  is revoked. Expiry is visible to watchers even if the holder is gone.
- ``watch(prefix, after_revision)`` yields every event on keys under
  ``prefix`` with a revision greater than ``after_revision``, in revision order,
  forever. To resume after a disconnect, pass the revision of the last event
  seen (never a header revision). If that history is gone it raises
  ``Compacted``: the caller re-reads a snapshot with ``range`` and watches from
  its revision.
- ``leases_extended_on_election`` says whether a lease may outlive its TTL after
  its holder stopped renewing it (etcd: yes; see the attribute).
- Unreachable store → ``StoreUnavailable``; unreadable contents → ``StoreCorrupt``.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


class EventType(enum.StrEnum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: EventType
    key: str
    value: bytes  # b"" for DELETE
    revision: int  # the revision of this change (mod_revision of a put)
    create_revision: int = 0
    version: int = 0
    lease: int = 0


CompareTarget = Literal["create", "mod", "version", "value"]
CompareOp = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True, slots=True)
class Compare:
    key: str
    target: CompareTarget
    op: CompareOp
    operand: int | bytes

    @staticmethod
    def absent(key: str) -> Compare:
        return Compare(key, "create", "==", 0)

    @staticmethod
    def exists(key: str) -> Compare:
        return Compare(key, "create", ">", 0)

    @staticmethod
    def mod_revision(key: str, revision: int) -> Compare:
        return Compare(key, "mod", "==", revision)

    @staticmethod
    def value_is(key: str, value: bytes) -> Compare:
        return Compare(key, "value", "==", value)

    def holds(self, kv: KeyValue | None) -> bool:
        """Evaluate this compare against the current ``kv`` (None = absent)."""
        actual: int | bytes
        if self.target == "create":
            actual = kv.create_revision if kv else 0
        elif self.target == "mod":
            actual = kv.mod_revision if kv else 0
        elif self.target == "version":
            actual = kv.version if kv else 0
        else:
            actual = kv.value if kv else b""
        if type(actual) is not type(self.operand):
            raise TypeError(f"compare {self.target} with {type(self.operand).__name__}")
        if self.op == "==":
            return actual == self.operand
        if self.op == "!=":
            return actual != self.operand
        if self.op == "<":
            return actual < self.operand  # type: ignore[operator]
        return actual > self.operand  # type: ignore[operator]


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class Get:
    key: str
    prefix: bool = False


Op = Put | Delete | Get


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int  # store revision after the transaction
    # One entry per op that ran: Get → list[KeyValue], Put → None, Delete → count deleted.
    responses: list[list[KeyValue] | int | None] = field(default_factory=list)


@runtime_checkable
class Store(Protocol):
    """See the module docstring for the contract every backend keeps."""

    #: True where a lease may outlive its TTL after its holder stopped renewing it:
    #: a new etcd leader renews every lease (by the TTL plus its election timeout), so
    #: the agents expire a silent node's lease themselves (agent/reaper.py).
    leases_extended_on_election: bool

    async def get(self, key: str) -> KeyValue | None: ...

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key starting with ``prefix``, sorted by key, and the revision read at."""
        ...

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Returns the new revision."""
        ...

    async def delete(self, key: str, prefix: bool = False) -> int:
        """Returns how many keys were deleted."""
        ...

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult: ...

    async def lease_grant(self, ttl: float) -> int: ...

    async def lease_keepalive(self, lease_id: int) -> float:
        """Renew for another ttl; returns the ttl. Raises LeaseNotFound if gone."""
        ...

    async def lease_revoke(self, lease_id: int) -> None: ...

    def watch(self, prefix: str, after_revision: int) -> AsyncIterator[WatchEvent]: ...

    async def close(self) -> None: ...


def prefix_end(prefix: str) -> str:
    """The smallest string greater than every string starting with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else "\U0010ffff"
