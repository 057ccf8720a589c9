"""The ``vigil`` command: operators' view and levers. ``--json`` wherever it shows state."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vigil.cli import (
    cmdsync,
    config_cmds,
    demo,
    events,
    flag,
    lock,
    node,
    package,
    recover,
    simulate,
    status,
)
from vigil.cli.context import CliContext
from vigil.errors import VigilError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


cli.add_command(status.status)
cli.add_command(package.package)
cli.add_command(node.node)
cli.add_command(simulate.simulate)
cli.add_command(events.events)
cli.add_command(config_cmds.check)
cli.add_command(config_cmds.apply)
cli.add_command(demo.demo)
cli.add_command(cmdsync.cmdsync)
cli.add_command(flag.flag)
cli.add_command(lock.lock)
cli.add_command(recover.recover)


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
