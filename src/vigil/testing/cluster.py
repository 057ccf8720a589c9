"""LocalCluster: a real vigil cluster on one host for tests and benchmarks.

Agents are real ``vigild`` processes, the store is a real SQLite file (or any store
URL, e.g. an etcd cluster started by the test), commands are the real ``vigil`` CLI.
Nothing is mocked::

    with LocalCluster(tmp_path, nodes=["n1"]) as c:
        c.write_package('name = "web"\\n[[service]]\\nname = "s"\\ncommand = ["sleep", "100"]')
        c.apply()
        c.start_agents()
        c.wait(lambda v: v["packages"]["web"]["state"] == "running")

Node isolation (``isolate=True``): each agent runs as ``unshare --pid --fork
--mount-proc --kill-child vigild ...``, so each "node" is a PID namespace whose init
(PID 1 inside) is ``vigild``. SIGKILL of that init kills everything the node started
(agent, sentinel, services, scripts) at once: :meth:`LocalCluster.kill_node` is a hard
node loss. The namespaces share the host's network and file system; only PIDs (and
``/proc``) are private, so PIDs shown by ``vigil status`` are namespace-local
(:meth:`LocalCluster.host_pid` translates them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from vigil.errors import StoreError
from vigil.keys import Keys
from vigil.snapshot import read_snapshot
from vigil.store import Store, open_store
from vigil.supervise.cgroup import Cgroup, find_hierarchy
from vigil.view import cluster_view

View = dict[str, Any]

UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
# unshare gets SIGKILL if the test runner dies, and with it (--kill-child) the node's
# whole PID namespace: no agent outlives an interrupted test run. Best effort.
PDEATHSIG = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []


def _test_cgroup_root(root: Path) -> Path | None:
    """A fresh cgroup directory for one test cluster, or None where cgroup v2 cannot be
    written (the agents then fall back to process groups)."""
    hierarchy = find_hierarchy()
    if hierarchy is None or not os.access(hierarchy, os.W_OK):
        return None
    return hierarchy / "vigil-test" / f"{root.name}-{os.getpid()}-{time.monotonic_ns()}"


def _remove_cgroups(path: Path) -> None:
    """Kill what is left in a test cluster's cgroups and remove them."""
    hierarchy = find_hierarchy()
    if hierarchy is None or not path.exists():
        return
    cg = Cgroup.at(hierarchy, path)
    cg.kill()
    cg.wait_empty_sync(5.0)
    cg.remove()


def _summary(view: View, limit: int = 40) -> str:
    """One line per package (at most ``limit``): what a failed wait shows."""
    pkgs = view.get("packages", {})
    lines = [
        f"  {name}: {p.get('state')} on {p.get('node')} ({p.get('message', '')})"
        for name, p in list(pkgs.items())[:limit]
    ]
    if len(pkgs) > limit:
        lines.append(f"  ... and {len(pkgs) - limit} more")
    return "\n".join(lines)


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _children(pid: int) -> list[int]:
    """Host PIDs of the live children of ``pid`` (from /proc/PID/task/*/children)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
    return out


def _pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _status_field(pid: int, name: str) -> str | None:
    """One line of /proc/PID/status (``State``, ``NSpid``...), None if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == name:
                    return value.strip()
    except OSError:
        return None
    return None


def _alive(pid: int) -> bool:
    state = _status_field(pid, "State")
    return state is not None and not state.startswith(("Z", "X"))


