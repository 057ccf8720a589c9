"""Flags, ``!nofailover!``, the admin lock and cluster hooks on a real cluster.

Real ``vigild`` agents on a real SQLite store, each node a PID namespace where a
test needs a hard node loss (``isolate=True``), the real ``vigil`` CLI, and shell
scripts that hold locks and record hook runs in files. CONCEPTS §5 and §6.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vigil.config import HOOK_PHASES
from vigil.testing import wait_until_sync
from vigil.testing.cluster import LocalCluster, _bin
from vigil.testing.etcd import store_backend

pytestmark = pytest.mark.slow

NODES = ["n1", "n2", "n3"]
_names = itertools.count(1)


@pytest.fixture(scope="module", params=["sqlite", "etcd"])
def store_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str | None]:
    """None: each cluster's own SQLite file; else a real 3-member etcd for the module."""
    with store_backend(request.param, tmp_path_factory.mktemp) as (url, _):
        yield url


@pytest.fixture
def c(tmp_path: Path, store_url: str | None) -> Iterator[LocalCluster]:
    name = f"fl{os.getpid()}-{next(_names)}"  # fresh keys in the shared etcd
    cluster = LocalCluster(
        tmp_path, NODES, name=name, node_timeout="2s", isolate=True, store=store_url
    )
    try:
        yield cluster
    finally:
        cluster.close()
        for n in NODES:
            assert "Traceback" not in cluster.agent_log(n), cluster.agent_log(n)


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[LocalCluster]:
    """Nodes sharing the host's PID namespace: an agent sees every local process."""
    cluster = LocalCluster(tmp_path, ["n1", "n2"], node_timeout="2s")
    try:
        yield cluster
    finally:
        cluster.close()


def flags_on(c: LocalCluster, node: str) -> dict[str, object]:
    out = c.vigil("flag", "list", "-d", node, "--json").stdout
    return json.loads(out).get(node, {})  # type: ignore[no-any-return]


def sleeper_package(c: LocalCluster, name: str, nodes: list[str]) -> None:
    node_list = ", ".join(f'"{n}"' for n in nodes)
    c.write_package(
        f'name = "{name}"\nnodes = [{node_list}]\n'
        f'[[service]]\nname = "s"\ncommand = ["sleep", "1000"]\n'
    )


# --------------------------------------------------------------------------- flags


def test_flag_commands_and_persistence(c: LocalCluster) -> None:
    c.apply()
    c.start_agents()
    c.wait_nodes_up()
    # created from n1, living on n2
    out = c.vigil("--node", "n1", "flag", "create", "-d", "n2", "-f", "backup_in_progress")
    assert out.stdout.strip() == "flag backup_in_progress created on n2"
    again = c.vigil("--node", "n1", "flag", "create", "-d", "n2", "-f", "backup_in_progress")
    assert "already set on n2" in again.stdout
    assert c.vigil("--node", "n2", "flag", "test", "-f", "backup_in_progress").returncode == 0
    assert (
        c.vigil("--node", "n1", "flag", "test", "-f", "backup_in_progress", check=False).returncode
        == 1
    )
    assert "backup_in_progress" in flags_on(c, "n2")
    assert c.view()["nodes"]["n2"]["flags"] == ["backup_in_progress"]
    assert "backup_in_progress" in c.vigil("status").stdout

    for n in NODES:  # every agent restarts: flags live in the store, not in agents
        c.stop_agent(n)
    c.start_agents()
    c.wait_nodes_up()
    assert c.vigil("--node", "n2", "flag", "test", "-f", "backup_in_progress").returncode == 0

    c.vigil("flag", "remove", "-d", "n2", "-f", "backup_in_progress")
    assert flags_on(c, "n2") == {}
    gone = c.vigil("flag", "remove", "-d", "n2", "-f", "backup_in_progress", check=False)
    assert gone.returncode == 3 and "no flag backup_in_progress on node n2" in gone.stderr


