"""``vigil recover restore|remove|delete``: run owed post-hooks explicitly (lcdrecover).

Runs the ``post_KIND`` hooks on this node, then clears the pending flags ``!KIND``
on this node and ``!KIND!THIS-NODE`` wherever they are. It takes the admin lock,
or goes straight through when the calling script already holds it.
"""

from __future__ import annotations

import click

from vigil import flags
from vigil.cli.context import CliContext
from vigil.cli.params import SECONDS
from vigil.errors import ScriptError, UsageError
from vigil.hooks import KINDS, HookRun, run_phase
from vigil.keys import Keys
from vigil.locks import AdminLock
from vigil.snapshot import read_snapshot
from vigil.store import Store


@click.command()
@click.argument("kind", type=click.Choice(KINDS))
@click.option("--lock-timeout", type=SECONDS, default=60.0, show_default=True,
              help="Seconds to wait for the admin lock.")  # fmt: skip
@click.pass_obj
def recover(obj: CliContext, kind: str, lock_timeout: float) -> None:
    """Run the post_KIND hooks here and clear the pending !KIND flags of this node."""
    node = obj.node

    async def go(store: Store, keys: Keys) -> tuple[list[HookRun], list[str]]:
        async with AdminLock(store, keys, f"recover_{kind}", node, lock_timeout):
            snap = await read_snapshot(store, keys)
            if snap.cluster is None:
                raise UsageError(f"cluster {keys.cluster}: nothing applied yet")
            runs = await run_phase(
                snap.cluster, node, f"post_{kind}", config_dir=str(obj.config_dir)
            )
            cleared: list[str] = []
            targets = [(node, flags.pending(kind))] + [
                (n, flags.pending(kind, node)) for n in sorted(snap.flags)
            ]
            for n, flag in targets:
                if snap.has_flag(n, flag):
                    await flags.remove(store, keys, n, flag)
                    cleared.append(f"{flag} on {n}")
            return runs, cleared

    runs, cleared = obj.run(go)
    for r in runs:
        click.echo(("ran " if r.ok else "FAILED ") + r.detail)
    if not runs:
        click.echo(f"no post_{kind} hooks configured")
    click.echo(
        f"cleared {', '.join(cleared)}" if cleared else f"no pending !{kind} flag for {node}"
    )
    failed = [r for r in runs if not r.ok]
    if failed:
        raise ScriptError(f"{len(failed)} post_{kind} hook(s) failed: {failed[0].detail}")
