from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from vigil.testing.cluster import LocalCluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path, ["node1"])
    try:
        yield c
    finally:
        c.close()
        for line in c.agent_log("node1").splitlines():
            assert "Traceback" not in line, c.agent_log("node1")


@pytest.fixture
def n1(tmp_path: Path) -> Iterator[LocalCluster]:
    """One node, ``n1``, node_timeout 2 s; its agent must never log a traceback."""
    c = LocalCluster(tmp_path, ["n1"], node_timeout="2s")
    try:
        yield c
    finally:
        c.close()
        assert "Traceback" not in c.agent_log("n1"), c.agent_log("n1")


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path, ["node1", "node2"])
    try:
        yield c
    finally:
        c.close()


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
