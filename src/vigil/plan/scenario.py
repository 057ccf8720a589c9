"""Scenario files: a planner input (a ``Snapshot`` and a time) in readable TOML or JSON.

Used by the planner's golden tests (``tests/golden/*.scenario``) and by
``vigil simulate --from`` / ``--save``. A scenario holds what the planner reads,
nothing else (no leases, no revisions of individual keys)::

    now = 1000.0                  # the planner's clock (optional, default 0)

    [cluster]                     # cluster.toml keys; name and store may be left out
    failover = "on"
    nodes = ["n1", "n2", "n3"]

    [nodes]                       # up | down | halted (node halt) | detached (node halt --detach)
    n1 = "up"
    n2 = "down"

    [[package]]                   # the keys of a package TOML file
    name = "db"
    nodes = ["n1", "n2"]
    dependency = [{ package = "disk", condition = "up", location = "same_node" }]

    [owners]                      # package -> the node holding its owner key (must be up)
    db = "n1"

    [status.db]                   # the package's status record
    state = "running"
    node = "n1"

    [admin.db]                    # what operators asked (auto_run, disabled_nodes, ...)
    [assignment.db]               # the previous plan (node, reason, start_reason, since, ...)
    [node_admin.n2]               # explicit node halt records (halted, mode), rarely needed

    [flags]                       # node -> its flags
    n3 = ["!nofailover!n1"]

Times left out (status ``since``, node ``started_at``) are 0, so that a scenario
always plans the same way. Errors name the file and the key, like config errors.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from vigil.config import (
    MAX_DEPTH,
    PackageSpec,
    nesting_depth,
    parse_cluster,
    parse_package,
    parse_toml,
    read_config_file,
)
from vigil.errors import ConfigError
from vigil.model import AdminRecord, Assignment, NodeAdmin, NodeRecord, PackageStatus
from vigil.snapshot import Snapshot

NODE_STATES = ("up", "down", "halted", "detached")
_TOP_KEYS = {
    "now",
    "revision",
    "controller",
    "cluster",
    "nodes",
    "package",
    "owners",
    "status",
    "admin",
    "assignment",
    "node_admin",
    "flags",
}


@dataclass(frozen=True)
class Scenario:
    snapshot: Snapshot
    now: float


# --------------------------------------------------------------------------- loading


MAX_SCENARIO_BYTES = 64 << 20  # a saved snapshot of thousands of packages


def load_scenario(path: str | Path) -> Snapshot:
    """The snapshot of a scenario file (``.json``: JSON, anything else: TOML)."""
    return read_scenario(path).snapshot


def read_scenario(path: str | Path) -> Scenario:
    """The snapshot and the planner time (``now``) of a scenario file."""
    p = Path(path)
    where = str(p)
    text = read_config_file(p, where, limit=MAX_SCENARIO_BYTES)
    return parse_scenario(text, where, json_format=p.suffix == ".json")


def parse_scenario(text: str, where: str = "scenario", *, json_format: bool = False) -> Scenario:
    if json_format:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(where, f"not valid JSON: {exc}") from None
        except RecursionError:
            raise ConfigError(where, "not valid JSON: nested too deeply") from None
        if not isinstance(data, dict):
            raise ConfigError(where, "expected a JSON object at the top level")
        if nesting_depth(data, MAX_DEPTH) > MAX_DEPTH:
            raise ConfigError(where, f"nested more than {MAX_DEPTH} levels deep")
    else:
        data = parse_toml(text, where)
    return scenario_from_dict(data, where)


def _table(data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key}", f"expected a table, got {value!r}")
    return value


def _record(model: type[Any], data: object, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(where, f"expected a table, got {data!r}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else str(err["msg"])
        raise ConfigError(f"{where}.{loc}" if loc else where, msg) from None


def scenario_from_dict(data: Mapping[str, Any], where: str = "scenario") -> Scenario:
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: {unknown[0]}",
            f"unknown key (expected one of {', '.join(sorted(_TOP_KEYS))})",
        )
    now = data.get("now", 0.0)
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        raise ConfigError(f"{where}: now", f"expected a number of seconds, got {now!r}")
    revision = data.get("revision", 1)
    if isinstance(revision, bool) or not isinstance(revision, int):
        raise ConfigError(f"{where}: revision", f"expected an integer, got {revision!r}")
    controller = data.get("controller")
    if controller is not None and not isinstance(controller, str):
        raise ConfigError(f"{where}: controller", f"expected a node name, got {controller!r}")

    cluster_data = {"name": "scenario", "store": "memory://", **_table(data, "cluster", where)}
    cluster = parse_cluster(cluster_data, f"{where}: cluster")

    nodes: dict[str, NodeRecord] = {}
    node_admin: dict[str, NodeAdmin] = {}
    for name, state in _table(data, "nodes", where).items():
        if state not in NODE_STATES:
            raise ConfigError(
                f"{where}: nodes.{name}", f"expected one of {', '.join(NODE_STATES)}, got {state!r}"
            )
        if state != "down":
            nodes[name] = NodeRecord(name=name, pid=0, started_at=0.0)
        if state in ("halted", "detached"):
            mode = "detach" if state == "detached" else "failover"
            node_admin[name] = NodeAdmin(halted=True, mode=mode)
    for name, rec in _table(data, "node_admin", where).items():
        node_admin[name] = _record(NodeAdmin, rec, f"{where}: node_admin.{name}")

    raw_packages = data.get("package", [])
    if not isinstance(raw_packages, list):
        raise ConfigError(f"{where}: package", "expected an array of tables ([[package]])")
    packages: dict[str, PackageSpec] = {}
    for i, raw in enumerate(raw_packages):
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: package[{i}]", f"expected a table, got {raw!r}")
        spec = parse_package(raw, f"{where}: package[{i}]")
        if spec.name in packages:
            raise ConfigError(
                f"{where}: package[{i}].name", f"package {spec.name!r} is defined twice"
            )
        packages[spec.name] = spec

    owners: dict[str, str] = {}
    for pkg, node in _table(data, "owners", where).items():
        if not isinstance(node, str):
            raise ConfigError(f"{where}: owners.{pkg}", f"expected a node name, got {node!r}")
        if node not in nodes:
            raise ConfigError(
                f"{where}: owners.{pkg}",
                f"node {node!r} is not up (an owner key lives only as long as its node's lease)",
            )
        owners[pkg] = node

    status: dict[str, PackageStatus] = {}
    for pkg, rec in _table(data, "status", where).items():
        rec = {"since": 0.0, **rec} if isinstance(rec, dict) else rec
        status[pkg] = _record(PackageStatus, rec, f"{where}: status.{pkg}")
    admin = {
        pkg: _record(AdminRecord, rec, f"{where}: admin.{pkg}")
        for pkg, rec in _table(data, "admin", where).items()
    }
    assignments: dict[str, Assignment] = {}
    for pkg, rec in _table(data, "assignment", where).items():
        rec = {"node": None, **rec} if isinstance(rec, dict) else rec
        assignments[pkg] = _record(Assignment, rec, f"{where}: assignment.{pkg}")

    flags: dict[str, frozenset[str]] = {}
    for name, names in _table(data, "flags", where).items():
        if not isinstance(names, list) or not all(isinstance(f, str) for f in names):
            raise ConfigError(
                f"{where}: flags.{name}", f"expected a list of flag names, got {names!r}"
            )
        flags[name] = frozenset(names)

    snapshot = Snapshot(
        revision=revision,
        flags=flags,
        cluster=cluster,
        packages=packages,
        nodes=nodes,
        owners=owners,
        owner_revisions=dict.fromkeys(owners, 1),
        status=status,
        admin=admin,
        assignments=assignments,
        node_admin=node_admin,
        controller=controller,
    )
    return Scenario(snapshot, float(now))


# --------------------------------------------------------------------------- dumping


def dump_scenario(snapshot: Snapshot, *, now: float | None = None, comment: str = "") -> str:
    """``snapshot`` as scenario TOML (``load_scenario`` reads it back to an equal plan
    input: node records and key revisions are not kept)."""
    out: list[str] = [f"# {line}".rstrip() for line in comment.splitlines()]
    if now is not None:
        out.append(f"now = {_value(float(now))}")
    out.append(f"revision = {snapshot.revision}")
    if snapshot.controller is not None:
        out.append(f"controller = {_value(snapshot.controller)}")
    if snapshot.cluster is not None:
        cluster = _spec_dict(snapshot.cluster)
        out += ["", "[cluster]", *_pairs(cluster)]
    known = set(snapshot.nodes) | set(snapshot.node_admin)
    if snapshot.cluster is not None and snapshot.cluster.nodes:
        known |= set(snapshot.cluster.nodes)
    explicit: dict[str, NodeAdmin] = {}
    node_lines: list[str] = []
    for n in sorted(known):
        na = snapshot.node_admin.get(n)
        if n not in snapshot.nodes:
            state = "down"
            if na is not None:
                explicit[n] = na
        elif na is not None and na.halted:
            state = "detached" if na.mode == "detach" else "halted"
            if na.mode not in ("detach", "failover"):
                explicit[n] = na
        else:
            state = "up"
            if na is not None:
                explicit[n] = na
        node_lines.append(f"{_key(n)} = {_value(state)}")
    if node_lines:
        out += ["", "[nodes]", *node_lines]
    for name in sorted(snapshot.packages):
        out += ["", "[[package]]", *_pairs(_spec_dict(snapshot.packages[name]))]
    if snapshot.owners:
        out += ["", "[owners]"]
        out += [f"{_key(p)} = {_value(n)}" for p, n in sorted(snapshot.owners.items())]
    if any(snapshot.flags.values()):
        out += ["", "[flags]"]
        out += [f"{_key(n)} = {_value(sorted(f))}" for n, f in sorted(snapshot.flags.items()) if f]
    for section, records in (
        ("status", snapshot.status),
        ("admin", snapshot.admin),
        ("assignment", snapshot.assignments),
        ("node_admin", explicit),
    ):
        for key in sorted(records):
            rec = _record_dict(records[key])
            out += ["", f"[{section}.{_key(key)}]", *_pairs(rec)]
    return "\n".join(out).lstrip("\n") + "\n"


def _spec_dict(spec: BaseModel) -> dict[str, Any]:
    """A config model as its TOML keys: defaults left out, ``None`` durations as "none"."""
    return _nones(spec.model_dump(mode="json", exclude_defaults=True), "none")  # type: ignore[no-any-return]


def _record_dict(rec: BaseModel) -> dict[str, Any]:
    return _nones(rec.model_dump(mode="json", exclude_defaults=True), None)  # type: ignore[no-any-return]


def _nones(value: Any, replacement: str | None) -> Any:
    """Drop (records) or spell out (config: "none") the ``None`` values TOML cannot hold."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if v is None:
                if replacement is not None:
                    out[k] = replacement
                continue
            out[k] = _nones(v, replacement)
        return out
    if isinstance(value, list):
        return [_nones(v, replacement) for v in value]
    return value


_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE.match(k) else _string(k)


def _string(v: str) -> str:
    # JSON's escapes are TOML's, but TOML also wants DEL escaped
    return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")


def write_toml(table: Mapping[str, Any]) -> str:
    """``table`` as TOML text: one ``key = value`` line per key (tables inline)."""
    return "".join(f"{line}\n" for line in _pairs(table))


def _pairs(table: Mapping[str, Any]) -> list[str]:
    return [f"{_key(k)} = {_value(v)}" for k, v in table.items()]


def _value(v: Any, *, inline: bool = False) -> str:
    """One TOML value; ``inline``: inside an inline table, where newlines are not allowed."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list | tuple):
        items = [_value(x, inline=inline) for x in v]
        if not inline and sum(len(x) for x in items) > 80 and len(items) > 1:
            return "[\n" + "".join(f"  {x},\n" for x in items) + "]"
        return "[" + ", ".join(items) + "]"
    if isinstance(v, dict):
        if not v:
            return "{}"
        return (
            "{ " + ", ".join(f"{_key(k)} = {_value(x, inline=True)}" for k, x in v.items()) + " }"
        )
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
