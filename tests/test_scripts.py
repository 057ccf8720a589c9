"""Package scripts on real processes: exit codes, environment, timeouts, meaning."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from vigil.config import ScriptRef
from vigil.scripts.runner import ScriptMeaning, ScriptResult, interpret, meaning, run_script
from vigil.supervise import procfs
from vigil.supervise.sentinel import ProcessRegistry

ENV = dict(os.environ)


@pytest.fixture
def registry() -> Iterator[ProcessRegistry]:
    reg = ProcessRegistry()
    try:
        yield reg
    finally:
        reg.close()


def make_script(tmp_path: Path, body: str, name: str = "pkg.sh") -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def run(
    ref: ScriptRef,
    entry: str = "start",
    *,
    env: dict[str, str] | None = None,
    timeout: float | None = 10.0,
    log_path: Path | None = None,
    registry: ProcessRegistry | None = None,
    kill_grace: float = 3.0,
) -> ScriptResult:
    return asyncio.run(
        run_script(
            ref,
            entry,  # type: ignore[arg-type]
            env=ENV if env is None else env,
            timeout=timeout,
            log_path=log_path,
            registry=registry,
            kill_grace=kill_grace,
        )
    )


@pytest.mark.parametrize("code", [0, 1, 2])
def test_exit_codes_pass_through(tmp_path: Path, registry: ProcessRegistry, code: int) -> None:
    script = make_script(tmp_path, 'exit "$CODE"\n')
    res = run(ScriptRef(path=str(script)), env={**ENV, "CODE": str(code)}, registry=registry)
    assert res.exit_code == code
    assert not res.timed_out and res.error is None
    assert res.duration < 5
    assert len(registry) == 0


def test_entry_args_env_and_log(tmp_path: Path) -> None:
    script = make_script(tmp_path, 'echo "entry=$1 args=$2,$3 pkg=$VIGIL_PACKAGE"\necho oops >&2\n')
    log = tmp_path / "pkg.log"
    ref = ScriptRef(path=str(script), args=["a b", "c"])
    res = run(ref, "stop", env={"PATH": "/usr/bin:/bin", "VIGIL_PACKAGE": "web"}, log_path=log)
    assert res.exit_code == 0 and res.ok
    assert log.read_text() == "entry=stop args=a b,c pkg=web\noops\n"
    assert res.describe() == f"{script} stop exited with status 0"


def test_timeout_kills_a_term_ignoring_script(tmp_path: Path, registry: ProcessRegistry) -> None:
    script = make_script(tmp_path, 'trap "" TERM\nsleep 1000 &\necho $! > "$GC"\nwait\n')
    gc_file = tmp_path / "gc"
    timeout, grace = 0.3, 0.3
    res = run(
        ScriptRef(path=str(script)),
        env={**ENV, "GC": str(gc_file)},
        timeout=timeout,
        kill_grace=grace,
        registry=registry,
    )
    assert res.timed_out
    assert res.exit_code == -signal.SIGKILL
    assert timeout + grace <= res.duration < timeout + grace + 1.0
    assert not procfs.pid_alive(int(gc_file.read_text()))
    assert len(registry) == 0
    assert "timed out after 0.3s" in res.describe()
    assert meaning(res) is ScriptMeaning.HALT


def test_timeout_of_a_polite_script_needs_no_kill(tmp_path: Path) -> None:
    script = make_script(tmp_path, "exec sleep 1000\n")
    res = run(ScriptRef(path=str(script)), timeout=0.2, kill_grace=5.0)
    assert res.timed_out and res.exit_code == -signal.SIGTERM
    assert res.duration < 0.2 + 1.0


def test_no_timeout(tmp_path: Path) -> None:
    script = make_script(tmp_path, "exit 0\n")
    assert run(ScriptRef(path=str(script)), "validate", timeout=None).exit_code == 0


@pytest.mark.parametrize("kind", ["missing", "not executable"])
def test_unrunnable_script_is_a_result(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "pkg.sh"
    if kind == "not executable":
        path.write_text("#!/bin/sh\nexit 0\n")
    res = run(ScriptRef(path=str(path)))
    assert res.exit_code is None and not res.timed_out
    assert res.error is not None and str(path) in res.error
    assert meaning(res) is ScriptMeaning.HALT
    assert res.describe() == res.error


def test_interpret_table() -> None:
    M = ScriptMeaning
    start: list[tuple[int | None, bool, ScriptMeaning]] = [
        (0, False, M.OK),
        (1, False, M.HALT),
        (2, False, M.FAILOVER),
        (None, True, M.HALT),
        (-9, True, M.HALT),
        (5, False, M.HALT),
        (None, False, M.HALT),
    ]
    for code, timed_out, want in start:
        assert interpret("start", code, timed_out) is want, (code, timed_out)
    assert interpret("stop", 0, False) is M.OK
    failed: list[tuple[int | None, bool]] = [(1, False), (2, False), (-15, True), (None, False)]
    for code, timed_out in [*failed, (0, True)]:
        assert interpret("stop", code, timed_out) is M.HALT_FAILED
    assert interpret("validate", 0, False) is M.VALID
    for code, timed_out in failed:
        assert interpret("validate", code, timed_out) is M.INVALID
