"""A package on a real agent: the exit-code table of CONCEPTS §3, start and halt order.

Real vigild processes, a real SQLite store, real scripts; every assertion is on
what an operator sees (``vigil status --json``, ``vigil events``, the CLI output)
or on what the scripts themselves recorded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vigil.testing.cluster import LocalCluster

pytestmark = pytest.mark.slow

RECORDER = """\
echo "$1 {name} reason=${{VIGIL_HALT_REASON:-$VIGIL_START_REASON}}" >> "$RECORD"
case "$1" in
  start) exit {start} ;;
  stop) exit {stop} ;;
  validate) exit {validate} ;;
esac
"""


def recorder(c: LocalCluster, name: str, start: int = 0, stop: int = 0, validate: int = 0) -> Path:
    return c.write_script(
        f"{name}.sh", RECORDER.format(name=name, start=start, stop=stop, validate=validate)
    )


def package(c: LocalCluster, body: str = "", env: str = "", **top: str) -> None:
    extra = "".join(f"{k} = {v}\n" for k, v in top.items())
    c.write_package(f'name = "web"\n{extra}[env]\nRECORD = "{c.root}/record"\n{env}{body}')


def record(c: LocalCluster, validate: bool = False) -> list[str]:
    """What the scripts recorded: "start NAME" / "stop NAME" lines (validate runs left out)."""
    path = c.root / "record"
    if not path.exists():
        return []
    lines = [line.split(" reason=")[0] for line in path.read_text().splitlines()]
    return [x for x in lines if validate or not x.startswith("validate")]


def script_section(*names: str, kind: str = "external_script") -> str:
    return "".join(f'[[{kind}]]\npath = "scripts/{n}.sh"\n' for n in names)


SERVICE = '[[service]]\nname = "main"\ncommand = ["sleep", "1000"]\nhalt_timeout = "2s"\n'


# --------------------------------------------------------------------------- start exit codes


def test_start_exit_0_runs_and_halt_reverses_order(cluster: LocalCluster) -> None:
    for n in ("pre", "b", "c"):
        recorder(cluster, n)
    package(
        cluster,
        script_section("pre", kind="external_pre_script") + script_section("b", "c") + SERVICE,
    )
    cluster.apply()
    cluster.start_agents()
    p = cluster.wait_state("web", "running")
    assert p["node"] == "node1"
    assert p["start_reason"] == "boot"
    assert p["services"]["main"]["pid"] is not None
    assert record(cluster) == ["start pre", "start b", "start c"]

    out = cluster.vigil("package", "halt", "web", "--wait", "--timeout", "20")
    assert "halt done (halted)" in out.stdout
    status = cluster.status_json()["packages"]["web"]
    assert status["state"] == "halted"
    assert status["halt_reason"] == "user_halt"
    assert status["auto_run"] is False
    assert record(cluster) == ["start pre", "start b", "start c", "stop c", "stop b", "stop pre"]
    lines = (cluster.root / "record").read_text().splitlines()
    assert lines[-1] == "stop pre reason=user_halt"


def test_failed_start_step_undoes_done_steps_in_reverse(cluster: LocalCluster) -> None:
    recorder(cluster, "a")
    recorder(cluster, "b")
    recorder(cluster, "c", start=1)
    package(cluster, script_section("a", "b", "c") + SERVICE)
    cluster.apply()
    cluster.start_agents()
    p = cluster.wait_state("web", "failed")
    assert p["halt_reason"] == "failure"
    assert p["auto_run"] is False  # exit 1: global switching off
    assert p["services"]["main"]["pid"] is None
    # the failed step's idempotent stop runs too, then the done steps in reverse
    assert record(cluster) == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]


def test_start_exit_2_alone_fails_with_node_switching_off(cluster: LocalCluster) -> None:
    recorder(cluster, "s", start=2)
    package(cluster, script_section("s"))
    cluster.apply()
    cluster.start_agents()
    p = cluster.wait_state("web", "failed")
    assert p["halt_reason"] == "failure"
    assert p["disabled_nodes"] == ["node1"]
    assert p["auto_run"] is True  # exit 2 turns node switching off, not global switching
    assert record(cluster) == ["start s", "stop s"]
    # an operator starts it again: node switching comes back, it fails again the same way
    cluster.vigil("package", "start", "web")
    cluster.wait(lambda v: record(cluster).count("start s") == 2, what="second start")
    cluster.wait_state("web", "failed")


def test_start_exit_2_fails_over_to_next_node(two_nodes: LocalCluster) -> None:
    c = two_nodes
    c.write_script(
        "s.sh",
        'echo "$1 $VIGIL_NODE" >> "$RECORD"\n'
        '[ "$1" = start ] && [ "$VIGIL_NODE" = node1 ] && exit 2\nexit 0\n',
    )
    package(c, script_section("s") + SERVICE)
    c.start_agents()
    c.wait(lambda v: all(v["nodes"][n]["state"] == "up" for n in c.nodes), what="nodes up")
    c.apply()
    p = c.wait(lambda v: v["packages"]["web"]["node"] == "node2" and
               v["packages"]["web"]["state"] == "running")["packages"]["web"]  # fmt: skip
    assert p["disabled_nodes"] == ["node1"]
    assert p["start_reason"] == "failover"
    assert record(c) == ["start node1", "stop node1", "start node2"]


def test_start_timeout_is_killed_and_treated_as_1(cluster: LocalCluster) -> None:
    cluster.write_script(
        "hang.sh",
        'echo "$1" >> "$RECORD"\n[ "$1" = start ] && { trap "" TERM; sleep 1000; }\nexit 0\n',
    )
    package(cluster, script_section("hang"), run_script_timeout='"1s"')
    cluster.apply()
    cluster.start_agents()
    p = cluster.wait_state("web", "failed", timeout=30)
    assert p["auto_run"] is False
    assert p["halt_reason"] == "failure"
    assert "timed out" in p["message"]
    assert record(cluster) == ["start", "stop"]


# --------------------------------------------------------------------------- stop exit codes


@pytest.mark.parametrize("stop_body", ["exit 1", "trap '' TERM; sleep 1000"])
def test_stop_failure_or_timeout_is_halt_failed_until_clear(
    cluster: LocalCluster, stop_body: str
) -> None:
    cluster.write_script(
        "s.sh", f'echo "$1" >> "$RECORD"\n[ "$1" = stop ] && {{ {stop_body}; }}\nexit 0\n'
    )
    package(cluster, script_section("s") + SERVICE, halt_script_timeout='"1s"')
    cluster.apply()
    cluster.start_agents()
    cluster.wait_state("web", "running")
    out = cluster.vigil("package", "halt", "web", "--wait", "--timeout", "30", check=False)
    assert out.returncode != 0
    assert "package web is halt_failed on node1" in out.stderr
    assert out.stderr.count("\n") == 1
    p = cluster.status_json()["packages"]["web"]
    assert p["state"] == "halt_failed"
    assert p["node"] == "node1"
    # blocked: an operator's start does not run it while it is halt_failed ...
    cluster.vigil("package", "enable", "web")
    assert cluster.package("web")["state"] == "halt_failed"
    # ... until it is cleared; then it is halted and may start again
    cluster.vigil("package", "clear", "web", "--wait")
    cluster.wait_state("web", "running")


def test_stop_exit_0_on_user_halt_then_start_again(cluster: LocalCluster) -> None:
    recorder(cluster, "s")
    package(cluster, script_section("s") + SERVICE)
    cluster.apply()
    cluster.start_agents()
    cluster.wait_state("web", "running")
    cluster.vigil("package", "halt", "web", "--wait")
    assert cluster.package("web")["state"] == "halted"
    out = cluster.vigil("package", "start", "web", "--wait")
    assert "start done (running)" in out.stdout
    p = cluster.package("web")
    assert p["start_reason"] == "user"
    assert record(cluster) == ["start s", "stop s", "start s"]


# --------------------------------------------------------------------------- validate


@pytest.mark.parametrize(("code", "ok"), [(0, True), (1, False), (2, False)])
def test_validate_exit_codes(cluster: LocalCluster, code: int, ok: bool) -> None:
    recorder(cluster, "v", validate=code)
    package(cluster, script_section("v"))
    out = cluster.vigil("check", str(cluster.config), check=False)
    assert (out.returncode == 0) is ok, out.stderr
    if ok:
        assert "valid (cluster test, 1 package)" in out.stdout
    else:
        assert out.returncode == 2
        assert (
            f"web.toml: external_script[0]: {cluster.config}/scripts/v.sh validate exited with "
            f"status {code}" in out.stderr
        )
        applied = cluster.vigil("apply", str(cluster.config), check=False)
        assert applied.returncode == 2
        assert "nothing applied" in applied.stderr
    assert record(cluster, validate=True) == (["validate v"] * (1 if ok else 2))


# --------------------------------------------------------------------------- environment


def test_scripts_get_the_vigil_environment(cluster: LocalCluster) -> None:
    cluster.write_script(
        "env.sh", 'env | grep -E "^(VIGIL_|RECORD|EXTRA)" | sort >> "$RECORD.$1"\n'
    )
    package(cluster, script_section("env"), env='EXTRA = "x y"\n')
    cluster.apply()
    cluster.start_agents()
    cluster.wait_state("web", "running")
    cluster.vigil("package", "halt", "web", "--wait")
    start = (cluster.root / "record.start").read_text().splitlines()
    stop = (cluster.root / "record.stop").read_text().splitlines()
    for line in ("VIGIL_CLUSTER=test", "VIGIL_PACKAGE=web", "VIGIL_NODE=node1",
                 "VIGIL_ACTION=start", "VIGIL_START_REASON=boot", "EXTRA=x y"):  # fmt: skip
        assert line in start, start
    assert "VIGIL_ACTION=stop" in stop
    assert "VIGIL_HALT_REASON=user_halt" in stop
    shell = cluster.vigil("package", "env", "web", "--shell").stdout
    assert "export VIGIL_PACKAGE=web" in shell
    assert "export EXTRA='x y'" in shell


def test_agent_stopping_moves_its_packages_as_a_failover(two_nodes: LocalCluster) -> None:
    """SIGTERM to vigild halts its packages (``user_halt``, recorded ``node_left``) and
    leaves the cluster; the package then starts on the other node, whose scripts must
    be told it is a failover (journal recovery and the like), not an operator's start.
    An operator's halt and start stays ``user`` (test above)."""
    c = two_nodes
    c.write_script("s.sh", 'echo "$1 $VIGIL_NODE $VIGIL_START_REASON" >> "$RECORD"\nexit 0\n')
    package(c, script_section("s") + SERVICE)
    c.start_agents()
    c.wait(lambda v: all(v["nodes"][n]["state"] == "up" for n in c.nodes), what="nodes up")
    c.apply()
    first = c.wait_state("web", "running")["node"]
    other = next(n for n in c.nodes if n != first)
    c.stop_agent(first)
    p = c.wait(lambda v: v["packages"]["web"]["node"] == other and
               v["packages"]["web"]["state"] == "running")["packages"]["web"]  # fmt: skip
    assert p["start_reason"] == "failover"
    assert record(c)[-1] == f"start {other} failover"
