"""Property tests: bad input of any shape never bricks or silently changes anything.

Hypothesis mutates a valid configuration (types, values, structure, raw bytes) and
the command line of the real ``vigil`` entry point (``vigil.cli.main.main``, run in
this process for speed, on a real SQLite store), and checks what an operator sees:

- a rejected input: a non-zero exit, exactly one line on stderr (``vigil...: error:``),
  no traceback, and the store exactly as before (compared key by key);
- any input: never a traceback, never the internal-error exit (70), never a hang.

``VIGIL_FUZZ_EXAMPLES=N`` runs N examples per property (default 300: well under a
minute for the module).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sqlite3
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vigil.cli.main import main
from vigil.plan.scenario import write_toml

EXAMPLES = int(os.environ.get("VIGIL_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CLUSTER = """\
name = "fz"
store = "sqlite:///@T@/store.db"
state_dir = "@T@/state"
node_timeout = "3s"
nodes = ["n1", "n2"]

[hooks]
timeout = "30s"
"""
WEB = """\
name = "web"
nodes = ["n1", "n2"]
priority = 10
run_script_timeout = "60s"
restart_limit = 3
restart_window = "10m"
failback_policy = "manual"

[env]
DOCROOT = "/srv/www"

[[service]]
name = "http"
command = ["sleep", "1000"]
restart = 3
restart_delay = "100ms"
halt_timeout = "2s"

[[monitor]]
name = "probe"
command = ["true"]
interval = "5s"
timeout = "2s"
failures = 2

[[dependency]]
package = "db"
condition = "up"
location = "any_node"

[[address]]
ip = "10.9.9.9/24"
interface = "eth9"
"""
DB = """\
name = "db"
auto_run = true

