"""Configuration: ``cluster.toml`` and ``packages/*.toml`` → validated, frozen models.

Every error names the file, the key and what was expected, e.g.::

    packages/web.toml: service[0].restart_delay: expected a duration like "500ms", "3s", "5m"

What is accepted (docs/operations.md, "What vigil accepts"):

- **strict types**: a value of the wrong TOML type is an error, never converted
  (``"3"`` is not 3, ``1`` is not ``true``, ``2.0`` is not 2);
- **finite durations**: ``"500ms"``, ``"3s"``, ``"5m"``, ``"2h"`` (ASCII digits) or a
  number of seconds; never ``inf`` or ``nan``; each key has a range (``duration``);
- **names** (packages, services, monitors, nodes, the cluster) match
  ``[a-z0-9][a-z0-9_.-]{0,62}`` exactly: no trailing newline, no control character;
- **no NUL** in any string (it can never reach ``execve`` or a path);
- **files**: every configuration path is a regular file (or the ``packages/``
  directory) of at most ``MAX_FILE_BYTES``, UTF-8, nested at most ``MAX_DEPTH`` deep.

The same models validate what is read back from the store (strict types and finite
numbers, but not the ranges, which are the policy for what an operator writes), so a
store holding something vigil cannot read is reported the same way, with the store
key as "file".
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
import re
import resource
import signal
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from vigil.errors import ConfigError, one_line
from vigil.store.url import EXPECTED as STORE_URL_EXPECTED
from vigil.store.url import parse_store_url

NAME_PATTERN = "[a-z0-9][a-z0-9_.-]{0,62}"
NAME_RE = re.compile(rf"{NAME_PATTERN}\Z", re.ASCII)  # use with .match (or fullmatch)
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)", re.ASCII)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION_HINT = 'expected a duration like "500ms", "3s", "5m"'
MAX_DURATION = 30 * 86400.0  # the longest duration a configuration may give: 720h
MAX_FILE_BYTES = 1 << 20  # a configuration file larger than this is not one
MAX_DEPTH = 16  # tables and lists nested deeper than this are not a vigil configuration
M = TypeVar("M", bound=BaseModel)
# Validation context of what an operator wrote (a file): the ranges apply, memory:// not.
FROM_FILE = {"file": True}


def given(value: object) -> str:
    """How a wrong value is quoted in an error: ``'no' (a string)``, one line, short."""
    if isinstance(value, bool):
        text, kind = ("true" if value else "false"), "a boolean"
    else:
        text = repr(value)
        kind = {
            str: "a string",
            int: "an integer",
            float: "a number",
            list: "a list",
            tuple: "a list",
            dict: "a table",
        }.get(type(value), f"a {type(value).__name__}")
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{one_line(text)} ({kind})"


def _fail(message: str, at: str = "") -> PydanticCustomError:
    """A validation error whose message is ``message`` verbatim; ``at`` is a path
    inside the value (``[1]``, ``.A``) appended to the key in the error."""
    return PydanticCustomError("vigil", "{message}", {"message": message, "at": at})


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    if seconds < 1 and seconds != 0:
        return f"{seconds * 1000:g}ms"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    return f"{seconds:g}s"


def parse_duration(
    value: object,
    *,
    allow_none: bool = False,
    low: float = 0.0,
    high: float = MAX_DURATION,
) -> float | None:
    """``"500ms"`` → 0.5. Numbers are seconds (that is how the store keeps them).

    Raises ValueError unless ``value`` is a finite duration within [low, high]
    (``"none"`` → None where ``allow_none``).
    """
    hint = f'{DURATION_HINT} or "none"' if allow_none else DURATION_HINT
    if isinstance(value, bool):
        raise ValueError(f"{hint}, got {given(value)}")
    seconds: float
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"{hint} (a finite number), got {given(value)}")
        seconds = float(value)
    elif value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        if allow_none:
            return None
        raise ValueError(f'{DURATION_HINT} ("none" is not allowed here)')
    elif isinstance(value, str):
        m = _DURATION_RE.fullmatch(value.strip())
        if not m:
            raise ValueError(f"{hint}, got {given(value)}")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"{hint}, got {given(value)}")
    if not math.isfinite(seconds) or not low <= seconds <= high:
        raise ValueError(
            f"expected a duration from {format_duration(low)} to {format_duration(high)}, "
            f"got {given(value)}"
        )
    return seconds


def from_file(info: ValidationInfo) -> bool:
    """Whether the value being validated is what an operator wrote (``validate_file``):
    the rules of policy (ranges, no repetition) apply there, not to records read back
    from the store or built by code."""
    return bool(info.context and info.context.get("file"))


def _within(
    low: float = 0.0, high: float = MAX_DURATION, *, allow_none: bool = False
) -> BeforeValidator:
    """The validator of a duration key: seconds (float), finite, and from a file within
    [low, high] (records read back from the store are only checked to be finite)."""

    def validate(value: object, info: ValidationInfo) -> float | None:
        if from_file(info):
            return parse_duration(value, allow_none=allow_none, low=low, high=high)
        return parse_duration(value, allow_none=allow_none, high=math.inf)

    return BeforeValidator(validate)


# A new duration key gets one of these and with it every rule above.
Duration = Annotated[float, _within()]
OptDuration = Annotated[float | None, _within(allow_none=True)]
Timeout = Annotated[float, _within(0.1)]  # timeouts and intervals: at least 100ms
OptTimeout = Annotated[float | None, _within(0.1, allow_none=True)]
Window = Annotated[float, _within(1.0)]  # counting windows: at least 1s
OptWindow = Annotated[float | None, _within(1.0, allow_none=True)]
NodeTimeout = Annotated[float, _within(0.5, 3600.0)]


def check_name(v: object) -> str:
    """``v`` if it is a name (``NAME_PATTERN``, whole string), else ValueError."""
    if not isinstance(v, str) or not NAME_RE.match(v):
        raise ValueError(f"expected a name matching {NAME_PATTERN}, got {given(v)}")
    return v


Name = Annotated[str, BeforeValidator(check_name)]
Argv = Annotated[list[str], Field(min_length=1)]


def _restart_budget(v: object) -> int | None:
    """Service ``restart``: "none" → 0, N → N, "unlimited" → None."""
    if v == "none":
        return 0
    if v == "unlimited":
        return None
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    raise ValueError(f'expected "none", a non-negative integer or "unlimited", got {given(v)}')


RestartBudget = Annotated[
    int | None,
    BeforeValidator(_restart_budget),
    PlainSerializer(lambda v: "unlimited" if v is None else v),
]


def _nul_at(value: object) -> str | None:
    """Where ``value`` (a string, or lists and tables of them) holds a NUL character:
    ``""`` (the value itself), ``"[1]"``, ``".A"``...; None if nowhere."""
    todo: list[tuple[str, object]] = [("", value)]
    while todo:
        at, v = todo.pop()
        if isinstance(v, str):
            if "\0" in v:
                return at
        elif isinstance(v, list | tuple):
            todo.extend((f"{at}[{i}]", x) for i, x in enumerate(v))
        elif isinstance(v, dict):
            for k, x in v.items():
                if isinstance(k, str) and "\0" in k:
                    return at
                todo.append((f"{at}.{k}", x))
    return None


def _stop_signal(v: object) -> str:
    """``stop_signal``: a signal name as systemd's ``KillSignal=`` takes it
    (``"SIGTERM"``, ``"TERM"``, ``"sigint"``) → ``"SIGTERM"``."""
    if isinstance(v, str):
        name = v.strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if name in signal.Signals.__members__ and name not in ("SIGSTOP", "SIGCHLD", "SIGCONT"):
            return name
    raise ValueError(f'expected a signal name like "SIGTERM", "SIGINT" or "SIGQUIT", got {v!r}')


StopSignal = Annotated[str, BeforeValidator(_stop_signal)]


def _umask(v: object) -> int:
    """``umask``: 3 or 4 octal digits in a string, ``"0027"`` (systemd's ``UMask=``).
    A TOML number is refused: ``umask = 27`` parses as decimal 27 (octal 033), not
    what its writer meant, and ``0o027`` cannot be told from it once parsed."""
    if isinstance(v, str) and re.fullmatch(r"[0-7]{3,4}", v):
        return int(v, 8)
    if isinstance(v, int) and not isinstance(v, bool):
        raise ValueError(f'expected an octal umask in a string like "0027", got the number {v}')
    raise ValueError(f'expected an octal umask like "0027", got {v!r}')


Umask = Annotated[int, BeforeValidator(_umask), PlainSerializer(lambda v: f"{v:04o}")]

_RLIM_INF = resource.RLIM_INFINITY


_RLIM_MAX = 2**63 - 1  # what setrlimit takes as a number; beyond it, say "infinity"


def _rlimit_value(v: object, whole: object) -> int:
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _RLIM_MAX:
        return v
    if isinstance(v, str) and v.strip().isascii() and v.strip().isdigit() and int(v) <= _RLIM_MAX:
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

#: Limits the kernel keeps in a small range (setpriority(2), sched(7)).
_RLIMIT_CEILING = {"nice": 40, "rtprio": 99}

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
    """Base of every configuration model: frozen, unknown keys refused, and no string
    anywhere in it may hold NUL. Types are strict where input crosses a boundary
    (``validate_file``, ``snapshot.decode``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, v: object) -> object:
        at = _nul_at(v)
        if at is not None:
            raise _fail("NUL (\\u0000) is not allowed", at)
        return v


class ScriptRef(_Spec):
    path: str
    args: list[str] = Field(default_factory=list)


class AddressSpec(_Spec):
    ip: str
    interface: str

    @field_validator("interface")
    @classmethod
    def _interface(cls, v: str) -> str:
        # Linux's own rule for a network device name (dev_valid_name)
        if (
            not 0 < len(v) < 16
            or v in (".", "..")
            or any(c in v for c in "/: ")
            or not v.isprintable()
        ):
            raise ValueError(f'expected a network interface name like "eth0", got {given(v)}')
        return v

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
    restart_window: OptWindow = None
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
        for name, top in _RLIMIT_CEILING.items():
            value = getattr(self, f"limit_{name}")
            if value is not None and max(value) > top and value[1] != _RLIM_INF:
                raise ValueError(
                    f"limit_{name}: at most {top} (the kernel's range), got {value[1]}"
                )
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
    interval: Timeout = 10.0
    timeout: Timeout = 5.0
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
    run_script_timeout: OptTimeout = 300.0
    halt_script_timeout: OptTimeout = 300.0
    successor_halt_timeout: OptTimeout = 300.0
    restart_limit: Annotated[int, Field(ge=0)] = 3
    restart_window: Window = 600.0
    # Pacemaker's failure-timeout: node switching that a failure turned off comes back
    # on by itself this long after the failure (None: only an operator turns it on)
    failure_timeout: OptDuration = None
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
    def _nodes(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if not v:
            raise ValueError('expected at least one node name or "*"')
        for i, n in enumerate(v):
            if n != "*" and not NAME_RE.match(n):
                raise _fail(
                    f'expected a node name matching {NAME_PATTERN} or "*", got {given(n)}', f"[{i}]"
                )
            if from_file(info) and n in v[:i]:
                raise _fail(f"{n!r} is listed twice", f"[{i}]")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k, re.ASCII):
                raise ValueError(f"expected environment variable names like MY_VAR, got {given(k)}")
            if k.startswith("VIGIL_"):
                raise ValueError(f"{k!r}: names starting with VIGIL_ are reserved")
        return v

    @field_validator("dependency")
    @classmethod
    def _one_per_package(
        cls, v: list[DependencySpec], info: ValidationInfo
    ) -> list[DependencySpec]:
        """Two dependencies on one package either contradict each other (up and down)
        or say together what one says: one per package (in what an operator writes)."""
        for i, dep in enumerate(v if from_file(info) else ()):
            j = next((j for j, d in enumerate(v[:i]) if d.package == dep.package), None)
            if j is None:
                continue
            if v[j].condition != dep.condition:
                what = f"contradicts dependency[{j}] on {dep.package!r} (up and down)"
            else:
                what = f"repeats dependency[{j}] on {dep.package!r}"
            raise _fail(f"{what}; give one dependency per package", f"[{i}]")
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

    timeout: Timeout = 60.0
    pre_restore: list[str] = Field(default_factory=list)
    post_restore: list[str] = Field(default_factory=list)
    pre_remove: list[str] = Field(default_factory=list)
    post_remove: list[str] = Field(default_factory=list)
    pre_delete: list[str] = Field(default_factory=list)
    post_delete: list[str] = Field(default_factory=list)


class ClusterSpec(_Spec):
    name: Name
    store: str
    node_timeout: NodeTimeout = 3.0
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
    def _store(cls, v: str, info: ValidationInfo) -> str:
        kind, _ = parse_store_url(v)  # ValueError naming what is wrong
        if kind == "memory" and from_file(info):
            raise ValueError(
                f"{STORE_URL_EXPECTED}, got 'memory://' (it keeps the cluster inside one "
                "process: nothing would be kept between commands)"
            )
        return v

    @field_validator("state_dir")
    @classmethod
    def _state_dir(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"expected an absolute path, got {given(v)}")
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


# pydantic's error types → what the operator should have written
_EXPECTED_TYPE = {
    "bool_type": "expected true or false",
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "dict_type": "expected a table",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
}


def _message(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind in _EXPECTED_TYPE:
        return f"{_EXPECTED_TYPE[kind]}, got {given(err.get('input'))}"
    if kind == "literal_error":
        return f"expected {ctx.get('expected')}, got {given(err.get('input'))}"
    if kind in ("greater_than_equal", "less_than_equal"):
        bound = ctx.get("ge", ctx.get("le"))
        side = "at least" if kind == "greater_than_equal" else "at most"
        return f"expected {side} {bound}, got {given(err.get('input'))}"
    if kind == "too_short":
        return f"expected at least {ctx.get('min_length')} item(s), got none"
    return str(err["msg"]).removeprefix("Value error, ")


def _explain(exc: ValidationError, where: str) -> list[ConfigError]:
    errors = []
    for err in exc.errors(include_url=False):
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        key = _loc(loc) + (err.get("ctx") or {}).get("at", "")
        errors.append(ConfigError(f"{where}: {one_line(key)}", one_line(_message(err))))
    return errors


def _kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_config_file(path: Path, where: str, limit: int = MAX_FILE_BYTES) -> str:
    """The text of a configuration file (or a scenario), or a ConfigError saying why
    not: missing, a dangling symbolic link, not a regular file (a FIFO would block,
    /dev/zero never ends), larger than ``limit`` bytes, not UTF-8. Never blocks."""
    try:
        st = os.stat(path)  # follows symbolic links; opens nothing (devices have effects)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(where, f"not a regular file ({_kind_of(st.st_mode)})")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        if os.path.islink(path):
            target = os.readlink(path)
            raise ConfigError(where, f"dangling symbolic link to {target!r}") from None
        raise ConfigError(where, "file not found") from None
    except ValueError:
        raise ConfigError(where, "NUL is not allowed in a path") from None
    except OSError as exc:
        raise ConfigError(where, f"cannot read: {exc.strerror}") from None
    try:
        again = os.fstat(fd)  # what was opened (it may have been replaced since)
        if not stat.S_ISREG(again.st_mode):
            raise ConfigError(where, f"not a regular file ({_kind_of(again.st_mode)})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise ConfigError(where, f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ConfigError(where, f"larger than {limit} bytes: not a configuration file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            where, f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def nesting_depth(data: object, limit: int) -> int:
    """How deep lists and tables nest in ``data``, counting up to ``limit + 1``
    (iterative: a hostile value cannot exhaust the stack)."""
    deepest = 0
    todo: list[tuple[int, object]] = [(0, data)]
    while todo:
        depth, v = todo.pop()
        children: Iterable[object] = (
            v.values() if isinstance(v, dict) else v if isinstance(v, list | tuple) else ()
        )
        for child in children:
            if isinstance(child, dict | list | tuple):
                if depth + 1 > limit:
                    return depth + 1
                deepest = max(deepest, depth + 1)
                todo.append((depth + 1, child))
    return deepest


def parse_toml(text: str, where: str) -> dict[str, Any]:
    """TOML text → a table; ConfigError if it is not TOML or nests too deeply."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(where, f"not valid TOML: {one_line(str(exc))}") from None
    except RecursionError:
        raise ConfigError(
            where, f"not valid TOML: nested more than {MAX_DEPTH} levels deep"
        ) from None
    if nesting_depth(data, MAX_DEPTH) > MAX_DEPTH:
        raise ConfigError(where, f"nested more than {MAX_DEPTH} levels deep")
    return data


def _read_toml(path: Path, where: str) -> dict[str, Any]:
    return parse_toml(read_config_file(path, where), where)


def validate_file(model: type[M], data: Mapping[str, Any]) -> M:
    """``data`` as an operator wrote it → ``model``: strict types, ranges, no memory://."""
    return model.model_validate(data, strict=True, context=FROM_FILE)


def parse_cluster(data: dict[str, Any], where: str) -> ClusterSpec:
    try:
        return ClusterSpec.model_validate(data, strict=True)
    except ValidationError as exc:
        raise _explain(exc, where)[0] from None


def parse_package(data: dict[str, Any], where: str) -> PackageSpec:
    try:
        return PackageSpec.model_validate(data, strict=True)
    except ValidationError as exc:
        raise _explain(exc, where)[0] from None


def load_cluster(config_dir: Path) -> ClusterSpec:
    """``DIR/cluster.toml``; a ConfigError (one line) if it cannot be read or is wrong."""
    if os.path.lexists(config_dir) and not config_dir.is_dir():
        raise ConfigError(str(config_dir), "not a directory (the configuration directory)")
    path = config_dir / "cluster.toml"
    where = str(path)
    try:
        return validate_file(ClusterSpec, _read_toml(path, where))
    except ValidationError as exc:
        raise _explain(exc, where)[0] from None


@dataclass
class ConfigTree:
    """A whole configuration directory: the cluster and its packages, by name."""

    directory: Path
    cluster: ClusterSpec
    packages: dict[str, PackageSpec]
    files: dict[str, Path] = field(default_factory=dict)  # package name -> its file
    # packages whose file has an error (its name and file stem): not reported again
    # as missing by the files that depend on them
    unreadable: set[str] = field(default_factory=set)


@dataclass
class CheckReport:
    errors: list[ConfigError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _package_files(pkg_dir: Path, report: CheckReport) -> list[Path]:
    """``packages/*.toml``; ``packages/`` must be a directory (a file, a dangling link
    or nothing at all is a broken deploy: applying it would remove every package)."""
    where = str(pkg_dir)
    if not pkg_dir.is_dir():
        if os.path.islink(pkg_dir) and not os.path.exists(pkg_dir):
            problem = f"dangling symbolic link to {os.readlink(pkg_dir)!r}"
        elif os.path.lexists(pkg_dir):
            problem = f"not a directory ({_kind_of(os.stat(pkg_dir).st_mode)})"
        else:
            problem = "missing (a cluster without packages has an empty packages/ directory)"
        report.errors.append(ConfigError(where, f"{problem}; expected a directory"))
        return []
    try:
        return sorted(p for p in pkg_dir.iterdir() if p.name.endswith(".toml"))
    except OSError as exc:
        report.errors.append(ConfigError(where, f"cannot list: {exc.strerror}"))
        return []


def load_tree(config_dir: Path, report: CheckReport) -> ConfigTree | None:
    """Read ``cluster.toml`` and ``packages/*.toml``; collect every error in ``report``."""
    config_dir = config_dir.resolve()
    if not config_dir.is_dir():
        report.errors.append(ConfigError(str(config_dir), "not a directory"))
        return None
    cluster: ClusterSpec | None = None
    cpath = config_dir / "cluster.toml"
    if not os.path.lexists(cpath):  # one cause, one line
        report.errors.append(
            ConfigError(str(config_dir), "not a configuration directory (it has no cluster.toml)")
        )
        return None
    try:
        cluster = validate_file(ClusterSpec, _read_toml(cpath, str(cpath)))
    except ValidationError as exc:
        report.errors.extend(_explain(exc, str(cpath)))
    except ConfigError as exc:
        report.errors.append(exc)
    packages: dict[str, PackageSpec] = {}
    files: dict[str, Path] = {}
    unreadable: set[str] = set()
    for path in _package_files(config_dir / "packages", report):
        data: Mapping[str, Any] = {}
        try:
            data = _read_toml(path, str(path))
            spec = validate_file(PackageSpec, data)
        except (ValidationError, ConfigError) as exc:
            if isinstance(exc, ValidationError):
                report.errors.extend(_explain(exc, str(path)))
            else:
                report.errors.append(exc)
            name = data.get("name")
            unreadable |= {path.stem, name} if isinstance(name, str) else {path.stem}
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
    tree = ConfigTree(config_dir, cluster, packages, files, unreadable)
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
            elif dep.package in tree.unreadable:
                continue  # its own file's error says what is wrong
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
    if svc.limit_nofile is not None and svc.limit_nofile[1] != _RLIM_INF:
        try:
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            nr_open = None
        if nr_open is not None and svc.limit_nofile[1] > nr_open:
            out.append(
                (
                    "limit_nofile",
                    f"at most {nr_open} {here} (fs.nr_open), got {svc.limit_nofile[1]}",
                )
            )
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
    return interpreter_problem(path)


def interpreter_problem(path: str) -> str | None:
    """What is wrong with the ``#!`` line of the script at ``path`` (the kernel would
    report it as the script itself missing: ENOENT), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError as exc:
        return f"script {path}: cannot read: {exc.strerror}"
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0]
    if line.endswith(b"\r"):
        return (
            f"script {path}: its interpreter line ends in \\r (CRLF line endings; "
            "convert the file with dos2unix)"
        )
    words = line.split()
    interpreter = os.fsdecode(words[0]) if words else ""
    if not interpreter:
        return f"script {path}: its interpreter line (#!) names no interpreter"
    if os.path.isabs(interpreter) and not os.access(interpreter, os.X_OK):
        why = "does not exist" if not os.path.exists(interpreter) else "is not executable"
        return f"script {path}: its interpreter {one_line(interpreter)} {why}"
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
