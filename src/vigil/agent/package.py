"""One package on this node: the start and halt sequences of CONCEPTS §3.

Start order: pre-scripts → addresses → external scripts → services → monitors.
Halt order is the exact reverse, and a halt ends with the package's final sweep
(:meth:`~vigil.supervise.containment.PackageScope.sweep`): whatever is still in the
package's cgroup (a script's daemon, a service's stray child) gets SIGTERM, then
SIGKILL after the package's ``halt_timeout``; a halt never ends ``halted`` while a
process of the package is left. A failed start step is undone, together with the
steps done before it, in reverse (``stop`` is idempotent, so the failed step's own
``stop`` runs too, as Serviceguard does), with halt reason ``failure``.

Every process runs in the package's cgroup (:mod:`vigil.supervise.containment`):
a service in its own leaf, scripts, monitors and hooks in ``run``. What an external
script's ``start`` leaves running (``nohup app &``) belongs to the package and runs
until the package halts.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vigil.config import AddressSpec, ClusterSpec, PackageSpec, ScriptRef, ServiceSpec
from vigil.errors import SpawnError
from vigil.model import HaltReason, MonitorStatus, ServiceStatus, StartReason
from vigil.scripts.runner import run_script
from vigil.supervise.command import run_captured, run_command
from vigil.supervise.containment import PackageScope
from vigil.supervise.monitor import MonitorRunner, MonitorVerdict
from vigil.supervise.sentinel import ProcessRegistry
from vigil.supervise.service import ServiceSupervisor
from vigil.supervise.spawner import resolve_identity

log = logging.getLogger("vigil.package")


class Outcome(enum.StrEnum):
    OK = "ok"
    HALT = "halt"  # start exit 1 or timeout: halt, no restart anywhere
    FAILOVER = "failover"  # start exit 2: halt here, try the next node


@dataclass(frozen=True)
class StepResult:
    outcome: Outcome
    detail: str = ""


class Step(Protocol):
    label: str

    async def up(self) -> StepResult: ...

    async def down(self) -> bool: ...


@dataclass
class Context:
    """Everything a step needs to run a process for the package."""

    cluster: ClusterSpec
    spec: PackageSpec
    node: str
    log_path: Path
    registry: ProcessRegistry
    config_dir: str | None
    scope: PackageScope
    start_reason: StartReason = StartReason.BOOT
    previous_node: str | None = None
    halt_reason: HaltReason | None = None

    def env(self, action: str, identity: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a process of the package: the agent's (without its
        VIGIL_*), then ``identity`` (HOME, USER, LOGNAME, SHELL of a service's
        ``user``), then the package's ``[env]``, then the VIGIL_* variables."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
        env.update(identity or {})
        env.update(self.spec.env)
        env.update(
            VIGIL_CLUSTER=self.cluster.name,
            VIGIL_PACKAGE=self.spec.name,
            VIGIL_NODE=self.node,
            VIGIL_ACTION=action,
            VIGIL_START_REASON=self.start_reason.value,
        )
        if self.previous_node:
            env["VIGIL_PREVIOUS_NODE"] = self.previous_node
        if action == "stop" and self.halt_reason is not None:
            env["VIGIL_HALT_REASON"] = self.halt_reason.value
        if self.config_dir:
            env["VIGIL_CONFIG"] = self.config_dir
        return env


class ScriptStep:
    def __init__(self, ctx: Context, ref: ScriptRef, kind: str) -> None:
        self.ctx = ctx
        self.ref = ref
        self.label = f"{kind} {ref.path}"

    async def up(self) -> StepResult:
        res = await run_script(
            self.ref,
            "start",
            env=self.ctx.env("start"),
            timeout=self.ctx.spec.run_script_timeout,
            log_path=self.ctx.log_path,
            registry=self.ctx.registry,
            cgroup=self.ctx.scope.run(),
            keep_leftovers=True,
        )
        if res.left is not None:  # a daemon it started: the package's until it halts
            self.ctx.scope.keep(res.left)
        if res.timed_out:
            return StepResult(Outcome.HALT, f"{self.label} start timed out")
        if res.exit_code == 0:
            return StepResult(Outcome.OK)
        if res.exit_code == 2:
            return StepResult(Outcome.FAILOVER, f"{self.label} start exited 2")
        detail = res.error or f"{self.label} start exited {res.exit_code}"
        return StepResult(Outcome.HALT, detail)

    async def down(self) -> bool:
        res = await run_script(
            self.ref,
            "stop",
            env=self.ctx.env("stop"),
            timeout=self.ctx.spec.halt_script_timeout,
            log_path=self.ctx.log_path,
            registry=self.ctx.registry,
            cgroup=self.ctx.scope.run(),
            keep_leftovers=True,
        )
        if res.left is not None:
            self.ctx.scope.keep(res.left)
        if res.exit_code != 0:
            what = "timed out" if res.timed_out else (res.error or f"exited {res.exit_code}")
            log.error("package %s: %s stop %s", self.ctx.spec.name, self.ref.path, what)
            return False
        return True


#: How long one ``ip`` command may take before it counts as failed.
IP_TIMEOUT = 5.0
GARP_COUNT = 3  # gratuitous ARPs at once, one a second (keepalived sends 5, then 5 more)
#: While an address is held, one more gratuitous ARP this often (keepalived's
#: ``garp_master_refresh``, IPaddr2's ARP refresh): a host that missed the first ones
#: (it was on the other side of a partition) corrects its neighbour entry within this.
GARP_REFRESH = 5.0


async def ip_command(registry: ProcessRegistry | None, *args: str) -> tuple[int, str]:
    """Run ``ip ARGS`` through the spawner with :data:`IP_TIMEOUT`: (exit status, output).
    A timeout or a failure to start is status -1 with the reason as output."""
    exe = shutil.which("ip") or "/sbin/ip"
    res, out = await run_captured([exe, *args], timeout=IP_TIMEOUT, registry=registry)
    if res.exit_code is None or res.timed_out:
        return -1, res.describe(IP_TIMEOUT)
    return res.exit_code, out


def _already_there(err: str) -> bool:
    """``ip addr add`` failed because the address is already on the interface (EEXIST:
    "File exists" from older kernels, "Address already assigned" from newer ones)."""
    return "File exists" in err or "already assigned" in err


def _not_there(err: str) -> bool:
    return "Cannot assign" in err or "not found" in err.lower()


async def del_address(registry: ProcessRegistry, ip: str, dev: str) -> bool:
    """Remove a relocatable address (no error if it is not there); once it is gone the
    sentinel forgets it. False (logged) if ``ip`` failed: the sentinel still knows it."""
    rc, err = await ip_command(registry, "addr", "del", ip, "dev", dev)
    if rc != 0 and not _not_there(err):
        log.error("cannot remove address %s from %s: %s", ip, dev, err or f"ip exited {rc}")
        return False
    registry.remove_address(ip, dev)
    return True


class AddressStep:
    """A relocatable address: added on start, removed on halt. Gratuitous ARPs (where
    ``arping`` is installed) go out in the background: :data:`GARP_COUNT` at once, so
    the next step (the service) starts without waiting for arping's one-second
    interval, then one every :data:`GARP_REFRESH` s while the address is held."""

    def __init__(self, ctx: Context, addr: AddressSpec) -> None:
        self.ctx = ctx
        self.addr = addr
        self.label = f"address {addr.ip} on {addr.interface}"
        self._garp: asyncio.Task[None] | None = None

    async def up(self) -> StepResult:
        ip, dev = self.addr.ip, self.addr.interface
        # Registered before it is added: a fence (or the agent's death) during the
        # ``ip`` command must remove it too.
        self.ctx.registry.add_address(ip, dev)
        rc, err = await ip_command(self.ctx.registry, "addr", "add", ip, "dev", dev)
        if rc != 0 and not _already_there(err):
            await del_address(self.ctx.registry, ip, dev)
            return StepResult(Outcome.FAILOVER, f"{self.label}: {err or f'ip exited {rc}'}")
        arping = shutil.which("arping")
        if arping and ":" not in ip:
            self._garp = asyncio.create_task(self._announce(arping), name=f"garp:{ip}")
        return StepResult(Outcome.OK)

    async def _announce(self, arping: str) -> None:
        ip, dev = self.addr.ip.split("/")[0], self.addr.interface
        registry = self.ctx.registry
        env = dict(os.environ)
        res = await run_command(
            [arping, "-q", "-U", "-c", str(GARP_COUNT), "-I", dev, ip],
            env=env, timeout=GARP_COUNT + IP_TIMEOUT, registry=registry,
        )  # fmt: skip
        if res.exit_code not in (0, 1):  # 2: no ARP on this interface (lo), or no arping
            log.info("package %s: no gratuitous ARP for %s: %s", self.ctx.spec.name,
                     self.label, res.describe())  # fmt: skip
            return
        while True:  # arping runs until the address leaves; restarted if it dies
            res = await run_command(
                [arping, "-q", "-U", "-i", f"{GARP_REFRESH:g}", "-I", dev, ip],
                env=env, timeout=None, registry=registry,
            )  # fmt: skip
            if res.exit_code is None:  # cannot start it (fenced): stop announcing
                return
            await asyncio.sleep(GARP_REFRESH)

    async def _stop_announcing(self) -> None:
        task, self._garp = self._garp, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def down(self) -> bool:
        await self._stop_announcing()  # the address leaves: no more announcements for it
        return await del_address(self.ctx.registry, self.addr.ip, self.addr.interface)

    async def abandon(self) -> None:
        """This node no longer holds the package (owner key lost): the address goes
        now, like its processes, without waiting for a halt."""
        await self._stop_announcing()
        if (self.addr.ip, self.addr.interface) in self.ctx.registry.addresses():
            await del_address(self.ctx.registry, self.addr.ip, self.addr.interface)


class ServiceStep:
    def __init__(
        self,
        ctx: Context,
        spec: ServiceSpec,
        on_change: Callable[[], None],
        on_failed: Callable[[str, str], None],
    ) -> None:
        self.ctx = ctx
        self.spec = spec
        self.label = f"service {spec.name}"
        try:
            identity = resolve_identity(spec.user, spec.group)
        except SpawnError:
            identity = None  # the spawn says so, with the package's other errors
        self.supervisor = ServiceSupervisor(
            spec,
            env=ctx.env("start", identity.env if identity is not None else None),
            log_path=ctx.log_path,
            registry=ctx.registry,
            on_change=on_change,
            on_failed=lambda reason: on_failed(spec.name, reason),
            cgroup=ctx.scope.service(spec.name),
        )

    async def up(self) -> StepResult:
        try:
            await self.supervisor.start()
        except Exception as exc:  # SpawnError and OS errors: the step failed
            text = str(exc)
            return StepResult(
                Outcome.HALT, text if text.startswith(self.label) else f"{self.label}: {text}"
            )
        return StepResult(Outcome.OK)

    async def down(self) -> bool:
        return await self.supervisor.stop()


class MonitorStep:
    def __init__(self, ctx: Context, runners: list[MonitorRunner], names: list[str]) -> None:
        self.ctx = ctx
        self.runners = runners
        self.label = "monitors " + ",".join(names)
        self.running = False

    async def up(self) -> StepResult:
        for r in self.runners:
            r.start()
        self.running = True
        return StepResult(Outcome.OK)

    async def down(self) -> bool:
        self.running = False
        for r in self.runners:
            await r.stop()
        return True


class PackageRunner:
    """Runs one package's steps. The agent owns the state; this object does the work."""

    def __init__(
        self,
        ctx: Context,
        *,
        on_change: Callable[[], None],
        on_service_failed: Callable[[str, str], None],
        on_monitor: Callable[[str, MonitorVerdict], None],
    ) -> None:
        self.ctx = ctx
        spec = ctx.spec
        self.steps: list[Step] = []
        self.steps += [ScriptStep(ctx, r, "pre-script") for r in spec.external_pre_script]
        self.steps += [AddressStep(ctx, a) for a in spec.address]
        self.steps += [ScriptStep(ctx, r, "script") for r in spec.external_script]
        self.services = [ServiceStep(ctx, s, on_change, on_service_failed) for s in spec.service]
        self.steps += self.services
        self.monitors: dict[str, MonitorRunner] = {}
        for m in spec.monitor:
            self.monitors[m.name] = MonitorRunner(
                m,
                env=ctx.env("monitor"),
                log_path=ctx.log_path,
                registry=ctx.registry,
                on_result=lambda v: on_monitor(v.monitor, v),
                cgroup=ctx.scope.run(),
            )
        self.monitor_step: MonitorStep | None = None
        if self.monitors:
            self.monitor_step = MonitorStep(ctx, list(self.monitors.values()), list(self.monitors))
            self.steps.append(self.monitor_step)
        self.done = 0  # how many steps (from the front) have been started
        self.problem = ""  # why the last halt failed

    async def start(self) -> StepResult:
        """Run the start sequence. On failure the done steps are undone; see module doc."""
        for i, step in enumerate(self.steps):
            log.info("package %s: start %s", self.ctx.spec.name, step.label)
            res = await step.up()
            if res.outcome is not Outcome.OK:
                log.error("package %s: %s", self.ctx.spec.name, res.detail)
                self.done = i + 1 if isinstance(step, ScriptStep) else i
                self.ctx.halt_reason = HaltReason.FAILURE
                ok = await self.halt()
                if not ok:
                    return StepResult(Outcome.HALT, res.detail + "; undo failed")
                return res
            self.done = i + 1
        return StepResult(Outcome.OK)

    async def halt(self) -> bool:
        """Run the halt sequence over the started steps, in exact reverse, then sweep
        what is left of the package. True if all went well; else :attr:`problem`
        says what failed."""
        ok = True
        self.problem = ""
        while self.done > 0:
            step = self.steps[self.done - 1]
            log.info("package %s: halt %s", self.ctx.spec.name, step.label)
            if not await step.down():
                ok = False
                self.problem = self.problem or f"{step.label}: stop failed"
            self.done -= 1
        survivors = await self.ctx.scope.sweep(self.ctx.spec.halt_timeout)
        if survivors:
            ok = False
            self.problem = self.problem or (
                "processes of the package survived SIGKILL: "
                + " ".join(str(p) for p in survivors if p)
            )
        return ok

    async def pause_monitors(self) -> None:
        if self.monitor_step and self.monitor_step.running:
            await self.monitor_step.down()

    async def resume_monitors(self) -> None:
        if self.monitor_step and not self.monitor_step.running and self.done == len(self.steps):
            await self.monitor_step.up()

    def service_status(self) -> dict[str, ServiceStatus]:
        return {
            s.spec.name: ServiceStatus(
                pid=s.supervisor.pid,
                restarts=s.supervisor.restarts,
                state=str(s.supervisor.state.value),
            )
            for s in self.services
        }

    def monitor_status(self, verdicts: dict[str, MonitorStatus]) -> dict[str, MonitorStatus]:
        return {name: verdicts.get(name, MonitorStatus()) for name in self.monitors}
