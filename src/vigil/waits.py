"""Who waits for whom (CONCEPTS §8): command loops between package scripts.

A package script that runs a vigil command with ``--wait`` against another package
(``VIGIL_PACKAGE`` tells vigil which package's script it is) first records a wait
edge ``waits/WAITER`` → ``waits_for = TARGET``, then follows the edges from TARGET.
If they lead back to WAITER, the scripts wait for one another and none can finish:
the command fails at once with the cycle named instead of hanging until the script
timeouts fire.

Two scripts closing a cycle at the same moment both write their edge, then read
every edge. Only the waiter whose edge is the newest of the cycle (the highest mod
revision) fails: it saw every older edge, so the cycle is always found, and exactly
one script gives up while the others go on waiting (and can now finish).

An edge is removed when its command ends (``finally``, and on SIGTERM from a
script timeout). One left behind by a SIGKILLed command is ignored by the check when
its process is gone from this node, and removed by that node's agent; edges of a
node that is down are ignored, and removed by the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

from vigil.errors import CommandLoop, VigilError
from vigil.keys import Keys
from vigil.locks import pid_namespace
from vigil.model import WaitEdge
from vigil.snapshot import decode_all, encode
from vigil.store import Compare, Delete, Store
from vigil.supervise import procfs


@dataclass(frozen=True)
class StoredEdge:
    edge: WaitEdge
    revision: int


def find_cycle(edges: Mapping[str, str], waiter: str) -> list[str] | None:
    """The cycle through ``waiter`` in the wait graph ``edges`` (waiter → target), as
    ``[waiter, ..., waiter]``, or None. Each package waits for at most one. Pure."""
    path = [waiter]
    seen = {waiter}
    cur = edges.get(waiter)
    while cur is not None:
        path.append(cur)
        if cur == waiter:
            return path
        if cur in seen:
            return None  # a cycle that does not go through waiter: not ours to break
        seen.add(cur)
        cur = edges.get(cur)
    return None


def format_cycle(cycle: Sequence[str]) -> str:
    return " → ".join(cycle)


def loop_message(cycle: Sequence[str]) -> str:
    """``command loop: pkg1 → pkg2 → pkg1 (pkg1's script waits for pkg2 whose ...)``."""
    first, *rest = cycle
    chain = f"{first}'s script waits for {rest[0]}"
    for pkg in rest[1:]:
        chain += f" whose script waits for {pkg}"
    return f"command loop: {format_cycle(cycle)} ({chain}); not waiting"


def breaks_cycle(cycle: Sequence[str], revisions: Mapping[str, int], waiter: str) -> bool:
    """Whether ``waiter`` is the one to give up: its edge is the newest of the cycle."""
    newest = max(cycle[:-1], key=lambda p: (revisions.get(p, 0), p))
    return newest == waiter


def stale(edge: WaitEdge, node: str) -> bool:
    """An edge of this node (and PID namespace) whose command is gone (SIGKILLed
    before it could clean up)."""
    return edge.node == node and edge.pid_ns == pid_namespace() and not procfs.pid_alive(edge.pid)


async def read_edges(store: Store, keys: Keys) -> list[StoredEdge]:
    kvs, _ = await store.range(keys.waits)
    return [StoredEdge(edge, kv.mod_revision) for kv, edge in decode_all(WaitEdge, kvs)]


async def check(store: Store, keys: Keys, waiter: str, node: str) -> None:
    """Raise CommandLoop if ``waiter``'s edge closes a cycle that it must break.
    Edges of nodes that are down are ignored: their commands died with them."""
    up = {keys.leaf(kv.key) for kv in (await store.range(keys.nodes))[0]}
    live = [
        e for e in await read_edges(store, keys) if e.edge.node in up and not stale(e.edge, node)
    ]
    graph = {e.edge.package: e.edge.waits_for for e in live}
    cycle = find_cycle(graph, waiter)
    if cycle is None:
        return
    if breaks_cycle(cycle, {e.edge.package: e.revision for e in live}, waiter):
        raise CommandLoop(loop_message(cycle))


@contextlib.asynccontextmanager
async def waiting(
    store: Store, keys: Keys, target: str, node: str, waiter: str | None = None
) -> AsyncIterator[None]:
    """Around a ``--wait`` on ``target``: when run by a package's script (``waiter``,
    default ``VIGIL_PACKAGE``), record the edge and fail at once on a command loop
    (a loop closed later is found by the script that closes it: its edge is the
    newest). The edge is removed at the end, also when a script timeout SIGTERMs the
    command."""
    waiter = waiter if waiter is not None else os.environ.get("VIGIL_PACKAGE")
    if not waiter:
        yield
        return
    key = keys.wait(waiter)
    edge = WaitEdge(
        package=waiter, waits_for=target, node=node, pid=os.getpid(), pid_ns=pid_namespace()
    )
    value = encode(edge)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    terminated = False

    def on_term() -> None:
        nonlocal terminated
        terminated = True
        if task is not None:
            task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    try:
        await store.put(key, value)
        await check(store, keys, waiter, node)
        yield
    except asyncio.CancelledError:
        if terminated:
            raise VigilError(f"package {target}: wait interrupted by SIGTERM") from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        with contextlib.suppress(VigilError):
            await store.txn([Compare.value_is(key, value)], [Delete(key)])
