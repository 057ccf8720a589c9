"""A witness service and its checker: did a package ever run on two nodes at once?

The witness is a tiny service program, run as a package's service::

    python -m vigil.testing.witness LOG PACKAGE [--http PORT]

It appends records to ``LOG``, a file outside the nodes' PID namespaces (they share
the file system), one whole line per ``os.write`` on a descriptor opened with
``O_APPEND`` (so concurrent writers never interleave inside a line)::

    start NODE PACKAGE T PID      when it starts
    alive NODE PACKAGE T PID      every 10 ms while it runs
    stop NODE PACKAGE T PID       on SIGTERM, just before it exits

``T`` is ``time.monotonic_ns()``: ``CLOCK_MONOTONIC`` is one clock for every process
of the host, whatever PID namespace it is in. ``NODE`` comes from ``VIGIL_NODE`` (vigil
sets it for every service); ``PID`` is the witness's own (namespace-local) PID, which
tells two incarnations on one node apart.

With ``--http PORT`` it also answers every HTTP GET on 127.0.0.1:PORT with
``NODE PACKAGE PID``: the port moves with the package (the nodes share the host's
network), so a client sees which node serves it.

The checker reads the log back: :func:`intervals` gives, per package, each
incarnation as ``(node, first_t, last_t)``; :func:`assert_no_overlap` fails with a
readable excerpt of the log when two incarnations of one package overlap in time.
A SIGKILLed witness stops writing at most one heartbeat period before it died, so
an interval can end up to ``HEARTBEAT`` earlier than the process really did; the
check accepts a ``margin_ns`` for that when it matters.

Only the standard library is imported at the top: the witness starts fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

HEARTBEAT = 0.010  # seconds between "alive" records
KINDS = ("start", "alive", "stop")

__all__ = [
    "HEARTBEAT",
    "Incarnation",
    "Record",
    "assert_no_overlap",
    "incarnations",
    "intervals",
    "overlaps",
    "read_records",
    "service_toml",
]


# --------------------------------------------------------------------------- records


class Record(NamedTuple):
    kind: str  # start | alive | stop
    node: str
    package: str
    t: int  # time.monotonic_ns()
    pid: int  # the witness's PID as its node sees it (0 if the line has none)
    line: int  # 1-based line number in the log


@dataclass(frozen=True)
class Incarnation:
    """One witness process: where it ran and from when to when (monotonic ns)."""

    package: str
    node: str
    pid: int
    first: int
    last: int
    stopped: bool  # it wrote "stop" (ended by SIGTERM, not killed)
    first_line: int
    last_line: int

    def as_tuple(self) -> tuple[str, int, int]:
        return (self.node, self.first, self.last)


def read_records(log: str | Path) -> list[Record]:
    """Every well-formed record of ``log`` in file order (a missing file has none)."""
    try:
        text = Path(log).read_text(errors="replace")
    except FileNotFoundError:
        return []
    out: list[Record] = []
    for n, raw in enumerate(text.splitlines(), 1):
        parts = raw.split()
        if len(parts) not in (4, 5) or parts[0] not in KINDS:
            continue
        try:
            t = int(parts[3])
            pid = int(parts[4]) if len(parts) == 5 else 0
        except ValueError:
            continue
        out.append(Record(parts[0], parts[1], parts[2], t, pid, n))
    return out


def incarnations(log: str | Path) -> dict[str, list[Incarnation]]:
    """Per package, every witness process that wrote to ``log``, by start time.

    An incarnation is named by (node, pid) and begins at a ``start`` record: a later
    ``start`` with the same node and pid (a PID reused in a new namespace) begins a
    new one. Records before any ``start`` of their (node, pid) begin one too.
    """
    # (package, node, pid) -> (first, last, first_line, last_line, stopped)
    state: dict[tuple[str, str, int], tuple[int, int, int, int, bool]] = {}
    done: list[Incarnation] = []

    def close(key: tuple[str, str, int]) -> None:
        first, last, fl, ll, stopped = state.pop(key)
        done.append(Incarnation(key[0], key[1], key[2], first, last, stopped, fl, ll))

    for r in read_records(log):
        key = (r.package, r.node, r.pid)
        if r.kind == "start" and key in state:
            close(key)
        if key not in state:
            state[key] = (r.t, r.t, r.line, r.line, r.kind == "stop")
            continue
        first, last, fl, _, stopped = state[key]
        state[key] = (first, max(last, r.t), fl, r.line, stopped or r.kind == "stop")
    for key in list(state):
        close(key)
    out: dict[str, list[Incarnation]] = {}
    for inc in sorted(done, key=lambda i: (i.first, i.node)):
        out.setdefault(inc.package, []).append(inc)
    return out


def intervals(log: str | Path) -> dict[str, list[tuple[str, int, int]]]:
    """Per package: ``(node, first_t, last_t)`` of every incarnation, by start time."""
    return {pkg: [i.as_tuple() for i in incs] for pkg, incs in incarnations(log).items()}


def overlaps(log: str | Path, margin_ns: int = 0) -> list[tuple[Incarnation, Incarnation]]:
    """Pairs of incarnations of one package that ran at the same time: ``b`` started
    before ``a``'s last record + ``margin_ns``."""
    found: list[tuple[Incarnation, Incarnation]] = []
    for incs in incarnations(log).values():
        for i, a in enumerate(incs):
            for b in incs[i + 1 :]:
                if b.first <= a.last + margin_ns and a.first <= b.last:
                    found.append((a, b))
    return found


