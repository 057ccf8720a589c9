"""Crash → restarted latency of a supervised service: vigil side by side with supervisord.

Run (from the repository root, with the project's virtual environment)::

    .venv/bin/python bench/restart_latency.py                # 200 crashes per supervisor
    .venv/bin/python bench/restart_latency.py --crashes 30   # a quick check

What it measures
----------------
Both supervisors run the *same* tiny program. As its very first act the program reads
``CLOCK_MONOTONIC`` (one clock for every process on the host) and then sends the
datagram ``"PID T_NS"`` to a unix datagram socket named in its argv, then ``pause()``s.
It is C compiled with ``gcc`` at bench time into a temporary directory, or, without
gcc, a ``python -S`` script (the output says which; a Python program adds its
interpreter start-up, ~10-20 ms, to both sides alike).

For each crash the bench takes ``t0 = time.monotonic_ns()``, sends SIGKILL to the
announced pid, and receives the next announcement (with a deadline, never a bare
sleep): **latency = T_NS - t0**, i.e. the time from the kill to the moment the new
process runs its first instruction of ``main``. That covers: the supervisor noticing
the exit, reaping it, deciding, fork/exec, and the dynamic loader of the new process.

* vigil: a :class:`~vigil.testing.cluster.LocalCluster` (a real ``vigild`` on a real
  SQLite store) in a temporary directory, one package with one service,
  ``restart = "unlimited"``, ``restart_delay = "0s"``; with its default containment
  (a cgroup per service, joined between fork and exec, and ``cgroup.kill`` of what
  the crashed process left before the new one is spawned), shown in the output.
* supervisord (the ``supervisord`` installed from PyPI in the same environment): a
  generated ``supervisord.conf`` in the same temporary directory, no control socket,
  ``autorestart = true``, ``startsecs = 0``, a large ``startretries``, everything else
  at supervisord's defaults.

Crashes alternate between the two (vigil first in even rounds, supervisord first in odd
ones) with a random 20-50 ms pause after each, so both see the same machine conditions.
A few warm-up crashes per side (``--warmup``) are not counted.

Reported: p50 / p95 / p99 / max (nearest-rank percentiles) per supervisor, and the ratio
supervisord ÷ vigil for p50 and p99 (above 1: vigil is faster). At the end the bench
checks that ``vigil status`` (``LocalCluster.view()``) shows the restart count and the
pid of the last announced process. A table, then one JSON line, are printed; the same
figures (plus every sample) are written to ``bench/results/restart_latency.json``.

supervisord restarts take about a second each (see docs/benchmarks.md), so a round
takes ~1.3 s: about 4.5 minutes for 200 crashes.

Everything (agent, supervisord, the program) is stopped and the temporary directory
removed at the end, also on Ctrl-C or an error (``--keep`` keeps the directory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib

NAME = "restart_latency"
PACKAGE = "lat"
SERVICE = "announce"

C_SOURCE = r"""
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>

int main(int argc, char **argv) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* first act: when did this process start? */
    if (argc < 2) return 2;
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    strncpy(addr.sun_path, argv[1], sizeof addr.sun_path - 1);
    char buf[64];
    int n = snprintf(buf, sizeof buf, "%ld %lld", (long)getpid(),
                     (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd >= 0) {
        sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&addr, sizeof addr);
        close(fd);
    }
    for (;;) pause();
}
"""

PY_SOURCE = """\
import time
t = time.monotonic_ns()  # first act (after the interpreter's own start-up)
import os, signal, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"%d %d" % (os.getpid(), t), sys.argv[1])
s.close()
while True:
    signal.pause()
"""


# --------------------------------------------------------------------------- the program


def build_program(work: Path, force_python: bool) -> tuple[list[str], str]:
    """The announcing program's argv prefix (the socket path is appended) and its kind."""
    gcc = None if force_python else shutil.which("gcc") or shutil.which("cc")
    if gcc:
        src = work / "announce.c"
        exe = work / "announce"
        src.write_text(C_SOURCE)
        proc = subprocess.run(
            [gcc, "-O2", "-o", str(exe), str(src)], capture_output=True, text=True, timeout=120
        )
        if proc.returncode == 0:
            return [str(exe)], f"C, compiled with {Path(gcc).name}"
        print(f"bench: {gcc} failed, using Python instead:\n{proc.stderr}", file=sys.stderr)
    script = work / "announce.py"
    script.write_text(PY_SOURCE)
    why = "--python given" if force_python else "gcc not found"
    return [sys.executable, "-S", str(script)], f"Python ({sys.executable} -S; {why})"


