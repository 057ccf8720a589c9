"""Failover of a relocatable IP serving HTTP: vigil beside keepalived, host loss.

Run (from the repository root, as root, with the project's virtual environment)::

    .venv/bin/python bench/keepalived_compare.py               # 20 trials per setup
    .venv/bin/python bench/keepalived_compare.py --quick       # 3 trials per setup

What it measures
----------------
The fault lab (:mod:`lab.net`): hosts are network namespaces on one bridge (in a
switch namespace of their own). Each setup gets a pair of hosts, A and B, and its own
relocatable IP (``10.77.0.10K/24``) on which HTTP port 8080 must answer; the last
host is the *client*: it runs the prober and the 3-member etcd the vigil setups use
(so the store is on neither A nor B). The setups (``--setups``, all by default):

* ``keepalived``: Debian's keepalived, its defaults (VRRPv2, ``advert_int 1``): one
  ``vrrp_instance`` on ``eth0`` with the IP as ``virtual_ipaddress``, A ``state
  MASTER priority 150``, B ``state BACKUP priority 100`` (so B takes over after the
  master-down interval 3 x 1 s + (256 - 100) / 256 s = 3.61 s without an advert). An
  HTTP server runs on A and B all the time (keepalived moves the IP, not services);
* ``vigil``: vigil's defaults (``node_timeout = "3s"``): one package on nodes A and B
  with the IP as ``[[address]]`` on ``eth0`` and the HTTP server as ``[[service]]``
  (so vigil also starts the server on failover); ``vigild`` runs in each host;
* ``vigil-4s``: the same with ``node_timeout = "4s"``, to match keepalived's 3.61 s
  detection: etcd leases are whole seconds, so 3.61 s would be a 4 s lease anyway;
* ``keepalived-3s``: keepalived tuned to vigil's detection time: ``version 3``,
  ``advert_int 0.83`` (master-down 3 x 0.83 + 156 x 0.83 / 256 = 2.996 s);
* ``vigil-etcd-on-hosts``: vigil's defaults in the usual layout, *layout A*
  (``bench/colocated.py``): three hosts, each running an etcd member and ``vigild``,
  the package on all three; each trial kills the host of the first endpoint of the
  store URL (not the etcd leader), which runs the package and which every agent asks
  first: the store loses that member with the node;
* ``vigil-etcd-leader-on-host``: the same, the host killed is the etcd leader's: the
  store also elects a new leader, and etcd extends every lease by its election
  timeout when it does.

The HTTP server is the same tiny program everywhere (``python -S``, standard
library socket only); it answers every request with its host's name.

Each trial, setups interleaved round-robin: the setup is steady (the IP answers from
its active host X, the other host has the IP not configured and its agent or
keepalived running); a random pause of 0..1 s (the kill falls anywhere between two
keepalived adverts or two vigil lease renewals, every 1 s and 0.5 s); then X *dies*:
``t0`` = ``time.monotonic_ns()``, SIGKILL of every process in X's namespace
(:meth:`lab.net.Network.kill_host`: keepalived or vigild with its PID namespace, the
HTTP server) and X's switch port cut (:meth:`~lab.net.Network.isolate`), so that X's
kernel no longer answers ARP or TCP for the IP either. The client then connects to
IP:8080 every 10 ms (TCP connect timeout 20 ms) until an answer comes from the other
host: **failover = that answer - t0**. (The layout-A setups run the same probe from the
same client through ``colocated.Colocated.trial``, which cuts the victim's port
first, then kills its processes, and moves the package onto the victim before each
trial; see that module.) The client's ARP entry for the IP still names
X's MAC: it learns the new one from the new holder's gratuitous ARP (keepalived's own,
vigil's ``arping -U -c 3``, sent in the background), exactly as a client on the same
LAN would. Then X "reboots": its leftover IP and neighbour cache are flushed, its port
put back, its processes started again. keepalived's A preempts (the IP moves back to A
before the next trial); vigil's package stays where it is (``failback_policy =
"manual"``), so the next vigil trial kills the other host: each vigil trial kills the
host that runs the package and, in practice, the controller too (the worst case).

Figures per setup: p50 / p95 / p99 / max / mean / min (nearest rank; with 20 trials,
p99 is the maximum) and the ratios keepalived ÷ vigil of p50 and p99 for the pairs
(keepalived, vigil), (keepalived, vigil-4s), (keepalived-3s, vigil) and keepalived
beside each layout-A setup. For vigil, the survivor's agent log also gives **planned**
(the controller ordered the start) and **service** (the agent started the HTTP
service, after the address), both since the kill (in layout A, the store's own
timeline: lease gone, assigned, claimed, running; see ``bench/colocated.py``); for
keepalived, the client records the VRRP adverts it receives: **phase**
(kill - the master's last advert) and **takeover** (the backup's first advert - kill).
The bench process itself moves into the client host's network namespace (``setns``)
once the lab is up: the prober, the etcd members and the ``vigil`` commands all run
there. Target: vigil's p99 under keepalived's, both with defaults. The load average at
the start and end is recorded (the machine may be shared). A table, then one JSON line,
are printed; every sample goes to ``bench/results/keepalived_compare.json``; ``--plot``
(default ``docs/img/failover-keepalived.png``) draws the distributions when matplotlib
is installed (the ``dev`` extra). Needs root, iproute2, keepalived (``apt-get install
keepalived``), arping (``iputils-arping``) and an etcd binary.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib
import colocated
from colocated import enter_netns, enter_netns_fd, has_ip, poll

ROOT = colocated.ROOT

NAME = "keepalived_compare"
PORT = 8080
DEFAULT_PLOT = ROOT / "docs" / "img" / "failover-keepalived.png"


@dataclass(frozen=True)
class Setup:
    name: str
    kind: str  # keepalived | vigil
    detection_s: float  # keepalived master-down interval or vigil node_timeout
    node_timeout: str = ""  # vigil
    keepalived_extra: str = ""  # lines in the vrrp_instance
    fault: str = ""  # vigil with its etcd on its own 3 hosts (layout A): colocated.FAULTS

    @property
    def hosts(self) -> int:
        return 3 if self.fault else 2


SETUPS = {
    s.name: s
    for s in (
        Setup("keepalived", "keepalived", 3 + 156 / 256),
        Setup("vigil", "vigil", 3.0, node_timeout="3s"),
        Setup("vigil-4s", "vigil", 4.0, node_timeout="4s"),
        Setup(
            "keepalived-3s",
            "keepalived",
            3 * 0.83 + 156 * 0.83 / 256,
            keepalived_extra="    version 3\n    advert_int 0.83\n",
        ),
        Setup("vigil-etcd-on-hosts", "vigil", 3.0, node_timeout="3s", fault="first"),
        Setup("vigil-etcd-leader-on-host", "vigil", 3.0, node_timeout="3s", fault="leader"),
    )
}
# (keepalived-like, vigil-like) pairs whose ratios are reported
PAIRS = [
    ("keepalived", "vigil"),
    ("keepalived", "vigil-4s"),
    ("keepalived-3s", "vigil"),
    ("keepalived", "vigil-etcd-on-hosts"),
    ("keepalived", "vigil-etcd-leader-on-host"),
]

HTTPD = """\
# The HTTP server of the benchmark: answers every request with the host's name.
import os, socket, sys, time
name = sys.argv[1] if sys.argv[1] != "-" else os.environ.get("VIGIL_NODE", "?")
body = (name + "\\n").encode()
reply = b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n" % len(body)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
while True:
    try:
        s.bind(("0.0.0.0", int(sys.argv[2])))
        break
    except OSError:
        time.sleep(0.01)
