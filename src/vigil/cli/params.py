"""Option types shared by the commands, checked before anything is done.

- ``SECONDS``: a finite number of seconds from 0 to ``MAX_DURATION`` (``nan``, ``inf``
  and ``1e308`` are refused: a deadline that never passes would wait forever);
- ``SafePath``: ``click.Path`` without NUL;
- ``NAME``: a package or node name, exactly (no trailing newline, no control character);
- ``live_pid``: a PID that names a live process here that a lock can belong to.
"""

from __future__ import annotations

import math
import os
from typing import Any

import click

from vigil.config import MAX_DURATION, check_name, format_duration
from vigil.errors import UsageError
from vigil.supervise import procfs


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
    st = procfs.read_stat(pid)
    if st is None or st.dead:
        raise UsageError(f"--pid {pid}: no such process here (it has ended or never ran)")
    if st.session == 0:  # kernel threads have no session
        raise UsageError(f"--pid {pid}: a kernel thread, which never ends; give a process")
    return pid


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


class SafePath(click.Path):
    """``click.Path`` that refuses NUL (no system call can take it) in one line."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str | bytes) and "\0" in os.fsdecode(value):
            self.fail("NUL (\\u0000) is not allowed in a path", param, ctx)
        return super().convert(value, param, ctx)
