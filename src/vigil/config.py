"""Configuration: ``cluster.toml`` and ``packages/*.toml`` → validated, frozen models.

Every error names the file, the key and what was expected, e.g.::

    packages/web.toml: service[0].restart_delay: expected a duration like "500ms", "3s", "5m"

The same models validate what is read back from the store, so a store holding
something vigil cannot read is reported the same way (with the store key as "file").
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from vigil.errors import ConfigError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION_HINT = 'expected a duration like "500ms", "3s", "5m"'


def parse_duration(value: object, *, allow_none: bool = False) -> float | None:
    """``"500ms"`` → 0.5. Numbers are seconds (that is how the store keeps them)."""
    if isinstance(value, bool):
        raise ValueError(DURATION_HINT)
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{DURATION_HINT}, got a negative number")
        return float(value)
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        if allow_none:
            return None
        raise ValueError(f'{DURATION_HINT} ("none" is not allowed here)')
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
        hint = f'{DURATION_HINT} or "none"' if allow_none else DURATION_HINT
        raise ValueError(f"{hint}, got {value!r}")
    raise ValueError(f"{DURATION_HINT}, got {type(value).__name__}")


def _req_duration(v: object) -> float:
    d = parse_duration(v)
    assert d is not None
    return d


def _opt_duration(v: object) -> float | None:
    return parse_duration(v, allow_none=True)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    if seconds < 1 and seconds != 0:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


Duration = Annotated[float, BeforeValidator(_req_duration)]
OptDuration = Annotated[float | None, BeforeValidator(_opt_duration)]


def _check_name(v: str) -> str:
    if not isinstance(v, str) or not NAME_RE.match(v):
        raise ValueError(f"expected a name matching [a-z0-9][a-z0-9_.-]{{0,62}}, got {v!r}")
    return v


Name = Annotated[str, BeforeValidator(_check_name)]
Argv = Annotated[list[str], Field(min_length=1)]


def _restart_budget(v: object) -> int | None:
    """Service ``restart``: "none" → 0, N → N, "unlimited" → None."""
    if v == "none":
        return 0
    if v == "unlimited":
        return None
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    raise ValueError(f'expected "none", a non-negative integer or "unlimited", got {v!r}')


RestartBudget = Annotated[
    int | None,
    BeforeValidator(_restart_budget),
    PlainSerializer(lambda v: "unlimited" if v is None else v),
]


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ScriptRef(_Spec):
    path: str
    args: list[str] = Field(default_factory=list)


class AddressSpec(_Spec):
    ip: str
    interface: str

    @field_validator("ip")
    @classmethod
    def _cidr(cls, v: str) -> str:
        try:
            ipaddress.ip_interface(v)
        except ValueError:
            raise ValueError(
                f'expected an address in CIDR form like "10.0.0.10/24", got {v!r}'
            ) from None
        if "/" not in v:
            raise ValueError(f'expected an address in CIDR form like "10.0.0.10/24", got {v!r}')
        return v


class ServiceSpec(_Spec):
    name: Name
    command: Argv
    restart: RestartBudget = 0
    restart_window: OptDuration = None
    restart_delay: Duration = 0.0
    halt_timeout: Duration = 10.0
    fail_fast: bool = False
    user: str | None = None
    cwd: str | None = None


class MonitorSpec(_Spec):
    name: Name
    command: Argv
    interval: Duration = 10.0
    timeout: Duration = 5.0
    failures: Annotated[int, Field(ge=1)] = 3
    action: Literal["restart", "failover", "log"] = "restart"


class DependencySpec(_Spec):
    package: Name
    condition: Literal["up", "down"] = "up"
    location: Literal["same_node", "different_node", "any_node"] = "same_node"


class PackageSpec(_Spec):
    name: Name
    nodes: list[str] = Field(default_factory=lambda: ["*"])
    auto_run: bool = True
    failover_policy: Literal["configured_node", "min_package_node"] = "configured_node"
    failback_policy: Literal["manual", "automatic"] = "manual"
    priority: Annotated[int, Field(ge=1, le=3000)] | None = None
    run_script_timeout: OptDuration = 300.0
    halt_script_timeout: OptDuration = 300.0
    successor_halt_timeout: OptDuration = 300.0
    restart_limit: Annotated[int, Field(ge=0)] = 3
    restart_window: Duration = 600.0
    # Pacemaker's failure-timeout: node switching that a failure turned off comes back
    # on by itself this long after the failure (None: only an operator turns it on)
    failure_timeout: OptDuration = None
    node_fail_fast: bool = False
    env: dict[str, str] = Field(default_factory=dict)
    external_pre_script: list[ScriptRef] = Field(default_factory=list)
    external_script: list[ScriptRef] = Field(default_factory=list)
    address: list[AddressSpec] = Field(default_factory=list)
    service: list[ServiceSpec] = Field(default_factory=list)
    monitor: list[MonitorSpec] = Field(default_factory=list)
    dependency: list[DependencySpec] = Field(default_factory=list)

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError('expected at least one node name or "*"')
        for n in v:
            if n != "*":
                _check_name(n)
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
                raise ValueError(f"expected environment variable names like MY_VAR, got {k!r}")
            if k.startswith("VIGIL_"):
                raise ValueError(f"{k!r}: names starting with VIGIL_ are reserved")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> PackageSpec:
        for kind, items in (("service", self.service), ("monitor", self.monitor)):
            seen: set[str] = set()
            for item in items:
                if item.name in seen:
                    raise ValueError(f"duplicate {kind} name {item.name!r}")
                seen.add(item.name)
        return self

    def scripts(self) -> list[ScriptRef]:
        return [*self.external_pre_script, *self.external_script]

    def digest(self) -> str:
        """A short fingerprint of this definition (12 hex digits of the SHA-256 of its
        canonical JSON): a running package whose fingerprint differs from the applied
        definition's runs an older one."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


