#!/bin/sh
# System packages the test suite and the fault lab use: iproute2 (relocatable
# addresses, network namespaces), nftables, iputils-arping, procps,
# util-linux (unshare, for nodes as PID namespaces) and Debian's etcd-server (real
# etcd for the etcd store and failover tests). Installed when run as root on
# Debian/Ubuntu; otherwise the tests that need a missing one are skipped with a reason.
set -eu
need=""
command -v ip >/dev/null 2>&1 || need="$need iproute2"
command -v ps >/dev/null 2>&1 || need="$need procps"
command -v unshare >/dev/null 2>&1 || need="$need util-linux"
# the fault lab (lab/): nft for packet loss where the kernel has no netem, arping
# for the gratuitous ARP vigil sends when it moves an address
command -v nft >/dev/null 2>&1 || need="$need nftables"
command -v arping >/dev/null 2>&1 || need="$need iputils-arping"
if ! command -v etcd >/dev/null 2>&1 && [ ! -x /usr/bin/etcd ] && [ -z "${VIGIL_ETCD:-}" ]; then
    need="$need etcd-server"
fi
[ -n "$need" ] || exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-system: missing$need; install them (apt-get install$need) or the tests that need them are skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq $need
# Debian starts an etcd service on 127.0.0.1:2379 at install where init allows it;
# the tests start their own etcd members on free ports, so stop that one.
case "$need" in *etcd-server*)
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now etcd >/dev/null 2>&1 || true; fi
    pkill -x etcd >/dev/null 2>&1 || true ;;
esac
