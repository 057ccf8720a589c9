"""``vigil events [--follow] [--json]``: every state change with time, node, package, from, to, reason.

Events are shown in the order the store recorded them (their revision), not by their
times: each time is the writing node's wall clock, and two nodes' clocks may differ.
"""

from __future__ import annotations

import json
import sys

import click

from vigil.agent.events import in_store_order
from vigil.cli.context import CliContext
from vigil.cli.params import NAME
from vigil.cli.render import clock, console, styled
from vigil.errors import Compacted
from vigil.keys import Keys
from vigil.model import Event
from vigil.snapshot import decode_all
from vigil.store import EventType, KeyValue, Store


def _show(ev: Event, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(ev.model_dump(), sort_keys=False) + "\n")
        sys.stdout.flush()
        return
    console.print(
        f"{clock(ev.time)}  {ev.node or '-':<10} {ev.package or '-':<14} "
        f"{ev.from_state or '-'} -> {styled(ev.to_state)}  {ev.reason}"
    )


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events.")
@click.option("-p", "--package", "pkg", type=NAME, default=None, help="Only this package's events.")
@click.option("-n", "--last", "last", default=50, show_default=True, type=click.IntRange(min=0))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def events(obj: CliContext, follow: bool, pkg: str | None, last: int, as_json: bool) -> None:
    """Show package state changes, oldest first."""

    async def go(store: Store, keys: Keys) -> None:
        kvs, rev = await store.range(keys.events)
        kvs = in_store_order(kvs)
        shown = [e for _, e in decode_all(Event, kvs) if pkg is None or e.package == pkg]
        for ev in shown[-last:] if last else []:
            _show(ev, as_json)
        while follow:
            try:
                async for w in store.watch(keys.events, rev):
                    rev = w.revision
                    if w.type is EventType.PUT:
                        kv = KeyValue(w.key, w.value, w.create_revision, w.revision, w.version)
                        for _, ev in decode_all(Event, [kv]):
                            if pkg is None or ev.package == pkg:
                                _show(ev, as_json)
            except Compacted:
                _, rev = await store.range(keys.events + "\x00")

    obj.run(go)
