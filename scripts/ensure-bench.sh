#!/bin/sh
# System packages the benchmarks need beyond the test suite's (scripts/ensure-system.sh):
# keepalived (bench/keepalived_compare.py runs Debian's keepalived beside vigil) and
# arping (iputils-arping: vigil sends a gratuitous ARP with it when it adds a relocatable
# address; without it a client keeps the old host's MAC). Installed when run as root on
# Debian/Ubuntu; otherwise the benchmark that needs a missing one says so and stops.
set -eu
need=""
command -v keepalived >/dev/null 2>&1 || [ -x /usr/sbin/keepalived ] || need="$need keepalived"
command -v arping >/dev/null 2>&1 || need="$need iputils-arping"
[ -n "$need" ] || exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-bench: missing$need; install them (apt-get install$need)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq $need
# Debian enables a keepalived service at install where init allows it; the benchmark
# runs its own keepalived processes inside the lab's namespaces, so stop that one.
case "$need" in *keepalived*)
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now keepalived >/dev/null 2>&1 || true; fi ;;
esac
