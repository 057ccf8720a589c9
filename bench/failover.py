"""Failover latency: a node is lost (SIGKILL), how soon does its service answer elsewhere?

Run (from the repository root, with the project's virtual environment)::

    .venv/bin/python bench/failover.py                         # 20 trials, --mass 200
    .venv/bin/python bench/failover.py --trials 3 --mass 30    # a quick check

What it measures
----------------
A :class:`~vigil.testing.cluster.LocalCluster` of 3 nodes with ``isolate=True``: each
node's ``vigild`` runs in its own PID namespace, so SIGKILL of the namespace's init
kills the agent, its sentinel and its services at once, like a machine losing power.
``node_timeout`` is 3 s (``--node-timeout``). It runs on SQLite and, when an etcd
binary is found, on a real 3-member etcd (``vigil.testing.etcd``); ``--stores``
chooses.

* **Node loss → service answers** (``--trials``, 20): one package whose service is
  the witness (``python -m vigil.testing.witness ... --http PORT``) answering HTTP on
  127.0.0.1:PORT with the name of its node (the namespaces share the host's network,
  so the port moves with the package). Each trial: every node up and the service
  answering from node X; a random pause of 0..node_timeout/3 (so that the kill falls
  anywhere between two lease renewals); ``t0`` = ``time.monotonic_ns()`` just before
  the SIGKILL of X's namespace; then HTTP GET every 10 ms until an answer comes from
  another node: **latency = first answer from the new node - t0**. Also reported:
  **start** = the new witness's own ``start`` record (``CLOCK_MONOTONIC``, the same
  clock) - t0, i.e. when the new process began; the rest is its start-up (Python)
  and binding the port. The lost node is started again before the next trial.
* **Mass failover** (``--mass``, 200; 0 skips it): one node runs N packages (each one
  ``sleep`` service, preferring that node); SIGKILL of the node, then a watch on the
  store (``colocated.Timeline``) times each package's status write that says it runs
  on another node (what ``vigil status`` shows): **all** = until every package is
  ``running`` elsewhere; first and median package too. (Until 2026-12-01 the bench
  polled ``view()``, whole snapshots, every 50 ms, up to half a core taken from the
  agents it measured on two cores.)

Targets printed beside the figures: p99 of node loss → answer within node_timeout + 1 s;
mass failover within node_timeout + 3 s. The witness log is checked at the end: no
package may have run on two nodes at once (it prints the overlap if one did).

A table per store, then one JSON line, are printed; the same figures (with every
sample) are written to ``bench/results/failover.json``. Everything is stopped and the
temporary directory removed at the end, also on Ctrl-C or an error (``--keep`` keeps
it).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib

NAME = "failover"
NODES = ["n1", "n2", "n3"]
PKG = "web"
VIP = "10.77.0.100"  # layout A: web's relocatable address on the lab's hosts
HOSTS_PORT = 8000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_answer(port: int, timeout: float = 0.2) -> str | None:
    """The body of GET / on 127.0.0.1:PORT (``NODE PKG PID``), or None."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/")
        reply = conn.getresponse()
        return reply.read().decode(errors="replace") if reply.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def on(view: dict[str, Any], pkg: str) -> str | None:
    p = view["packages"].get(pkg)
    return p["node"] if p is not None and p["state"] == "running" else None


def new_cluster(work: Path, name: str, store: str | None, node_timeout: str) -> Any:
    from vigil.testing.cluster import LocalCluster

    root = work / name
    root.mkdir()
    return LocalCluster(
        root, NODES, name=name, store=store, node_timeout=node_timeout, isolate=True
    )


def boot(cluster: Any, timeout: float) -> None:
    cluster.start_agents()
    cluster.wait_nodes_up(timeout=timeout)
    cluster.apply()


# --------------------------------------------------------------------------- node loss


