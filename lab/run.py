"""A lab run: build the cluster, then ``steps`` times fault → hold → heal → audit.

Each step:

1. **fault**: the next fault of the seeded schedule (:mod:`lab.nemesis`) is applied;
2. **hold**: it stays for its hold time, while the witness log is checked for
   double runs every half second (a double run fails the step at once);
3. **heal**: the fault is undone; then the operator's part, as a person on call
   would do it: ``vigil package clear`` of a package left ``failed`` or
   ``halt_failed``, ``vigil package enable`` of global switching a failed start
   turned off (node switching that a failure turned off comes back by itself: the
   packages have ``failure_timeout``);
4. **audit**: within ``BOUND`` seconds every package must run again and every
   live host's ``vigil status --json`` agree; then the audits of :mod:`lab.audit`.

A failed audit ends the run with the seed, the step, the audit's findings, the
witness excerpt and the tails of the agents' logs (exit status 1). A summary is
written to ``ROOT/summary.json`` and printed.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import audit
from lab.cluster import LabCluster
from lab.nemesis import Fault, schedule

BOUND = 45.0  # seconds after a heal by which everything must run and agree again
SLOW = 15.0  # a settle slower than this says which audit it waited on
POLL = 0.25
View = dict[str, Any]


class AuditFailed(Exception):
    pass


@dataclass
class Result:
    seed: int
    steps: int
    hosts: int
    broken: str
    known: list[str]
    done: int = 0
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    recovery: dict[str, list[float]] = field(default_factory=dict)
    operator: collections.Counter[str] = field(default_factory=collections.Counter)
    known_counts: dict[str, int] = field(default_factory=dict)
    failure: str = ""
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        rec = {
            k: {"n": len(v), "max_s": round(max(v), 1), "mean_s": round(sum(v) / len(v), 1)}
            for k, v in sorted(self.recovery.items())
        }
        return {
            "seed": self.seed,
            "steps": self.steps,
            "steps_done": self.done,
            "hosts": self.hosts,
            "broken": self.broken,
            "known_issues_tolerated": self.known,
            "known_issue_counts": dict(sorted(self.known_counts.items())),
            "faults": dict(sorted(self.faults.items())),
            "recovery_after_heal": rec,
            "operator_actions": dict(sorted(self.operator.items())),
            "audit_failures": 1 if self.failure else 0,
            "failure": self.failure,
            "seconds": round(self.seconds),
        }


class Run:
    def __init__(
        self,
        lab: LabCluster,
        seed: int,
        steps: int,
        log: Any = print,
        known: frozenset[str] = frozenset(),
        faults: list[Fault] | None = None,
        reproduce: str = "",
    ) -> None:
        self.lab = lab
        self.known = known
        self.reproduce = reproduce
        self.seed = seed
        self.steps = faults or schedule(
            seed,
            steps,
            lab.hosts,
            lab.etcd_hosts,
            [p.name for p in lab.packages],
            lab.node_timeout,
        )
        self.say = log
        self.witness = audit.WitnessWindow(lab.witness_log, lab.root / "audit-window.log")
        self.result = Result(seed, len(self.steps), len(lab.hosts), lab.broken, sorted(known))
        self.logs = audit.LogScan(
            [lab.logs / f"{h.name}.log" for h in lab.hosts], known, self.result.known_counts
        )

    # -- the loop -----------------------------------------------------------------

    def run(self) -> Result:
        t0 = time.monotonic()
        try:
            self.lab.start()
            self.settle(0, None)
            for n, fault in enumerate(self.steps, 1):
                self.step(n, fault)
                self.result.done = n
            self.check(len(self.steps), "final", self.witness.final())
        except AuditFailed as exc:
            self.result.failure = str(exc)
        finally:
            self.result.seconds = time.monotonic() - t0
        return self.result

    def step(self, n: int, fault: Fault) -> None:
        self.witness.mark()
        self.say(f"step {n}/{len(self.steps)}: {fault.describe()}")
        fault.apply(self.lab)
        self.result.faults[fault.kind] += 1
        deadline = time.monotonic() + fault.hold
        while time.monotonic() < deadline:
            self.check(n, "double run (during the fault)", self.witness.check(), fault)
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        fault.heal(self.lab)
        took = self.settle(n, fault)
        self.result.recovery.setdefault(fault.kind, []).append(took)

    def settle(self, n: int, fault: Fault | None) -> float:
        """Wait (bounded) until everything runs and every host agrees; audit. Returns
        the seconds it took."""
        t0 = last = time.monotonic()
        deadline = t0 + BOUND
        findings: dict[str, list[str]] = {}
        waited: dict[str, float] = {}  # per audit: seconds it was not satisfied
        seen: dict[str, str] = {}  # per audit: what it said last
        while True:
            findings = self.observe()
            now = time.monotonic()
            for what, problems in findings.items():
                if problems:
                    waited[what] = waited.get(what, 0.0) + now - last
                    seen[what] = problems[0]
            last = now
            self.check(n, "double run", self.witness.check(), fault)
            if not any(findings.values()):
                break
            if time.monotonic() > deadline:
                what = next(k for k, v in findings.items() if v)
                self.check(n, f"{what} {BOUND:g}s after the heal", findings[what], fault)
            time.sleep(POLL)
        took = time.monotonic() - t0
        self.check(n, "agent logs", self.logs.check(), fault)
        slow = ""
        if took > SLOW and waited:  # say what held it up
            what = max(waited, key=lambda k: waited[k])
            slow = f" (waited on {what} for {waited[what]:.0f}s: {seen[what][:160]})"
        self.say(f"  ok: all running and agreeing {took:.1f}s after the heal{slow}")
        return took

    def observe(self) -> dict[str, list[str]]:
        """One round of the settle audits; does the operator's part where needed."""
        lab = self.lab
        live = lab.live_hosts()
        health = lab.etcd_health(live[0])
        if not all(health.values()):
            return {"etcd quorum": [f"etcd members not healthy: {health}"]}
        views = {h.name: lab.status(h) for h in live}
        disagree = audit.disagreement(views)
        view = views[live[0].name]
        if view is None:
            return {"status agreement": disagree}
        self.operate(view)
        eligible = {h.name for h in live}
        out = {
            "availability": audit.unavailable(view, eligible),
            "status agreement": disagree,
            "configuration": audit.damaged(
                view,
                [p.name for p in lab.packages],
                [h.name for h in lab.hosts],
                lab.flags,
                lab.lock_queue(live[0]),
            ),
        }
        if not any(out.values()):
            if "stale-address" in self.known:  # settled: nothing is moving now
                self.remove_stale_addresses(lab.status(live[0]) or {}, running=True)
            addrs = {p.name: f"http://{p.addr}:8000/" for p in lab.packages}
            answers = {h.name: lab.probe(h, list(addrs.values())) for h in live}
            holders = {p.name: lab.holders(p.addr) for p in lab.packages}
            counts: dict[str, int] = {}
            wrong = audit.wrong_address(view, addrs, answers, holders, self.known, counts)
            if not wrong:  # count a settled state once, not every poll before it
                for k, v in counts.items():
                    self.result.known_counts[k] = self.result.known_counts.get(k, 0) + v
            out["relocatable address"] = wrong
        return out

    def operate(self, view: View) -> None:
        """What an operator does after a failure: clear, enable global switching; with
        ``stale-address`` known, delete a package's address from live hosts that do
        not run it (the workaround for that bug, counted)."""
        via = self.lab.live_hosts()[0]
        if "stale-address" in self.known:
            self.remove_stale_addresses(view, running=False)
        for name, p in sorted(view.get("packages", {}).items()):
            if p.get("state") in ("failed", "halt_failed"):
                self.lab.on(via, "package", "clear", name)
                self.result.operator["clear"] += 1
            if not p.get("auto_run"):
                self.lab.on(via, "package", "enable", name)
                self.result.operator["enable"] += 1

    def remove_stale_addresses(self, view: View, *, running: bool) -> None:
        """Stale for sure: a package's address on a host where its node switching is
        off (nothing starts it there until it is enabled again) and, once everything
        runs and every host agrees (``running``), on any host but the one running it."""
        pkgs = view.get("packages", {})
        for pkg in self.lab.packages:
            p = pkgs.get(pkg.name, {})
            stale = set(p.get("disabled_nodes") or [])
            if running and p.get("state") == "running":
                stale |= {h.name for h in self.lab.hosts}
            stale.discard(p.get("node"))
            for host in self.lab.live_hosts():
                if host.name in stale and host.name in self.lab.holders(pkg.addr):
                    host.run(["ip", "addr", "del", f"{pkg.addr}/24", "dev", "eth0"], check=False)
                    self.result.operator["ip addr del (stale address)"] += 1
                    counts = self.result.known_counts
                    counts["stale-address"] = counts.get("stale-address", 0) + 1

    def check(self, n: int, what: str, problems: list[str], fault: Fault | None = None) -> None:
        if not problems:
            return
        lines = [
            f"AUDIT FAILED: {what}",
            f"seed {self.seed}, step {n}/{len(self.steps)}"
            + (f" ({fault.describe()})" if fault else " (before the first fault)"),
            "reproduce: "
            + (
                self.reproduce
                or f"make lab SEED={self.seed} STEPS={n} HOSTS={len(self.lab.hosts)}"
                + (f" BROKEN={self.lab.broken}" if self.lab.broken else "")
                + (f" KNOWN={','.join(sorted(self.known))}" if self.known else "")
            ),
            *problems[:60],
            f"witness log: {self.lab.witness_log}",
        ]
        for h in self.lab.hosts:
            path = self.lab.logs / f"{h.name}.log"
            tail = path.read_text(errors="replace").splitlines()[-25:] if path.exists() else []
            lines.append(f"--- last lines of {path}")
            lines.extend(tail)
        raise AuditFailed("\n".join(lines))


