"""GeoCache without a loop or a clock: hits and misses, the LRU bound, the dirty and in-flight
sets that flushes rely on, and the negative cache of failed lookups."""

from __future__ import annotations

import pytest

from services.resolver.cache import DirtyEntry, GeoCache
from services.resolver.geo import FAILED, NOT_GLOBAL, Geo
from shared.messages import Resolution

T0 = 1_800_000_000.0


def us() -> Geo:
    return Geo("US", "United States", None, None, Resolution.RESOLVED, "fake")


def de() -> Geo:
    return Geo("DE", "Germany", None, None, Resolution.RESOLVED, "fake")


def persist_all(cache: GeoCache) -> list[DirtyEntry]:
    """What a successful flush does: swap the dirty set out, then confirm it."""
    entries = cache.take_dirty()
    cache.confirm_flushed(entries)
    return entries


def test_unknown_ip_is_a_miss() -> None:
    cache = GeoCache(10, 300)
    assert cache.get("8.8.8.8", T0) is None
    assert (cache.hits, cache.misses) == (0, 1)


def test_put_then_get_is_a_hit() -> None:
    cache = GeoCache(10, 300)
    cache.put("8.8.8.8", us(), T0)
    assert cache.get("8.8.8.8", T0) == us()
    assert (cache.hits, cache.misses) == (1, 0)
    assert len(cache) == 1


def test_missing_gives_distinct_uncached_ips_in_first_seen_order() -> None:
    cache = GeoCache(10, 300)
    cache.put("1.1.1.1", us(), T0)
    missing = cache.missing(["9.9.9.9", "1.1.1.1", "8.8.8.8", "9.9.9.9"], T0)
    assert missing == ["9.9.9.9", "8.8.8.8"]


def test_lru_evicts_least_recently_used_persisted_entry() -> None:
    cache = GeoCache(2, 300)
    cache.put("1.1.1.1", us(), T0)
    cache.put("2.2.2.2", us(), T0)
    persist_all(cache)
    assert cache.get("1.1.1.1", T0) is not None  # 1.1.1.1 is now the most recently used
    cache.put("3.3.3.3", de(), T0)
    assert len(cache) == 2
    assert cache.evictions == 1
    assert cache.get("2.2.2.2", T0) is None
    assert cache.get("1.1.1.1", T0) == us()
    assert cache.get("3.3.3.3", T0) == de()


def test_dirty_entries_are_never_evicted() -> None:
    cache = GeoCache(2, 300)
    for ip in ("1.1.1.1", "2.2.2.2", "3.3.3.3", "4.4.4.4"):
        cache.put(ip, us(), T0)
    assert len(cache) == 4  # over the bound until the flush
    assert cache.evictions == 0
    assert all(cache.get(ip, T0) is not None for ip in ("1.1.1.1", "2.2.2.2", "3.3.3.3"))


def test_in_flight_entries_are_never_evicted_and_the_bound_returns_after_confirm() -> None:
    cache = GeoCache(2, 300)
    for ip in ("1.1.1.1", "2.2.2.2", "3.3.3.3"):
        cache.put(ip, us(), T0)
    entries = cache.take_dirty()
    cache.put("4.4.4.4", de(), T0)
    assert len(cache) == 4
    assert cache.evictions == 0
    cache.confirm_flushed(entries)
    assert len(cache) == 2
    assert cache.evictions == 2
    assert cache.get("4.4.4.4", T0) == de()  # still dirty, so kept


def test_dirty_set_counts_each_ip_once_and_keeps_the_latest_answer() -> None:
    cache = GeoCache(10, 300)
    cache.put("8.8.8.8", FAILED, T0)
    cache.put("1.1.1.1", us(), T0)
    cache.put("8.8.8.8", us(), T0 + 5)
    assert cache.dirty_count == 2
    entries = {e.ip: e for e in cache.take_dirty()}
    assert entries["8.8.8.8"] == DirtyEntry("8.8.8.8", us(), T0 + 5)
    assert entries["1.1.1.1"] == DirtyEntry("1.1.1.1", us(), T0)
    assert cache.dirty_count == 0


def test_put_after_take_dirty_lands_in_the_next_take() -> None:
    cache = GeoCache(10, 300)
    cache.put("1.1.1.1", us(), T0)
    first = cache.take_dirty()
    cache.put("2.2.2.2", de(), T0 + 1)
    assert [e.ip for e in first] == ["1.1.1.1"]
    assert [e.ip for e in cache.take_dirty()] == ["2.2.2.2"]
    assert cache.take_dirty() == []


