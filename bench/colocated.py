"""Layout A: the cluster's etcd members run on the cluster's own hosts.

The usual production layout, shared by ``bench/failover.py`` (``--layouts hosts``) and
``bench/keepalived_compare.py`` (setup ``vigil-etcd-on-hosts``)::

    with Network(hosts=4) as net:                  # lab.net: hosts are network namespaces
        enter_netns(net.hosts[3].netns)            # this process is the client host now
        lay = Colocated(net, net.hosts[:3], work, vip="10.77.0.100", port=8000,
                        service=[...], node_timeout="3s")
        lay.start()                                # etcd members, apply, agents
        sample = lay.trial("first")                # one host loss, timed
        lay.close()

Three hosts each run an etcd member (clients on HOST:2379, the etcd settings
docs/operations.md recommends: heartbeat 100 ms, election timeout 600 ms, pre-vote)
and ``vigild``; the store URL lists them in order, so the first host is the member
every agent talks to first. One package, ``web``, may run on all three: the address
``vip`` on ``eth0`` and a ``[[service]]`` answering HTTP on ``vip:port`` with a body
whose first word is its node's name. The calling process is the client host: it
probes the address and reads the store from there.

A trial (:meth:`Colocated.trial`) of one *fault*:

* ``first``: the host of the first endpoint of the store URL, not the etcd leader
  (leadership is handed to another member first if needed), runs ``web`` and dies:
  cut off, every process SIGKILLed (etcd member, agent, sentinel, service), link down;
* ``leader``: the etcd leader's host, not the first endpoint, runs ``web`` and dies;
* ``first-leader``: the first endpoint's host is also the etcd leader, and dies;
* ``isolate``: the first endpoint's host (not the leader) runs ``web`` and is cut off
  (its switch port leaves the bridge); its processes live on, and its agent must
  fence itself.

Before the fault: ``web`` is moved onto the victim (``vigil package move``), the
agents of the two other hosts are restarted (they hold no package) so that every one
asks the first endpoint first, as after a start (an agent keeps asking the member that
last worked; after earlier trials they would be spread over the members), every
member is healthy, every node up, the address answers from the victim only; a
random pause of 0..``node_timeout``/3 puts the fault anywhere between two lease
renewals. ``t0`` = ``time.monotonic_ns()`` just before the victim's switch port is cut (then, for
a host that dies, every process in it is SIGKILLed and its link taken down: a machine
that loses power sends nothing, not even the FIN of a killed process's connections);
then the client connects to ``vip:port`` every 10 ms (TCP connect timeout 20 ms)
until another host answers: **outage = that answer - t0**. A :class:`Timeline` watches
the store meanwhile through the members that are not the victim's and gives, since
``t0``: ``gone_ms`` (the victim's node key deleted: its lease expired), ``controller_ms``
(another node took the controller key, when the victim held it), ``assigned_ms`` (the
controller assigned ``web`` elsewhere), ``claimed_ms`` (a node created its owner key),
``running_ms`` (its status says running). Then the victim comes back (link up, etcd
member, agent; or the cut healed) and the next trial starts once all is steady.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for ``lab`` (the scripts run as bench/NAME.py)

if TYPE_CHECKING:  # vigil and lab are imported when used: benchlib.require_vigil() first
    from lab.net import Host, Network
    from vigil.testing.cluster import LocalCluster

CLIENT_PORT = 2379  # lab.cluster.CLIENT_PORT: each member's clients on HOST:2379

FAULTS = {
    "first": "the first endpoint's host (not the etcd leader), which every agent asks first, dies",
    "leader": "the etcd leader's host (not the first endpoint) dies",
    "first-leader": "the first endpoint's host, also the etcd leader, dies",
    "isolate": "the first endpoint's host (not the etcd leader) is cut off",
}
PROBE_EVERY = 0.010
CONNECT_TIMEOUT = 0.020
CLONE_NEWNET = 0x40000000
PKG = "web"
# this process's own store clients (the timeline, LocalCluster.view) would print the
# etcd backend's "asking ... first" warnings on stderr, amid the figures
logging.getLogger("vigil.store.etcd").setLevel(logging.ERROR)


# --------------------------------------------------------------------------- plumbing


def enter_netns(name: str) -> None:
    """Move this thread (the main one: the whole bench) into network namespace
    ``name``; the processes it starts from now on are there too."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        enter_netns_fd(fd)
    finally:
        os.close(fd)


