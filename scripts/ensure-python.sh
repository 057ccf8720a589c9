#!/bin/sh
# Make sure the interpreter can create virtual environments (Debian and Ubuntu
# ship venv as a separate package). Installs python3-venv when run as root.
set -eu
PY=${1:-python3}
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "ensure-python: $PY not found; install Python 3.11+ (apt-get install python3 python3-venv)" >&2
    exit 1
fi
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
    echo "ensure-python: $PY is older than 3.11; vigil needs Python 3.11+" >&2; exit 1; }
if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    ver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq "python${ver}-venv" || apt-get install -y -qq python3-venv
    else
        echo "ensure-python: python venv support missing; run: sudo apt-get install python3-venv" >&2
        exit 1
    fi
fi
