"""Services, monitors and the agent's own death, on a real agent with real processes."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from vigil.supervise.procfs import iter_stats, pid_alive
from vigil.testing import wait_until_sync
from vigil.testing.cluster import LocalCluster

pytestmark = pytest.mark.slow


def web(c: LocalCluster, service: str, extra: str = "") -> None:
    c.write_package(f'name = "web"\n{extra}\n[[service]]\nname = "main"\n{service}')


def service_pid(c: LocalCluster) -> int:
    pid = c.package("web")["services"]["main"]["pid"]
    assert isinstance(pid, int)
    return pid


def children_of(pid: int) -> list[int]:
    return [st.pid for st in iter_stats() if st.ppid == pid and not st.dead]


def test_killed_service_is_restarted_then_budget_spent_fails(cluster: LocalCluster) -> None:
    web(cluster, 'command = ["sleep", "1000"]\nrestart = 2\nrestart_window = "1m"\n')
    cluster.apply()
    cluster.start_agents()
    cluster.wait_state("web", "running")
    for expected in (1, 2):
        pid = service_pid(cluster)
        os.kill(pid, signal.SIGKILL)
        cluster.wait(
            lambda v, n=expected: v["packages"]["web"]["services"]["main"]["restarts"] == n,
            what=f"restart #{expected}",
        )
    status = cluster.status_json()["packages"]["web"]
    assert status["services"]["main"]["restarts"] == 2
    assert status["services"]["main"]["pid"] not in (None, pid)
    assert status["state"] == "running"
    # the budget is spent: the next crash halts the package with reason failure
    os.kill(service_pid(cluster), signal.SIGKILL)
    p = cluster.wait_state("web", "failed")
    assert p["halt_reason"] == "failure"
    assert "service main failed" in p["message"]
    assert p["disabled_nodes"] == ["node1"]
    events = cluster.vigil("events", "--json").stdout.splitlines()
    assert any('"to_state": "failed"' in e for e in events)


def test_halt_timeout_kills_whole_group_that_ignores_sigterm(cluster: LocalCluster) -> None:
    # the shell ignores SIGTERM and so does its child: only SIGKILL ends them
    web(
        cluster,
        'command = ["sh", "-c", "trap \\"\\" TERM; sleep 1000 & wait; sleep 1000"]\n'
        'halt_timeout = "1s"\n',
    )
    cluster.apply()
    cluster.start_agents()
    cluster.wait_state("web", "running")
    leader = service_pid(cluster)
    cluster.wait(lambda v: len(children_of(leader)) == 1, what="the grandchild")
    grandchild = children_of(leader)[0]
    started = time.monotonic()
    cluster.vigil("package", "halt", "web", "--wait", "--timeout", "20")
    assert time.monotonic() - started >= 1.0  # it waited halt_timeout before SIGKILL
    assert not pid_alive(leader)
    assert not pid_alive(grandchild)
    assert cluster.package("web")["state"] == "halted"


def test_agent_sigkill_leaves_nothing_then_recovers(cluster: LocalCluster) -> None:
    web(cluster, 'command = ["sh", "-c", "sleep 1000 & wait"]\n')
    cluster.apply()
    cluster.start_agents()
    cluster.wait_state("web", "running")
    leader = service_pid(cluster)
    cluster.wait(lambda v: len(children_of(leader)) == 1, what="the grandchild")
    grandchild = children_of(leader)[0]
    cluster.kill_agent("node1", signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (pid_alive(leader) or pid_alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(leader), "service outlived its agent"
    assert not pid_alive(grandchild), "the service's child outlived the agent"
    # started again, the agent recovers the package
    cluster.start_agent("node1")
    p = cluster.wait(
        lambda v: v["packages"]["web"]["state"] == "running"
        and v["packages"]["web"]["services"]["main"]["pid"] not in (None, leader),
        timeout=20,
    )["packages"]["web"]
    assert p["node"] == "node1"


def test_monitor_degraded_and_restart_action(cluster: LocalCluster) -> None:
    flag = cluster.root / "health"
    flag.write_text("3")
    web(
        cluster,
        'command = ["sleep", "1000"]\n',
        extra="restart_limit = 1\n"
        f'[[monitor]]\nname = "probe"\ncommand = ["sh", "-c", "exit $(cat {flag})"]\n'
        'interval = "100ms"\ntimeout = "2s"\nfailures = 2\naction = "restart"\n',
    )
    cluster.apply()
    cluster.start_agents()
    cluster.wait(lambda v: v["packages"]["web"]["degraded"] is True, what="degraded")
    table = cluster.vigil("status").stdout
    assert "degraded" in table
    first = service_pid(cluster)
    flag.write_text("1")  # failing: restart in place once (restart_limit = 1) ...
    p = cluster.wait(
        lambda v: v["packages"]["web"]["restarts"] == 1
        and v["packages"]["web"]["state"] == "running",
        what="restart in place",
    )["packages"]["web"]
    assert p["services"]["main"]["pid"] != first
    # ... then the limit is reached: the package fails (no other node)
    p = cluster.wait_state("web", "failed", timeout=20)
    assert "restart_limit 1 reached" in p["message"]


def test_maintenance_stops_monitoring(cluster: LocalCluster) -> None:
    flag = cluster.root / "health"
    runs = cluster.root / "runs"
    flag.write_text("0")
    web(
        cluster,
        'command = ["sleep", "1000"]\n',
        extra=f'[[monitor]]\nname = "probe"\n'
        f'command = ["sh", "-c", "echo x >> {runs}; exit $(cat {flag})"]\n'
        'interval = "100ms"\nfailures = 1\naction = "failover"\n',
    )
    cluster.apply()
    cluster.start_agents()
    cluster.wait_state("web", "running")
    cluster.wait(lambda v: runs.exists(), what="the monitor to run")
    cluster.vigil("package", "maintenance", "web", "--wait")
    assert cluster.status_json()["packages"]["web"]["state"] == "maintenance"
    flag.write_text("1")
    # no monitoring in maintenance: the probe does not run for 10 of its intervals
    seen = runs.read_text().count("x")
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert runs.read_text().count("x") <= seen + 1  # one run may have been in flight
        time.sleep(0.05)
    assert cluster.package("web")["state"] == "maintenance"
    # leaving maintenance, monitoring resumes and the failing probe acts
    cluster.vigil("package", "maintenance", "web", "--off")
    p = cluster.wait_state("web", "failed")
    assert "monitor probe failed" in p["message"]


def test_relocatable_address_added_on_start_removed_on_halt(cluster: LocalCluster) -> None:
    import subprocess

    ip = "127.77.0.9"

    def on_lo() -> bool:
        return _addr_on_lo(ip)

    assert not on_lo()
    web(cluster, 'command = ["sleep", "1000"]\n',
        extra=f'[[address]]\nip = "{ip}/32"\ninterface = "lo"\n')  # fmt: skip
    cluster.apply()
    cluster.start_agents()
    try:
        cluster.wait_state("web", "running")
        assert on_lo()
        cluster.vigil("package", "halt", "web", "--wait")
        assert not on_lo()
    finally:
        subprocess.run(["ip", "addr", "del", f"{ip}/32", "dev", "lo"], capture_output=True)


def _addr_on_lo(ip: str) -> bool:
    import subprocess

    out = subprocess.run(["ip", "-o", "addr", "show", "dev", "lo"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return f"inet {ip}/32" in out


def test_address_removed_when_the_agent_dies_or_stalls(cluster: LocalCluster) -> None:
    """A node that loses its packages (agent SIGKILLed: the sentinel sees the pipe
    close; agent SIGSTOPped past its lease deadline: the sentinel fences) must not
    keep answering for their address, which another node may hold by then."""
    import subprocess

    ip = "127.77.0.10"
    web(cluster, 'command = ["sleep", "1000"]\n',
        extra=f'[[address]]\nip = "{ip}/32"\ninterface = "lo"\n')  # fmt: skip
    cluster.apply()
    cluster.start_agents()
    try:
        cluster.wait_state("web", "running")
        assert _addr_on_lo(ip)
        cluster.kill_agent("node1")  # SIGKILL
        wait_until_sync(lambda: not _addr_on_lo(ip), timeout=10, what="address removed")
        cluster.start_agent("node1")  # the package starts again: the address is back
        wait_until_sync(lambda: _addr_on_lo(ip), timeout=30, what="address back")
        cluster.wait_state("web", "running", timeout=30)
        cluster.pause_agent("node1")  # SIGSTOP past 0.8 x node_timeout: the sentinel fences
        try:
            wait_until_sync(lambda: not _addr_on_lo(ip), timeout=15, what="address fenced")
        finally:
            cluster.resume_agent("node1")
        wait_until_sync(lambda: _addr_on_lo(ip), timeout=30, what="address back after the fence")
    finally:
        subprocess.run(["ip", "addr", "del", f"{ip}/32", "dev", "lo"], capture_output=True)


def test_node_fail_fast_runs_fence_command(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("fence")
    fenced = root / "fenced"
    c = LocalCluster(root, ["node1"], extra_cluster=f'fence_command = ["touch", "{fenced}"]\n')
    try:
        c.write_script("s.sh", '[ "$1" = stop ] && exit 1\nexit 0\n')
        c.write_package(
            'name = "web"\nnode_fail_fast = true\n[[external_script]]\npath = "scripts/s.sh"\n'
            '[[service]]\nname = "main"\ncommand = ["sleep", "1000"]\n'
        )
        c.apply()
        c.start_agents()
        c.wait_state("web", "running")
        pid = service_pid(c)
        c.vigil("package", "halt", "web")
        deadline = time.monotonic() + 20
        while not fenced.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fenced.exists(), c.agent_log("node1")
        assert c.agents["node1"].wait(timeout=20) == 3  # the agent left the cluster
        assert not pid_alive(pid)
        assert "fences itself" in c.agent_log("node1")
    finally:
        c.close()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("arping") is None or shutil.which("ip") is None,
    reason="needs root, iproute2 and arping",
)
def test_held_address_is_announced_again_while_held(cluster: LocalCluster) -> None:
    """A host that missed the gratuitous ARPs of a new holder (it was cut off) has a
    stale neighbour entry: the holder announces the address again every GARP_REFRESH
    s, so the entry is corrected without waiting for the kernel to re-resolve it."""
    import subprocess

    from vigil.agent.package import GARP_REFRESH

    tag = f"vgt{os.getpid() % 100000}"
    host_if, peer_if, peer_ns = f"{tag}a", f"{tag}b", f"{tag}ns"

    def ip(*args: str) -> str:
        return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout

    try:
        ip("netns", "add", peer_ns)
        ip("link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns", peer_ns)
        ip("link", "set", host_if, "up")
        ip("-n", peer_ns, "link", "set", peer_if, "up")
        ip("-n", peer_ns, "addr", "add", "10.251.0.2/24", "dev", peer_if)
        mac = Path(f"/sys/class/net/{host_if}/address").read_text().strip()
        web(cluster, 'command = ["sleep", "1000"]\n',
            extra=f'[[address]]\nip = "10.251.0.1/24"\ninterface = "{host_if}"\n')  # fmt: skip
        cluster.apply()
        cluster.start_agents()
        cluster.wait_state("web", "running")

        def peer_sees() -> str:
            return ip("-n", peer_ns, "neigh", "show", "10.251.0.1", "dev", peer_if)

        def burst_running() -> bool:
            pat = f"arping -q -U -c .* -I {host_if}"
            return subprocess.run(["pgrep", "-f", pat], capture_output=True).returncode == 0

        # after the first gratuitous ARPs (a burst at start) ...
        wait_until_sync(lambda: not burst_running(), 15, interval=0.1, what="the burst done")
        # ... the peer's entry points elsewhere, as after a partition healed
        ip("-n", peer_ns, "neigh", "replace", "10.251.0.1", "lladdr", "02:00:00:00:00:99",
           "dev", peer_if, "nud", "stale")  # fmt: skip
        assert "02:00:00:00:00:99" in peer_sees()
        wait_until_sync(lambda: mac in peer_sees(), GARP_REFRESH * 2 + 2, interval=0.1,
                        what=f"the peer's neighbour entry corrected to {mac}")  # fmt: skip
        cluster.vigil("package", "halt", "web", "--wait")
        left = subprocess.run(["pgrep", "-f", f"arping.*{host_if}"], capture_output=True)
        assert left.returncode != 0, "an arping outlived the address"
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", peer_ns], capture_output=True)


@pytest.mark.parametrize("restart", ['"none"', "3"])
def test_service_that_dies_at_once_fails_the_package(cluster: LocalCluster, restart: str) -> None:
    """A service whose command fails at once (a bad flag, a missing file) spends its
    budget while the package's start is still finishing: the failure is carried out
    when the start ends, not dropped (the package must not stay "running")."""
    web(cluster, f'command = ["false"]\nrestart = {restart}\n')
    cluster.apply()
    cluster.start_agents()
    p = cluster.wait_state("web", "failed", 20)
    assert "service main failed" in p["message"]
    assert p["halt_reason"] == "failure"
