"""The lab's audits, run after every step. Each returns what is wrong (empty: passed).

- :func:`double_runs` — at most one host runs each package at any moment: no two
  witness incarnations of a package overlap (:func:`vigil.testing.witness.overlaps`),
  with ``MARGIN_NS`` added to every interval's end for the time a dying process
  (or host) takes to stop after its last heartbeat;
- :func:`unavailable` — every ``auto_run`` package with an eligible host is running;
- :func:`disagreement` — ``vigil status --json`` is the same on every live host;
- :func:`wrong_address` — each running package's address answers, from every live
  host, with the host that status says runs it;
- :func:`damaged` — configuration, switching, flags and locks are as the lab set them;
- :class:`LogScan` — no traceback or error pattern appeared in the agents' logs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vigil.testing.witness import assert_no_overlap

MARGIN_NS = 50_000_000  # 5 witness heartbeats
View = dict[str, Any]

# Product bugs the lab found and that are not fixed yet. ``--known NAME`` turns the
# finding into a counted one (reported in the summary) instead of a failed audit;
# the double-run audit has none. See docs/reliability.md.
KNOWN_ISSUES = {
    "stale-address": "a fenced or crashed agent leaves its packages' relocatable addresses "
    "on the host; another host then starts the package with the same address",
    "task-died": "a store error (etcd member gone mid-request) ends an agent task "
    "('agent task reconcile died: StoreUnavailable'); the agent fences and rejoins",
}
KNOWN_LOG_LINES = {"task-died": re.compile(r"agent task \S+ died: StoreUnavailable")}


class WitnessWindow:
    """The witness log read a window at a time: each audit checks the records
    written since the start of the previous step (a whole-log read at every step of
    a long run would cost more and more), :meth:`final` checks the whole log once."""

    def __init__(self, log: Path, scratch: Path) -> None:
        self.log = log
        self.scratch = scratch
        self.marks: list[int] = [0]

    def mark(self) -> None:
        """A step begins: remember where the log ends now."""
        self.marks.append(self.log.stat().st_size if self.log.exists() else 0)
        del self.marks[:-2]

    def check(self) -> list[str]:
        with self.log.open("rb") as f:
            f.seek(self.marks[0])
            self.scratch.write_bytes(f.read())
        return describe_overlaps(self.scratch)

    def final(self) -> list[str]:
        return describe_overlaps(self.log)


def describe_overlaps(log: Path) -> list[str]:
    """The witness checker's own report (overlaps and the log around them), if any."""
    try:
        assert_no_overlap(log, MARGIN_NS)
    except AssertionError as exc:
        return str(exc).splitlines()
    return []


def unavailable(view: View, eligible: set[str]) -> list[str]:
    """``auto_run`` packages not running while one of ``eligible`` hosts is up."""
    out = []
    up = {n for n, rec in view.get("nodes", {}).items() if rec.get("state") == "up"}
    for name, p in sorted(view.get("packages", {}).items()):
        if p.get("auto_run") and p.get("state") != "running" and up & eligible:
            out.append(f"{name} is {p.get('state')} on {p.get('node')}: {p.get('message', '')}")
    return out


def summary(view: View) -> dict[str, Any]:
    """What every host must agree on: node states, package states and hosts, switching."""
    return {
        "nodes": {n: rec.get("state") for n, rec in view.get("nodes", {}).items()},
        "packages": {
            n: (p.get("state"), p.get("node"), p.get("auto_run"), p.get("disabled_nodes"))
            for n, p in view.get("packages", {}).items()
        },
    }


def disagreement(views: dict[str, View | None]) -> list[str]:
    """Hosts whose ``vigil status --json`` failed or differs from the first host's."""
    out = []
    base_host, base = next(iter(views.items()))
    if base is None:
        return [f"vigil status --json failed on {base_host}"]
    want = summary(base)
    for host, view in views.items():
        if view is None:
            out.append(f"vigil status --json failed on {host}")
        elif (got := summary(view)) != want:
            out.append(f"status on {host} differs from {base_host}: {got} != {want}")
    return out


