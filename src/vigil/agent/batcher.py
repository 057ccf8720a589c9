"""Group commit: concurrent small transactions of one agent go to the store as one.

During a burst (a node takes over 200 packages) every start claims its owner key
and writes its status a few times; on etcd each transaction is a raft round with
an fsync. ``TxnBatcher.txn`` queues a transaction; one task sends the queue's
head at once and, while it is in flight, the transactions that arrive meanwhile
wait and go together as the next single transaction (their compares and their
ops joined). When idle a transaction goes alone, so nothing waits for a timer.

Meaning is kept: if the joined compares all hold, every queued transaction
succeeded at the one revision; if one does not, each goes again alone, so each
gets its own answer. Transactions that touch the same key are never joined. A
store error fails every transaction of the joined one (the outcome is unknown, as
for a single one; nothing is retried). Only transactions whose callers use
``succeeded`` and ``revision`` (not ``responses``) may go through here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from vigil.store import Compare, Delete, Get, Op, Put, Store, TxnResult

MAX_OPS = 120  # etcd refuses more than 128 operations (or compares) per transaction


@dataclass
class _Item:
    compares: list[Compare]
    ops: list[Op]
    done: asyncio.Future[TxnResult]
    written: set[str] = field(default_factory=set)
    read: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        for op in self.ops:
            if isinstance(op, Put | Delete):
                self.written.add(op.key)
            elif isinstance(op, Get):
                raise ValueError("TxnBatcher: transactions with reads cannot be joined")
        self.read = {c.key for c in self.compares}


class TxnBatcher:
    def __init__(self, store: Store, max_ops: int = MAX_OPS) -> None:
        self.store = store
        self.max_ops = max_ops
        self._queue: list[_Item] = []
        self._task: asyncio.Task[None] | None = None
        self.sent = 0  # transactions sent to the store (for tests and benchmarks)
        self.joined = 0  # transactions that went as part of a joined one

    async def txn(self, compares: list[Compare], ops: list[Op]) -> TxnResult:
        done: asyncio.Future[TxnResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(list(compares), list(ops), done))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="txn-batcher")
        return await done

    def _take(self) -> list[_Item]:
        """The head of the queue that can be joined into one transaction."""
        batch: list[_Item] = []
        written: set[str] = set()
        read: set[str] = set()
        n_ops = n_cmp = 0
        self._queue = [item for item in self._queue if not item.done.done()]  # cancelled
        for item in self._queue:
            if batch and (
                n_ops + len(item.ops) > self.max_ops
                or n_cmp + len(item.compares) > self.max_ops
                or item.written & (written | read)
                or item.read & written
            ):
                break
            batch.append(item)
            written |= item.written
            read |= item.read
            n_ops += len(item.ops)
            n_cmp += len(item.compares)
        del self._queue[: len(batch)]
        return batch

    async def _drain(self) -> None:
        while self._queue:
            batch = self._take()
            try:
                await self._send(batch)
            except Exception as exc:  # a store error: each caller of the batch sees it
                for item in batch:
                    if not item.done.done():
                        item.done.set_exception(exc)
            except BaseException:  # cancelled (the agent stops or fences): so are they all
                for item in [*batch, *self._queue]:
                    item.done.cancel()
                self._queue.clear()
                raise

    async def _send(self, batch: list[_Item]) -> None:
        if len(batch) == 1:
            item = batch[0]
            self.sent += 1
            _resolve(item, await self.store.txn(item.compares, item.ops))
            return
        compares = [c for item in batch for c in item.compares]
        ops = [op for item in batch for op in item.ops]
        self.sent += 1
        res = await self.store.txn(compares, ops)
        if res.succeeded:
            self.joined += len(batch)
            for item in batch:
                _resolve(item, TxnResult(True, res.revision, []))
            return
        for item in batch:  # one of them does not hold: each alone, for its own answer
            self.sent += 1
            _resolve(item, await self.store.txn(item.compares, item.ops))


def _resolve(item: _Item, res: TxnResult) -> None:
    if not item.done.done():  # its caller may have been cancelled meanwhile
        item.done.set_result(res)
