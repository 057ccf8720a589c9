"""Planner golden tests, in the style of Pacemaker's scheduler regression tests.

Each ``tests/golden/NAME.scenario`` is a planner input in TOML (format: the
docstring of ``vigil.plan.scenario``): cluster settings, nodes up / down / halted,
packages (the keys of a package TOML file), owners, statuses, admin records, the
previous assignments and ``now``. Its comments say what CONCEPTS.md requires and
why the expected output is right. The test plans it and compares the result,
written as text, with ``tests/golden/NAME.expected``:

    # actions
    start web on n2: failover            <- str(action), in the planner's order
    # assignments
    web: n2 | failover on n2 | start=failover
         ^node  ^reason        ^start / halt reason, since (only when carried over)

After a deliberate planner change, rewrite the expected files and review the diff
(``git diff tests/golden``) before committing it:

    VIGIL_GOLDEN_UPDATE=1 .venv/bin/pytest tests/test_planner_golden.py

A new scenario needs only its ``.scenario`` file: run with VIGIL_GOLDEN_UPDATE=1
once, then check the new ``.expected`` file line by line against CONCEPTS.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vigil.errors import ConfigError
from vigil.plan.planner import Plan, plan
from vigil.plan.scenario import dump_scenario, load_scenario, parse_scenario, read_scenario

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("VIGIL_GOLDEN_UPDATE") == "1"
SCENARIOS = sorted(GOLDEN.glob("*.scenario"))


def render(result: Plan, now: float) -> str:
    lines = ["# actions"]
    lines += [str(a) for a in result.actions] or ["(none)"]
    lines.append("# assignments")
    for pkg in sorted(result.assignments):
        a = result.assignments[pkg]
        parts = [f"{pkg}: {a.node or '-'}", a.reason]
        extra = []
        if a.start_reason is not None:
            extra.append(f"start={a.start_reason.value}")
        if a.halt_reason is not None:
            extra.append(f"halt={a.halt_reason.value}")
        if a.since != now:
            extra.append(f"since={a.since:g}")
        if extra:
            parts.append(" ".join(extra))
        lines.append(" | ".join(parts))
    return "\n".join(lines) + "\n"


def test_there_are_scenarios() -> None:
    assert len(SCENARIOS) >= 20


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_golden(path: Path) -> None:
    scenario = read_scenario(path)
    got = render(plan(scenario.snapshot, scenario.now), scenario.now)
    # the planner is pure: the same input gives the same output
    assert render(plan(scenario.snapshot, scenario.now), scenario.now) == got
    expected_path = path.with_suffix(".expected")
    if UPDATE:
        if not expected_path.exists() or expected_path.read_text() != got:
            expected_path.write_text(got)
        return
    if not expected_path.exists():
        pytest.fail(
            f"{expected_path.name} is missing; run with VIGIL_GOLDEN_UPDATE=1 and review it"
        )
    assert got == expected_path.read_text(), f"{path.name}: plan differs from {expected_path.name}"


def test_no_orphan_expected_files() -> None:
    scenarios = {p.stem for p in SCENARIOS}
    orphans = [p.name for p in GOLDEN.glob("*.expected") if p.stem not in scenarios]
    assert not orphans, f"expected files without a scenario: {orphans}"


# --------------------------------------------------------------------------- scenario files


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_round_trip(path: Path) -> None:
    """dump_scenario writes what load_scenario reads back: the same planner input."""
    scenario = read_scenario(path)
    snap = scenario.snapshot
    back = parse_scenario(dump_scenario(snap, now=scenario.now, comment=path.name))
    assert back.now == scenario.now
    for attr in ("cluster", "packages", "owners", "status", "admin", "assignments"):
        assert getattr(back.snapshot, attr) == getattr(snap, attr), attr
    assert set(back.snapshot.nodes) == set(snap.nodes)
    assert {n: a for n, a in back.snapshot.node_admin.items() if a.halted} == {
        n: a for n, a in snap.node_admin.items() if a.halted
    }
    assert plan(back.snapshot, back.now) == plan(snap, scenario.now)


def test_scenario_json_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(
        json.dumps(
            {
                "nodes": {"n1": "up", "n2": "down"},
                "package": [{"name": "web", "nodes": ["n2", "n1"]}],
                "status": {"web": {"state": "running", "node": "n2"}},
            }
        )
    )
    snap = load_scenario(path)
    assert list(snap.nodes) == ["n1"] and snap.status["web"].since == 0.0
    assert read_scenario(path).now == 0.0
    assert [str(a) for a in plan(snap, 0.0).actions] == ["start web on n1: failover"]


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("bogus = 1", "s.toml: bogus", "unknown key"),
        ('[nodes]\nn1 = "sleeping"', "s.toml: nodes.n1", "expected one of up, down"),
        ('[nodes]\nn1 = "down"\n[owners]\nweb = "n1"', "s.toml: owners.web", "is not up"),
        ('[[package]]\nname = "web"\nnodez = []', "s.toml: package[0]: nodez", "unknown key"),
        ('[status.web]\nstate = "dancing"', "s.toml: status.web.state", "Input should be"),
        ("now = [", "s.toml", "not valid TOML"),
    ],
)
def test_scenario_errors_name_the_key(tmp_path: Path, text: str, where: str, message: str) -> None:
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_scenario(path)
    assert str(exc.value).startswith(str(tmp_path / where)), str(exc.value)
    assert message in str(exc.value)
