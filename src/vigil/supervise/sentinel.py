"""No service process outlives the agent, even an agent killed with SIGKILL.

Three layers, from fastest to last resort:

1. every leader is spawned with ``PR_SET_PDEATHSIG = SIGKILL`` (see ``spawner``);
2. the **sentinel**, a small process in its own session started with
   ``python -m vigil.supervise.sentinel``, reads ``+PGID START`` / ``-PGID`` lines from a
   pipe whose only writer is the agent. When the pipe reaches EOF (the agent exited
   or died) it SIGKILLs the node's package cgroups (``cgroup.kill`` on the node's
   subtree, see :mod:`vigil.supervise.containment`) and every process group it still
   knows. Once the cgroups are empty it removes the node's addresses and **revokes
   the agent's lease** (``L LEASE URL`` lines tell it which), so that another node
   takes the packages over at once instead of waiting ``node_timeout``; it never
   does so while a process of a package is alive, nor without cgroups (process
   groups cannot prove that nothing escaped);
3. the **state file** (JSON, replaced atomically) records the live groups with their
   leaders' start times; :func:`cleanup_leftovers`, run by the next agent at start,
   kills whatever is left of them (found by scanning ``/proc/*/stat`` for the group,
   so grandchildren whose leader is gone are found too), and the next agent kills
   whatever is left in the node's cgroups.

The sentinel inherits the node's lock (see ``NodeContainment``): a restarted agent
waits until the sentinel of the previous one has finished.

Relocatable addresses go the same way: ``A+IP IFACE`` / ``A-IP IFACE`` lines and
the state file's ``addresses``; whoever kills the processes also removes them
(``ip addr del``), so a fenced or dead agent's node does not keep answering for an
address that another node now holds.

The state file is not fsync'ed on purpose: processes do not survive a reboot, so it
only has to survive the agent, and the page cache does that.

:class:`ProcessRegistry` is what the agent uses: ``add(child)`` / ``remove(child)``
update both the sentinel and the state file.

This module imports only the standard library and ``procfs`` at the top: the
sentinel process runs it as ``__main__``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from vigil.supervise import procfs
from vigil.supervise.cgroup import Cgroup

if TYPE_CHECKING:
    from vigil.supervise.containment import NodeContainment
    from vigil.supervise.spawner import Child

log = logging.getLogger(__name__)

STATE_VERSION = 1
#: How long SIGKILLed processes get to disappear before the sentinel gives up on them.
KILL_WAIT = 2.0
STATE_WRITE_DELAY = 0.1
_MAX_SENTINEL_RESTARTS = 5


# --------------------------------------------------------------------------- state file


@dataclass(frozen=True)
class RecordedGroup:
    pgid: int
    start: int | None  # leader start time (field 22 of /proc/PID/stat)
    command: str = ""


@dataclass(frozen=True)
class ProcessState:
    """What a state file holds: the agent that wrote it and its live process groups."""

    agent_pid: int | None
    agent_start: int | None
    groups: tuple[RecordedGroup, ...]
    addresses: tuple[tuple[str, str], ...] = ()  # (ip/prefix, interface)


def write_state(
    state_file: Path,
    groups: Iterable[RecordedGroup],
    addresses: Iterable[tuple[str, str]] = (),
) -> None:
    """Replace ``state_file`` atomically (tmp + rename) with this agent's groups and
    relocatable addresses."""
    me = os.getpid()
    data = {
        "version": STATE_VERSION,
        "agent_pid": me,
        "agent_start": procfs.start_time(me),
        "groups": [{"pgid": g.pgid, "start": g.start, "command": g.command} for g in groups],
        "addresses": [list(a) for a in sorted(addresses)],
    }
    tmp = state_file.with_name(f".{state_file.name}.{me}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.write("\n")
    os.replace(tmp, state_file)


def read_state(state_file: Path) -> ProcessState | None:
    """The recorded state, or None if there is no file. A file vigil cannot read is
    reported in the log and treated as holding nothing."""
    try:
        with open(state_file, encoding="utf-8") as f:
            raw: Any = json.load(f)
        groups = tuple(
            RecordedGroup(
                pgid=int(g["pgid"]),
                start=None if g.get("start") is None else int(g["start"]),
                command=str(g.get("command", "")),
            )
            for g in raw["groups"]
        )
        agent_pid = raw.get("agent_pid")
        agent_start = raw.get("agent_start")
        addresses = tuple((str(ip), str(dev)) for ip, dev in raw.get("addresses", []))
        return ProcessState(
            agent_pid=None if agent_pid is None else int(agent_pid),
            agent_start=None if agent_start is None else int(agent_start),
            groups=groups,
            addresses=addresses,
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.error("%s: cannot read the process state file (%s); ignoring it", state_file, exc)
        return ProcessState(None, None, ())


def kill_groups(groups: Iterable[RecordedGroup]) -> list[int]:
    """SIGKILL every recorded group that still has live processes; return their pgids.

    Groups whose number was reused (a leader PID with another start time) and this
    process's own group are left alone.
    """
    wanted = {g.pgid: g for g in groups if g.pgid > 1 and g.pgid != os.getpgrp()}
    if not wanted:
        return []
    live: set[int] = {st.pgrp for st in procfs.iter_stats() if st.pgrp in wanted and not st.dead}
    killed = []
    for pgid in sorted(live):
        if not procfs.leader_matches(pgid, wanted[pgid].start):
            continue
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        except PermissionError as exc:
            log.error("cannot kill process group %d: %s", pgid, exc.strerror)
            continue
        killed.append(pgid)
    return killed


def del_addresses(addresses: Iterable[tuple[str, str]]) -> list[str]:
    """``ip addr del`` each (ip, interface); the ones that were there and are gone now."""
    exe = shutil.which("ip") or "/sbin/ip"
    removed = []
    for ip, dev in sorted(set(addresses)):
        try:
            res = subprocess.run(
                [exe, "addr", "del", ip, "dev", dev], capture_output=True, timeout=5, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error("cannot remove address %s from %s: %s", ip, dev, exc)
            continue
        if res.returncode == 0:
            removed.append(f"{ip} on {dev}")
    return removed


def cleanup_leftovers(state_file: Path) -> list[int]:
    """Kill what a previous agent left behind (per ``state_file``); return the pgids.

    Run once at agent start, before the new registry writes the file. The file is
    removed afterwards. If the agent that wrote it is still running, nothing is
    killed (two agents on one state directory is a setup error, logged as such).
    """
    state = read_state(state_file)
    if state is None:
        return []
    if (
        state.agent_pid is not None
        and state.agent_pid != os.getpid()
        and procfs.pid_alive(state.agent_pid)
        and procfs.start_time(state.agent_pid) == state.agent_start
    ):
        log.error(
            "%s belongs to agent pid %d, which is still running; not touching its processes",
            state_file,
            state.agent_pid,
        )
        return []
    killed = kill_groups(state.groups)
    for pgid in killed:
        log.warning("killed leftover process group %d of a previous agent", pgid)
    for addr in del_addresses(state.addresses):
        log.warning("removed leftover address %s of a previous agent", addr)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_file)
    return killed


# --------------------------------------------------------------------------- agent side


class Sentinel:
    """The agent's handle on the sentinel process and the write end of its pipe."""

    def __init__(self, child: Child, fd: int) -> None:
        self.child = child
        self._fd: int | None = fd

    @classmethod
    def start(
        cls,
        state_file: Path,
        *,
        log_path: str | Path | None = None,
        cgroup: Path | None = None,
        lock_fds: tuple[int, ...] = (),
        own_cgroup: Cgroup | None = None,
    ) -> Sentinel:
        """Start ``python -m vigil.supervise.sentinel STATE_FILE AGENT_PID [CGROUP]`` in
        its own session; it inherits ``lock_fds`` (the node's locks) and keeps them open.
        ``cgroup``: the node's package cgroups it kills; ``own_cgroup``: where it runs
        (out of the agent's cgroup)."""
        from vigil.supervise.spawner import spawn

        src = str(Path(__file__).resolve().parents[2])  # the directory holding "vigil"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        read_fd, write_fd = os.pipe()  # both close-on-exec
        # Never block the agent on a sentinel that does not read (stopped, hung): a
        # full pipe is a failed sentinel, replaced (see ProcessRegistry._send).
        os.set_blocking(write_fd, False)
        try:
            child = spawn(
                [
                    sys.executable,
                    "-m",
                    "vigil.supervise.sentinel",
                    str(state_file),
                    str(os.getpid()),
                    *([str(cgroup)] if cgroup is not None else []),
                ],
                env=env,
                log_path=log_path,
                stdin=read_fd,
                pass_fds=lock_fds,
                cgroup=own_cgroup,
                die_with_parent=False,  # it must outlive us: that is its whole point
            )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        return cls(child, write_fd)

    @property
    def pid(self) -> int:
        return self.child.pid

    def send(self, line: str) -> None:
        """Write one line without blocking; raises OSError if the sentinel is gone
        (BrokenPipeError) or does not read its pipe (it is full)."""
        if self._fd is None:
            raise BrokenPipeError("the sentinel pipe is closed")
        data = (line + "\n").encode()
        n = os.write(self._fd, data)  # BlockingIOError when the pipe is full
        if n != len(data):
            raise OSError(errno.EAGAIN, "the sentinel's pipe is full (it does not read)")

    def abandon(self) -> Child:
        """Close the pipe and SIGKILL the sentinel without waiting (it failed); the
        caller reaps the returned child later."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self.child.signal_group(signal.SIGKILL)
        return self.child

    def close(self, wait: float = 2.0) -> bool:
        """Close the pipe (the sentinel kills what it still knows and exits) and reap it,
        blocking up to ``wait`` s. True if it exited."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        deadline = time.monotonic() + wait
        while self.child.poll() is None:
            if time.monotonic() >= deadline:
                log.warning("the sentinel (pid %d) did not exit; killing it", self.pid)
                self.child.kill_group_now()
                return False
            time.sleep(0.002)
        return True


