"""Agent death, host alive: how soon does the service answer on another node?

Run (from the repository root, with the project's virtual environment)::

    .venv/bin/python bench/agent_death.py                  # 20 trials per store and mode
    .venv/bin/python bench/agent_death.py --trials 3       # a quick check

What it measures
----------------
A :class:`~vigil.testing.cluster.LocalCluster` of 3 nodes whose agents are plain
processes of this host (not PID namespaces): SIGKILL of a ``vigild`` kills the agent
only, as an OOM kill or a crash does, and leaves its sentinel running. One package
whose service is the witness (``python -m vigil.testing.witness ... --http PORT
--detached``): it answers HTTP on 127.0.0.1:PORT with the name of its node, and
forks a daemon (setsid) that writes witness records too, so a process escaping the
service's cgroup would show up as a double run. (The process-group baseline runs
the witness without its daemon: there it would escape, by design, and run twice.)

Each trial: every node up and the service answering from node X; a random pause of
0..node_timeout/3; ``t0`` = ``time.monotonic_ns()`` just before the SIGKILL of X's
agent; then HTTP GET every 5 ms until an answer comes from another node:
**latency = first answer from the new node - t0**. X's agent is started again before
the next trial.

Side by side, in one run, per store (SQLite, and a real 3-member etcd when an etcd
binary is found):

* **cgroup** (vigil's default): the sentinel kills the node's package cgroups, sees
  them empty (``cgroup.events``), removes the addresses and revokes the lease;
* **process-group** (what vigil did before, and still does where cgroup v2 cannot be
  written; the test-only switch ``VIGIL_TEST_DISABLE_CONTAINMENT=1``): the sentinel
  kills the process groups it knows and the lease expires after ``node_timeout``.

Target printed beside the figures: cgroup p99 under 1 s. The witness log is checked
for overlaps at the end of each run. Results go to ``bench/results/agent_death.json``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
from failover import NODES, PKG, answer_elsewhere, free_port, start_etcd, steady_on

NAME = "agent_death"
MODES = ("cgroup", "process-group")
TARGET_MS = 1000.0


def trials(
    cluster: Any, log: Path, port: int, n: int, ttl: float, give_up: float, detached: bool
) -> list[float]:
    from vigil.testing.witness import service_toml

    toml = service_toml(log, PKG, port=port, detached=detached)
    cluster.write_package(f'name = "{PKG}"\n' + toml)
    cluster.start_agents()
    cluster.wait_nodes_up(timeout=give_up)
    cluster.apply()
    out: list[float] = []
    for i in range(n):
        victim = steady_on(cluster, port, give_up, i)
        time.sleep(random.uniform(0, ttl / 3))
        t0 = time.monotonic_ns()
        os.kill(cluster.agent_pid(victim), signal.SIGKILL)
        new, t1 = answer_elsewhere(port, victim, give_up, i, every=0.005)
        ms = (t1 - t0) / 1e6
        cluster.agents[victim].wait(timeout=10)
        out.append(round(ms, 1))
        print(f"  trial {i + 1:3d}/{n}: {victim} -> {new}: {ms:.0f} ms", flush=True)
        cluster.start_agent(victim)
    return out


def run_one(
    kind: str, url: str | None, mode: str, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    from vigil.config import parse_duration
    from vigil.testing.cluster import LocalCluster
    from vigil.testing.witness import overlaps

    ttl = parse_duration(args.node_timeout)
    assert ttl is not None
    root = work / f"{kind}-{mode}"
    root.mkdir()
    name = f"ad{os.getpid()}{kind[0]}{mode[0]}"
    saved = os.environ.get("VIGIL_TEST_DISABLE_CONTAINMENT")
    if mode == "process-group":
        os.environ["VIGIL_TEST_DISABLE_CONTAINMENT"] = "1"
    cluster = LocalCluster(root, NODES, name=name, store=url, node_timeout=args.node_timeout)
    try:
        log = root / "witness.log"
        print(f"{kind}, {mode}: {args.trials} agent deaths", flush=True)
        # Without cgroups a detached daemon would survive (that is the point of them),
        # and run twice: the baseline measures a service that stays in its group.
        detached = mode == "cgroup"
        samples = trials(cluster, log, free_port(), args.trials, ttl, ttl * 4 + 30, detached)
        found = overlaps(log)
        if found:
            print(f"  OVERLAP: {found[0][0]} and {found[0][1]}", file=sys.stderr)
        return {"answer_ms": benchlib.summary(samples), "overlaps": len(found), "samples": samples}
    finally:
        if saved is None:
            os.environ.pop("VIGIL_TEST_DISABLE_CONTAINMENT", None)
        with benchlib.signals_ignored():
            cluster.close()


def run(args: argparse.Namespace) -> int:
    from vigil.config import parse_duration

    ttl = parse_duration(args.node_timeout)
    work = Path(tempfile.mkdtemp(prefix="vigil-bench-agent-death-"))
    results: dict[str, Any] = {
        "bench": NAME,
        "time": benchlib.utc_now(),
        "host": benchlib.host_info(),
        "node_timeout_s": ttl,
        "trials": args.trials,
        "target_cgroup_p99_ms": TARGET_MS,
        "stores": {},
    }
    etcd = None
    failed = False
    try:
        for kind in args.stores.split(","):
            url = None
            if kind == "etcd":
                etcd = start_etcd(work, results)
                if etcd is None:
                    continue
                url = etcd.url
            results["stores"][kind] = {}
            for mode in args.modes.split(","):
                try:
                    results["stores"][kind][mode] = run_one(kind, url, mode, work, args)
                except (RuntimeError, AssertionError) as exc:
                    print(f"{kind}, {mode}: FAILED: {str(exc)[:1500]}", file=sys.stderr)
                    results["stores"][kind][mode] = {"error": str(exc)[:2000]}
                    failed = True
            if etcd is not None:
                etcd.close()
                etcd = None
    finally:
        with benchlib.signals_ignored():
            if etcd is not None:
                etcd.close()
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    cols = ("p50", "p95", "p99", "max", "mean", "min")
    print(
        f"\nagent SIGKILLed, host alive -> service answers on another node (ms), node_timeout {args.node_timeout}"
    )
    print(f"{'':24}" + "".join(f"{c:>9}" for c in cols) + f"{'n':>5}{'overlaps':>10}")
    for kind, modes in results["stores"].items():
        for mode, r in modes.items():
            if "answer_ms" not in r:
                print(f"{kind + ', ' + mode:24} FAILED")
                continue
            s = r["answer_ms"]
            print(
                f"{kind + ', ' + mode:24}"
                + "".join(f"{s[c]:>9.0f}" for c in cols)
                + f"{s['count']:>5}{r['overlaps']:>10}"
            )
            if mode == "cgroup":
                verdict = "ok" if s["p99"] < TARGET_MS else "MISSED"
                print(f"{'':24}target p99 < {TARGET_MS:.0f} ms: {verdict}")
    path = benchlib.write_results(NAME, results, args.output)
    print(f"results: {path}")
    print(
        benchlib.json_line(
            {k: v for k, v in results.items() if k != "stores"}
            | {
                "stores": {
                    k: {
                        m: {x: r["answer_ms"][x] for x in ("p50", "p99", "max")}
                        if "answer_ms" in r
                        else r
                        for m, r in modes.items()
                    }
                    for k, modes in results["stores"].items()
                }
            }
        )
    )
    overlapped = any(
        r.get("overlaps") for modes in results["stores"].values() for r in modes.values()
    )
    return 1 if failed or overlapped else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="agent deaths per store and mode (20)")
    p.add_argument("--node-timeout", default="3s", help='cluster node_timeout ("3s")')
    p.add_argument("--stores", default="sqlite,etcd", help="sqlite,etcd (etcd if available)")
    p.add_argument("--modes", default=",".join(MODES), help="cgroup,process-group")
    p.add_argument("--output", type=Path, default=None, help=f"default results/{NAME}.json")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()
    if args.trials < 1:
        p.error("need --trials >= 1")
    benchlib.require_vigil()
    return benchlib.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
