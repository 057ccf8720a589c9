"""Timers on real agents: every deadline fires on time when nothing else happens,
failure handling never waits behind starts, failures expire (``failure_timeout``),
and an operator's halt waits for dependents to halt first.

Real vigild processes on a real SQLite store; what is asserted is what an operator
sees (``vigil status --json``, ``vigil events``) and when.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vigil.testing.cluster import LocalCluster, View

pytestmark = pytest.mark.slow

SERVICE = '[[service]]\nname = "s"\ncommand = ["sleep", "1000"]\nhalt_timeout = "2s"\n'


@pytest.fixture
def two(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path, ["n1", "n2"], node_timeout="2s")
    try:
        yield c
    finally:
        c.close()


def on(view: View, pkg: str, node: str, state: str = "running") -> bool:
    p = view["packages"][pkg]
    return bool(p["node"] == node and p["state"] == state)


def test_successor_halt_timeout_fires_when_nothing_else_happens(two: LocalCluster) -> None:
    """db moves to n2; app (up, same_node on db) takes 30 s to stop; db's
    successor_halt_timeout is 2 s and nothing else happens: db leaves n1 after about
    2 s, not when app's stop ends."""
    c = two
    c.write_script("app.sh", '[ "$1" = stop ] && sleep 30\nexit 0\n')
    c.write_package(f'name = "db"\nnodes = ["n1", "n2"]\nsuccessor_halt_timeout = "2s"\n{SERVICE}')
    c.write_package(
        'name = "app"\nnodes = ["n1", "n2"]\n[[external_script]]\npath = "scripts/app.sh"\n'
        '[[dependency]]\npackage = "db"\ncondition = "up"\nlocation = "same_node"\n'
    )
    c.apply()
    c.start_agents()
    c.wait(lambda v: on(v, "db", "n1") and on(v, "app", "n1"), what="db and app on n1")
    t0 = time.monotonic()
    c.vigil("package", "move", "db", "-n", "n2")
    c.wait(lambda v: v["packages"]["db"]["state"] == "halt_wait", 10, "db in halt_wait")
    c.wait(lambda v: on(v, "db", "n2"), 15, "db running on n2")
    took = time.monotonic() - t0
    assert 2 <= took < 10, f"db left n1 {took:.1f}s after the move"
    events = c.vigil("events", "-p", "db").stdout
    assert "successor_halt_timeout passed for app" in events


def test_failure_handling_does_not_wait_behind_slow_starts(two: LocalCluster) -> None:
    """More slow starts than the agent runs at once hold n1's start slots; web's monitor
    fails on n1 meanwhile: web is halted there and runs on n2 within seconds."""
    c = two
    probe = c.write_script(
        "probe.sh", f'[ "$VIGIL_NODE" = n1 ] && [ -e {c.root}/broken ] && exit 1\nexit 0\n'
    )
    c.write_script("slow.sh", '[ "$1" = start ] && sleep 20\nexit 0\n')
    c.write_package(
        f'name = "web"\nnodes = ["n1", "n2"]\n{SERVICE}[[monitor]]\nname = "probe"\n'
        f'command = ["{probe}"]\ninterval = "300ms"\nfailures = 1\naction = "failover"\n'
    )
    c.apply()
    c.start_agents()
    c.wait(lambda v: on(v, "web", "n1") and v["nodes"]["n2"]["state"] == "up", what="web on n1")
    for i in range(18):  # more than MAX_CONCURRENT_OPS (16) starts
        c.write_package(
            f'name = "slow{i:02d}"\nnodes = ["n1"]\n[[external_script]]\npath = "scripts/slow.sh"\n'
        )
    c.apply()
    c.wait(
        lambda v: sum(p["state"] == "starting" for p in v["packages"].values()) >= 16,
        what="16 slow starts under way",
    )
    t0 = time.monotonic()
    (c.root / "broken").write_text("")
    c.wait(lambda v: on(v, "web", "n2"), 15, "web running on n2")
    assert time.monotonic() - t0 < 8
    still = [
        p
        for p, v in c.view()["packages"].items()
        if p.startswith("slow") and v["state"] != "running"
    ]
    assert still, "the slow starts were still under way: the failover did not wait for them"


def test_failure_timeout_turns_node_switching_back_on(two: LocalCluster) -> None:
    """web's service dies at once on n1 (restart none): it fails over to n2 and node
    switching for n1 is off, as a failure's; failure_timeout = 3s later it is on again
    by itself, with no operator."""
    c = two
    svc = c.write_script("svc.sh", '[ "$VIGIL_NODE" = n1 ] && exit 1\nexec sleep 1000\n')
    c.write_package(
        f'name = "web"\nnodes = ["n1", "n2"]\nfailure_timeout = "3s"\n'
        f'[[service]]\nname = "s"\ncommand = ["{svc}"]\n'
    )
    c.apply()
    c.start_agents()
    view = c.wait(lambda v: on(v, "web", "n2"), 20, "web failed over to n2")
    t0 = time.monotonic()
    p = view["packages"]["web"]
    assert p["disabled_nodes"] == ["n1"] and p["failed_nodes"] == ["n1"]
    c.wait(lambda v: v["packages"]["web"]["disabled_nodes"] == [], 15, "n1 switching on again")
    took = time.monotonic() - t0
    assert 1.5 < took < 10, f"node switching came back {took:.1f}s after the failover"
    p = c.status_json()["packages"]["web"]
    assert p["failed_nodes"] == [] and on({"packages": {"web": p}}, "web", "n2")
    # an operator's `disable -n` does not expire
    c.vigil("package", "disable", "web", "-n", "n1")
    stays(c, lambda v: v["packages"]["web"]["disabled_nodes"] == ["n1"], 4.5)


def stays(c: LocalCluster, pred: Callable[[View], bool], seconds: float) -> None:
    """``pred`` holds on every view for ``seconds`` (polled, like LocalCluster.wait)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        view = c.view()
        assert pred(view), view["packages"]
        time.sleep(0.1)


def test_operator_halt_waits_for_dependents_to_halt_first(two: LocalCluster) -> None:
    """`vigil package halt db` while app (up, same_node on db) runs: app halts first
    (automatic_halt), then db (user_halt); db's stop runs after app's stop ended."""
    c = two
    rec = c.root / "record"
    c.write_script(
        "app.sh",
        f'[ "$1" = stop ] && sleep 1 && echo "stop app $VIGIL_HALT_REASON" >> {rec}\nexit 0\n',
    )
    c.write_script(
        "db.sh", f'[ "$1" = stop ] && echo "stop db $VIGIL_HALT_REASON" >> {rec}\nexit 0\n'
    )
    c.write_package('name = "db"\nnodes = ["n1"]\n[[external_script]]\npath = "scripts/db.sh"\n')
    c.write_package(
        'name = "app"\nnodes = ["n1"]\n[[external_script]]\npath = "scripts/app.sh"\n'
        '[[dependency]]\npackage = "db"\ncondition = "up"\nlocation = "same_node"\n'
    )
    c.apply()
    c.start_agent("n1")
    c.wait(lambda v: on(v, "db", "n1") and on(v, "app", "n1"), what="db and app on n1")
    out = c.vigil("package", "halt", "db", "--wait")
    assert "halt done (halted)" in out.stdout
    assert rec.read_text().splitlines() == ["stop app automatic_halt", "stop db user_halt"]
    assert c.package("app")["state"] != "running"
