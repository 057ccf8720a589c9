"""Resident memory and idle CPU of one vigil agent running many packages.

Run (from the repository root, with the project's virtual environment)::

    .venv/bin/python bench/agent_footprint.py                           # 100 packages, 60 s
    .venv/bin/python bench/agent_footprint.py --packages 20 --window 10 # a quick check

What it measures
----------------
A :class:`~vigil.testing.cluster.LocalCluster` (a real ``vigild`` on a real SQLite store)
in a temporary directory. The agent is started first on an empty configuration; then N
packages are written and applied, each with one service (``sleep 100000``) and one
monitor (``true`` every ``10s``, so N/10 monitor commands per second in all).

* **apply → all running**: from the start of ``vigil apply`` until ``view()`` (what
  ``vigil status`` shows, polled every 50 ms) shows every package ``running``. The
  duration of the ``vigil apply`` command itself is reported beside it.
* After a settle time (``--settle``, 5 s) the bench reads /proc over a window
  (``--window``, 60 s) without touching the agent or its store:

  - **agent RSS**: ``VmRSS`` of the ``vigild`` process from /proc/PID/status, sampled
    every second (mean and max), and ``VmHWM`` (its peak since it started);
  - **agent CPU**: ``utime + stime`` delta of /proc/PID/stat over the window, in % of
    one core (clock ticks: ``os.sysconf("SC_CLK_TCK")``). This is vigild itself, all
    its threads, including the fork of every monitor command;
  - **monitor commands**: the ``cutime + cstime`` delta of vigild, i.e. the CPU of its
    children it reaped during the window (the ``true`` processes, from the moment
    they were forked), in % of one core. Reported separately, not part of the target;
  - **sentinel**: RSS and CPU of the sentinel process (the child of vigild running
    ``-m vigil.supervise.sentinel``);
  - **store writes**: the store's revision before and after the window (one read of
    the store at each end), in writes per second: what the idle agent writes;
  - the agent's log growth (LocalCluster runs ``vigild --log-level debug``).

It runs once per containment mode (``--containment``, default both): ``cgroup``
(vigil's default: a cgroup per package, a leaf per service and for the monitor, the
monitor commands forked with a preexec step that joins the cgroup) and
``process-group`` (the test-only switch ``VIGIL_TEST_DISABLE_CONTAINMENT=1``: what
vigil did before), so the cost of the cgroups is the difference, measured in one
run. The number of cgroups created is reported (their kernel memory is not in the
agent's RSS).

Targets printed beside the figures: agent RSS < 100 MB (the largest VmRSS sample of the
window; MB = 10^6 bytes) and agent idle CPU < 2 % of one core.

A table, then one JSON line, are printed; the same figures are written to
``bench/results/agent_footprint.json``. The agent is stopped (``LocalCluster.close()``:
SIGTERM, it halts every package) and anything left of its processes killed, and the
temporary directory removed, also on Ctrl-C or an error (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib

NAME = "agent_footprint"
NODE = "node1"
TARGET_RSS_MB = 100.0
TARGET_CPU_PCT = 2.0


def kb_to_mb(kb: float) -> float:
    return kb * 1024 / 1e6


def pct(ticks: int, seconds: float) -> float:
    return 100.0 * ticks / benchlib.CLK_TCK / seconds if seconds > 0 else float("nan")


def package_toml(name: str) -> str:
    return f"""\
name = "{name}"

[[service]]
name = "sleep"
command = ["sleep", "100000"]