s.listen(128)
while True:
    c, _ = s.accept()
    try:
        c.settimeout(1.0)
        c.recv(4096)
        c.sendall(reply + body)
    except OSError:
        pass
    finally:
        c.close()
"""

# EtcdCluster binds its members to 127.0.0.1; the lab's hosts must reach them on the
# client host's address: add it to the client URLs (peers stay on 127.0.0.1).
ETCD_WRAPPER = """\
#!/bin/sh
prev=
for a in "$@"; do
    shift
    orig=$a
    case "$prev" in
        --listen-client-urls) a="$a,http://{addr}:${{a##*:}}" ;;
        --advertise-client-urls) a="http://{addr}:${{a##*:}}" ;;
    esac
    set -- "$@" "$a"
    prev=$orig
done
exec {etcd} "$@"
"""

KEEPALIVED_CONF = """\
global_defs {{
    router_id {host}
}}
vrrp_instance VI_{vrid} {{
    state {state}
    interface eth0
    virtual_router_id {vrid}
    priority {priority}
{extra}    virtual_ipaddress {{
        {vip}/24
    }}
}}
"""


# --------------------------------------------------------------------------- plumbing


def http_get(ip: str, port: int = PORT) -> str | None:
    return colocated.http_get(ip, port)


class VrrpListener:
    """Every VRRP advertisement the client host receives, timed: (monotonic ns, source
    address, virtual router id, priority). A daemon thread on a raw socket (IP protocol
    112) joined to 224.0.0.18; it is in the network namespace of the thread that
    starts it."""

    def __init__(self, local_addr: str) -> None:
        self.adverts: list[tuple[int, str, int, int]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, 112)
        mreq = socket.inet_aton("224.0.0.18") + socket.inet_aton(local_addr)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        threading.Thread(target=self._run, daemon=True, name="vrrp-listener").start()

    def _run(self) -> None:
        while True:
            try:
                data, (src, _) = self.sock.recvfrom(2048)
            except OSError:
                return
            t = time.monotonic_ns()
            ihl = (data[0] & 0x0F) * 4
            if len(data) >= ihl + 3:
                self.adverts.append((t, src, data[ihl + 1], data[ihl + 2]))

    def times(self, vrid: int, t0: int, old: str, new: str) -> dict[str, float | None]:
        """``phase_ms``: from ``old``'s last advert to the kill at ``t0``; ``takeover_ms``:
        from the kill to ``new``'s first advert as master."""
        adverts = list(self.adverts)
        last = [t for t, src, v, _ in adverts if v == vrid and src == old and t <= t0]
        first = [t for t, src, v, _ in adverts if v == vrid and src == new and t > t0]
        return {
            "phase_ms": round((t0 - last[-1]) / 1e6, 1) if last else None,
            "takeover_ms": round((first[0] - t0) / 1e6, 1) if first else None,
        }

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- the setups