@dataclass
class Announcement:
    pid: int
    t_ns: int


@dataclass
class Side:
    """One supervisor under test: its socket, the program's current pid, its samples."""

    name: str
    sock: socket.socket
    pid: int = 0
    samples_ns: list[int] = field(default_factory=list)
    late: int = 0  # announcements after --timeout (counted in the samples all the same)
    missed: int = 0  # no announcement at all within --give-up
    stale: int = 0  # datagrams from an older process, ignored
    dead: bool = False

    def drain(self) -> None:
        """Discard datagrams already queued (there should be none)."""
        self.sock.setblocking(False)
        while True:
            try:
                self.sock.recv(128)
            except BlockingIOError:
                return
            self.stale += 1

    def receive(self, timeout: float, not_pid: int = 0, after_ns: int = 0) -> Announcement | None:
        """The next announcement of a process other than ``not_pid`` that started after
        ``after_ns``, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(128)
            except TimeoutError:
                return None
            pid_s, t_s = data.decode().split()
            a = Announcement(int(pid_s), int(t_s))
            if a.pid == not_pid or a.t_ns < after_ns:
                self.stale += 1
                continue
            return a


def open_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    return s


# --------------------------------------------------------------------------- supervisord


def supervisord_conf(work: Path, argv: list[str]) -> Path:
    def v(x: str | Path) -> str:  # supervisord expands %(name)s in values: escape %
        return str(x).replace("%", "%%")

    command = " ".join(shlex.quote(a) for a in argv)
    conf = work / "supervisord.conf"
    conf.write_text(
        f"""\
; generated by bench/restart_latency.py; no [unix_http_server] / [inet_http_server]:
; nothing to connect to, nothing outside this directory
[supervisord]
nodaemon = true
logfile = {v(work / "supervisord.log")}
pidfile = {v(work / "supervisord.pid")}
childlogdir = {v(work)}

