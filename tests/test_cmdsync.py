"""cmdsync (CONCEPTS §7): resumable scripts rerun on another node when theirs dies.

Pure: reassignment, availability, markers. Real: a 3-node cluster where each node is
a PID namespace (``LocalCluster(isolate=True)``), on SQLite and on a real 3-member
etcd. The operator's script is started
*inside* node n1's namespace (``nsenter``), so that killing n1 kills it like a
machine losing power; the script records its progress (node, marker) in a file
outside the namespaces, and the tests assert on that record and on ``vigil cmdsync
list``.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vigil.cmdsync import check_marker, reassign, unavailable
from vigil.config import ClusterSpec
from vigil.errors import UsageError
from vigil.model import CmdsyncEntry
from vigil.testing.cluster import LocalCluster, _bin
from vigil.testing.etcd import store_backend

# --------------------------------------------------------------------------- pure


def entry(desc: str, node: str, created: float = 0.0, **kw: object) -> CmdsyncEntry:
    return CmdsyncEntry(descriptor=desc, script="/s", node=node, created_at=created, **kw)  # type: ignore[arg-type]


def test_reassign_moves_only_entries_of_down_nodes_to_the_least_loaded() -> None:
    entries = [
        entry("a", "n1", 1, marker=2),
        entry("b", "n1", 2),
        entry("c", "n2", 3),
        entry("d", "n3", 4),
    ]
    moved = reassign(entries, ["n2", "n3"])  # n1 is down
    assert set(moved) == {"a", "b"}
    # n2 and n3 hold one each: a (oldest) goes to n2 (cluster order), b to n3
    assert (moved["a"].node, moved["b"].node) == ("n2", "n3")
    assert moved["a"].marker == 2 and moved["a"].launch and moved["a"].reruns == 1
    assert not moved["a"].by_agent and moved["a"].pid is None


def test_reassign_with_no_node_up_does_nothing() -> None:
    assert reassign([entry("a", "n1")], []) == {}


def test_unavailable() -> None:
    two = ClusterSpec(name="c", store="sqlite:///x", nodes=["n1", "n2"])
    assert unavailable(two, ["n1"]) is None
    off = ClusterSpec(name="c", store="sqlite:///x", nodes=["n1", "n2"], failover="off")
    assert unavailable(off, ["n1", "n2"]) == 'cluster c has failover = "off"'
    one = ClusterSpec(name="c", store="sqlite:///x", nodes=["n1"])
    assert "single node" in (unavailable(one, ["n1"]) or "")
    unlisted = ClusterSpec(name="c", store="sqlite:///x")
    assert unavailable(unlisted, ["n1", "n2"]) is None
    assert "single node" in (unavailable(unlisted, ["n1"]) or "")
    assert unavailable(None, []) == "no configuration applied"


@pytest.mark.parametrize("text", ["0", "-1", "x", "1.5", "", " 2"])
def test_marker_must_be_a_positive_integer(text: str) -> None:
    with pytest.raises(UsageError, match="expected a positive integer"):
        check_marker(text)


def test_marker_ok() -> None:
    assert check_marker("2") == 2


# --------------------------------------------------------------------------- cluster

NODES = ["n1", "n2", "n3"]
NODE_TIMEOUT = 2.0
_names = itertools.count(1)
RERUN = NODE_TIMEOUT + 10.0  # lease expiry + controller tick + agent tick, on a busy box


@pytest.fixture(scope="module", params=["sqlite", "etcd"])
def store_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str | None]:
    """The three-node tests run on SQLite and on a real 3-member etcd (one for the
    module, a fresh cluster name per test)."""
    with store_backend(request.param, tmp_path_factory.mktemp) as (url, _):
        yield url


@pytest.fixture
def c(tmp_path: Path, store_url: str | None) -> Iterator[LocalCluster]:
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, check=False)  # fmt: skip
    if probe.returncode != 0 or shutil.which("nsenter") is None:
        pytest.skip("needs PID namespaces (unshare) and nsenter")
    cluster = LocalCluster(
        tmp_path,
        NODES,
        name=f"cs{os.getpid()}-{next(_names)}",
        node_timeout=f"{NODE_TIMEOUT:g}s",
        store=store_url,
        isolate=True,
    )
    try:
        cluster.start_agents()
        cluster.wait_nodes_up()
        cluster.apply()
        yield cluster
    finally:
        cluster.close()
        for n in NODES:
            assert "Traceback" not in cluster.agent_log(n), cluster.agent_log(n)


VIGIL = _bin("vigil")

# Shaped like the README's sample, writing its progress to $1 and waiting at step 3 for
# the file $2 to exist. Its own parameters come back on a rerun.
RESUMABLE = f"""\
D=$({VIGIL} cmdsync init "$0" "$@") || D=""
trap '[ -n "$D" ] && {VIGIL} cmdsync cancel "$D"' EXIT
trap 'exit 1' INT TERM HUP
M=${{VIGIL_CMDSYNC_MARKER:--1}}
echo "start $VIGIL_NODE marker=$M args=$*" >> "$1"
if [ "$M" -lt 1 ]; then
    echo "step1 $VIGIL_NODE" >> "$1"
    {VIGIL} cmdsync save -M 1 "$D"
