"""``vigil cmdsync init|save|cancel|run|list``: resumable scripts (CONCEPTS §7).

A script registers itself (``init``), records how far it got (``save -M N``) and
removes its entry on every exit path (``cancel``, in a ``trap``). If its node goes
down meanwhile, another node runs it again with ``VIGIL_CMDSYNC_DESCRIPTOR`` and
``VIGIL_CMDSYNC_MARKER`` set. ``run`` wraps a script that simply starts over.

With failover off or a single node, ``init``/``save``/``cancel`` print an error and
exit 6 (the script may ignore it and go on); ``run`` says so and runs the script
unprotected.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import click
from rich.markup import escape

from vigil import cmdsync as ops
from vigil.cli.context import CliContext
from vigil.cli.render import console, print_json, table
from vigil.errors import CmdsyncUnavailable, NotFound, UsageError
from vigil.keys import Keys
from vigil.model import CmdsyncEntry
from vigil.snapshot import decode, read_snapshot
from vigil.store import Store

DESCRIPTOR_ENV = "VIGIL_CMDSYNC_DESCRIPTOR"
_SCRIPT_ARGS: dict[str, Any] = {"ignore_unknown_options": True, "allow_interspersed_args": False}


@click.group()
def cmdsync() -> None:
    """Resumable scripts: rerun on another node when their node goes down."""


def script_path(script: str) -> str:
    """The absolute path of ``script`` (as given, or found on PATH); it must exist."""
    path = os.path.abspath(script) if "/" in script else shutil.which(script)
    if path is None or not os.path.isfile(path):
        path = path or os.path.abspath(script)
        if not os.path.isfile(path):
            raise UsageError(f"cmdsync: script {script}: no such file")
    return path


def command_line(e: CmdsyncEntry) -> str:
    return shlex.join([e.script, *e.params])


async def _register(
    store: Store, keys: Keys, node: str, path: str, params: tuple[str, ...], pid: int, mode: str
) -> str:
    snap = await read_snapshot(store, keys)
    ops.require_available(snap, node)
    reuse = None
    given = os.environ.get(DESCRIPTOR_ENV)
    if given:  # a rerun: keep the entry (and its marker) if it is this very script's
        kv = await store.get(keys.cmdsync(given))
        if kv is not None:
            old = decode(CmdsyncEntry, kv)
            if (old.script, old.params, old.mode) == (path, params, mode):
                reuse = given
    return await ops.register(
        store, keys, node=node, script=path, params=params, pid=pid, mode=mode, descriptor=reuse
    )


@cmdsync.command("init", context_settings=_SCRIPT_ARGS)
@click.argument("script")
@click.argument("params", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def init(obj: CliContext, script: str, params: tuple[str, ...]) -> None:
    """Register SCRIPT [PARAMS...] (usually "$0" "$@") and print its descriptor.

    Run again by a rerun of the same script (VIGIL_CMDSYNC_DESCRIPTOR set), it
    prints the same descriptor and keeps the saved marker."""
    path = script_path(script)
    node = obj.node
    # The caller is the script itself (`D=$(vigil cmdsync init "$0" "$@")`).
    pid = os.getppid()

    async def go(store: Store, keys: Keys) -> str:
        return await _register(store, keys, node, path, params, pid, "init")

    click.echo(obj.run(go))


@cmdsync.command()
@click.option("-M", "marker", required=True, metavar="N", help="The marker: a positive integer.")
@click.argument("descriptor")
@click.pass_obj
def save(obj: CliContext, marker: str, descriptor: str) -> None:
    """Record marker N: a rerun resumes from there (VIGIL_CMDSYNC_MARKER=N)."""
    m = ops.check_marker(marker)
    node = obj.node

    async def go(store: Store, keys: Keys) -> None:
        snap = await read_snapshot(store, keys)
        ops.require_available(snap, node)
        await ops.save(store, keys, descriptor, m, node)

    obj.run(go)


@cmdsync.command()
@click.argument("descriptor")
@click.pass_obj
def cancel(obj: CliContext, descriptor: str) -> None:
    """Remove DESCRIPTOR: its script is never rerun. Call it on every exit path."""

    async def go(store: Store, keys: Keys) -> None:
        snap = await read_snapshot(store, keys)
        why = ops.unavailable(snap.cluster, sorted(snap.nodes))
        removed = await ops.cancel(store, keys, descriptor)
        if why is not None:
            done = "; its entry was removed" if removed else ""
            raise CmdsyncUnavailable(f"cmdsync: {why}{done}")
        if not removed:
            raise NotFound(f"cmdsync: no such descriptor {descriptor!r} (see vigil cmdsync list)")

    obj.run(go)


@cmdsync.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def list_cmd(obj: CliContext, as_json: bool) -> None:
    """The registered scripts: DESCRIPTOR NODE MARKER COMMAND."""

    async def go(store: Store, keys: Keys) -> list[CmdsyncEntry]:
        return [s.entry for s in await ops.list_entries(store, keys)]

    entries = obj.run(go)
    if as_json:
        print_json([e.model_dump(mode="json") for e in entries])
        return
    rows = [[escape(e.descriptor), escape(e.node), str(e.marker), escape(command_line(e))]
            for e in entries]  # fmt: skip
    console.print(table(None, ["DESCRIPTOR", "NODE", "MARKER", "COMMAND"], rows))


@contextlib.contextmanager
def _forward_signals(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """SIGTERM / SIGHUP to ``vigil cmdsync run`` go to the script (Ctrl-C reaches it
    anyway, through the terminal's process group)."""
    sigs = (signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, lambda n, _f: proc.send_signal(n)) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@cmdsync.command("run", context_settings=_SCRIPT_ARGS)
@click.argument("script")
@click.argument("params", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def run(obj: CliContext, script: str, params: tuple[str, ...]) -> int:
    """Run SCRIPT [PARAMS...]; if its node goes down, it is rerun from the start
    elsewhere. The entry is removed when it ends; exits with the script's status."""
    path = script_path(script)
    node = obj.node
    descriptor: str | None = None

    async def register(store: Store, keys: Keys) -> str:
        return await _register(store, keys, node, path, params, os.getpid(), "run")

    try:
        descriptor = obj.run(register)
    except CmdsyncUnavailable as exc:
        click.echo(f"vigil: error: {exc}; running {script} anyway", err=True)
    env = dict(os.environ, VIGIL_NODE=node)
    if descriptor is not None:
        env[DESCRIPTOR_ENV] = descriptor
    try:
        proc = subprocess.Popen([path, *params], env=env)
        with _forward_signals(proc):
            rc = proc.wait()
    except OSError as exc:
        click.echo(f"vigil: error: cmdsync run: cannot run {path}: {exc.strerror}", err=True)
        rc = 126
    finally:
        if descriptor is not None:
            obj.run(lambda store, keys: ops.remove_own(store, keys, descriptor, node))
    return 128 - rc if rc < 0 else rc
