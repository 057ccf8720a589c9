"""Planner time: ``plan(snapshot, now)`` for 1,000 and 10,000 packages on 100 nodes.

The cluster is synthetic but shaped like a real one (seeded, so every run plans the
same snapshot):

- 100 nodes ``n000``..``n099``, 5 of them down (their packages must fail over);
- half the packages use ``nodes = ["*"]``, the other half a list of 2-5 nodes;
- 30 % ``min_package_node``, 10 % ``failback_policy = "automatic"``;
- unique priorities on 10 % of the packages;
- 10 % with an ``up`` dependency on an earlier package (same / any / different
  node), 1 % in mutual ``down`` pairs;
- half the packages already owned and running on an up node; a few more were
  running on a node that is now down (status ``running``, no owner: failover);
- a few admin records (global switching off, node switching off, maintenance).

Only the ``plan()`` call is timed (building the snapshot is not). Median of
``--runs`` (5) runs per size, plus min and max. Prints a table, then one JSON line,
and writes ``bench/results/planner.json``. Target: 10,000 packages x 100 nodes in
under 1 s. ``--profile`` prints the cProfile top functions of one 10,000-package run.

    .venv/bin/python bench/planner.py [--sizes 1000,10000] [--nodes 100] [--runs 5]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import benchlib

TARGET_S = 1.0
DOWN_NODES = 5


def build_snapshot(n_packages: int, n_nodes: int, seed: int = 1) -> Any:
    from vigil.config import ClusterSpec, DependencySpec, PackageSpec
    from vigil.model import AdminRecord, NodeRecord, PackageState, PackageStatus
    from vigil.snapshot import Snapshot

    rng = random.Random(seed)
    nodes = [f"n{i:03d}" for i in range(n_nodes)]
    down = set(rng.sample(nodes, min(DOWN_NODES, n_nodes - 1)))
    up = [n for n in nodes if n not in down]
    names = [f"p{i:05d}" for i in range(n_packages)]
    prio_values = rng.sample(range(1, 3001), min(3000, n_packages // 10))
    prio_of = dict(zip(rng.sample(names, len(prio_values)), prio_values, strict=True))
    down_pairs: dict[str, str] = {}
    for _ in range(n_packages // 200):  # 1 % of the packages in mutual `down` pairs
        a, b = rng.sample(names, 2)
        if a not in down_pairs and b not in down_pairs:
            down_pairs[a], down_pairs[b] = b, a
    packages: dict[str, PackageSpec] = {}
    owners: dict[str, str] = {}
    status: dict[str, PackageStatus] = {}
    admin: dict[str, AdminRecord] = {}
    for i, name in enumerate(names):
        pkg_nodes = ["*"] if rng.random() < 0.5 else rng.sample(nodes, rng.randint(2, 5))
        deps: list[DependencySpec] = []
        if i > 0 and rng.random() < 0.10:
            deps.append(
                DependencySpec(
                    package=names[rng.randrange(i)],
                    condition="up",
                    location=rng.choice(["same_node", "any_node", "different_node"]),
                )
            )
        if name in down_pairs:
            deps.append(
                DependencySpec(package=down_pairs[name], condition="down", location="same_node")
            )
        packages[name] = PackageSpec(
            name=name,
            nodes=pkg_nodes,
            failover_policy="min_package_node" if rng.random() < 0.3 else "configured_node",
            failback_policy="automatic" if rng.random() < 0.1 else "manual",
            priority=prio_of.get(name),
            dependency=deps,
        )
        r = rng.random()
        if r < 0.5:  # owned and running on an up node
            node = rng.choice(up)
            owners[name] = node
            status[name] = PackageStatus(state=PackageState.RUNNING, node=node, since=0.0)
        elif r < 0.55:  # was running on a node that is now down
            status[name] = PackageStatus(
                state=PackageState.RUNNING, node=rng.choice(sorted(down)), since=0.0
            )
        a = rng.random()
        if a < 0.02:
            admin[name] = AdminRecord(auto_run=False)
        elif a < 0.04:
            admin[name] = AdminRecord(disabled_nodes=tuple(rng.sample(nodes, 2)))
        elif a < 0.05:
            admin[name] = AdminRecord(maintenance=True)
    return Snapshot(
        revision=1,
        cluster=ClusterSpec(name="bench", store="memory://", nodes=nodes),
        packages=packages,
        nodes={n: NodeRecord(name=n, pid=1, started_at=0.0) for n in up},
        owners=owners,
        owner_revisions=dict.fromkeys(owners, 1),
        status=status,
        admin=admin,
    )


def time_plan(snapshot: Any, runs: int) -> tuple[list[float], Any]:
    from vigil.plan.planner import plan

    times: list[float] = []
    result = None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = plan(snapshot, 1000.0)
        times.append(time.perf_counter() - t0)
    return times, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000", help="package counts, comma separated")
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="cProfile one run of the largest size")
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        import vigil.plan.planner  # noqa: F401
    except ImportError:
        sys.exit("bench: cannot import vigil; run with .venv/bin/python bench/planner.py")
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rows: list[dict[str, Any]] = []
    print(f"planner: {args.nodes} nodes ({DOWN_NODES} down), median of {args.runs} runs")
    print(f"{'packages':>9} {'median s':>9} {'min s':>8} {'max s':>8} {'starts':>7} "
          f"{'moves':>6} {'halts':>6} {'waits':>6}")  # fmt: skip
    for size in sizes:
        snap = build_snapshot(size, args.nodes, args.seed)
        times, result = time_plan(snap, args.runs)
        verbs = [a.verb.value for a in result.actions]
        row = {
            "packages": size,
            "nodes": args.nodes,
            "median_s": round(statistics.median(times), 4),
            "min_s": round(min(times), 4),
            "max_s": round(max(times), 4),
            "runs": args.runs,
            "starts": verbs.count("start"),
            "moves": verbs.count("move"),
            "halts": verbs.count("halt"),
            "waits": verbs.count("wait"),
        }
        rows.append(row)
        print(f"{size:>9} {row['median_s']:>9.3f} {row['min_s']:>8.3f} {row['max_s']:>8.3f} "
              f"{row['starts']:>7} {row['moves']:>6} {row['halts']:>6} {row['waits']:>6}")  # fmt: skip
    largest = max(rows, key=lambda r: r["packages"])
    ok = largest["packages"] < 10_000 or largest["median_s"] < TARGET_S
    print(f"target: 10,000 packages x 100 nodes under {TARGET_S:g} s: "
          f"{'met' if ok else 'NOT met'}")  # fmt: skip
    data = {
        "benchmark": "planner",
        "time": benchlib.utc_now(),
        "unit": "s",
        "target_s": TARGET_S,
        "seed": args.seed,
        "down_nodes": DOWN_NODES,
        "results": rows,
        "host": benchlib.host_info(),
    }
    benchlib.write_results("planner", data, args.output)
    if args.profile:
        snap = build_snapshot(max(sizes), args.nodes, args.seed)
        from vigil.plan.planner import plan

        prof = cProfile.Profile()
        prof.runcall(plan, snap, 1000.0)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    print(benchlib.json_line(data))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
