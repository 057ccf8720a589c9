"""Hosts as Linux network namespaces on a private bridge: the lab's machines.

::

    from lab.net import Network, cleanup_stale

    with Network(hosts=3) as net:           # vgl<pid>-h1 .. -h3 on 10.77.0.0/24
        h1, h2, h3 = net.hosts
        h1.run(["ip", "-br", "addr"])       # one command inside h1's network namespace
        p = h2.popen(["vigild", ...], pidns=True, stdout=log)  # its own PID namespace too
        net.isolate(h3)                     # h3 cut off from every other host
        net.partition([[h1], [h2, h3]])     # two islands
        net.degrade(h1, loss=10, delay_ms=50)
        net.heal()                          # one bridge again, no loss or delay
        net.kill_host(h2)                   # SIGKILL of everything running in h2
    # every namespace, link and process the Network made is gone here

Layout: one extra namespace, the *switch* (``<prefix>-sw``), holds the bridge
``br0``; each host ``<prefix>-hN`` has a veth ``eth0`` (address ``10.77.0.(10+N)/24``)
whose peer ``hN`` is a port of ``br0`` in the switch. Nothing is created in the
caller's own network namespace, so traffic stays inside the lab and parallel
Networks never collide: the subnet is the same, the wires are not (the default
``prefix`` is ``vgl<pid>``).

Faults are changes to the switch: :meth:`Network.partition` moves the ports of
each group onto a bridge of their own (``br0``, ``br1``, ...), a host in no group
has no bridge at all; :meth:`Network.heal` puts every port back on ``br0``.
:meth:`Network.degrade` uses ``tc netem`` where the kernel has it; without it
(``CONFIG_NET_SCH_NETEM`` unset) loss is an nftables ``numgen random`` drop rule and
delay a ``tbf`` rate limit (queueing delay under load, not a fixed one); the
returned string says which.

Processes: :meth:`Host.popen` runs ``ip netns exec NS [setpriv --pdeathsig KILL]
[unshare --pid --fork --mount-proc --kill-child] ARGV``. With ``pidns=True`` the
command is PID 1 of a fresh PID namespace, so SIGKILL of it takes down everything it
started (:meth:`HostProcess.kill_tree`). :meth:`Network.kill_host` kills every
process in the host's network namespace (``ip netns pids``), pid-namespace inits
first: the whole machine is gone at once.

Cleanup: :meth:`Network.close` (also on ``__exit__``, Ctrl-C, and SIGTERM while
inside the ``with`` in the main thread, which raises :class:`SystemExit`) kills every
process in the lab's namespaces and deletes them; deleting a namespace deletes its
links. Processes started through :meth:`Host.popen` get SIGKILL if the lab process
itself is killed (``--pdeathsig``). :func:`cleanup_stale` removes what a crashed
earlier run (``kill -9`` of the lab) left behind; :func:`cleanup_dead` does that for
every lab whose process is gone, leaving running labs alone. Needs root and iproute2.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any

from vigil.testing.cluster import _children as children

__all__ = [
    "Host",
    "HostProcess",
    "Network",
    "NetworkError",
    "children",
    "cleanup_dead",
    "cleanup_stale",
    "list_netns",
    "netns_pids",
]

SUBNET = "10.77.0"  # /24; hosts are .11, .12, ...; .100 and up are free for packages
PREFIX_LEN = 24
_UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
_PDEATHSIG = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []


class NetworkError(RuntimeError):
    """A namespace, link or qdisc could not be made (not root, no iproute2...)."""


def _ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    argv = ["ip", *args] if netns is None else ["ip", "-n", netns, *args]
    return _sh(argv, check=check)


def _sh(argv: Sequence[str], *, check: bool = True) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetworkError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def list_netns(prefix: str = "") -> list[str]:
    """Names of the named network namespaces starting with ``prefix``."""
    out = _sh(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def netns_pids(netns: str) -> list[int]:
    """Host PIDs of the live processes in ``netns`` (empty if it is gone)."""
    out = _sh(["ip", "netns", "pids", netns], check=False)
    return [int(x) for x in out.split() if x.isdigit()]


def _is_pidns_init(pid: int) -> bool:
    """True for PID 1 of a PID namespace other than ours (``NSpid: HOST 1``)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    ids = line.split()[1:]
                    return len(ids) > 1 and ids[-1] == "1"
    except OSError:
        return False
    return False


def _kill_netns_processes(netns: str, timeout: float = 10.0) -> None:
    """SIGKILL every process of ``netns`` (PID namespace inits first) until none is left."""
    deadline = time.monotonic() + timeout
    while pids := netns_pids(netns):
        pids.sort(key=lambda p: not _is_pidns_init(p))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise NetworkError(f"processes {pids} survived SIGKILL in netns {netns}")
        time.sleep(0.01)


def cleanup_stale(prefix: str = "vgl") -> list[str]:
    """Kill the processes of, and delete, every network namespace named ``prefix*``
    (what a crashed earlier run left). Returns the names removed. Careful with a
    short prefix while another lab runs: ``vgl`` matches every lab's namespaces."""
    removed = []
    for name in list_netns(prefix):
        with contextlib.suppress(NetworkError):
            _kill_netns_processes(name)
        _ip("netns", "del", name, check=False)
        removed.append(name)
    return removed