@dataclass
class Pair:
    """One setup on its two hosts."""

    setup: Setup
    a: Any  # lab.net.Host
    b: Any
    vip: str
    work: Path
    active: Any = None  # the host that answers now
    cluster: Any = None  # vigil: the LocalCluster on the pair's hosts
    layout: Any = None  # vigil with etcd on its hosts: the colocated.Colocated (3 hosts)
    samples: list[float] = field(default_factory=list)
    trials: list[dict[str, Any]] = field(default_factory=list)

    @property
    def vrid(self) -> int:
        return 50 + int(self.vip.rsplit(".", 1)[1]) - 100

    def other(self, host: Any) -> Any:
        return self.b if host is self.a else self.a


def start_httpd(host: Any, work: Path) -> None:
    log = (work / f"{host.name}-httpd.log").open("ab")
    host.popen([sys.executable, "-S", str(work / "httpd.py"), host.name, str(PORT)],
               stdout=log, stderr=log)  # fmt: skip
    log.close()


def start_keepalived(pair: Pair, host: Any) -> None:
    primary = host is pair.a
    conf = pair.work / f"{host.name}-keepalived.conf"
    vrid = pair.vrid
    conf.write_text(
        KEEPALIVED_CONF.format(
            host=host.name,
            vrid=vrid,
            state="MASTER" if primary else "BACKUP",
            priority=150 if primary else 100,
            extra=pair.setup.keepalived_extra,
            vip=pair.vip,
        )
    )
    for pidfile in (f"{host.name}.pid", f"{host.name}-vrrp.pid"):
        # left by the killed one; it holds PID 1, which the new one would take for itself
        (pair.work / pidfile).unlink(missing_ok=True)
    log = (pair.work / f"{host.name}-keepalived.log").open("ab")
    host.popen(
        ["keepalived", "--dont-fork", "--log-console", "--log-detail", "--no-syslog",
         "--vrrp", "--use-file", str(conf),
         "--pid", str(pair.work / f"{host.name}.pid"),
         "--vrrp_pid", str(pair.work / f"{host.name}-vrrp.pid")],
        pidns=True, stdout=log, stderr=log,
    )  # fmt: skip
    log.close()


def lab_cluster(pair: Pair, store: str) -> Any:
    return colocated.host_cluster(
        {pair.a.name: pair.a, pair.b.name: pair.b},
        pair.work / "vigil",
        name=pair.setup.name.replace(".", "_"),
        store=store,
        node_timeout=pair.setup.node_timeout,
    )


