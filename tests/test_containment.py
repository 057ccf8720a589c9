"""Containment (issue: every process a package starts lives in the package's cgroup).

Three kinds of process that leave their process group, each stopped four ways:

* kinds: a service's child that calls ``setsid``; a ``type = "forking"`` daemon
  (fork, setsid, fork, pid file); the background app of an external script's
  ``start`` (``nohup app &``), which must run until the package halts;
* ways: ``vigil package halt``; the sentinel at its fence deadline (the agent is
  stopped with SIGSTOP); SIGKILL of the agent (the sentinel); the clean-up of a
  restarted agent (agent and sentinel SIGKILLed together, then the agent started).

Real agents (not in PID namespaces, so that a SIGKILLed agent leaves its sentinel
behind, as on a real host), a real SQLite store, real cgroups.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vigil.supervise import procfs
from vigil.supervise.cgroup import Cgroup, find_hierarchy, own_cgroup
from vigil.testing import wait_until_sync
from vigil.testing.cluster import LocalCluster
from vigil.testing.etcd import store_backend
from vigil.testing.witness import assert_no_overlap, incarnations, read_records, service_toml

pytestmark = pytest.mark.slow


def _cgroups_writable() -> str | None:
    h = find_hierarchy()
    if h is None:
        return "no cgroup v2 hierarchy"
    if not os.access(h, os.W_OK):
        return f"{h} is not writable (not root?)"
    return None


needs_cgroups = pytest.mark.skipif(_cgroups_writable() is not None, reason=str(_cgroups_writable()))


def pids_with(marker: str) -> list[int]:
    """Live PIDs whose command line holds ``marker``."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if marker.encode() in cmd and procfs.pid_alive(int(name)):
            out.append(int(name))
    return out


def sentinel_of(agent_pid: int) -> int:
    for st in procfs.iter_stats():
        if st.ppid == agent_pid and not st.dead:
            cmd = Path(f"/proc/{st.pid}/cmdline").read_bytes()
            if b"vigil.supervise.sentinel" in cmd:
                return st.pid
    raise AssertionError(f"agent {agent_pid} has no sentinel")


# The interpreter itself, not a "python3" found on PATH: that may be a wrapper script
# (pyenv's shims) whose short-lived helpers carry the marker too.
PY = sys.executable
SLEEPER = f'exec {PY} -c "import sys, time; time.sleep(1000)" "$@"\n'

KINDS = ("setsid-child", "forking-daemon", "script-background")


def escaping_package(c: LocalCluster, kind: str, marker: str, halt_timeout: str = "3s") -> None:
    c.write_script("sleeper.sh", SLEEPER)
    s = c.config / "scripts"
    if kind == "setsid-child":
        c.write_script("svc.sh", f"setsid {s}/sleeper.sh {marker} &\nexec sleep 1000\n")
        body = f'[[service]]\nname = "main"\ncommand = ["{s}/svc.sh"]\nhalt_timeout = "{halt_timeout}"\n'
    elif kind == "forking-daemon":
        pid_file = c.root / f"{marker}.pid"
        c.write_script(
            "daemon.sh",
            # fork; the child calls setsid and forks the daemon; the parent exits 0
            f"( setsid sh -c 'echo $$ > {pid_file}; exec {s}/sleeper.sh {marker}' & ) \nexit 0\n",
        )
        body = (
            f'[[service]]\nname = "main"\ncommand = ["{s}/daemon.sh"]\ntype = "forking"\n'
            f'pid_file = "{pid_file}"\nhalt_timeout = "{halt_timeout}"\n'
        )
    else:
        c.write_script(
            "legacy.sh",
            f'case "$1" in start) nohup {s}/sleeper.sh {marker} >/dev/null 2>&1 & ;; esac\nexit 0\n',
        )
        body = f'[[external_script]]\npath = "{s}/legacy.sh"\n'
    c.write_package(f'name = "esc"\nhalt_timeout = "{halt_timeout}"\n{body}')


