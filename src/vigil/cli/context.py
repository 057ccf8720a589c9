"""What every command needs: where the cluster is, the store, and a way to run async code."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from vigil.config import ClusterSpec, check_name, load_cluster
from vigil.errors import UsageError
from vigil.keys import Keys
from vigil.store import Store, open_store

T = TypeVar("T")


@dataclass
class CliContext:
    config_dir: Path
    node_option: str | None
    json: bool = False

    @property
    def node(self) -> str:
        """This command's node: --node, else VIGIL_NODE, else the host name."""
        if self.node_option:
            return self.node_option
        source, name = "VIGIL_NODE", os.environ.get("VIGIL_NODE")
        if not name:
            source, name = "the host name", socket.gethostname().split(".")[0]
        try:
            return check_name(name)
        except ValueError as exc:
            raise UsageError(f"this command's node ({source}; or give --node): {exc}") from None

    def cluster(self) -> ClusterSpec:
        return load_cluster(self.config_dir)

    def run(self, fn: Callable[[Store, Keys], Awaitable[T]]) -> T:
        """Open the store named in cluster.toml, run ``fn``, close the store."""
        cluster = self.cluster()

        async def go() -> T:
            store = open_store(cluster.store)
            try:
                return await fn(store, Keys(cluster.name))
            finally:
                await store.close()

        return asyncio.run(go())
