"""A fence that lands while a start is being claimed (found by the fault lab, seed 300)."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

from vigil.agent.node import Agent
from vigil.config import ClusterSpec
from vigil.store import MemoryStore


def test_fence_before_a_claim_task_ran_forgets_the_claim(tmp_path: Path) -> None:
    """The claim task is cancelled before its first step, so its own cleanup never
    runs: the fence must forget the claim, or this node skips the package for good
    (the next assignment to it is never acted on), and must close the coroutine."""

    async def main() -> None:
        cluster = ClusterSpec(name="c", store="memory://")
        agent = Agent(MemoryStore(), cluster, "n1", state_dir=tmp_path)
        ran: list[str] = []

        async def start() -> None:
            ran.append("start")

        agent._claiming.add("web")
        agent._claim_tasks["web"] = agent._launch("web", start())
        agent._fence("test: lease lost during the claim")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert ran == []  # the start did not go on
        assert "web" not in agent._claiming  # the next START of web is acted on
        assert agent._claim_tasks == {}

    asyncio.run(main())
    gc.collect()  # a never-awaited coroutine would warn here (warnings are errors)