def write_summary(root: Path, result: Result) -> str:
    text = json.dumps(result.as_json(), indent=2)
    (root / "summary.json").write_text(text + "\n")
    return text


#: The deliberately broken builds the lab must catch, and what each turns off.
BROKEN = {
    "nofence": "VIGIL_TEST_DISABLE_FENCING=1: no self-fencing",
    "nocontain": "VIGIL_TEST_DISABLE_CONTAINMENT=1: process groups only, no cgroups",
}


def broken_check(root: Path, kind: str = "nofence", say: Any = print) -> Result:
    """The lab must catch a double run of a broken build, in one step on three hosts:

    * ``nofence`` (self-fencing disabled): a paused agent's package keeps running
      while another host starts it;
    * ``nocontain`` (no cgroups): the agent is SIGKILLed; its sentinel kills the
      witness's process group, but the witness's detached daemon (setsid) escapes
      and keeps writing while another host starts the package.

    The returned result must have failed the double-run audit."""
    with LabCluster(root, hosts=3, packages=1, broken=kind) as lab:
        if kind == "nocontain":
            fault = Fault("kill-agent", [lab.hosts[0].name], 4 * lab.node_timeout)
        else:
            fault = Fault("pause-agent", [lab.hosts[0].name], 4 * lab.node_timeout)
        reproduce = f"python -m lab --broken-check --broken {kind}"
        return Run(lab, 0, 1, say, faults=[fault], reproduce=reproduce).run()
