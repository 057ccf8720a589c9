"""``vigil package start|halt|restart|enable|disable|maintenance|clear|env PKG``.

Commands write the operator's intent into the package's admin record; the node
agents carry it out. ``--wait`` blocks until it is done, bounded by ``--timeout``.

- ``start``: global switching on, node switching back on (for ``-n NODE`` only, or
  every node), a failed / halt_failed package is reset; the cluster starts it.
- ``halt``: halts it (reason ``user_halt``) and turns global switching off, so the
  cluster does not start it again by itself.
- ``enable`` / ``disable``: global switching on / off; with ``-n NODE``, node
  switching for that node. ``disable`` does not halt a running package.
- ``maintenance PKG [--off]``: leave the package alone (no monitoring, no restart,
  no failover) / resume.
- ``restart``: halt and start it again on its node (a restart in place) with the
  applied definition, start reason ``restart``.
- ``clear``: an operator vouches that a failed / halt_failed package left nothing
  running; it becomes halted and may start again.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Callable
from typing import Any

import click

from vigil.cli.context import CliContext
from vigil.cli.ops import (
    POLL,
    Change,
    change_admin,
    newer,
    refuse_own_package,
    require_node,
    wait_for,
)
from vigil.cli.params import NAME, SECONDS
from vigil.cli.render import console, print_json, table
from vigil.errors import Timeout, UsageError, VigilError
from vigil.keys import Keys
from vigil.model import AdminRecord, PackageState
from vigil.snapshot import Snapshot, read_snapshot
from vigil.store import Store
from vigil.view import package_state
from vigil.waits import waiting

S = PackageState
FAILED = {S.FAILED, S.HALT_FAILED}
# Not starting, halting or waiting to: what `disable --wait` waits for.
STABLE = {S.HALTED, S.RUNNING, S.FAILED, S.HALT_FAILED, S.MAINTENANCE, S.DETACHED}


def _wait_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--timeout", default=60.0, show_default=True, type=SECONDS,
                     help="Seconds --wait may take.")(f)  # fmt: skip
    return click.option("--wait", "-w", is_flag=True, help="Block until it is done.")(f)


@click.group()
def package() -> None:
    """Start, halt and switch packages."""


def _act(
    obj: CliContext,
    pkg: str,
    fn: Callable[[AdminRecord, Snapshot], Change],
    verb: str,
    wait: bool,
    timeout: float,
    want: set[PackageState],
    fail: set[PackageState],
    check: Callable[[Snapshot], None] | None = None,
) -> None:
    refuse_own_package(pkg)

    async def go(store: Store, keys: Keys) -> PackageState | None:
        def fn_checked(admin: AdminRecord, snap: Snapshot) -> Change:
            if check:
                check(snap)
            return fn(admin, snap)

        since = await change_admin(store, keys, pkg, fn_checked)
        if not wait:
            return None
        state, _, _ = package_state(await read_snapshot(store, keys), pkg)
        if state in want:
            return state  # nothing to wait for: no wait edge, no loop
        async with waiting(store, keys, pkg, obj.node):
            return await wait_for(store, keys, pkg, want, fail, timeout, since)

    state = obj.run(go)
    if state is None:
        click.echo(f"package {pkg}: {verb} requested")
    else:
        click.echo(f"package {pkg}: {verb} done ({state.value})")


@package.command()
@click.argument("pkg", type=NAME)
@click.option("-n", "--node", "node", type=NAME, default=None, help="Start it on this node.")
@_wait_options
@click.pass_obj
def start(obj: CliContext, pkg: str, node: str | None, wait: bool, timeout: float) -> None:
    """Start PKG (turns global switching on)."""

    def fn(a: AdminRecord, snap: Snapshot) -> Change:
        disabled = tuple(n for n in a.disabled_nodes if node is not None and n != node)
        return Change(
            a.model_copy(
                update={
                    "auto_run": True,
                    "halt_requested": False,
                    "disabled_nodes": disabled,
                    "failed_nodes": {n: t for n, t in a.failed_nodes.items() if n in disabled},
                    "clear_generation": a.clear_generation + 1,
                    "start_node": node,
                }
            ),
            reset_status=True,
        )

    def check(snap: Snapshot) -> None:
        if node is not None:
            require_node(snap, node)

    _act(obj, pkg, fn, "start", wait, timeout, {S.RUNNING}, FAILED, check)


@package.command()
@click.argument("pkg", type=NAME)
@click.option("-n", "--node", "node", type=NAME, required=True, help="The node to move it to.")
@_wait_options
@click.pass_obj
def move(obj: CliContext, pkg: str, node: str, wait: bool, timeout: float) -> None:
    """Move PKG to NODE: halted where it runs (user_halt), started on NODE."""
    refuse_own_package(pkg)

    def fn(a: AdminRecord, snap: Snapshot) -> Change:
        require_node(snap, node)
        if node not in snap.nodes:
            raise UsageError(f"node {node} is down; cannot move {pkg} there")
        if node in a.disabled_nodes:
            raise UsageError(
                f"node switching for {pkg} is off on {node}; "
                f"run: vigil package enable {pkg} -n {node}"
            )
        return Change(
            a.model_copy(update={"auto_run": True, "halt_requested": False, "start_node": node})
        )

    async def wait_moved(store: Store, keys: Keys, since: int) -> str:
        deadline = time.monotonic() + timeout
        while True:
            snap = await read_snapshot(store, keys)
            state, where, message = package_state(snap, pkg)
            if state is S.RUNNING and where == node:
                return node
            if state in FAILED and newer(snap, keys, pkg, since):
                raise VigilError(f"package {pkg} is {state.value}: {message}")
            if time.monotonic() > deadline:
                raise Timeout(
                    f"package {pkg} is not running on {node} after {timeout:g}s "
                    f"(now {state.value} on {where or '-'}: {message})"
                )
            await asyncio.sleep(POLL)

    async def go(store: Store, keys: Keys) -> str | None:
        since = await change_admin(store, keys, pkg, fn)
        if not wait:
            return None
        async with waiting(store, keys, pkg, obj.node):
            return await wait_moved(store, keys, since)

    done = obj.run(go)
    click.echo(f"package {pkg}: {'moved to' if done else 'move requested to'} {node}")


@package.command()
@click.argument("pkg", type=NAME)
@_wait_options
@click.pass_obj
def halt(obj: CliContext, pkg: str, wait: bool, timeout: float) -> None:
    """Halt PKG (turns global switching off)."""

    def fn(a: AdminRecord, snap: Snapshot) -> Change:
        return Change(
            a.model_copy(update={"auto_run": False, "halt_requested": True, "start_node": None})
        )

    _act(obj, pkg, fn, "halt", wait, timeout, {S.HALTED, S.FAILED}, {S.HALT_FAILED})


@package.command()
@click.argument("pkg", type=NAME)
@click.option(
    "-n", "--node", "node", type=NAME, default=None, help="Node switching for this node only."
)
@_wait_options
@click.pass_obj
def enable(obj: CliContext, pkg: str, node: str | None, wait: bool, timeout: float) -> None:
    """Turn switching on: global, or for one node with -n."""

    def fn(a: AdminRecord, snap: Snapshot) -> Change:
        if node is not None:
            require_node(snap, node)
            return Change(a.switching_on(node))
        return Change(a.model_copy(update={"auto_run": True, "halt_requested": False}))

    _act(obj, pkg, fn, "enable", wait, timeout, {S.RUNNING}, FAILED)


@package.command()
@click.argument("pkg", type=NAME)
@click.option(
    "-n", "--node", "node", type=NAME, default=None, help="Node switching for this node only."
)
@_wait_options
@click.pass_obj
def disable(obj: CliContext, pkg: str, node: str | None, wait: bool, timeout: float) -> None:
    """Turn switching off (a running package keeps running).

    With --wait, block until PKG is not starting or halting (running, halted, ...)."""

    def fn(a: AdminRecord, snap: Snapshot) -> Change:
        if node is not None:
            require_node(snap, node)
            # an operator's choice: it does not expire (failure_timeout) like a failure's
            failed = {n: t for n, t in a.failed_nodes.items() if n != node}
            disabled = tuple(sorted({*a.disabled_nodes, node}))
            return Change(a.model_copy(update={"disabled_nodes": disabled, "failed_nodes": failed}))
        return Change(a.model_copy(update={"auto_run": False}))

    _act(obj, pkg, fn, "disable", wait, timeout, STABLE, set())


@package.command()
@click.argument("pkg", type=NAME)
@click.option("--off", is_flag=True, help="Leave maintenance.")
@_wait_options
@click.pass_obj
def maintenance(obj: CliContext, pkg: str, off: bool, wait: bool, timeout: float) -> None:
    """Put PKG in maintenance (no monitoring, restart or failover), or --off."""

    def fn(a: AdminRecord, snap: Snapshot) -> Change:
        return Change(a.model_copy(update={"maintenance": not off}))

    want = {S.RUNNING, S.HALTED, S.FAILED} if off else {S.MAINTENANCE, S.HALTED, S.FAILED}
    verb = "maintenance off" if off else "maintenance"
    _act(obj, pkg, fn, verb, wait, timeout, want, {S.HALT_FAILED} if off else set())


@package.command()
@click.argument("pkg", type=NAME)
@_wait_options
@click.pass_obj
def clear(obj: CliContext, pkg: str, wait: bool, timeout: float) -> None:
    """Reset a failed or halt_failed PKG to halted."""

    def fn(a: AdminRecord, snap: Snapshot) -> Change:
        return Change(
            a.model_copy(update={"clear_generation": a.clear_generation + 1}), reset_status=True
        )

    want = {S.HALTED, S.RUNNING, S.STARTING}
    _act(obj, pkg, fn, "clear", wait, timeout, want, set())


@package.command()
@click.argument("pkg")
@_wait_options
@click.pass_obj
def restart(obj: CliContext, pkg: str, wait: bool, timeout: float) -> None:
    """Restart PKG in place: halt and start it on its node, with the applied definition.

    Its stop entry points get VIGIL_HALT_REASON=user_halt, its start VIGIL_START_REASON=
    restart; dependents keep running (as for a monitor's restart). Refused unless it runs."""
    refuse_own_package(pkg)
    wanted = 0

    def fn(a: AdminRecord, snap: Snapshot) -> Change:
        nonlocal wanted
        state, node, _ = package_state(snap, pkg)
        if state is not S.RUNNING:
            where = f" on {node}" if node else ""
            raise UsageError(f"package {pkg} is {state.value}{where}, not running: "
                             "nothing to restart (vigil package start starts it)")  # fmt: skip
        wanted = a.restart_generation + 1
        return Change(a.model_copy(update={"restart_generation": wanted}))

    async def wait_restarted(store: Store, keys: Keys, since: int) -> PackageState:
        deadline = time.monotonic() + timeout
        while True:
            snap = await read_snapshot(store, keys)
            state, where, message = package_state(snap, pkg)
            done = snap.status_of(pkg).restart_generation >= wanted
            if state is S.RUNNING and done:
                return state
            if state in FAILED | {S.HALTED} and newer(snap, keys, pkg, since):
                raise VigilError(f"package {pkg} is {state.value}: {message}")
            if time.monotonic() > deadline:
                raise Timeout(f"package {pkg} was not restarted within {timeout:g}s "
                              f"(now {state.value} on {where or '-'}: {message})")  # fmt: skip
            await asyncio.sleep(POLL)

    async def go(store: Store, keys: Keys) -> PackageState | None:
        since = await change_admin(store, keys, pkg, fn)
        if not wait:
            return None
        async with waiting(store, keys, pkg, obj.node):
            return await wait_restarted(store, keys, since)

    state = obj.run(go)
    click.echo(f"package {pkg}: restart {'done (running)' if state else 'requested'}")


@package.command("env")
@click.argument("pkg", type=NAME)
@click.option("--shell", is_flag=True, help="Print `export` lines for a script to source.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def env_cmd(obj: CliContext, pkg: str, shell: bool, as_json: bool) -> None:
    """The environment PKG's scripts and services get."""

    async def go(store: Store, keys: Keys) -> dict[str, str]:
        snap = await read_snapshot(store, keys)
        from vigil.cli.ops import require_package

        require_package(snap, pkg)
        spec = snap.packages[pkg]
        st = snap.status_of(pkg)
        _, node, _ = package_state(snap, pkg)
        env = {
            "VIGIL_CLUSTER": keys.cluster,
            "VIGIL_PACKAGE": pkg,
            "VIGIL_NODE": node or obj.node,
        }
        if st.start_reason:
            env["VIGIL_START_REASON"] = st.start_reason.value
        if st.previous_node:
            env["VIGIL_PREVIOUS_NODE"] = st.previous_node
        if st.halt_reason:
            env["VIGIL_HALT_REASON"] = st.halt_reason.value
        env.update(spec.env)
        return env

    env = obj.run(go)
    if as_json:
        print_json(env)
    elif shell:
        for k, v in env.items():
            click.echo(f"export {k}={shlex.quote(v)}")
    else:
        console.print(table(None, ["VARIABLE", "VALUE"], [[k, v] for k, v in env.items()]))
