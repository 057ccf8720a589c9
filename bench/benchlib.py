"""Helpers shared by the benchmark scripts in this directory (standard library only).

The scripts run as ``python bench/NAME.py``, so this directory is on ``sys.path`` and
``import benchlib`` finds this file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation): an observed value, never a blend."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary(values: Sequence[float]) -> dict[str, float | int]:
    """count, min, mean, p50, p95, p99 and max of ``values`` (NaN when empty)."""
    n = len(values)
    return {
        "count": n,
        "min": min(values) if n else math.nan,
        "mean": sum(values) / n if n else math.nan,
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if n else math.nan,
    }


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat the benchmarks use (times in clock ticks)."""

    pid: int
    comm: str
    state: str
    ppid: int
    utime: int
    stime: int
    cutime: int
    cstime: int
    starttime: int


def read_stat(pid: int) -> ProcStat | None:
    """/proc/PID/stat, or None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm is in parentheses and may contain spaces or parentheses: split on the last ")"
    head, _, rest = raw.rpartition(")")
    comm = head.split("(", 1)[1]
    f = rest.split()
    # f[0] is field 3 (state); field N is f[N - 3]
    return ProcStat(
        pid=pid,
        comm=comm,
        state=f[0],
        ppid=int(f[1]),
        utime=int(f[11]),
        stime=int(f[12]),
        cutime=int(f[13]),
        cstime=int(f[14]),
        starttime=int(f[19]),
    )


def read_status_kb(pid: int, *fields: str) -> dict[str, int]:
    """Selected ``kB`` fields of /proc/PID/status (e.g. VmRSS, VmHWM); missing ones are left out."""
    out: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in fields:
                out[key] = int(value.split()[0])
    return out


def read_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def all_pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def pids_with_arg_under(prefix: str) -> list[int]:
    """Live processes (not zombies) with a command-line argument starting with ``prefix``."""
    found = []
    for pid in all_pids():
        if pid == os.getpid():
            continue
        if any(a.startswith(prefix) for a in read_cmdline(pid)):
            st = read_stat(pid)
            if st is not None and st.state != "Z":
                found.append(pid)
    return found


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Poll until none of ``pids`` is alive (zombies count as gone); return the survivors."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if (st := read_stat(p)) is not None and st.state != "Z"]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.01)


# --------------------------------------------------------------------------- the run


def host_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def write_results(name: str, data: dict[str, Any], path: Path | None = None) -> Path:
    """Write ``data`` to ``bench/results/NAME.json`` (atomically: tmp file + rename)."""
    target = path or RESULTS_DIR / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(target)
    return target


def json_line(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=False)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Interrupted(Exception):
    """SIGTERM or SIGHUP arrived: unwind through the ``finally`` blocks and clean up."""


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def raise_on_termination() -> None:
    """Turn SIGTERM / SIGHUP into :class:`Interrupted` and SIGINT into KeyboardInterrupt
    (even when SIGINT was inherited as ignored, as for ``cmd &`` in a script)."""

    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Ignore SIGINT / SIGTERM / SIGHUP inside the block (clean-up must run to its end)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def require_vigil() -> None:
    try:
        import vigil.testing.cluster  # noqa: F401
    except ImportError:
        sys.exit(
            "bench: cannot import vigil; run with the project's virtual environment: "
            ".venv/bin/python bench/NAME.py (or `make bench`)"
        )


def run_main(run: Callable[[Any], int], args: Any) -> int:
    """Run a benchmark's ``run(args)``; Ctrl-C or SIGTERM end it with 130 after its
    own cleanup ran."""
    raise_on_termination()
    try:
        return run(args)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"bench: interrupted ({type(exc).__name__} {exc}), cleaned up", file=sys.stderr)
        return 130
