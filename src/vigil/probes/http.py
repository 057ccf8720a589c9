"""``python -m vigil.probes.http URL [--timeout S]``: exit 0 if URL answers 2xx/3xx, else 1."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m vigil.probes.http URL [TIMEOUT]", file=sys.stderr)
        return 2
    url = argv[0]
    timeout = float(argv[1]) if len(argv) > 1 else 2.0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 0 if 200 <= resp.status < 400 else 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"probe {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