HOOK_PHASES = (
    "pre_restore",
    "post_restore",
    "pre_remove",
    "post_remove",
    "pre_delete",
    "post_delete",
)


class HooksSpec(_Spec):
    """``[hooks]``: executables run on the acting node around every package start
    (restore), halt (remove) and removal from the configuration (delete)."""

    timeout: Duration = 60.0
    pre_restore: list[str] = Field(default_factory=list)
    post_restore: list[str] = Field(default_factory=list)
    pre_remove: list[str] = Field(default_factory=list)
    post_remove: list[str] = Field(default_factory=list)
    pre_delete: list[str] = Field(default_factory=list)
    post_delete: list[str] = Field(default_factory=list)


class ClusterSpec(_Spec):
    name: Name
    store: str
    node_timeout: Duration = 3.0
    fence_command: list[str] | None = None
    hooks: HooksSpec = Field(default_factory=HooksSpec)
    failover: Literal["on", "off"] = "on"
    nodes: list[Name] | None = None
    state_dir: str = "/var/lib/vigil"
    # Pacemaker's dc-deadtime: how long a new controller waits for the expected nodes
    # to join before it places packages that never ran (default 2 x node_timeout)
    formation_timeout: Duration | None = None

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if not (v.startswith("sqlite:///") or v.startswith("etcd://") or v == "memory://"):
            raise ValueError(
                f'expected "sqlite:///ABSOLUTE/PATH" or "etcd://host:port[,host:port...]", got {v!r}'
            )
        return v

    @field_validator("node_timeout")
    @classmethod
    def _node_timeout(cls, v: float) -> float:
        if v < 0.5:
            raise ValueError(f"expected at least 500ms, got {format_duration(v)}")
        return v

    def formation_wait(self) -> float:
        """The cluster formation bound in seconds (``formation_timeout``)."""
        if self.formation_timeout is None:
            return 2 * self.node_timeout
        return self.formation_timeout


