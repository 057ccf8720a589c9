"""``python -m lab.report ROOT OUT.LOG``: what each fault did, as a Markdown table.

``OUT.LOG`` is what ``python -m lab`` printed (its ``HH:MM:SS step N/M: KIND ...``
lines give each step's start); ``ROOT/logs/h*.log`` are the agents' logs. Every
agent log line between the start of a step and the start of the next one is
counted for that step's fault, by what it says (:data:`EVENTS`).
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

EVENTS = {
    "self-fence": re.compile(r"FENCING node"),
    "failover start ordered": re.compile(r"controller: start \S+ on \S+: failover"),
    "service restart": re.compile(r"restarting in"),
    "service failed for good": re.compile(r"failed for good"),
    "start script timed out": re.compile(r"start timed out"),
    "address already assigned": re.compile(r"Address already assigned"),
    "lease renewal retried": re.compile(r"lease renewal failed"),
    "agent task died": re.compile(r"agent task \S+ died"),
}
_STEP = re.compile(r"^(\d\d:\d\d:\d\d) step (\d+)/\d+: (\S+)")
_OK = re.compile(r"^(\d\d:\d\d:\d\d)\s+ok: .* ([\d.]+)s after the heal")
_LINE = re.compile(r"^\d{4}-\d\d-\d\d (\d\d:\d\d:\d\d),\d+ ")


def _secs(hms: str) -> int:
    h, m, s = (int(x) for x in hms.split(":"))
    return h * 3600 + m * 60 + s


def report(root: Path, out_log: Path) -> str:
    starts: list[tuple[int, str]] = []
    settle: dict[str, list[float]] = collections.defaultdict(list)
    for line in out_log.read_text(errors="replace").splitlines():
        if m := _STEP.match(line):
            starts.append((_secs(m.group(1)), m.group(3)))
        elif (m := _OK.match(line)) and starts:
            settle[starts[-1][1]].append(float(m.group(2)))
    steps = collections.Counter(kind for _, kind in starts)
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for log in sorted((root / "logs").glob("h*.log")):
        for line in log.read_text(errors="replace").splitlines():
            m = _LINE.match(line)
            if not m:
                continue
            t = _secs(m.group(1))
            kind = next((k for s, k in reversed(starts) if s <= t), None)
            if kind is None:
                continue
            for event, rx in EVENTS.items():
                if rx.search(line):
                    counts[kind][event] += 1
    head = ["fault", "steps", "settled after heal (mean / max s)", *EVENTS]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind in sorted(steps):
        s = settle.get(kind, [])
        took = f"{sum(s) / len(s):.1f} / {max(s):.1f}" if s else "-"
        cells = [kind, str(steps[kind]), took, *(str(counts[kind][e]) for e in EVENTS)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    print(report(Path(argv[0]), Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
