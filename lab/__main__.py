"""``python -m lab --seed N --steps N [--hosts N] [--broken nofence|nocontain] [--root DIR]``

The fault lab (see docs/reliability.md). Needs root, iproute2, nftables,
util-linux and etcd. Exit status: 0 all audits passed, 1 an audit failed,
2 the lab could not be built. ``--cleanup`` removes what crashed runs left
(namespaces ``vgl<PID>-*`` of labs no longer running, and their processes) and exits;
every run does that first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from lab.audit import KNOWN_ISSUES
from lab.cluster import LabCluster
from lab.net import cleanup_dead, list_netns
from lab.run import BROKEN, Run, broken_check, write_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hosts", type=int, default=4, choices=range(3, 6))
    parser.add_argument("--broken", default="", choices=["", *BROKEN])
    parser.add_argument(
        "--known",
        default="",
        help="known product bugs to count instead of failing on, comma-separated: "
        + ", ".join(KNOWN_ISSUES),
    )
    parser.add_argument("--root", type=Path, default=None, help="keep everything here")
    parser.add_argument("--cleanup", action="store_true")
    parser.add_argument(
        "--broken-check",
        action="store_true",
        help="run a broken build (--broken, default nofence: no self-fencing; nocontain: "
        "no cgroups) one step; exit 0 if the lab caught it",
    )
    args = parser.parse_args(argv)
    if args.cleanup:
        removed = cleanup_dead("vgl")
        print(f"removed {len(removed)} namespace(s): {' '.join(removed)}")
        return 0
    known = frozenset(k for k in args.known.split(",") if k)
    if known - set(KNOWN_ISSUES):
        parser.error(f"--known: no such issue {sorted(known - set(KNOWN_ISSUES))}")
    if os.geteuid() != 0:
        print("the lab needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.broken_check:
        return _broken_check(args.root, args.broken or "nofence")
    cleanup_dead("vgl")
    root = args.root or Path(tempfile.mkdtemp(prefix=f"vigil-lab-{args.seed}-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"lab: seed {args.seed}, {args.steps} steps, {args.hosts} hosts, root {root}")

    def say(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    try:
        with LabCluster(root, hosts=args.hosts, broken=args.broken) as lab:
            prefix = lab.net.prefix
            result = Run(lab, args.seed, args.steps, say, known).run()
    except KeyboardInterrupt:
        print("lab: interrupted; everything it made was removed", file=sys.stderr)
        return 130
    left = list_netns(prefix + "-")
    if left:
        print(f"lab: namespaces left behind: {left}", file=sys.stderr)
        return 1
    write_summary(root, result)
    print({k: v for k, v in result.as_json().items() if k != "failure"})
    if result.failure:
        print(result.failure, file=sys.stderr)
        return 1
    print(f"lab: seed {args.seed}: {result.done} steps, all audits passed")
    if args.root is None and not result.failure:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _broken_check(root: Path | None, kind: str) -> int:
    root = root or Path(tempfile.mkdtemp(prefix="vigil-lab-broken-"))
    print(f"lab: broken build {kind} ({BROKEN[kind]}), root {root}")
    result = broken_check(root, kind, lambda line: print(f"{time.strftime('%H:%M:%S')} {line}"))
    left = list_netns(f"vgl{os.getpid()}-")
    if left:
        print(f"lab: namespaces left behind: {left}")
        return 1
    print("lab: nothing left behind")
    if "AUDIT FAILED: double run" in result.failure:
        print(result.failure.split("--- last lines")[0])
        print("lab: the broken build was caught (double run): as it must be")
        return 0
    print(f"lab: the broken build was NOT caught: {result.failure or 'every audit passed'}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