class Tracked(Protocol):
    """What the registry needs of a process it tracks: a :class:`~vigil.supervise.
    spawner.Child`, or an ``Adopted`` daemon (a forking service's main process)."""

    pgid: int
    start_time: int | None
    argv: tuple[str, ...]

    def poll(self) -> int | None: ...

    def signal_group(self, sig: int) -> None: ...


@dataclass
class _Entry:
    child: Tracked
    start: int | None
    on_kill: Callable[[], None] | None


class ProcessRegistry:
    """The process groups the agent has alive, mirrored to the sentinel and the state file.

    ``ProcessRegistry()`` (no state file, no sentinel) only keeps the list, which is
    what tests and one-shot commands want.
    """

    def __init__(
        self,
        state_file: Path | None = None,
        sentinel: Sentinel | None = None,
        containment: NodeContainment | None = None,
    ) -> None:
        self.state_file = state_file
        self.sentinel = sentinel
        self.containment = containment
        self._lease: tuple[int, str] | None = None
        self._entries: dict[int, _Entry] = {}
        self._addresses: set[tuple[str, str]] = set()
        self._reaping: set[Tracked] = set()
        self._sentinel_restarts = 0
        self._sentinel_log: str | Path | None = None
        self.deadline: float | None = None
        self._write_pending = False
        if state_file is not None:
            self._write_state()

    @classmethod
    def start(
        cls,
        state_file: Path,
        *,
        log_path: str | Path | None = None,
        containment: NodeContainment | None = None,
    ) -> ProcessRegistry:
        """A registry with a sentinel and a state file (run :func:`cleanup_leftovers`
        on the same file first). With ``containment``, the sentinel also kills the
        node's cgroups and holds the node's lock."""
        reg = cls(state_file, None, containment)
        reg._sentinel_log = log_path
        reg.sentinel = reg._start_sentinel()
        return reg

    def _start_sentinel(self) -> Sentinel:
        assert self.state_file is not None
        c = self.containment
        return Sentinel.start(
            self.state_file,
            log_path=self._sentinel_log,
            cgroup=c.packages_cgroup.path if c is not None and c.packages_cgroup else None,
            lock_fds=c.lock_fds if c is not None else (),
            own_cgroup=c.sentinel_cgroup if c is not None else None,
        )

    def set_lease(self, lease: int, store_url: str) -> None:
        """Tell the sentinel the agent's lease: if the agent dies, the sentinel revokes
        it once every package process is dead (cgroups only)."""
        self._lease = (lease, store_url)
        self._send(f"L {lease} {store_url}")

    def clear_lease(self) -> None:
        """The agent gave its lease up itself (or is about to): nothing to revoke."""
        self._lease = None
        self._send("L 0")

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, pgid: object) -> bool:
        return pgid in self._entries

    def pgids(self) -> list[int]:
        return sorted(self._entries)

    def add(self, child: Tracked, *, on_kill: Callable[[], None] | None = None) -> None:
        """Record ``child``'s group. ``on_kill`` is called if :meth:`kill_all` kills it
        (a supervisor uses it to know that it must not restart)."""
        self._reap_some()
        start = child.start_time
        self._entries[child.pgid] = _Entry(child, start, on_kill)
        self._state_changed()
        self._send(f"+{child.pgid} {start if start is not None else 0}")

    def remove(self, child: Tracked) -> None:
        """Forget ``child``'s group (call it once the group is empty)."""
        self._reap_some()
        entry = self._entries.get(child.pgid)
        if entry is None or entry.child is not child:
            return
        del self._entries[child.pgid]
        self._state_changed()
        self._send(f"-{child.pgid}")

    def add_address(self, ip: str, dev: str) -> None:
        """Record a relocatable address this node has up: removed with the processes
        when the node fences or the agent dies."""
        self._addresses.add((ip, dev))
        self._state_changed()
        self._send(f"A+{ip} {dev}")

    def remove_address(self, ip: str, dev: str) -> None:
        if (ip, dev) in self._addresses:
            self._addresses.discard((ip, dev))
            self._state_changed()
            self._send(f"A-{ip} {dev}")

    def addresses(self) -> set[tuple[str, str]]:
        return set(self._addresses)

    def drop_addresses(self) -> list[str]:
        """Remove every recorded address from its interface now (fencing)."""
        removed = del_addresses(self._addresses)
        for ip, dev in self._addresses:
            self._send(f"A-{ip} {dev}")
        self._addresses.clear()
        self._write_state()
        return removed

    def arm(self, deadline: float | None) -> None:
        """Tell the sentinel the CLOCK_MONOTONIC time by which the next lease renewal
        must come (None disarms): past it, the sentinel kills every group even if the
        agent cannot (stopped, hung). Past it, :meth:`may_spawn` is False too."""
        self.deadline = deadline
        self._send(f"D {deadline:.3f}" if deadline is not None else "D 0")

    def may_spawn(self) -> bool:
        """False once the lease deadline has passed: a fenced node starts nothing."""
        return self.deadline is None or time.monotonic() < self.deadline

    def kill_all(self, only: Iterable[int] | None = None) -> list[int]:
        """SIGKILL every known group (or those in ``only``) and, without ``only``, the
        node's package cgroups, now, without waiting; for fencing and emergencies.
        Returns the pgids signalled."""
        if only is None and self.containment is not None:
            self.containment.kill_all()
        wanted = set(self._entries) if only is None else set(only) & set(self._entries)
        killed = []
        for pgid in sorted(wanted):
            entry = self._entries.pop(pgid)
            if entry.on_kill is not None:
                try:
                    entry.on_kill()
                except Exception:
                    log.exception("on_kill callback for process group %d failed", pgid)
            entry.child.signal_group(signal.SIGKILL)
            killed.append(pgid)
            self._reaping.add(entry.child)
            self._send(f"-{pgid}")
        if killed:
            self._write_state()  # fencing: record it now
        self._reap_some()
        return killed

    def close(self, wait: float = 2.0) -> None:
        """Kill whatever is still registered, stop the sentinel and reap (blocks up to
        about ``wait`` s; for agent shutdown)."""
        self.kill_all()
        if self.sentinel is not None:
            self.sentinel.close(wait)
            self.sentinel = None
        deadline = time.monotonic() + wait
        while self._reaping and time.monotonic() < deadline:
            self._reap_some()
            if self._reaping:
                time.sleep(0.002)

    # ----------------------------------------------------------------- internals

    def _reap_some(self) -> None:
        for child in list(self._reaping):
            if child.poll() is not None:
                self._reaping.discard(child)

    def _state_changed(self) -> None:
        """Write the state file soon rather than at once: with many short-lived monitor
        commands, one write per STATE_WRITE_DELAY is plenty. The sentinel, told at once
        over its pipe, covers a crash in between."""
        if self.state_file is None or self._write_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_state()
            return
        self._write_pending = True
        loop.call_later(STATE_WRITE_DELAY, self._write_state)

    def _write_state(self) -> None:
        self._write_pending = False
        if self.state_file is None:
            return
        groups = [
            RecordedGroup(pgid, e.start, e.child.argv[0] if e.child.argv else "")
            for pgid, e in sorted(self._entries.items())
        ]
        try:
            write_state(self.state_file, groups, self._addresses)
        except OSError as exc:
            log.error("cannot write %s: %s", self.state_file, exc)

    def _send(self, line: str) -> None:
        if self.sentinel is None:
            return
        try:
            self.sentinel.send(line)
            return
        except OSError as exc:
            log.error("the sentinel (pid %d) is gone (%s)", self.sentinel.pid, exc)
        # Never wait for it here: this runs inside the lease renewal. Kill it (it
        # may be hung rather than dead) and reap it later.
        self._reaping.add(self.sentinel.abandon())
        self.sentinel = None
        if self.state_file is None or self._sentinel_restarts >= _MAX_SENTINEL_RESTARTS:
            log.error("running without a sentinel: processes may outlive a killed agent")
            return
        self._sentinel_restarts += 1
        from vigil.errors import SpawnError

        try:
            sentinel = self._start_sentinel()
            for pgid, e in self._entries.items():
                sentinel.send(f"+{pgid} {e.start if e.start is not None else 0}")
            for ip, dev in self._addresses:
                sentinel.send(f"A+{ip} {dev}")
            if self.deadline is not None:
                sentinel.send(f"D {self.deadline:.3f}")
            if self._lease is not None:
                sentinel.send(f"L {self._lease[0]} {self._lease[1]}")
        except (SpawnError, OSError) as exc:
            log.error("cannot restart the sentinel: %s", exc)
            return
        self.sentinel = sentinel
        log.warning("restarted the sentinel (pid %d)", sentinel.pid)