def start_etcd(work: Path, results: dict[str, Any]) -> Any | None:
    """A 3-member etcd under ``work/etcd`` (its version noted in ``results``), or None
    (said on stdout) when there is no etcd binary."""
    try:
        from vigil.testing.etcd import EtcdCluster, etcd_version, find_etcd
    except ImportError as exc:
        print(f"etcd: skipped ({exc})", flush=True)
        return None
    binary = find_etcd()
    if binary is None:
        print("etcd: skipped (no etcd binary)", flush=True)
        return None
    results["etcd_version"] = etcd_version(binary)
    return EtcdCluster(work / "etcd", members=3, binary=binary)


def steady_on(cluster: Any, port: int, give_up: float, trial: int) -> str:
    """Every node up and ``PKG`` answering HTTP from its node; that node's name."""
    view = cluster.wait(
        lambda v: all(v["nodes"][n]["state"] == "up" for n in NODES) and on(v, PKG),
        give_up,
        "every node up and the package running",
    )
    victim = on(view, PKG)
    assert victim is not None
    deadline = time.monotonic() + give_up
    while not (http_answer(port) or "").startswith(victim + " "):
        if time.monotonic() > deadline:
            raise RuntimeError(f"trial {trial}: the service on {victim} does not answer")
        time.sleep(0.01)
    return victim


def answer_elsewhere(
    port: int, victim: str, give_up: float, trial: int, every: float = 0.01
) -> tuple[str, int]:
    """Poll HTTP every ``every`` s until a node other than ``victim`` answers:
    (that node, ``time.monotonic_ns()`` of the answer); RuntimeError after ``give_up``."""
    deadline = time.monotonic() + give_up
    while True:
        answer = http_answer(port, timeout=0.1)
        if answer and not answer.startswith(victim + " "):
            return answer.split()[0], time.monotonic_ns()
        if time.monotonic() > deadline:
            raise RuntimeError(f"trial {trial}: no answer from another node after {give_up}s")
        time.sleep(every)


def node_loss_trials(
    cluster: Any, log: Path, port: int, trials: int, ttl: float, give_up: float
) -> list[dict[str, Any]]:
    from vigil.testing.witness import read_records, service_toml

    cluster.write_package(f'name = "{PKG}"\n' + service_toml(log, PKG, port=port))
    boot(cluster, give_up)
    samples: list[dict[str, Any]] = []
    for i in range(trials):
        victim = steady_on(cluster, port, give_up, i)
        time.sleep(random.uniform(0, ttl / 3))  # the kill's phase between two renewals
        t0 = cluster.kill_node(victim)
        new, t_http = answer_elsewhere(port, victim, give_up, i)
        started = [
            r.t for r in read_records(log) if r.kind == "start" and r.node == new and r.t > t0
        ]
        sample = {
            "trial": i,
            "from": victim,
            "to": new,
            "http_ms": round((t_http - t0) / 1e6, 1),
            "start_ms": round((started[0] - t0) / 1e6, 1) if started else None,
        }
        samples.append(sample)
        print(
            f"  trial {i + 1:3d}/{trials}: {victim} -> {new}: process started "
            f"{sample['start_ms']} ms, answering {sample['http_ms']} ms",
            flush=True,
        )
        cluster.start_agent(victim)
    return samples


# --------------------------------------------------------------------------- mass failover