[[service]]
name = "main"
command = ["sleep", "1000"]
"""


# --------------------------------------------------------------------------- harness


def vigil(*argv: str) -> tuple[int, str, str]:
    """Run ``vigil ARGV`` through its real entry point; (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code: object = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as exc:
            code = exc.code
    assert isinstance(code, int), code
    return code, out.getvalue(), err.getvalue()


def dump(db: Path) -> dict[str, bytes]:
    """Every key and value in the SQLite store (what a rejected input must not change)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return {k: bytes(v) for k, v in conn.execute("SELECT key, value FROM kv")}


def assert_sane(code: int, err: str, out: str) -> None:
    assert "Traceback" not in err + out, err
    assert code != 70, f"internal error (a bug): {err}"


def assert_rejected(code: int, err: str, out: str) -> None:
    assert_sane(code, err, out)
    assert code != 0
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err!r}"
    assert re.match(r"vigil[a-z ]*: error: ", lines[0]), lines[0]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A valid configuration, applied once to a SQLite store."""
    tmp = tmp_path_factory.mktemp("fuzz")
    cfg = tmp / "config"
    (cfg / "packages").mkdir(parents=True)
    (cfg / "cluster.toml").write_text(CLUSTER.replace("@T@", str(tmp)))
    (cfg / "packages" / "web.toml").write_text(WEB)
    (cfg / "packages" / "db.toml").write_text(DB)
    code, _, err = vigil("--node", "n1", "apply", str(cfg))
    assert code == 0, err
    yield cfg


@contextlib.contextmanager
def replaced(path: Path, data: bytes) -> Iterator[None]:
    old = path.read_bytes()
    path.write_bytes(data)
    try:
        yield
    finally:
        path.write_bytes(old)


# --------------------------------------------------------------------------- mutations


def paths(v: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in ``v`` a value could be replaced or removed."""
    if at:
        yield at
    if isinstance(v, dict):
        for k, x in v.items():
            yield from paths(x, (*at, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from paths(x, (*at, i))


# Values chosen to cross every rule: types, finiteness, ranges, names, NUL, Unicode.
NASTY = st.sampled_from(
    [
        "0s", "0ms", "-1s", "1e308s", "99999999999999999999h", "\u0663s", " 5s ", "5 s",
        "5S", "none", "inf", "nan", "", " ", "web\n", "web ", "Web", "a\x00b", "x\ny",
        "\u202ename", "unlimited", "*", "../../etc", "/dev/zero", "sqlite:///", "etcd://",
        "etcd://a,,b", "etcd://h:99999", "memory://", "10.0.0.1", "10.0.0.1/33",
    ]
)  # fmt: skip
SCALARS = st.one_of(
    NASTY,
    st.text(max_size=12),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["name", "x", "command", "package"]), inner, max_size=3),
    ),
    max_leaves=6,
)


def set_at(data: Any, at: tuple[Any, ...], op: str, value: Any) -> None:
    parent = data
    for part in at[:-1]:
        parent = parent[part]
    last = at[-1]
    if op == "delete":
        del parent[last]
    elif op == "wrap":
        nested = parent[last]
        for _ in range(20):  # deeper than any configuration nests
            nested = [nested]
        parent[last] = nested
    elif op == "unknown" and isinstance(parent, dict):
        parent[f"{last}_x"] = value
    else:
        parent[last] = value


@st.composite
def structured(draw: st.DrawFn, text: str) -> bytes:
    data = tomllib.loads(text)
    at = draw(st.sampled_from(list(paths(data))))
    op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "wrap", "unknown"]))
    set_at(data, at, op, draw(VALUES))
    return write_toml(data).encode()


@st.composite
def bytewise(draw: st.DrawFn, text: str) -> bytes:
    data = bytearray(text.encode())
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "flip", "truncate"]))
        if kind == "insert":
            data[pos:pos] = draw(
                st.one_of(
                    st.binary(min_size=1, max_size=4),
                    st.sampled_from(
                        [b"\xff", b"\xe9", b"\x00", b"\r", b"[[", b"=", b'"', b"\\u0000"]
                    ),
                )
            )
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif kind == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        else:
            del data[pos:]
    return bytes(data)


FILES = {"cluster.toml": CLUSTER, "packages/web.toml": WEB, "packages/db.toml": DB}


@st.composite
def mutated_file(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(FILES)))
    text = FILES[name].replace("@T@", "/tmp/vigil-fuzz")
    how = draw(st.sampled_from([structured, structured, bytewise]))
    return name, draw(how(text))


# --------------------------------------------------------------------------- properties


@FUZZ
@given(mutation=mutated_file())
def test_mutated_config_is_refused_in_one_line_and_changes_nothing(
    config: Path, mutation: tuple[str, bytes]
) -> None:
    name, data = mutation
    if name == "cluster.toml":  # keep the store where the fixture put it
        data = data.replace(b"/tmp/vigil-fuzz", str(config.parent).encode())
    db = config.parent / "store.db"
    before = dump(db)
    with replaced(config / name, data):
        code, out, err = vigil("--node", "n1", "check", str(config))
        event(f"check exit {code}")
        assert_sane(code, err, out)
        if code == 0:
            return  # still a valid configuration (a harmless change)
        assert code == 2, err
        assert_rejected(code, err, out)
        code, out, err = vigil("--node", "n1", "apply", str(config))
        assert_rejected(code, err, out)
        assert code == 2, err
        assert "nothing applied" in err
        if name == "cluster.toml":  # every command reads it
            code, out, err = vigil("-c", str(config), "status")
            assert_sane(code, err, out)
            assert len(err.splitlines()) <= 1, err
    assert dump(db) == before


COMMANDS = [
    ["status"], ["status", "--json"], ["status", "-v"],
    ["package", "start"], ["package", "halt"], ["package", "clear"], ["package", "enable"],
    ["package", "disable"], ["package", "maintenance"], ["package", "env"],
    ["package", "move"], ["node", "halt"], ["node", "start"],
    ["lock", "acquire"], ["lock", "release"], ["lock", "list"],
    ["flag", "create"], ["flag", "remove"], ["flag", "test"], ["flag", "list"],
    ["events"], ["simulate"], ["check"], ["apply"], ["recover"],
]  # fmt: skip
WORDS = st.one_of(
    st.sampled_from(
        [
            "web", "db", "n1", "n2", "zz", "web\n", "n1\n", "w\x00b", "--timeout", "--lock-timeout",
            "--pid", "-n", "--node", "-d", "-f", "--failover", "--detach", "--off", "--json",
            "-p", "--last", "--from", "--node-fails", "--package-fails", "--node-returns",
            "--all", "-c", "nan", "inf", "-inf", "-1", "0", "0.05", "1e308", "1", "99999999999999999999",
            "/dev/zero", "/nonexistent", "@FIFO@", "@BIN@", "@CONFIG@", "restore", "x" * 300, "",
            "--", "-", "--help",
        ]
    ),
    st.text(max_size=8),
)  # fmt: skip


@FUZZ
@given(
    head=st.lists(st.sampled_from(["--node", "n1", "n1\n", "-c", "@CONFIG@"]), max_size=2),
    command=st.sampled_from(COMMANDS),
    words=st.lists(WORDS, max_size=5),
)
def test_fuzzed_command_line_fails_in_one_line_and_changes_nothing(
    config: Path, head: list[str], command: list[str], words: list[str]
) -> None:
    fifo = config.parent / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    subst = {"@CONFIG@": str(config), "@FIFO@": str(fifo), "@BIN@": "/bin/true"}
    argv = [subst.get(w, w) for w in ["-c", str(config), *head, *command, *words]]
    # never block: bounded waits only (a --wait or --follow is a wait by design)
    if command[:2] == ["lock", "acquire"]:
        argv += ["--timeout", "0.2"]
    if command[0] in ("apply", "recover"):
        argv += ["--lock-timeout", "0.2"]
    db = config.parent / "store.db"
    before = dump(db)
    code, out, err = vigil(*argv)
    event(f"{' '.join(command)}: exit {code}")
    assert_sane(code, err, out)
    if code == 0:
        return  # a valid command did what it says
    if command == ["flag", "test"] and code == 1 and not err:
        return  # its exit status is its answer: the flag is not set
    assert_rejected(code, err, out)
    assert dump(db) == before, f"vigil {argv!r} failed (exit {code}) but changed the store"
