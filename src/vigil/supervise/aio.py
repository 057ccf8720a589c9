"""Small asyncio helpers that behave under cancellation.

Python 3.11's ``asyncio.wait_for`` swallows a cancellation that arrives just as the
awaited thing completes (fixed in 3.12), which can leave a "cancelled" task running
forever. vigil uses ``asyncio.timeout`` instead, and stops tasks with
:func:`cancel_and_wait`, which insists until the task is really done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any], *, retry: float = 0.5) -> None:
    """Cancel ``task`` and wait until it has finished (re-cancelling every ``retry`` s).

    The task's own result or exception is not raised here; a cancellation of the
    caller still propagates.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=retry)


async def poll_until(
    done: Callable[[], bool], timeout: float, *, first: float = 0.002, cap: float = 0.05
) -> bool:
    """Poll ``done()`` until it is true or ``timeout`` s have passed, sleeping ``first``
    s, then twice as long each time up to ``cap`` s (a process group or a cgroup
    usually empties within milliseconds of SIGKILL). True if ``done()`` became true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    interval = first
    while not done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(interval, remaining))
        interval = min(interval * 2, cap)
    return True