def wrong_address(
    view: View,
    addrs: dict[str, str],
    answers: dict[str, dict[str, str]],
    holders: dict[str, list[str]],
    known: frozenset[str],
    counts: dict[str, int],
) -> list[str]:
    """``answers``: per probing host, URL -> body (``NODE PACKAGE PID``); ``holders``:
    per package, the hosts with its address on eth0. With ``stale-address`` known, a
    wrong answer is counted (not a failure) where another host holds a stale copy of
    the address; the owner must still hold it and answer on it."""
    out = []
    for name, p in sorted(view.get("packages", {}).items()):
        if p.get("state") != "running":
            continue
        url, owner = addrs[name], p.get("node")
        stale = [h for h in holders.get(name, []) if h != owner]
        for prober, got in sorted(answers.items()):
            body = got.get(url, "")
            node = body.split()[0] if body.split() else ""
            if node == owner:
                continue
            if stale and "stale-address" in known and prober != owner:
                counts["stale-address"] = counts.get("stale-address", 0) + 1
                continue
            out.append(
                f"{url} ({name}, running on {owner}) answered {body.strip()!r} from {prober}; "
                f"the address is on eth0 of: {', '.join(holders.get(name, [])) or 'no host'}"
            )
    return out


def damaged(
    view: View, packages: list[str], hosts: list[str], flags: list[str], lock_queue: list[Any]
) -> list[str]:
    """Every lab package configured, switching on, no node switching off, every host
    known with exactly the ``flags`` the lab set on it (a lost flag, a leftover lock
    flag or ``!nofailover``...), and nobody holding or waiting for the admin lock
    (``vigil lock list --json``)."""
    out = []
    pkgs = view.get("packages", {})
    for name in packages:
        p = pkgs.get(name)
        if p is None or not p.get("configured"):
            out.append(f"package {name} lost its configuration")
            continue
        if p.get("disabled_nodes"):
            out.append(f"package {name}: node switching off on {p['disabled_nodes']}")
        if p.get("maintenance"):
            out.append(f"package {name} is in maintenance")
    extra = sorted(set(pkgs) - set(packages))
    if extra:
        out.append(f"packages nobody configured: {extra}")
    nodes = view.get("nodes", {})
    if sorted(nodes) != sorted(hosts):
        out.append(f"nodes {sorted(nodes)} != hosts {sorted(hosts)}")
    for name, rec in sorted(nodes.items()):
        if "flags" in rec and rec["flags"] != flags:
            out.append(f"node {name} has flags {rec['flags']}, not {flags}")
    if lock_queue:
        out.append(f"the admin lock is held or awaited: {lock_queue}")
    if view.get("cluster") != "lab":
        out.append(f"cluster name is {view.get('cluster')!r}")
    return out


ERROR_PATTERNS = re.compile(
    r"Traceback|Task exception was never retrieved|Exception in callback|CRITICAL|"
    r"agent task \S+ died|Unhandled|FATAL|was never awaited"
)


class LogScan:
    """New lines of the agents' logs since the last scan that match ERROR_PATTERNS
    (lines of a known issue are counted in ``counts`` instead)."""

    def __init__(self, logs: list[Path], known: frozenset[str], counts: dict[str, int]) -> None:
        self.offsets = {p: 0 for p in logs}
        self.known = {k: v for k, v in KNOWN_LOG_LINES.items() if k in known}
        self.counts = counts

    def check(self) -> list[str]:
        out = []
        for path, offset in self.offsets.items():
            if not path.exists():
                continue
            with path.open("rb") as f:
                f.seek(offset)
                data = f.read()
            self.offsets[path] = offset + len(data)
            lines = data.decode(errors="replace").splitlines()
            for i, line in enumerate(lines):
                if not ERROR_PATTERNS.search(line):
                    continue
                issue = next((k for k, rx in self.known.items() if rx.search(line)), None)
                if issue is not None:
                    self.counts[issue] = self.counts.get(issue, 0) + 1
                    continue
                out.append(f"{path.name}: {line}")
                out.extend(f"{path.name}:   {more}" for more in lines[i + 1 : i + 15])
                break
        return out
