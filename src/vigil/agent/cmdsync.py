"""Rerun the cmdsync scripts of a lost node (CONCEPTS §7), as an agent duty.

- The controller gives every entry whose node is down to an up node (the least
  loaded, in cluster order) with ``launch`` set, in a transaction fenced on the
  entry's revision and on the leader key.
- Every agent launches the entries given to it: it marks the entry ``launch=False,
  by_agent=True`` (compare-and-swap, so it runs once), then starts the script with
  its original parameters, ``VIGIL_CMDSYNC_DESCRIPTOR`` and, for ``init`` scripts,
  ``VIGIL_CMDSYNC_MARKER`` (the last saved marker, -1 if none); ``run`` scripts start
  over. The script is a process group in the agent's registry, so it dies if the node
  fences itself or the agent dies; its output goes to ``STATE_DIR/NODE/log/cmdsync.log``.
- When such a script ends by itself, the entry is removed (an ``init`` script has
  normally cancelled it already). When it was killed by fencing or by the agent
  stopping, the entry stays: the node is down, so it is rerun elsewhere, or by this
  node's agent when it joins again (``on_join``: the scripts an earlier agent
  launched died with it).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vigil import cmdsync
from vigil.errors import SpawnError, StoreError
from vigil.model import CmdsyncEntry
from vigil.snapshot import encode
from vigil.store import Compare, Put
from vigil.supervise.spawner import Child, spawn, terminate_group

if TYPE_CHECKING:
    from vigil.agent.node import Agent
    from vigil.snapshot import Snapshot

log = logging.getLogger("vigil.cmdsync")

LEFTOVER_GRACE = 3.0


def log_path(agent: Agent) -> Path:
    return agent.log_dir / "cmdsync.log"


def script_env(agent: Agent, entry: CmdsyncEntry) -> dict[str, str]:
    """The agent's environment without VIGIL_*, plus what a rerun script is told."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
    env.update(
        VIGIL_CLUSTER=agent.cluster.name,
        VIGIL_NODE=agent.node,
        VIGIL_CMDSYNC_DESCRIPTOR=entry.descriptor,
    )
    if entry.mode == "init":
        env["VIGIL_CMDSYNC_MARKER"] = str(entry.marker)
    if agent.config_dir:
        env["VIGIL_CONFIG"] = agent.config_dir
    return env


def up_nodes(snap: Snapshot) -> list[str]:
    """Nodes that may take a script: up and not halted, in cluster order."""
    listed = list(snap.cluster.nodes) if snap.cluster and snap.cluster.nodes else []
    order = listed + sorted(n for n in snap.nodes if n not in listed)
    return [n for n in order if n in snap.nodes and not snap.node_halted(n)]


@dataclass
class _Run:
    """A script this agent launched; ``killed`` once fencing or shutdown killed it."""

    child: Child
    killed: bool = False

    def on_kill(self) -> None:
        self.killed = True


class CmdsyncDuty:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._seen = -1  # the snapshot revision last acted on completely
        self._running: dict[str, asyncio.Task[None]] = {}

    async def on_join(self) -> None:
        a = self.agent
        self._seen = -1
        for s in await cmdsync.list_entries(a.store, a.keys):
            e = s.entry
            if e.node != a.node or not e.by_agent or e.descriptor in self._running:
                continue
            log.info("cmdsync %s: its script died with this node's previous agent; rerun",
                     e.descriptor)  # fmt: skip
            new = e.model_copy(update={"launch": True, "reruns": e.reruns + 1})
            await cmdsync.put_if(a.store, a.keys, new, s.revision)

    async def tick(self, snap: Snapshot) -> None:
        if snap.revision == self._seen:
            return
        a = self.agent
        entries = await cmdsync.list_entries(a.store, a.keys)
        done = True
        if snap.controller == a.node:
            done = await self._reassign(snap, entries)
        for s in entries:
            if s.entry.node == a.node and s.entry.launch:
                done = await self._launch(s) and done
        if done:
            self._seen = snap.revision

    async def _reassign(self, snap: Snapshot, entries: list[cmdsync.Stored]) -> bool:
        if snap.cluster is None or snap.cluster.failover == "off":
            return True  # (a lone node left up after a loss still takes the scripts)
        revisions = {s.entry.descriptor: s.revision for s in entries}
        moved = cmdsync.reassign([s.entry for s in entries], up_nodes(snap))
        a = self.agent
        ok = True
        for desc, new in moved.items():
            key = a.keys.cmdsync(desc)
            res = await a.store.txn(
                [
                    Compare.mod_revision(key, revisions[desc]),
                    Compare(a.keys.controller, "create", "==", snap.controller_revision),
                    Compare.exists(a.keys.node(new.node)),
                ],
                [Put(key, encode(new))],
            )
            if res.succeeded:
                old = next(s.entry.node for s in entries if s.entry.descriptor == desc)
                log.info("cmdsync %s: node %s is down; rerun on %s (%s, marker %d)",
                         desc, old, new.node, new.mode, new.marker)  # fmt: skip
            ok = ok and res.succeeded
        return ok

    async def _launch(self, s: cmdsync.Stored) -> bool:
        a = self.agent
        e = s.entry
        if a.registry is None or not a.registry.may_spawn():
            return False
        started = e.model_copy(update={"launch": False, "by_agent": True})
        if not await cmdsync.put_if(a.store, a.keys, started, s.revision):
            return False  # changed meanwhile (cancelled, saved): look again next tick
        argv = [e.script, *e.params]
        try:
            child = spawn(argv, env=script_env(a, e), cwd="/", log_path=log_path(a))
        except SpawnError as exc:
            log.error("cmdsync %s: cannot rerun: %s; entry removed", e.descriptor, exc)
            await cmdsync.cancel(a.store, a.keys, e.descriptor)
            return True
        what = f"from marker {e.marker}" if e.mode == "init" else "from the beginning"
        log.info("cmdsync %s: rerunning %s %s (pid %d, rerun %d)",
                 e.descriptor, e.script, what, child.pid, e.reruns)  # fmt: skip
        run = _Run(child)
        a.registry.add(child, on_kill=run.on_kill)  # at once: a fence kills it from now on
        task = asyncio.create_task(self._watch(e.descriptor, run), name=f"cmdsync-{e.descriptor}")
        self._running[e.descriptor] = task
        task.add_done_callback(lambda _: self._running.pop(e.descriptor, None))
        return True

    async def _watch(self, descriptor: str, run: _Run) -> None:
        """Wait for a script this agent launched; remove its entry when it ends by
        itself (not when fencing or the agent stopping killed it)."""
        a = self.agent
        assert a.registry is not None
        rc = await run.child.wait()
        if await terminate_group(run.child, LEFTOVER_GRACE):
            a.registry.remove(run.child)
        if run.killed:
            log.warning("cmdsync %s: script killed with this node's processes; "
                        "its entry stays for a rerun", descriptor)  # fmt: skip
            return
        log.info("cmdsync %s: script ended (exit %s)", descriptor, rc)
        try:
            if await cmdsync.remove_own(a.store, a.keys, descriptor, a.node):
                log.info("cmdsync %s: entry removed (its script ended)", descriptor)
        except StoreError as exc:
            log.error("cmdsync %s: cannot remove the entry of the ended script: %s",
                      descriptor, exc)  # fmt: skip
