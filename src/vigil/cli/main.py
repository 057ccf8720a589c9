"""The ``vigil`` command: operators' view and levers. ``--json`` wherever it shows state."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import click

from vigil.cli.context import CliContext
from vigil.cli.params import NAME, SafePath
from vigil.errors import BUG_HINT, INTERNAL_ERROR, VigilError, one_line

# Every command, and where it lives: a command's module (and what it imports: the
# planner, rich, the process supervisor...) is only imported when that command runs,
# so that short commands called from scripts (``vigil flag test``) start quickly.
COMMANDS = {
    "status": "vigil.cli.status:status",
    "package": "vigil.cli.package:package",
    "node": "vigil.cli.node:node",
    "simulate": "vigil.cli.simulate:simulate",
    "events": "vigil.cli.events:events",
    "check": "vigil.cli.config_cmds:check",
    "apply": "vigil.cli.config_cmds:apply",
    "demo": "vigil.cli.demo:demo",
    "cmdsync": "vigil.cli.cmdsync:cmdsync",
    "flag": "vigil.cli.flag:flag",
    "lock": "vigil.cli.lock:lock",
    "recover": "vigil.cli.recover:recover",
}


class LazyGroup(click.Group):
    """A group whose subcommands (``COMMANDS``) are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, _, attr = COMMANDS[cmd_name].partition(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command), COMMANDS[cmd_name]
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "-c",
    "config_dir",
    envvar="VIGIL_CONFIG",
    default="/etc/vigil",
    show_default=True,
    type=SafePath(file_okay=False, path_type=Path),
    help="Cluster configuration directory (cluster.toml, packages/).",
)
@click.option(
    "--node",
    "node",
    type=NAME,
    default=None,
    help="This command's node (default: VIGIL_NODE, host name).",
)
@click.pass_context
def cli(ctx: click.Context, config_dir: Path, node: str | None) -> None:
    """vigil: keep services running across machines."""
    ctx.obj = CliContext(config_dir=config_dir, node_option=node)


@cli.command("agent", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def agent(obj: CliContext, args: tuple[str, ...]) -> None:
    """Run the node agent (same as vigild)."""
    from vigil.agent.daemon import run

    argv = ["--config", str(obj.config_dir), *args]
    if obj.node_option and "--node" not in args:
        argv = ["--node", obj.node_option, *argv]
    sys.exit(run(argv, prog_name="vigil agent"))


def main(argv: list[str] | None = None) -> None:
    """The ``vigil`` command, inside its error boundary: every error ends as one line
    on stderr and an exit code (docs/operations.md, "CLI exit codes")."""
    sys.exit(run_guarded("vigil", lambda: _run(argv)))


def _run(argv: list[str] | None) -> int:
    try:
        rc = cli.main(args=argv, prog_name="vigil", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("vigil: aborted", err=True)
        return 130
    except click.ClickException as exc:
        where = exc.ctx.command_path if isinstance(exc, click.UsageError) and exc.ctx else "vigil"
        click.echo(
            one_line(f"{where}: error: {exc.format_message()} (see {where} --help)"), err=True
        )
        return 2
    return rc if isinstance(rc, int) else 0


def run_guarded(prog: str, fn: Callable[[], int]) -> int:
    """Run ``fn`` and return its exit code; every exception becomes one line on stderr:
    a VigilError with its own exit code, anything else (a bug) with ``BUG_HINT`` and
    ``INTERNAL_ERROR``. ``VIGIL_DEBUG=1`` adds the traceback of a bug."""
    try:
        return fn()
    except VigilError as exc:
        if str(exc):  # an empty message: what was wrong is printed already
            click.echo(one_line(f"{prog}: error: {exc}"), err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:
        if os.environ.get("VIGIL_DEBUG") == "1":
            traceback.print_exc()
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if len(what) > 300:
            what = what[:297] + "..."
        click.echo(one_line(f"{prog}: error: internal error: {what}; {BUG_HINT}"), err=True)
        return INTERNAL_ERROR


def _quiet_stdout() -> None:
    """stdout's reader went away: stop Python complaining when it flushes at exit."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
