"""The ``vigil`` command: operators' view and levers. ``--json`` wherever it shows state."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from vigil.cli.context import CliContext
from vigil.errors import VigilError

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
    type=click.Path(file_okay=False, path_type=Path),
    help="Cluster configuration directory (cluster.toml, packages/).",
)
@click.option(
    "--node", "node", default=None, help="This command's node (default: VIGIL_NODE, host name)."
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
    from vigil.agent.daemon import main as vigild

    argv = ["--config", str(obj.config_dir), *args]
    if obj.node_option and "--node" not in args:
        argv = ["--node", obj.node_option, *argv]
    vigild.main(argv, prog_name="vigil agent")


def main(argv: list[str] | None = None) -> None:
    try:
        rc = cli.main(args=argv, prog_name="vigil", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("vigil: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        where = exc.ctx.command_path if isinstance(exc, click.UsageError) and exc.ctx else "vigil"
        click.echo(f"{where}: error: {exc.format_message()} (see {where} --help)", err=True)
        sys.exit(2)
    except VigilError as exc:
        click.echo(f"vigil: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(rc if isinstance(rc, int) else 0)
