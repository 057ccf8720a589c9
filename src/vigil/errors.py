"""vigil's one error tree.

    VigilError                       every error vigil raises on purpose
    ├── ConfigError                  a configuration file or key is wrong (names file:key)
    ├── UsageError                   a bad command-line argument or a request that makes no sense
    │   └── NotFound                 an unknown package, node, service, ...
    ├── StoreError                   anything about the shared store
    │   ├── StoreUnavailable         the store cannot be reached / opened
    │   ├── StoreCorrupt             the store holds something vigil cannot read
    │   ├── LeaseNotFound            a lease expired or was revoked
    │   ├── Compacted                a watch asked for a revision that is gone
    │   └── Conflict                 a compare-and-swap transaction lost
    ├── ScriptError                  an external script misbehaved (exit code, timeout)
    ├── SpawnError                   a process could not be started
    ├── Timeout                      a --wait ran out of time
    ├── CmdsyncUnavailable           cmdsync needs failover on and a second node (§7)
    └── CommandLoop                  a --wait from a package script would close a wait cycle (§8)

Messages are one line and say what was wrong, where, and what was expected.
Third-party errors are converted at the boundary: ``raise StoreUnavailable(...) from exc``.
Anything else that reaches the top of ``vigil`` or ``vigild`` is a bug: their error
boundary prints it as one line with ``BUG_HINT`` and exits ``INTERNAL_ERROR``.
"""

from __future__ import annotations

INTERNAL_ERROR = 70  # sysexits.h EX_SOFTWARE: an unexpected exception, a bug in vigil
BUG_HINT = (
    "this is a bug in vigil; please report it with the command that caused it "
    "(VIGIL_DEBUG=1 shows the traceback)"
)

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(text: str) -> str:
    """``text`` with every control character escaped (``\\n``, ``\\x00``...), so that
    a message quoting user input (a key, a file name) stays one line."""
    if text.isprintable():
        return text
    return "".join(
        _ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        if not c.isprintable() and c != " "
        else c
        for c in text
    )


class VigilError(Exception):
    """Base of every error vigil raises on purpose. ``exit_code`` is the CLI exit status."""

    exit_code = 1


class ConfigError(VigilError):
    exit_code = 2

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


class UsageError(VigilError):
    exit_code = 2


class NotFound(UsageError):
    exit_code = 3


class StoreError(VigilError):
    exit_code = 4


class StoreUnavailable(StoreError):
    pass


class StoreCorrupt(StoreError):
    pass


class LeaseNotFound(StoreError):
    pass


class Compacted(StoreError):
    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(f"revision {requested} is compacted; oldest kept is {oldest}")
        self.requested = requested
        self.oldest = oldest


class Conflict(StoreError):
    pass


class ScriptError(VigilError):
    pass


class SpawnError(VigilError):
    pass


class Timeout(VigilError):
    exit_code = 5


class CmdsyncUnavailable(VigilError):
    """Failover is off, or the cluster has a single node: a script would not be rerun."""

    exit_code = 6


class CommandLoop(VigilError):
    """Package scripts waiting for one another in a cycle (pkg1 → pkg2 → pkg1)."""

    exit_code = 7
