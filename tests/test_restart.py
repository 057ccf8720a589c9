"""Restarts and live changes on a real agent: every start runs the applied definition,
`vigil status` says when a package runs an older one (``stale``), and `vigil package
restart` restarts it in place with start reason ``restart`` for its scripts and its
services alike."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from vigil.testing.cluster import LocalCluster

pytestmark = pytest.mark.slow


def write(c: LocalCluster, version: str, monitor: bool = False) -> None:
    probe = (
        f'[[monitor]]\nname = "probe"\ncommand = ["{c.config}/scripts/probe.sh"]\n'
        f'interval = "300ms"\nfailures = 1\naction = "restart"\n'
        if monitor
        else ""
    )
    c.write_package(
        f'name = "app"\n[env]\nVERSION = "{version}"\n'
        f'[[external_script]]\npath = "scripts/scr.sh"\n'
        f'[[service]]\nname = "svc"\ncommand = ["{c.config}/scripts/svc.sh"]\nrestart = 5\n{probe}'
    )


def starts(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def setup(c: LocalCluster, monitor: bool = False) -> tuple[Path, Path]:
    svc, scr = c.root / "svc-starts", c.root / "scr-starts"
    c.write_script("svc.sh", f'echo "$VIGIL_START_REASON $VERSION" >> {svc}\nexec sleep 1000\n')
    c.write_script(
        "scr.sh", f'[ "$1" = start ] && echo "$VIGIL_START_REASON $VERSION" >> {scr}\nexit 0\n'
    )
    c.write_script("probe.sh", f"[ -e {c.root}/sick ] && exit 1\nexit 0\n")
    write(c, "1", monitor)
    c.apply()
    c.start_agents()
    c.wait_state("app", "running")
    return svc, scr


def test_stale_until_package_restart_applies_the_new_definition(cluster: LocalCluster) -> None:
    c = cluster
    svc, scr = setup(c)
    pid = c.package("app")["services"]["svc"]["pid"]
    assert c.status_json()["packages"]["app"]["stale"] is False
    write(c, "2")
    out = c.apply()
    assert "takes effect when it next starts" in out.stdout
    p = c.status_json()["packages"]["app"]
    assert p["stale"] is True and p["services"]["svc"]["pid"] == pid  # apply disturbs nothing
    assert p["definition"] and p["applied_definition"]
    assert p["definition"] != p["applied_definition"]
    human = c.vigil("status").stdout
    assert "(stale)" in human and "vigil package restart app" in human
    # applying the running definition again: said so, not stale any more
    write(c, "1")
    assert "app: changed back to the definition it runs with" in c.apply().stdout
    assert c.status_json()["packages"]["app"]["stale"] is False
    write(c, "2")
    c.apply()
    # a service restart is not a package start: still the old definition
    os.kill(pid, signal.SIGKILL)
    c.wait(lambda v: len(starts(svc)) == 2, what="service restarted")
    assert starts(svc)[1] == "boot 1"
    out = c.vigil("package", "restart", "app", "--wait")
    assert out.stdout.strip() == "package app: restart done (running)"
    assert starts(svc)[-1] == "restart 2" and starts(scr)[-1] == "restart 2"
    p = c.status_json()["packages"]["app"]
    assert (p["state"], p["start_reason"], p["stale"]) == ("running", "restart", False)
    assert p["definition"] == p["applied_definition"]
    assert "(stale)" not in c.vigil("status").stdout


def test_monitor_restart_in_place_uses_the_applied_definition(cluster: LocalCluster) -> None:
    c = cluster
    svc, scr = setup(c, monitor=True)
    write(c, "2", monitor=True)
    c.apply()
    (c.root / "sick").write_text("")
    c.wait(lambda v: len(starts(svc)) >= 2, what="restart in place")
    (c.root / "sick").unlink()
    c.wait_state("app", "running")
    assert starts(svc)[:2] == ["boot 1", "restart 2"]
    assert starts(scr)[:2] == ["boot 1", "restart 2"]


def test_restart_refuses_a_package_that_does_not_run(cluster: LocalCluster) -> None:
    c = cluster
    setup(c)
    c.vigil("package", "halt", "app", "--wait")
    r = c.vigil("package", "restart", "app", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "package app is halted, not running: nothing to restart" in r.stderr
    r = c.vigil("package", "restart", "nope", check=False)
    assert r.returncode == 3
