"""``vigil status [-v] [--json]``.

Shows everything that can be read; if a store record cannot be (it is left out, see
``vigil.snapshot``), one line on stderr names it and the exit status is 4.
"""

from __future__ import annotations

from typing import Any

import click
from rich.markup import escape

from vigil.cli.context import CliContext
from vigil.cli.render import ago, console, print_json, styled, table
from vigil.errors import StoreCorrupt
from vigil.keys import Keys
from vigil.snapshot import read_snapshot
from vigil.store import Store
from vigil.view import cluster_view


@click.command()
@click.option("-v", "--verbose", is_flag=True, help="Show services, monitors and messages.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def status(obj: CliContext, verbose: bool, as_json: bool) -> None:
    """Nodes, packages, states and switching."""

    async def go(store: Store, keys: Keys) -> dict[str, Any]:
        return cluster_view(await read_snapshot(store, keys))

    view = obj.run(go)
    if as_json:
        print_json(view)
    else:
        render(view, verbose)
    problems = view["problems"]
    if problems:  # shown after everything that could be read
        more = f" (and {len(problems) - 1} more unreadable)" if len(problems) > 1 else ""
        raise StoreCorrupt(f"{problems[0]}{more}; that record was skipped")


def render(view: dict[str, Any], verbose: bool) -> None:
    console.print(f"[bold]cluster[/bold] {view['cluster'] or '(nothing applied yet)'}")
    rows = [
        [name, styled(n["state"]), str(n["pid"] or "-"), ", ".join(n["packages"]) or "-"]
        for name, n in view["nodes"].items()
    ]
    cols = ["NODE", "STATE", "PID", "PACKAGES"]
    if any(n["flags"] for n in view["nodes"].values()):
        cols.append("FLAGS")
        for row, n in zip(rows, view["nodes"].values(), strict=True):
            row.append(escape(" ".join(n["flags"])) or "-")
    weak = [name for name, n in view["nodes"].items() if n.get("containment") == "process-group"]
    if weak:
        cols.append("CONTAINMENT")
        for row, n in zip(rows, view["nodes"].values(), strict=True):
            row.append(n.get("containment") or "-")
    console.print(table(None, cols, rows) if rows else "no nodes")
    if weak:
        console.print(
            f"[yellow]note:[/yellow] {', '.join(weak)}: process groups only, no cgroups (the agent's log says why): "
            "a process that leaves its process group escapes halt and fencing"
        )
    console.print()
    prow = []
    for name, p in view["packages"].items():
        state = styled(p["state"]) + (" [yellow](degraded)[/yellow]" if p["degraded"] else "")
        if p.get("stale"):
            state += " [yellow](stale)[/yellow]"
        switching = "enabled" if p["auto_run"] else "disabled"
        if p["disabled_nodes"]:
            switching += f" (off on {','.join(p['disabled_nodes'])})"
        restarts = sum(s["restarts"] for s in p["services"].values())
        row = [name, state, p["node"] or "-", switching, p["halt_reason"] or "-", str(restarts)]
        if verbose:
            row.append(ago(p["since"]))
            row.append(p["message"])
        prow.append(row)
    cols = ["PACKAGE", "STATE", "NODE", "SWITCHING", "HALT REASON", "RESTARTS"]
    if verbose:
        cols += ["SINCE", "MESSAGE"]
    console.print(table(None, cols, prow) if prow else "no packages")
    for name, p in view["packages"].items():
        if p.get("stale"):
            console.print(
                f"{name}: stale: it runs an older definition; the applied one changed since "
                f"it started and takes effect at its next start (vigil package restart {name})"
            )
    if verbose:
        for name, p in view["packages"].items():
            srows = [
                [
                    f"{name}/{s}",
                    "service",
                    v["state"],
                    str(v["pid"] or "-"),
                    f"restarts {v['restarts']}",
                ]
                for s, v in p["services"].items()
            ]
            srows += [
                [f"{name}/{m}", "monitor", v["status"], "-", f"failures {v['failures']}"]
                for m, v in p["monitors"].items()
            ]
            if srows:
                console.print()
                console.print(table(None, ["NAME", "KIND", "STATE", "PID", "COUNT"], srows))
