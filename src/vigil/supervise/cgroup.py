"""cgroup v2: the kernel's own containment of every process a package starts.

A process group is a promise a process can break (``setsid``, a double fork); a cgroup
is not: every descendant of a process in a cgroup is born in it, and only a process
allowed to write ``cgroup.procs`` elsewhere can leave it. This is how systemd contains
a unit (``KillMode=control-group``), and how vigil contains a package.

Layout under the node's subtree (see :mod:`vigil.supervise.containment`)::

    ROOT/                   default <cgroup2 mount>/vigil
      CLUSTER/
        NODE/               one per agent; flock'ed by the agent and its sentinel
          sentinel/         the sentinel (out of the agent's own cgroup)
          packages/         what fencing and the agent's death kill
            PACKAGE/
              service.NAME/ a service: its main process and everything it forks
              run/          external scripts, monitor commands, hooks, what they leave

Only the standard library is imported here: the sentinel (a separate, small
process) uses this module to kill a node's packages when the agent dies.

Operations and what they cost:

* :func:`find_hierarchy`: the cgroup2 mount (``/sys/fs/cgroup`` when the host is
  unified, ``/sys/fs/cgroup/unified`` on hybrid hosts), from ``/proc/self/mounts``;
* :meth:`Cgroup.populated`: one read of ``cgroup.events`` (``populated 0`` means the
  whole subtree is empty; zombies do not count) — no scan of ``/proc``;
* :meth:`Cgroup.kill`: one write of ``1`` to ``cgroup.kill`` (Linux 5.14+), which
  SIGKILLs the whole subtree and deals with concurrent forks; on older kernels the
  subtree is frozen, every process SIGKILLed, and thawed;
* :meth:`Cgroup.signal`: any other signal to every process of the subtree, through a
  pidfd opened and checked to be in the subtree, so a reused PID is never signalled.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

#: Where vigil looks for the cgroup2 hierarchy, in order, when no root is given.
MOUNT_CANDIDATES = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
#: The directory vigil creates under the hierarchy when no root is given.
DEFAULT_SUBTREE = "vigil"
#: Leaf holding external scripts, monitor commands and hooks (and what they leave).
RUN_LEAF = "run"
#: Prefix of a service's leaf: ``service.NAME``.
SERVICE_PREFIX = "service."

_POLL_FIRST = 0.002
_POLL_MAX = 0.05
_SIGNAL_ROUNDS = 20


def find_hierarchy(mounts: str = "/proc/self/mounts") -> Path | None:
    """The mount point of the cgroup v2 hierarchy, or None if there is none.

    ``/sys/fs/cgroup`` is preferred (a unified host), then ``/sys/fs/cgroup/unified``
    (a hybrid host, where systemd mounts v1 controllers at ``/sys/fs/cgroup``), then any
    other cgroup2 mount.
    """
    found: list[str] = []
    try:
        with open(mounts, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "cgroup2":
                    found.append(parts[1].replace("\\040", " "))
    except OSError:
        return None
    for candidate in MOUNT_CANDIDATES:
        if candidate in found:
            return Path(candidate)
    return Path(found[0]) if found else None


def own_cgroup(pid: int | str = "self") -> str | None:
    """The cgroup v2 path of ``pid`` relative to the hierarchy (``"/a/b"``), or None."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        return None
    return None


