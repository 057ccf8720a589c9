"""The CLI as an operator uses it: mistakes are one line and a non-zero exit, and a
rejected configuration leaves the running one untouched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vigil.testing.cluster import LocalCluster

pytestmark = pytest.mark.slow

VIGIL = str(Path(sys.executable).with_name("vigil"))


def run(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [VIGIL, *(["-c", str(config)] if config else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_store_missing_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "cluster.toml").write_text(
        f'name = "c"\nstore = "sqlite:///{tmp_path}/nodir/store.db"\n'
    )
    one_line_error(run("status", config=tmp_path), 4, "vigil: error:", "nodir/store.db")


def test_missing_config_dir_is_one_line(tmp_path: Path) -> None:
    one_line_error(run("status", config=tmp_path / "nope"), 2, "cluster.toml: file not found")


def test_bad_flag_is_one_line() -> None:
    one_line_error(run("status", "--jsn"), 2, "No such option: --jsn")
    one_line_error(run("package", "start"), 2, "Missing argument 'PKG'")
    one_line_error(run("events", "--last", "-3"), 2, "--last")


def test_unknown_package_and_node(cluster: LocalCluster) -> None:
    cluster.write_package('name = "web"\n')
    cluster.apply()
    one_line_error(cluster.vigil("package", "halt", "nope", check=False), 3,
                   "unknown package 'nope' (known: web)")  # fmt: skip
    one_line_error(cluster.vigil("package", "start", "web", "-n", "mars", check=False), 3,
                   "unknown node 'mars'")  # fmt: skip
    one_line_error(cluster.vigil("package", "env", "nope", check=False), 3, "unknown package")


def test_own_package_is_refused(cluster: LocalCluster) -> None:
    cluster.write_package('name = "web"\n')
    cluster.apply()
    out = cluster.vigil("package", "halt", "web", check=False, VIGIL_PACKAGE="web")
    one_line_error(out, 2, "cannot run vigil commands against its own package")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('name = "web"\nauto_rn = true\n', "web.toml: auto_rn: unknown key"),
        ('name = "web"\nrun_script_timeout = "soon"\n', "web.toml: run_script_timeout: expected a duration"),
        ('name = "web"\n[[external_script]]\npath = "/no/such/script"\n',
         "web.toml: external_script[0].path: script /no/such/script does not exist"),
        ('name = "Bad Name"\n', "web.toml: name: expected a name matching"),
    ],
)  # fmt: skip
def test_rejected_config_leaves_running_state_untouched(
    cluster: LocalCluster, bad: str, message: str
) -> None:
    cluster.write_package('name = "web"\n[[service]]\nname = "s"\ncommand = ["sleep", "1000"]\n')
    cluster.write_package('name = "db"\n', "db.toml")
    cluster.apply()
    cluster.start_agents()
    cluster.wait_state("web", "running")
    before = cluster.status_json()
    cluster.write_package(bad, "web.toml")
    (cluster.config / "packages" / "db.toml").unlink()  # would remove db if it were applied
    out = cluster.vigil("apply", str(cluster.config), check=False)
    assert out.returncode == 2
    assert message in out.stderr
    assert "nothing applied" in out.stderr
    after = cluster.status_json()
    assert after["packages"].keys() == before["packages"].keys() == {"web", "db"}
    assert after["packages"]["web"]["services"] == before["packages"]["web"]["services"]
    assert after["packages"]["web"]["state"] == "running"


def test_apply_refuses_to_remove_a_running_package(cluster: LocalCluster) -> None:
    cluster.write_package('name = "web"\n[[service]]\nname = "s"\ncommand = ["sleep", "1000"]\n')
    cluster.apply()
    cluster.start_agents()
    cluster.wait_state("web", "running")
    (cluster.config / "packages" / "web.toml").unlink()
    out = cluster.vigil("apply", str(cluster.config), check=False)
    one_line_error(out, 2, "package 'web' is running on node1: halt it before removing it")
    cluster.vigil("package", "halt", "web", "--wait")
    out = cluster.vigil("apply", str(cluster.config))
    assert "package web: removed" in out.stdout
    assert "web" not in cluster.status_json()["packages"]


def test_status_json_shape_and_events(cluster: LocalCluster) -> None:
    cluster.write_package('name = "web"\n[[service]]\nname = "s"\ncommand = ["sleep", "1000"]\n')
    cluster.apply()
    cluster.start_agents()
    cluster.wait_state("web", "running")
    view = cluster.status_json()
    assert view["cluster"] == "test"
    assert view["nodes"]["node1"]["state"] == "up"
    pkg = view["packages"]["web"]
    assert {"state", "node", "auto_run", "halt_reason", "services"} <= pkg.keys()
    assert pkg["services"]["s"]["restarts"] == 0
    assert isinstance(pkg["services"]["s"]["pid"], int)
    events = [json.loads(line) for line in cluster.vigil("events", "--json").stdout.splitlines()]
    moves = [(e["from_state"], e["to_state"]) for e in events if e["package"] == "web"]
    assert moves == [("halted", "starting"), ("starting", "running")]
    assert all(e["node"] == "node1" and e["time"] > 0 for e in events)
    human = cluster.vigil("events").stdout
    assert "starting -> running" in human
    table = cluster.vigil("status", "-v").stdout
    assert "web" in table and "running" in table and "node1" in table


def test_demo_runs_and_stops_cleanly(tmp_path: Path) -> None:
    proc = subprocess.run(
        [VIGIL, "demo", "--duration", "3", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'package "web" is running: http://127.0.0.1:' in proc.stdout
    assert "vigil demo: stopped" in proc.stdout
    log = (tmp_path / "demo" / "logs" / "node1.log").read_text()
    assert "Traceback" not in log
    assert "left cluster demo" in log


def test_events_follow_shows_new_changes(cluster: LocalCluster) -> None:
    cluster.write_package('name = "web"\n[[service]]\nname = "s"\ncommand = ["sleep", "1000"]\n')
    cluster.apply()
    cluster.start_agents()
    cluster.wait_state("web", "running")
    follow = subprocess.Popen(
        [VIGIL, "events", "--follow", "--json", "--last", "1"],
        stdout=subprocess.PIPE,
        text=True,
        env=cluster.env(),
    )
    assert follow.stdout is not None
    try:
        first = json.loads(follow.stdout.readline())  # the newest past event: it is following
        assert first["to_state"] == "running"
        cluster.vigil("package", "halt", "web", "--wait")
        seen = [json.loads(follow.stdout.readline()) for _ in range(2)]
    finally:
        follow.kill()
        follow.wait()
        follow.stdout.close()
    assert [(e["from_state"], e["to_state"]) for e in seen] == [
        ("running", "halting"),
        ("halting", "halted"),
    ]
    assert seen[1]["reason"] == "halt requested"
    assert seen[1]["package"] == "web" and seen[1]["node"] == "node1"


def test_vigild_rejects_bad_node_name(tmp_path: Path) -> None:
    vigild = str(Path(sys.executable).with_name("vigild"))
    proc = subprocess.run(
        [vigild, "--node", "Bad Node", "--config", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    one_line_error(proc, 2, "--node: expected a name matching")
