"""``vigil flag create|remove|test|list`` (LifeKeeper's flg_*).

A flag lives on a node (``-d NODE``, default this command's node) and is seen from
every node. ``test`` exits 0 if the flag is there, 1 if not. The admin lock's holder
is listed as its flag ``!action!PID!TIMESTAMP!NODE:ID`` on the holder's node.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click
from rich.markup import escape

from vigil import flags, locks
from vigil.cli.context import CliContext
from vigil.cli.ops import require_node
from vigil.cli.params import NAME
from vigil.cli.render import console, print_json, table
from vigil.errors import NotFound
from vigil.keys import Keys
from vigil.snapshot import read_snapshot
from vigil.store import Store

_dest = click.option(
    "-d", "dest", type=NAME, default=None, help="The node the flag lives on (default: this node)."
)
_flag = click.option("-f", "flag", required=True, help="The flag's name.")


@click.group("flag")
def flag() -> None:
    """Create, remove, test and list flags."""


async def _known(store: Store, keys: Keys, node: str) -> None:
    require_node(await read_snapshot(store, keys), node)


@flag.command()
@_dest
@_flag
@click.pass_obj
def create(obj: CliContext, dest: str | None, flag: str) -> None:
    """Create FLAG on a node."""
    node = dest or obj.node
    flags.check_flag(flag)

    async def go(store: Store, keys: Keys) -> bool:
        await _known(store, keys, node)
        return await flags.create(store, keys, node, flag, by_node=obj.node)

    made = obj.run(go)
    click.echo(f"flag {flag} {'created on' if made else 'already set on'} {node}")


@flag.command()
@_dest
@_flag
@click.pass_obj
def remove(obj: CliContext, dest: str | None, flag: str) -> None:
    """Remove FLAG from a node."""
    node = dest or obj.node
    flags.check_flag(flag)

    async def go(store: Store, keys: Keys) -> bool:
        return await flags.remove(store, keys, node, flag)

    if not obj.run(go):
        raise NotFound(f"no flag {flag} on node {node}")
    click.echo(f"flag {flag} removed from {node}")


@flag.command()
@_dest
@_flag
@click.pass_obj
def test(obj: CliContext, dest: str | None, flag: str) -> None:
    """Exit 0 if FLAG is set on the node, 1 if not."""
    node = dest or obj.node
    flags.check_flag(flag)

    async def go(store: Store, keys: Keys) -> bool:
        return await flags.test(store, keys, node, flag)

    sys.exit(0 if obj.run(go) else 1)


@flag.command("list")
@click.option("-d", "dest", type=NAME, default=None, help="Only the flags on this node.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def list_(obj: CliContext, dest: str | None, as_json: bool) -> None:
    """Flags on every node (or on one), the admin lock's holder among them."""

    async def go(store: Store, keys: Keys) -> dict[str, dict[str, dict[str, Any]]]:
        found = await flags.list_flags(store, keys, dest)
        out = {
            node: {name: rec.model_dump() for name, rec in sorted(named.items())}
            for node, named in sorted(found.items())
        }
        held = await locks.queue(store, keys)
        if held and (dest is None or held[0].entry.node == dest):
            e = held[0].entry
            out.setdefault(e.node, {})[e.flag] = {
                "created_at": float(e.timestamp),
                "by_node": e.node,
                "by_pid": e.pid,
            }
        return out

    view = obj.run(go)
    if as_json:
        print_json(view)
        return
    rows = [
        [
            node,
            escape(name),
            time.strftime("%F %T", time.localtime(rec["created_at"])),
            rec["by_node"] or "-",
        ]
        for node, named in view.items()
        for name, rec in named.items()
    ]
    console.print(table(None, ["NODE", "FLAG", "CREATED", "BY"], rows) if rows else "no flags")