@pytest.fixture
def c(n1: LocalCluster) -> LocalCluster:
    return n1


def start_escaping(c: LocalCluster, kind: str, marker: str) -> list[int]:
    escaping_package(c, kind, marker)
    c.apply()
    c.start_agents()
    c.wait_state("esc", "running")
    wait_until_sync(lambda: bool(pids_with(marker)), 10, what=f"the {kind} process")
    escaped = pids_with(marker)
    cg = c.package_cgroup("n1", "esc")
    assert cg is not None
    for pid in escaped:
        assert cg.holds(pid), f"{kind} process {pid} is not in {cg.path}: {own_cgroup(pid)}"
    return escaped


def said(root: Path, text: str, node: str = "n1") -> None:
    """The sentinel of ``node`` wrote ``text`` in its log (it writes after acting)."""
    path = root / "state" / node / "log" / "sentinel.log"
    wait_until_sync(
        lambda: path.exists() and text in path.read_text(), 5, what=f"{text!r} in {path}"
    )


def gone(pids: list[int], timeout: float, what: str) -> None:
    wait_until_sync(lambda: not any(procfs.pid_alive(p) for p in pids), timeout, what=what)


@needs_cgroups
@pytest.mark.parametrize("kind", KINDS)
def test_halt_stops_what_left_the_process_group(c: LocalCluster, kind: str) -> None:
    marker = f"esc-halt-{kind}-{os.getpid()}"
    escaped = start_escaping(c, kind, marker)
    c.vigil("package", "halt", "esc", "--wait", "--timeout", "30")
    p = c.package("esc")
    assert p["state"] == "halted", p
    assert not any(procfs.pid_alive(x) for x in escaped), f"{kind} survived halt"
    cg = c.package_cgroup("n1", "esc")
    assert cg is not None and not cg.exists(), "the empty package cgroup was not removed"


@needs_cgroups
@pytest.mark.parametrize("kind", KINDS)
def test_fence_deadline_stops_what_left_the_process_group(c: LocalCluster, kind: str) -> None:
    marker = f"esc-fence-{kind}-{os.getpid()}"
    escaped = start_escaping(c, kind, marker)
    c.pause_agent("n1")  # renewals stop: the sentinel's deadline passes (0.6 node_timeout)
    try:
        gone(escaped, 10, f"{kind} killed by the sentinel at its deadline")
    finally:
        c.resume_agent("n1")
    said(c.root, "missed its lease deadline")


@needs_cgroups
@pytest.mark.parametrize("kind", KINDS)
def test_agent_sigkill_stops_what_left_the_process_group(c: LocalCluster, kind: str) -> None:
    marker = f"esc-kill-{kind}-{os.getpid()}"
    escaped = start_escaping(c, kind, marker)
    c.kill_agent("n1", signal.SIGKILL)
    gone(escaped, 10, f"{kind} killed by the sentinel when the agent died")


@needs_cgroups
@pytest.mark.parametrize("kind", KINDS)
def test_restarted_agent_stops_what_left_the_process_group(c: LocalCluster, kind: str) -> None:
    marker = f"esc-restart-{kind}-{os.getpid()}"
    escaped = start_escaping(c, kind, marker)
    agent = c.agent_pid("n1")
    sentinel = sentinel_of(agent)
    os.kill(sentinel, signal.SIGKILL)  # both at once: nobody kills the package
    c.kill_agent("n1", signal.SIGKILL)
    assert any(procfs.pid_alive(p) for p in escaped), "nothing left for the new agent"
    c.start_agent("n1")
    gone(escaped, 15, f"{kind} killed by the restarted agent's clean-up")
    c.wait_state("esc", "running", 20)  # and it recovers the package


