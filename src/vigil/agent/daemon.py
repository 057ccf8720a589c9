"""``vigild --node NAME --config DIR``: the agent process of one node."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import click

from vigil.agent.node import Agent
from vigil.cli.params import SafePath
from vigil.config import check_name, load_cluster
from vigil.errors import ConfigError, UsageError, one_line
from vigil.store import open_store

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(node)s] %(message)s"


class _NodeFilter(logging.Filter):
    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node
        return True


def setup_logging(node: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_NodeFilter(node))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # one line per request is noise


async def run_agent(
    config_dir: Path, node: str, state_dir: Path, cgroup_root: Path | None = None
) -> int:
    cluster = load_cluster(config_dir)
    store = open_store(cluster.store)
    # Renewals must reach a live member well within the fencing bound: a member that
    # died without closing its connections (host lost, partition) is given up on
    # after one renewal interval and the next member is tried. The two clients ask the
    # same member first: the renewals, every node_timeout / 6, find a dead member
    # first, and the agent's watch and requests leave it at once (store/etcd.py).
    lease_store = open_store(
        cluster.store, timeout=max(0.25, cluster.node_timeout / 6), share_with=store
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent = Agent(
        store,
        cluster,
        node,
        state_dir=state_dir,
        config_dir=str(config_dir),
        lease_store=lease_store,
        cgroup_root=cgroup_root,
    )
    try:
        await agent.run(stop)
    finally:
        await store.close()
        await lease_store.close()
    return 3 if agent.left_cluster else 0


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def prepare_state_dir(path: Path) -> Path:
    """Create the agent's state directory (and its ``log/``) and check that it can
    write there; a ConfigError naming the directory if not."""
    where = f"state_dir {one_line(str(path))}"
    try:
        (path / "log").mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except ValueError:
        raise ConfigError(where, "NUL is not allowed in a path") from None
    except OSError as exc:
        raise ConfigError(where, f"cannot create or write: {exc.strerror}") from None
    return path


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--node", "-n", default=None, help="This node's name (default: the host name).")
@click.option(
    "--config",
    "-c",
    "config_dir",
    envvar="VIGIL_CONFIG",
    default="/etc/vigil",
    show_default=True,
    type=SafePath(file_okay=False, path_type=Path),
    help="Directory holding cluster.toml.",
)
@click.option(
    "--state-dir",
    type=SafePath(file_okay=False, path_type=Path),
    default=None,
    help="Local state and logs (default: cluster state_dir/NODE).",
)
@click.option(
    "--cgroup-root",
    envvar="VIGIL_CGROUP_ROOT",
    type=SafePath(file_okay=False, path_type=Path),
    default=None,
    help="cgroup v2 directory under which CLUSTER/NODE/PACKAGE cgroups are made "
    "(default: the cgroup2 mount's vigil/).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
)
def command(
    node: str | None,
    config_dir: Path,
    state_dir: Path | None,
    cgroup_root: Path | None,
    log_level: str,
) -> int:
    """Run the vigil agent of one node."""
    node = node or socket.gethostname().split(".")[0]
    try:
        check_name(node)
    except ValueError as exc:
        raise UsageError(f"--node: {exc}") from None
    config_dir = config_dir.resolve()
    cluster = load_cluster(config_dir)
    state = prepare_state_dir(state_dir or Path(cluster.state_dir) / node)
    setup_logging(node, log_level)
    try:
        return asyncio.run(run_agent(config_dir, node, state, cgroup_root))
    except KeyboardInterrupt:
        return 0


def run(argv: list[str] | None = None, prog_name: str = "vigild") -> int:
    """``vigild ARGS`` inside the agent's error boundary: a bad option or setting, or
    anything unexpected, ends as one line ``vigild: error: ...`` and a non-zero exit."""
    from vigil.cli.main import run_guarded

    def go() -> int:
        try:
            rc = command.main(args=argv, prog_name=prog_name, standalone_mode=False)
        except click.ClickException as exc:
            raise UsageError(f"{exc.format_message()} (see {prog_name} --help)") from None
        return rc if isinstance(rc, int) else 0

    return run_guarded("vigild", go)


def main() -> None:
    sys.exit(run())