def enter_netns_fd(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def http_get(ip: str, port: int) -> str | None:
    """The body of GET / on IP:PORT, or None (20 ms to connect, then 1 s to answer)."""
    try:
        with socket.create_connection((ip, port), timeout=CONNECT_TIMEOUT) as s:
            s.settimeout(1.0)
            s.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.split(b"\r\n", 1)[0].endswith(b" 200 OK"):
        return None
    return body.decode(errors="replace").strip()


def first_answer(ip: str, port: int, wanted: Any, give_up: float, what: str) -> tuple[int, str]:
    """Probe ``ip:port`` every 10 ms until ``wanted(body)``: the ``time.monotonic_ns()``
    of that answer and its body. RuntimeError naming ``what`` after ``give_up`` s."""
    deadline = time.monotonic() + give_up
    while True:
        body = http_get(ip, port)
        if body is not None and wanted(body):
            return time.monotonic_ns(), body
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: no answer after {give_up:g} s (last: {body!r})")
        time.sleep(PROBE_EVERY)


def poll(what: str, pred: Any, timeout: float, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def has_ip(host: Host, ip: str) -> bool:
    out = host.run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"], check=False).stdout
    return f" {ip}/" in out


def wall_of(t_ns: int) -> float:
    """The wall-clock time of the monotonic instant ``t_ns`` (agents log wall time)."""
    return time.time() - (time.monotonic_ns() - t_ns) / 1e9


def host_cluster(hosts: dict[str, Host], root: Path, **kw: Any) -> LocalCluster:
    """A LocalCluster whose agents run in the lab's hosts (their network namespace and a
    PID namespace of their own), one node per host, named after it."""

    from vigil.supervise.cgroup import find_hierarchy
    from vigil.testing.cluster import LocalCluster

    class HostCluster(LocalCluster):
        def start_agent(self, node: str) -> subprocess.Popen[bytes]:
            log = (self.logs / f"{node}.log").open("ab")
            argv = [str(Path(sys.executable).with_name("vigild")), "--node", node,
                    "--config", str(self.config), "--log-level", "info"]  # fmt: skip
            env = self.env()
            hierarchy = find_hierarchy()
            if self.cgroup_root is not None and hierarchy is not None:
                # `ip netns exec` mounts a sysfs of its own, which hides the host's
                # cgroup mounts: mount cgroup v2 where a booted machine has it, in the
                # agent's own mount namespace (as the fault lab does), and name the
                # same subtree there
                inner = Path("/sys/fs/cgroup") / self.cgroup_root.relative_to(hierarchy)
                env["VIGIL_CGROUP_ROOT"] = str(inner)
                script = 'mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null; exec "$@"'
                argv = ["sh", "-c", script, "sh", *argv]
            proc = hosts[node].popen(argv, pidns=True, stdout=log, stderr=log, env=env)
            log.close()
            self.agents[node] = proc.popen
            self._init.pop(node, None)
            self._ns.pop(node, None)
            self.agent_pid(node)
            return proc.popen

    root.mkdir(parents=True, exist_ok=True)
    return HostCluster(root, list(hosts), isolate=True, **kw)


# --------------------------------------------------------------------------- timeline


def member_status(endpoint: str, timeout: float = 2) -> dict[str, Any] | None:
    """``/v3/maintenance/status`` of one member (its id and the leader's), or None."""
    from vigil.testing.etcd import member_request

    return member_request(endpoint, "/v3/maintenance/status", timeout=timeout)


class Timeline:
    """What the store shows, timed by this process: a watch on the cluster's prefix in
    a thread of its own, from :meth:`start` to :meth:`stop`, through a store from
    ``url`` or, on etcd, through ``endpoints`` (the members a trial does not touch);
    with ``endpoints``, also when another etcd leader than the one at the start is
    elected (polled every 20 ms). Cheaper than reading whole snapshots: the events
    arrive as they happen."""

    def __init__(
        self, cluster: str, *, endpoints: list[str] | None = None, url: str | None = None
    ) -> None:
        if (endpoints is None) == (url is None):
            raise ValueError("Timeline: give endpoints or url")
        self.endpoints = endpoints or []
        self.url = url
        self.prefix = f"/vigil/{cluster}/"
        self.events: list[tuple[int, str, str, bytes]] = []  # (t_ns, PUT|DELETE, key, value)
        self.elected: int | None = None  # t_ns a member first named another leader
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="timeline")
        self._poller = threading.Thread(target=self._poll, daemon=True, name="leader")
        self._leader: str | None = None
        self._error: BaseException | None = None

    def start(self, timeout: float = 10) -> None:
        if self.endpoints:
            status = member_status(self.endpoints[0])
            self._leader = str(status.get("leader")) if status else None
            self._poller.start()
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"timeline: the watch did not start ({self._error!r})")

    def stop(self) -> None:
        self._stopping.set()
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)
        if self._poller.is_alive():
            self._poller.join(10)

    def _poll(self) -> None:
        while not self._stopping.is_set() and self.elected is None:
            for endpoint in self.endpoints:
                status = member_status(endpoint, timeout=0.5)
                leader = str(status.get("leader", "0")) if status else "0"
                if leader not in ("0", self._leader):
                    self.elected = time.monotonic_ns()
                    break
            self._stopping.wait(0.02)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start() or seen as missing figures
            self._error = exc

    async def _main(self) -> None:
        from vigil.store import open_store
        from vigil.store.etcd import EtcdStore

        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        store = open_store(self.url) if self.url else EtcdStore(self.endpoints, timeout=2.0)
        try:
            _, rev = await store.range(self.prefix + "controller")
            self._ready.set()
            with contextlib.suppress(asyncio.CancelledError):
                async for ev in store.watch(self.prefix, rev):
                    self.events.append(
                        (time.monotonic_ns(), ev.type.name, ev.key[len(self.prefix) :], ev.value)
                    )
        finally:
            await store.close()

    def running_since(self, t0: int, away_from: str) -> dict[str, float]:
        """Per package, the seconds from ``t0`` until its status first said running on
        another node than ``away_from`` (what ``vigil status`` shows)."""
        out: dict[str, float] = {}
        for t, kind, key, value in list(self.events):
            if t < t0 or kind != "PUT" or not key.startswith("status/"):
                continue
            pkg = key.removeprefix("status/")
            if pkg in out:
                continue
            with contextlib.suppress(ValueError, AttributeError):
                data = json.loads(value)
                if data.get("state") == "running" and data.get("node") not in (None, away_from):
                    out[pkg] = (t - t0) / 1e9
        return out

    def since(self, t0: int, victim: str, pkg: str) -> dict[str, float | None]:
        """The milestones of a failover of ``pkg`` away from ``victim``, in ms since ``t0``."""

        def first(pred: Any) -> float | None:
            for t, kind, key, value in self.events:
                if t >= t0 and pred(kind, key, value):
                    return round((t - t0) / 1e6, 1)
            return None

        def running(kind: str, key: str, value: bytes) -> bool:
            if kind != "PUT" or key != f"status/{pkg}":
                return False
            with contextlib.suppress(ValueError):
                data = json.loads(value)
                return bool(data.get("state") == "running" and data.get("node") != victim)
            return False

        def assigned(kind: str, key: str, value: bytes) -> bool:
            if kind != "PUT" or key != f"assign/{pkg}":
                return False
            with contextlib.suppress(ValueError):
                return json.loads(value).get("node") not in (None, victim)
            return False

        return {
            "elected_ms": round((self.elected - t0) / 1e6, 1) if self.elected else None,
            "gone_ms": first(lambda k, key, _v: k == "DELETE" and key == f"nodes/{victim}"),
            "controller_ms": first(
                lambda k, key, v: k == "PUT" and key == "controller" and v != victim.encode()
            ),
            "assigned_ms": first(assigned),
            "claimed_ms": first(
                lambda k, key, v: k == "PUT" and key == f"owner/{pkg}" and v != victim.encode()
            ),
            "running_ms": first(running),
        }


