"""Side duties of a node agent, beside running packages.

A duty is told when the agent has joined the cluster (``on_join``: e.g. run the
post-hooks a crash left owed) and then ticks about every ``DUTY_INTERVAL`` seconds
with the agent's newest snapshot (e.g. release admin locks whose holder is gone,
rerun cmdsync scripts of a lost node). Duties run in one task of their own: a slow
or failing duty never holds up reconciling packages or renewing the lease.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from vigil.errors import StoreError

if TYPE_CHECKING:
    from vigil.agent.node import Agent
    from vigil.snapshot import Snapshot

log = logging.getLogger("vigil.agent")

DUTY_INTERVAL = 0.5


class Duty(Protocol):
    async def on_join(self) -> None: ...

    async def tick(self, snap: Snapshot) -> None: ...


def default_duties(agent: Agent) -> list[Duty]:
    from vigil.agent.cmdsync import CmdsyncDuty
    from vigil.agent.housekeeping import Housekeeping
    from vigil.agent.logrotate import LogRotation
    from vigil.agent.waits import WaitEdgeCleanup

    return [Housekeeping(agent), CmdsyncDuty(agent), WaitEdgeCleanup(agent), LogRotation(agent)]


async def run_on_join(duties: list[Duty]) -> None:
    for duty in duties:
        try:
            await duty.on_join()
        except StoreError as exc:
            log.warning("%s on join: %s", type(duty).__name__, exc)
        except Exception:
            log.exception("%s on join failed", type(duty).__name__)


async def duty_loop(agent: Agent, duties: list[Duty]) -> None:
    """Tick every duty with the newest snapshot, forever."""
    while True:
        snap = agent.snapshot
        if snap is not None:
            for duty in duties:
                try:
                    await duty.tick(snap)
                except StoreError as exc:
                    log.warning("%s: %s", type(duty).__name__, exc)
                except Exception:
                    log.exception("%s failed", type(duty).__name__)
        await asyncio.sleep(DUTY_INTERVAL)