@needs_cgroups
def test_script_background_app_runs_until_halt(c: LocalCluster) -> None:
    """A start script's ``nohup app &`` belongs to the package: it keeps running while
    the package runs (not killed when the script exits), and the halt stops it."""
    marker = f"esc-bg-{os.getpid()}"
    escaped = start_escaping(c, "script-background", marker)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # an invariant over a window, not a wait
        assert all(procfs.pid_alive(p) for p in escaped), (
            f"the background app {escaped} was killed:\n" + c.agent_log("n1")[-4000:]
        )
        time.sleep(0.05)
    assert c.package("esc")["state"] == "running"


@pytest.fixture(scope="module", params=["sqlite", "etcd"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str | None]:
    with store_backend(request.param, tmp_path_factory.mktemp) as (url, _etcd):
        yield url


@needs_cgroups
def test_agent_death_fails_over_at_once_and_never_runs_twice(
    tmp_path: Path, store: str | None
) -> None:
    """3 nodes; the package's service forks a daemon (setsid) that writes witness
    records too. The agent of its node is SIGKILLed, its host lives: the sentinel
    kills the package's cgroup (daemon included), then revokes the lease, so the next
    node takes over long before node_timeout (30 s here), and the witness log shows
    no overlap."""
    nodes = ["n1", "n2", "n3"]
    name = f"ct{os.getpid()}-{time.monotonic_ns() % 10**6}"
    with LocalCluster(tmp_path, nodes, name=name, node_timeout="30s", store=store) as c:
        log = tmp_path / "witness.log"
        c.write_package(
            'name = "web"\nnodes = ["n1", "n2", "n3"]\n' + service_toml(log, "web", detached=True)
        )
        c.start_agents()
        c.wait_nodes_up()
        c.apply()
        c.wait(lambda v: v["packages"]["web"]["node"] == "n1" and running(v, "web"))
        wait_until_sync(lambda: daemon_writes(log), 10, what="the witness's daemon writing")
        c.kill_agent("n1", signal.SIGKILL)
        c.wait(
            lambda v: running(v, "web") and v["packages"]["web"]["node"] == "n2",
            timeout=10,
            what="web running on n2 well before node_timeout",
        )
        said(tmp_path, "revoked lease")
        wait_until_sync(lambda: daemon_writes(log, "n2"), 10, what="the daemon writing on n2")
        assert_no_overlap(log)
        assert {i.node for i in incarnations(log)["web"]} == {"n1", "n2"}


def daemon_writes(log: Path, node: str = "n1") -> bool:
    """The witness's daemon on ``node`` writes: two heartbeats of one incarnation less
    than a heartbeat apart (the main process and its daemon each write one per 10 ms)."""
    beats = sorted(r.t for r in read_records(log) if r.kind == "alive" and r.node == node)
    return sum(1 for a, b in itertools.pairwise(beats) if b - a < 2_000_000) >= 5


def running(v: dict[str, object], pkg: str) -> bool:
    return v["packages"][pkg]["state"] == "running"  # type: ignore[index,no-any-return]


@needs_cgroups
def test_process_groups_only_never_revoke_early(tmp_path: Path) -> None:
    """Without cgroups (the test-only switch, as where cgroup v2 cannot be written) the
    sentinel cannot prove that nothing escaped: the lease is left to expire."""
    with LocalCluster(tmp_path, ["n1", "n2"], node_timeout="3s") as c:
        os.environ["VIGIL_TEST_DISABLE_CONTAINMENT"] = "1"
        try:
            c.write_package(
                'name = "web"\nnodes = ["n1", "n2"]\n[[service]]\nname = "s"\ncommand = ["sleep", "1000"]\n'
            )
            c.start_agents()
        finally:
            del os.environ["VIGIL_TEST_DISABLE_CONTAINMENT"]
        v = c.wait_nodes_up()
        assert {n["containment"] for n in v["nodes"].values()} == {"process-group"}
        out = c.vigil("status").stdout
        assert "process groups only" in out
        c.apply()
        c.wait(
            lambda v: v["packages"]["web"]["node"] == "n1"
            and v["packages"]["web"]["state"] == "running"
        )
        assert c.agent_log("n1").count("containment: process groups only") == 1
        t0 = time.monotonic()
        c.kill_agent("n1", signal.SIGKILL)
        c.wait(
            lambda v: v["packages"]["web"]["node"] == "n2"
            and v["packages"]["web"]["state"] == "running",
            15,
        )
        assert time.monotonic() - t0 > 1.5, "failed over before the lease could expire"
        said(tmp_path, "left to expire")


# --------------------------------------------------------------------------- cgroup module


@needs_cgroups
def test_cgroup_kill_signal_and_remove(tmp_path: Path) -> None:
    import asyncio
    import subprocess

    hierarchy = find_hierarchy()
    assert hierarchy is not None
    cg = Cgroup.at(hierarchy, hierarchy / "vigil-test" / f"unit-{os.getpid()}")
    leaf = cg.child("leaf")
    leaf.create()
    fd = leaf.open_procs()
    try:
        procs = [
            subprocess.Popen(
                ["sh", "-c", f"setsid sleep 1000 & exec {PY} -c '{IGNORE_TERM}'"],
                preexec_fn=lambda: os.write(fd, b"0"),
            )
            for _ in range(2)
        ]
    finally:
        os.close(fd)
    try:
        wait_until_sync(
            lambda: len(cg.pids()) == 4 and sum(map(ignores_term, cg.pids())) == 2,
            10,
            what="4 processes in the cgroup, 2 of them ignoring SIGTERM",
        )
        assert cg.populated() and leaf.populated()
        assert all(cg.holds(p.pid) for p in procs)
        assert not cg.holds(os.getpid())
        assert cg.signal(signal.SIGTERM) == 4  # sleep dies, the pythons ignore it
        wait_until_sync(lambda: len(cg.pids()) == 2, 5, what="the sleeps gone")
        assert not cg.remove(), "a populated cgroup must not be removable"
        cg.kill()
        assert asyncio.run(cg.wait_empty(5))
        for p in procs:
            p.wait(5)
    finally:
        cg.kill()
        cg.wait_empty_sync(5)
        assert cg.remove()
    assert not cg.path.exists()


def ignores_term(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    ignored = int(status.split("SigIgn:")[1].split()[0], 16)
    return bool(ignored & (1 << (signal.SIGTERM - 1)))


IGNORE_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(1000)"


def test_find_hierarchy_prefers_the_unified_mount(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
    )
    assert find_hierarchy(str(mounts)) == Path("/sys/fs/cgroup/unified")
    mounts.write_text("cgroup2 /srv/other cgroup2 rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n")
    assert find_hierarchy(str(mounts)) == Path("/sys/fs/cgroup")
    mounts.write_text("cgroup2 /srv/other cgroup2 rw 0 0\n")
    assert find_hierarchy(str(mounts)) == Path("/srv/other")
    mounts.write_text("proc /proc proc rw 0 0\n")
    assert find_hierarchy(str(mounts)) is None


# --------------------------------------------------------------------------- the node's lock


@needs_cgroups
def test_node_directory_cannot_be_removed_and_a_second_agent_waits(c: LocalCluster) -> None:
    """The node's cgroup directory holds the sentinel's cgroup, so an over-eager
    clean-up cannot remove it (and with it the lock); a second vigild for the same
    node, even one without cgroups, waits for the lock and touches nothing."""
    import subprocess

    marker = f"lock-{os.getpid()}"
    escaped = start_escaping(c, "setsid-child", marker)
    pkg = c.package_cgroup("n1", "esc")
    assert pkg is not None
    node_dir = pkg.path.parent.parent
    with pytest.raises(OSError):
        os.rmdir(node_dir)
    state = c.root / "state" / "n1"
    assert (state / "processes.json").exists()
    env = c.env(VIGIL_TEST_DISABLE_CONTAINMENT="1")
    second = subprocess.Popen(
        [str(Path(sys.executable).with_name("vigild")), "--node", "n1", "--config", str(c.config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert second.stdout is not None
        line = second.stdout.readline()
        assert "is locked; waiting" in line, line
        assert (state / "processes.json").exists(), "the second agent removed the state file"
        assert all(procfs.pid_alive(p) for p in escaped)
        assert c.package("esc")["state"] == "running"
    finally:
        second.kill()
        second.communicate()


@needs_cgroups
def test_a_sentinel_that_does_not_read_is_replaced(c: LocalCluster) -> None:
    """A stopped sentinel must not stop the agent (a full pipe would block it, its
    lease would expire and the package would run elsewhere while it is still here):
    the agent replaces it and goes on renewing."""
    monitors = "".join(
        f'[[monitor]]\nname = "m{i}"\ncommand = ["true"]\ninterval = "100ms"\n' for i in range(16)
    )
    c.write_package(
        f'name = "busy"\n[[service]]\nname = "s"\ncommand = ["sleep", "1000"]\n{monitors}'
    )
    c.apply()
    c.start_agents()
    c.wait_state("busy", "running")
    old = sentinel_of(c.agent_pid("n1"))
    os.kill(old, signal.SIGSTOP)
    try:
        wait_until_sync(
            lambda: "restarted the sentinel" in c.agent_log("n1"), 60, interval=0.2,
            what="the agent replacing its stopped sentinel",
        )  # fmt: skip
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGCONT)
    new = sentinel_of(c.agent_pid("n1"))
    assert new != old
    wait_until_sync(lambda: not procfs.pid_alive(old), 5, what="the old sentinel gone")
    assert c.package("busy")["state"] == "running"
    assert "FENCING" not in c.agent_log("n1")


@needs_cgroups
@pytest.mark.parametrize("die_with_parent", [True, False], ids=["pre-exec hook", "vfork + sh"])
def test_spawned_command_runs_in_its_cgroup_from_its_first_instruction(
    tmp_path: Path, die_with_parent: bool
) -> None:
    """Both ways :func:`spawn` starts a command (a pre-exec hook for services; vfork
    and ``/bin/sh`` joining the cgroup for commands run to completion) put it in its
    cgroup before it runs: the command's own first act, reading /proc/self/cgroup,
    names the cgroup, argv[0] is kept, and a missing program is one clear line."""
    from vigil.errors import SpawnError
    from vigil.supervise.spawner import spawn

    hierarchy = find_hierarchy()
    assert hierarchy is not None
    cg = Cgroup.at(hierarchy, hierarchy / "vigil-test" / f"spawn-{os.getpid()}-{die_with_parent}")
    out = tmp_path / "out"
    script = tmp_path / "first-act"
    script.write_text(f'#!/bin/sh\ncat /proc/self/cgroup > {out}\necho "$0" >> {out}\n')
    script.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    try:
        child = spawn(["first-act"], env=env, cgroup=cg, die_with_parent=die_with_parent)
        wait_until_sync(lambda: child.poll() is not None, 10, what="the command's exit")
        assert child.returncode == 0
        lines = out.read_text().splitlines()  # it has exited: the report is complete
        argv0 = lines[-1]
        assert f"0::{cg.rel}" in lines, lines  # the v2 line (hybrid hosts list v1 too)
        assert argv0 == f"{tmp_path}/first-act" or argv0 == "first-act", argv0
        with pytest.raises(SpawnError, match=r"^cannot run no-such-program: No such file"):
            spawn(["no-such-program"], env=env, cgroup=cg, die_with_parent=die_with_parent)
        script.chmod(0o644)
        with pytest.raises(SpawnError, match=r"^cannot run first-act: "):
            spawn(["first-act"], env=env, cgroup=cg, die_with_parent=die_with_parent)
    finally:
        cg.kill()
        cg.wait_empty_sync(5)
        cg.remove()
