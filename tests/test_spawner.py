"""The spawner on real processes: sessions, groups, pidfd waits, terminate -> kill."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from vigil.errors import SpawnError
from vigil.supervise import procfs
from vigil.supervise.spawner import Child, describe_exit, spawn
from vigil.testing import wait_until, wait_until_sync

ENV = dict(os.environ)
IGNORE_TERM_WITH_GRANDCHILD = 'trap "" TERM; sleep 1000 & echo $! > "$GC"; wait'


class Spawned:
    """Spawns through the spawner and kills every group at teardown."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def __call__(self, argv: Sequence[str], **kw: object) -> Child:
        kw.setdefault("env", ENV)
        child = spawn(argv, **kw)  # type: ignore[arg-type]
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in self.children:
            assert child.kill_group_now(), f"{child} survived SIGKILL"


@pytest.fixture
def spawned() -> Iterator[Spawned]:
    s = Spawned()
    try:
        yield s
    finally:
        s.close()


def read_pid(path: Path) -> int:
    wait_until_sync(lambda: path.exists() and path.read_text().strip() != "", 5, what=str(path))
    return int(path.read_text())


def test_exit_status_and_signal(spawned: Spawned) -> None:
    async def scenario() -> None:
        assert await spawned(["sh", "-c", "exit 3"]).wait() == 3
        sleeper = spawned(["sleep", "1000"])
        sleeper.signal_group(signal.SIGKILL)
        assert await sleeper.wait() == -signal.SIGKILL
        assert await sleeper.wait() == -signal.SIGKILL  # again: cached

    asyncio.run(scenario())


def test_own_session_group_and_stdin(spawned: Spawned) -> None:
    child = spawned(["sleep", "1000"])
    st = procfs.read_stat(child.pid)
    assert st is not None
    assert st.pgrp == child.pid == child.pgid
    assert st.session == child.pid
    assert st.start_time == child.start_time
    assert os.readlink(f"/proc/{child.pid}/fd/0") == "/dev/null"
    assert child.group_alive()


def test_output_appended_to_log_env_and_cwd(spawned: Spawned, tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    log.write_text("before\n")
    script = 'echo "out $FOO $(pwd)"; echo err >&2'

    async def scenario() -> None:
        for _ in range(2):
            child = spawned(
                ["sh", "-c", script], env={**ENV, "FOO": "bar"}, cwd=tmp_path, log_path=log
            )
            assert await child.wait() == 0

    asyncio.run(scenario())
    line = f"out bar {tmp_path}"
    assert log.read_text() == f"before\n{line}\nerr\n{line}\nerr\n"


def test_no_descriptor_inherited(spawned: Spawned, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    os.set_inheritable(fd, True)
    log = tmp_path / "log"
    try:
        child = spawned(
            ["sh", "-c", f"test -e /proc/self/fd/{fd} && echo leaked || echo closed"],
            log_path=log,
        )
        assert asyncio.run(child.wait()) == 0
    finally:
        os.close(fd)
    assert log.read_text() == "closed\n"


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (lambda d: str(d / "missing"), "No such file or directory"),
        (lambda d: str(d / "plain.txt"), "Permission denied"),
        (lambda d: "no-such-program-xyz", "No such file or directory"),
    ],
)
def test_unrunnable_program(tmp_path: Path, make: object, expect: str) -> None:
    (tmp_path / "plain.txt").write_text("not a program\n")
    program = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(SpawnError) as err:
        spawn([program], env=ENV)
    msg = str(err.value)
    assert program in msg and expect in msg
    assert "\n" not in msg


def test_bad_cwd_user_group_and_command(tmp_path: Path) -> None:
    with pytest.raises(SpawnError, match="working directory .*/nowhere"):
        spawn(["true"], env=ENV, cwd=tmp_path / "nowhere")
    with pytest.raises(SpawnError, match="'no-such-user-xyz'"):
        spawn(["true"], env=ENV, user="no-such-user-xyz")
    with pytest.raises(SpawnError, match="unknown group 'no-such-group-xyz'"):
        spawn(["true"], env=ENV, group="no-such-group-xyz")
    with pytest.raises(SpawnError, match="empty command"):
        spawn([], env=ENV)


