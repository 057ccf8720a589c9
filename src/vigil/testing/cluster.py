"""LocalCluster: a real vigil cluster on one host for tests and benchmarks.

Agents are real ``vigild`` processes, the store is a real SQLite file, commands are
the real ``vigil`` CLI. Nothing is mocked::

    with LocalCluster(tmp_path, nodes=["n1"]) as c:
        c.write_package('name = "web"\\n[[service]]\\nname = "s"\\ncommand = ["sleep", "100"]')
        c.apply()
        c.start_agents()
        c.wait(lambda v: v["packages"]["web"]["state"] == "running")
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from vigil.keys import Keys
from vigil.snapshot import read_snapshot
from vigil.store import open_store
from vigil.view import cluster_view

View = dict[str, Any]


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


class LocalCluster:
    def __init__(
        self,
        root: Path,
        nodes: list[str] | None = None,
        *,
        name: str = "test",
        node_timeout: str = "3s",
        extra_cluster: str = "",
    ) -> None:
        self.root = root
        self.nodes = nodes or ["node1"]
        self.name = name
        self.config = root / "config"
        (self.config / "packages").mkdir(parents=True, exist_ok=True)
        (self.config / "scripts").mkdir(exist_ok=True)
        self.logs = root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.db = root / "store.db"
        node_list = ", ".join(f'"{n}"' for n in self.nodes)
        (self.config / "cluster.toml").write_text(
            f'name = "{name}"\nstore = "sqlite:///{self.db}"\nnode_timeout = "{node_timeout}"\n'
            f'nodes = [{node_list}]\nstate_dir = "{root}/state"\n{extra_cluster}'
        )
        self.agents: dict[str, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------ config

    def write_package(self, text: str, filename: str | None = None) -> Path:
        text = textwrap.dedent(text)
        if filename is None:
            first = next(line for line in text.splitlines() if line.startswith("name"))
            filename = first.split("=", 1)[1].strip().strip('"') + ".toml"
        path = self.config / "packages" / filename
        path.write_text(text)
        return path

    def write_script(self, name: str, body: str, mode: int = 0o755) -> Path:
        path = self.config / "scripts" / name
        path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
        path.chmod(mode)
        return path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
        env["VIGIL_CONFIG"] = str(self.config)
        env.update(extra)
        return env

    def vigil(
        self, *args: str, check: bool = True, timeout: float = 60, **env: str
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [_bin("vigil"), *args],
            capture_output=True,
            text=True,
            env=self.env(**env),
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"vigil {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def apply(self) -> subprocess.CompletedProcess[str]:
        return self.vigil("--node", self.nodes[0], "apply", str(self.config))

    # ------------------------------------------------------------------ agents

    def start_agent(self, node: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{node}.log").open("ab")
        proc = subprocess.Popen(
            [_bin("vigild"), "--node", node, "--config", str(self.config), "--log-level", "debug"],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=self.env(),
            start_new_session=True,
        )
        log.close()
        self.agents[node] = proc
        return proc

    def start_agents(self) -> None:
        for n in self.nodes:
            self.start_agent(n)

    def kill_agent(self, node: str, sig: int = signal.SIGKILL) -> None:
        proc = self.agents[node]
        proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            proc.wait(timeout=60)

    def stop_agent(self, node: str, timeout: float = 60) -> int:
        proc = self.agents.pop(node)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()

    def agent_log(self, node: str) -> str:
        path = self.logs / f"{node}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------------ observing

    def view(self) -> View:
        """What ``vigil status --json`` shows, read straight from the store (fast to poll)."""

        async def go() -> View:
            store = open_store(f"sqlite:///{self.db}")
            try:
                return cluster_view(await read_snapshot(store, Keys(self.name)))
            finally:
                await store.close()

        return asyncio.run(go())

    def status_json(self) -> View:
        """``vigil status --json`` through the real CLI."""
        out: View = json.loads(self.vigil("status", "--json").stdout)
        return out

    def package(self, pkg: str) -> dict[str, Any]:
        p: dict[str, Any] = self.view()["packages"][pkg]
        return p

    def wait(self, pred: Callable[[View], bool], timeout: float = 20, what: str = "") -> View:
        deadline = time.monotonic() + timeout
        last: View = {}
        while True:
            try:
                last = self.view()
                if pred(last):
                    return last
            except (KeyError, TypeError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what or pred}; last view:\n"
                    + json.dumps(last.get("packages", last), indent=1)
                    + "\n"
                    + "\n".join(self.agent_log(n)[-3000:] for n in self.nodes)
                )
            time.sleep(0.05)

    def wait_state(self, pkg: str, state: str, timeout: float = 20) -> dict[str, Any]:
        view = self.wait(
            lambda v: v["packages"][pkg]["state"] == state, timeout, f"{pkg} to be {state}"
        )
        p: dict[str, Any] = view["packages"][pkg]
        return p

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        for node in list(self.agents):
            self.stop_agent(node)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
