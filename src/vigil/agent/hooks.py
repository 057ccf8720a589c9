"""The agent's side of cluster hooks (see ``vigil.hooks``).

``around(kind, pkg)`` wraps a package start (restore) or halt (remove): the pending
flag ``!KIND`` on this node is set while at least one such action is between its
pre- and post-hooks. As a duty, on joining it runs the post-hooks that a crash left
owed (``!KIND`` found on this node), and every tick it runs the ones other nodes
asked of it (``!KIND!THIS-NODE`` on any node), clearing each flag afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from vigil import flags
from vigil.config import ClusterSpec
from vigil.hooks import KINDS, configured, run_phase
from vigil.snapshot import read_snapshot

if TYPE_CHECKING:
    from vigil.agent.node import Agent
    from vigil.snapshot import Snapshot
    from vigil.supervise.cgroup import Cgroup

log = logging.getLogger("vigil.agent")


class HookRunner:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._active = dict.fromkeys(KINDS, 0)
        self._owed = dict.fromkeys(KINDS, False)  # a post-hook could not run: keep the flag
        self._locks = {k: asyncio.Lock() for k in KINDS}

    def _cluster(self) -> ClusterSpec | None:
        snap = self.agent.snapshot
        return snap.cluster if snap is not None else None

    async def _phase(
        self,
        cluster: ClusterSpec,
        phase: str,
        pkg: str | None,
        why: str = "",
        cgroup: Cgroup | None = None,
    ) -> bool:
        """Run one phase here; False if this node could not run it (fenced)."""
        a = self.agent
        runs = await run_phase(
            cluster,
            a.node,
            phase,
            package=pkg,
            config_dir=a.config_dir,
            log_path=a.log_dir / "hooks.log",
            registry=a.registry,
            cgroup=cgroup,
        )
        for r in runs:
            if r.ok:
                log.info("hook %s%s", r.detail, why)
            else:
                log.warning("hook %s%s", r.detail, why)
        return a.registry is None or a.registry.may_spawn()

    @contextlib.asynccontextmanager
    async def around(
        self, kind: str, pkg: str, cgroup: Cgroup | None = None
    ) -> AsyncIterator[None]:
        """Run the pre- and post-hooks of ``kind`` around the body (in ``cgroup``, the
        package's ``run`` leaf, so what they leave is the package's)."""
        cluster = self._cluster()
        if cluster is None or not configured(cluster, kind):
            yield
            return
        a = self.agent
        async with self._locks[kind]:
            self._active[kind] += 1
            if self._active[kind] == 1:
                await flags.create(a.store, a.keys, a.node, flags.pending(kind), a.node)
        ran = False
        try:
            await self._phase(cluster, f"pre_{kind}", pkg, cgroup=cgroup)
            yield
        finally:
            try:
                ran = await self._phase(cluster, f"post_{kind}", pkg, cgroup=cgroup)
            finally:
                async with self._locks[kind]:
                    self._active[kind] -= 1
                    self._owed[kind] = self._owed[kind] or not ran
                    if self._active[kind] == 0 and not self._owed[kind]:
                        await flags.remove(a.store, a.keys, a.node, flags.pending(kind))

    async def on_join(self) -> None:
        """Run the post-hooks a crash (or a fence) of this node left owed."""
        a = self.agent
        snap = await read_snapshot(a.store, a.keys)
        if snap.cluster is None:
            return
        for kind in KINDS:
            flag = flags.pending(kind)
            if not snap.has_flag(a.node, flag) or self._active[kind]:
                continue
            log.warning("flag %s found on %s: running the owed post_%s hooks", flag, a.node, kind)
            if await self._phase(snap.cluster, f"post_{kind}", None, " (owed after a crash)"):
                self._owed[kind] = False
                await flags.remove(a.store, a.keys, a.node, flag)

    async def tick(self, snap: Snapshot) -> None:
        """Run the post-hooks other nodes asked of this one (``!KIND!THIS-NODE``)."""
        if snap.cluster is None:
            return
        a = self.agent
        for kind in KINDS:
            flag = flags.pending(kind, a.node)
            for node, named in snap.flags.items():
                if flag not in named:
                    continue
                why = f" (asked by {node})"
                if await self._phase(snap.cluster, f"post_{kind}", None, why):
                    await flags.remove(a.store, a.keys, node, flag)
