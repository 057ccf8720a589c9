"""``vigil lock acquire|release|list``: the cluster-wide admin lock (getlocks/rlslocks).

``acquire ID`` waits in line (FIFO) and returns once the calling process holds the
lock; the lock belongs to that process (the script that ran ``vigil lock acquire``,
or ``--pid``), and is released by ``vigil lock release`` from it, or when it dies,
or when its node dies. vigil's own global operations (``apply``, ``recover``) take
the same lock; inside a script that holds it they go straight through.
"""

from __future__ import annotations

import os
import time
from typing import Any

import click

from vigil import locks
from vigil.cli.context import CliContext
from vigil.cli.params import SECONDS, live_pid
from vigil.cli.render import console, print_json, table
from vigil.errors import NotFound
from vigil.keys import Keys
from vigil.store import Store

_pid = click.option(
    "--pid",
    type=click.IntRange(min=1),
    default=None,
    help="The process the lock belongs to (default: the one that runs this command).",
)


@click.group("lock")
def lock() -> None:
    """The cluster-wide admin lock."""


@lock.command()
@click.argument("lock_id", metavar="ID")
@click.option(
    "--timeout",
    type=SECONDS,
    default=None,
    help="Give up after this many seconds (default: wait).",
)
@_pid
@click.pass_obj
def acquire(obj: CliContext, lock_id: str, timeout: float | None, pid: int | None) -> None:
    """Wait for the admin lock and hold it for the calling process, for action ID."""
    owner = live_pid(pid) if pid is not None else os.getppid()
    locks.check_id(lock_id)

    async def go(store: Store, keys: Keys) -> locks.Held | None:
        return await locks.acquire(store, keys, lock_id, obj.node, owner, timeout)

    held = obj.run(go)
    if held is None:
        click.echo(f"admin lock already held by process {owner} or its parent")
    else:
        click.echo(f"admin lock acquired: {held.entry.flag}")


@lock.command()
@click.argument("lock_id", metavar="[ID]", required=False)
@_pid
@click.pass_obj
def release(obj: CliContext, lock_id: str | None, pid: int | None) -> None:
    """Release the admin lock (or give up waiting) held by the calling process."""
    pids = [pid] if pid else locks.ancestors(os.getppid())

    async def go(store: Store, keys: Keys) -> list[Any]:
        return await locks.release(store, keys, obj.node, pids, lock_id)

    gone = obj.run(go)
    if not gone:
        what = f" for {lock_id}" if lock_id else ""
        raise NotFound(f"no admin lock entry{what} of process {pids[0]} on node {obj.node}")
    for e in gone:
        click.echo(f"admin lock released: {e.flag}")


@lock.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def list_(obj: CliContext, as_json: bool) -> None:
    """The holder and the waiters, in order."""

    async def go(store: Store, keys: Keys) -> list[locks.Held]:
        return await locks.queue(store, keys)

    held = obj.run(go)
    view: list[dict[str, Any]] = [
        {
            "role": "holder" if i == 0 else "waiting",
            "id": h.entry.id,
            "node": h.entry.node,
            "pid": h.entry.pid,
            "since": h.entry.timestamp,
            "flag": h.entry.flag,
        }
        for i, h in enumerate(held)
    ]
    if as_json:
        print_json(view)
        return
    rows = [
        [
            v["role"],
            v["id"],
            v["node"],
            str(v["pid"]),
            time.strftime("%F %T", time.localtime(v["since"])),
        ]
        for v in view
    ]
    console.print(
        table(None, ["ROLE", "ID", "NODE", "PID", "SINCE"], rows) if rows else "admin lock free"
    )
