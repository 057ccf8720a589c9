"""One package on this node: the start and halt sequences of CONCEPTS §3.

Start order: pre-scripts → addresses → external scripts → services → monitors.
Halt order is the exact reverse. A failed start step is undone, together with the
steps done before it, in reverse (``stop`` is idempotent, so the failed step's own
``stop`` runs too, as Serviceguard does), with halt reason ``failure``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vigil.config import AddressSpec, ClusterSpec, PackageSpec, ScriptRef, ServiceSpec
from vigil.model import HaltReason, MonitorStatus, ServiceStatus, StartReason
from vigil.scripts.runner import run_script
from vigil.supervise.monitor import MonitorRunner, MonitorVerdict
from vigil.supervise.sentinel import ProcessRegistry, del_addresses
from vigil.supervise.service import ServiceSupervisor

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
    start_reason: StartReason = StartReason.BOOT
    previous_node: str | None = None
    halt_reason: HaltReason | None = None

    def env(self, action: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
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
        )
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
        )
        if res.exit_code != 0:
            what = "timed out" if res.timed_out else (res.error or f"exited {res.exit_code}")
            log.error("package %s: %s stop %s", self.ctx.spec.name, self.ref.path, what)
            return False
        return True


async def _ip(*args: str) -> tuple[int, str]:
    exe = shutil.which("ip") or "/sbin/ip"
    proc = await asyncio.create_subprocess_exec(
        exe, *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    return proc.returncode or 0, err.decode(errors="replace").strip()


GARP_COUNT = 3  # gratuitous ARPs, one a second (keepalived sends 5 at once, 5 more later)


def _already_there(err: str) -> bool:
    """``ip addr add`` failed because the address is already on the interface (EEXIST:
    "File exists" from older kernels, "Address already assigned" from newer ones)."""
    return "File exists" in err or "already assigned" in err


class AddressStep:
    """A relocatable address: added on start, removed on halt. Gratuitous ARP (where
    ``arping`` is installed) goes out in the background, so the next step (the
    service) starts at once instead of waiting for arping's one-second interval."""

    def __init__(self, ctx: Context, addr: AddressSpec) -> None:
        self.ctx = ctx
        self.addr = addr
        self.label = f"address {addr.ip} on {addr.interface}"
        self._garp: asyncio.subprocess.Process | None = None
        self._reaper: asyncio.Task[int] | None = None

    async def up(self) -> StepResult:
        rc, err = await _ip("addr", "add", self.addr.ip, "dev", self.addr.interface)
        if rc != 0 and not _already_there(err):
            return StepResult(Outcome.FAILOVER, f"{self.label}: {err or f'ip exited {rc}'}")
        # from now on, whoever kills this node's processes also removes the address
        self.ctx.registry.add_address(self.addr.ip, self.addr.interface)
        arping = shutil.which("arping")
        if arping and ":" not in self.addr.ip:
            ip = self.addr.ip.split("/")[0]
            self._garp = await asyncio.create_subprocess_exec(
                arping, "-U", "-c", str(GARP_COUNT), "-I", self.addr.interface, ip,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            self._reaper = asyncio.create_task(self._garp.wait())  # reaps it when it ends
        return StepResult(Outcome.OK)

    async def down(self) -> bool:
        if self._garp is not None and self._garp.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._garp.kill()  # the address leaves: no more announcements for it
        if self._reaper is not None:
            await self._reaper
        self._garp = self._reaper = None
        rc, err = await _ip("addr", "del", self.addr.ip, "dev", self.addr.interface)
        if rc != 0 and "Cannot assign" not in err and "not found" not in err.lower():
            log.error("package %s: %s: %s", self.ctx.spec.name, self.label, err)
            return False
        self.ctx.registry.remove_address(self.addr.ip, self.addr.interface)
        return True

    def abandon(self) -> None:
        """This node no longer holds the package (owner key lost): the address goes
        now, like its processes, without waiting for a halt."""
        if (self.addr.ip, self.addr.interface) in self.ctx.registry.addresses():
            del_addresses([(self.addr.ip, self.addr.interface)])
            self.ctx.registry.remove_address(self.addr.ip, self.addr.interface)


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
        self.supervisor = ServiceSupervisor(
            spec,
            env=ctx.env("start"),
            log_path=ctx.log_path,
            registry=ctx.registry,
            on_change=on_change,
            on_failed=lambda reason: on_failed(spec.name, reason),
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
            )
        self.monitor_step: MonitorStep | None = None
        if self.monitors:
            self.monitor_step = MonitorStep(ctx, list(self.monitors.values()), list(self.monitors))
            self.steps.append(self.monitor_step)
        self.done = 0  # how many steps (from the front) have been started

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
        """Run the halt sequence over the started steps, in exact reverse. True if all ok."""
        ok = True
        while self.done > 0:
            step = self.steps[self.done - 1]
            log.info("package %s: halt %s", self.ctx.spec.name, step.label)
            if not await step.down():
                ok = False
            self.done -= 1
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