@pytest.mark.parametrize(
    ("flag", "why"),
    [("two words", "' '"), ("a/b", "'/'"), ("bell\x07", "'\\x07'"), ("x" * 201, "longer than 200")],
)
def test_bad_flag_names_are_refused(plain: LocalCluster, flag: str, why: str) -> None:
    plain.apply()
    res = plain.vigil("--node", "n1", "flag", "create", "-f", flag, check=False)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and why in res.stderr, res.stderr
    assert flags_on(plain, "n1") == {}
    unknown = plain.vigil("flag", "create", "-d", "n9", "-f", "ok", check=False)
    assert unknown.returncode == 3 and "unknown node 'n9'" in unknown.stderr


def test_nofailover_flag_skips_the_flagged_node_until_its_node_returns(c: LocalCluster) -> None:
    sleeper_package(c, "web", ["n1", "n2", "n3"])
    c.apply()
    c.start_agents()
    c.wait_state("web", "running")
    assert c.package("web")["node"] == "n1"
    c.vigil("--node", "n3", "flag", "create", "-d", "n2", "-f", "!nofailover!n1")
    # what-if first: the simulation names the flag as the reason
    sim = c.vigil("simulate", "--node-fails", "n1").stdout
    assert "start web on n3: failover (skipped n2: flag !nofailover!n1)" in sim, sim

    c.kill_node("n1")
    view = c.wait(lambda v: v["packages"]["web"]["state"] == "running"
                  and v["packages"]["web"]["node"] != "n1", timeout=20)  # fmt: skip
    assert view["packages"]["web"]["node"] == "n3", view["packages"]["web"]
    assert "!nofailover!n1" in flags_on(c, "n2")  # n1 is still down

    c.start_agent("n1")
    wait_until_sync(lambda: "!nofailover!n1" not in flags_on(c, "n2"), timeout=20,
                    what="!nofailover!n1 removed once n1 is up")  # fmt: skip
    assert c.view()["nodes"]["n1"]["state"] == "up"


# --------------------------------------------------------------------------- admin lock


def lock_script(c: LocalCluster, name: str, out: Path, then: str = "sleep 1000") -> Path:
    """A script that takes the admin lock, notes it in ``out``, then ``then``."""
    return c.write_script(
        name,
        f'vigil lock acquire {name} || exit 1\necho "$NAME" >> {out}\n{then}\n',
    )


