"""Reading ``/proc``: process state, process group, start time.

Only the standard library is imported here: the sentinel process uses this module.
Zombies count as gone everywhere: a dead process that its parent (or, for orphans,
an init that reaps lazily) has not collected yet runs no code and holds no resources
a service cares about.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

PROC = "/proc"
_DEAD_STATES = frozenset({"Z", "X", "x"})


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of ``/proc/PID/stat`` that vigil uses."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    session: int
    start_time: int  # field 22: clock ticks after boot; (pid, start_time) names a process

    @property
    def dead(self) -> bool:
        return self.state in _DEAD_STATES


def parse_stat(pid: int, text: str) -> ProcStat | None:
    """Parse one ``/proc/PID/stat`` line; ``comm`` may hold spaces and parentheses."""
    end = text.rfind(")")
    if end < 0:
        return None
    rest = text[end + 1 :].split()
    # rest[0] is field 3 (state), so field N is rest[N - 3].
    if len(rest) < 20:
        return None
    try:
        return ProcStat(
            pid=pid,
            state=rest[0],
            ppid=int(rest[1]),
            pgrp=int(rest[2]),
            session=int(rest[3]),
            start_time=int(rest[19]),
        )
    except ValueError:
        return None


def read_stat(pid: int) -> ProcStat | None:
    """``/proc/PID/stat``, or None if there is no such process."""
    try:
        with open(f"{PROC}/{pid}/stat", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:  # ENOENT, ESRCH: gone (or never was)
        return None
    return parse_stat(pid, text)


def start_time(pid: int) -> int | None:
    st = read_stat(pid)
    return None if st is None else st.start_time


def uid_of(pid: int) -> int | None:
    """The real uid of ``pid`` (``/proc/PID/status``), or None if it is gone."""
    try:
        with open(f"{PROC}/{pid}/status", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    st = read_stat(pid)
    return st is not None and not st.dead


def iter_stats() -> Iterator[ProcStat]:
    """Every process visible in ``/proc`` (processes that vanish meanwhile are skipped)."""
    try:
        names = os.listdir(PROC)
    except OSError:
        return
    for name in names:
        if name.isdigit():
            st = read_stat(int(name))
            if st is not None:
                yield st


def group_members(pgid: int, *, include_dead: bool = False) -> list[int]:
    """PIDs of the processes whose process group is ``pgid`` (zombies left out by default)."""
    return [st.pid for st in iter_stats() if st.pgrp == pgid and (include_dead or not st.dead)]


def leader_matches(pgid: int, recorded_start: int | None) -> bool:
    """Whether process group ``pgid`` can still be the group that was recorded.

    A PID number that is still in use as a process group ID is never given to a new
    process, so: if no process has PID ``pgid``, the processes left in the group are
    orphans of the recorded group; if one has and its start time differs from the
    recorded one, the number was reused and the group belongs to someone else.
    """
    st = read_stat(pgid)
    if st is None or recorded_start is None:
        return True
    return st.start_time == recorded_start
