"""``vigil node halt NODE [--failover|--detach]``, ``vigil node start NODE`` and
``vigil node remove NODE``.

- ``halt`` without a flag refuses while packages run on NODE (as Serviceguard's
  ``cmhaltnode`` without ``-f``): say what should happen to them.
- ``--failover``: NODE's packages are halted (reason ``user_halt``) and the cluster
  starts them on other nodes; NODE takes no package until ``node start``.
- ``--detach``: NODE's packages keep running but are no longer watched (no
  monitoring, no restart, no failover): state ``detached``; ``node start``
  watches them again.
- ``remove``: forget a node that joined once and is down (refused while it is up).
"""

from __future__ import annotations

import os
import time

import click

from vigil.cli.context import CliContext
from vigil.cli.ops import POLL, require_node
from vigil.cli.params import NAME, SECONDS
from vigil.errors import Conflict, NotFound, Timeout, UsageError
from vigil.flags import delete_ops, nofailover
from vigil.keys import Keys
from vigil.model import NodeAdmin
from vigil.snapshot import encode, read_snapshot
from vigil.store import Compare, Delete, Op, Put, Store


@click.group()
def node() -> None:
    """Take nodes out of the cluster and back."""


async def _set_node_admin(store: Store, keys: Keys, name: str, record: NodeAdmin | None) -> None:
    key = keys.node_admin(name)
    for _ in range(20):
        snap = await read_snapshot(store, keys)
        require_node(snap, name)
        ops: list[Op] = [Put(key, encode(record))] if record else [Delete(key)]
        res = await store.txn([Compare.mod_revision(key, snap.raw_revisions.get(key, 0))], ops)
        if res.succeeded:
            return
    raise Conflict(f"node {name}: the store kept changing; try again")


async def _wait_node(store: Store, keys: Keys, name: str, timeout: float, halted: bool) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        snap = await read_snapshot(store, keys)
        running = sorted(p for p, n in snap.owners.items() if n == name)
        states = {p: snap.status_of(p).state.value for p in running}
        if halted and all(s == "detached" for s in states.values()):
            return
        if not halted and not any(s == "detached" for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise Timeout(f"node {name}: still running {', '.join(running)} after {timeout:g}s")
        await asyncio.sleep(POLL)


@node.command()
@click.argument("name", type=NAME)
@click.option("--failover", is_flag=True, help="Move its packages elsewhere.")
@click.option("--detach", is_flag=True, help="Leave its packages running, unwatched.")
@click.option("--wait", "-w", is_flag=True, help="Block until its packages are halted or detached.")
@click.option("--timeout", default=300.0, show_default=True, type=SECONDS)
@click.pass_obj
def halt(
    obj: CliContext, name: str, failover: bool, detach: bool, wait: bool, timeout: float
) -> None:
    """Take NAME out of the cluster (it keeps its agent and lease)."""
    if failover and detach:
        raise UsageError("--failover and --detach exclude each other: give one")
    mode = "failover" if failover else "detach" if detach else None

    async def go(store: Store, keys: Keys) -> list[str]:
        snap = await read_snapshot(store, keys)
        require_node(snap, name)
        running = sorted(p for p, n in snap.owners.items() if n == name)
        own = os.environ.get("VIGIL_PACKAGE")
        if own in running and mode != "detach":
            raise UsageError(
                f"node {name} runs package {own}, whose script runs this command: halting "
                "the node would halt its own package (command loop)"
            )
        if running and mode is None:
            raise UsageError(
                f"node {name} runs {', '.join(running)}: use --failover to move them to "
                "other nodes or --detach to leave them running unwatched"
            )
        await _set_node_admin(store, keys, name, NodeAdmin(halted=True, mode=mode or "failover"))
        if wait:
            await _wait_node(store, keys, name, timeout, halted=True)
        return running

    running = obj.run(go)
    what = f"; its packages {'are detached' if mode == 'detach' else 'move'}: " if running else ""
    click.echo(f"node {name}: halted{what}{', '.join(running)}")


@node.command()
@click.argument("name", type=NAME)
@click.pass_obj
def remove(obj: CliContext, name: str) -> None:
    """Forget NAME, a node that is down: it is no longer shown (nor its flags kept)."""

    async def go(store: Store, keys: Keys) -> None:
        snap = await read_snapshot(store, keys)
        if name in snap.nodes:
            raise UsageError(f"node {name} is up: stop its agent (vigild) before removing it")
        if snap.cluster and snap.cluster.nodes and name in snap.cluster.nodes:
            raise UsageError(
                f"node {name} is listed in cluster.toml's nodes: remove it there and "
                "run vigil apply"
            )
        if name not in snap.members:
            known = ", ".join(sorted(snap.members)) or "none"
            raise NotFound(f"unknown node {name!r} (nodes that joined: {known})")
        # the node's own flags, and the !nofailover!NAME flags that only its return
        # would have removed
        flags = [(name, f) for f in snap.flags.get(name, ())]
        flags += [(n, f) for n, fs in snap.flags.items() for f in fs if f == nofailover(name)]
        ops: list[Op] = [Delete(keys.member(name)), Delete(keys.node_admin(name))]
        ops += delete_ops(keys, flags)
        res = await store.txn([Compare.absent(keys.node(name))], ops)
        if not res.succeeded:
            raise UsageError(f"node {name} joined meanwhile: stop its agent before removing it")

    obj.run(go)
    click.echo(f"node {name}: removed")


@node.command()
@click.argument("name")
@click.pass_obj
def start(obj: CliContext, name: str) -> None:
    """Let NAME take packages again (and watch its detached packages again)."""

    async def go(store: Store, keys: Keys) -> None:
        await _set_node_admin(store, keys, name, None)

    obj.run(go)
    click.echo(f"node {name}: started")