def boot(pair: Pair, store: str | None, give_up: float, net: Any, hosts: list[Any]) -> None:
    (pair.work / "httpd.py").write_text(HTTPD)
    service = [sys.executable, "-S", str(pair.work / "httpd.py"), "-", str(PORT)]
    if pair.setup.fault:
        pair.layout = colocated.Colocated(
            net,
            hosts,
            pair.work,
            vip=pair.vip,
            port=PORT,
            service=service,
            node_timeout=pair.setup.node_timeout,
            name=pair.setup.name.replace(".", "_"),
        )
        pair.layout.start(give_up)
    elif pair.setup.kind == "keepalived":
        for h in (pair.a, pair.b):
            start_httpd(h, pair.work)
        start_keepalived(pair, pair.a)
        start_keepalived(pair, pair.b)
        pair.active = pair.a
    else:
        assert store is not None
        c = pair.cluster = lab_cluster(pair, store)
        command = ", ".join(f'"{a}"' for a in service)
        c.write_package(
            f'name = "web"\nnodes = ["{pair.a.name}", "{pair.b.name}"]\n'
            f'[[address]]\nip = "{pair.vip}/24"\ninterface = "eth0"\n'
            f'[[service]]\nname = "http"\ncommand = [{command}]\n'
        )
        c.start_agent(pair.a.name)  # first: it runs the package and is the controller
        c.wait_nodes_up([pair.a.name], timeout=give_up)
        c.start_agent(pair.b.name)
        c.wait_nodes_up(timeout=give_up)
        c.apply()
        view = c.wait(lambda v: v["packages"]["web"]["state"] == "running", give_up, "web running")
        pair.active = pair.a if view["packages"]["web"]["node"] == pair.a.name else pair.b


def steady(pair: Pair, give_up: float) -> None:
    """Wait until the IP answers from the active host and only it holds the IP."""
    active = pair.active
    standby = pair.other(active)
    if pair.setup.kind == "vigil":
        pair.cluster.wait(
            lambda v: all(n["state"] == "up" for n in v["nodes"].values())
            and v["packages"]["web"]["state"] == "running"
            and v["packages"]["web"]["node"] == active.name,
            give_up,
            f"both nodes up and web running on {active.name}",
        )
    poll(
        f"{pair.setup.name}: {pair.vip} answering from {active.name} only",
        lambda: http_get(pair.vip) == active.name and not has_ip(standby, pair.vip),
        give_up,
    )


def trial(
    net: Any, pair: Pair, i: int, give_up: float, vrrp: VrrpListener | None
) -> dict[str, Any]:
    if pair.layout is not None:  # layout A: colocated.Colocated.trial does it all
        sample = pair.layout.trial(pair.setup.fault, give_up) | {"trial": i}
        pair.samples.append(sample["ms"])
        return sample
    victim = pair.active
    survivor = pair.other(victim)
    steady(pair, give_up)
    time.sleep(random.uniform(0.0, 1.0))  # the kill's phase between adverts / renewals
    t0 = net.kill_host(victim)
    net.isolate(victim)
    wall0 = time.time() - (time.monotonic_ns() - t0) / 1e9
    t1, _ = colocated.first_answer(
        pair.vip,
        PORT,
        lambda body: body == survivor.name,
        give_up,
        f"{pair.setup.name} trial {i}: {survivor.name}",
    )
    ms = round((t1 - t0) / 1e6, 1)
    pair.samples.append(ms)
    sample: dict[str, Any] = {"trial": i, "from": victim.name, "to": survivor.name, "ms": ms}
    if pair.setup.kind == "vigil":
        sample |= agent_times(pair.cluster.agent_log(survivor.name), wall0)
    elif vrrp is not None:
        sample |= vrrp.times(pair.vrid, t0, victim.addr, survivor.addr)
    # the lost host "reboots": no leftover address or neighbours, back on the bridge
    victim.run(["ip", "addr", "del", f"{pair.vip}/24", "dev", "eth0"], check=False)
    victim.run(["ip", "neigh", "flush", "all"], check=False)
    net.heal()
    if pair.setup.kind == "keepalived":
        start_httpd(victim, pair.work)
        start_keepalived(pair, victim)
        pair.active = pair.a  # A preempts
    else:
        pair.cluster.agents.pop(victim.name, None)
        pair.cluster.start_agent(victim.name)
        pair.active = survivor  # failback_policy = "manual"
    return sample


