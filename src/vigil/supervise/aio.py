"""Small asyncio helpers that behave under cancellation.

Python 3.11's ``asyncio.wait_for`` swallows a cancellation that arrives just as the
awaited thing completes (fixed in 3.12), which can leave a "cancelled" task running
forever. vigil uses ``asyncio.timeout`` instead, and stops tasks with
:func:`cancel_and_wait`, which insists until the task is really done.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any], *, retry: float = 0.5) -> None:
    """Cancel ``task`` and wait until it has finished (re-cancelling every ``retry`` s).

    The task's own result or exception is not raised here; a cancellation of the
    caller still propagates.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=retry)
