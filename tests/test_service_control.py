"""How a service is run and stopped: kill_mode and stop_signal, type "forking",
identity (user, group, umask, limits), and logs that never fail a package.

Each test is the kind of one of the failure cases (``../shared/cases``): 16 (the main
process must be able to stop its workers its own way), 04 (``user`` sets the whole
identity), 07 (a removed log directory), plus the bad inputs of the issue. Real
agents, processes, cgroups and SQLite.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from vigil.supervise import procfs
from vigil.testing import wait_until_sync
from vigil.testing.cluster import LocalCluster

pytestmark = pytest.mark.slow


@pytest.fixture
def c(n1: LocalCluster) -> LocalCluster:
    return n1


def pkg_log(c: LocalCluster, pkg: str) -> str:
    path = c.root / "state" / "n1" / "log" / f"{pkg}.log"
    return path.read_text(errors="replace") if path.exists() else ""


# A main process that, on its stop signal, tells its worker to save (SIGUSR1) and
# waits for it; the worker saves on SIGUSR1 but aborts at once on a direct SIGTERM.
PY = sys.executable  # not "python3" on PATH: that may be a wrapper (pyenv's shims)
MASTER = """#!{py}
import signal, subprocess, sys, time
w = subprocess.Popen([sys.executable, "{dir}/worker.py"])
def stop(*_):
    open("{dir}/master-stopped", "w").close()
    w.send_signal(signal.SIGUSR1)
    w.wait()
    sys.exit(0)
signal.signal(signal.{sig}, stop)
open("{dir}/ready", "w").close()
while True:
    time.sleep(1)
"""
WORKER = """#!{py}
import os, signal, sys, time
def save(*_):
    time.sleep(0.3)
    open("{dir}/saved", "w").close()
    sys.exit(0)
def abort(*_):
    open("{dir}/aborted", "w").close()
    os._exit(1)
signal.signal(signal.SIGUSR1, save)
signal.signal(signal.SIGTERM, abort)
while True:
    time.sleep(1)