def mass_failover(cluster: Any, count: int, give_up: float) -> dict[str, Any]:
    from colocated import Timeline

    names = [f"p{i:04d}" for i in range(count)]
    for n in names:
        cluster.write_package(
            f'name = "{n}"\nnodes = ["n1", "n2", "n3"]\n'
            f'[[service]]\nname = "s"\ncommand = ["sleep", "100000"]\n'
        )
    t_apply = time.monotonic()
    boot(cluster, give_up)
    deadline = time.monotonic() + give_up + count
    view: dict[str, Any] = {"packages": {}}
    while True:
        with contextlib.suppress(Exception):
            view = cluster.view()
            where = [on(view, n) for n in names]
            if all(w == "n1" for w in where):
                break
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{count} packages were to run on n1 before the loss; after "
                f"{give_up + count:.0f}s: " + summarize(cluster, view, names)
            )
        time.sleep(0.05)
    started_s = time.monotonic() - t_apply
    timeline = Timeline(cluster.name, url=cluster.store_url)
    timeline.start()
    survivors = {n: cluster.agent_pid(n) for n in NODES if n != "n1"}
    cpu0 = {n: benchlib.read_stat(pid) for n, pid in survivors.items()}
    try:
        t0 = cluster.kill_node("n1")
        deadline = time.monotonic() + give_up + count / 10
        while len(moved := timeline.running_since(t0, "n1")) < count:
            if time.monotonic() > deadline:
                stuck = [n for n in names if n not in moved]
                raise RuntimeError(
                    f"only {len(moved)} of {count} packages failed over; the others: "
                    + summarize(cluster, cluster.view(), stuck)
                )
            time.sleep(0.05)
    finally:
        timeline.stop()
    cpu = {}
    for n, pid in survivors.items():
        before, after = cpu0[n], benchlib.read_stat(pid)
        if before is not None and after is not None:
            ticks = after.utime + after.stime - before.utime - before.stime
            cpu[n] = round(ticks / benchlib.CLK_TCK, 2)
    times = sorted(moved.values())
    return {
        "packages": count,
        "agent_cpu_s": cpu,  # each surviving vigild's CPU from the kill until all ran
        "start_all_s": round(started_s, 2),
        "first_s": round(times[0], 3),
        "median_s": round(benchlib.percentile(times, 50), 3),
        "all_s": round(times[-1], 3),
    }


def summarize(cluster: Any, view: dict[str, Any], names: list[str]) -> str:
    """Packages counted by (state, node), a few examples, and the agents' fencing lines."""
    counts: dict[str, int] = {}
    examples: list[str] = []
    for n in names:
        p = view["packages"].get(n, {})
        key = f"{p.get('state')} on {p.get('node')}"
        counts[key] = counts.get(key, 0) + 1
        if p.get("state") != "running" and len(examples) < 3:
            examples.append(f"{n}: {key} ({p.get('message')})")
    fences = [
        line.split(" ", 2)[-1][:160]
        for node in NODES
        for line in cluster.agent_log(node).splitlines()
        if "FENCING" in line or "lost its owner key" in line
    ]
    return (
        ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        + (f"; e.g. {'; '.join(examples)}" if examples else "")
        + (f"; agents: {' | '.join(fences[:4])}" if fences else "")
    )


# --------------------------------------------------------------------------- layout A