def test_taken_entries_stay_unpersisted_until_confirmed() -> None:
    cache = GeoCache(10, 300)
    assert not cache.is_unpersisted("1.1.1.1")
    cache.put("1.1.1.1", us(), T0)
    assert cache.is_unpersisted("1.1.1.1")
    entries = cache.take_dirty()
    assert cache.dirty_count == 0
    assert cache.is_unpersisted("1.1.1.1")
    cache.confirm_flushed(entries)
    assert not cache.is_unpersisted("1.1.1.1")


def test_confirming_an_old_flush_keeps_a_newer_answer_dirty() -> None:
    cache = GeoCache(10, 300)
    cache.put("1.1.1.1", FAILED, T0)
    entries = cache.take_dirty()
    cache.put("1.1.1.1", us(), T0 + 1)
    cache.confirm_flushed(entries)
    assert cache.is_unpersisted("1.1.1.1")
    assert cache.take_dirty() == [DirtyEntry("1.1.1.1", us(), T0 + 1)]


def test_restore_dirty_puts_a_failed_flush_back_and_newer_answers_win() -> None:
    cache = GeoCache(10, 300)
    cache.put("1.1.1.1", FAILED, T0)
    cache.put("2.2.2.2", us(), T0)
    entries = cache.take_dirty()
    cache.put("1.1.1.1", de(), T0 + 7)  # arrived while the flush was being published
    cache.restore_dirty(entries)
    assert cache.is_unpersisted("1.1.1.1")
    assert cache.is_unpersisted("2.2.2.2")
    again = {e.ip: e for e in cache.take_dirty()}
    assert again == {
        "1.1.1.1": DirtyEntry("1.1.1.1", de(), T0 + 7),
        "2.2.2.2": DirtyEntry("2.2.2.2", us(), T0),
    }


def test_failed_lookup_is_cached_for_the_negative_ttl_only() -> None:
    cache = GeoCache(10, negative_ttl=300)
    cache.put("8.8.8.8", FAILED, T0)
    persist_all(cache)
    assert cache.negative_count == 1
    assert cache.get("8.8.8.8", T0 + 299.9) is FAILED
    assert cache.get("8.8.8.8", T0 + 300) is None
    assert cache.missing(["8.8.8.8"], T0 + 301) == ["8.8.8.8"]


def test_successful_answer_clears_the_negative_entry() -> None:
    cache = GeoCache(10, negative_ttl=300)
    cache.put("8.8.8.8", FAILED, T0)
    cache.put("8.8.8.8", us(), T0 + 1)
    persist_all(cache)
    assert cache.negative_count == 0
    assert cache.get("8.8.8.8", T0 + 10_000) == us()


def test_not_global_is_final_and_never_expires() -> None:
    cache = GeoCache(10, negative_ttl=300)
    cache.put("10.0.0.1", NOT_GLOBAL, T0)
    persist_all(cache)
    assert cache.negative_count == 0
    assert cache.get("10.0.0.1", T0 + 10_000) is NOT_GLOBAL


def test_forget_failures_drops_persisted_failures_and_reports_what_needs_a_lookup() -> None:
    cache = GeoCache(10, negative_ttl=300)
    cache.put("8.8.8.8", FAILED, T0)
    cache.put("1.1.1.1", us(), T0)
    persist_all(cache)
    again = cache.forget_failures(["8.8.8.8", "1.1.1.1", "9.9.9.9", "8.8.8.8"])
    assert again == ["8.8.8.8", "9.9.9.9"]
    assert cache.negative_count == 0
    assert cache.get("8.8.8.8", T0) is None  # within the TTL, yet looked up again
    assert cache.get("1.1.1.1", T0) == us()


def test_forget_failures_keeps_an_unpersisted_failure_pinned() -> None:
    cache = GeoCache(10, negative_ttl=300)
    cache.put("8.8.8.8", FAILED, T0)
    assert cache.forget_failures(["8.8.8.8"]) == ["8.8.8.8"]
    assert cache.is_unpersisted("8.8.8.8")
    assert [e.ip for e in cache.take_dirty()] == ["8.8.8.8"]


def test_equal_answers_are_interned_as_one_object() -> None:
    cache = GeoCache(10, 300)
    first, second = us(), us()
    assert first is not second
    cache.put("1.1.1.1", first, T0)
    cache.put("8.8.8.8", second, T0)
    assert cache.get("1.1.1.1", T0) is cache.get("8.8.8.8", T0)
    entries = cache.take_dirty()
    assert entries[0].geo is entries[1].geo


def test_max_entries_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        GeoCache(0, 300)
