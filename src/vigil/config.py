"""Configuration: ``cluster.toml`` and ``packages/*.toml`` → validated, frozen models.

Every error names the file, the key and what was expected, e.g.::

    packages/web.toml: service[0].restart_delay: expected a duration like "500ms", "3s", "5m"

The same models validate what is read back from the store, so a store holding
something vigil cannot read is reported the same way (with the store key as "file").
"""

from __future__ import annotations

import ipaddress
import os
import re
import resource
import signal
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


def _stop_signal(v: object) -> str:
    """``stop_signal``: a signal name as systemd's ``KillSignal=`` takes it
    (``"SIGTERM"``, ``"TERM"``, ``"sigint"``) → ``"SIGTERM"``."""
    if isinstance(v, str):
        name = v.strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if name in signal.Signals.__members__ and name not in ("SIGSTOP", "SIGCHLD"):
            return name
    raise ValueError(f'expected a signal name like "SIGTERM", "SIGINT" or "SIGQUIT", got {v!r}')


StopSignal = Annotated[str, BeforeValidator(_stop_signal)]


def _umask(v: object) -> int:
    """``umask``: octal digits in a string, ``"0027"`` (systemd's ``UMask=``), or a TOML
    octal integer ``0o027``."""
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0o777:
        return v
    if isinstance(v, str) and re.fullmatch(r"[0-7]{3,4}", v):
        return int(v, 8)
    raise ValueError(f'expected an octal umask like "0027", got {v!r}')


Umask = Annotated[int, BeforeValidator(_umask), PlainSerializer(lambda v: f"{v:04o}")]

_RLIM_INF = resource.RLIM_INFINITY


def _rlimit_value(v: object, whole: object) -> int:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    if isinstance(v, str) and v.strip().isdigit():
        return int(v)
    if isinstance(v, str) and v.strip() == "infinity":
        return _RLIM_INF
    raise ValueError(
        f'expected a non-negative integer, "infinity" or "SOFT:HARD" (systemd\'s Limit*=), got {whole!r}'
    )


def _rlimit(v: object) -> tuple[int, int]:
    """``limit_nofile = 65536`` (soft and hard), ``"infinity"`` or ``"1024:65536"``."""
    if isinstance(v, str) and ":" in v:
        soft_s, hard_s = v.split(":", 1)
        soft, hard = _rlimit_value(soft_s, v), _rlimit_value(hard_s, v)
    elif isinstance(v, list | tuple) and len(v) == 2:
        soft, hard = _rlimit_value(v[0], v), _rlimit_value(v[1], v)
    else:
        soft = hard = _rlimit_value(v, v)
    if hard != _RLIM_INF and (soft == _RLIM_INF or soft > hard):
        raise ValueError(f"the soft limit must not exceed the hard limit, got {v!r}")
    return soft, hard


def _fmt_rlimit(v: tuple[int, int]) -> str:
    def one(x: int) -> str:
        return "infinity" if x == _RLIM_INF else str(x)

    return one(v[0]) if v[0] == v[1] else f"{one(v[0])}:{one(v[1])}"


Rlimit = Annotated[tuple[int, int], BeforeValidator(_rlimit), PlainSerializer(_fmt_rlimit)]

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]?)B?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def _size(v: object) -> int:
    """``"10M"`` → 10485760 bytes (K, M, G are powers of 1024); an integer is bytes."""
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    if isinstance(v, str):
        m = _SIZE_RE.match(v)
        if m and int(m.group(1)) > 0:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    raise ValueError(f'expected a size like "10M", "512K" or a number of bytes, got {v!r}')


ByteSize = Annotated[int, BeforeValidator(_size)]

