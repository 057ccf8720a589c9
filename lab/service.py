"""The lab's package service: the witness, answering on the package's address.

::

    python -m lab.service LOG PACKAGE PORT CTL_DIR

It is :mod:`vigil.testing.witness` (start/alive/stop records with host, package and
``time.monotonic_ns()`` in ``LOG``, outside the namespaces), plus

- an HTTP answer ``HOST PACKAGE PID`` on ``0.0.0.0:PORT`` of its host, so a client on
  another host sees which host serves the package's relocatable address;
- the crash-loop fault: while ``CTL_DIR/PACKAGE.crash`` exists it exits 1 at once
  (and a running one exits within one heartbeat);
- a detached daemon (fork, setsid, fork: ``witness --detached``) that writes
  heartbeats of the same incarnation: it leaves the service's process group, so
  only the package's cgroup can stop it, and the no-overlap audit sees it if
  anything lets it outlive its package.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from vigil.testing import witness


def _crash_watch(flag: Path) -> None:
    while not flag.exists():
        time.sleep(witness.HEARTBEAT)
    os._exit(1)


def main(argv: list[str]) -> int:
    log, package, port, ctl = argv
    flag = Path(ctl) / f"{package}.crash"
    if flag.exists():
        return 1
    node = os.environ.get("VIGIL_NODE", "?")
    answer = f"{node} {package} {os.getpid()}\n".encode()
    threading.Thread(
        target=witness.serve_http, args=(int(port), answer, "0.0.0.0"), daemon=True
    ).start()
    threading.Thread(target=_crash_watch, args=(flag,), daemon=True).start()
    return witness.main([log, package, "--detached"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
