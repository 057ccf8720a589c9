"""Where everything lives in the store. One cluster = one key prefix.

/vigil/CLUSTER/config/cluster        ClusterSpec (JSON), as applied
/vigil/CLUSTER/config/packages/PKG   PackageSpec (JSON), as applied
/vigil/CLUSTER/nodes/NODE            NodeRecord, bound to the node's lease (present = up)
/vigil/CLUSTER/members/NODE          MemberRecord: the node joined once (no lease: kept while down)
/vigil/CLUSTER/heartbeat/NODE        HeartbeatRecord, rewritten every renewal (etcd only; agent/reaper.py)
/vigil/CLUSTER/owner/PKG             name of the node running PKG, bound to its lease: the truth
/vigil/CLUSTER/status/PKG            PackageStatus, written by the node acting on PKG
/vigil/CLUSTER/admin/PKG             AdminRecord: switching and operator requests
/vigil/CLUSTER/events/TIME.NODE      Event, one per state change (trimmed to the newest ones)
/vigil/CLUSTER/flags/NODE/FLAG       FlagRecord: a flag living on NODE (CONCEPTS §5)
/vigil/CLUSTER/locks/admin/ID        LockEntry: the holder (oldest) or a waiter of the admin lock
/vigil/CLUSTER/cmdsync/DESCRIPTOR    CmdsyncEntry: a registered resumable script (CONCEPTS §7)
/vigil/CLUSTER/waits/PKG             WaitEdge: PKG's script waits for another package (§8)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    cluster: str

    @property
    def root(self) -> str:
        return f"/vigil/{self.cluster}/"

    @property
    def config_cluster(self) -> str:
        return self.root + "config/cluster"

    @property
    def config_bundles(self) -> str:
        return self.root + "config/bundle/"

    def config_bundle(self, index: int) -> str:
        return f"{self.config_bundles}{index:05d}"

    @property
    def nodes(self) -> str:
        return self.root + "nodes/"

    def node(self, name: str) -> str:
        return self.nodes + name

    @property
    def heartbeats(self) -> str:
        return self.root + "heartbeat/"

    def heartbeat(self, name: str) -> str:
        return self.heartbeats + name

    @property
    def members(self) -> str:
        return self.root + "members/"

    def member(self, name: str) -> str:
        return self.members + name

    @property
    def owners(self) -> str:
        return self.root + "owner/"

    def owner(self, pkg: str) -> str:
        return self.owners + pkg

    @property
    def statuses(self) -> str:
        return self.root + "status/"

    def status(self, pkg: str) -> str:
        return self.statuses + pkg

    @property
    def admins(self) -> str:
        return self.root + "admin/"

    def admin(self, pkg: str) -> str:
        return self.admins + pkg

    @property
    def events(self) -> str:
        return self.root + "events/"

    def event(self, time_ns: int, node: str) -> str:
        return f"{self.events}{time_ns:020d}.{node}"

    @property
    def controller(self) -> str:
        return self.root + "controller"

    @property
    def assignments(self) -> str:
        return self.root + "assign/"

    def assignment(self, pkg: str) -> str:
        return self.assignments + pkg

    @property
    def node_admins(self) -> str:
        return self.root + "nodeadmin/"

    def node_admin(self, node: str) -> str:
        return self.node_admins + node

    @property
    def flags(self) -> str:
        return self.root + "flags/"

    def node_flags(self, node: str) -> str:
        return f"{self.flags}{node}/"

    def flag(self, node: str, flag: str) -> str:
        return f"{self.flags}{node}/{flag}"

    @property
    def admin_lock(self) -> str:
        return self.root + "locks/admin/"

    @property
    def cmdsyncs(self) -> str:
        return self.root + "cmdsync/"

    def cmdsync(self, descriptor: str) -> str:
        return self.cmdsyncs + descriptor

    @property
    def waits(self) -> str:
        return self.root + "waits/"

    def wait(self, pkg: str) -> str:
        return self.waits + pkg

    def leaf(self, key: str) -> str:
        """The last path element of ``key`` (a package or node name)."""
        return key.rsplit("/", 1)[-1]
