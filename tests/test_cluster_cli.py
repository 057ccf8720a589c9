"""Cluster commands on a real 3-node cluster: node halt/start, package move, simulate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from vigil.testing.cluster import LocalCluster

pytestmark = pytest.mark.slow

SERVICE = '[[service]]\nname = "s"\ncommand = ["sleep", "1000"]\n'


@pytest.fixture
def three(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path, ["node1", "node2", "node3"])
    try:
        c.start_agents()
        c.wait(lambda v: all(v["nodes"][n]["state"] == "up" for n in c.nodes), what="nodes up")
        yield c
    finally:
        c.close()


def where(c: LocalCluster, pkg: str) -> str | None:
    node: str | None = c.package(pkg)["node"]
    return node


def test_move_then_node_halt_failover_and_start(three: LocalCluster) -> None:
    c = three
    c.write_package(f'name = "web"\n{SERVICE}')
    c.apply()
    p = c.wait_state("web", "running")
    assert p["node"] == "node1"  # first in name order
    out = c.vigil("package", "move", "web", "-n", "node3", "--wait")
    assert "moved to node3" in out.stdout
    p = c.status_json()["packages"]["web"]
    assert (p["state"], p["node"], p["start_reason"]) == ("running", "node3", "user")
    # node halt without a flag refuses while packages run there
    refused = c.vigil("node", "halt", "node3", check=False)
    assert refused.returncode == 2
    assert "node node3 runs web: use --failover" in refused.stderr
    out = c.vigil("node", "halt", "node3", "--failover", "--wait")
    assert "halted" in out.stdout
    view = c.wait(lambda v: v["packages"]["web"]["state"] == "running"
                  and v["packages"]["web"]["node"] != "node3")  # fmt: skip
    assert view["nodes"]["node3"]["state"] == "halted"
    assert view["packages"]["web"]["start_reason"] == "failover"
    # a halted node takes nothing: moving there is refused by the planner's rules
    c.vigil("package", "move", "web", "-n", "node3")
    c.vigil("node", "start", "node3")
    c.wait(lambda v: v["packages"]["web"]["node"] == "node3", what="move after node start")
    assert c.status_json()["nodes"]["node3"]["state"] == "up"


def test_node_halt_detach_keeps_processes_running(three: LocalCluster) -> None:
    c = three
    c.write_package(f'name = "web"\n{SERVICE}')
    c.apply()
    c.wait_state("web", "running")
    pid = c.package("web")["services"]["s"]["pid"]
    c.vigil("node", "halt", "node1", "--detach", "--wait")
    p = c.status_json()["packages"]["web"]
    assert (p["state"], p["node"]) == ("detached", "node1")
    assert p["services"]["s"]["pid"] == pid
    c.vigil("node", "start", "node1")
    p = c.wait_state("web", "running")
    assert p["services"]["s"]["pid"] == pid  # watched again, never restarted


def test_simulate_changes_nothing_and_explains(three: LocalCluster, tmp_path: Path) -> None:
    c = three
    c.write_package(f'name = "db"\n{SERVICE}')
    c.write_package(
        f'name = "web"\n{SERVICE}[[dependency]]\npackage = "db"\nlocation = "same_node"\n'
    )
    c.apply()
    c.wait(lambda v: all(v["packages"][p]["state"] == "running" for p in ("db", "web")))
    before = c.status_json()
    out = c.vigil("simulate", "--node-fails", "node1", "--json")
    sim = json.loads(out.stdout)
    assert sim["events"] == ["node node1 fails"]
    first = [(a["action"], a["package"], a["node"]) for a in sim["rounds"][0]]
    assert ("start", "db", "node2") in first
    assert sim["result"]["packages"]["db"]["node"] == "node2"
    assert sim["result"]["packages"]["web"]["node"] == "node2"  # follows db, a step later
    human = c.vigil("simulate", "--node-fails", "node1").stdout
    assert "what if: node node1 fails" in human and "step 1" in human
    # saved snapshot: the same answer offline
    saved = tmp_path / "snap.toml"
    c.vigil("simulate", "--save", str(saved))
    offline = json.loads(
        c.vigil("simulate", "--from", str(saved), "--node-fails", "node1", "--json").stdout
    )

    def placement(result: dict[str, dict[str, dict[str, str]]]) -> dict[str, tuple[str, str]]:
        return {k: (p["state"], p["node"]) for k, p in result["packages"].items()}

    assert placement(offline["result"]) == placement(sim["result"])
    after = c.status_json()
    assert after["packages"]["db"]["node"] == before["packages"]["db"]["node"] == "node1"
    bad = c.vigil("simulate", "--node-fails", "mars", check=False)
    assert bad.returncode == 2 and "node mars is not up" in bad.stderr
