"""The only path from vigil to the OS for processes.

Every process vigil starts (services, monitor commands, package scripts, the sentinel)
is started by :func:`spawn`:

* in its own session and process group (``setsid``), so that the whole tree a command
  forks can be signalled at once and a terminal's Ctrl-C does not reach it;
* with ``PR_SET_PDEATHSIG = SIGKILL`` so that the leader dies with the agent (the
  sentinel, see :mod:`vigil.supervise.sentinel`, takes care of the rest of the group);
* stdin from ``/dev/null``, stdout and stderr appended to a log file, no other
  descriptor inherited.

:class:`Child` waits for its leader with a pidfd registered on the event loop (no
child-watcher thread, no polling) and :func:`terminate_group` is the one
implementation of "SIGTERM the group, wait, SIGKILL the group".

``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child ends: call
:func:`spawn` from the event-loop thread, never from a short-lived worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pwd
import signal
import subprocess
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from vigil.errors import SpawnError
from vigil.supervise import procfs

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
#: How long :func:`terminate_group` waits for the group to vanish after SIGKILL.
KILL_WAIT = 2.0
_POLL_FIRST = 0.005
_POLL_MAX = 0.05


def _load_prctl() -> Callable[..., int] | None:
    for name in ("libc.so.6", None):
        try:
            libc = ctypes.CDLL(name, use_errno=True)
            prctl = libc.prctl
        except (OSError, AttributeError):
            continue
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        prctl.restype = ctypes.c_int
        fn: Callable[..., int] = prctl
        return fn
    return None


# Loaded once in the parent: the forked child must not load libraries.
_prctl = _load_prctl()


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """``preexec_fn``: SIGKILL this child when its parent dies (runs after the uid switch,
    which would otherwise clear the setting)."""

    def setup() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return setup


def describe_exit(returncode: int | None) -> str:
    """``0`` → "exited with status 0"; ``-9`` → "was killed by SIGKILL"."""
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class Child:
    """A process started by :func:`spawn`, leader of its own process group."""

    def __init__(self, popen: subprocess.Popen[bytes], argv: Sequence[str]) -> None:
        self._popen = popen
        self.pid: int = popen.pid
        self.pgid: int = popen.pid  # setsid(): the child leads a new session and group
        self.argv: tuple[str, ...] = tuple(argv)
        #: Field 22 of /proc/PID/stat; with the pgid it names the group despite PID reuse.
        self.start_time: int | None = procfs.start_time(self.pid)
        self._pidfd: int | None = None
        self._pidfd_closer: weakref.finalize[[int], Child] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[int] | None = None

    def __repr__(self) -> str:
        return f"<Child pid={self.pid} argv={self.argv[0]!r} returncode={self.returncode}>"

    @property
    def returncode(self) -> int | None:
        """Exit status once the leader is reaped: ``n`` or ``-SIGNUM`` like Popen."""
        return self._popen.returncode

    # ----------------------------------------------------------------- leader

    def poll(self) -> int | None:
        """Reap the leader if it has exited (never blocks)."""
        rc = self._popen.poll()
        if rc is not None:
            self._finish(rc)
        return rc

    async def wait(self) -> int:
        """Wait for the leader to exit and return its exit status (safe to cancel)."""
        rc = self.poll()
        if rc is not None:
            return rc
        loop = asyncio.get_running_loop()
        if self._waiter is None or self._loop is not loop:
            self._detach()
            if self._pidfd is None:
                fd = os.pidfd_open(self.pid)
                self._pidfd = fd
                self._pidfd_closer = weakref.finalize(self, _close_fd, fd)
            self._loop = loop
            self._waiter = loop.create_future()
            loop.add_reader(self._pidfd, self._on_pidfd)
        return await asyncio.shield(self._waiter)

    def _on_pidfd(self) -> None:
        self.poll()

    def _detach(self) -> None:
        if self._loop is not None and self._pidfd is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._pidfd)
        self._loop = None

    def _finish(self, rc: int) -> None:
        self._detach()
        if self._pidfd_closer is not None:
            self._pidfd_closer()  # closes the pidfd once
            self._pidfd_closer = None
            self._pidfd = None
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done() and not waiter.get_loop().is_closed():
            waiter.set_result(rc)

    # ----------------------------------------------------------------- group

    def _group_is_ours(self) -> bool:
        if self.returncode is None:
            return True  # an unreaped leader keeps its PID (= our pgid) from being reused
        # Our leader is reaped: a process holding its PID now is someone else, and the
        # group number may have been reused with it. Without one, members are ours.
        return procfs.read_stat(self.pgid) is None

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to every process of the group (no error if it is gone)."""
        self.poll()
        if not self._group_is_ours():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)

    def group_alive(self) -> bool:
        """True while any (non-zombie) process is left in the group; reaps the leader."""
        self.poll()
        if not self._group_is_ours():
            return False
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by someone we may not signal
        if self.returncode is None:
            return True  # the leader itself is running
        # Only zombies may be left (orphans an init has not reaped yet): look closer.
        return bool(procfs.group_members(self.pgid))

    def kill_group_now(self, wait: float = 1.0) -> bool:
        """SIGKILL the group and block up to ``wait`` s for it to vanish (teardown only)."""
        self.signal_group(signal.SIGKILL)
        deadline = time.monotonic() + wait
        while self.group_alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_FIRST)
        return True

    async def terminate_group(self, grace: float) -> bool:
        """See :func:`terminate_group`."""
        return await terminate_group(self, grace)