def hosts_layout(args: argparse.Namespace, work: Path, partial: dict[str, Any]) -> None:
    """Layout A (``bench/colocated.py``): etcd members on the agents' hosts, the host
    that dies carries one; ``args.trials`` of each fault in ``args.faults``, interleaved.
    What is done so far is in ``partial``."""
    from colocated import FAULTS, Colocated, enter_netns, enter_netns_fd
    from lab.net import Network
    from vigil.testing.witness import overlaps

    faults = args.faults.split(",")
    root = Path(__file__).resolve().parent.parent
    log = work / "hosts-witness.log"
    ctl = work / "hosts-ctl"
    ctl.mkdir()
    for fault in faults:
        partial[fault] = {"samples": []}
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        with Network(hosts=4) as net:
            enter_netns(net.hosts[3].netns)  # this process is the client host h4
            lay = None
            try:
                lay = Colocated(
                    net,
                    net.hosts[:3],
                    work / "hosts",
                    vip=VIP,
                    port=HOSTS_PORT,
                    service=[
                        sys.executable,
                        "-m",
                        "lab.service",
                        str(log),
                        "web",
                        str(HOSTS_PORT),
                        str(ctl),
                    ],  # fmt: skip
                    env={"PYTHONPATH": str(root)},
                    node_timeout=args.node_timeout,
                )
                lay.start()
                for i in range(args.trials):
                    for fault in random.sample(faults, len(faults)):
                        s = lay.trial(fault)
                        partial[fault]["samples"].append(s | {"trial": i})
                        print(
                            f"  trial {i + 1:3d}/{args.trials} {fault:12} {s['from']} -> "
                            f"{s['to']}{' (controller)' if s['controller'] else ''}"
                            f" [{s['asking_victim']} asking it]: "
                            f"{s['ms']:7.1f} ms ("
                            + (f"etcd leader {s['elected_ms']}, " if s["elected_ms"] else "")
                            + f"lease gone {s['gone_ms']}, assigned "
                            f"{s['assigned_ms']}, claimed {s['claimed_ms']}, running "
                            f"{s['running_ms']})",
                            flush=True,
                        )
            finally:
                with benchlib.signals_ignored():
                    if lay is not None:
                        lay.close()
                    enter_netns_fd(home)
    finally:
        os.close(home)
    found = overlaps(log)
    for fault in faults:
        samples = partial[fault]["samples"]
        partial[fault] |= {
            "what": FAULTS[fault],
            "answer_ms": benchlib.summary([s["ms"] for s in samples]),
            **{
                key: benchlib.summary([s[key] for s in samples if s.get(key) is not None])
                for key in ("elected_ms", "gone_ms", "assigned_ms", "claimed_ms", "running_ms")
            },
            "overlaps": len(found),
        }
    if found:
        a, b = found[0]
        print(f"  OVERLAP: {a} and {b}", file=sys.stderr)


# --------------------------------------------------------------------------- the run


def run_store(
    kind: str,
    url: str | None,
    work: Path,
    args: argparse.Namespace,
    clusters: list[Any],
    partial: dict[str, Any],
) -> dict[str, Any]:
    """Both measurements on one store; what is done so far is in ``partial[kind]``."""
    from vigil.config import parse_duration
    from vigil.testing.witness import overlaps

    ttl = parse_duration(args.node_timeout)
    assert ttl is not None
    give_up = ttl * 4 + 30
    out: dict[str, Any] = {"store": kind}
    partial[kind] = out
    if args.trials > 0:
        print(f"{kind}: {args.trials} node losses, node_timeout {args.node_timeout}", flush=True)
        c = new_cluster(work, f"{kind}-loss", url, args.node_timeout)
        clusters.append(c)
        log = c.root / "witness.log"
        samples = node_loss_trials(c, log, args.port or free_port(), args.trials, ttl, give_up)
        http_ms = [s["http_ms"] for s in samples]
        start_ms = [s["start_ms"] for s in samples if s["start_ms"] is not None]
        found = overlaps(log)
        out["node_loss"] = {
            "answer_ms": benchlib.summary(http_ms),
            "process_start_ms": benchlib.summary(start_ms),
            "overlaps": len(found),
            "samples": samples,
        }
        if found:
            a, b = found[0]
            print(f"  OVERLAP: {a} and {b}", file=sys.stderr)
        teardown(c)
    if args.mass > 0:
        print(f"{kind}: mass failover of {args.mass} packages", flush=True)
        c = new_cluster(work, f"{kind}-mass", url, args.node_timeout)
        clusters.append(c)
        out["mass"] = mass_failover(c, args.mass, give_up)
        teardown(c)
    return out


def teardown(cluster: Any) -> None:
    """Hard-stop every node (faster than halting hundreds of packages), then close."""
    with benchlib.signals_ignored():
        for node in list(cluster.agents):
            with contextlib.suppress(Exception):
                cluster.kill_node(node)
        cluster.close()


