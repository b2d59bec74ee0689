"""The ip-api pacing arithmetic, without a loop or a clock: budget, server hints, backoff."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.resolver.providers.ratelimit import Backoff, RequestBudget


def send_all(budget: RequestBudget, times: list[float]) -> None:
    for t in times:
        assert budget.next_allowed(t) == t
        budget.record_sent(t)


def test_budget_allows_the_limit_then_waits_for_the_oldest_send_to_leave_the_window() -> None:
    budget = RequestBudget(limit=3, window=60.0, margin=1.0)
    send_all(budget, [0.0, 10.0, 20.0])
    assert budget.next_allowed(20.0) == 61.0
    assert budget.next_allowed(61.0) == 61.0
    budget.record_sent(61.0)
    assert budget.next_allowed(61.0) == 71.0  # the 10.0 send is now the oldest in the window


def test_budget_without_margin_is_exactly_the_window() -> None:
    budget = RequestBudget(limit=2, window=1.0)
    send_all(budget, [5.0, 5.5])
    assert budget.next_allowed(5.6) == 6.0


def test_server_saying_nothing_is_left_holds_requests_until_its_reset() -> None:
    budget = RequestBudget(limit=15, window=60.0)
    budget.record_sent(0.0)
    budget.observe(0.2, remaining=0, ttl=42.0)  # someone else used our address's budget
    assert budget.next_allowed(0.2) == 42.2
    assert budget.next_allowed(50.0) == 50.0


def test_server_budget_counts_down_with_our_own_sends() -> None:
    budget = RequestBudget(limit=15, window=60.0)
    budget.record_sent(0.0)
    budget.observe(0.1, remaining=2, ttl=10.0)
    send_all(budget, [1.0, 2.0])
    assert budget.next_allowed(2.0) == 10.1


def test_server_window_rolling_over_forgets_its_count() -> None:
    budget = RequestBudget(limit=15, window=60.0)
    budget.record_sent(0.0)
    budget.observe(0.1, remaining=1, ttl=5.0)
    send_all(budget, [6.0, 7.0, 8.0])  # 6.0 is past the server's reset: its count starts over
    assert budget.next_allowed(8.0) == 8.0


def test_missing_headers_change_nothing() -> None:
    budget = RequestBudget(limit=1, window=10.0)
    budget.record_sent(0.0)
    budget.observe(0.1, remaining=None, ttl=None)
    budget.observe(0.1, remaining=0, ttl=None)
    assert budget.next_allowed(1.0) == 10.0


def test_block_until_only_ever_extends() -> None:
    budget = RequestBudget(limit=15, window=60.0)
    budget.block_until(30.0)
    budget.block_until(20.0)
    assert budget.blocked_until() == 30.0
    assert budget.next_allowed(0.0) == 30.0
    assert budget.next_allowed(31.0) == 31.0


@pytest.mark.parametrize(("limit", "window", "margin"), [(0, 1.0, 0.0), (1, 0.0, 0.0), (1, 1, -1)])
def test_budget_rejects_nonsense(limit: int, window: float, margin: float) -> None:
    with pytest.raises(ValueError, match="must"):
        RequestBudget(limit, window, margin)


@given(
    limit=st.integers(min_value=1, max_value=20),
    window=st.floats(min_value=0.5, max_value=120.0),
    gaps=st.lists(st.floats(min_value=0.0, max_value=30.0), min_size=1, max_size=120),
)
def test_no_window_ever_holds_more_than_the_limit(
    limit: int, window: float, gaps: list[float]
) -> None:
    """Whatever the demand, a client sending only when allowed stays inside every window."""
    budget = RequestBudget(limit, window)
    sent: list[float] = []
    now = 0.0
    for gap in gaps:
        now = budget.next_allowed(now + gap)
        budget.record_sent(now)
        sent.append(now)
    for i, start in enumerate(sent):
        assert sum(1 for t in sent[i:] if t < start + window) <= limit


def test_backoff_doubles_with_jitter_between_half_and_all_of_the_step() -> None:
    backoff = Backoff(base=1.0, cap=60.0)
    assert [backoff.failed(0.0) for _ in range(4)] == [0.5, 1.0, 2.0, 4.0]
    backoff.succeeded()
    assert [backoff.failed(0.999999) for _ in range(3)] == pytest.approx([1.0, 2.0, 4.0], rel=1e-5)


def test_backoff_is_capped_however_long_the_outage() -> None:
    backoff = Backoff(base=1.0, cap=60.0)
    delays = [backoff.failed(1.0) for _ in range(200)]
    assert max(delays) == 60.0
    assert delays[-1] == 60.0
    assert backoff.failures == 200


def test_backoff_success_starts_over() -> None:
    backoff = Backoff(base=0.25, cap=1.0)
    backoff.failed(0.5)
    backoff.failed(0.5)
    backoff.succeeded()
    assert backoff.failures == 0
    assert backoff.failed(0.0) == 0.125


@given(jitter=st.floats(min_value=0.0, max_value=1.0), failures=st.integers(1, 80))
def test_backoff_stays_within_half_and_all_of_the_capped_step(jitter: float, failures: int) -> None:
    backoff = Backoff(base=1.0, cap=30.0)
    for _ in range(failures - 1):
        backoff.failed(0.5)
    step = min(30.0, 2.0 ** (failures - 1))
    assert step / 2 <= backoff.failed(jitter) <= step


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (2.0, 1.0)])
def test_backoff_rejects_nonsense(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="must"):
        Backoff(base, cap)
