"""etcd leader loss under a running cluster: how long the agents go without a lease
renewal, against the point where they must fence themselves.

Run (from the repository root, with the project's virtual environment)::

    .venv/bin/python bench/etcd_elections.py               # 10 leader kills per setup
    .venv/bin/python bench/etcd_elections.py --kills 3     # a quick check

What it measures
----------------
A real 3-member etcd (``vigil.testing.etcd``) and three ``vigild`` agents on it
(``LocalCluster``, ``node_timeout = "3s"``, one package with a ``sleep`` service per
node). Each kill: the members agree on a leader; it is SIGKILLed (``t0``); the other
two elect a new one; three seconds later the old leader is started again and the
next kill waits until every member is healthy and agrees on a leader.

* **election**: ``t0`` until the two survivors agree on a new leader (their status
  polled every 20 ms);
* **renewal gap**: per agent, the time between the last good lease renewal before
  the kill and the first one after it, as the agent logs it (``lease renewed after N
  failed attempts (S s since the last renewal)``); an agent whose renewals did not
  fail logs nothing, and its gap is at most one renewal interval (0.5 s). The agents
  fence themselves at 0.6 x ``node_timeout`` = 1.8 s without a renewal, and one that
  did counts as 1.8 s;
* **fenced**: the agents that fenced themselves (``FENCING`` in their logs).

Two setups of etcd: **recommended** (``--election-timeout 600``, pre-vote on; what
docs/operations.md asks for with ``node_timeout = "3s"``) and **etcd defaults**
(``--election-timeout 1000``; pre-vote is off by default in etcd 3.4, but pre-vote
does not change a killed leader's election, so only the timeout differs here).

A table, then one JSON line, are printed; the figures (with every sample) are written
to ``bench/results/etcd_elections.json``. Everything is stopped and the temporary
directory removed at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib

benchlib.require_vigil()

from vigil.testing.cluster import LocalCluster  # noqa: E402
from vigil.testing.etcd import EtcdCluster, etcd_version, find_etcd  # noqa: E402

NAME = "etcd_elections"
NODES = ["n1", "n2", "n3"]
NODE_TIMEOUT = 3.0
FENCE_SELF = 0.6 * NODE_TIMEOUT
SETUPS = {"recommended": 600, "etcd defaults": 1000}
_GAP = re.compile(r"lease renewed after \d+ failed attempts \(([\d.]+)s since")


def wait_leader(etcd: EtcdCluster, not_this: int | None, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while True:
        leader = etcd.leader()
        if leader is not None and leader != not_this and etcd.running(leader):
            return leader
        if time.monotonic() > deadline:
            raise RuntimeError(f"etcd agreed on no new leader within {timeout:g}s")
        time.sleep(0.02)


def run_setup(root: Path, binary: str, election_ms: int, kills: int) -> dict[str, Any]:
    elections: list[float] = []
    gaps: list[float] = []  # the largest logged gap per kill (0 when none failed)
    fenced: list[int] = []
    with EtcdCluster(root / "etcd", binary=binary, election_ms=election_ms) as etcd:
        c = LocalCluster(root / "vigil", NODES, node_timeout=f"{NODE_TIMEOUT:g}s", store=etcd.url)
        try:
            for n in NODES:
                c.write_package(
                    f'name = "p{n}"\nnodes = ["{n}"]\n'
                    '[[service]]\nname = "s"\ncommand = ["sleep", "infinity"]\n'
                )
            c.start_agents()
            c.wait_nodes_up()
            c.apply()
            c.wait(
                lambda v: all(p["state"] == "running" for p in v["packages"].values()),
                30,
                "every package running",
            )
            seen = {n: len(c.agent_log(n)) for n in NODES}
            for k in range(kills):
                leader = wait_leader(etcd, None)
                t0 = time.monotonic()
                etcd.kill_member(leader)
                wait_leader(etcd, leader)
                elections.append(time.monotonic() - t0)
                time.sleep(NODE_TIMEOUT)  # every agent renews or fences by now
                etcd.start_member(leader)
                new = {n: c.agent_log(n)[seen[n] :] for n in NODES}
                seen = {n: seen[n] + len(new[n]) for n in NODES}
                logged = [float(g) for text in new.values() for g in _GAP.findall(text)]
                fenced.append(sum("FENCING" in text for text in new.values()))
                # an agent that fenced went FENCE_SELF (at least) without a renewal
                gaps.append(max([*logged, *[FENCE_SELF] * fenced[-1]], default=0.0))
                print(
                    f"  kill {k + 1}/{kills}: election {elections[-1]:.2f}s, largest "
                    f"renewal gap {gaps[-1]:.2f}s, fenced {fenced[-1]}",
                    flush=True,
                )
                c.wait_nodes_up(timeout=30)
        finally:
            c.close()
    return {
        "election_ms": election_ms,
        "election_s": benchlib.summary(elections),
        "renewal_gap_s": benchlib.summary(gaps),
        "kills": kills,
        "kills_with_a_fence": sum(1 for f in fenced if f),
        "agents_fenced": sum(fenced),
        "samples": {"election_s": elections, "renewal_gap_s": gaps, "fenced": fenced},
    }


def run(args: argparse.Namespace) -> int:
    binary = find_etcd()
    if binary is None:
        print("no etcd binary: apt-get install etcd-server", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="vigil-bench-"))
    results: dict[str, Any] = {}
    try:
        for setup, election_ms in SETUPS.items():
            print(f"{setup}: etcd --election-timeout {election_ms}", flush=True)
            results[setup] = run_setup(work / setup.replace(" ", "-"), binary, election_ms,
                                       args.kills)  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"node_timeout {NODE_TIMEOUT:g}s: agents fence at {FENCE_SELF:.1f}s without a renewal")
    print("| etcd | election p50 / max | largest renewal gap p50 / max | kills with a fence |")
    print("|---|---|---|---|")
    for setup, r in results.items():
        e, g = r["election_s"], r["renewal_gap_s"]
        print(
            f"| {setup} ({r['election_ms']} ms) | {e['p50']:.2f} / {e['max']:.2f} s "
            f"| {g['p50']:.2f} / {g['max']:.2f} s "
            f"| {r['kills_with_a_fence']} of {r['kills']} ({r['agents_fenced']} agents) |"
        )
    record = {
        "benchmark": NAME,
        "when": benchlib.utc_now(),
        "etcd_version": etcd_version(binary),
        "node_timeout_s": NODE_TIMEOUT,
        "host": benchlib.host_info(),
        "setups": results,
    }
    benchlib.write_results(NAME, record, args.output)
    print(benchlib.json_line({k: v for k, v in record.items() if k != "setups"} | {
        s: {k: v for k, v in r.items() if k != "samples"} for s, r in results.items()
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    sys.exit(benchlib.run_main(run, parser.parse_args()))
