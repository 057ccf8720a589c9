"""One immutable view of a cluster, read from the store in a single transaction.

Each agent loop and each CLI command reads a Snapshot and decides from it.

Every record is decoded defensively: one that does not parse (not JSON, not UTF-8, a
value of the wrong type, a TEXT cell edited into the SQLite file, an owner key that
does not name a node) never stops the read. It is left out, and named in
``Snapshot.problems`` (``store key KEY: what is wrong``); the agent logs each problem
once and ``vigil status`` shows the rest of the cluster and exits 4. Where leaving a
record out would change what the cluster does, the snapshot holds the cautious
reading instead (docs/operations.md, "Unreadable store records"):

- an owner key that cannot be read is still there: the package counts as held by an
  unknown holder (``UNREADABLE``), so nothing else starts it; so does the controller
  key (the agents remove it, so that the role can be taken again);
- a node record that cannot be read still says the node is up (its lease is alive);
- an admin record that cannot be read counts as global switching off;
- a configuration record that cannot be read makes ``config_readable`` False: agents
  then act on nothing (they still enforce ownership) until ``vigil apply`` rewrites it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from vigil.config import ClusterSpec, PackageSpec, check_name
from vigil.errors import StoreCorrupt, one_line
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
log = logging.getLogger("vigil.store")


UNREADABLE = "?"  # the holder named by an owner or controller key that cannot be read


def _corrupt(kv: KeyValue, exc: ValidationError, expected: str, part: str = "") -> StoreCorrupt:
    first = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(value)"
    msg = str(first["msg"])
    if first["type"] == "json_invalid":
        loc, msg = "(value)", f"not valid JSON: {_preview(kv.value)}"
    return StoreCorrupt(one_line(f"store key {kv.key}{part}: {loc}: {msg} (expected {expected})"))


def _preview(value: bytes) -> str:
    return repr(value[:40]) + ("..." if len(value) > 40 else "")


def decode(model: type[M], kv: KeyValue) -> M:
    """The record under ``kv`` (strict: no type is converted), or StoreCorrupt."""
    try:
        return model.model_validate_json(kv.value, strict=True)
    except ValidationError as exc:
        raise _corrupt(kv, exc, f"a {model.__name__} record") from None


def decode_or_skip(model: type[M], kv: KeyValue, problems: list[str]) -> M | None:
    """``decode``, or None with the problem appended to ``problems``."""
    try:
        return decode(model, kv)
    except StoreCorrupt as exc:
        problems.append(str(exc))
        return None


_warned: set[str] = set()


def decode_all(model: type[M], kvs: Iterable[KeyValue]) -> list[tuple[KeyValue, M]]:
    """Every record of ``kvs`` that can be read, with its key-value; each one that
    cannot is logged once per process (a warning: on stderr for a command) and left out,
    so that one bad lock entry, flag or event does not stop the list."""
    problems: list[str] = []
    out = [(kv, rec) for kv in kvs if (rec := decode_or_skip(model, kv, problems)) is not None]
    for problem in problems:
        if problem not in _warned:
            _warned.add(problem)
            log.warning("unreadable store record, skipped: %s", problem)
    return out


def decode_name(kv: KeyValue, problems: list[str]) -> str:
    """The node name held by an owner or controller key, or UNREADABLE."""
    try:
        return check_name(kv.value.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        problems.append(
            one_line(f"store key {kv.key}: expected a node name, got {_preview(kv.value)}")
        )
        return UNREADABLE


def decode_bundle_each(kv: KeyValue, problems: list[str]) -> tuple[list[PackageSpec], bool]:
    """The package specs of one bundle, each decoded alone; and whether all were."""
    try:
        items: Any = json.loads(kv.value)
    except (ValueError, RecursionError):
        problems.append(one_line(f"store key {kv.key}: not valid JSON: {_preview(kv.value)}"))
        return [], False
    if not isinstance(items, list):
        problems.append(one_line(f"store key {kv.key}: expected a list of package specs"))
        return [], False
    specs: list[PackageSpec] = []
    for i, item in enumerate(items):
        try:
            specs.append(PackageSpec.model_validate(item, strict=True))
        except ValidationError as exc:
            name = item.get("name") if isinstance(item, dict) else None
            part = f"[{i}] (package {name!r})" if isinstance(name, str) else f"[{i}]"
            problems.append(str(_corrupt(kv, exc, "a package spec", part)))
    return specs, len(specs) == len(items)


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
    # Records that could not be read, each "store key KEY: what is wrong" (left out or
    # read cautiously, see the module docstring); False if any configuration record is
    # among them: nothing may be decided from a configuration partly missing.
    problems: tuple[str, ...] = ()
    config_readable: bool = True

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
    problems: list[str] = []
    cluster = None
    config_readable = True
    packages: dict[str, PackageSpec] = {}
    raw: dict[str, int] = {}
    for kv in config_kvs:
        raw[kv.key] = kv.mod_revision
        if kv.key == keys.config_cluster:
            cluster = decode_or_skip(ClusterSpec, kv, problems)
            config_readable = config_readable and cluster is not None
        elif kv.key.startswith(keys.config_bundles):
            specs, complete = decode_bundle_each(kv, problems)
            config_readable = config_readable and complete
            for spec in specs:
                packages[spec.name] = spec
    nodes: dict[str, NodeRecord] = {}
    for kv in node_kvs:
        rec = decode_or_skip(NodeRecord, kv, problems)
        # present means up (the key lives as long as the node's lease), readable or not
        nodes[keys.leaf(kv.key)] = rec or NodeRecord(name=keys.leaf(kv.key), pid=0, started_at=0)
    members: dict[str, MemberRecord] = {}
    for kv in member_kvs:
        member = decode_or_skip(MemberRecord, kv, problems)
        if member is not None:
            members[keys.leaf(kv.key)] = member
    owners: dict[str, str] = {}
    owner_revs: dict[str, int] = {}
    for kv in owner_kvs:
        owners[keys.leaf(kv.key)] = decode_name(kv, problems)
        owner_revs[keys.leaf(kv.key)] = kv.mod_revision
    status: dict[str, PackageStatus] = {}
    for kv in status_kvs:
        raw[kv.key] = kv.mod_revision
        if (st := decode_or_skip(PackageStatus, kv, problems)) is not None:
            status[keys.leaf(kv.key)] = st
    admin: dict[str, AdminRecord] = {}
    for kv in admin_kvs:
        raw[kv.key] = kv.mod_revision
        admin[keys.leaf(kv.key)] = decode_or_skip(AdminRecord, kv, problems) or AdminRecord(
            auto_run=False
        )
    assignments: dict[str, Assignment] = {}
    for kv in assign_kvs:
        raw[kv.key] = kv.mod_revision
        if (a := decode_or_skip(Assignment, kv, problems)) is not None:
            assignments[keys.leaf(kv.key)] = a
    node_admin: dict[str, NodeAdmin] = {}
    for kv in nodeadmin_kvs:
        raw[kv.key] = kv.mod_revision
        if (na := decode_or_skip(NodeAdmin, kv, problems)) is not None:
            node_admin[keys.leaf(kv.key)] = na
    controller = decode_name(controller_kvs[0], problems) if controller_kvs else None
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
        problems=tuple(problems),
        config_readable=config_readable,
    )


def loads_json(kv: KeyValue) -> object:
    try:
        return json.loads(kv.value)
    except ValueError:
        raise StoreCorrupt(f"store key {kv.key}: not valid JSON") from None