# --------------------------------------------------------------------------- the layout


@dataclass
class Member:
    host: Host
    proc: Any = None  # lab.net.HostProcess of its etcd


class Colocated:
    """Three hosts, each an etcd member and a vigil node; the caller is the client
    host (see the module docstring)."""

    def __init__(
        self,
        net: Network,
        hosts: list[Host],
        work: Path,
        *,
        vip: str,
        port: int,
        service: list[str],
        node_timeout: str = "3s",
        name: str = "colocated",
        etcd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        from vigil.config import parse_duration
        from vigil.testing.etcd import find_etcd

        if len(hosts) != 3:
            raise ValueError("layout A has three hosts")
        binary = etcd or find_etcd()
        if binary is None:
            raise RuntimeError("no etcd binary (apt-get install etcd-server)")
        self.etcd_bin = binary
        self.net = net
        self.hosts = hosts
        self.work = work
        self.vip = vip
        self.port = port
        self.name = name
        ttl = parse_duration(node_timeout)
        assert ttl is not None
        self.ttl = ttl
        self.members = {h.name: Member(h) for h in hosts}
        self.store_url = "etcd://" + ",".join(f"{h.addr}:{CLIENT_PORT}" for h in hosts)
        self.cluster = host_cluster(
            {h.name: h for h in hosts},
            work / "vigil",
            name=name,
            store=self.store_url,
            node_timeout=node_timeout,
        )
        command = ", ".join(json.dumps(a) for a in service)
        nodes = ", ".join(f'"{h.name}"' for h in hosts)
        extra_env = "".join(f"{k} = {json.dumps(v)}\n" for k, v in (env or {}).items())
        self.cluster.write_package(
            f'name = "{PKG}"\nnodes = [{nodes}]\n'
            + (f"[env]\n{extra_env}" if extra_env else "")
            + f'[[address]]\nip = "{vip}/24"\ninterface = "eth0"\n'
            f'[[service]]\nname = "http"\ncommand = [{command}]\n'
        )

    # -- etcd -------------------------------------------------------------------

    def endpoint(self, host: Host) -> str:
        return f"http://{host.addr}:{CLIENT_PORT}"

    def start_member(self, host: Host) -> None:
        from lab.cluster import etcd_member_argv

        argv = etcd_member_argv(
            self.etcd_bin, host, self.hosts, self.work / "etcd" / host.name,
            f"vigil-bench-{self.net.prefix}-{self.name}",
        )  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with (self.work / f"etcd-{host.name}.log").open("ab") as log:
            self.members[host.name].proc = host.popen(argv, stdout=log, stderr=log, env=env)

    def healthy(self, host: Host) -> bool:
        from vigil.testing.etcd import member_healthy

        return member_healthy(self.endpoint(host))

    def leader(self) -> Host | None:
        """The member every live member names as leader, or None."""
        ids: dict[str, Host] = {}
        leaders: set[str] = set()
        for h in self.hosts:
            status = member_status(self.endpoint(h))
            if status is None:
                return None
            ids[str(status.get("header", {}).get("member_id"))] = h
            leaders.add(str(status.get("leader")))
        return ids.get(leaders.pop()) if len(leaders) == 1 else None

    def make_leader(self, want: Host | None, avoid: Host | None = None) -> Host:
        """Hand etcd leadership to ``want`` (or to anyone but ``avoid``); the leader."""
        from vigil.testing.etcd import transfer_leadership

        deadline = time.monotonic() + 30
        while True:
            leader = self.leader()
            if leader is not None and (want is None or leader is want) and leader is not avoid:
                return leader
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd leadership: wanted {want}, not {avoid}; got {leader}")
            if leader is not None:
                target = want or next(h for h in self.hosts if h is not avoid)
                transfer_leadership(self.endpoint(leader), self.endpoint(target))
            time.sleep(0.2)

    # -- life cycle ---------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        for h in self.hosts:
            self.start_member(h)
        poll("etcd healthy", lambda: all(self.healthy(h) for h in self.hosts), timeout)
        self.cluster.apply()
        for h in self.hosts:
            self.cluster.start_agent(h.name)
        self.cluster.wait_nodes_up(timeout=timeout)
        self.cluster.wait(lambda v: v["packages"][PKG]["state"] == "running", timeout, "web")

    def close(self) -> None:
        for h in self.hosts:
            with contextlib.suppress(Exception):
                self.net.kill_host(h)
        self.cluster.agents.clear()
        with contextlib.suppress(Exception):
            self.cluster.close()

    def where(self) -> str | None:
        with contextlib.suppress(Exception):
            p = self.cluster.view()["packages"][PKG]
            return str(p["node"]) if p["state"] == "running" else None
        return None

    def answering(self) -> str | None:
        body = http_get(self.vip, self.port)
        return body.split()[0] if body else None

    def steady(self, on: Host, timeout: float = 60) -> None:
        """Every member healthy, every node up, web running on ``on`` and the address
        answering from it alone."""
        poll("etcd healthy", lambda: all(self.healthy(h) for h in self.hosts), timeout)
        self.cluster.wait(
            lambda v: all(n["state"] == "up" for n in v["nodes"].values())
            and v["packages"][PKG]["state"] == "running"
            and v["packages"][PKG]["node"] == on.name,
            timeout,
            f"every node up and web running on {on.name}",
        )
        others = [h for h in self.hosts if h is not on]
        poll(
            f"{self.vip} answering from {on.name} only",
            lambda: self.answering() == on.name and not any(has_ip(h, self.vip) for h in others),
            timeout,
        )

    def asked(self) -> dict[str, dict[str, int]]:
        """Per agent, its open connections to each member (by host name): which
        members the agents ask (``ss`` in each host, connections of ``vigild``)."""
        by_addr = {f"{h.addr}:{CLIENT_PORT}": h.name for h in self.hosts}
        out: dict[str, dict[str, int]] = {}
        for h in self.hosts:
            lines = h.run(
                ["ss", "-Htnp", "state", "established", f"( dport = :{CLIENT_PORT} )"],
                check=False,
            ).stdout.splitlines()
            counts: dict[str, int] = {}
            for line in lines:
                fields = line.split()
                if '"vigild"' in line and len(fields) >= 4 and fields[3] in by_addr:
                    counts[by_addr[fields[3]]] = counts.get(by_addr[fields[3]], 0) + 1
            out[h.name] = counts
        return out

    def fresh_agents(self, keep: Host) -> None:
        """Restart every agent but ``keep``'s (SIGTERM: they hold no package and leave
        at once), so that all of them ask the first endpoint of the store URL first, as
        in a cluster whose etcd members never failed since its agents started."""
        for h in self.hosts:
            if h is not keep:
                self.cluster.stop_agent(h.name)
                self.cluster.start_agent(h.name)
        self.cluster.wait_nodes_up(timeout=60)

    def arrange(self, fault: str) -> Host:
        """Leadership, web and the agents placed for ``fault``; the host it will hit."""
        poll("etcd healthy", lambda: all(self.healthy(h) for h in self.hosts), 60)
        self.cluster.wait_nodes_up(timeout=60)
        first = self.hosts[0]
        if fault in ("first", "isolate"):
            self.make_leader(None, avoid=first)
            victim = first
        elif fault == "leader":
            victim = self.make_leader(None, avoid=first)
        elif fault == "first-leader":
            victim = self.make_leader(first)
        else:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        if self.where() != victim.name:
            self.cluster.vigil("package", "move", PKG, "-n", victim.name, "--wait",
                               "--timeout", "60", timeout=90)  # fmt: skip
        self.fresh_agents(keep=victim)
        self.steady(victim)
        return victim

    def fail(self, fault: str, victim: Host) -> int:
        """Apply ``fault`` to ``victim``; the ``time.monotonic_ns()`` it began."""
        t0 = time.monotonic_ns()
        self.net.isolate(victim)  # first: a machine that dies sends nothing, not even a FIN
        if fault != "isolate":
            self.net.kill_host(victim)
            victim.run(["ip", "link", "set", "eth0", "down"])
        return t0

    def restore(self, fault: str, victim: Host) -> None:
        """The victim comes back: the cut healed, or the machine boots (link up, no
        relocatable address, its etcd member and its agent started)."""
        self.net.heal()
        if fault == "isolate":
            return
        victim.run(["ip", "addr", "flush", "dev", "eth0"])
        victim.run(["ip", "addr", "add", f"{victim.addr}/24", "dev", "eth0"])
        victim.run(["ip", "link", "set", "eth0", "up"])
        victim.run(["ip", "neigh", "flush", "all"], check=False)
        self.start_member(victim)
        self.cluster.agents.pop(victim.name, None)
        self.cluster.start_agent(victim.name)

    def trial(self, fault: str, give_up: float = 30.0) -> dict[str, Any]:
        """One fault, timed (see the module docstring)."""
        victim = self.arrange(fault)
        view = self.cluster.view()
        was_controller = bool(view["nodes"][victim.name].get("controller"))
        asked = self.asked()
        others = [self.endpoint(h) for h in self.hosts if h is not victim]
        timeline = Timeline(self.name, endpoints=others)
        timeline.start()
        time.sleep(random.uniform(0, self.ttl / 3))  # the fault's phase between renewals
        try:
            t0 = self.fail(fault, victim)
            t1, body = first_answer(
                self.vip,
                self.port,
                lambda b: b.split()[0] != victim.name,
                give_up,
                f"{fault}: another host than {victim.name}",
            )
            who = body.split()[0]
            time.sleep(0.2)  # the last milestones (status running) reach the timeline
        finally:
            timeline.stop()
        sample: dict[str, Any] = {
            "fault": fault,
            "from": victim.name,
            "to": who,
            "controller": was_controller,
            # survivors with a connection open to the victim's member at the fault
            "asking_victim": sum(
                1 for name, c in asked.items() if name != victim.name and c.get(victim.name)
            ),
            "ms": round((t1 - t0) / 1e6, 1),
            "wall0": round(wall_of(t0), 3),
            **timeline.since(t0, victim.name, PKG),
        }
        self.restore(fault, victim)
        return sample