def agent_times(log: str, wall0: float) -> dict[str, float | None]:
    """From the survivor's agent log (wall clock, ms resolution), after the kill at
    ``wall0``: when the controller ordered the start (``planned_ms``) and when the
    agent started the service (``service_ms``, after the address)."""
    out: dict[str, float | None] = {"planned_ms": None, "service_ms": None}
    for line in log.splitlines():
        key = (
            "planned_ms"
            if "controller: start web" in line
            else "service_ms"
            if "start service http" in line
            else None
        )
        if key is None:
            continue
        try:
            t = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1e3
        except ValueError:
            continue
        if t >= wall0 and out[key] is None:
            out[key] = round((t - wall0) * 1000, 0)
    return out


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> int:
    from lab.net import Network
    from vigil.testing.etcd import EtcdCluster, etcd_version, find_etcd

    setups = [SETUPS[s] for s in args.setups.split(",")]
    need_etcd = any(s.kind == "vigil" for s in setups)
    missing = [b for b in ("ip", "keepalived", "arping") if shutil.which(b) is None]
    etcd_bin = find_etcd()
    if need_etcd and etcd_bin is None:
        missing.append("etcd")
    if missing or os.geteuid() != 0:
        sys.exit(
            f"bench: needs root and {', '.join(missing) or 'nothing else'}: "
            "apt-get install keepalived iputils-arping etcd-server iproute2 "
            "(or sh scripts/ensure-bench.sh)"
        )
    give_up = 30.0
    results: dict[str, Any] = {
        "bench": NAME,
        "time": benchlib.utc_now(),
        "host": benchlib.host_info(),
        "keepalived_version": subprocess.run(
            ["keepalived", "--version"], capture_output=True, text=True, check=False
        ).stderr.split("\n")[0],
        "etcd_version": etcd_version(etcd_bin) if etcd_bin else None,
        "vigil_commit": git_commit(),
        "trials_per_setup": args.trials,
        "setups": {},
    }
    work = Path(tempfile.mkdtemp(prefix="vigil-bench-keepalived-"))
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    pairs: list[Pair] = []
    etcd = None
    failed = False
    try:
        with Network(hosts=sum(s.hosts for s in setups) + 1) as net:
            client = net.hosts[-1]
            enter_netns(client.netns)
            vrrp = None
            with contextlib.suppress(OSError):
                vrrp = VrrpListener(client.addr)
            try:
                store = None
                if any(s.kind == "vigil" and not s.fault for s in setups):
                    assert etcd_bin is not None  # the store of the setups with etcd apart
                    wrapper = work / "etcd"
                    wrapper.write_text(ETCD_WRAPPER.format(addr=client.addr, etcd=etcd_bin))
                    wrapper.chmod(0o755)
                    etcd = EtcdCluster(work / "etcd-data", members=3, binary=str(wrapper))
                    store = "etcd://" + ",".join(f"{client.addr}:{p}" for p in etcd.client_ports)
                first = 0
                for k, s in enumerate(setups):
                    d = work / s.name
                    d.mkdir()
                    hosts = net.hosts[first : first + s.hosts]
                    first += s.hosts
                    pair = Pair(s, hosts[0], hosts[1], f"10.77.0.{100 + k}", d)
                    pairs.append(pair)
                    print(
                        f"{s.name}: hosts {', '.join(h.name for h in hosts)}, IP {pair.vip}"
                        + (f", each an etcd member; fault {s.fault}" if s.fault else ""),
                        flush=True,
                    )
                    boot(pair, store, give_up, net, hosts)
                for i in range(args.trials):
                    order = list(pairs)
                    random.shuffle(order)
                    for pair in order:
                        t = trial(net, pair, i, give_up, vrrp)
                        pair.trials.append(t)
                        extra = (
                            f" (lease gone {t['gone_ms']}, assigned {t['assigned_ms']}, "
                            f"running {t['running_ms']})"
                            if "gone_ms" in t
                            else f" (planned {t['planned_ms']}, service {t['service_ms']})"
                            if "planned_ms" in t
                            else f" (phase {t['phase_ms']}, takeover {t['takeover_ms']})"
                            if "takeover_ms" in t
                            else ""
                        )
                        print(f"  trial {i + 1:3d}/{args.trials} {pair.setup.name:26} "
                              f"{t['from']} -> {t['to']}: {t['ms']:7.1f} ms{extra}", flush=True)  # fmt: skip
            except (RuntimeError, AssertionError) as exc:
                print(f"FAILED: {str(exc)[:2000]}", file=sys.stderr)
                results["error"] = str(exc)[:2000]
                failed = True
            finally:
                with benchlib.signals_ignored():
                    for pair in pairs:
                        if pair.layout is not None:
                            pair.layout.close()
                        if pair.cluster is not None:
                            for h in (pair.a, pair.b):
                                with contextlib.suppress(Exception):
                                    net.kill_host(h)
                            pair.cluster.agents.clear()
                            with contextlib.suppress(Exception):
                                pair.cluster.close()
                    if etcd is not None:
                        etcd.close()
                    if vrrp is not None:
                        vrrp.close()
                    enter_netns_fd(home)
    finally:
        os.close(home)
        if args.keep:
            print(f"bench: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    for pair in pairs:
        results["setups"][pair.setup.name] = {
            "kind": pair.setup.kind,
            "detection_s": round(pair.setup.detection_s, 3),
            "node_timeout": pair.setup.node_timeout or None,
            "keepalived_extra": pair.setup.keepalived_extra.split() or None,
            "fault": colocated.FAULTS[pair.setup.fault] if pair.setup.fault else None,
            "failover_ms": benchlib.summary(pair.samples),
            **{
                key: benchlib.summary([t[key] for t in pair.trials if t.get(key) is not None])
                for key in (
                    *("planned_ms", "service_ms", "phase_ms", "takeover_ms"),
                    *("elected_ms", "gone_ms", "assigned_ms", "claimed_ms", "running_ms"),
                )
                if any(t.get(key) is not None for t in pair.trials)
            },
            "samples": pair.trials,
        }
    results["ratios"] = ratios(results["setups"])
    print_table(results)
    path = benchlib.write_results(NAME, results, args.output)
    print(f"results: {path}")
    if args.plot and pairs and not failed:
        plot(results, args.plot)
    print(
        benchlib.json_line(
            {k: v for k, v in results.items() if k not in ("setups", "host")}
            | {"loadavg_start": results["host"]["loadavg"]}
            | {
                name: {x: r["failover_ms"][x] for x in ("p50", "p99", "max")}
                for name, r in results["setups"].items()
            }
        )
    )
    return 1 if failed else 0


def git_commit() -> str | None:
    """HEAD of the checkout the agents run from, ``+dirty`` if src/ has changes."""

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *argv], capture_output=True, text=True, check=False
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return None
    return head + ("+dirty" if git("status", "--porcelain", "--", "src") else "")


