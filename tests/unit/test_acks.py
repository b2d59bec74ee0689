"""Planning acks for held deliveries: one ``multiple=True`` ack where it settles only what is
asked for, single acks for the rest."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.acks import plan_acks


def settled_by(unsettled: set[int], plan: tuple[int | None, list[int]]) -> list[int]:
    """What the broker settles for the plan: all unsettled tags up to the multiple, then singles."""
    multiple, singles = plan
    settled = [tag for tag in sorted(unsettled) if multiple is not None and tag <= multiple]
    return settled + singles


def test_nothing_to_ack() -> None:
    assert plan_acks({1, 2, 3}, []) == (None, [])


def test_a_single_tag_is_acked_alone() -> None:
    assert plan_acks({1, 2, 3}, [2]) == (None, [2])


def test_all_unsettled_tags_are_one_multiple_ack() -> None:
    assert plan_acks({1, 2, 3, 4}, [4, 2, 3, 1]) == (4, [])


def test_a_held_delivery_below_blocks_the_multiple_ack() -> None:
    # 1 is still held, so a multiple ack of anything would settle it too.
    assert plan_acks({1, 2, 3, 4}, [2, 3, 4]) == (None, [2, 3, 4])


def test_multiple_ack_stops_below_the_first_blocker() -> None:
    assert plan_acks({1, 2, 3, 4, 5, 6}, [1, 2, 3, 5, 6]) == (3, [5, 6])


def test_one_tag_below_the_blocker_is_not_worth_a_multiple_ack() -> None:
    assert plan_acks({1, 2, 3, 4}, [1, 3, 4]) == (None, [1, 3, 4])


def test_duplicates_are_acked_once() -> None:
    assert plan_acks({7, 8}, [8, 7, 8]) == (8, [])


@given(st.sets(st.integers(min_value=1, max_value=60), max_size=40), st.data())
def test_planned_acks_settle_exactly_the_asked_for_tags(
    unsettled: set[int], data: st.DataObject
) -> None:
    wanted = data.draw(st.lists(st.sampled_from(sorted(unsettled))) if unsettled else st.just([]))
    plan = plan_acks(unsettled, wanted)
    settled = settled_by(unsettled, plan)
    assert sorted(settled) == sorted(set(wanted))  # nothing extra, nothing missed
    assert len(settled) == len(set(settled))  # no tag acked twice (a channel error)
    multiple, singles = plan
    assert singles == sorted(singles)
    if multiple is not None:
        assert multiple in wanted
        assert sum(tag <= multiple for tag in unsettled) >= 2