def print_table(results: dict[str, Any], ttl: float) -> None:
    cols = ("p50", "p95", "p99", "max", "mean", "min")
    target_loss = (ttl + 1) * 1000
    target_mass = ttl + 3
    hosts = {k: v for k, v in results.get("etcd_on_hosts", {}).items() if k != "error"}
    if hosts:
        print("\netcd on the agents' hosts (layout A): host fails -> web answers elsewhere (ms)")
        print(f"{'':30}" + "".join(f"{c:>8}" for c in cols) + f"{'n':>4}")
        for fault, r in hosts.items():
            if "answer_ms" not in r:
                continue
            for label, key in (
                ("answering", "answer_ms"),
                ("  etcd leader elected", "elected_ms"),
                ("  lease gone", "gone_ms"),
                ("  assigned elsewhere", "assigned_ms"),
                ("  claimed", "claimed_ms"),
                ("  running", "running_ms"),
            ):
                s = r[key]
                if not s["count"]:
                    continue
                name = f"{fault}: {label}" if key == "answer_ms" else label
                print(f"{name:30}" + "".join(f"{s[c]:>8.0f}" for c in cols) + f"{s['count']:>4}")
            p99 = r["answer_ms"]["p99"]
            verdict = "ok" if p99 <= target_loss else "MISSED"
            print(f"  target p99 <= {target_loss:.0f} ms: {verdict}; overlaps: {r['overlaps']}")
    for kind, r in results["stores"].items():
        loss = r.get("node_loss")
        if loss:
            print(f"\n{kind}: node loss -> service answers on another node (ms)")
            print(f"{'':16}" + "".join(f"{c:>10}" for c in cols) + f"{'n':>5}")
            for label, key in (("answering", "answer_ms"), ("process start", "process_start_ms")):
                s = loss[key]
                print(f"{label:16}" + "".join(f"{s[c]:>10.0f}" for c in cols) + f"{s['count']:>5}")
            p99 = loss["answer_ms"]["p99"]
            verdict = "ok" if p99 <= target_loss else "MISSED"
            print(f"target p99 <= {target_loss:.0f} ms: {verdict}; overlaps: {loss['overlaps']}")
        mass = r.get("mass")
        if mass:
            verdict = "ok" if mass["all_s"] <= target_mass else "MISSED"
            print(
                f"{kind}: mass failover of {mass['packages']} packages: first "
                f"{mass['first_s']:.2f} s, median {mass['median_s']:.2f} s, all "
                f"{mass['all_s']:.2f} s (target <= {target_mass:.0f} s: {verdict}); "
                f"starting them all took {mass['start_all_s']:.1f} s; agents' CPU meanwhile "
                + ", ".join(f"{n} {s:.2f} s" for n, s in mass["agent_cpu_s"].items())
            )


