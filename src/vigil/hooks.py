"""Cluster-wide hooks (CONCEPTS §6) and the pending flags that guarantee them (§5).

``[hooks]`` in cluster.toml lists executables for six phases: ``pre_restore`` /
``post_restore`` around every package start, ``pre_remove`` / ``post_remove`` around
every package halt, ``pre_delete`` / ``post_delete`` around removing packages from
the configuration (``vigil apply``). Each runs on the acting node as ``PATH PHASE``
with ``VIGIL_HOOK=PHASE``, ``VIGIL_NODE``, ``VIGIL_CLUSTER`` and, where there is one,
``VIGIL_PACKAGE``; each is bounded by ``hooks.timeout``. A hook that fails is
reported (log, event, exit status of ``vigil recover``); it does not stop the action.

Before the pre-hooks run, the acting node sets the pending flag ``!KIND`` on itself
(KIND = restore, remove, delete); once the post-hooks have run it clears it. A flag
still there when the node's agent starts means a crash came in between: the agent
runs the owed post-hooks by itself. ``!KIND!NODE`` on the acting node asks NODE to
run its own post-hooks too (``vigil apply`` asks every other up node after a
delete); NODE's agent runs them and clears the flag. ``vigil recover KIND`` runs
the post-hooks explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vigil.config import ClusterSpec
from vigil.supervise.command import run_command

if TYPE_CHECKING:
    from vigil.supervise.cgroup import Cgroup
    from vigil.supervise.sentinel import ProcessRegistry

KINDS = ("restore", "remove", "delete")


@dataclass(frozen=True)
class HookRun:
    path: str
    ok: bool
    detail: str  # one line: "PATH PHASE exited with status 1"


def configured(cluster: ClusterSpec | None, kind: str) -> bool:
    if cluster is None:
        return False
    return bool(getattr(cluster.hooks, f"pre_{kind}") or getattr(cluster.hooks, f"post_{kind}"))


def hook_env(
    cluster: ClusterSpec, node: str, phase: str, package: str | None, config_dir: str | None
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
    env.update(VIGIL_CLUSTER=cluster.name, VIGIL_NODE=node, VIGIL_HOOK=phase)
    if package is not None:
        env["VIGIL_PACKAGE"] = package
    if config_dir is not None:
        env["VIGIL_CONFIG"] = config_dir
    return env


async def run_phase(
    cluster: ClusterSpec,
    node: str,
    phase: str,
    *,
    package: str | None = None,
    config_dir: str | None = None,
    log_path: str | Path | None = None,
    registry: ProcessRegistry | None = None,
    cgroup: Cgroup | None = None,
) -> list[HookRun]:
    """Run every hook of ``phase`` in order; what each did. A hook that could not be
    started (missing, or a fenced node, which spawns nothing) has ``ok`` False.
    ``cgroup``: where to run them (the package's ``run`` leaf for a package's
    restore/remove hooks)."""
    runs: list[HookRun] = []
    env = hook_env(cluster, node, phase, package, config_dir)
    for path in getattr(cluster.hooks, phase):
        res = await run_command(
            [path, phase],
            env=env,
            timeout=cluster.hooks.timeout,
            log_path=log_path,
            registry=registry,
            cgroup=cgroup,
        )
        ok = res.exit_code == 0 and not res.timed_out
        runs.append(HookRun(path, ok, f"{path} {phase}: {res.describe(cluster.hooks.timeout)}"))
    return runs