class Cgroup:
    """One cgroup directory. ``rel`` is its path relative to the hierarchy's root
    (``"/vigil/prod/n1/web"``), as ``/proc/PID/cgroup`` shows it; ``path`` is where
    it is in the file system."""

    __slots__ = ("path", "rel")

    def __init__(self, path: Path, rel: str) -> None:
        self.path = path
        self.rel = rel

    @classmethod
    def at(cls, hierarchy: Path, path: Path) -> Cgroup:
        rel = "/" + str(path.relative_to(hierarchy)).strip("/")
        return cls(path, "/" if rel == "/." else rel)

    def __repr__(self) -> str:
        return f"<Cgroup {self.path}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cgroup) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def child(self, name: str) -> Cgroup:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"bad cgroup name {name!r}")
        return Cgroup(self.path / name, f"{self.rel.rstrip('/')}/{name}")

    # ----------------------------------------------------------------- life cycle

    def create(self) -> None:
        """Create the directory and its parents (no error if it exists); OSError if the
        hierarchy cannot be written."""
        self.path.mkdir(parents=True, exist_ok=True)

    def exists(self) -> bool:
        return (self.path / "cgroup.procs").exists()

    def remove(self) -> bool:
        """Remove the cgroup and every child cgroup, deepest first. True if it is gone;
        False if one of them still holds a process (EBUSY) or cannot be removed."""
        if not self.path.exists():
            return True
        ok = True
        for sub in sorted(self._subdirs(), key=lambda p: len(p.parts), reverse=True):
            ok = _rmdir(sub) and ok
        return _rmdir(self.path) and ok

    def _subdirs(self) -> Iterator[Path]:
        for dirpath, dirnames, _ in os.walk(self.path):
            for d in dirnames:
                yield Path(dirpath) / d

    # ----------------------------------------------------------------- placement

    def open_procs(self) -> int:
        """An O_WRONLY descriptor of ``cgroup.procs`` (close-on-exec). Writing ``b"0"``
        to it moves the writing process here; a child does it between fork and exec
        (the kernel checks the opener's credentials, so it works after a uid switch)."""
        return os.open(self.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)

    # ----------------------------------------------------------------- observation

    def populated(self) -> bool:
        """True while any live process is in this cgroup or below it (zombies do not
        count); False if the cgroup does not exist."""
        try:
            with open(self.path / "cgroup.events", encoding="ascii") as f:
                for line in f:
                    if line.startswith("populated "):
                        return line.split()[1] != "0"
        except OSError:
            return False
        return False

    def pids(self) -> list[int]:
        """PIDs (as seen in this PID namespace) of every process in the subtree."""
        out: list[int] = []
        for d in (self.path, *self._subdirs()):
            try:
                with open(d / "cgroup.procs", encoding="ascii") as f:
                    out.extend(int(x) for x in f.read().split() if x != "0")
            except (OSError, ValueError):
                continue
        return out

    def holds(self, pid: int) -> bool:
        """True if process ``pid`` is in this cgroup or below it."""
        where = own_cgroup(pid)
        if where is None:
            return False
        rel = self.rel.rstrip("/")
        return where == self.rel or where.startswith(rel + "/")

    # ----------------------------------------------------------------- signals

    def signal(self, sig: int) -> int:
        """Send ``sig`` to every process of the subtree, including the ones forked while
        doing so (a few rounds, until a round finds nobody new). Returns how many
        processes were signalled. Never signals a process outside the subtree."""
        done: set[int] = set()
        for _ in range(_SIGNAL_ROUNDS):
            new = [pid for pid in self.pids() if pid not in done]
            if not new:
                break
            for pid in new:
                done.add(pid)
                signal_pid(pid, sig, within=self)
        return len(done)

    def kill(self) -> None:
        """SIGKILL every process of the subtree now (does not wait for them to die)."""
        try:
            with open(self.path / "cgroup.kill", "w", encoding="ascii") as f:
                f.write("1")
            return
        except FileNotFoundError:
            if not self.path.exists():
                return
        except OSError:
            pass
        self._kill_frozen()

    def _kill_frozen(self) -> None:
        """Kernels before 5.14: freeze (no more forks), SIGKILL everyone, thaw."""
        frozen = _write(self.path / "cgroup.freeze", "1")
        try:
            self.signal(signal.SIGKILL)
        finally:
            if frozen:
                _write(self.path / "cgroup.freeze", "0")

    async def wait_empty(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the subtree to hold no process; True if empty."""
        # not at the top: the sentinel imports this module, and asyncio is not needed there
        from vigil.supervise.aio import poll_until

        return await poll_until(lambda: not self.populated(), timeout)

    def wait_empty_sync(self, timeout: float) -> bool:
        """:meth:`wait_empty` for code without an event loop (the sentinel)."""
        deadline = time.monotonic() + timeout
        interval = _POLL_FIRST
        while self.populated():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(interval, remaining))
            interval = min(interval * 2, _POLL_MAX)
        return True


def signal_pid(pid: int, sig: int, *, within: Cgroup | None = None) -> bool:
    """Signal one process through a pidfd; with ``within``, only if the process is in
    that cgroup once the pidfd is open (so a reused PID is left alone). True if sent."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if within is not None and not within.holds(pid):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _rmdir(path: Path) -> bool:
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError as exc:
        return exc.errno == errno.ENOENT


def _write(path: Path, text: str) -> bool:
    with contextlib.suppress(OSError):
        with open(path, "w", encoding="ascii") as f:
            f.write(text)
        return True
    return False
