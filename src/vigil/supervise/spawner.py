"""The only path from vigil to the OS for processes.

Every process vigil starts (services, monitor commands, package scripts, hooks, the
sentinel) is started by :func:`spawn`:

* in the package's cgroup when it has one (:mod:`vigil.supervise.cgroup`): the child
  writes itself into ``cgroup.procs`` between fork and exec, so the program and all it
  forks, daemonizes or ``setsid``s are in the cgroup from their first instruction;
* in its own session and process group (``setsid``), so that a command's tree can be
  signalled at once and a terminal's Ctrl-C does not reach it (and, where cgroups
  cannot be used, process groups are the containment, as before);
* with resource limits, umask, and the user's uid, gid and groups when asked
  (:func:`resolve_identity`), then ``PR_SET_PDEATHSIG = SIGKILL`` so that the leader
  dies with the agent (the sentinel, see :mod:`vigil.supervise.sentinel`, takes care
  of the rest);
* stdin from ``/dev/null``, stdout and stderr appended to a log file (whose directory
  is created again if it was removed), no other descriptor inherited.

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
import grp
import logging
import os
import pwd
import resource
import shutil
import signal
import subprocess
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vigil.config import RLIMIT_NAMES
from vigil.errors import SpawnError
from vigil.supervise import procfs
from vigil.supervise.aio import poll_until
from vigil.supervise.cgroup import Cgroup

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

    def __init__(
        self, popen: subprocess.Popen[bytes], argv: Sequence[str], cgroup: Cgroup | None = None
    ) -> None:
        self._popen = popen
        #: The cgroup it was started in (None: process-group containment only).
        self.cgroup = cgroup
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

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the leader only (no error once it is gone; never to a
        process that reused its PID: an unreaped leader keeps its PID)."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

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


class Adopted:
    """A process vigil did not start itself: the main process a ``type = "forking"``
    service names in its ``pid_file`` (systemd's ``Type=forking``). Watched through a
    pidfd, so a reused PID is never mistaken for it. Its exit status is known only if
    it is a child of the agent (an orphan adopted by an agent that is a PID
    namespace's init); otherwise :attr:`returncode` is ``0`` once it is gone.

    It offers what :class:`ProcessRegistry` and the service supervisor use of a
    :class:`Child`: ``pid``, ``pgid``, ``start_time``, ``argv``, ``poll``, ``wait``,
    ``signal``, ``signal_group``, ``group_alive``.
    """

    def __init__(self, pid: int, argv: Sequence[str], cgroup: Cgroup | None = None) -> None:
        self.pid = pid
        self._pidfd: int | None = os.pidfd_open(pid)  # OSError if it is already gone
        self._closer = weakref.finalize(self, _close_fd, self._pidfd)
        try:
            self.pgid = os.getpgid(pid)
        except OSError:
            self.pgid = pid
        self.start_time: int | None = procfs.start_time(pid)
        self.argv: tuple[str, ...] = tuple(argv)
        self.cgroup = cgroup
        self.returncode: int | None = None
        #: False while (or once) its exit status is unknown: it was not our child.
        self.status_known = False

    def __repr__(self) -> str:
        return f"<Adopted pid={self.pid} returncode={self.returncode}>"

    def poll(self) -> int | None:
        if self.returncode is not None or self._pidfd is None:
            return self.returncode
        import select

        ready, _, _ = select.select([self._pidfd], [], [], 0)
        if ready:
            self._finish()
        return self.returncode

    def _finish(self) -> None:
        rc = 0
        try:  # our child (we are init or its subreaper): reap it and keep its status
            assert self._pidfd is not None
            res = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
            if res is not None:
                rc = res.si_status if res.si_code == os.CLD_EXITED else -res.si_status
                self.status_known = True
        except (OSError, AttributeError):
            pass
        self.returncode = rc
        self._closer()
        self._pidfd = None

    async def wait(self) -> int:
        """Wait until the process has exited (safe to cancel)."""
        rc = self.poll()
        if rc is not None:
            return rc
        assert self._pidfd is not None
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        fd = self._pidfd

        def ready() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(fd, ready)
        try:
            await done
        finally:
            loop.remove_reader(fd)
        self._finish()
        assert self.returncode is not None
        return self.returncode

    def signal(self, sig: int) -> None:
        if self.poll() is None and self._pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def signal_group(self, sig: int) -> None:
        """Its process group, while the process itself lives (after that the group
        number may be reused)."""
        if self.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.pgid, sig)

    def group_alive(self) -> bool:
        return self.poll() is None or bool(procfs.group_members(self.pgid))


async def wait_group_gone(child: Child, timeout: float) -> bool:
    """Wait up to ``timeout`` s for the group to be empty; True if it is."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    if child.returncode is None and timeout > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await child.wait()  # usually the group dies with its leader
    remaining = max(0.0, deadline - loop.time())
    return await poll_until(lambda: not child.group_alive(), remaining)


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


_unopenable_logs: set[str] = set()


def _open_log(log_path: str | Path | None) -> int:
    """The descriptor a child's stdout and stderr go to. A log that cannot be opened
    never stops a process from starting: its directory is created again if it was
    removed, and if the file still cannot be opened the output goes to /dev/null
    (said in the agent log)."""
    if log_path is None:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        fd = os.open(log_path, flags, 0o640)
        _unopenable_logs.discard(str(log_path))
        return fd
    except FileNotFoundError as exc:
        error: OSError = exc
        try:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            return os.open(log_path, flags, 0o640)
        except OSError as again:
            error = again
    except OSError as exc:
        error = exc
    if str(log_path) not in _unopenable_logs:  # said once per file, not per spawn
        _unopenable_logs.add(str(log_path))
        log.error(
            "cannot open log file %s (%s): output goes to /dev/null", log_path, error.strerror
        )
    return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)


@dataclass(frozen=True)
class Identity:
    """Who a process runs as, from the user and group databases (as ``su -`` and
    systemd's ``User=``/``Group=`` set it): uid, gid, supplementary groups, and the
    HOME, USER, LOGNAME and SHELL it should see."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    env: Mapping[str, str]


def lookup_user(user: str) -> pwd.struct_passwd:
    """The passwd entry of a name or numeric uid; :class:`SpawnError` if there is none."""
    try:
        if user.isdigit():
            return pwd.getpwuid(int(user))
        return pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise SpawnError(f"unknown user {user!r}: no such entry in the user database") from None


def lookup_group(group: str) -> int:
    """The gid of a group name or number; :class:`SpawnError` if there is none."""
    try:
        if group.isdigit():
            return grp.getgrgid(int(group)).gr_gid
        return grp.getgrnam(group).gr_gid
    except (KeyError, ValueError):
        raise SpawnError(f"unknown group {group!r}: no such entry in the group database") from None


def resolve_identity(user: str | None, group: str | None) -> Identity | None:
    """The identity for ``user`` and/or ``group`` (None: run as the agent runs).

    With a user: its uid, its primary gid (or ``group``'s), the groups it is a member
    of, and HOME/USER/LOGNAME/SHELL from its passwd entry. With only a group: the
    agent's uid with that gid and no supplementary groups.
    """
    if user is None and group is None:
        return None
    gid = lookup_group(group) if group is not None else None
    if user is None:
        assert gid is not None
        return Identity(os.geteuid(), gid, (gid,), {})
    pw = lookup_user(user)
    primary = pw.pw_gid if gid is None else gid
    try:
        groups = set(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except OSError:
        groups = {pw.pw_gid}
    groups.add(primary)
    env = {
        "HOME": pw.pw_dir,
        "USER": pw.pw_name,
        "LOGNAME": pw.pw_name,
        "SHELL": pw.pw_shell or "/bin/sh",
    }
    return Identity(pw.pw_uid, primary, tuple(sorted(groups)), env)


#: Resource limits a service may set (``limit_nofile`` is systemd's ``LimitNOFILE=``):
#: name -> ``resource.RLIMIT_*``.
RLIMITS: dict[str, int] = {
    name: getattr(resource, "RLIMIT_" + name.upper())
    for name in RLIMIT_NAMES
    if hasattr(resource, "RLIMIT_" + name.upper())
}


def _preexec(
    *,
    parent_pid: int,
    die_with_parent: bool,
    procs_fd: int | None,
    limits: Sequence[tuple[str, int, int, int]],
    umask: int | None,
    identity: Identity | None,
    cwd: str | None,
    err_fd: int,
) -> Callable[[], None]:
    """The child's set-up between fork and exec, in this order: join the cgroup (so
    nothing runs outside it), resource limits (before the uid switch, which would
    forbid raising them), umask, groups/gid/uid, the working directory (after the uid
    switch, as systemd's ``WorkingDirectory=``: the user must be allowed into it),
    PR_SET_PDEATHSIG (after the uid switch, which would otherwise clear it). On failure
    the reason goes to ``err_fd`` and the exception makes Popen raise; nothing here
    may import or allocate much."""
    write, setrlimit = os.write, resource.setrlimit

    def setup() -> None:
        step = "joining its cgroup"
        try:
            if procs_fd is not None:
                write(procs_fd, b"0")
            for name, res, soft, hard in limits:
                step = f"setting limit_{name}"
                setrlimit(res, (soft, hard))
            if umask is not None:
                os.umask(umask)
            if identity is not None:
                step = f"switching to uid {identity.uid} gid {identity.gid}"
                os.setgroups(list(identity.groups))
                os.setresgid(identity.gid, identity.gid, identity.gid)
                os.setresuid(identity.uid, identity.uid, identity.uid)
            if cwd is not None:
                step = f"working directory {cwd}"
                os.chdir(cwd)
            step = "setting PR_SET_PDEATHSIG"
            if die_with_parent:
                if _prctl is not None:
                    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0)
                if os.getppid() != parent_pid:  # the parent died before prctl took effect
                    os.kill(os.getpid(), signal.SIGKILL)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            with contextlib.suppress(OSError):
                write(err_fd, f"{step}: {reason}".encode(errors="replace"))
            raise

    return setup


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | Path | None = None,
    user: str | None = None,
    group: str | None = None,
    umask: int | None = None,
    limits: Mapping[str, tuple[int, int]] | None = None,
    cgroup: Cgroup | None = None,
    log_path: str | Path | None = None,
    stdin: int | None = None,
    pass_fds: Sequence[int] = (),
    die_with_parent: bool = True,
) -> Child:
    """Start ``argv`` in a new session / process group; raise :class:`SpawnError` if it
    cannot be started (the message is one line and names the program, user or file).

    ``env`` is the complete environment (and its PATH is used to find ``argv[0]``).
    ``user``/``group`` switch identity (see :func:`resolve_identity`; the caller puts
    the identity's HOME, USER, ... in ``env``); ``umask``; ``limits``: resource name
    (see :data:`RLIMITS`) -> (soft, hard), ``resource.RLIM_INFINITY`` for no limit.
    ``cgroup``: the process is moved into it before it runs any of ``argv``'s code,
    so everything it forks is born there. ``stdin`` is a descriptor to read from
    instead of ``/dev/null`` (the sentinel's pipe); ``die_with_parent=False`` leaves
    out PR_SET_PDEATHSIG (the sentinel, which also inherits ``pass_fds``, and commands
    run to completion, which the sentinel kills). A command that needs none of
    identity, limits, umask, PR_SET_PDEATHSIG or ``pass_fds`` is started without a
    pre-exec hook (see :func:`_spawn_plain`).
    """
    if not argv:
        raise SpawnError("cannot run an empty command")
    program = argv[0]
    identity = resolve_identity(user, group)
    if identity is not None and (identity.uid, identity.gid) == (os.geteuid(), os.getegid()):
        identity = None if set(identity.groups) == set(os.getgroups()) else identity
    rl = []
    for name, (soft, hard) in (limits or {}).items():
        if name not in RLIMITS:
            raise SpawnError(f"cannot run {program}: unknown resource limit {name!r}")
        rl.append((name, RLIMITS[name], soft, hard))
    procs_fd: int | None = None
    if cgroup is not None:
        try:
            cgroup.create()
            procs_fd = cgroup.open_procs()
        except OSError as exc:
            raise SpawnError(
                f"cannot run {program}: cannot use cgroup {cgroup.path}: {exc.strerror}"
            ) from None
    if not die_with_parent and identity is None and not rl and umask is None and not pass_fds:
        return _spawn_plain(argv, env, cwd, cgroup, log_path, stdin)
    err_r, err_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    out = _open_log(log_path)
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=out,
            stderr=out,
            env=dict(env),
            close_fds=True,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
            preexec_fn=_preexec(
                parent_pid=os.getpid(),
                die_with_parent=die_with_parent,
                procs_fd=procs_fd,
                limits=rl,
                umask=umask,
                identity=identity,
                cwd=None if cwd is None else str(cwd),
                err_fd=err_w,
            ),
        )
    except OSError as exc:
        raise SpawnError(_exec_error(program, cwd, user, exc)) from None
    except subprocess.SubprocessError as exc:
        detail = ""
        with contextlib.suppress(OSError):
            detail = os.read(err_r, 512).decode(errors="replace")
        raise SpawnError(f"cannot run {program}: {detail or exc}") from None
    finally:
        for fd in (out, err_r, err_w, procs_fd):
            if fd is not None:
                os.close(fd)
    return Child(popen, argv, cgroup)


#: How a child forked without a pre-exec hook joins its cgroup: the shell writes its
#: own PID to ``cgroup.procs`` ($0), then becomes the command ("$@").
_JOIN_CGROUP = 'echo 0 >"$0" || exit 126; exec "$@"'


def _spawn_plain(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str | Path | None,
    cgroup: Cgroup | None,
    log_path: str | Path | None,
    stdin: int | None,
) -> Child:
    """:func:`spawn` for a command that needs nothing between fork and exec but its
    cgroup: no identity, limits, umask or PR_SET_PDEATHSIG (monitors, scripts and hooks
    run as root, which the sentinel kills with their cgroup or process group if the agent
    dies). Without a ``preexec_fn`` Python forks with vfork, which does not copy the
    agent's page tables: at 10 monitor runs a second that is most of an idle agent's
    CPU. The cgroup is joined by ``/bin/sh`` (:data:`_JOIN_CGROUP`) before it execs the
    command, so the command still runs none of its code outside it. A missing or
    non-executable program is found here, so that the error stays one clear line."""
    program = argv[0]
    where = Path(cwd) if cwd is not None else Path.cwd()
    found: str | None
    if "/" in program:
        path = program if os.path.isabs(program) else str(where / program)
        found = path if os.path.isfile(path) else None
    else:
        found = shutil.which(program, path=env.get("PATH", os.defpath))
    if found is None:
        raise SpawnError(f"cannot run {program}: No such file or directory")
    if not os.access(found, os.X_OK):
        raise SpawnError(f"cannot run {program}: Permission denied (not an executable file?)")
    if cwd is not None and not os.path.isdir(cwd):
        raise SpawnError(f"cannot run {program}: working directory {cwd}: No such directory")
    cmd = list(argv)
    if cgroup is not None:
        try:
            cgroup.create()
        except OSError as exc:
            raise SpawnError(
                f"cannot run {program}: cannot use cgroup {cgroup.path}: {exc.strerror}"
            ) from None
        cmd = ["/bin/sh", "-c", _JOIN_CGROUP, str(cgroup.path / "cgroup.procs"), *argv]
    out = _open_log(log_path)
    try:
        popen = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=out,
            stderr=out,
            env=dict(env),
            cwd=cwd,
            close_fds=True,
            start_new_session=True,
        )
    except OSError as exc:
        raise SpawnError(_exec_error(program, cwd, None, exc)) from None
    finally:
        os.close(out)
    return Child(popen, argv, cgroup)


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
