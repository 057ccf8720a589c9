"""The fault lab must catch a double run (docs/reliability.md).

Deliberately broken builds run one lab step each, and the lab's double-run audit
must fail:

* ``nofence`` (``VIGIL_TEST_DISABLE_FENCING=1``: the sentinel is never armed and
  self-fencing kills nothing): the agent of the host that runs the package is paused
  past ``node_timeout``, another host starts the package;
* ``nocontain`` (``VIGIL_TEST_DISABLE_CONTAINMENT=1``: process groups, no cgroups):
  that agent is SIGKILLed; the witness's detached daemon escapes its sentinel.

Real hosts (network namespaces), real etcd, real agents: root only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vigil.testing.etcd import require_etcd

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None,
        reason="the lab needs root, iproute2 and unshare",
    ),
]


@pytest.mark.timeout(110)
@pytest.mark.parametrize("kind", ["nofence", "nocontain"])
def test_lab_catches_a_double_run_of_the_broken_build(tmp_path: Path, kind: str) -> None:
    require_etcd()
    proc = subprocess.run(
        [sys.executable, "-m", "lab", "--broken-check", "--broken", kind, "--root", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "overlap(s) in" in proc.stdout and "package pkg1: h1 pid" in proc.stdout
    assert "nothing left behind" in proc.stdout
