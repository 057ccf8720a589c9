"""The lab's cluster: hosts (``lab.net``), a real 3-member etcd, one ``vigild`` per host.

::

    with LabCluster(root, hosts=4, seed=1) as lab:   # h1..h4, etcd on h1..h3
        lab.start()                                   # etcd, apply, agents
        lab.kill_agent(lab.net.hosts[0])              # kill -9 of vigild only
        lab.kill_host(lab.net.hosts[1])               # everything on h2, link down
        lab.restart_host(lab.net.hosts[1])            # link up, etcd member, agent

Each agent runs as ``sh -c 'vigild ...; exec sleep infinity'`` as PID 1 of its own
PID namespace inside its host: ``kill -9`` of ``vigild`` leaves its sentinel to
kill the services (what a crashed agent must rely on), while "host dies" kills the
namespace (with :meth:`lab.net.Network.kill_host`, also etcd) and takes the host's
link down: a dead machine answers nothing, not even ARP for addresses it held.
Everything the lab writes (config, etcd data, logs, witness log) is under ``root``.

The lab itself runs in the caller's network namespace, which cannot reach the
hosts: every command that talks to the cluster (``vigil``, probes) runs inside a
host with :meth:`LabCluster.on`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from lab.net import SUBNET, Host, HostProcess, Network, NetworkError, children
from vigil.supervise.cgroup import Cgroup, find_hierarchy
from vigil.testing.etcd import find_etcd

ETCD_MEMBERS = 3
CLIENT_PORT = 2379
PEER_PORT = 2380
SERVICE_PORT = 8000
NODE_TIMEOUT = 3.0
#: Where a lab host (its agent's mount namespace) has cgroup v2 mounted.
CGROUP_MOUNT = "/sys/fs/cgroup"
# etcd as docs/operations.md ("The etcd cluster") recommends for this node_timeout:
# an election (up to twice the election timeout) ends well before an agent that lost
# its renewals fences itself (0.6 x node_timeout), and pre-vote (off by default in
# etcd 3.4) keeps a member that comes back from isolation from forcing an election.
ETCD_HEARTBEAT_MS = 100
ETCD_ELECTION_MS = 600
CANARY = "lab-canary"

View = dict[str, Any]


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@dataclass(frozen=True)
class LabPackage:
    name: str
    addr: str  # relocatable address (without prefix length)
    nodes: list[str]


# Node switching that a crash loop turned off comes back on by itself after this
# (no operator `enable -n`); well inside the settle bound (lab/run.py BOUND).
FAILURE_TIMEOUT = "10s"


def package_toml(pkg: LabPackage, root: Path) -> str:
    """A lab package: the hang hook script, its address on eth0, the witness service."""
    nodes = ", ".join(f'"{n}"' for n in pkg.nodes)
    service = [
        sys.executable, "-m", "lab.service",
        str(root / "witness.log"), pkg.name, str(SERVICE_PORT), str(root / "ctl"),
    ]  # fmt: skip
    command = ", ".join(f'"{a}"' for a in service)
    return (
        f'name = "{pkg.name}"\nnodes = [{nodes}]\nrun_script_timeout = "4s"\n'
        f'halt_script_timeout = "4s"\nrestart_limit = 2\nrestart_window = "60s"\n'
        f'failure_timeout = "{FAILURE_TIMEOUT}"\n\n'
        f'[env]\nPYTHONPATH = "{Path(__file__).resolve().parent.parent}"\n'
        f'LAB_CTL = "{root / "ctl"}"\n\n'
        f'[[external_script]]\npath = "scripts/hook.sh"\n\n'
        f'[[address]]\nip = "{pkg.addr}/24"\ninterface = "eth0"\n\n'
        f'[[service]]\nname = "witness"\ncommand = [{command}]\nrestart = 2\n'
        f'restart_window = "30s"\nrestart_delay = "100ms"\nhalt_timeout = "3s"\n'
    )


def etcd_member_argv(
    binary: str, host: Host, members: list[Host], data_dir: Path, token: str
) -> list[str]:
    """The command line of ``host``'s member of an etcd cluster of ``members`` (clients
    on HOST:2379, peers on HOST:2380, the timings docs/operations.md recommends)."""
    peers = ",".join(f"{h.name}=http://{h.addr}:{PEER_PORT}" for h in members)
    return [
        binary,
        "--name", host.name,
        "--data-dir", str(data_dir),
        "--listen-client-urls", f"http://{host.addr}:{CLIENT_PORT}",
        "--advertise-client-urls", f"http://{host.addr}:{CLIENT_PORT}",
        "--listen-peer-urls", f"http://{host.addr}:{PEER_PORT}",
        "--initial-advertise-peer-urls", f"http://{host.addr}:{PEER_PORT}",
        "--initial-cluster", peers,
        "--initial-cluster-state", "new",  # ignored once the data dir exists
        "--initial-cluster-token", token,
        "--heartbeat-interval", str(ETCD_HEARTBEAT_MS),
        "--election-timeout", str(ETCD_ELECTION_MS),
        "--pre-vote=true",
        "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
    ]  # fmt: skip


# The hang fault: while CTL/PKG.hang exists, "start" hangs (until run_script_timeout).
HOOK = """#!/bin/sh
case "$1" in
start) while [ -e "$LAB_CTL/$VIGIL_PACKAGE.hang" ]; do sleep 0.1; done ;;
esac
exit 0
"""


class LabCluster:
    """Hosts, etcd members on the first three, and an agent on each (see above)."""

    def __init__(
        self,
        root: Path,
        *,
        hosts: int = 4,
        packages: int = 3,
        node_timeout: float = NODE_TIMEOUT,
        broken: str = "",
    ) -> None:
        if hosts < ETCD_MEMBERS:
            raise ValueError(f"the lab needs at least {ETCD_MEMBERS} hosts (etcd members)")
        etcd = find_etcd()
        if etcd is None:
            raise RuntimeError("no etcd binary (apt-get install etcd-server)")
        self.etcd_bin = etcd
        self.root = root
        self.broken = broken
        self.node_timeout = node_timeout
        self.config = root / "config"
        self.logs = root / "logs"
        self.witness_log = root / "witness.log"
        self.ctl = root / "ctl"
        for d in (self.config / "packages", self.config / "scripts", self.logs, self.ctl):
            d.mkdir(parents=True, exist_ok=True)
        self.net = Network(hosts)
        self.cgroup_subtree = f"vigil-{self.net.prefix}"
        self.hosts = self.net.hosts
        self.etcd_hosts = self.hosts[:ETCD_MEMBERS]
        self.packages = [
            LabPackage(
                f"pkg{i}",
                f"{SUBNET}.{100 + i}",
                [h.name for h in self.hosts[i - 1 :] + self.hosts[: i - 1]],
            )
            for i in range(1, packages + 1)
        ]
        self.agents: dict[str, HostProcess] = {}
        self.etcd: dict[str, HostProcess] = {}
        self.down: set[str] = set()  # hosts killed and not restarted
        self.flags: list[str] = []  # the flags the lab set on every node
        self._write_config()

    # -- configuration --------------------------------------------------------

    @property
    def store_url(self) -> str:
        return "etcd://" + ",".join(f"{h.addr}:{CLIENT_PORT}" for h in self.etcd_hosts)

    def _write_config(self) -> None:
        nodes = ", ".join(f'"{h.name}"' for h in self.hosts)
        (self.config / "cluster.toml").write_text(
            f'name = "lab"\nstore = "{self.store_url}"\n'
            f'node_timeout = "{self.node_timeout:g}s"\nnodes = [{nodes}]\n'
            f'state_dir = "{self.root}/state"\n'
        )
        hook = self.config / "scripts" / "hook.sh"
        hook.write_text(HOOK)
        hook.chmod(0o755)
        for pkg in self.packages:
            (self.config / "packages" / f"{pkg.name}.toml").write_text(package_toml(pkg, self.root))

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIGIL_", "ETCD"))}
        env["VIGIL_CONFIG"] = str(self.config)
        # each lab its own cgroup subtree: labs side by side never meet
        env["VIGIL_CGROUP_ROOT"] = f"{CGROUP_MOUNT}/{self.cgroup_subtree}"
        if self.broken == "nofence":
            env["VIGIL_TEST_DISABLE_FENCING"] = "1"
        if self.broken == "nocontain":
            env["VIGIL_TEST_DISABLE_CONTAINMENT"] = "1"
        return env

    # -- etcd -------------------------------------------------------------------

    def start_etcd(self, host: Host) -> None:
        args = etcd_member_argv(
            self.etcd_bin, host, self.etcd_hosts, self.root / "etcd" / host.name,
            f"vigil-lab-{self.net.prefix}",
        )  # fmt: skip
        with (self.logs / f"etcd-{host.name}.log").open("ab") as log:
            self.etcd[host.name] = host.popen(args, stdout=log, stderr=log, env=self.env())

    def kill_etcd(self, host: Host) -> None:
        proc = self.etcd.pop(host.name, None)
        if proc is not None:
            proc.kill_tree()

    def etcd_running(self, host: Host) -> bool:
        proc = self.etcd.get(host.name)
        return proc is not None and proc.alive()

    def etcd_health(self, via: Host | None = None) -> dict[str, bool]:
        """Each member's ``/health`` as seen from ``via`` (default: the first live host)."""
        via = via or self.live_hosts()[0]
        urls = [f"http://{h.addr}:{CLIENT_PORT}/health" for h in self.etcd_hosts]
        out = self.probe(via, urls)
        return {
            h.name: '"health":"true"' in out.get(u, "").replace(" ", "")
            for h, u in zip(self.etcd_hosts, urls, strict=True)
        }

    # -- agents -------------------------------------------------------------------

    def start_agent(self, host: Host) -> None:
        self.stop_agent_namespace(host)
        argv = [_bin("vigild"), "--node", host.name, "--config", str(self.config)]
        # `ip netns exec` mounts a sysfs of its own, which hides the host's cgroup
        # mounts: mount cgroup v2 where a booted machine has it (in the agent's own
        # mount namespace), so the agent contains its packages as on a real host.
        script = (
            f"mount -t cgroup2 cgroup2 {CGROUP_MOUNT} 2>/dev/null; "
            + " ".join(f"'{a}'" for a in argv)
            + "; exec sleep infinity"
        )
        with (self.logs / f"{host.name}.log").open("ab") as log:
            self.agents[host.name] = host.popen(
                ["sh", "-c", script], pidns=True, stdout=log, stderr=log, env=self.env()
            )
        self.agents[host.name].init_pid()

    def vigild_pid(self, host: Host) -> int | None:
        """Host PID of the host's live ``vigild`` (a child of its namespace's init)."""
        proc = self.agents.get(host.name)
        if proc is None or not proc.alive():
            return None
        with contextlib.suppress(NetworkError):
            init = proc.init_pid(timeout=1)
            for pid in children(init):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"vigild" in f.read():
                        return pid
        return None

    def kill_agent(self, host: Host) -> None:
        """``kill -9`` of ``vigild`` alone: its sentinel must kill its services."""
        pid = self.vigild_pid(host)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def signal_agent(self, host: Host, sig: signal.Signals) -> None:
        pid = self.vigild_pid(host)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop_agent_namespace(self, host: Host) -> None:
        """SIGKILL what is left of the host's agent PID namespace (after its vigild died)."""
        proc = self.agents.pop(host.name, None)
        if proc is not None:
            proc.kill_tree()

    def agent_alive(self, host: Host) -> bool:
        return self.vigild_pid(host) is not None

    # -- hosts ----------------------------------------------------------------------

    def kill_host(self, host: Host) -> int:
        """The machine dies: every process on it at once, then its link goes down."""
        t0 = self.net.kill_host(host)
        self.agents.pop(host.name, None)
        self.etcd.pop(host.name, None)
        host.run(["ip", "link", "set", "eth0", "down"])
        self.down.add(host.name)
        return t0

    def restart_host(self, host: Host) -> None:
        """The machine boots: no relocatable address, link up, etcd member, agent."""
        host.run(["ip", "addr", "flush", "dev", "eth0"])
        host.run(["ip", "addr", "add", f"{host.addr}/24", "dev", "eth0"])
        host.run(["ip", "link", "set", "eth0", "up"])
        self.down.discard(host.name)
        if host in self.etcd_hosts:
            self.start_etcd(host)
        self.start_agent(host)

    def holders(self, addr: str) -> list[str]:
        """The hosts that have ``addr`` on their ``eth0``."""
        return [
            h.name
            for h in self.hosts
            if f"inet {addr}/" in h.run(["ip", "-4", "addr", "show", "eth0"], check=False).stdout
        ]

    def live_hosts(self) -> list[Host]:
        return [h for h in self.hosts if h.name not in self.down]

    # -- commands inside hosts ----------------------------------------------------------

    def on(
        self, host: Host, *args: str, timeout: float = 20, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """``vigil --node HOST ARGS`` run inside ``host``."""
        return host.run(
            [_bin("vigil"), "--node", host.name, *args],
            env=self.env(),
            timeout=timeout,
            check=check,
        )

    def status(self, host: Host, timeout: float = 15) -> View | None:
        """``vigil status --json`` on ``host``; None if it fails (no store, timeout)."""
        try:
            proc = self.on(host, "status", "--json", timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if proc.returncode != 0:
            return None
        try:
            view: View = json.loads(proc.stdout)
        except ValueError:
            return None
        return view

    def probe(self, host: Host, urls: list[str], timeout: float = 2.0) -> dict[str, str]:
        """GET each URL from inside ``host``: URL -> body ("" if no answer)."""
        try:
            proc = host.run(
                [sys.executable, "-m", "lab.probe", str(timeout), *urls],
                env={**self.env(), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
                timeout=timeout * len(urls) + 10,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {}
        try:
            out: dict[str, str] = json.loads(proc.stdout)
        except ValueError:
            return {}
        return out

    # -- life cycle -----------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """etcd members, ``vigil apply``, then every agent."""
        for h in self.etcd_hosts:
            self.start_etcd(h)
        deadline = time.monotonic() + timeout
        while not all(self.etcd_health().values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd not healthy after {timeout:g}s; see {self.logs}")
            time.sleep(0.2)
        h1 = self.hosts[0]
        while (applied := self.on(h1, "apply", str(self.config), timeout=30)).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"vigil apply failed: {applied.stdout}{applied.stderr}")
            time.sleep(0.5)
        for h in self.hosts:
            self.start_agent(h)
        for h in self.hosts:  # a flag on every node: the audits check none is lost
            while self.on(h1, "flag", "create", "-d", h.name, "-f", CANARY).returncode != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vigil flag create -d {h.name} failed")
                time.sleep(0.5)
        self.flags = [CANARY]

    def lock_queue(self, host: Host) -> list[Any]:
        """``vigil lock list --json`` on ``host`` (["?"] if it fails: not intact)."""
        proc = self.on(host, "lock", "list", "--json")
        if proc.returncode == 2 and "No such command" in proc.stderr:
            return []  # a vigil without admin locks
        try:
            queue: list[Any] = json.loads(proc.stdout)
        except ValueError:
            return [f"? {proc.stdout}{proc.stderr}"]
        return queue

    def close(self) -> None:
        self.net.close()
        self._remove_cgroups()

    def _remove_cgroups(self) -> None:
        """The lab's cgroup subtree, as this process sees the hierarchy (emptied by the
        end of its processes; killed here if anything is left)."""
        hierarchy = find_hierarchy()
        if hierarchy is None:
            return
        path = hierarchy / self.cgroup_subtree
        if path.exists():
            cg = Cgroup.at(hierarchy, path)
            cg.kill()
            cg.wait_empty_sync(5.0)
            cg.remove()

    def __enter__(self) -> LabCluster:
        self.net.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.net.__exit__(exc_type, exc, tb)
        finally:
            self._remove_cgroups()
