"""The lab's package service: the witness, answering on the package's address.

::

    python -m lab.service LOG PACKAGE PORT CTL_DIR

It is :mod:`vigil.testing.witness` (start/alive/stop records with host, package and
``time.monotonic_ns()`` in ``LOG``, outside the namespaces), plus

- an HTTP answer ``HOST PACKAGE PID`` on ``0.0.0.0:PORT`` of its host, so a client on
  another host sees which host serves the package's relocatable address;
- the crash-loop fault: while ``CTL_DIR/PACKAGE.crash`` exists it exits 1 at once
  (and a running one exits within one heartbeat).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from vigil.testing import witness


def _serve(port: int, answer: bytes) -> None:
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
            server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
            break
        except OSError:
            time.sleep(witness.HEARTBEAT)  # the port of a killed predecessor
    server.daemon_threads = True
    server.serve_forever(poll_interval=0.05)


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
    threading.Thread(target=_serve, args=(int(port), answer), daemon=True).start()
    threading.Thread(target=_crash_watch, args=(flag,), daemon=True).start()
    return witness.main([log, package])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