[[monitor]]
name = "true"
command = ["true"]
interval = "10s"
"""


@dataclass(frozen=True)
class Proc:
    """A process named by pid and start time (so a reused pid is never mistaken for it)."""

    pid: int
    start: int

    def alive(self) -> bool:
        st = benchlib.read_stat(self.pid)
        return st is not None and st.starttime == self.start and st.state != "Z"


def children_of(pid: int) -> list[Proc]:
    out = []
    for p in benchlib.all_pids():
        st = benchlib.read_stat(p)
        if st is not None and st.ppid == pid and st.state != "Z":
            out.append(Proc(p, st.starttime))
    return out


def find_sentinel(agent_pid: int) -> int | None:
    for child in children_of(agent_pid):
        if "vigil.supervise.sentinel" in benchlib.read_cmdline(child.pid):
            return child.pid
    return None


def wait_all_running(
    cluster: Any, names: list[str], timeout: float
) -> tuple[float, dict[str, int]]:
    """Poll ``view()`` until every package in ``names`` is running; return the monotonic
    time it was first seen so, and the count of packages per state at that moment."""
    deadline = time.monotonic() + timeout
    counts: dict[str, int] = {}
    while True:
        now = time.monotonic()
        try:
            pkgs = cluster.view()["packages"]
        except (KeyError, TypeError):
            pkgs = {}
        counts = {}
        for n in names:
            state = pkgs.get(n, {}).get("state", "missing")
            counts[state] = counts.get(state, 0) + 1
        if counts.get("running", 0) == len(names):
            return now, counts
        bad = {s: c for s, c in counts.items() if s in ("failed", "halt_failed")}
        if bad:
            raise RuntimeError(
                f"packages failed to start: {bad}\n{cluster.agent_log(NODE)[-3000:]}"
            )
        if now >= deadline:
            raise RuntimeError(
                f"not all {len(names)} packages running after {timeout}s: {counts}\n"
                + cluster.agent_log(NODE)[-3000:]
            )
        time.sleep(0.05)


def wait_node_up(cluster: Any, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(KeyError, TypeError):
            if cluster.view()["nodes"][NODE]["state"] == "up":
                return time.monotonic()
        if time.monotonic() >= deadline:
            raise RuntimeError(f"node {NODE} not up after {timeout}s\n{cluster.agent_log(NODE)}")
        time.sleep(0.05)


def measure(agent_pid: int, sentinel_pid: int | None, window: float, log: Path) -> dict[str, Any]:
    """Read /proc over ``window`` seconds (one sample a second); touch nothing else."""
    a0 = benchlib.read_stat(agent_pid)
    s0 = benchlib.read_stat(sentinel_pid) if sentinel_pid else None
    if a0 is None:
        raise RuntimeError("vigild is gone")
    log0 = log.stat().st_size if log.exists() else 0
    t0 = time.monotonic()
    rss: list[int] = []
    sent_rss: list[int] = []
    nchildren: list[int] = []
    end = t0 + window
    while True:
        rss.append(benchlib.read_status_kb(agent_pid, "VmRSS").get("VmRSS", 0))
        if sentinel_pid:
            sent_rss.append(benchlib.read_status_kb(sentinel_pid, "VmRSS").get("VmRSS", 0))
        nchildren.append(len(children_of(agent_pid)))
        now = time.monotonic()
        if now >= end:
            break
        time.sleep(min(1.0, end - now))  # the sampling period, not a wait for a condition
    a1 = benchlib.read_stat(agent_pid)
    s1 = benchlib.read_stat(sentinel_pid) if sentinel_pid else None
    t1 = time.monotonic()
    if a1 is None:
        raise RuntimeError("vigild died during the window")
    hwm = benchlib.read_status_kb(agent_pid, "VmHWM").get("VmHWM", 0)
    elapsed = t1 - t0
    log1 = log.stat().st_size if log.exists() else 0
    return {
        "window_s": round(elapsed, 2),
        "agent": {
            "pid": agent_pid,
            "rss_mb_mean": round(kb_to_mb(sum(rss) / len(rss)), 1),
            "rss_mb_max": round(kb_to_mb(max(rss)), 1),
            "hwm_mb": round(kb_to_mb(hwm), 1),
            "cpu_pct": round(pct(a1.utime + a1.stime - a0.utime - a0.stime, elapsed), 2),
            "cpu_user_pct": round(pct(a1.utime - a0.utime, elapsed), 2),
            "cpu_system_pct": round(pct(a1.stime - a0.stime, elapsed), 2),
            "children_max": max(nchildren),
            "log_bytes_per_min": round((log1 - log0) * 60 / elapsed),
        },
        "monitor_commands": {
            "cpu_pct": round(pct(a1.cutime + a1.cstime - a0.cutime - a0.cstime, elapsed), 2),
        },
        "sentinel": {
            "pid": sentinel_pid,
            "rss_mb_max": round(kb_to_mb(max(sent_rss)), 1) if sent_rss else None,
            "cpu_pct": round(pct(s1.utime + s1.stime - s0.utime - s0.stime, elapsed), 2)
            if s0 and s1
            else None,
        },
        "samples": len(rss),
    }


def run(args: argparse.Namespace) -> int:
    """Each containment mode in turn (``--containment``), the same measurement."""
    benchlib.require_vigil()
    results: dict[str, Any] = {}
    for mode in args.containment.split(","):
        saved = os.environ.pop("VIGIL_TEST_DISABLE_CONTAINMENT", None)
        if mode == "process-group":
            os.environ["VIGIL_TEST_DISABLE_CONTAINMENT"] = "1"
        elif mode != "cgroup":
            raise SystemExit(f"bench: --containment: unknown mode {mode!r}")
        try:
            print(f"\n=== containment: {mode}", flush=True)
            results[mode] = run_mode(args, mode)
        finally:
            os.environ.pop("VIGIL_TEST_DISABLE_CONTAINMENT", None)
            if saved is not None:
                os.environ["VIGIL_TEST_DISABLE_CONTAINMENT"] = saved
    if len(results) > 1:
        print("\nside by side (what the cgroups cost):")
        for mode, r in results.items():
            a = r["agent"]
            print(
                f"  {mode:14} RSS max {a['rss_mb_max']:.1f} MB, idle CPU {a['cpu_pct']:.2f} %, "
                f"monitor commands {r['monitor_commands']['cpu_pct']:.2f} %, apply -> all "
                f"running {r['apply_to_all_running_s']:.2f} s, cgroups {r['cgroups']}"
            )
    combined = {"benchmark": NAME, "time": benchlib.utc_now(), "modes": results}
    path = benchlib.write_results(NAME, combined, args.output)
    print(f"written to {path}")
    print(benchlib.json_line(combined))
    return 0


def count_cgroups(root: Path | None) -> int:
    if root is None or not root.exists():
        return 0
    return sum(len(dirs) for _, dirs, _ in os.walk(root))


def run_mode(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    from vigil.testing.cluster import LocalCluster

    work = Path(tempfile.mkdtemp(prefix="vigil-bench-fp-"))
    cluster: LocalCluster | None = None
    procs: list[Proc] = []
    try:
        cluster = LocalCluster(work / "vigil", [NODE], name="bench")
        cluster.apply()  # the cluster alone, no package yet
        t_agent = time.monotonic()
        cluster.start_agents()
        agent_pid = cluster.agents[NODE].pid
        agent_up = wait_node_up(cluster, 60) - t_agent

        names = [f"p{i:04d}" for i in range(args.packages)]
        for n in names:
            cluster.write_package(package_toml(n))
        t_apply = time.monotonic()
        cluster.apply()
        apply_cmd = time.monotonic() - t_apply
        t_running, _ = wait_all_running(cluster, names, args.start_timeout)
        to_running = t_running - t_apply

        agent = benchlib.read_stat(agent_pid)
        if agent is None:
            raise RuntimeError("vigild is gone")
        procs = [Proc(agent_pid, agent.starttime), *children_of(agent_pid)]
        sentinel_pid = find_sentinel(agent_pid)
        if sentinel_pid is None:
            print("bench: WARNING: no sentinel process found under vigild", file=sys.stderr)

        print(
            f"agent footprint: {args.packages} packages running after {to_running:.2f}s; "
            f"settling {args.settle:g}s, then measuring for {args.window:g}s",
            flush=True,
        )
        host = benchlib.host_info()
        time.sleep(args.settle)  # let start-up work (first monitor runs, status writes) end
        rev0 = cluster.view()["revision"]
        m = measure(agent_pid, sentinel_pid, args.window, cluster.logs / f"{NODE}.log")
        rev1 = cluster.view()["revision"]
        m["store_writes_per_s"] = round((rev1 - rev0) / m["window_s"], 2)

        # still all running? (one read of the store, after the window)
        final = cluster.view()["packages"]
        running_after = sum(1 for n in names if final.get(n, {}).get("state") == "running")
        restarts_after = sum(
            s.get("restarts", 0)
            for n in names
            for s in final.get(n, {}).get("services", {}).values()
        )
        warnings: list[str] = []
        if running_after != len(names):
            warnings.append(f"only {running_after}/{len(names)} packages running after the window")
        if restarts_after:
            warnings.append(f"{restarts_after} service restart(s) during the run (expected 0)")

        rss_ok = m["agent"]["rss_mb_max"] < TARGET_RSS_MB
        cpu_ok = m["agent"]["cpu_pct"] < TARGET_CPU_PCT
        result: dict[str, Any] = {
            "benchmark": NAME,
            "time": benchlib.utc_now(),
            "containment": mode,
            "cgroups": count_cgroups(cluster.cgroup_root) if mode == "cgroup" else 0,
            "packages": args.packages,
            "settle_s": args.settle,
            **m,
            "agent_start_to_up_s": round(agent_up, 2),
            "apply_cmd_s": round(apply_cmd, 2),
            "apply_to_all_running_s": round(to_running, 2),
            "monitor_runs_per_s_expected": round(args.packages / 10.0, 1),
            "targets": {
                "agent_rss_mb": {"target": TARGET_RSS_MB, "value": m["agent"]["rss_mb_max"]},
                "agent_idle_cpu_pct": {"target": TARGET_CPU_PCT, "value": m["agent"]["cpu_pct"]},
                "met": rss_ok and cpu_ok,
            },
            "vigil_version": benchlib.package_version("vigil"),
            "host": {**host, "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
            "warnings": warnings,
        }
        result["targets"]["agent_rss_mb"]["ok"] = rss_ok
        result["targets"]["agent_idle_cpu_pct"]["ok"] = cpu_ok
        print_table(result)
        for w in warnings:
            print(f"WARNING: {w}")
        return result
    finally:
        cleanup(work, cluster, procs, keep=args.keep)


def print_table(r: dict[str, Any]) -> None:
    a, s, mon = r["agent"], r["sentinel"], r["monitor_commands"]

    def ok(flag: bool) -> str:
        return "ok" if flag else "MISSED"

    t = r["targets"]
    rows = [
        ("containment", r["containment"], f"{r['cgroups']} cgroups"),
        ("packages (1 service + 1 monitor each)", f"{r['packages']}", ""),
        ("apply -> all running", f"{r['apply_to_all_running_s']:.2f} s", ""),
        ("  of which the vigil apply command", f"{r['apply_cmd_s']:.2f} s", ""),
        ("agent RSS, max over window", f"{a['rss_mb_max']:.1f} MB",
         f"< {TARGET_RSS_MB:g} MB  {ok(t['agent_rss_mb']['ok'])}"),
        ("agent RSS, mean", f"{a['rss_mb_mean']:.1f} MB", ""),
        ("agent VmHWM (peak since start)", f"{a['hwm_mb']:.1f} MB", ""),
        ("agent CPU, idle (% of one core)", f"{a['cpu_pct']:.2f} %",
         f"< {TARGET_CPU_PCT:g} %  {ok(t['agent_idle_cpu_pct']['ok'])}"),
        ("  user / system", f"{a['cpu_user_pct']:.2f} / {a['cpu_system_pct']:.2f} %", ""),
        ("monitor commands CPU (% of one core)", f"{mon['cpu_pct']:.2f} %",
         f"{r['monitor_runs_per_s_expected']:g} runs/s"),
        ("sentinel RSS", f"{s['rss_mb_max']} MB" if s["rss_mb_max"] is not None else "n/a", ""),
        ("sentinel CPU", f"{s['cpu_pct']} %" if s["cpu_pct"] is not None else "n/a", ""),
        ("store writes during the window", f"{r['store_writes_per_s']:g} /s", ""),
        ("agent log growth (debug level)", f"{a['log_bytes_per_min'] / 1000:.1f} kB/min", ""),
        ("window", f"{r['window_s']:.1f} s, {r['samples']} samples", ""),
    ]  # fmt: skip
    for label, value, note in rows:
        print(f"{label:40} {value:>20}   {note}")


def cleanup(work: Path, cluster: Any, procs: list[Proc], *, keep: bool) -> None:
    """Stop the agent (it halts its packages), kill whatever of its processes is left,
    remove the directory. Runs on every exit path; Ctrl-C and SIGTERM are ignored
    while it runs."""
    with benchlib.signals_ignored():
        if cluster is not None:
            try:
                cluster.close()
            except Exception as exc:
                print(f"bench: stopping vigild: {exc!r}", file=sys.stderr)
        left = [p for p in procs if p.alive()]
        for p in left:
            print(f"bench: killing leftover process {p.pid}", file=sys.stderr)
            benchlib.kill_quietly(p.pid)
        if benchlib.wait_gone([p.pid for p in left], 5):
            print("bench: WARNING: leftover processes survived SIGKILL", file=sys.stderr)
        if keep:
            print(f"bench: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--packages", type=int, default=100, help="packages to run (100)")
    p.add_argument("--window", type=float, default=60.0, help="measurement window, s (60)")
    p.add_argument("--settle", type=float, default=5.0, help="pause before the window, s (5)")
    p.add_argument(
        "--start-timeout", type=float, default=300.0, help="for all packages to run, s (300)"
    )
    p.add_argument(
        "--containment",
        default="cgroup,process-group",
        help="modes measured one after the other (cgroup,process-group)",
    )
    p.add_argument("--output", type=Path, default=None, help=f"default results/{NAME}.json")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()
    if args.packages < 1 or args.window <= 0 or args.settle < 0:
        p.error("need --packages >= 1, --window > 0, --settle >= 0")
    return benchlib.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
