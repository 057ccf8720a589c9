"""Big configurations on a real etcd: one apply stays one transaction within etcd's
limit of 128 operations per transaction, and a controller writes big plans."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vigil.testing.cluster import LocalCluster
from vigil.testing.etcd import EtcdCluster, require_etcd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = require_etcd()
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), members=1, binary=binary) as etcd:
        yield etcd.url


def write(c: LocalCluster, count: int) -> None:
    for f in (c.config / "packages").glob("*.toml"):
        f.unlink()
    for i in range(count):
        c.write_package(
            f'name = "p{i:04d}"\n[[service]]\nname = "s"\ncommand = ["sleep", "1000"]\n'
        )


def test_apply_and_run_300_packages_on_etcd(etcd_url: str, tmp_path: Path) -> None:
    c = LocalCluster(tmp_path, ["node1"], name="big", store=etcd_url)
    try:
        write(c, 300)
        out = c.apply()
        assert "applied" in out.stdout
        assert len(c.status_json()["packages"]) == 300
        c.start_agents()  # the controller assigns all 300 at once
        c.wait(
            lambda v: sum(p["state"] == "running" for p in v["packages"].values()) == 300,
            timeout=120,
            what="300 packages running",
        )
        c.vigil("package", "halt", "p0299", "--wait")
        write(c, 299)  # p0299 removed: the bundles shrink, the rest keeps running
        out = c.apply()
        assert "package p0299: removed" in out.stdout
        view = c.status_json()
        assert len(view["packages"]) == 299
        assert all(p["state"] == "running" for p in view["packages"].values())
    finally:
        c.close()