def cleanup_dead(prefix: str = "vgl") -> list[str]:
    """:func:`cleanup_stale` of every ``<prefix><pid>-*`` namespace whose ``pid`` is no
    live process: what labs killed with SIGKILL left, never a running lab's."""
    removed = []
    owners = {name.split("-", 1)[0] for name in list_netns(prefix) if "-" in name}
    for owner in sorted(owners):
        pid = owner[len(prefix) :]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            removed += cleanup_stale(owner + "-")
    return removed


@dataclass
class HostProcess:
    """A process started in a host by :meth:`Host.popen`."""

    host: Host
    popen: subprocess.Popen[bytes]
    pidns: bool

    @property
    def pid(self) -> int:
        """Host PID of the ``ip netns exec`` / ``setpriv`` / ``unshare`` process."""
        return self.popen.pid

    def init_pid(self, timeout: float = 10.0) -> int:
        """Host PID of the command itself: with ``pidns``, PID 1 of its namespace
        (the child of ``unshare``); otherwise the Popen's PID (``ip netns exec`` and
        ``setpriv`` exec the command)."""
        if not self.pidns:
            return self.popen.pid
        deadline = time.monotonic() + timeout
        while True:
            for pid in children(self.popen.pid):
                if _is_pidns_init(pid):
                    return pid
            if self.popen.poll() is not None:
                raise NetworkError(f"{self.host.name}: process exited {self.popen.returncode}")
            if time.monotonic() > deadline:
                raise NetworkError(f"{self.host.name}: no PID namespace init appeared")
            time.sleep(0.005)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill_tree(self, timeout: float = 10.0) -> None:
        """SIGKILL the command (with ``pidns``: its whole PID namespace) and reap it."""
        if self.popen.poll() is None:
            with contextlib.suppress(NetworkError, ProcessLookupError):
                os.kill(self.init_pid(timeout=1.0), signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
        self.popen.wait(timeout=timeout)


@dataclass
class Host:
    """One lab machine: a network namespace with one address on the lab's bridge."""

    name: str  # h1, h2, ...
    netns: str  # <prefix>-h1
    addr: str  # 10.77.0.11
    index: int  # 1-based
    port: str  # its bridge port in the switch namespace (h1)
    processes: list[HostProcess] = field(default_factory=list)

    def argv(self, argv: Sequence[str], *, pidns: bool = False) -> list[str]:
        """The command line that runs ``argv`` in this host (see :meth:`popen`)."""
        return ["ip", "netns", "exec", self.netns, *_PDEATHSIG, *(_UNSHARE if pidns else []), *argv]

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 60, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in this host's network namespace and wait for it (text output)."""
        proc = subprocess.run(
            self.argv(argv), capture_output=True, text=True, timeout=timeout, check=False, **kw
        )
        if check and proc.returncode != 0:
            raise NetworkError(
                f"{self.name}: {' '.join(argv)} exited {proc.returncode}: "
                f"{proc.stdout}{proc.stderr}"
            )
        return proc

    def popen(self, argv: Sequence[str], *, pidns: bool = False, **kw: Any) -> HostProcess:
        """Start ``argv`` in this host; ``pidns``: as PID 1 of a new PID namespace, so
        that killing it kills all it started. ``kw`` go to :class:`subprocess.Popen`
        (``start_new_session=True`` and ``stdin=DEVNULL`` unless given)."""
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = HostProcess(self, subprocess.Popen(self.argv(argv, pidns=pidns), **kw), pidns)
        self.processes.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Host PIDs of every live process in this host."""
        return netns_pids(self.netns)


class Network:
    """``hosts`` network namespaces on one bridge (see the module docstring)."""

    def __init__(self, hosts: int = 3, *, prefix: str | None = None) -> None:
        if not 1 <= hosts <= 80:
            raise ValueError("a lab network has 1 to 80 hosts")
        self.prefix = prefix or f"vgl{os.getpid()}"
        self.switch = f"{self.prefix}-sw"
        self.hosts = [
            Host(f"h{i}", f"{self.prefix}-h{i}", f"{SUBNET}.{10 + i}", i, f"h{i}")
            for i in range(1, hosts + 1)
        ]
        self._bridges = ["br0"]
        self._degraded: set[str] = set()
        self._closed = False
        self._old_sigterm: Any = None
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    # -- building -------------------------------------------------------------

    def _create(self) -> None:
        if list_netns(self.prefix + "-"):
            raise NetworkError(f"namespaces {self.prefix}-* exist; cleanup_stale({self.prefix!r})")
        _ip("netns", "add", self.switch)
        _ip("link", "set", "lo", "up", netns=self.switch)
        _ip("link", "add", "br0", "type", "bridge", netns=self.switch)
        _ip("link", "set", "br0", "up", netns=self.switch)
        for h in self.hosts:
            _ip("netns", "add", h.netns)
            _ip("link", "set", "lo", "up", netns=h.netns)
            _ip("link", "add", h.port, "type", "veth", "peer", "name", "eth0", "netns", h.netns,
                netns=self.switch)  # fmt: skip
            _ip("link", "set", h.port, "master", "br0", netns=self.switch)
            _ip("link", "set", h.port, "up", netns=self.switch)
            _ip("addr", "add", f"{h.addr}/{PREFIX_LEN}", "dev", "eth0", netns=h.netns)
            _ip("link", "set", "eth0", "up", netns=h.netns)

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if name in (h.name, h.netns, h.addr):
                return h
        raise KeyError(name)

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    # -- faults ---------------------------------------------------------------

    def partition(self, groups: Sequence[Sequence[Host]]) -> None:
        """Each group on a bridge of its own; a host in no group is cut off."""
        placed: dict[str, int] = {}
        for i, group in enumerate(groups):
            for h in group:
                placed[h.name] = i
        while len(self._bridges) < len(groups):
            br = f"br{len(self._bridges)}"
            _ip("link", "add", br, "type", "bridge", netns=self.switch)
            _ip("link", "set", br, "up", netns=self.switch)
            self._bridges.append(br)
        for h in self.hosts:
            if h.name in placed:
                _ip("link", "set", h.port, "master", self._bridges[placed[h.name]],
                    netns=self.switch)  # fmt: skip
            else:
                _ip("link", "set", h.port, "nomaster", netns=self.switch)

    def isolate(self, host: Host) -> None:
        """Cut ``host`` off from every other host (they still see each other)."""
        self.partition([[h for h in self.hosts if h is not host]])

    def degrade(self, host: Host, *, loss: int = 0, delay_ms: int = 0) -> str:
        """Packet loss (percent) and delay on ``host``'s link, both directions.
        Returns what was applied: ``netem ...`` or, without netem in the kernel,
        ``nft-loss ... tbf ...`` (see the module docstring)."""
        self._degraded.add(host.name)
        done = []
        netem = ["netem"]
        if delay_ms:
            netem += ["delay", f"{delay_ms}ms"]
        if loss:
            netem += ["loss", f"{loss}%"]
        with contextlib.suppress(NetworkError):
            for ns, dev in ((host.netns, "eth0"), (self.switch, host.port)):
                _ip_tc(ns, "qdisc", "replace", "dev", dev, "root", *netem)
            return " ".join(netem)
        if loss:
            script = (
                "table inet lab {\n"
                "  chain in { type filter hook input priority 0;\n"
                f"    meta iifname eth0 numgen random mod 100 < {loss} drop\n  }}\n"
                "  chain out { type filter hook output priority 0;\n"
                f"    meta oifname eth0 numgen random mod 100 < {loss} drop\n  }}\n"
                "}\n"
            )
            host.run(["nft", "-f", "-"], input=script)
            done.append(f"nft-loss {loss}%")
        if delay_ms:
            # A slow link: 64 kbit/s with a queue worth delay_ms * 4 of it.
            for ns, dev in ((host.netns, "eth0"), (self.switch, host.port)):
                _ip_tc(ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", "64kbit",
                       "burst", "4kb", "latency", f"{delay_ms * 4}ms")  # fmt: skip
            done.append("tbf 64kbit")
        return " ".join(done)

    def heal(self) -> None:
        """Every host on ``br0`` again, no loss, no delay."""
        for h in self.hosts:
            _ip("link", "set", h.port, "master", "br0", netns=self.switch)
        for name in sorted(self._degraded):
            h = self.host(name)
            for ns, dev in ((h.netns, "eth0"), (self.switch, h.port)):
                _ip_tc(ns, "qdisc", "del", "dev", dev, "root", check=False)
            h.run(["nft", "delete", "table", "inet", "lab"], check=False)
        self._degraded.clear()

    def kill_host(self, host: Host, timeout: float = 10.0) -> int:
        """SIGKILL every process running in ``host`` and wait until none is left.
        Returns the ``time.monotonic_ns()`` just before the first SIGKILL."""
        t0 = time.monotonic_ns()
        _kill_netns_processes(host.netns, timeout)
        for p in host.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=timeout)
        host.processes.clear()
        return t0

    # -- teardown -------------------------------------------------------------

    def close(self) -> None:
        """Kill every process in the lab's namespaces and delete them (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for h in self.hosts:
            with contextlib.suppress(NetworkError):
                _kill_netns_processes(h.netns)
            for p in h.processes:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(timeout=5)
            h.processes.clear()
        for name in [h.netns for h in self.hosts] + [self.switch]:
            if name in list_netns(name):
                _ip("netns", "del", name, check=False)

    def __enter__(self) -> Network:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            with contextlib.suppress(ValueError):  # not the main thread: leave it
                self._old_sigterm = signal.signal(signal.SIGTERM, _sigterm_exit)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        finally:
            if self._old_sigterm is not None:
                with contextlib.suppress(ValueError):
                    signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None


def _ip_tc(netns: str, *args: str, check: bool = True) -> str:
    return _sh(["ip", "netns", "exec", netns, "tc", *args], check=check)


def _sigterm_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)