def start(c: LocalCluster, script: Path, node: str, name: str) -> subprocess.Popen[bytes]:
    env = c.env(
        VIGIL_NODE=node, NAME=name, PATH=f"{Path(_bin('vigil')).parent}:{os.environ['PATH']}"
    )
    return subprocess.Popen([str(script)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def lock_list(c: LocalCluster) -> list[dict[str, object]]:
    return json.loads(c.vigil("lock", "list", "--json").stdout)  # type: ignore[no-any-return]


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@contextlib.contextmanager
def killing(*procs: subprocess.Popen[bytes] | list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """Kill (process group) and reap the given processes, or the ones in a list that
    may still grow, when the block ends."""
    try:
        yield
    finally:
        for p in [q for item in procs for q in (item if isinstance(item, list) else [item])]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_lock_fifo_and_holder_killed(plain: LocalCluster, tmp_path: Path) -> None:
    plain.apply()
    plain.start_agents()
    plain.wait_nodes_up()
    order = tmp_path / "order"
    holder = start(plain, lock_script(plain, "holder", order), "n1", "holder")
    procs = [holder]
    with killing(procs):
        wait_until_sync(lambda: lines(order) == ["holder"], timeout=20, what="holder has the lock")
        held = lock_list(plain)
        assert held[0]["role"] == "holder" and held[0]["pid"] == holder.pid
        assert f"!action!{holder.pid:05d}!" in json.dumps(json.loads(
            plain.vigil("flag", "list", "--json").stdout).get("n1", {}))  # fmt: skip
        for i, name in enumerate(["w1", "w2", "w3"]):  # three waiters, queued in this order
            script = lock_script(plain, name, order, then="vigil lock release")
            procs.append(start(plain, script, "n2", name))
            wait_until_sync(lambda i=i: len(lock_list(plain)) == i + 2, timeout=20,
                            what=f"{name} waiting")  # fmt: skip
        assert [e["role"] for e in lock_list(plain)] == ["holder", "waiting", "waiting", "waiting"]
        os.killpg(holder.pid, signal.SIGKILL)  # the holder dies: its node's agent releases
        wait_until_sync(lambda: len(lines(order)) == 4, timeout=20, what="every waiter had it")
        assert lines(order) == ["holder", "w1", "w2", "w3"]
        wait_until_sync(lambda: lock_list(plain) == [], timeout=10, what="lock free")


def test_lock_released_when_its_node_dies(c: LocalCluster, tmp_path: Path) -> None:
    c.apply()
    c.start_agents()
    c.wait_nodes_up()
    order = tmp_path / "order"
    holder = start(c, lock_script(c, "holder", order), "n1", "holder")
    with killing(holder):
        wait_until_sync(lambda: lines(order) == ["holder"], timeout=20, what="holder has it")
        waiter = start(
            c, lock_script(c, "waiter", order, then="vigil lock release"), "n2", "waiter"
        )
        with killing(waiter):
            wait_until_sync(lambda: len(lock_list(c)) == 2, timeout=20, what="waiter queued")
            c.kill_node("n1")  # the holder's process lives on, but its node is gone
            wait_until_sync(lambda: lines(order) == ["holder", "waiter"], timeout=20,
                            what="the waiter got the lock after n1 died")  # fmt: skip
            assert waiter.wait(timeout=20) == 0


def test_lock_timeout_and_release_errors(plain: LocalCluster, tmp_path: Path) -> None:
    plain.apply()
    order = tmp_path / "order"
    holder = start(plain, lock_script(plain, "holder", order), "n1", "holder")
    with killing(holder):
        wait_until_sync(lambda: lines(order) == ["holder"], timeout=20, what="holder has it")
        t0 = time.monotonic()
        res = plain.vigil("--node", "n2", "lock", "acquire", "other", "--timeout", "1", check=False)
        assert res.returncode == 5 and "still held by !action!" in res.stderr, res.stderr
        assert time.monotonic() - t0 < 10
        assert len(lock_list(plain)) == 1  # the timed-out waiter left the line
        res = plain.vigil("--node", "n2", "lock", "release", check=False)
        assert res.returncode == 3 and "no admin lock entry" in res.stderr
        bad = plain.vigil("lock", "acquire", "has space", check=False)
        assert bad.returncode == 2 and "lock id" in bad.stderr


def test_apply_waits_for_the_admin_lock(plain: LocalCluster, tmp_path: Path) -> None:
    plain.apply()
    order = tmp_path / "order"
    go = tmp_path / "go"
    then = f"while [ ! -e {go} ]; do sleep 0.05; done\nvigil lock release"
    holder = start(plain, lock_script(plain, "holder", order, then=then), "n1", "holder")
    with killing(holder):
        wait_until_sync(lambda: lines(order) == ["holder"], timeout=20, what="holder has it")
        sleeper_package(plain, "web", ["n1", "n2"])
        env = plain.env()
        apply = subprocess.Popen([_bin("vigil"), "--node", "n2", "apply"], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        wait_until_sync(lambda: [e["id"] for e in lock_list(plain)] == ["holder", "apply"],
                        timeout=20, what="apply waits in line")  # fmt: skip
        assert apply.poll() is None
        assert "web" not in plain.view()["packages"]  # nothing applied while it waits
        go.touch()  # the holder releases the lock
        out, err = apply.communicate(timeout=30)
        assert holder.wait(timeout=10) == 0
        assert apply.returncode == 0, err
        assert "package web: added" in out
        assert "web" in plain.view()["packages"]


# --------------------------------------------------------------------------- hooks


HOOK = """\
echo "$1 ${VIGIL_PACKAGE:-none} $VIGIL_NODE" >> {log}
"""


def hooked(c: LocalCluster, log: Path, tmp_path: Path) -> None:
    """Hooks that record each run; a package whose first start hangs until released."""
    for phase in HOOK_PHASES:
        c.write_script(f"{phase}.sh", HOOK.replace("{log}", str(log)))
    with (c.config / "cluster.toml").open("a") as f:
        f.write("[hooks]\n" + "".join(f'{p} = ["scripts/{p}.sh"]\n' for p in HOOK_PHASES))
    gate = tmp_path / "first-start-done"
    c.write_script(
        "slow.sh",
        f'[ "$1" = start ] || exit 0\n[ -e {gate} ] && exit 0\ntouch {gate}\nexec sleep 1000\n',
    )
    c.write_package(
        'name = "web"\nnodes = ["n1"]\nrun_script_timeout = "none"\n'
        'external_script = [{ path = "scripts/slow.sh" }]\n'
        '[[service]]\nname = "s"\ncommand = ["sleep", "1000"]\n'
    )


def test_agent_killed_between_pre_and_post_hook_runs_post_once(
    tmp_path: Path,
) -> None:
    log = tmp_path / "hooks.log"
    with LocalCluster(tmp_path, ["n1"], node_timeout="2s") as c:
        hooked(c, log, tmp_path)
        c.apply()
        c.start_agent("n1")
        wait_until_sync(lambda: lines(log)[:3] == ["pre_restore", "web", "n1"], timeout=20,
                        what="pre_restore ran")  # fmt: skip
        wait_until_sync(lambda: "!restore" in flags_on(c, "n1"), timeout=10, what="!restore set")
        c.kill_agent("n1")  # SIGKILL while the start hangs: post_restore is owed
        assert "!restore" in flags_on(c, "n1")
        c.start_agent("n1")
        c.wait_state("web", "running", timeout=30)  # the second start does not hang
        wait_until_sync(lambda: "!restore" not in flags_on(c, "n1"), timeout=20,
                        what="!restore cleared")  # fmt: skip
        runs = log.read_text().splitlines()
        assert runs.count("post_restore none n1") == 1, runs  # the owed one, exactly once
        assert runs == [
            "pre_restore web n1",
            "post_restore none n1",  # owed after the crash, run on joining
            "pre_restore web n1",
            "post_restore web n1",
        ], runs

        c.vigil("package", "halt", "web", "--wait")
        assert log.read_text().splitlines()[-2:] == ["pre_remove web n1", "post_remove web n1"]
        assert "!remove" not in flags_on(c, "n1")

        # removing the package from the configuration runs the delete hooks
        (c.config / "packages" / "web.toml").unlink()
        out = c.apply().stdout
        assert "package web: removed" in out
        assert log.read_text().splitlines()[-2:] == ["pre_delete web n1", "post_delete web n1"]
        assert flags_on(c, "n1") == {}


def test_recover_inside_admin_lock_does_not_deadlock(plain: LocalCluster, tmp_path: Path) -> None:
    log = tmp_path / "hooks.log"
    hooked(plain, log, tmp_path)
    plain.apply()
    plain.vigil("--node", "n1", "flag", "create", "-f", "!restore")
    plain.vigil("--node", "n2", "flag", "create", "-f", "!restore!n1")
    done = tmp_path / "done"
    script = plain.write_script(
        "maint.sh",
        f"vigil lock acquire maintenance\nvigil recover restore > {done}.out 2>&1\n"
        f"echo $? > {done}\nvigil lock release\n",
    )
    proc = start(plain, script, "n1", "maint")
    with killing(proc):
        assert proc.wait(timeout=30) == 0
    assert done.read_text().strip() == "0", (tmp_path / "done.out").read_text()
    assert log.read_text().splitlines() == ["post_restore none n1"]
    assert flags_on(plain, "n1") == {} and flags_on(plain, "n2") == {}
    assert lock_list(plain) == []