# --------------------------------------------------------------------------- sentinel side


def parse_line(line: str, groups: dict[int, int | None]) -> None:
    """Apply one ``+PGID [START]`` / ``-PGID`` line to ``groups`` (bad lines are ignored)."""
    line = line.strip()
    if len(line) < 2 or line[0] not in "+-":
        return
    parts = line[1:].split()
    try:
        pgid = int(parts[0])
        start = int(parts[1]) if len(parts) > 1 and int(parts[1]) > 0 else None
    except ValueError:
        return
    if line[0] == "+":
        groups[pgid] = start
    else:
        groups.pop(pgid, None)


def _recorded(groups: Mapping[int, int | None]) -> list[RecordedGroup]:
    return [RecordedGroup(pgid, start) for pgid, start in groups.items()]


@dataclass
class _Watched:
    """What the sentinel knows of its agent's node (see the module docstring)."""

    agent: int
    cgroup: Cgroup | None
    groups: dict[int, int | None] = field(default_factory=dict)
    addresses: set[tuple[str, str]] = field(default_factory=set)
    lease: tuple[int, str] | None = None  # (lease id, store URL)

    def kill(self) -> list[int]:
        """SIGKILL the node's package cgroups and every known group (no waiting)."""
        if self.cgroup is not None:
            self.cgroup.kill()
        return kill_groups(_recorded(self.groups))


