"""One immutable view of a cluster, read from the store in a single transaction.

Each agent loop and each CLI command reads a Snapshot and decides from it. Store
contents that do not parse raise StoreCorrupt naming the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from vigil.config import ClusterSpec, PackageSpec
from vigil.errors import StoreCorrupt
from vigil.keys import Keys
from vigil.model import (
    AdminRecord,
    Assignment,
    MemberRecord,
    NodeAdmin,
    NodeRecord,
    PackageStatus,
)
from vigil.store import Get, KeyValue, Store

M = TypeVar("M", bound=BaseModel)


def _corrupt(kv: KeyValue, exc: ValidationError, expected: str) -> StoreCorrupt:
    first = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(value)"
    return StoreCorrupt(f"store key {kv.key}: {loc}: {first['msg']} (expected {expected})")


def decode(model: type[M], kv: KeyValue) -> M:
    try:
        return model.model_validate_json(kv.value)
    except ValidationError as exc:
        raise _corrupt(kv, exc, f"a {model.__name__} record") from None


_BUNDLE = TypeAdapter(list[PackageSpec])


def decode_bundle(kv: KeyValue) -> list[PackageSpec]:
    try:
        return _BUNDLE.validate_json(kv.value)
    except ValidationError as exc:
        raise _corrupt(kv, exc, "a list of package specs") from None


def encode_bundle(specs: list[PackageSpec]) -> bytes:
    return _BUNDLE.dump_json(specs)


def encode(record: BaseModel) -> bytes:
    return record.model_dump_json().encode()


@dataclass(frozen=True)
class Snapshot:
    revision: int
    cluster: ClusterSpec | None
    packages: dict[str, PackageSpec]
    nodes: dict[str, NodeRecord]  # nodes that are up (lease alive)
    owners: dict[str, str]  # package -> node
    owner_revisions: dict[str, int]  # package -> mod_revision of the owner key (fencing token)
    status: dict[str, PackageStatus]
    admin: dict[str, AdminRecord]
    raw_revisions: dict[str, int] = field(default_factory=dict)  # key -> mod_revision
    assignments: dict[str, Assignment] = field(default_factory=dict)
    node_admin: dict[str, NodeAdmin] = field(default_factory=dict)
    controller: str | None = None
    controller_revision: int = 0  # create_revision of the leader key: the controller's token
    flags: dict[str, frozenset[str]] = field(default_factory=dict)  # node -> its flags
    members: dict[str, MemberRecord] = field(default_factory=dict)  # nodes that joined once

    def admin_of(self, pkg: str) -> AdminRecord:
        return self.admin.get(pkg) or AdminRecord(auto_run=self._auto_run_default(pkg))

    def node_halted(self, node: str) -> bool:
        na = self.node_admin.get(node)
        return na is not None and na.halted

    def has_flag(self, node: str, flag: str) -> bool:
        return flag in self.flags.get(node, ())

    def status_of(self, pkg: str) -> PackageStatus:
        return self.status.get(pkg) or PackageStatus()

    def _auto_run_default(self, pkg: str) -> bool:
        spec = self.packages.get(pkg)
        return spec.auto_run if spec else True


async def read_snapshot(store: Store, keys: Keys) -> Snapshot:
    res = await store.txn(
        [],
        [
            Get(keys.root + "config/", prefix=True),
            Get(keys.nodes, prefix=True),
            Get(keys.owners, prefix=True),
            Get(keys.statuses, prefix=True),
            Get(keys.admins, prefix=True),
            Get(keys.assignments, prefix=True),
            Get(keys.node_admins, prefix=True),
            Get(keys.controller),
            Get(keys.flags, prefix=True),
            Get(keys.members, prefix=True),
        ],
    )
    (
        config_kvs,
        node_kvs,
        owner_kvs,
        status_kvs,
        admin_kvs,
        assign_kvs,
        nodeadmin_kvs,
        controller_kvs,
        flag_kvs,
        member_kvs,
    ) = (r if isinstance(r, list) else [] for r in res.responses)
    cluster = None
    packages: dict[str, PackageSpec] = {}
    raw: dict[str, int] = {}
    for kv in config_kvs:
        raw[kv.key] = kv.mod_revision
        if kv.key == keys.config_cluster:
            cluster = decode(ClusterSpec, kv)
        elif kv.key.startswith(keys.config_bundles):
            for spec in decode_bundle(kv):
                packages[spec.name] = spec
    nodes = {keys.leaf(kv.key): decode(NodeRecord, kv) for kv in node_kvs}
    members = {keys.leaf(kv.key): decode(MemberRecord, kv) for kv in member_kvs}
    owners: dict[str, str] = {}
    owner_revs: dict[str, int] = {}
    for kv in owner_kvs:
        owners[keys.leaf(kv.key)] = kv.value.decode()
        owner_revs[keys.leaf(kv.key)] = kv.mod_revision
    status: dict[str, PackageStatus] = {}
    for kv in status_kvs:
        raw[kv.key] = kv.mod_revision
        status[keys.leaf(kv.key)] = decode(PackageStatus, kv)
    admin: dict[str, AdminRecord] = {}
    for kv in admin_kvs:
        raw[kv.key] = kv.mod_revision
        admin[keys.leaf(kv.key)] = decode(AdminRecord, kv)
    assignments: dict[str, Assignment] = {}
    for kv in assign_kvs:
        raw[kv.key] = kv.mod_revision
        assignments[keys.leaf(kv.key)] = decode(Assignment, kv)
    node_admin: dict[str, NodeAdmin] = {}
    for kv in nodeadmin_kvs:
        raw[kv.key] = kv.mod_revision
        node_admin[keys.leaf(kv.key)] = decode(NodeAdmin, kv)
    controller = controller_kvs[0].value.decode() if controller_kvs else None
    controller_rev = controller_kvs[0].create_revision if controller_kvs else 0
    flags: dict[str, set[str]] = {}
    for kv in flag_kvs:
        node_name, _, flag = kv.key[len(keys.flags) :].partition("/")
        flags.setdefault(node_name, set()).add(flag)
    return Snapshot(
        revision=res.revision,
        flags={n: frozenset(f) for n, f in flags.items()},
        members=members,
        assignments=assignments,
        node_admin=node_admin,
        controller=controller,
        controller_revision=controller_rev,
        cluster=cluster,
        packages=packages,
        nodes=nodes,
        owners=owners,
        owner_revisions=owner_revs,
        status=status,
        admin=admin,
        raw_revisions=raw,
    )


def loads_json(kv: KeyValue) -> object:
    try:
        return json.loads(kv.value)
    except ValueError:
        raise StoreCorrupt(f"store key {kv.key}: not valid JSON") from None