async def wait_group_gone(child: Child, timeout: float) -> bool:
    """Wait up to ``timeout`` s for the group to be empty; True if it is."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    if child.returncode is None and timeout > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await child.wait()  # usually the group dies with its leader
    interval = _POLL_FIRST
    while child.group_alive():
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(interval, remaining))
        interval = min(interval * 2, _POLL_MAX)
    return True


async def terminate_group(child: Child, grace: float, *, kill_wait: float = KILL_WAIT) -> bool:
    """SIGTERM the whole group, wait up to ``grace`` s, then SIGKILL it and wait briefly.

    The leader is reaped. Returns True if no process of the group is left, False if
    some survived SIGKILL (stuck in the kernel, or owned by a user we may not signal).
    """
    if not child.group_alive():
        return True
    child.signal_group(signal.SIGTERM)
    child.signal_group(signal.SIGCONT)  # a stopped process only sees SIGTERM once continued
    if await wait_group_gone(child, grace):
        return True
    log.info(
        "process group %d (%s) outlived %gs after SIGTERM: SIGKILL",
        child.pgid,
        child.argv[0],
        grace,
    )
    child.signal_group(signal.SIGKILL)
    gone = await wait_group_gone(child, kill_wait)
    if not gone:
        log.warning("process group %d (%s) survived SIGKILL", child.pgid, child.argv[0])
    return gone


def _open_log(log_path: str | Path | None) -> int:
    if log_path is None:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        return os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise SpawnError(f"cannot open log file {log_path}: {exc.strerror}") from None


def _lookup_user(user: str) -> pwd.struct_passwd:
    try:
        if user.isdigit():
            return pwd.getpwuid(int(user))
        return pwd.getpwnam(user)
    except KeyError:
        raise SpawnError(f"unknown user {user!r}: no such entry in the user database") from None


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | Path | None = None,
    user: str | None = None,
    log_path: str | Path | None = None,
    stdin: int | None = None,
    die_with_parent: bool = True,
) -> Child:
    """Start ``argv`` in a new session / process group; raise :class:`SpawnError` if it
    cannot be started (the message is one line and names the program, user or file).

    ``env`` is the complete environment (and its PATH is used to find ``argv[0]``).
    ``stdin`` is a descriptor to read from instead of ``/dev/null`` (the sentinel's pipe);
    ``die_with_parent=False`` leaves out PR_SET_PDEATHSIG (only for the sentinel).
    """
    if not argv:
        raise SpawnError("cannot run an empty command")
    program = argv[0]
    uid = gid = None
    groups: list[int] | None = None
    if user is not None:
        pw = _lookup_user(user)
        uid, gid = pw.pw_uid, pw.pw_gid
        try:
            groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
        except OSError:
            groups = [pw.pw_gid]
        if uid == os.geteuid() and gid == os.getegid():
            uid = gid = None
            groups = None
    out = _open_log(log_path)
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=out,
            stderr=out,
            env=dict(env),
            cwd=cwd,
            close_fds=True,
            start_new_session=True,
            user=uid,
            group=gid,
            extra_groups=groups,
            preexec_fn=_die_with_parent(os.getpid()) if die_with_parent else None,
        )
    except OSError as exc:
        raise SpawnError(_exec_error(program, cwd, user, exc)) from None
    except subprocess.SubprocessError as exc:
        raise SpawnError(f"cannot run {program}: {exc}") from None
    finally:
        os.close(out)
    return Child(popen, argv)


def _exec_error(program: str, cwd: str | Path | None, user: str | None, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.filename is not None and str(exc.filename) == program:  # execve() failed
        if isinstance(exc, PermissionError):
            return f"cannot run {program}: {reason} (not an executable file?)"
        return f"cannot run {program}: {reason}"
    # Failed before execve(): chdir() or the switch to another user.
    if cwd is not None and not os.path.isdir(cwd):
        return f"cannot run {program}: working directory {cwd}: {reason}"
    if user is not None:
        return f"cannot run {program} as user {user!r}: {reason}"
    return f"cannot run {program}: {reason}"