def ratios(setups: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for k, v in PAIRS:
        if k in setups and v in setups and setups[v]["failover_ms"]["count"]:
            a, b = setups[k]["failover_ms"], setups[v]["failover_ms"]
            out.append(
                {
                    "keepalived": k,
                    "vigil": v,
                    "p50": round(a["p50"] / b["p50"], 2),
                    "p99": round(a["p99"] / b["p99"], 2),
                }
            )
    return out


def print_table(results: dict[str, Any]) -> None:
    cols = ("p50", "p95", "p99", "max", "mean", "min")
    print("\nhost loss -> the IP answers HTTP from the other host (ms)")
    print(f"{'':26}{'detect':>8}" + "".join(f"{c:>9}" for c in cols) + f"{'n':>5}")
    for name, r in results["setups"].items():
        s = r["failover_ms"]
        print(
            f"{name:26}{r['detection_s']:>7.2f}s"
            + "".join(f"{s[c]:>9.0f}" for c in cols)
            + f"{s['count']:>5}"
        )
    for name, r in results["setups"].items():
        if "planned_ms" in r:
            p, v = r["planned_ms"], r["service_ms"]
            print(
                f"{name}: controller ordered the start p50 {p['p50']:.0f} / max {p['max']:.0f}"
                f" ms, service started p50 {v['p50']:.0f} / max {v['max']:.0f} ms"
            )
        if "gone_ms" in r:
            g, a, v = r["gone_ms"], r["assigned_ms"], r["running_ms"]
            print(
                f"{name}: lease gone p50 {g['p50']:.0f} / max {g['max']:.0f} ms, assigned "
                f"elsewhere p50 {a['p50']:.0f} / max {a['max']:.0f} ms, running p50 "
                f"{v['p50']:.0f} / max {v['max']:.0f} ms"
            )
        if "takeover_ms" in r:
            p, v = r["phase_ms"], r["takeover_ms"]
            print(
                f"{name}: kill after the master's last advert p50 {p['p50']:.0f} ms (min "
                f"{p['min']:.0f}, max {p['max']:.0f}); backup's first advert p50 "
                f"{v['p50']:.0f} / max {v['max']:.0f} ms"
            )
    for q in results["ratios"]:
        print(f"{q['keepalived']} / {q['vigil']}: p50 x{q['p50']:.2f}, p99 x{q['p99']:.2f}")
    setups = results["setups"]
    if "keepalived" in setups and "vigil" in setups:
        k, v = setups["keepalived"]["failover_ms"]["p99"], setups["vigil"]["failover_ms"]["p99"]
        verdict = "met" if v < k else "MISSED"
        print(f"target: vigil p99 {v:.0f} ms < keepalived p99 {k:.0f} ms (defaults): {verdict}")
    print(f"load average: start {results['host']['loadavg']}, end {results['loadavg_end']}")


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: skipped (no matplotlib; pip install -e '.[dev]')", file=sys.stderr)
        return
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(11, 4.2), sharex=True, gridspec_kw={"width_ratios": [3, 2]}
    )
    names = list(results["setups"])
    rng = random.Random(1)  # the same jitter on every redraw
    for j, name in enumerate(names):
        r = results["setups"][name]
        color = f"C{j}"
        xs = sorted(t["ms"] / 1000 for t in r["samples"])
        if not xs:
            continue
        ys = [(n + 1) / len(xs) for n in range(len(xs))]
        style = "-" if r["kind"] == "vigil" else "--"
        ax1.step([xs[0], *xs], [0.0, *ys], style, where="post", color=color,
                 label=f"{name} (detection {r['detection_s']:.2f} s)")  # fmt: skip
        ax2.scatter(xs, [j + rng.uniform(-0.18, 0.18) for _ in xs], s=12, color=color)
        s = r["failover_ms"]
        ax2.plot([s["p50"] / 1000] * 2, [j - 0.3, j + 0.3], color="black", lw=1.5)
        ax2.plot([s["p99"] / 1000], [j + 0.32], marker="v", color="black", ms=5)
    ax1.set_xlabel("host killed → IP answers HTTP from the other host (s)")
    ax1.set_ylabel("fraction of trials")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower right", fontsize=8)
    ax2.set_yticks(range(len(names)), names)
    ax2.set_xlabel("failover (s): a dot a trial, | p50, v p99")
    ax2.grid(alpha=0.3, axis="x")
    n = results["trials_per_setup"]
    load = results["host"]["loadavg"]
    fig.suptitle(
        f"Failover of a relocatable IP: vigil and keepalived, {n} trials each "
        f"(load {load[0]:.1f} → {results['loadavg_end'][0]:.1f}, {results['time']})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="host losses per setup (20)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"3 trials per setup, no plot, results/{NAME}_quick.json",
    )
    p.add_argument("--setups", default=",".join(SETUPS), help=f"of {','.join(SETUPS)}")
    p.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="the PNG ('' for none)")
    p.add_argument("--output", type=Path, default=None, help=f"default results/{NAME}.json")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument(
        "--replot", action="store_true", help="only draw --plot again from the results file"
    )
    args = p.parse_args()
    if args.replot:
        import json

        source = args.output or benchlib.RESULTS_DIR / f"{NAME}.json"
        plot(json.loads(source.read_text()), args.plot or DEFAULT_PLOT)
        return 0
    if args.quick:
        args.trials = 3
        args.plot = None
        args.output = args.output or benchlib.RESULTS_DIR / f"{NAME}_quick.json"
    if args.trials < 1:
        p.error("need --trials >= 1")
    if str(args.plot) in ("", "."):
        args.plot = None
    unknown = [s for s in args.setups.split(",") if s not in SETUPS]
    if unknown:
        p.error(f"unknown setup(s) {', '.join(unknown)}; known: {', '.join(SETUPS)}")
    benchlib.require_vigil()
    return benchlib.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