def run(args: argparse.Namespace) -> int:
    from vigil.config import parse_duration

    ttl = parse_duration(args.node_timeout)
    assert ttl is not None
    work = Path(tempfile.mkdtemp(prefix="vigil-bench-failover-"))
    clusters: list[Any] = []
    etcd = None
    results: dict[str, Any] = {
        "bench": NAME,
        "time": benchlib.utc_now(),
        "host": benchlib.host_info(),
        "node_timeout_s": ttl,
        "trials": args.trials,
        "mass": args.mass,
        "layouts": args.layouts,
        "faults": args.faults.split(",") if "hosts" in args.layouts else [],
        "targets": {"node_loss_p99_ms": (ttl + 1) * 1000, "mass_all_s": ttl + 3},
        "stores": {},
    }
    failed = False
    try:
        if "hosts" in args.layouts:
            print(
                f"etcd on the agents' hosts (layout A): {args.trials} trials of each of "
                f"{args.faults}, node_timeout {args.node_timeout}",
                flush=True,
            )
            results["etcd_on_hosts"] = {}
            try:
                hosts_layout(args, work, results["etcd_on_hosts"])
            except (RuntimeError, AssertionError, OSError) as exc:
                print(f"layout A: FAILED: {str(exc)[:1500]}", file=sys.stderr)
                results["etcd_on_hosts"]["error"] = str(exc)[:2000]
                failed = True
        for kind in args.stores.split(",") if "pidns" in args.layouts else []:
            url = None
            if kind == "etcd":
                etcd = start_etcd(work, results)
                if etcd is None:
                    continue
                url = etcd.url
            elif kind != "sqlite":
                raise SystemExit(f"bench: --stores: unknown store {kind!r}")
            try:
                run_store(kind, url, work, args, clusters, results["stores"])
            except (RuntimeError, AssertionError) as exc:
                print(f"{kind}: FAILED: {str(exc)[:1500]}", file=sys.stderr)
                results["stores"][kind]["error"] = str(exc)[:2000]
                failed = True
            if etcd is not None:
                etcd.close()
                etcd = None
    finally:
        with benchlib.signals_ignored():
            for c in clusters:
                with contextlib.suppress(Exception):
                    teardown(c)
            if etcd is not None:
                etcd.close()
            if args.keep:
                print(f"bench: kept {work}", file=sys.stderr)
            else:
                shutil.rmtree(work, ignore_errors=True)
    print_table(results, ttl)
    path = benchlib.write_results(NAME, results, args.output)
    print(f"results: {path}")
    print(
        benchlib.json_line(
            {k: v for k, v in results.items() if k not in ("stores", "etcd_on_hosts")}
            | {
                "etcd_on_hosts": {
                    f: {x: r["answer_ms"][x] for x in ("p50", "p99", "max")}
                    for f, r in results.get("etcd_on_hosts", {}).items()
                    if isinstance(r, dict) and "answer_ms" in r
                }
            }
            | {
                "stores": {
                    k: {
                        "node_loss_ms": {
                            x: r["node_loss"]["answer_ms"][x] for x in ("p50", "p99", "max")
                        }
                        if "node_loss" in r
                        else None,
                        "overlaps": r.get("node_loss", {}).get("overlaps"),
                        "mass_all_s": r.get("mass", {}).get("all_s"),
                        "error": (r.get("error") or "").split("\n")[0][:300] or None,
                    }
                    for k, r in results["stores"].items()
                }
            }
        )
    )
    overlapped = any(
        r.get("node_loss", {}).get("overlaps") for r in results["stores"].values()
    ) or any(
        isinstance(r, dict) and r.get("overlaps") for r in results.get("etcd_on_hosts", {}).values()
    )
    return 1 if failed or overlapped else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="node losses per store (20)")
    p.add_argument("--mass", type=int, default=200, help="packages for mass failover, 0 = skip")
    p.add_argument("--node-timeout", default="3s", help='cluster node_timeout ("3s")')
    p.add_argument("--stores", default="sqlite,etcd", help="sqlite,etcd (etcd if available)")
    p.add_argument(
        "--layouts",
        default="pidns,hosts",
        help="pidns (nodes as PID namespaces, etcd on this host) and/or hosts (layout A: "
        "etcd members on the agents' hosts, network namespaces; needs root)",
    )
    p.add_argument(
        "--faults",
        default="first,leader,isolate",
        help="layout A's faults, of first, leader, first-leader, isolate",
    )
    p.add_argument("--port", type=int, default=0, help="the service's HTTP port (a free one)")
    p.add_argument("--output", type=Path, default=None, help=f"default results/{NAME}.json")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()
    if args.trials < 0 or args.mass < 0:
        p.error("need --trials >= 0 and --mass >= 0")
    layouts = args.layouts.split(",")
    if not set(layouts) <= {"pidns", "hosts"}:
        p.error(f"--layouts: expected pidns and/or hosts, got {args.layouts!r}")
    if "hosts" in layouts and (os.geteuid() != 0 or shutil.which("ip") is None):
        if args.layouts != p.get_default("layouts"):
            p.error("--layouts hosts needs root and iproute2 (network namespaces)")
        print("layout A (hosts): skipped, it needs root and iproute2", file=sys.stderr)
        layouts.remove("hosts")
    args.layouts = layouts
    benchlib.require_vigil()
    from colocated import FAULTS

    if "hosts" in layouts and not set(args.faults.split(",")) <= set(FAULTS):
        p.error(f"--faults: expected some of {', '.join(FAULTS)}, got {args.faults!r}")
    return benchlib.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
