"""``vigild --node NAME --config DIR``: the agent process of one node."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path

import click

from vigil.agent.node import Agent
from vigil.config import NAME_RE, load_cluster
from vigil.errors import VigilError
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


async def run_agent(config_dir: Path, node: str, state_dir: Path | None) -> int:
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
        state_dir=state_dir or Path(cluster.state_dir) / node,
        config_dir=str(config_dir),
        lease_store=lease_store,
    )
    try:
        await agent.run(stop)
    finally:
        await store.close()
        await lease_store.close()
    return 3 if agent.left_cluster else 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--node", "-n", default=None, help="This node's name (default: the host name).")
@click.option(
    "--config",
    "-c",
    "config_dir",
    envvar="VIGIL_CONFIG",
    default="/etc/vigil",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory holding cluster.toml.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Local state and logs (default: cluster state_dir/NODE).",
)
@click.option("--log-level", default="info", show_default=True)
def main(node: str | None, config_dir: Path, state_dir: Path | None, log_level: str) -> None:
    """Run the vigil agent of one node."""
    node = node or socket.gethostname().split(".")[0]
    if not NAME_RE.match(node):
        click.echo(
            f"vigild: error: --node: expected a name matching [a-z0-9][a-z0-9_.-]{{0,62}}, "
            f"got {node!r}",
            err=True,
        )
        sys.exit(2)
    setup_logging(node, log_level)
    try:
        code = asyncio.run(run_agent(config_dir.resolve(), node, state_dir))
    except VigilError as exc:
        logging.getLogger("vigil.agent").error("%s", exc)
        click.echo(f"vigild: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)
