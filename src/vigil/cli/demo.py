"""``vigil demo``: a local cluster on SQLite in a temporary directory, with a sample package."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import click

from vigil.cli.config_cmds import apply_tree
from vigil.cli.params import SECONDS, SafePath
from vigil.config import CheckReport, load_tree
from vigil.errors import VigilError
from vigil.keys import Keys
from vigil.snapshot import read_snapshot
from vigil.store import open_store
from vigil.view import cluster_view

SAMPLE_SCRIPT = """\
#!/bin/sh
# A sample external script: start, stop and validate entry points (CONCEPTS §3).
# It keeps a marker file so that `stop` is idempotent.
marker="$DEMO_DIR/$VIGIL_PACKAGE.prepared"
case "$1" in
  start)    echo "prepare $VIGIL_PACKAGE on $VIGIL_NODE ($VIGIL_START_REASON)"; touch "$marker" ;;
  stop)     echo "clean up $VIGIL_PACKAGE (${VIGIL_HALT_REASON:-})"; rm -f "$marker" ;;
  validate) [ -d "$DEMO_DIR" ] || { echo "DEMO_DIR missing" >&2; exit 1; } ;;
  *)        echo "usage: $0 start|stop|validate" >&2; exit 1 ;;
esac
exit 0
"""


DEMO_SCRIPT = """\
#!{python}
# Demo helper: crash = kill -9 the web service (vigil restarts it);
# kill [NODE] = kill -9 a node's agent, default the node running web (its sentinel
# kills the node's services, another node takes over); start NODE = start it again.
import json, os, subprocess, sys
action, args = "{action}", sys.argv[1:]
def status():
    out = subprocess.run(["{vigil}", "-c", "{cfg}", "status", "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)
if action == "crash":
    pid = status()["packages"]["web"]["services"]["http"]["pid"]
    print(f"kill -9 {{pid}} (the web service)")
    os.kill(pid, 9)
elif action == "kill":
    view = status()
    node = args[0] if args else view["packages"]["web"]["node"]
    pid = view["nodes"][node]["pid"]
    print(f"kill -9 {{pid}} (the agent of {{node}})")
    os.kill(pid, 9)
else:
    if not args:
        sys.exit("usage: start-node.sh NODE")
    log = open(os.path.join("{logs}", args[0] + ".log"), "ab")
    subprocess.Popen(["{vigild}", "--node", args[0], "--config", "{cfg}"],
                     stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    print(f"started the agent of {{args[0]}}")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_demo_config(root: Path, nodes: list[str], port: int) -> Path:
    cfg = root / "config"
    (cfg / "packages").mkdir(parents=True)
    (cfg / "scripts").mkdir()
    node_list = ", ".join(f'"{n}"' for n in nodes)
    (cfg / "cluster.toml").write_text(
        textwrap.dedent(f"""\
        name = "demo"
        store = "sqlite:///{root}/store.db"
        node_timeout = "3s"
        nodes = [{node_list}]
        state_dir = "{root}/state"
        """)
    )
    script = cfg / "scripts" / "prepare.sh"
    script.write_text(SAMPLE_SCRIPT)
    script.chmod(0o755)
    py = sys.executable
    (cfg / "packages" / "web.toml").write_text(
        textwrap.dedent(f"""\
        name = "web"
        nodes = ["*"]
        failover_policy = "configured_node"

        [env]
        DEMO_DIR = "{root}"

        [[external_script]]
        path = "scripts/prepare.sh"

        [[service]]
        name = "http"
        command = ["{py}", "-m", "http.server", "{port}", "--bind", "127.0.0.1",
                   "--directory", "{root}"]
        restart = 5
        restart_window = "1m"
        restart_delay = "100ms"
        halt_timeout = "5s"

        [[monitor]]
        name = "http-probe"
        command = ["{py}", "-m", "vigil.probes.http", "http://127.0.0.1:{port}/"]
        interval = "2s"
        timeout = "1s"
        failures = 3
        action = "restart"
        """)
    )
    return cfg


async def _apply(cfg: Path) -> None:
    report = CheckReport()
    tree = load_tree(cfg, report)
    if tree is None or not report.ok:
        raise VigilError("demo configuration invalid: " + "; ".join(map(str, report.errors)))
    store = open_store(tree.cluster.store)
    try:
        await apply_tree(store, tree)
    finally:
        await store.close()


async def _running(cfg: Path, timeout: float) -> bool:
    report = CheckReport()
    tree = load_tree(cfg, report)
    assert tree is not None
    store = open_store(tree.cluster.store)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = cluster_view(await read_snapshot(store, Keys(tree.cluster.name)))
            if view["packages"].get("web", {}).get("state") == "running":
                return True
            await asyncio.sleep(0.1)
        return False
    finally:
        await store.close()


def _say(text: str) -> None:
    """Print while shutting down; a closed stdout (``vigil demo | head``) must not
    keep the agents from being stopped."""
    with contextlib.suppress(OSError):
        click.echo(text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _agent_pids(cfg: Path) -> set[int]:
    async def go() -> set[int]:
        report = CheckReport()
        tree = load_tree(cfg, report)
        if tree is None:
            return set()
        store = open_store(tree.cluster.store)
        try:
            view = cluster_view(await read_snapshot(store, Keys(tree.cluster.name)))
        finally:
            await store.close()
        return {n["pid"] for n in view["nodes"].values() if n["pid"]}

    try:
        return asyncio.run(go())
    except VigilError:
        return set()


@click.command()
@click.option("--nodes", "count", default=3, show_default=True, type=click.IntRange(1, 9),
              help="How many node agents to run on this host.")  # fmt: skip
@click.option("--duration", default=None, type=SECONDS,
              help="Stop by itself after this many seconds (default: until Ctrl-C).")  # fmt: skip
@click.option("--dir", "directory", default=None, type=SafePath(path_type=Path),
              help="Use this (new) directory instead of a temporary one; it is kept.")  # fmt: skip
def demo(count: int, duration: float | None, directory: Path | None) -> None:
    """Run a local cluster on SQLite with a sample package; Ctrl-C stops it all."""
    keep = directory is not None
    root = directory.resolve() if directory else Path(tempfile.mkdtemp(prefix="vigil-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    nodes = [f"node{i}" for i in range(1, count + 1)]
    port = free_port()
    cfg = write_demo_config(root, nodes, port)
    asyncio.run(_apply(cfg))
    logs = root / "logs"
    logs.mkdir()
    vigild = shutil.which("vigild") or str(Path(sys.executable).with_name("vigild"))
    agents: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    try:
        for n in nodes:
            out = (logs / f"{n}.log").open("ab")
            agents.append(
                subprocess.Popen(
                    [vigild, "--node", n, "--config", str(cfg)],
                    stdout=out,
                    stderr=out,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )  # fmt: skip
            )
            out.close()
        ok = asyncio.run(_running(cfg, 30))
        vigil = Path(sys.executable).with_name("vigil")
        crash = root / "crash-service.sh"
        kill_node = root / "kill-node.sh"
        start_node = root / "start-node.sh"
        crash.write_text(DEMO_SCRIPT.format(python=sys.executable, vigil=vigil, cfg=cfg,
                                            vigild=vigild, logs=logs, action="crash"))  # fmt: skip
        kill_node.write_text(DEMO_SCRIPT.format(python=sys.executable, vigil=vigil, cfg=cfg,
                                                vigild=vigild, logs=logs, action="kill"))  # fmt: skip
        start_node.write_text(DEMO_SCRIPT.format(python=sys.executable, vigil=vigil, cfg=cfg,
                                                 vigild=vigild, logs=logs, action="start"))  # fmt: skip
        for script in (crash, kill_node, start_node):
            script.chmod(0o755)
        state = "is running" if ok else "did not start (see the logs)"
        lines = [
            f'vigil demo: cluster "demo" on SQLite, {count} node(s) on this host, in {root}',
            f'package "web" {state}: http://127.0.0.1:{port}/',
            "",
            "In another terminal:",
            f"  export VIGIL_CONFIG={cfg}",
            f"  {vigil} status -v              # nodes, packages, services, monitors",
            f"  {vigil} events --follow        # every state change",
            f"  {crash}          # kill -9 the service: it is restarted at once",
            f"  {kill_node}              # kill -9 the node running web: it moves",
            f"  {start_node} NODE        # bring a killed node back",
            f"  {vigil} package move web -n node2 --wait   # move it by hand",
            f"  {vigil} simulate --node-fails node1       # what would happen if ...",
            f"Agent logs: {logs}/   Package output: {root}/state/NODE/log/web.log",
            "Ctrl-C stops everything.",
        ]
        click.echo("\n".join(lines), nl=True)
        sys.stdout.flush()
        deadline = None if duration is None else time.monotonic() + duration
        reported: set[int] = set()
        while not stopping and (deadline is None or time.monotonic() < deadline):
            for name, a in zip(nodes, agents, strict=True):
                if a.poll() is not None and a.pid not in reported:
                    reported.add(a.pid)
                    click.echo(f"vigil demo: the agent of {name} exited ({a.returncode}); "
                               f"{start_node} {name} starts it again")  # fmt: skip
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        _say("vigil demo: stopping the agents ...")
        pids = {a.pid for a in agents if a.poll() is None}
        pids |= _agent_pids(cfg)  # agents started again by start-node.sh
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + 30
        for a in agents:
            with contextlib.suppress(subprocess.TimeoutExpired):
                a.wait(timeout=max(0.1, end - time.monotonic()))
        while any(_alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.05)
        for pid in pids:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for a in agents:
            if a.poll() is None:
                a.wait()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
        _say("vigil demo: stopped" + (f"; files kept in {root}" if keep else ""))