class LocalCluster:
    def __init__(
        self,
        root: Path,
        nodes: list[str] | None = None,
        *,
        name: str = "test",
        node_timeout: str = "3s",
        extra_cluster: str = "",
        store: str | None = None,
        isolate: bool = False,
        list_nodes: bool = True,
    ) -> None:
        """``store``: the store URL (default: ``sqlite:///ROOT/store.db``); with a shared
        store (etcd) give every cluster its own ``name``. ``isolate``: one PID namespace
        per node (see the module docstring); needs ``unshare`` and the right to use it.
        ``list_nodes=False``: cluster.toml without a ``nodes`` list (as a new user
        writes it)."""
        self.root = root
        self.nodes = nodes or ["node1"]
        self.name = name
        self.isolate = isolate
        if isolate and shutil.which("unshare") is None:
            raise RuntimeError("LocalCluster(isolate=True) needs unshare (util-linux)")
        self.config = root / "config"
        (self.config / "packages").mkdir(parents=True, exist_ok=True)
        (self.config / "scripts").mkdir(exist_ok=True)
        self.logs = root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.db = root / "store.db"
        self.store_url = store or f"sqlite:///{self.db}"
        node_list = ", ".join(f'"{n}"' for n in self.nodes)
        listed = f"nodes = [{node_list}]\n" if list_nodes else ""
        (self.config / "cluster.toml").write_text(
            f'name = "{name}"\nstore = "{self.store_url}"\nnode_timeout = "{node_timeout}"\n'
            f'{listed}state_dir = "{root}/state"\n{extra_cluster}'
        )
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        # Each cluster's package cgroups in their own subtree, so that clusters of
        # concurrent test runs with the same cluster and node names never meet.
        self.cgroup_root = _test_cgroup_root(root)
        self._init: dict[str, int] = {}  # isolated node -> host PID of its vigild (ns init)
        self._ns: dict[str, str] = {}  # isolated node -> its PID namespace ("pid:[N]")
        self._runner: asyncio.Runner | None = None
        self._store: Store | None = None

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
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("VIGIL_") or k.startswith("VIGIL_TEST_")
        }
        env["VIGIL_CONFIG"] = str(self.config)
        if self.cgroup_root is not None:
            env["VIGIL_CGROUP_ROOT"] = str(self.cgroup_root)
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
        """Start ``vigild`` for ``node`` (in its own PID namespace with ``isolate``)."""
        log = (self.logs / f"{node}.log").open("ab")
        argv = [
            _bin("vigild"),
            "--node",
            node,
            "--config",
            str(self.config),
            "--log-level",
            "debug",
        ]
        proc = subprocess.Popen(
            [*PDEATHSIG, *UNSHARE, *argv] if self.isolate else argv,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=self.env(),
            start_new_session=True,
        )
        log.close()
        self.agents[node] = proc
        self._init.pop(node, None)
        self._ns.pop(node, None)
        if self.isolate:
            self.agent_pid(node)  # learn the namespace now, while it surely exists
        return proc

    def start_agents(self) -> None:
        for n in self.nodes:
            self.start_agent(n)

    def agent_pid(self, node: str, timeout: float = 10) -> int:
        """Host PID of the node's ``vigild``: with ``isolate``, the only child of the
        ``unshare`` process (the namespace's init)."""
        proc = self.agents[node]
        if not self.isolate:
            return proc.pid
        known = self._init.get(node)
        if known is not None:
            return known
        deadline = time.monotonic() + timeout
        while True:
            kids = _children(proc.pid)
            if kids:
                init = kids[0]
                ns = _pid_ns(init)
                if ns is not None and ns != _pid_ns(proc.pid):
                    self._init[node] = init
                    self._ns[node] = ns
                    return init
            if proc.poll() is not None:
                raise RuntimeError(f"node {node}: unshare exited {proc.returncode}; see its log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {node}: vigild did not appear under unshare")
            time.sleep(0.005)

    def node_pids(self, node: str) -> list[int]:
        """Host PIDs of the live processes of an isolated node's PID namespace."""
        ns = self._ns.get(node)
        if ns is None:
            return []
        return [
            int(name)
            for name in os.listdir("/proc")
            if name.isdigit() and _pid_ns(int(name)) == ns and _alive(int(name))
        ]

    def host_pid(self, node: str, ns_pid: int) -> int:
        """The host PID of the process that ``node`` knows as ``ns_pid`` (the PIDs
        ``vigil status --json`` shows are the agent's own, namespace-local ones).
        Raises LookupError if that node has no such live process."""
        if not self.isolate:
            if not _alive(ns_pid):
                raise LookupError(f"node {node}: no live process {ns_pid}")
            return ns_pid
        self.agent_pid(node)
        for pid in self.node_pids(node):
            nspid = _status_field(pid, "NSpid")
            if nspid is not None and int(nspid.split()[-1]) == ns_pid:
                return pid
        raise LookupError(f"node {node}: no live process {ns_pid} in its PID namespace")

    def kill_node(self, node: str, timeout: float = 10) -> int:
        """Hard loss of an isolated node: SIGKILL its namespace's init (and ``unshare``),
        then wait until no process of the namespace is left. Returns the
        ``time.monotonic_ns()`` of the SIGKILL."""
        if not self.isolate:
            raise RuntimeError("kill_node needs LocalCluster(isolate=True); see kill_agent")
        proc = self.agents.pop(node)
        init = self._init.get(node)
        if init is None and proc.poll() is None:
            init = self.agent_pid(node)
        t0 = time.monotonic_ns()
        if init is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(init, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while left := self.node_pids(node):
            if time.monotonic() > deadline:
                raise AssertionError(f"node {node}: processes {left} survived its namespace")
            time.sleep(0.005)
        self._init.pop(node, None)
        self._ns.pop(node, None)
        return t0

    def pause_agent(self, node: str) -> None:
        """SIGSTOP the node's ``vigild`` only (its sentinel and services keep running)."""
        os.kill(self.agent_pid(node), signal.SIGSTOP)

    def resume_agent(self, node: str) -> None:
        os.kill(self.agent_pid(node), signal.SIGCONT)

    def kill_agent(self, node: str, sig: int = signal.SIGKILL) -> None:
        """Signal the node's ``vigild`` (with ``isolate``, SIGKILL kills the whole node)."""
        proc = self.agents[node]
        pid = self.agent_pid(node)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            if sig != signal.SIGKILL:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            proc.wait(timeout=60)

    def stop_agent(self, node: str, timeout: float = 60) -> int:
        """SIGTERM the node's ``vigild`` (it halts its packages and leaves); SIGKILL
        (of the whole node, with ``isolate``) if it has not exited after ``timeout``."""
        proc = self.agents[node]
        if proc.poll() is None:
            pid = self.agent_pid(node)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                os.kill(pid, signal.SIGCONT)  # a paused agent must act on it
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if self.isolate:
                self.kill_node(node)
                return proc.wait()
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        self.agents.pop(node, None)
        if self.isolate:
            deadline = time.monotonic() + 10
            while self.node_pids(node) and time.monotonic() < deadline:
                time.sleep(0.005)
            self._init.pop(node, None)
            self._ns.pop(node, None)
        return rc

    def package_cgroup(self, node: str, pkg: str) -> Cgroup | None:
        """The cgroup of ``pkg`` on ``node`` (None without cgroups)."""
        if self.cgroup_root is None:
            return None
        hierarchy = find_hierarchy()
        assert hierarchy is not None
        return Cgroup.at(hierarchy, self.cgroup_root / self.name / node / "packages" / pkg)

    def controller(self) -> str | None:
        """The node holding the controller (leader) key, from the store."""
        for name, n in self.view()["nodes"].items():
            if n.get("controller"):
                return str(name)
        return None

    def wait_nodes_up(self, nodes: list[str] | None = None, timeout: float = 20) -> View:
        want = nodes or self.nodes
        return self.wait(
            lambda v: all(v["nodes"][n]["state"] == "up" for n in want),
            timeout,
            f"nodes {', '.join(want)} up",
        )

    def agent_log(self, node: str) -> str:
        path = self.logs / f"{node}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------------ observing

    def view(self) -> View:
        """What ``vigil status --json`` shows, read straight from the store (fast to poll)."""

        async def go() -> View:
            if self._store is None:
                self._store = open_store(self.store_url)
            return cluster_view(await read_snapshot(self._store, Keys(self.name)))

        if self._runner is None:
            self._runner = asyncio.Runner()
        try:
            return self._runner.run(go())
        except StoreError:
            self._close_store()  # reconnect on the next call
            raise

    def _close_store(self) -> None:
        store, self._store = self._store, None
        if store is not None and self._runner is not None:
            with contextlib.suppress(StoreError, OSError):
                self._runner.run(store.close())

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
            except (KeyError, TypeError, StoreError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what or pred}; last view:\n"
                    + _summary(last)
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
        """Stop every agent (SIGTERM to all at once, so that packages halted by one
        are not started by another that is about to stop too), then the store client."""
        try:
            for node, proc in self.agents.items():
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError, RuntimeError):
                        pid = self.agent_pid(node)
                        os.kill(pid, signal.SIGTERM)
                        os.kill(pid, signal.SIGCONT)
            for node in list(self.agents):
                self.stop_agent(node)
        finally:
            self._close_store()
            if self._runner is not None:
                self._runner.close()
                self._runner = None
            if self.cgroup_root is not None:
                _remove_cgroups(self.cgroup_root)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