"""


def office(c: LocalCluster, extra: str, sig: str = "SIGTERM") -> Path:
    d = c.root / "office"
    d.mkdir()
    for name, text in (("master.py", MASTER), ("worker.py", WORKER)):
        (d / name).write_text(text.format(dir=d, sig=sig, py=PY))
        (d / name).chmod(0o755)
    c.write_package(
        f'name = "office"\n[[service]]\nname = "master"\ncommand = ["{d}/master.py"]\n'
        f'halt_timeout = "10s"\n{extra}'
    )
    c.apply()
    c.start_agents()
    c.wait_state("office", "running")
    wait_until_sync((d / "ready").exists, 10, what="the master ready")
    return d


@pytest.mark.parametrize("kill_mode", ["control-group", "mixed"])
def test_main_process_stops_its_workers_first(c: LocalCluster, kill_mode: str) -> None:
    """Case 16: the worker saves, with the default kill_mode and with "mixed"."""
    d = office(c, f'kill_mode = "{kill_mode}"\n')
    c.vigil("package", "halt", "office", "--wait", "--timeout", "30")
    assert (d / "master-stopped").exists()
    assert (d / "saved").exists() and not (d / "aborted").exists()
    assert c.package("office")["state"] == "halted"


def test_stop_signal_is_the_one_configured(c: LocalCluster) -> None:
    """A main process that only stops on SIGINT (stop_signal = "INT") stops gracefully."""
    d = office(c, 'stop_signal = "INT"\nkill_mode = "mixed"\n', sig="SIGINT")
    t0 = time.monotonic()
    c.vigil("package", "halt", "office", "--wait", "--timeout", "30")
    assert (d / "saved").exists() and not (d / "aborted").exists()
    assert time.monotonic() - t0 < 8, "it waited for halt_timeout: SIGINT was not sent"


def test_kill_mode_process_leaves_the_rest_to_the_final_sweep(c: LocalCluster) -> None:
    """kill_mode "process": a restart of the service leaves its other processes alone
    (systemd's KillMode=process); the package's halt still stops them."""
    marker = f"kmp-{os.getpid()}"
    c.write_script(
        "svc.sh", f'{PY} -c "import time; time.sleep(1000)" {marker} &\nexec sleep 1000\n'
    )
    c.write_package(
        f'name = "p"\nhalt_timeout = "2s"\n[[service]]\nname = "s"\n'
        f'command = ["{c.config}/scripts/svc.sh"]\nkill_mode = "process"\nrestart = 3\n'
    )
    c.apply()
    c.start_agents()
    c.wait_state("p", "running")
    wait_until_sync(lambda: bool(marked(marker)), 10, what="the helper")
    helper = marked(marker)[0]
    os.kill(c.package("p")["services"]["s"]["pid"], signal.SIGKILL)
    c.wait(lambda v: v["packages"]["p"]["services"]["s"]["restarts"] == 1, what="a restart")
    assert procfs.pid_alive(helper), "kill_mode process killed the rest on a restart"
    c.vigil("package", "halt", "p", "--wait", "--timeout", "30")
    assert not procfs.pid_alive(helper), "the package halt left the helper running"


def marked(marker: str) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmd = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmd and procfs.pid_alive(int(name)):
                out.append(int(name))
    return out


# --------------------------------------------------------------------------- forking


def forking(c: LocalCluster, pid_file: Path, body: str, extra: str = "") -> None:
    c.write_script("daemon.sh", body)
    c.write_package(
        f'name = "d"\n[[service]]\nname = "daemon"\ncommand = ["{c.config}/scripts/daemon.sh"]\n'
        f'type = "forking"\npid_file = "{pid_file}"\n{extra}'
    )


def test_forking_service_is_up_while_its_daemon_lives(c: LocalCluster) -> None:
    """Type "forking": the daemon named in pid_file is the main process; when it dies
    the whole cgroup is killed and the service is started again."""
    pid_file = c.root / "d.pid"
    marker = f"fork-{os.getpid()}"
    forking(
        c,
        pid_file,
        f'( setsid sh -c \'echo $$ > {pid_file}; {PY} -c "import time; time.sleep(1000)" '
        f"{marker}-child & exec sleep 1000' & )\nexit 0\n",
        'restart = 2\nstart_timeout = "10s"\n',
    )
    c.apply()
    c.start_agents()
    p = c.wait_state("d", "running")
    daemon = int(pid_file.read_text())
    assert p["services"]["daemon"]["pid"] == daemon
    wait_until_sync(lambda: bool(marked(marker)), 10, what="the daemon's child")
    child = marked(marker)[0]
    os.kill(daemon, signal.SIGKILL)
    c.wait(lambda v: v["packages"]["d"]["services"]["daemon"]["restarts"] == 1, what="a restart")
    assert not procfs.pid_alive(child), "the previous daemon's child outlived the restart"
    new = c.package("d")["services"]["daemon"]["pid"]
    assert new not in (None, daemon) and new == int(pid_file.read_text())
    assert len(marked(marker)) == 1, "copies pile up"
    c.vigil("package", "halt", "d", "--wait")
    assert not pid_file.exists(), "the halted daemon's pid_file is left behind"


def test_forking_pid_file_that_never_appears_fails_the_start(c: LocalCluster) -> None:
    pid_file = c.root / "never.pid"
    forking(c, pid_file, "exit 0\n", 'start_timeout = "1s"\n')
    c.apply()
    c.start_agents()
    p = c.wait_state("d", "failed", 20)
    assert f"pid_file {pid_file} did not appear" in p["message"]
    assert "start_timeout" in p["message"] and "\n" not in p["message"]


@pytest.mark.parametrize(("content", "expected"), [
    ("1", "names PID 1, which cannot be the service's"),
    ("garbage", "holds 'garbage', not a PID"),
])  # fmt: skip
def test_forking_pid_file_naming_no_daemon_fails_the_start(
    c: LocalCluster, content: str, expected: str
) -> None:
    pid_file = c.root / "bad.pid"
    forking(c, pid_file, f"echo {content} > {pid_file}\nexit 0\n", 'start_timeout = "1s"\n')
    c.apply()
    c.start_agents()
    p = c.wait_state("d", "failed", 20)
    assert f"pid_file {pid_file} {expected}" in p["message"], p["message"]


def test_forking_start_command_that_fails_fails_the_start(c: LocalCluster) -> None:
    forking(c, c.root / "x.pid", "exit 3\n")
    c.apply()
    c.start_agents()
    p = c.wait_state("d", "failed", 20)
    assert "start command exited with status 3" in p["message"]


# --------------------------------------------------------------------------- identity


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_user_sets_the_whole_identity(c: LocalCluster) -> None:
    """Case 04: uid, gid, groups, HOME, USER, LOGNAME and SHELL of the user (as su -
    and systemd User= set them); umask and limit_nofile too."""
    try:
        pw = pwd.getpwnam("www-data")
    except KeyError:
        pytest.skip("no user www-data")
    who = (
        'echo "WHO id=$(id -u):$(id -g) groups=$(id -G) HOME=$HOME USER=$USER '
        "LOGNAME=$LOGNAME SHELL=$SHELL umask=$(umask) nofile=$(ulimit -n) "
        'hard=$(ulimit -Hn)"; exec sleep 1000'
    )
    c.write_package(
        f'name = "db"\n[[service]]\nname = "s"\ncommand = ["sh", "-c", \'{who}\']\n'
        'user = "www-data"\numask = "0027"\nlimit_nofile = "1000:2000"\ncwd = "/"\n'
    )
    c.apply()
    c.start_agents()
    c.wait_state("db", "running")
    wait_until_sync(lambda: "WHO" in pkg_log(c, "db"), 10, what="the service's output")
    line = next(x for x in pkg_log(c, "db").splitlines() if x.startswith("WHO"))
    groups = sorted(os.getgrouplist(pw.pw_name, pw.pw_gid))
    assert f"id={pw.pw_uid}:{pw.pw_gid}" in line
    assert f"groups={' '.join(map(str, sorted(groups)))}" in line or set(
        line.split("groups=")[1].split(" HOME")[0].split()
    ) == set(map(str, groups))
    assert f"HOME={pw.pw_dir} USER=www-data LOGNAME=www-data SHELL={pw.pw_shell}" in line
    assert "umask=0027" in line and "nofile=1000" in line and "hard=2000" in line


def test_check_names_unknown_user_group_and_missing_cwd(c: LocalCluster) -> None:
    c.write_package(
        'name = "w"\n[[service]]\nname = "s"\ncommand = ["true"]\n'
        'user = "no-such-user-vigil"\ngroup = "no-such-group-vigil"\ncwd = "/no/such/dir"\n'
    )
    out = c.vigil("check", check=False)
    assert out.returncode != 0
    text = out.stderr + out.stdout
    assert "service[0].user: no user 'no-such-user-vigil' on this node" in text
    assert "service[0].group: no group 'no-such-group-vigil' on this node" in text
    assert "service[0].cwd: working directory /no/such/dir does not exist on this node" in text


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (
            "kill_mode",
            '"control_group"',
            "kill_mode: expected 'control-group', 'mixed' or 'process', got 'control_group'",
        ),
        ("stop_signal", '"SIGTERMINATE"', 'stop_signal: expected a signal name like "SIGTERM"'),
        ("umask", '"0899"', 'umask: expected an octal umask like "0027"'),
        (
            "umask",
            "27",
            'umask: expected an octal umask in a string like "0027", got the number 27',
        ),
        ("limit_nofile", '"lots"', "limit_nofile: expected a non-negative integer"),
        (
            "limit_nofile",
            '"2000:1000"',
            "limit_nofile: the soft limit must not exceed the hard limit",
        ),
        ("type", '"forking"', 'type "forking" needs pid_file'),
        ("pid_file", '"/run/x.pid"', 'pid_file is only for type = "forking"'),
    ],
)
def test_bad_service_control_keys_are_named(
    c: LocalCluster, key: str, value: str, expected: str
) -> None:
    c.write_package(f'name = "w"\n[[service]]\nname = "s"\ncommand = ["true"]\n{key} = {value}\n')
    out = c.vigil("check", check=False)
    assert out.returncode != 0
    assert expected in out.stderr + out.stdout, out.stderr + out.stdout


# --------------------------------------------------------------------------- logs


def test_removed_log_directory_never_fails_a_package(tmp_path: Path) -> None:
    """Case 07: the log directory removed while the package runs; a restart of its
    service and the monitor's checks go on, the package stays where it is."""
    with LocalCluster(tmp_path, ["n1", "n2"], node_timeout="2s") as c:
        c.write_package(
            'name = "web"\nnodes = ["n1", "n2"]\n[[service]]\nname = "http"\n'
            'command = ["sleep", "1000"]\nrestart = 3\n[[monitor]]\nname = "probe"\n'
            'command = ["sh", "-c", "echo checked"]\ninterval = "300ms"\nfailures = 2\n'
        )
        c.start_agents()
        c.wait_nodes_up()
        c.apply()
        c.wait(
            lambda v: v["packages"]["web"]["node"] == "n1"
            and v["packages"]["web"]["state"] == "running"
        )
        shutil.rmtree(tmp_path / "state" / "n1" / "log")
        os.kill(c.package("web")["services"]["http"]["pid"], signal.SIGKILL)
        c.wait(
            lambda v: v["packages"]["web"]["services"]["http"]["restarts"] == 1, what="a restart"
        )
        wait_until_sync(
            lambda: "checked" in pkg_log_of(tmp_path, "n1", "web"), 10, what="the log written again"
        )
        p = c.package("web")
        assert (p["state"], p["node"]) == ("running", "n1"), p


def pkg_log_of(root: Path, node: str, pkg: str) -> str:
    path = root / "state" / node / "log" / f"{pkg}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def test_package_log_rotates_by_size(c: LocalCluster) -> None:
    c.write_script(
        "chatty.sh",
        f"exec {PY} -uc \"import time\nwhile True: print('x' * 4000); time.sleep(0.01)\"\n",
    )
    c.write_package(
        f'name = "chatty"\nlog_max_size = "64K"\nlog_keep = 2\n[[service]]\nname = "s"\n'
        f'command = ["{c.config}/scripts/chatty.sh"]\n'
    )
    c.apply()
    c.start_agents()
    c.wait_state("chatty", "running")
    log = c.root / "state" / "n1" / "log" / "chatty.log"
    wait_until_sync(lambda: Path(f"{log}.2").exists(), 30, interval=0.1, what="two rotations")
    c.vigil("package", "halt", "chatty", "--wait")
    assert not Path(f"{log}.3").exists(), "log_keep = 2 keeps two old logs"
    assert Path(f"{log}.1").stat().st_size > 64 * 1024
    assert "rotated" in c.agent_log("n1")