fi
if [ "$M" -lt 2 ]; then
    echo "step2 $VIGIL_NODE" >> "$1"
    {VIGIL} cmdsync save -M 2 "$D"
fi
echo "step3 $VIGIL_NODE" >> "$1"
while [ ! -e "$2" ]; do sleep 0.05; done
echo "done $VIGIL_NODE" >> "$1"
"""

# Registers, saves, cancels, then keeps running: it must never be rerun.
CANCELLED = f"""\
D=$({VIGIL} cmdsync init "$0" "$@")
{VIGIL} cmdsync save -M 1 "$D"
echo "cancelled $VIGIL_NODE $D" >> "$1"
{VIGIL} cmdsync cancel "$D"
echo "start $VIGIL_NODE" >> "$1"
while [ ! -e "$2" ]; do sleep 0.05; done
"""

# For `vigil cmdsync run`: starts over on a rerun.
RESTARTS = """\
echo "start $VIGIL_NODE desc=$VIGIL_CMDSYNC_DESCRIPTOR marker=${VIGIL_CMDSYNC_MARKER:-none}" \
>> "$1"
while [ ! -e "$2" ]; do sleep 0.05; done
echo "done $VIGIL_NODE" >> "$1"
"""


def on_node(c: LocalCluster, node: str, *argv: str) -> subprocess.Popen[bytes]:
    """Run ``argv`` inside ``node``'s PID and mount namespaces, as an operator on that
    machine would (VIGIL_NODE tells vigil which node it is on)."""
    init = c.agent_pid(node)
    out = (c.logs / f"script-{node}.log").open("ab")
    try:
        return subprocess.Popen(
            ["nsenter", "--target", str(init), "--pid", "--mount", *argv],
            env=c.env(VIGIL_NODE=node),
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        out.close()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def wait_line(c: LocalCluster, path: Path, pred: str, timeout: float = 20) -> str:
    """The first line of ``path`` starting with ``pred``, waiting for it."""
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in lines(path) if line.startswith(pred)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no line {pred!r} in {path} after {timeout}s: {lines(path)}")
        time.sleep(0.02)


def entries(c: LocalCluster) -> list[dict[str, object]]:
    out: list[dict[str, object]] = json.loads(c.vigil("cmdsync", "list", "--json").stdout)
    return out


def wait_entries(
    c: LocalCluster, pred: object, timeout: float, what: str
) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while True:
        found = entries(c)
        if pred(found):  # type: ignore[operator]
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s; cmdsync list: {found}")
        time.sleep(0.1)


@pytest.mark.slow
def test_script_resumes_from_marker_2_on_another_node_and_cancelled_is_not_rerun(
    c: LocalCluster,
) -> None:
    resumable = c.write_script("resumable.sh", RESUMABLE)
    cancelled = c.write_script("cancelled.sh", CANCELLED)
    rec, go = c.root / "resumable.rec", c.root / "go"
    crec = c.root / "cancelled.rec"
    procs = [
        on_node(c, "n1", str(resumable), str(rec), str(go), "extra arg"),
        on_node(c, "n1", str(cancelled), str(crec), str(go)),
    ]
    wait_line(c, rec, "step3 n1")
    wait_line(c, crec, "start n1")
    (found,) = entries(c)  # the cancelled one is gone already
    assert (found["node"], found["marker"], found["mode"]) == ("n1", 2, "init")
    assert found["params"] == [str(rec), str(go), "extra arg"]
    listed = c.vigil("cmdsync", "list", COLUMNS="300").stdout
    assert found["descriptor"] in listed and "resumable.sh" in listed

    t0 = time.monotonic()
    c.kill_node("n1")  # the scripts die with the node
    assert [p.wait(timeout=10) for p in procs] == [-9, -9]  # nsenter: its child was killed
    resumed = wait_rerun(rec, RERUN)
    took = time.monotonic() - t0
    print(f"\nrerun started {took:.1f}s after n1 died: {resumed}")
    node = resumed.split()[1]
    assert node in ("n2", "n3")
    assert resumed == f"start {node} marker=2 args={rec} {go} extra arg"
    (moved,) = entries(c)
    assert (moved["descriptor"], moved["node"], moved["reruns"]) == (
        found["descriptor"],
        node,
        1,
    )
    (c.root / "go").touch()
    wait_line(c, rec, f"done {node}")
    wait_entries(c, lambda e: e == [], 20, "entry cancelled by the rerun's trap")
    # resumed at step 3: steps 1 and 2 ran once, on n1 only
    assert [line for line in lines(rec) if line.startswith("step")] == [
        "step1 n1",
        "step2 n1",
        "step3 n1",
        f"step3 {node}",
    ]
    # the cancelled script was never rerun anywhere
    assert [line.split()[1] for line in lines(crec) if line.startswith("start")] == ["n1"]
    cancelled_desc = lines(crec)[0].split()[2]
    assert f"cmdsync {found['descriptor']}: rerunning {resumable} from marker 2" in (
        c.agent_log(node)
    )
    for n in ("n2", "n3"):
        assert cancelled_desc not in c.agent_log(n)


def wait_rerun(rec: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        found = [ln for ln in lines(rec) if ln.startswith("start ") and " n1 " not in ln]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no rerun after {timeout}s: {lines(rec)}")
        time.sleep(0.02)


@pytest.mark.slow
def test_cmdsync_run_script_is_rerun_from_the_start(c: LocalCluster) -> None:
    script = c.write_script("restarts.sh", RESTARTS)
    rec, go = c.root / "run.rec", c.root / "go"
    proc = on_node(c, "n1", VIGIL, "cmdsync", "run", str(script), str(rec), str(go))
    first = wait_line(c, rec, "start n1")
    (found,) = entries(c)
    assert (found["node"], found["mode"], found["marker"]) == ("n1", "run", -1)
    assert first == f"start n1 desc={found['descriptor']} marker=none"
    c.kill_node("n1")
    proc.wait(timeout=10)
    rerun = wait_rerun(rec, RERUN)
    node = rerun.split()[1]
    assert rerun == f"start {node} desc={found['descriptor']} marker=none"
    go.touch()
    wait_line(c, rec, f"done {node}")
    # the agent that ran it removes the entry when it ends
    wait_entries(c, lambda e: e == [], 20, "entry removed after the rerun ended")
    assert "entry removed (its script ended)" in c.agent_log(node)


@pytest.mark.slow
def test_run_removes_its_entry_and_passes_the_exit_status(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path, ["n1", "n2"])
    try:
        c.start_agents()
        c.wait_nodes_up()
        c.apply()
        script = c.write_script("list.sh", f'{VIGIL} cmdsync list --json > "$1"\nexit 3\n')
        out = c.vigil("cmdsync", "run", str(script), str(c.root / "seen"), check=False,
                      VIGIL_NODE="n2")  # fmt: skip
        assert out.returncode == 3, out.stderr
        (seen,) = json.loads((c.root / "seen").read_text())
        assert (seen["node"], seen["mode"], seen["script"]) == ("n2", "run", str(script))
        assert entries(c) == []
        # usage errors
        bad = c.vigil("cmdsync", "save", "-M", "0", "x", check=False, VIGIL_NODE="n1")
        assert bad.returncode == 2
        assert "cmdsync save: -M: expected a positive integer, got '0'" in bad.stderr
        missing = c.vigil("cmdsync", "save", "-M", "1", "nope", check=False, VIGIL_NODE="n1")
        assert missing.returncode == 3
        assert "no such descriptor 'nope'" in missing.stderr
        gone = c.vigil("cmdsync", "cancel", "nope", check=False, VIGIL_NODE="n1")
        assert gone.returncode == 3
        stranger = c.vigil("cmdsync", "init", str(script), check=False, VIGIL_NODE="elsewhere")
        assert stranger.returncode == 6
        assert "this command's node elsewhere is not up" in stranger.stderr
    finally:
        c.close()


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["single node", "failover off"])
def test_without_failover_commands_fail_and_the_script_goes_on(tmp_path: Path, setup: str) -> None:
    if setup == "single node":
        c = LocalCluster(tmp_path, ["n1"])
    else:
        c = LocalCluster(tmp_path, ["n1", "n2"], extra_cluster='failover = "off"\n')
    try:
        c.start_agents()
        c.wait_nodes_up()
        c.apply()
        rec = c.root / "rec"
        script = c.write_script(
            "s.sh",
            f"""\
            D=$({VIGIL} cmdsync init "$0" "$@"); echo "init $?" >> "$1"
            {VIGIL} cmdsync save -M 1 "$D"; echo "save $?" >> "$1"
            {VIGIL} cmdsync cancel "$D"; echo "cancel $?" >> "$1"
            echo done >> "$1"
            """,
        )
        proc = subprocess.run(
            [str(script), str(rec)], env=c.env(VIGIL_NODE="n1"), capture_output=True, text=True
        )
        assert proc.returncode == 0
        assert lines(rec) == ["init 6", "save 6", "cancel 6", "done"]
        why = "single node" if setup == "single node" else 'failover = "off"'
        errors = proc.stderr.splitlines()
        assert len(errors) == 3 and all(why in e and e.startswith("vigil: error: cmdsync: ")
                                        for e in errors), errors  # fmt: skip
        assert entries(c) == []
        # run: says so, runs the script unprotected, exits with its status
        out = c.vigil("cmdsync", "run", str(script), str(c.root / "rec2"), check=False,
                      VIGIL_NODE="n1")  # fmt: skip
        assert out.returncode == 0
        first = out.stderr.splitlines()[0]
        assert first.startswith("vigil: error: cmdsync: ") and why in first
        assert first.endswith(f"; the script is not protected; running {script} anyway")
        assert lines(c.root / "rec2")[-1] == "done"
    finally:
        c.close()


@pytest.mark.slow
def test_agent_reruns_its_own_scripts_when_it_joins_again(tmp_path: Path) -> None:
    """A script the agent of n2 reran dies with n2; with no other node up it stays
    n2's, and n2's next agent runs it again (on_join) from the same marker."""
    c = LocalCluster(tmp_path, ["n1", "n2"], node_timeout=f"{NODE_TIMEOUT:g}s", isolate=True)
    try:
        c.start_agents()
        c.wait_nodes_up()
        c.apply()
        script = c.write_script("resumable.sh", RESUMABLE)
        rec, go = c.root / "rec", c.root / "go"
        proc = on_node(c, "n1", str(script), str(rec), str(go))
        wait_line(c, rec, "step3 n1")
        c.kill_node("n1")
        proc.wait(timeout=10)
        assert wait_rerun(rec, RERUN) == f"start n2 marker=2 args={rec} {go}"
        wait_entries(c, lambda e: e and e[0]["by_agent"], 10, "rerun marked by_agent")
        c.kill_node("n2")  # nowhere to go: the entry stays on n2
        c.start_agent("n2")
        c.wait_nodes_up(["n2"])
        deadline = time.monotonic() + RERUN
        while lines(rec).count(f"start n2 marker=2 args={rec} {go}") < 2:
            assert time.monotonic() < deadline, lines(rec)
            time.sleep(0.05)
        (e,) = entries(c)
        assert (e["node"], e["reruns"], e["marker"]) == ("n2", 2, 2)
        assert "died with this node's previous agent; rerun" in c.agent_log("n2")
        go.touch()
        wait_line(c, rec, "done n2")
        wait_entries(c, lambda e: e == [], 20, "entry cancelled by the rerun's trap")
    finally:
        c.close()
        for n in c.nodes:
            assert "Traceback" not in c.agent_log(n), c.agent_log(n)
