"""Cluster formation and membership on real agents, as a new user sets it up:
cluster.toml without a ``nodes`` list.

- A cold cluster waits (up to the formation bound) for the nodes named in packages'
  ``nodes`` lists before placing packages, so that they start on their preferred node.
- A node that joined once is remembered: dead, it is shown ``down``; ``vigil node
  remove`` forgets it (refused while it is up).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vigil.testing.cluster import LocalCluster

pytestmark = pytest.mark.slow

SERVICE = '[[service]]\nname = "s"\ncommand = ["sleep", "1000"]\n'


@pytest.fixture
def unlisted(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path, ["n1", "n2", "n3"], node_timeout="2s", list_nodes=False)
    try:
        yield c
    finally:
        c.close()


def test_a_cold_cluster_places_packages_on_their_preferred_node(unlisted: LocalCluster) -> None:
    """Three agents started at once; web prefers n3, which may well join last."""
    c = unlisted
    c.write_package(f'name = "web"\nnodes = ["n3", "n1", "n2"]\n{SERVICE}')
    c.write_package(f'name = "db"\nnodes = ["n2", "n3"]\n{SERVICE}')
    c.apply()
    for n in ("n1", "n2", "n3"):
        c.start_agent(n)
    view = c.wait(
        lambda v: all(v["packages"][p]["state"] == "running" for p in ("web", "db")),
        what="web and db running",
    )
    assert view["packages"]["web"]["node"] == "n3"
    assert view["packages"]["db"]["node"] == "n2"


def test_the_formation_bound_ends_the_wait(unlisted: LocalCluster) -> None:
    """n3 never comes: web starts on the next node of its list after the bound (2 x
    node_timeout), and says meanwhile what it waits for."""
    c = unlisted
    c.write_package(f'name = "web"\nnodes = ["n3", "n1"]\n{SERVICE}')
    c.apply()
    c.start_agent("n1")
    p = c.wait_state("web", "start_wait")
    assert p["message"] == "start_wait: waiting for the cluster to form (n3 not up yet)"
    p = c.wait_state("web", "running", 20)
    assert p["node"] == "n1"


def test_a_dead_member_is_shown_down_until_removed(unlisted: LocalCluster) -> None:
    c = unlisted
    for n in ("n1", "n2"):
        c.start_agent(n)
    c.wait(lambda v: v["nodes"].get("n2", {}).get("state") == "up", what="n2 up")
    c.kill_agent("n2")
    view = c.wait(lambda v: v["nodes"]["n2"]["state"] == "down", 15, "n2 shown down")
    assert view["nodes"]["n2"]["pid"] is None
    assert "n3" not in view["nodes"]  # never joined: not a member
    human = c.vigil("status").stdout
    assert any(line.split()[:2] == ["n2", "down"] for line in human.splitlines()), human
    # forgetting a node that is up is refused, in one line
    up = c.vigil("node", "remove", "n1", check=False)
    assert up.returncode == 2 and up.stderr.count("\n") == 1
    assert "node n1 is up" in up.stderr
    unknown = c.vigil("node", "remove", "n9", check=False)
    assert unknown.returncode == 3 and "unknown node 'n9'" in unknown.stderr
    out = c.vigil("node", "remove", "n2")
    assert out.stdout.strip() == "node n2: removed"
    assert "n2" not in c.status_json()["nodes"]
    # it joins again: a member again
    c.start_agent("n2")
    c.wait(lambda v: v["nodes"].get("n2", {}).get("state") == "up", what="n2 back")
