"""Containment: where a node's package processes live, and how all of them are stopped.

vigil promises that nothing a package started outlives its halt, its node's fence or
its agent's death. With **cgroup v2** (the default wherever the hierarchy can be
written, as root on any modern Linux) the kernel keeps that promise: every process a
package starts is born in the package's cgroup and cannot leave it (see
:mod:`vigil.supervise.cgroup` for the layout). Where cgroups cannot be used (not root,
a container without a delegated hierarchy) vigil falls back to **process groups**,
as before: a process that calls ``setsid`` or double-forks escapes them. The agent
says which once in its log, and ``vigil status`` shows it per node
(``"containment": "cgroup"`` or ``"process-group"``).

* :class:`NodeContainment` — one per agent. It owns ``ROOT/CLUSTER/NODE`` and holds an
  exclusive ``flock`` on it for as long as the agent *or its sentinel* lives (the
  sentinel inherits the same open file), so a second agent for the same node on the
  same host, or a restarted agent whose predecessor's sentinel is still cleaning up,
  waits instead of killing what is not yet its own.
* :class:`PackageScope` — one per package this node runs: its service leaves, its
  ``run`` leaf for scripts, monitors and hooks, and :meth:`PackageScope.sweep`, the
  last step of every halt (signal what is left, wait, ``cgroup.kill``).

This module imports only the standard library and vigil's stdlib-only modules.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vigil.supervise.aio import poll_until
from vigil.supervise.cgroup import (
    DEFAULT_SUBTREE,
    RUN_LEAF,
    SERVICE_PREFIX,
    Cgroup,
    find_hierarchy,
    own_cgroup,
)

if TYPE_CHECKING:
    from vigil.supervise.spawner import Child

log = logging.getLogger(__name__)

#: ``NODE/packages`` holds the package cgroups, ``NODE/sentinel`` the sentinel.
PACKAGES = "packages"
SENTINEL = "sentinel"
#: How long SIGKILLed processes get to disappear before they count as survivors.
KILL_WAIT = 2.0
#: How long a starting agent waits for the node's lock (a previous agent's sentinel
#: finishing its clean-up) before it gives up.
LOCK_WAIT = 15.0
LOCK_FILE = "agent.lock"


class Mode(enum.StrEnum):
    CGROUP = "cgroup"
    PROCESS_GROUP = "process-group"


class NodeLocked(Exception):
    """Another agent (or its sentinel) holds this node's containment on this host."""


class ContainmentError(Exception):
    """An explicitly configured cgroup root cannot be used (one line, names it)."""


