"""The nemesis: faults the lab applies and heals, chosen by a seeded schedule.

Every fault is a :class:`Fault` with ``apply`` (break something now) and ``heal``
(undo it: restart what was killed, rejoin the network, remove a control file),
and a ``hold`` (how long it stays broken). :func:`schedule` turns a seed into the
same sequence of faults every time: the same seed replays the same run (the
timing of the real processes differs, the faults and their targets do not).

| fault | apply | heal |
|---|---|---|
| ``kill-agent`` | ``kill -9`` of one host's ``vigild`` (its sentinel must kill its services) | start the agent |
| ``kill-host`` | SIGKILL of everything on a host (agent, services, etcd member), link down | boot it |
| ``pause-agent`` | SIGSTOP of ``vigild`` for longer than ``node_timeout`` | SIGCONT |
| ``isolate`` | cut one host off the network | reconnect |
| ``partition`` | split into a minority (at most one etcd member) and a majority | reconnect |
| ``degrade`` | packet loss and delay on one host's link | clear |
| ``kill-etcd`` | SIGKILL of one etcd member | restart it |
| ``crash-loop`` | a package's service exits at once, again and again | stop crashing, clear |
| ``hang-start`` | a package's start script hangs; the package is moved to another host | stop hanging, clear |
"""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass, field

from lab.cluster import LabCluster
from lab.net import Host

FAULTS = (
    "kill-agent",
    "kill-host",
    "pause-agent",
    "isolate",
    "partition",
    "degrade",
    "kill-etcd",
    "crash-loop",
    "hang-start",
)


@dataclass
class Fault:
    """One step's fault: ``kind`` on ``hosts`` (and ``package``), for ``hold`` seconds."""

    kind: str
    hosts: list[str]
    hold: float
    package: str = ""
    loss: int = 0
    delay_ms: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        what = f"{self.kind} {','.join(self.hosts)}"
        if self.package:
            what += f" {self.package}"
        if self.kind == "degrade":
            what += f" loss {self.loss}% delay {self.delay_ms}ms"
        return f"{what} for {self.hold:.1f}s"

    # -- apply / heal ---------------------------------------------------------------

    def apply(self, lab: LabCluster) -> None:
        hosts = [lab.net.host(h) for h in self.hosts]
        match self.kind:
            case "kill-agent":
                lab.kill_agent(hosts[0])
            case "kill-host":
                lab.kill_host(hosts[0])
            case "pause-agent":
                lab.signal_agent(hosts[0], signal.SIGSTOP)
            case "isolate":
                lab.net.isolate(hosts[0])
            case "partition":
                rest = [h for h in lab.hosts if h not in hosts]
                lab.net.partition([hosts, rest])
            case "degrade":
                self.notes.append(lab.net.degrade(hosts[0], loss=self.loss, delay_ms=self.delay_ms))
            case "kill-etcd":
                lab.kill_etcd(hosts[0])
            case "crash-loop":
                (lab.ctl / f"{self.package}.crash").touch()
            case "hang-start":
                (lab.ctl / f"{self.package}.hang").touch()
                # a start must happen for the script to hang: move it to another host
                via = lab.live_hosts()[0]
                view = lab.status(via) or {}
                now = view.get("packages", {}).get(self.package, {}).get("node")
                target = next(h for h in [*hosts, *lab.live_hosts()] if h.name != now)
                self.hosts = [target.name]
                lab.on(via, "package", "move", self.package, "-n", target.name, timeout=20)
            case _:
                raise ValueError(f"unknown fault {self.kind!r}")

    def heal(self, lab: LabCluster) -> None:
        hosts = [lab.net.host(h) for h in self.hosts]
        match self.kind:
            case "kill-agent":
                lab.start_agent(hosts[0])
            case "kill-host":
                lab.restart_host(hosts[0])
            case "pause-agent":
                lab.signal_agent(hosts[0], signal.SIGCONT)
            case "isolate" | "partition" | "degrade":
                lab.net.heal()
            case "kill-etcd":
                lab.start_etcd(hosts[0])
            case "crash-loop":
                (lab.ctl / f"{self.package}.crash").unlink(missing_ok=True)
            case "hang-start":
                (lab.ctl / f"{self.package}.hang").unlink(missing_ok=True)


def schedule(seed: int, steps: int, hosts: list[Host], etcd_hosts: list[Host],
             packages: list[str], node_timeout: float) -> list[Fault]:  # fmt: skip
    """The faults of a run: ``steps`` of them, the same for the same arguments."""
    rng = random.Random(seed)
    names = [h.name for h in hosts]
    etcd = [h.name for h in etcd_hosts]
    out = []
    for _ in range(steps):
        kind = rng.choice(FAULTS)
        one = rng.choice(names)
        hold = round(rng.uniform(node_timeout + 1, 3 * node_timeout), 1)
        fault = Fault(kind, [one], hold)
        if kind == "partition":
            member = rng.choice(etcd)
            others = [n for n in names if n not in etcd]
            size = rng.randint(0, max(0, len(names) // 2 - 1))
            fault.hosts = [member, *rng.sample(others, min(size, len(others)))]
        elif kind == "kill-etcd":
            fault.hosts = [rng.choice(etcd)]
        elif kind == "degrade":
            fault.loss = rng.choice((5, 10, 20, 40))
            fault.delay_ms = rng.choice((20, 50, 100, 200))
        elif kind == "pause-agent":
            fault.hold = round(rng.uniform(1.5 * node_timeout, 3 * node_timeout), 1)
        elif kind in ("crash-loop", "hang-start"):
            fault.package = rng.choice(packages)
            fault.hold = round(rng.uniform(2 * node_timeout, 4 * node_timeout), 1)
        out.append(fault)
    return out
