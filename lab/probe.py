"""``python -m lab.probe TIMEOUT URL...``: GET each URL, print ``{URL: body}`` as JSON
("" for no answer). The lab runs it inside a host, the only place the hosts' addresses
are reachable from."""

from __future__ import annotations

import json
import sys
import urllib.request


def fetch(url: str, timeout: float) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            body: bytes = reply.read()
            return body.decode(errors="replace")
    except (OSError, ValueError):
        return ""


def main(argv: list[str]) -> int:
    timeout = float(argv[0])
    print(json.dumps({url: fetch(url, timeout) for url in argv[1:]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
