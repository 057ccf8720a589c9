"""Option types shared by the commands, checked before anything is done.

- ``SECONDS``: a finite number of seconds from 0 to ``MAX_DURATION`` (``nan``, ``inf``
  and ``1e308`` are refused: a deadline that never passes would wait forever);
- ``NAME``: a package or node name, exactly (no trailing newline, no control character);
- ``live_pid``: a PID that names a live process here that a lock can belong to.
"""

from __future__ import annotations

import math

import click

from vigil import locks
from vigil.config import MAX_DURATION, check_name, format_duration
from vigil.errors import UsageError


class Seconds(click.ParamType):
    """A finite number of seconds in [0, MAX_DURATION]."""

    name = "seconds"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float | int) and not isinstance(value, bool):
            number = float(value)
        else:
            try:
                number = float(str(value))
            except ValueError:
                self.fail(f"expected a number of seconds, got {value!r}", param, ctx)
        if not math.isfinite(number) or not 0 <= number <= MAX_DURATION:
            self.fail(
                f"expected a number of seconds from 0 to {MAX_DURATION:.0f} "
                f"({format_duration(MAX_DURATION)}), got {value!r}",
                param,
                ctx,
            )
        return number


SECONDS = Seconds()

PF_KTHREAD = 0x00200000  # /proc/PID/stat flags: a kernel thread


def live_pid(pid: int) -> int:
    """``pid`` if a lock may belong to it: a live process in this PID namespace that
    can end. PID 1 cannot (every process descends from it and it never ends: holding
    the lock for it lets every process through, for good), nor can a kernel thread."""
    if pid == 1:
        raise UsageError(
            "--pid 1: PID 1 (init) never ends and every process descends from it, so the "
            "lock would let every process through and never be released; give the PID "
            "of the script that holds the lock"
        )
    flags = _stat_flags(pid)
    if flags is None or locks.pid_start(pid) is None:
        raise UsageError(f"--pid {pid}: no such process here (it has ended or never ran)")
    if flags & PF_KTHREAD:
        raise UsageError(f"--pid {pid}: a kernel thread, which never ends; give a process")
    return pid


def _stat_flags(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[6])
    except (OSError, ValueError, IndexError):
        return None


class Name(click.ParamType):
    """A package or node name (``NAME_PATTERN``, the whole string)."""

    name = "name"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> str:
        try:
            return check_name(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


NAME = Name()
