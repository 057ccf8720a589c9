"""Config parsing and checking: every error names file:key and what is expected."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from vigil.config import (
    CheckReport,
    ConfigTree,
    find_dependency_cycle,
    format_duration,
    load_tree,
    parse_duration,
)
from vigil.errors import ConfigError


def make_dir(tmp_path: Path, packages: dict[str, str], cluster: str | None = None) -> Path:
    (tmp_path / "packages").mkdir(exist_ok=True)
    (tmp_path / "cluster.toml").write_text(
        cluster if cluster is not None else 'name = "c1"\nstore = "sqlite:///tmp/x.db"\n'
    )
    for fname, text in packages.items():
        (tmp_path / "packages" / fname).write_text(text)
    return tmp_path


def check(tmp_path: Path, packages: dict[str, str], cluster: str | None = None) -> CheckReport:
    report = CheckReport()
    load_tree(make_dir(tmp_path, packages, cluster), report)
    return report


def one_error(report: CheckReport) -> str:
    assert len(report.errors) == 1, [str(e) for e in report.errors]
    return str(report.errors[0])


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("3s", 3.0), ("5m", 300.0), ("1h", 3600.0), ("1.5s", 1.5), (2, 2.0)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["3", "3 sec", "-1s", "", "fast", True, [1]])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(bad)


def test_none_duration_only_where_allowed() -> None:
    assert parse_duration("none", allow_none=True) is None
    with pytest.raises(ValueError, match='"none" is not allowed'):
        parse_duration("none")
    assert format_duration(None) == "none"
    assert format_duration(0.5) == "500ms"


def test_minimal_package_gets_defaults(tmp_path: Path) -> None:
    report = CheckReport()
    tree = load_tree(make_dir(tmp_path, {"web.toml": 'name = "web"\n'}), report)
    assert report.ok, report.errors
    assert isinstance(tree, ConfigTree)
    spec = tree.packages["web"]
    assert spec.nodes == ["*"]
    assert spec.auto_run is True
    assert spec.run_script_timeout == 300.0
    assert spec.restart_limit == 3


def test_every_key_parses(tmp_path: Path) -> None:
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    text = f"""
name = "db"
nodes = ["n1", "n2"]
auto_run = false
failover_policy = "min_package_node"
failback_policy = "automatic"
priority = 10
run_script_timeout = "none"
halt_script_timeout = "30s"
successor_halt_timeout = "1m"
restart_limit = 2
restart_window = "5m"
halt_timeout = "15s"
log_max_size = "20M"
log_keep = 3
node_fail_fast = true
[env]
DB_PORT = "5432"
[[external_pre_script]]
path = "{script}"
args = ["-v"]
[[external_script]]
path = "{script}"
[[address]]
ip = "10.0.0.10/24"
interface = "eth0"
[[service]]
name = "pg"
command = ["postgres", "-D", "/data"]
restart = "unlimited"
restart_window = "none"
restart_delay = "100ms"
halt_timeout = "20s"
fail_fast = true
user = "nobody"
group = "0"
umask = "0027"
cwd = "{tmp_path}"
stop_signal = "INT"
kill_mode = "mixed"
limit_nofile = "1024:65536"
limit_core = "infinity"
limit_nproc = 4096
[[service]]
name = "daemon"
command = ["/usr/sbin/daemon"]
type = "forking"
pid_file = "/run/daemon.pid"
start_timeout = "5s"
[[monitor]]
name = "probe"
command = ["pg_isready"]
interval = "5s"
timeout = "2s"
failures = 2
action = "failover"
[[dependency]]
package = "storage"
condition = "up"
location = "same_node"
"""
    report = CheckReport()
    tree = load_tree(
        make_dir(tmp_path, {"db.toml": text, "storage.toml": 'name = "storage"\n'}), report
    )
    assert report.ok, [str(e) for e in report.errors]
    assert tree is not None
    spec = tree.packages["db"]
    assert spec.service[0].restart is None  # unlimited
    assert spec.service[0].restart_window is None
    assert spec.service[0].restart_delay == 0.1
    assert spec.run_script_timeout is None
    assert spec.monitor[0].action == "failover"
    pg, daemon = spec.service
    assert (pg.stop_signal, pg.stop_signum, pg.kill_mode) == ("SIGINT", 2, "mixed")
    assert (pg.user, pg.group, pg.umask) == ("nobody", "0", 0o027)
    assert pg.limits() == {
        "core": (resource.RLIM_INFINITY, resource.RLIM_INFINITY),
        "nproc": (4096, 4096),
        "nofile": (1024, 65536),
    }
    assert (daemon.type, daemon.pid_file, daemon.start_timeout) == (
        "forking",
        "/run/daemon.pid",
        5.0,
    )
    assert (pg.type, pg.kill_mode, daemon.stop_signal) == ("simple", "mixed", "SIGTERM")
    assert (spec.halt_timeout, spec.log_max_size, spec.log_keep) == (15.0, 20 * 1024**2, 3)
    # what the store keeps reads back the same (the config is applied as JSON)
    again = type(spec).model_validate_json(spec.model_dump_json())
    assert again == spec
    assert spec.address[0].ip == "10.0.0.10/24"
    assert any("run_script_timeout" in w for w in report.warnings)


def test_unknown_key_is_named(tmp_path: Path) -> None:
    msg = one_error(check(tmp_path, {"web.toml": 'name = "web"\nauto_rn = true\n'}))
    assert msg == f"{tmp_path}/packages/web.toml: auto_rn: unknown key"


def test_unknown_key_in_service_is_named(tmp_path: Path) -> None:
    text = 'name = "web"\n[[service]]\nname = "s"\ncommand = ["x"]\nrestarts = 3\n'
    msg = one_error(check(tmp_path, {"web.toml": text}))
    assert msg == f"{tmp_path}/packages/web.toml: service[0].restarts: unknown key"


def test_bad_duration_is_named(tmp_path: Path) -> None:
    text = 'name = "web"\n[[service]]\nname = "s"\ncommand = ["x"]\nrestart_delay = "soon"\n'
    msg = one_error(check(tmp_path, {"web.toml": text}))
    assert msg.startswith(f"{tmp_path}/packages/web.toml: service[0].restart_delay: ")
    assert 'expected a duration like "500ms", "3s", "5m"' in msg
    assert "'soon'" in msg


def test_bad_name(tmp_path: Path) -> None:
    msg = one_error(check(tmp_path, {"web.toml": 'name = "Web Server"\n'}))
    assert "web.toml: name: expected a name matching" in msg


def test_missing_required_key(tmp_path: Path) -> None:
    msg = one_error(check(tmp_path, {"web.toml": 'nodes = ["a"]\n'}))
    assert msg.endswith("web.toml: name: required key is missing")


def test_missing_script(tmp_path: Path) -> None:
    text = 'name = "web"\n[[external_script]]\npath = "/nonexistent/start.sh"\n'
    msg = one_error(check(tmp_path, {"web.toml": text}))
    assert msg == (
        f"{tmp_path}/packages/web.toml: external_script[0].path: "
        "script /nonexistent/start.sh does not exist"
    )


def test_non_executable_script(tmp_path: Path) -> None:
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    text = f'name = "web"\n[[external_pre_script]]\npath = "{script}"\n'
    msg = one_error(check(tmp_path, {"web.toml": text}))
    assert "external_pre_script[0].path: script" in msg
    assert "is not executable" in msg


def test_relative_script_path_is_relative_to_config_dir(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "s.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    report = CheckReport()
    tree = load_tree(
        make_dir(
            tmp_path, {"web.toml": 'name = "web"\n[[external_script]]\npath = "scripts/s.sh"\n'}
        ),
        report,
    )
    assert report.ok
    assert tree is not None
    assert tree.packages["web"].external_script[0].path == str(script)


def test_bad_toml(tmp_path: Path) -> None:
    msg = one_error(check(tmp_path, {"web.toml": 'name = "web\n'}))
    assert "web.toml: not valid TOML" in msg


def test_bad_cluster(tmp_path: Path) -> None:
    msg = one_error(check(tmp_path, {}, cluster='name = "c"\nstore = "mysql://x"\n'))
    assert "cluster.toml: store: expected " in msg


def test_duplicate_priority_and_package_name(tmp_path: Path) -> None:
    report = check(
        tmp_path,
        {
            "a.toml": 'name = "a"\npriority = 5\n',
            "b.toml": 'name = "b"\npriority = 5\n',
            "c.toml": 'name = "a"\n',
        },
    )
    msgs = [str(e) for e in report.errors]
    assert any("c.toml: name: package 'a' is already defined" in m for m in msgs)
    assert any("b.toml: priority: priority 5 is already used by package 'a'" in m for m in msgs)


def test_dependency_checks(tmp_path: Path) -> None:
    report = check(
        tmp_path,
        {
            "a.toml": 'name = "a"\n[[dependency]]\npackage = "b"\n',
            "b.toml": 'name = "b"\n[[dependency]]\npackage = "a"\n',
            "c.toml": 'name = "c"\n[[dependency]]\npackage = "zz"\n',
            "d.toml": 'name = "d"\n[[dependency]]\npackage = "a"\ncondition = "down"\n',
        },
    )
    msgs = [str(e) for e in report.errors]
    assert any("dependency cycle: a -> b -> a" in m for m in msgs), msgs
    assert any("c.toml: dependency[0].package: expected a configured package" in m for m in msgs)
    assert any("d.toml: dependency[0]: a 'down' dependency must be mutual" in m for m in msgs)


def test_nodes_must_be_listed_when_cluster_lists_nodes(tmp_path: Path) -> None:
    cluster = 'name = "c"\nstore = "sqlite:///tmp/x.db"\nnodes = ["n1", "n2"]\n'
    msg = one_error(check(tmp_path, {"a.toml": 'name = "a"\nnodes = ["n1", "n3"]\n'}, cluster))
    assert msg.endswith("a.toml: nodes[1]: expected a node listed in cluster.toml nodes, got 'n3'")


def test_service_restart_budget_values(tmp_path: Path) -> None:
    text = 'name = "w"\n[[service]]\nname = "s"\ncommand = ["x"]\nrestart = "often"\n'
    msg = one_error(check(tmp_path, {"w.toml": text}))
    assert 'service[0].restart: expected "none", a non-negative integer or "unlimited"' in msg


def test_reserved_env(tmp_path: Path) -> None:
    msg = one_error(check(tmp_path, {"w.toml": 'name = "w"\n[env]\nVIGIL_NODE = "x"\n'}))
    assert "env: 'VIGIL_NODE': names starting with VIGIL_ are reserved" in msg


def test_find_cycle() -> None:
    assert find_dependency_cycle({"a": ["b"], "b": ["c"], "c": []}) is None
    assert find_dependency_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c"]


def test_config_error_is_one_line() -> None:
    err = ConfigError("x.toml: key", "expected y")
    assert str(err) == "x.toml: key: expected y"
    assert "\n" not in str(err)