@dataclass
class NodeContainment:
    """A node's containment: its mode, its cgroups (cgroup mode) and its locks.

    ``lock_fds`` are the open, ``flock``ed node cgroup directory (cgroup mode) and
    ``STATE_DIR/agent.lock`` (always); pass them to the sentinel so that the locks
    live until both are gone.
    """

    mode: Mode
    node_cgroup: Cgroup | None  # ROOT/CLUSTER/NODE
    lock_fds: tuple[int, ...]
    reason: str = ""

    @property
    def packages_cgroup(self) -> Cgroup | None:
        """``NODE/packages``: every package's cgroup, what fencing kills."""
        return self.node_cgroup.child(PACKAGES) if self.node_cgroup is not None else None

    @property
    def sentinel_cgroup(self) -> Cgroup | None:
        """``NODE/sentinel``: the sentinel's own cgroup, out of the agent's (a
        ``systemctl kill`` of vigild's unit does not take it too) and keeping the
        node's directory from being removed while it lives."""
        return self.node_cgroup.child(SENTINEL) if self.node_cgroup is not None else None

    # ----------------------------------------------------------------- opening

    @classmethod
    def open(
        cls,
        cluster: str,
        node: str,
        *,
        state_dir: Path,
        root: Path | None = None,
        disabled: bool = False,
        lock_wait: float = LOCK_WAIT,
    ) -> NodeContainment:
        """Set up the node's containment and take its locks.

        ``root``: the directory under which ``CLUSTER/NODE`` is made (default: the
        cgroup2 hierarchy's ``vigil``; a root given but unusable raises
        :class:`ContainmentError`, while an unusable default falls back to process
        groups). ``disabled``: process groups only. Raises :class:`NodeLocked` if a
        lock is still held after ``lock_wait`` s.
        """
        reason = "turned off" if disabled else ""
        node_cg: Cgroup | None = None
        if not disabled:
            node_cg, reason = _node_cgroup(cluster, node, root)
            if node_cg is None and root is not None:
                raise ContainmentError(f"--cgroup-root {root}: {reason}")
        state_dir.mkdir(parents=True, exist_ok=True)
        paths: list[tuple[Path, str]] = []
        if node_cg is not None:
            paths.append((node_cg.path, f"cgroup {node_cg.path}"))
        paths.append((state_dir / LOCK_FILE, f"lock file {state_dir / LOCK_FILE}"))
        fds: list[int] = []
        try:
            for path, what in paths:
                if path.name == LOCK_FILE:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                else:
                    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                fds.append(fd)
                _lock(fd, lock_wait, what, node)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        if node_cg is not None:
            for cg in (node_cg.child(PACKAGES), node_cg.child(SENTINEL)):
                cg.create()
        mode = Mode.CGROUP if node_cg is not None else Mode.PROCESS_GROUP
        return cls(mode, node_cg, tuple(fds), reason)

    def close(self) -> None:
        """Release this process's hold on the locks (the sentinel may still hold them)."""
        for fd in self.lock_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.lock_fds = ()

    def describe(self) -> str:
        if self.mode is Mode.CGROUP:
            assert self.node_cgroup is not None
            return f"cgroup v2 ({self.node_cgroup.path})"
        return (
            f"process groups only ({self.reason}): a process that leaves its process "
            "group escapes halt and fencing"
        )

    # ----------------------------------------------------------------- packages

    def package(self, name: str) -> PackageScope:
        pkgs = self.packages_cgroup
        return PackageScope(name, pkgs.child(name) if pkgs is not None else None)

    def kill_all(self) -> None:
        """SIGKILL every process of every package of this node now (fencing)."""
        if self.packages_cgroup is not None:
            self.packages_cgroup.kill()

    def populated(self) -> bool:
        return self.packages_cgroup is not None and self.packages_cgroup.populated()

    def cleanup_leftovers(self, wait: float = KILL_WAIT) -> int:
        """Kill whatever a previous agent of this node left in its package cgroups,
        wait for it to go, and remove the empty package cgroups. Returns how many
        processes were found. Run once at start, before joining (the locks are held)."""
        cg = self.packages_cgroup
        if cg is None:
            return 0
        found = len(cg.pids())
        if found:
            cg.kill()
            if not cg.wait_empty_sync(wait):
                log.error("processes left in %s survived SIGKILL: %s", cg.path, cg.pids())
        with contextlib.suppress(OSError):
            for sub in os.scandir(cg.path):
                if sub.is_dir(follow_symlinks=False):
                    cg.child(sub.name).remove()
        return found


def _node_cgroup(cluster: str, node: str, root: Path | None) -> tuple[Cgroup | None, str]:
    """``ROOT/CLUSTER/NODE``, created; or None and why cgroups cannot be used."""
    hierarchy = find_hierarchy()
    if hierarchy is None:
        return None, "no cgroup v2 hierarchy is mounted"
    base = root if root is not None else hierarchy / DEFAULT_SUBTREE
    try:
        base.resolve().relative_to(hierarchy)
    except ValueError:
        return None, f"cgroup root {base} is not inside the cgroup v2 hierarchy {hierarchy}"
    node_cg = Cgroup.at(hierarchy, base.resolve() / cluster / node)
    mine = own_cgroup()
    if mine is not None and (mine + "/").startswith(node_cg.rel.rstrip("/") + "/"):
        return None, f"the agent itself runs inside {node_cg.path}"
    try:
        node_cg.create()
        # Writable is not enough: moving a process needs write access to cgroup.procs.
        os.close(node_cg.open_procs())
    except OSError as exc:
        return None, f"cannot write {node_cg.path}: {exc.strerror}"
    return node_cg, ""


