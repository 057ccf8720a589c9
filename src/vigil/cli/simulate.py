"""``vigil simulate``: what would happen if a node failed, a package failed, a node
returned — planned from the live cluster or a saved snapshot, changing nothing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from vigil.cli.context import CliContext
from vigil.cli.params import NAME, SafePath
from vigil.cli.render import console, print_json, styled, table
from vigil.errors import NotFound, UsageError, one_line
from vigil.keys import Keys
from vigil.plan.whatif import converge, node_fails, node_returns, package_fails
from vigil.snapshot import Snapshot, read_snapshot
from vigil.store import Store
from vigil.view import cluster_view


def _known_nodes(snap: Snapshot) -> set[str]:
    known = set(snap.nodes) | {s.node for s in snap.status.values() if s.node}
    if snap.cluster and snap.cluster.nodes:
        known |= set(snap.cluster.nodes)
    return known


@click.command()
@click.option(
    "--node-fails", "node_fail", type=NAME, multiple=True, metavar="NODE", help="NODE is lost."
)
@click.option(
    "--package-fails",
    "pkg_fail",
    type=NAME,
    multiple=True,
    metavar="PKG",
    help="PKG fails where it runs.",
)
@click.option(
    "--node-returns", "node_back", type=NAME, multiple=True, metavar="NODE", help="NODE comes back."
)
@click.option("--from", "source", type=SafePath(exists=True, dir_okay=False, path_type=Path),
              help="Plan from a saved snapshot instead of the live cluster.")  # fmt: skip
@click.option("--save", type=SafePath(dir_okay=False, path_type=Path),
              help="Save the live snapshot to this file (for --from later).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def simulate(
    obj: CliContext,
    node_fail: tuple[str, ...],
    pkg_fail: tuple[str, ...],
    node_back: tuple[str, ...],
    source: Path | None,
    save: Path | None,
    as_json: bool,
) -> None:
    """Show the planned actions and their reasons for hypothetical events."""
    from vigil.plan.scenario import dump_scenario, load_scenario

    if source is not None:
        snap = load_scenario(source)
    else:

        async def go(store: Store, keys: Keys) -> Snapshot:
            return await read_snapshot(store, keys)

        snap = obj.run(go)
    if save is not None:
        try:
            save.write_text(dump_scenario(snap))
        except OSError as exc:
            raise UsageError(
                f"--save {one_line(str(save))}: cannot write: {exc.strerror}"
            ) from None
        click.echo(f"saved the cluster's snapshot to {save}", err=True)
    events: list[str] = []
    for n in node_fail:
        if n not in snap.nodes:
            raise UsageError(f"--node-fails {n}: node {n} is not up")
        snap = node_fails(snap, n)
        events.append(f"node {n} fails")
    for p in pkg_fail:
        if p not in snap.packages:
            raise NotFound(f"--package-fails {p}: unknown package {p!r}")
        if p not in snap.owners:
            raise UsageError(f"--package-fails {p}: package {p} is not running")
        snap = package_fails(snap, p)
        events.append(f"package {p} fails on its node")
    for n in node_back:
        if n not in _known_nodes(snap):
            raise NotFound(f"--node-returns {n}: unknown node {n!r}")
        snap = node_returns(snap, n)
        events.append(f"node {n} returns")
    sim = converge(snap, time.time())
    view = cluster_view(sim.final)
    rounds: list[list[dict[str, Any]]] = [
        [
            {
                "action": a.verb.value,
                "package": a.package,
                "node": a.node,
                "from_node": a.from_node,
                "reason": a.reason,
            }  # fmt: skip
            for a in r
        ]
        for r in sim.rounds
    ]
    if as_json:
        print_json({"events": events, "rounds": rounds, "result": view})
        return
    console.print("what if: " + ("; ".join(events) if events else "nothing changes (current plan)"))
    if not rounds:
        console.print("nothing would change")
    for i, r in enumerate(sim.rounds, 1):
        console.print(f"[bold]step {i}[/bold]")
        for a in r:
            console.print(f"  {a}")
    rows = [
        [name, styled(p["state"]), p["node"] or "-", p["message"]]
        for name, p in view["packages"].items()
    ]
    console.print()
    console.print(table("then:", ["PACKAGE", "STATE", "NODE", "WHY"], rows))
