"""Helpers for vigil's own tests: wait for a condition with a deadline, a fake clock.

Tests never bare-sleep to wait for something to happen: they poll a predicate
with ``wait_for`` so that a fast machine is fast and a slow one still passes.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

__all__ = ["FakeClock", "wait_for", "wait_until", "wait_until_sync"]


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 5.0,
    *,
    interval: float = 0.01,
    what: str = "",
) -> None:
    """Poll ``predicate`` (sync or async) until it is true; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            described = what or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"condition not met within {timeout} s: {described}")
        await asyncio.sleep(interval)


class FakeClock:
    """A monotonic clock that only moves when told to: ``MemoryStore(clock=FakeClock())``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self.now += seconds


async def wait_until(
    predicate: Callable[[], bool],
    timeout: float = 5.0,
    interval: float = 0.01,
    what: str = "",
) -> None:
    """Poll the sync ``predicate`` on the event loop; AssertionError after ``timeout`` s."""
    await wait_for(predicate, timeout, interval=interval, what=what)


def wait_until_sync(
    predicate: Callable[[], bool],
    timeout: float = 5.0,
    interval: float = 0.01,
    what: str = "",
) -> None:
    """The blocking twin of :func:`wait_until`, for code outside an event loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            described = what or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"condition not met within {timeout} s: {described}")
        time.sleep(interval)