# --------------------------------------------------------------------------- loading


def _loc(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _explain(exc: ValidationError, where: str) -> list[ConfigError]:
    errors = []
    for err in exc.errors(include_url=False):
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        key = _loc(loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            if kind.endswith("_type") or kind.startswith("literal"):
                msg = f"{msg}, got {err.get('input')!r}"
        errors.append(ConfigError(f"{where}: {key}", msg))
    return errors


def _read_toml(path: Path, where: str) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(where, "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(where, f"not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(where, f"cannot read: {exc.strerror}") from None


def parse_cluster(data: dict[str, Any], where: str) -> ClusterSpec:
    try:
        return ClusterSpec.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, where)[0] from None


def parse_package(data: dict[str, Any], where: str) -> PackageSpec:
    try:
        return PackageSpec.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, where)[0] from None


def load_cluster(config_dir: Path) -> ClusterSpec:
    path = config_dir / "cluster.toml"
    return parse_cluster(_read_toml(path, str(path)), str(path))


@dataclass
class ConfigTree:
    """A whole configuration directory: the cluster and its packages, by name."""

    directory: Path
    cluster: ClusterSpec
    packages: dict[str, PackageSpec]
    files: dict[str, Path] = field(default_factory=dict)  # package name -> its file


@dataclass
class CheckReport:
    errors: list[ConfigError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def load_tree(config_dir: Path, report: CheckReport) -> ConfigTree | None:
    """Read ``cluster.toml`` and ``packages/*.toml``; collect every error in ``report``."""
    config_dir = config_dir.resolve()
    if not config_dir.is_dir():
        report.errors.append(ConfigError(str(config_dir), "not a directory"))
        return None
    cluster: ClusterSpec | None = None
    cpath = config_dir / "cluster.toml"
    try:
        cluster = ClusterSpec.model_validate(_read_toml(cpath, str(cpath)))
    except ValidationError as exc:
        report.errors.extend(_explain(exc, str(cpath)))
    except ConfigError as exc:
        report.errors.append(exc)
    packages: dict[str, PackageSpec] = {}
    files: dict[str, Path] = {}
    pkg_dir = config_dir / "packages"
    for path in sorted(pkg_dir.glob("*.toml")) if pkg_dir.is_dir() else []:
        try:
            data = _read_toml(path, str(path))
            spec = PackageSpec.model_validate(data)
        except ValidationError as exc:
            report.errors.extend(_explain(exc, str(path)))
            continue
        except ConfigError as exc:
            report.errors.append(exc)
            continue
        spec = _resolve_paths(spec, config_dir)
        if spec.name in packages:
            report.errors.append(
                ConfigError(
                    f"{path}: name",
                    f"package {spec.name!r} is already defined in {files[spec.name]}",
                )
            )
            continue
        packages[spec.name] = spec
        files[spec.name] = path
    if cluster is None:
        return None
    cluster = _resolve_hooks(cluster, config_dir, report)
    tree = ConfigTree(config_dir, cluster, packages, files)
    _check_semantics(tree, report)
    return tree


def _resolve_paths(spec: PackageSpec, base: Path) -> PackageSpec:
    """Script paths relative to the config directory become absolute."""

    def fix(refs: list[ScriptRef]) -> list[ScriptRef]:
        return [
            r if os.path.isabs(r.path) else r.model_copy(update={"path": str(base / r.path)})
            for r in refs
        ]

    return spec.model_copy(
        update={
            "external_pre_script": fix(spec.external_pre_script),
            "external_script": fix(spec.external_script),
        }
    )


def _resolve_hooks(cluster: ClusterSpec, base: Path, report: CheckReport) -> ClusterSpec:
    """Hook paths relative to the config directory become absolute; each must run."""
    where = str(base / "cluster.toml")
    fixed: dict[str, object] = {"timeout": cluster.hooks.timeout}
    for kind in HOOK_PHASES:
        paths = [p if os.path.isabs(p) else str(base / p) for p in getattr(cluster.hooks, kind)]
        fixed[kind] = paths
        for j, path in enumerate(paths):
            problem = script_problem(path)
            if problem:
                report.errors.append(ConfigError(f"{where}: hooks.{kind}[{j}]", problem))
    return cluster.model_copy(update={"hooks": HooksSpec.model_validate(fixed)})


def _check_semantics(tree: ConfigTree, report: CheckReport) -> None:
    names = set(tree.packages)
    priorities: dict[int, str] = {}
    for name, spec in tree.packages.items():
        where = str(tree.files[name])
        for i, key in enumerate(("external_pre_script", "external_script")):
            del i
            for j, ref in enumerate(getattr(spec, key)):
                problem = script_problem(ref.path)
                if problem:
                    report.errors.append(ConfigError(f"{where}: {key}[{j}].path", problem))
        for j, dep in enumerate(spec.dependency):
            if dep.package == name:
                report.errors.append(
                    ConfigError(
                        f"{where}: dependency[{j}].package", "a package cannot depend on itself"
                    )
                )
            elif dep.package not in names:
                report.errors.append(
                    ConfigError(
                        f"{where}: dependency[{j}].package",
                        f"expected a configured package, got {dep.package!r}",
                    )
                )
            elif dep.condition == "down":
                other = tree.packages[dep.package]
                if not any(d.package == name and d.condition == "down" for d in other.dependency):
                    report.errors.append(
                        ConfigError(
                            f"{where}: dependency[{j}]",
                            f"a 'down' dependency must be mutual: {dep.package!r} "
                            f"has no 'down' dependency on {name!r}",
                        )
                    )
        if spec.priority is not None:
            if spec.priority in priorities:
                report.errors.append(
                    ConfigError(
                        f"{where}: priority",
                        f"priority {spec.priority} is already used by package "
                        f"{priorities[spec.priority]!r}; priorities must be unique",
                    )
                )
            else:
                priorities[spec.priority] = name
        if tree.cluster.nodes is not None:
            for j, node in enumerate(spec.nodes):
                if node != "*" and node not in tree.cluster.nodes:
                    report.errors.append(
                        ConfigError(
                            f"{where}: nodes[{j}]",
                            f"expected a node listed in cluster.toml nodes, got {node!r}",
                        )
                    )
        for svc in spec.service:
            if svc.restart is None and svc.restart_delay == 0:
                report.warnings.append(
                    f"{where}: service {svc.name!r} restarts without limit and without "
                    "restart_delay; a crash loop will use CPU"
                )
        for key in ("run_script_timeout", "halt_script_timeout"):
            if getattr(spec, key) is None:
                report.warnings.append(
                    f'{where}: {key} is "none": a hanging script will block the package forever'
                )
    cycle = find_dependency_cycle(
        {
            n: [d.package for d in s.dependency if d.condition == "up"]
            for n, s in tree.packages.items()
        }
    )
    if cycle:
        first = cycle[0]
        report.errors.append(
            ConfigError(
                f"{tree.files[first]}: dependency",
                "dependency cycle: " + " -> ".join([*cycle, first]),
            )
        )


def script_problem(path: str) -> str | None:
    """Why ``path`` cannot be run as an external script, or None if it can."""
    p = Path(path)
    if not p.exists():
        return f"script {path} does not exist"
    if not p.is_file():
        return f"script {path} is not a regular file"
    if not os.access(p, os.X_OK):
        return f"script {path} is not executable (chmod +x)"
    return None


def find_dependency_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """Return one cycle in ``graph`` (a list of nodes, first not repeated) or None."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = grey
        stack.append(n)
        for m in graph.get(n, []):
            if m not in color:
                continue
            if color[m] == grey:
                return stack[stack.index(m) :]
            if color[m] == white:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        color[n] = black
        return None

    for n in sorted(graph):
        if color[n] == white:
            found = visit(n)
            if found:
                return found
    return None