#: The resource limits a service may set: ``limit_NAME``, as systemd's ``LimitNAME=``.
RLIMIT_NAMES = (
    "cpu",
    "fsize",
    "data",
    "stack",
    "core",
    "rss",
    "nproc",
    "nofile",
    "memlock",
    "as",
    "locks",
    "sigpending",
    "msgqueue",
    "nice",
    "rtprio",
    "rttime",
)


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
    """``[[service]]``: one supervised process (and everything it forks, in its own
    cgroup). Stop control, identity and limits use systemd's names: ``type``
    (``Type=simple|forking``), ``pid_file`` (``PIDFile=``), ``stop_signal``
    (``KillSignal=``), ``kill_mode`` (``KillMode=``), ``user``/``group``, ``umask``,
    ``limit_*`` (``Limit*=``)."""

    name: Name
    command: Argv
    type: Literal["simple", "forking"] = "simple"
    pid_file: str | None = None
    start_timeout: Duration = 30.0
    restart: RestartBudget = 0
    restart_window: OptDuration = None
    restart_delay: Duration = 0.0
    halt_timeout: Duration = 10.0
    stop_signal: StopSignal = "SIGTERM"
    kill_mode: Literal["control-group", "mixed", "process"] = "control-group"
    fail_fast: bool = False
    user: str | None = None
    group: str | None = None
    umask: Umask | None = None
    cwd: str | None = None
    limit_cpu: Rlimit | None = None
    limit_fsize: Rlimit | None = None
    limit_data: Rlimit | None = None
    limit_stack: Rlimit | None = None
    limit_core: Rlimit | None = None
    limit_rss: Rlimit | None = None
    limit_nproc: Rlimit | None = None
    limit_nofile: Rlimit | None = None
    limit_memlock: Rlimit | None = None
    limit_as: Rlimit | None = None
    limit_locks: Rlimit | None = None
    limit_sigpending: Rlimit | None = None
    limit_msgqueue: Rlimit | None = None
    limit_nice: Rlimit | None = None
    limit_rtprio: Rlimit | None = None
    limit_rttime: Rlimit | None = None

    @model_validator(mode="after")
    def _forking(self) -> ServiceSpec:
        if self.type == "forking" and self.pid_file is None:
            raise ValueError('type "forking" needs pid_file: where the daemon writes its PID')
        if self.type != "forking" and self.pid_file is not None:
            raise ValueError('pid_file is only for type = "forking"')
        if self.pid_file is not None and not os.path.isabs(self.pid_file):
            raise ValueError(f"pid_file: expected an absolute path, got {self.pid_file!r}")
        return self

    def limits(self) -> dict[str, tuple[int, int]]:
        """The resource limits set: name (``"nofile"``) -> (soft, hard)."""
        out = {}
        for name in RLIMIT_NAMES:
            value = getattr(self, f"limit_{name}")
            if value is not None:
                out[name] = value
        return out

    @property
    def stop_signum(self) -> int:
        return int(signal.Signals[self.stop_signal])


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
    halt_timeout: Duration = 10.0
    log_max_size: ByteSize = 10 * 1024 * 1024
    log_keep: Annotated[int, Field(ge=0, le=100)] = 5
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
        for j, svc in enumerate(spec.service):
            for key, problem in service_problems(svc):
                report.errors.append(ConfigError(f"{where}: service[{j}].{key}", problem))
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


def service_problems(svc: ServiceSpec) -> list[tuple[str, str]]:
    """What keeps ``svc`` from running on the host this runs on: an unknown user or
    group, a missing working directory. ``(key, problem)`` pairs; empty if none."""
    import grp
    import pwd
    import socket

    here = f"on this node ({socket.gethostname()})"
    out = []
    if svc.user is not None:
        try:
            pwd.getpwuid(int(svc.user)) if svc.user.isdigit() else pwd.getpwnam(svc.user)
        except (KeyError, ValueError):
            out.append(("user", f"no user {svc.user!r} {here}"))
    if svc.group is not None:
        try:
            grp.getgrgid(int(svc.group)) if svc.group.isdigit() else grp.getgrnam(svc.group)
        except (KeyError, ValueError):
            out.append(("group", f"no group {svc.group!r} {here}"))
    if svc.cwd is not None and not os.path.isdir(svc.cwd):
        out.append(("cwd", f"working directory {svc.cwd} does not exist {here}"))
    return out


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