def test_a_log_never_stops_a_process(tmp_path: Path) -> None:
    """A removed log directory is made again; a log that cannot be opened at all (here a
    directory) sends the output to /dev/null: the process runs either way."""

    async def scenario() -> None:
        log = tmp_path / "gone" / "dir" / "pkg.log"
        assert await spawn(["sh", "-c", "echo hello"], env=ENV, log_path=log).wait() == 0
        assert log.read_text() == "hello\n"
        blocked = tmp_path / "a-directory"
        blocked.mkdir()
        assert await spawn(["sh", "-c", "echo lost"], env=ENV, log_path=blocked).wait() == 0

    asyncio.run(scenario())


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_runs_as_user(spawned: Spawned, tmp_path: Path) -> None:
    log = tmp_path / "id.log"
    child = spawned(["id", "-u"], user="nobody", log_path=log)
    assert asyncio.run(child.wait()) == 0
    assert log.read_text().strip() == str(pwd.getpwnam("nobody").pw_uid)


def test_wait_survives_cancellation(spawned: Spawned) -> None:
    async def scenario() -> None:
        child = spawned(["sleep", "1000"])
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(child.wait(), 0.01)
        waiters = [asyncio.ensure_future(child.wait()) for _ in range(3)]
        child.signal_group(signal.SIGTERM)
        assert await asyncio.gather(*waiters) == [-signal.SIGTERM] * 3

    asyncio.run(scenario())


def test_terminate_group_polite_process_is_quick(spawned: Spawned) -> None:
    async def scenario() -> None:
        child = spawned(["sleep", "1000"])
        t0 = time.monotonic()
        assert await child.terminate_group(10.0)
        assert time.monotonic() - t0 < 2.0
        assert child.returncode == -signal.SIGTERM
        assert not child.group_alive()
        assert await child.terminate_group(10.0)  # already gone: fine

    asyncio.run(scenario())


def test_terminate_group_kills_term_ignoring_group(spawned: Spawned, tmp_path: Path) -> None:
    gc_file = tmp_path / "gc"

    async def scenario() -> None:
        child = spawned(["sh", "-c", IGNORE_TERM_WITH_GRANDCHILD], env={**ENV, "GC": str(gc_file)})
        await wait_until(lambda: gc_file.exists() and gc_file.read_text().strip() != "", 5)
        grandchild = int(gc_file.read_text())
        assert procfs.read_stat(grandchild) is not None
        assert procfs.group_members(child.pgid) == sorted([child.pid, grandchild])
        t0 = time.monotonic()
        assert await child.terminate_group(0.3)
        elapsed = time.monotonic() - t0
        assert 0.3 <= elapsed < 3.0
        assert child.returncode == -signal.SIGKILL
        assert not procfs.pid_alive(grandchild)
        assert procfs.group_members(child.pgid) == []

    asyncio.run(scenario())


def test_group_outlives_its_leader(spawned: Spawned, tmp_path: Path) -> None:
    gc_file = tmp_path / "gc"

    async def scenario() -> None:
        child = spawned(
            ["sh", "-c", 'sleep 1000 & echo $! > "$GC"'], env={**ENV, "GC": str(gc_file)}
        )
        assert await child.wait() == 0
        grandchild = read_pid(gc_file)
        assert child.group_alive()  # the orphan is still in the group
        assert await child.terminate_group(5.0)
        assert not procfs.pid_alive(grandchild)
        assert not child.group_alive()

    asyncio.run(scenario())


def test_leader_dies_with_its_parent(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: the leader is SIGKILLed when the process that spawned it dies."""
    code = (
        "import os, sys, time\n"
        "from vigil.supervise.spawner import spawn\n"
        "c = spawn(['sleep', '1000'], env=os.environ)\n"
        "print(c.pid, flush=True)\n"
        "time.sleep(1000)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    leader = 0
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line, parent.stderr.read() if parent.stderr else ""
        leader = int(line)
        assert procfs.pid_alive(leader)
        parent.kill()
        parent.wait(5)
        wait_until_sync(lambda: not procfs.pid_alive(leader), 5, what="leader died")
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait(5)
        for stream in (parent.stdout, parent.stderr):
            if stream is not None:
                stream.close()
        if leader and procfs.pid_alive(leader):
            os.kill(leader, signal.SIGKILL)


def test_describe_exit() -> None:
    assert describe_exit(0) == "exited with status 0"
    assert describe_exit(2) == "exited with status 2"
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(None) == "is still running"


def test_parse_stat_with_odd_command_name() -> None:
    line = "42 (a (b) c) S 1 42 42 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 12345 0 0"
    st = procfs.parse_stat(42, line)
    assert st is not None
    assert (st.state, st.ppid, st.pgrp, st.session, st.start_time) == ("S", 1, 42, 42, 12345)
    assert procfs.parse_stat(1, "garbage") is None
