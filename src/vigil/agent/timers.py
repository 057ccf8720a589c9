"""The controller's clock: elapsed time measured on its own node, monotonically.

Every time limit the controller enforces (``successor_halt_timeout``, the formation
bound, ``failure_timeout``) is measured with the monotonic clock of the node that
runs the controller, never by comparing wall-clock times written by other nodes (or
by itself before a clock step). Wall-clock times in the store are for display only.

Each limit has a deadline, and the controller keeps one timer for the earliest
(``Controller``): a limit runs out on time even when nothing else happens in the
cluster. A new controller knows nothing of its predecessor's clock: it counts each
limit from when it first saw the wait or the failure, so a limit may last longer
across a controller change (by at most the time already waited), never shorter.

Pure: no I/O; ``now`` (monotonic seconds) and ``wall`` (seconds since the epoch) are
parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from vigil.model import AdminRecord, Assignment
from vigil.snapshot import Snapshot


def earliest(deadlines: Iterable[float | None]) -> float | None:
    """The earliest of ``deadlines`` that is not None, or None."""
    known = [d for d in deadlines if d is not None]
    return min(known) if known else None


class PlacementClock:
    """Assignment ``since`` times in the controller's monotonic clock.

    In the store, ``Assignment.since`` is wall-clock time (display). The planner
    compares ``since`` with ``now`` (``successor_halt_timeout``), so the controller
    gives it monotonic times: an assignment this controller wrote (the record in the
    store is exactly the one it wrote) keeps the monotonic time it stood for; any
    other (written by an earlier controller) counts from when this one first saw it.
    """

    def __init__(self) -> None:
        self._known: dict[str, tuple[Assignment, float]] = {}  # pkg -> (stored, since)

    def localize(self, stored: Mapping[str, Assignment], now: float) -> dict[str, Assignment]:
        """``stored`` (as read from the store) with ``since`` in this clock."""
        out: dict[str, Assignment] = {}
        for pkg, a in stored.items():
            known = self._known.get(pkg)
            since = known[1] if known is not None and known[0] == a else now
            out[pkg] = a.model_copy(update={"since": since})
            self._known[pkg] = (a, since)
        return out

    def to_store(
        self,
        planned: Mapping[str, Assignment],
        stored: Mapping[str, Assignment],
        now: float,
        wall: float,
    ) -> dict[str, Assignment]:
        """The records to keep in the store for ``planned`` (``since`` in this clock):
        the stored record where only ``since`` would differ and means the same time,
        else a new one whose ``since`` is the same moment on the wall clock."""
        out: dict[str, Assignment] = {}
        for pkg, a in planned.items():
            old = stored.get(pkg)
            known = self._known.get(pkg)
            if (
                old is not None
                and known is not None
                and known[0] == old
                and known[1] == a.since
                and old.model_copy(update={"since": a.since}) == a
            ):
                record = old
            else:
                record = a.model_copy(update={"since": round(wall - (now - a.since), 3)})
            out[pkg] = record
            self._known[pkg] = (record, a.since)
        for pkg in set(self._known) - set(planned):
            del self._known[pkg]
        return out


class FailureClock:
    """``failure_timeout``: node switching that a failure turned off comes back on by
    itself once the package's ``failure_timeout`` has passed since the failure, as
    Pacemaker's failure-timeout expires a fail count.

    A failure is an entry of ``AdminRecord.failed_nodes`` (node -> the failure's
    wall-clock time, which only tells one failure from the next); its age is counted
    on this clock from when it was first seen here.
    """

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str, float], float] = {}  # (pkg, node, at) -> since

    def expired(self, snap: Snapshot, now: float) -> tuple[list[tuple[str, str]], float | None]:
        """The (package, node) failures whose timeout has passed at ``now``, and the
        earliest ``now`` at which the next one will (None: none pending)."""
        seen: dict[tuple[str, str, float], float] = {}
        due: list[tuple[str, str]] = []
        wake: float | None = None
        for pkg in sorted(snap.admin):
            admin: AdminRecord = snap.admin[pkg]
            spec = snap.packages.get(pkg)
            if spec is None or spec.failure_timeout is None:
                continue
            for node, at in sorted(admin.failed_nodes.items()):
                key = (pkg, node, at)
                first = seen[key] = self._seen.get(key, now)
                if now - first >= spec.failure_timeout:
                    due.append((pkg, node))
                else:
                    wake = earliest([wake, first + spec.failure_timeout])
        self._seen = seen  # failures that are gone are forgotten
        return due, wake