def _lock(fd: int, wait: float, what: str, node: str) -> None:
    deadline = time.monotonic() + wait
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if time.monotonic() >= deadline:
            raise NodeLocked(
                f"node {node}: {what} is locked by another vigild for this node on this "
                f"host (or its sentinel, still cleaning up after {wait:g}s)"
            )
        if not said:
            log.warning(
                "node %s: %s is locked; waiting for the previous agent's sentinel", node, what
            )
            said = True
        time.sleep(0.05)


@dataclass
class PackageScope:
    """Where one package's processes live on this node.

    cgroup mode: ``NODE/PACKAGE`` with a leaf per service and ``run``. Process-group
    mode: the groups that scripts left running (``keep``), swept at halt.
    """

    name: str
    cgroup: Cgroup | None
    _kept: set[Child] = field(default_factory=set)

    def service(self, name: str) -> Cgroup | None:
        return self.cgroup.child(SERVICE_PREFIX + name) if self.cgroup is not None else None

    def run(self) -> Cgroup | None:
        return self.cgroup.child(RUN_LEAF) if self.cgroup is not None else None

    def keep(self, child: Child) -> None:
        """A script exited leaving processes that belong to the package (a daemon it
        started). cgroup mode needs nothing: they are in ``run``. Process-group mode
        remembers the group, to be swept at halt."""
        if self.cgroup is None:
            self._kept.add(child)

    def alive(self) -> bool:
        if self.cgroup is not None:
            return self.cgroup.populated()
        self._kept = {c for c in self._kept if c.group_alive()}
        return bool(self._kept)

    def pids(self) -> list[int]:
        if self.cgroup is not None:
            return self.cgroup.pids()
        from vigil.supervise import procfs

        return [p for c in self._kept for p in procfs.group_members(c.pgid)]

    def signal(self, sig: int) -> None:
        if self.cgroup is not None:
            self.cgroup.signal(sig)
            return
        for child in list(self._kept):
            child.signal_group(sig)

    def kill_now(self) -> None:
        """SIGKILL every process of the package (does not wait)."""
        if self.cgroup is not None:
            self.cgroup.kill()
        for child in list(self._kept):
            child.signal_group(signal.SIGKILL)

    async def wait_empty(self, timeout: float) -> bool:
        if self.cgroup is not None:
            return await self.cgroup.wait_empty(timeout)
        return await poll_until(lambda: not self.alive(), timeout)

    async def sweep(self, grace: float, kill_wait: float = KILL_WAIT) -> list[int]:
        """The last step of a halt: SIGTERM (and SIGCONT) whatever is still in the
        package, wait up to ``grace`` s, then SIGKILL it and wait up to ``kill_wait``
        s. Returns the PIDs that survived (empty: nothing is left). The package's
        empty cgroups are removed."""
        if self.alive():
            left = self.pids()
            log.info("package %s: %d process(es) left after halting: SIGTERM", self.name, len(left))
            self.signal(signal.SIGTERM)
            self.signal(signal.SIGCONT)
            if not await self.wait_empty(grace):
                log.warning(
                    "package %s: processes outlived %gs after SIGTERM: SIGKILL", self.name, grace
                )
                self.kill_now()
                if not await self.wait_empty(kill_wait):
                    survivors = self.pids()
                    log.error("package %s: processes survived SIGKILL: %s", self.name, survivors)
                    return survivors or [0]
        self._kept.clear()
        self.remove()
        return []

    def remove(self) -> None:
        if self.cgroup is not None and not self.cgroup.remove():
            log.debug("package %s: cgroup %s not removed (busy)", self.name, self.cgroup.path)