[program:{SERVICE}]
command = {v(command)}
autostart = true
autorestart = true
startsecs = 0
startretries = 1000000
"""
    )
    return conf


def supervisord_bin() -> str:
    local = Path(sys.executable).with_name("supervisord")
    if local.exists():
        return str(local)
    found = shutil.which("supervisord")
    if not found:
        sys.exit("bench: supervisord not found; install it: .venv/bin/pip install supervisor")
    return found


# --------------------------------------------------------------------------- the run


def first_announcement(side: Side, timeout: float, diagnose: Callable[[], str]) -> None:
    a = side.receive(timeout)
    if a is None:
        raise RuntimeError(
            f"{side.name}: the program did not start within {timeout}s\n{diagnose()}"
        )
    side.pid = a.pid


def crash(side: Side, timeout: float, give_up: float, record: bool) -> None:
    """SIGKILL the side's current process and wait for its successor's announcement."""
    side.drain()
    old = side.pid
    t0 = time.monotonic_ns()
    benchlib.kill_quietly(old)
    a = side.receive(timeout, not_pid=old, after_ns=t0)
    if a is None:
        if record:
            side.late += 1
        a = side.receive(give_up - timeout, not_pid=old, after_ns=t0)
    if a is None:
        if record:
            side.missed += 1
        side.dead = True
        print(f"bench: WARNING: {side.name} did not restart pid {old} within {give_up}s")
        return
    side.pid = a.pid
    if record:
        side.samples_ns.append(a.t_ns - t0)


def vigil_status_check(cluster: Any, vigil: Side, expected: int, timeout: float) -> dict[str, Any]:
    """Poll ``view()`` until the restart count and pid are what the bench saw (or time out)."""
    deadline = time.monotonic() + timeout
    svc: dict[str, Any] = {}
    state = None
    while True:
        try:
            pkg = cluster.view()["packages"][PACKAGE]
            state = pkg["state"]
            svc = pkg["services"][SERVICE]
        except (KeyError, TypeError):
            pass
        if svc.get("restarts") == expected and svc.get("pid") == vigil.pid:
            break
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return {
        "state": state,
        "restarts_reported": svc.get("restarts"),
        "restarts_expected": expected,
        "pid_reported": svc.get("pid"),
        "pid_announced": vigil.pid,
    }


def ms(ns: float) -> float:
    return round(ns / 1e6, 3)


def stats_ms(side: Side) -> dict[str, Any]:
    s = benchlib.summary([x / 1e6 for x in side.samples_ns])
    out: dict[str, Any] = {  # no samples: None, not NaN (which is not JSON)
        k: (round(v, 3) if v == v else None) for k, v in s.items() if k != "count"
    }
    out.update(samples=int(s["count"]), late=side.late, missed=side.missed, stale=side.stale)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b is not None and b > 0 else None


def run(args: argparse.Namespace) -> int:
    benchlib.require_vigil()
    from vigil.testing.cluster import LocalCluster

    work = Path(tempfile.mkdtemp(prefix="vigil-bench-lat-"))
    cluster: LocalCluster | None = None
    sv_proc: subprocess.Popen[bytes] | None = None
    socks: list[socket.socket] = []
    warnings: list[str] = []
    try:
        argv, kind = build_program(work, args.python)
        sock_vigil, sock_sv = work / "vigil.sock", work / "supervisord.sock"
        vigil = Side("vigil", open_socket(sock_vigil))
        sv = Side("supervisord", open_socket(sock_sv))
        socks += [vigil.sock, sv.sock]

        # --- vigil: one agent, one package, one service
        cluster = LocalCluster(work / "vigil", ["node1"], name="bench")
        command = ", ".join(json.dumps(a) for a in [*argv, str(sock_vigil)])
        cluster.write_package(
            f"""\
            name = "{PACKAGE}"
            [[service]]
            name = "{SERVICE}"
            command = [{command}]
            restart = "unlimited"
            restart_delay = "0s"
            """
        )
        cluster.apply()
        cluster.start_agents()
        c = cluster
        first_announcement(vigil, 30, lambda: c.agent_log("node1")[-3000:])

        # --- supervisord: the same program
        conf = supervisord_conf(work, [*argv, str(sock_sv)])
        out = (work / "supervisord.out").open("ab")
        sv_proc = subprocess.Popen(
            [supervisord_bin(), "-c", str(conf)],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            cwd=work,
            start_new_session=True,
        )
        out.close()
        first_announcement(sv, 30, lambda: (work / "supervisord.log").read_text()[-3000:])

        host_before = benchlib.host_info()
        print(
            f"restart latency: {args.crashes} crashes per supervisor "
            f"(+{args.warmup} warm-up), program: {kind}",
            flush=True,
        )
        rounds = [(False, i) for i in range(args.warmup)] + [(True, i) for i in range(args.crashes)]
        started = time.monotonic()
        for record, i in rounds:
            order = (vigil, sv) if i % 2 == 0 else (sv, vigil)
            for side in order:
                if side.dead:
                    continue
                crash(side, args.timeout, args.give_up, record)
                time.sleep(random.uniform(0.02, 0.05))  # a short pause, not a wait
            if vigil.dead and sv.dead:
                break
        elapsed = time.monotonic() - started

        kills_vigil = args.warmup + args.crashes
        check = vigil_status_check(cluster, vigil, kills_vigil, timeout=10)
        if check["restarts_reported"] != kills_vigil:
            warnings.append(
                f"vigil reports {check['restarts_reported']} restarts, the bench killed the "
                f"service {kills_vigil} times ({args.warmup} warm-up + {args.crashes})"
            )
        if check["pid_reported"] != vigil.pid:
            warnings.append(
                f"vigil reports service pid {check['pid_reported']}, the running program "
                f"announced pid {vigil.pid}"
            )
        if check["state"] != "running":
            warnings.append(f"vigil package state is {check['state']}, expected running")
        for side in (vigil, sv):
            if side.late:
                warnings.append(f"{side.name}: {side.late} restart(s) took over {args.timeout}s")
            if side.missed:
                warnings.append(f"{side.name}: {side.missed} crash(es) never restarted")
            if side.stale:
                warnings.append(f"{side.name}: {side.stale} stale announcement(s) ignored")

        v, s = stats_ms(vigil), stats_ms(sv)
        containment = cluster.view()["nodes"]["node1"].get("containment")
        result: dict[str, Any] = {
            "benchmark": NAME,
            "time": benchlib.utc_now(),
            "crashes": args.crashes,
            "warmup": args.warmup,
            "program": kind,
            "unit": "ms",
            "vigil": {**v, **check, "containment": containment},
            "supervisord": {**s, "version": benchlib.package_version("supervisor")},
            "ratio_supervisord_over_vigil": {
                "p50": ratio(s["p50"], v["p50"]),
                "p99": ratio(s["p99"], v["p99"]),
            },
            "elapsed_s": round(elapsed, 1),
            "vigil_version": benchlib.package_version("vigil"),
            "host": {**host_before, "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
            "warnings": warnings,
        }
        print_table(result)
        for w in warnings:
            print(f"WARNING: {w}")
        path = benchlib.write_results(
            NAME,
            {
                **result,
                "samples_ms": {
                    "vigil": [ms(x) for x in vigil.samples_ns],
                    "supervisord": [ms(x) for x in sv.samples_ns],
                },
            },
            args.output,
        )
        print(f"written to {path}")
        print(benchlib.json_line(result))
        return 1 if vigil.dead or sv.dead else 0
    finally:
        cleanup(work, cluster, sv_proc, socks, keep=args.keep)


def print_table(r: dict[str, Any]) -> None:
    cols = ("p50", "p95", "p99", "max", "mean", "min")
    print(f"{'':14}" + "".join(f"{c:>13}" for c in cols) + f"{'samples':>9}{'missed':>8}")
    for name in ("vigil", "supervisord"):
        row = r[name]
        print(
            f"{name:14}"
            + "".join(f"{row[c]:>10.2f} ms" if row[c] is not None else f"{'-':>13}" for c in cols)
            + f"{row['samples']:>9}{row['missed']:>8}"
        )
    rt = r["ratio_supervisord_over_vigil"]

    def fmt(x: float | None) -> str:
        return f"{x:>12.1f}x" if x is not None else f"{'n/a':>13}"

    print(f"{'sv / vigil':14}{fmt(rt['p50'])}{'':13}{fmt(rt['p99'])}")
    print(
        f"vigil restart count: {r['vigil']['restarts_reported']} reported, "
        f"{r['vigil']['restarts_expected']} expected; state {r['vigil']['state']}; "
        f"containment {r['vigil']['containment']}"
    )


def cleanup(
    work: Path,
    cluster: Any,
    sv_proc: subprocess.Popen[bytes] | None,
    socks: list[socket.socket],
    *,
    keep: bool,
) -> None:
    """Stop the agent and supervisord, kill any program left, remove the directory.
    Runs on every exit path; Ctrl-C and SIGTERM are ignored while it runs."""
    with benchlib.signals_ignored():
        if cluster is not None:
            try:
                cluster.close()  # SIGTERM: vigild halts the package, then exits
            except Exception as exc:
                print(f"bench: stopping vigild: {exc!r}", file=sys.stderr)
        if sv_proc is not None and sv_proc.poll() is None:
            sv_proc.send_signal(signal.SIGTERM)  # supervisord stops its program, then exits
            try:
                sv_proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(sv_proc.pid, signal.SIGKILL)
                sv_proc.wait()
        # whatever still runs our program (it is the only thing with args under `work`)
        left = benchlib.pids_with_arg_under(str(work))
        for pid in left:
            print(f"bench: killing leftover process {pid}", file=sys.stderr)
            benchlib.kill_quietly(pid)
        if benchlib.wait_gone(left, 5):
            print("bench: WARNING: leftover processes survived SIGKILL", file=sys.stderr)
        for s in socks:
            s.close()
        if keep:
            print(f"bench: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--crashes", type=int, default=200, help="crashes per supervisor (200)")
    p.add_argument("--warmup", type=int, default=3, help="uncounted crashes first (3)")
    p.add_argument(
        "--timeout", type=float, default=5.0, help="a restart slower than this is late (5 s)"
    )
    p.add_argument(
        "--give-up", type=float, default=30.0, help="a restart slower than this is missed (30 s)"
    )
    p.add_argument(
        "--python", action="store_true", help="use the Python program even if gcc is there"
    )
    p.add_argument("--output", type=Path, default=None, help=f"default results/{NAME}.json")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()
    if args.crashes < 1 or args.warmup < 0 or args.give_up < args.timeout:
        p.error("need --crashes >= 1, --warmup >= 0, --give-up >= --timeout")
    return benchlib.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