def parse_lease(line: str) -> tuple[int, str] | None:
    """``L LEASE URL``: the agent's lease and the store it lives in; ``L 0`` clears."""
    parts = line[1:].strip().split(None, 1)
    try:
        lease = int(parts[0]) if parts else 0
    except ValueError:
        return None
    if lease <= 0 or len(parts) < 2:
        return None
    return lease, parts[1]


def _say(text: str) -> None:
    print(f"vigil sentinel: {text}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    """The sentinel: follow the pipe on stdin, kill everything at EOF or when the
    agent's lease deadline passes without a renewal; at EOF, revoke the lease once
    the node's cgroups are empty. ``argv``: STATE_FILE AGENT_PID [NODE_CGROUP]."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # only EOF (or SIGKILL) ends the sentinel
    state_file = Path(argv[0]) if argv else None
    # The agent's PID comes from the command line: by the time this runs the agent may
    # already be dead, and getppid() would name whoever adopted us.
    agent = int(argv[1]) if len(argv) > 1 else os.getppid()
    # kill() and populated() only need the directory, not the path inside the hierarchy
    node_cg = Cgroup(Path(argv[2]), "") if len(argv) > 2 else None
    w = _Watched(agent, node_cg)
    fd = sys.stdin.fileno()
    buf = b""
    deadline: float | None = None
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            # The agent did not renew its lease in time (stopped, hung, cut off from the
            # store): its lease may expire elsewhere soon, so its packages die now.
            fenced = w.kill()
            removed = del_addresses(w.addresses)
            w.groups.clear()
            w.addresses.clear()
            deadline = None
            _say(
                f"agent {agent} missed its lease deadline; killed "
                + ("the node's package cgroups and " if w.cgroup is not None else "")
                + "process groups "
                + " ".join(map(str, sorted(fenced)))
                + (f"; removed addresses {', '.join(removed)}" if removed else "")
            )
            continue
        data = os.read(fd, 65536)
        if not data:
            break
        buf += data
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            line = raw.decode("ascii", "replace").strip()
            if line.startswith("D"):
                deadline = parse_deadline(line)
            elif line.startswith("A"):
                parse_address(line, w.addresses)
            elif line.startswith("L"):
                w.lease = parse_lease(line)
                if w.lease is not None:
                    import vigil.store.revoke  # noqa: F401  now, not when every ms counts
            else:
                parse_line(line, w.groups)
    # EOF: the agent has closed the pipe, exited or died.
    _on_agent_gone(w, state_file)
    return 0


def _on_agent_gone(w: _Watched, state_file: Path | None) -> None:
    killed = w.kill()
    addresses = set(w.addresses)
    if state_file is not None:
        state = read_state(state_file)
        if state is not None and state.agent_pid == w.agent:
            killed += [p for p in kill_groups(state.groups) if p not in killed]
            addresses |= set(state.addresses)
            with contextlib.suppress(OSError):
                os.unlink(state_file)
    empty = w.cgroup is not None and w.cgroup.wait_empty_sync(KILL_WAIT)
    removed = del_addresses(addresses)
    revoked = ""
    if w.lease is not None:
        lease, url = w.lease
        if not empty:
            revoked = f"; lease {lease:x} left to expire (" + (
                "no cgroups: cannot prove every process is gone)"
                if w.cgroup is None
                else "processes survived SIGKILL)"
            )
        else:
            from vigil.store.revoke import RevokeFailed, revoke_lease

            try:
                done = revoke_lease(url, lease)
                revoked = f"; revoked lease {lease:x}" if done else ""
            except RevokeFailed as exc:
                revoked = f"; cannot revoke lease {lease:x}: {exc}"
    if killed or removed or revoked or (w.cgroup is not None and w.lease is not None):
        what = ["the node's package cgroups"] if w.cgroup is not None else []
        if killed:
            what.append("process groups " + " ".join(map(str, sorted(killed))))
        _say(
            f"agent {w.agent} is gone; killed "
            + (" and ".join(what) or "nothing")
            + (f"; removed addresses {', '.join(removed)}" if removed else "")
            + revoked
        )


def parse_address(line: str, addresses: set[tuple[str, str]]) -> None:
    """Apply one ``A+IP IFACE`` / ``A-IP IFACE`` line (bad lines are ignored)."""
    parts = line[2:].split()
    if len(line) < 3 or line[1] not in "+-" or len(parts) != 2:
        return
    if line[1] == "+":
        addresses.add((parts[0], parts[1]))
    else:
        addresses.discard((parts[0], parts[1]))


def parse_deadline(line: str) -> float | None:
    """``D SECONDS``: the CLOCK_MONOTONIC time by which the next renewal must arrive;
    ``D 0`` disarms."""
    try:
        value = float(line[1:].strip())
    except ValueError:
        return None
    return value if value > 0 else None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