def assert_no_overlap(log: str | Path, margin_ns: int = 0) -> None:
    """AssertionError, with the records around it, if a package ever ran twice at once."""
    found = overlaps(log, margin_ns)
    if not found:
        return
    records = read_records(log)
    t0 = min(r.t for r in records)
    parts = [f"{len(found)} overlap(s) in {log}:"]
    for a, b in found[:3]:
        parts.append(
            f"package {a.package}: {a.node} pid {a.pid} ran "
            f"{_ms(a.first, t0)}..{_ms(a.last, t0)} and {b.node} pid {b.pid} ran "
            f"{_ms(b.first, t0)}..{_ms(b.last, t0)} (overlap "
            f"{(min(a.last, b.last) - b.first) / 1e6:.1f} ms)"
        )
        parts.extend(_excerpt(records, a, b, t0))
    raise AssertionError("\n".join(parts))


def _ms(t: int, t0: int) -> str:
    return f"{(t - t0) / 1e6:.1f}ms"


def _excerpt(records: Iterable[Record], a: Incarnation, b: Incarnation, t0: int) -> list[str]:
    """The records of the package around the overlap, heartbeats of one incarnation
    in a row folded into one line."""
    lo, hi = b.first - 50_000_000, min(a.last, b.last) + 50_000_000
    lines: list[str] = []
    last_key: tuple[str, str, int] | None = None
    folded = 0
    for r in records:
        if r.package != a.package or not lo <= r.t <= hi:
            continue
        key = (r.kind, r.node, r.pid)
        if r.kind == "alive" and key == last_key:
            folded += 1
            continue
        if folded:
            lines.append(f"      ... {folded} more alive")
            folded = 0
        lines.append(f"  {r.line:6d}: {_ms(r.t, t0):>10} {r.kind} {r.node} pid {r.pid}")
        last_key = key
    if folded:
        lines.append(f"      ... {folded} more alive")
    return lines[:40]


def service_toml(
    log: str | Path,
    package: str,
    *,
    name: str = "witness",
    port: int | None = None,
    extra: str = "",
    detached: bool = False,
) -> str:
    """A ``[[service]]`` section running the witness for ``package`` (``detached``:
    with a daemon of its own that leaves its process group)."""
    argv = [sys.executable, "-m", "vigil.testing.witness", str(log), package]
    if port is not None:
        argv += ["--http", str(port)]
    if detached:
        argv.append("--detached")
    command = ", ".join(f'"{a}"' for a in argv)
    return f'[[service]]\nname = "{name}"\ncommand = [{command}]\n{extra}'


# --------------------------------------------------------------------------- the program


def serve_http(port: int, answer: bytes, host: str = "127.0.0.1") -> None:
    """Answer every GET on HOST:PORT with ``answer``; retry binding while the port is
    taken (by a killed predecessor)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            pass

    while True:
        try:
            server = ThreadingHTTPServer((host, port), Handler)
            break
        except OSError:
            time.sleep(HEARTBEAT)
    server.daemon_threads = True
    server.serve_forever(poll_interval=0.05)


def _daemonize() -> bool:
    """Fork a classic daemon (fork, setsid, fork). True in the daemon, False in the
    original process."""
    first = os.fork()
    if first > 0:
        os.waitpid(first, 0)
        return False
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vigil.testing.witness")
    parser.add_argument("log")
    parser.add_argument("package")
    parser.add_argument("--http", type=int, default=None, metavar="PORT")
    parser.add_argument("--interval", type=float, default=HEARTBEAT)
    parser.add_argument(
        "--detached",
        action="store_true",
        help="also fork a daemon (fork, setsid, fork) that writes heartbeats of the "
        "same incarnation: a process that leaves the service's process group",
    )
    args = parser.parse_args(argv)
    node = os.environ.get("VIGIL_NODE", "?")
    pid = os.getpid()
    fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(kind: str) -> None:
        os.write(fd, f"{kind} {node} {args.package} {time.monotonic_ns()} {pid}\n".encode())

    record("start")
    if args.detached and _daemonize():
        # The daemon writes heartbeats of the same incarnation (the main process's
        # PID): while it lives, that incarnation is running, wherever its main is.
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        while True:
            record("alive")
            time.sleep(args.interval)

    def on_term(_sig: int, _frame: object) -> None:
        record("stop")
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    if args.http is not None:
        answer = f"{node} {args.package} {pid}\n".encode()
        threading.Thread(target=serve_http, args=(args.http, answer), daemon=True).start()
    while True:
        record("alive")
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
