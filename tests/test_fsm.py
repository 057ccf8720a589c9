"""The pure restart decision and the service state table (no processes, explicit ``now``)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vigil.config import ServiceSpec
from vigil.supervise.fsm import (
    MAX_DELAY,
    TRANSITIONS,
    GiveUp,
    IllegalTransition,
    Restart,
    RestartPolicy,
    ServiceState,
    decide_restart,
    prune_restarts,
    transition,
)


def policy(budget: int | None, window: float | None = None, delay: float = 0.0) -> RestartPolicy:
    return RestartPolicy(budget=budget, window=window, delay=delay)


def test_from_spec() -> None:
    spec = ServiceSpec.model_validate(
        {"name": "s", "command": ["x"], "restart": 3, "restart_window": "1m", "restart_delay": "2s"}
    )
    assert RestartPolicy.from_spec(spec) == RestartPolicy(budget=3, window=60.0, delay=2.0)
    default = RestartPolicy.from_spec(ServiceSpec(name="s", command=["x"]))
    assert default == RestartPolicy(budget=0, window=None, delay=0.0)


def test_budget_zero_never_restarts() -> None:
    assert isinstance(decide_restart(policy(0), [], 100.0), GiveUp)


def test_unlimited_always_restarts() -> None:
    times = [float(t) for t in range(1000)]
    assert decide_restart(policy(None), times, 1000.0) == Restart(0.0)


def test_budget_without_window_counts_since_start() -> None:
    p = policy(3)
    assert decide_restart(p, [], 0.0) == Restart(0.0)
    assert decide_restart(p, [0.0, 1.0], 1e9) == Restart(0.0)
    decision = decide_restart(p, [0.0, 1.0, 2.0], 1e9)
    assert isinstance(decision, GiveUp)
    assert "3 times since the package started" in decision.reason


def test_window_forgets_old_restarts() -> None:
    p = policy(3, window=10.0)
    history = [0.0, 1.0, 2.0]
    gave_up = decide_restart(p, history, 3.0)
    assert isinstance(gave_up, GiveUp)
    assert "within 10s" in gave_up.reason
    assert isinstance(decide_restart(p, history, 9.99), GiveUp)
    assert decide_restart(p, history, 10.0) == Restart(0.0)  # 0.0 is exactly 10 s old: out
    assert decide_restart(p, history, 12.5) == Restart(0.0)  # all three are out


def test_delay_doubles_inside_window_and_is_capped() -> None:
    p = policy(None, window=100.0, delay=1.0)
    assert [decide_restart(p, [0.0] * n, 1.0) for n in range(8)] == [
        Restart(d) for d in (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0)
    ]
    assert decide_restart(p, [0.0] * 5, 150.0) == Restart(1.0)  # window passed: back to 1 s
    assert decide_restart(p, [0.0] * 100_000, 1.0) == Restart(MAX_DELAY)  # no overflow
    assert decide_restart(policy(None, delay=90.0), [0.0] * 3, 1.0) == Restart(90.0)


def test_transition_table() -> None:
    S = ServiceState
    assert transition(S.STOPPED, S.RUNNING) == "start"
    assert transition(S.RUNNING, S.BACKOFF) == "exited_will_restart"
    assert transition(S.BACKOFF, S.RUNNING) == "restarted"
    assert transition(S.RUNNING, S.STOPPING) == "stop"
    with pytest.raises(IllegalTransition, match="stopped -> backoff"):
        transition(S.STOPPED, S.BACKOFF)
    with pytest.raises(IllegalTransition):
        transition(S.STOPPING, S.RUNNING)
    labels = list(TRANSITIONS.values())
    assert len(labels) == len(set(labels))
    reachable = {to for (_, to) in TRANSITIONS} | {ServiceState.STOPPED}
    assert reachable == set(ServiceState)


# --------------------------------------------------------------------------- properties

budgets = st.one_of(st.none(), st.integers(min_value=0, max_value=6))
windows = st.one_of(st.none(), st.floats(min_value=0.01, max_value=100.0))
delays = st.sampled_from([0.0, 0.001, 0.5, 3.0, 70.0])
gaps = st.lists(st.floats(min_value=0.0, max_value=50.0), min_size=1, max_size=40)


def simulate(p: RestartPolicy, run_times: list[float]) -> tuple[list[float], list[float]]:
    """A service that runs ``run_times[i]`` s each time: the restart times and delays."""
    now = 0.0
    history: list[float] = []
    restarts: list[float] = []
    delays_seen: list[float] = []
    for run in run_times:
        now += run
        decision = decide_restart(p, history, now)
        pruned = decide_restart(p, prune_restarts(p, history, now), now)
        assert pruned == decision  # pruning never changes a decision
        if isinstance(decision, GiveUp):
            break
        history.append(now)
        history = prune_restarts(p, history, now)
        restarts.append(now)
        delays_seen.append(decision.delay)
        now += decision.delay
    return restarts, delays_seen


@settings(max_examples=300, deadline=None, database=None)
@given(budget=budgets, window=windows, delay=delays, run_times=gaps)
def test_never_more_restarts_than_budget_in_any_window(
    budget: int | None, window: float | None, delay: float, run_times: list[float]
) -> None:
    p = policy(budget, window, delay)
    restarts, delays_seen = simulate(p, run_times)
    if budget is None:
        assert len(restarts) == len(run_times)
        return
    if window is None:
        assert len(restarts) <= budget
        return
    # Any window (a, a + w] holds the most restarts when it ends at a restart. Counted
    # the way fsm counts them (t - u < window), not as u > t - window: in floats the
    # two can disagree at the boundary (t=1.0, u=1/3, window=2/3).
    for t in restarts:
        assert sum(1 for u in restarts if u <= t and t - u < window) <= budget
    assert all(d <= max(MAX_DELAY, delay) for d in delays_seen)


@settings(max_examples=200, deadline=None, database=None)
@given(window=windows, delay=delays, run_times=gaps)
def test_delay_grows_while_restarts_stay_in_window(
    window: float | None, delay: float, run_times: list[float]
) -> None:
    p = policy(None, window, delay)
    restarts, delays_seen = simulate(p, run_times)
    for i in range(1, len(restarts)):
        if window is None or restarts[i] - restarts[0] < window:
            # every earlier restart is still inside the window: no reset yet
            assert delays_seen[i] >= delays_seen[i - 1]
