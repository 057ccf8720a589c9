"""Run a package script entry point: ``PATH ENTRY ARGS...``.

The script runs in its own process group (through the spawner) with the given
environment, its output appended to the package log. On timeout the whole group gets
SIGTERM, then SIGKILL after ``kill_grace`` s. A script that cannot be started is a
result (``exit_code`` None, ``error`` set), not an exception.

What a result means (:func:`interpret`):

==========  =====================================  ===============================
entry       result                                 meaning
==========  =====================================  ===============================
start       0                                      OK
start       1, timeout, anything else, no start    HALT (halt, do not restart)
start       2                                      FAILOVER (try the next node)
stop        0                                      OK
stop        anything else, timeout, no start       HALT_FAILED
validate    0                                      VALID
validate    anything else, timeout, no start       INVALID
==========  =====================================  ===============================
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from vigil.config import ScriptRef
from vigil.supervise.command import run_command
from vigil.supervise.spawner import describe_exit

if TYPE_CHECKING:
    from vigil.supervise.cgroup import Cgroup
    from vigil.supervise.sentinel import ProcessRegistry
    from vigil.supervise.spawner import Child

ScriptEntry = Literal["start", "stop", "validate"]

EXIT_OK = 0
EXIT_HALT = 1
EXIT_FAILOVER = 2


@dataclass(frozen=True)
class ScriptResult:
    path: str
    entry: ScriptEntry
    exit_code: int | None  # None: could not be started (see ``error``)
    timed_out: bool
    duration: float
    error: str | None = None
    timeout: float | None = None
    left: Child | None = None  # see CommandResult.left

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK and not self.timed_out

    def describe(self) -> str:
        """One line, e.g. "/etc/vigil/web.sh start exited with status 1"."""
        if self.error is not None:
            return self.error
        what = f"{self.path} {self.entry}"
        if self.timed_out:
            limit = f" after {self.timeout:g}s" if self.timeout is not None else ""
            return f"{what} timed out{limit}"
        return f"{what} {describe_exit(self.exit_code)}"


async def run_script(
    ref: ScriptRef,
    entry: ScriptEntry,
    *,
    env: Mapping[str, str],
    timeout: float | None,
    log_path: str | Path | None,
    registry: ProcessRegistry | None = None,
    kill_grace: float = 3.0,
    cgroup: Cgroup | None = None,
    keep_leftovers: bool = False,
) -> ScriptResult:
    """Run ``ref.path ENTRY ref.args...``; ``timeout`` None waits forever.
    ``cgroup``/``keep_leftovers``: see :func:`vigil.supervise.command.run_command`."""
    res = await run_command(
        [ref.path, entry, *ref.args],
        env=env,
        timeout=timeout,
        log_path=log_path,
        registry=registry,
        kill_grace=kill_grace,
        cgroup=cgroup,
        keep_leftovers=keep_leftovers,
    )
    return ScriptResult(
        path=ref.path,
        entry=entry,
        exit_code=res.exit_code,
        timed_out=res.timed_out,
        duration=res.duration,
        error=res.error,
        timeout=timeout,
        left=res.left,
    )


class ScriptMeaning(enum.StrEnum):
    OK = "ok"
    HALT = "halt"  # start failed: halt the package, do not restart it
    FAILOVER = "failover"  # start failed here: try the next node
    HALT_FAILED = "halt_failed"  # stop failed: processes may be left; needs an operator
    VALID = "valid"
    INVALID = "invalid"


def interpret(entry: ScriptEntry, exit_code: int | None, timed_out: bool) -> ScriptMeaning:
    """What a script's result means (see the module table). Pure."""
    if entry == "start":
        if timed_out or exit_code is None:
            return ScriptMeaning.HALT
        if exit_code == EXIT_OK:
            return ScriptMeaning.OK
        if exit_code == EXIT_FAILOVER:
            return ScriptMeaning.FAILOVER
        return ScriptMeaning.HALT
    ok = exit_code == EXIT_OK and not timed_out
    if entry == "stop":
        return ScriptMeaning.OK if ok else ScriptMeaning.HALT_FAILED
    return ScriptMeaning.VALID if ok else ScriptMeaning.INVALID


def meaning(result: ScriptResult) -> ScriptMeaning:
    return interpret(result.entry, result.exit_code, result.timed_out)
