"""The resolver's memory: resolved entries (bounded, LRU), the dirty set not yet persisted, the
entries in flight to persistence, the negative cache of failed lookups, and the sightings (IPs
``ip.seen`` mentioned) since the last flush, for ``geo_cache.last_seen``.

Pure and synchronous: the caller passes ``now`` and nothing here touches the clock, the network
or the broker, so the flush and retry rules are unit-tested directly. ``take_dirty`` swaps the
dirty set out in one step, so an ``ip.seen`` that arrives mid-flush lands in the next flush.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import NamedTuple

from services.resolver.geo import Geo
from shared.messages import iso_utc_from_epoch

_MAX_INTERNED = 65_536
# Addresses noted as seen (or retried) between two flushes, at most: a bound on memory that
# does not grow with the cache (~70 B each: a reference and the message's string). Past it,
# sightings are dropped until the flush (counted): last_seen is a day stamp, and an IP seen
# again the next window is noted then.
MAX_SIGHTINGS = 50_000


class FlushSightings(NamedTuple):
    seen: list[str]  # IPs seen that this flush carries no sighting row for, in IP order
    retried: frozenset[str]  # IPs of this flush's rows answered for a retry, not a sighting


class DirtyEntry(NamedTuple):  # a tuple: a flush builds one per row, so creation must be cheap
    ip: str
    geo: Geo
    resolved_at: float


class GeoCache:
    def __init__(self, max_entries: int, negative_ttl: float) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.negative_ttl = negative_ttl
        self._entries: OrderedDict[str, Geo] = OrderedDict()
        self._dirty: dict[str, float] = {}
        self._in_flight: set[str] = set()
        self._negative_until: dict[str, float] = {}
        # When each answer was obtained: the epoch of a fresh answer (one float object shared by
        # a delivery's IPs), or a known row's own cached_at text, for geo.lookup replies.
        self._stamps: dict[str, float | str] = {}
        self._interned: dict[Geo, Geo] = {}
        self._interned_ids: dict[int, Geo] = {}  # id -> the interned object, kept alive
        # Per flush window, not per entry: emptied by take_sightings, bounded by MAX_SIGHTINGS.
        # ip.seen's addresses as they came, in one flat list (no object per delivery for the
        # garbage collector to track); deduplicated at flush.
        self._seen: list[str] = []
        self._retried: set[str] = set()
        self._taken: dict[str, float] = {}  # the dirty set the last take_dirty swapped out
        self.sightings_dropped = 0
        self.sighting_compactions = 0
        self._seen_compacted = False  # this window's sightings were compacted and stayed full
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    @property
    def negative_count(self) -> int:
        return len(self._negative_until)

    def get(self, ip: str, now: float) -> Geo | None:
        """The cached answer, or None when ``ip`` needs a lookup (unknown, or negative expired)."""
        geo = self._entries.get(ip)
        if geo is None:
            self.misses += 1
            return None
        until = self._negative_until.get(ip)
        if until is not None and now >= until and ip not in self._dirty:
            self.misses += 1
            return None
        self._entries.move_to_end(ip)
        self.hits += 1
        return geo

    def missing(self, ips: Iterable[str], now: float) -> list[str]:
        """The distinct IPs of ``ips`` that need a lookup, in first-seen order."""
        seen: set[str] = set()
        out: list[str] = []
        for ip in ips:
            if ip not in seen:
                seen.add(ip)
                if self.get(ip, now) is None:
                    out.append(ip)
        return out

    def put(self, ip: str, geo: Geo, now: float) -> None:
        """Store an answer and mark it dirty; a retryable failure starts its negative TTL."""
        self.put_many(((ip, geo),), now)

    def put_many(self, answers: Iterable[tuple[str, Geo]], now: float) -> None:
        """``put`` for a batch of answers (one delivery's worth), with the lookups hoisted."""
        entries, dirty, negative = self._entries, self._dirty, self._negative_until
        stamps = self._stamps
        interned, interned_ids = self._interned, self._interned_ids
        until = now + self.negative_ttl
        for ip, geo in answers:
            if id(geo) not in interned_ids:  # providers mostly hand out shared objects already
                if len(interned) >= _MAX_INTERNED:  # many distinct ASN/org answers: start over
                    interned.clear()
                    interned_ids.clear()
                geo = interned.setdefault(geo, geo)
                interned_ids[id(geo)] = geo
            entries[ip] = geo
            entries.move_to_end(ip)
            stamps[ip] = now
            dirty[ip] = now
            if geo.retryable:
                negative[ip] = until
            elif negative:
                negative.pop(ip, None)
        if len(entries) > self.max_entries:
            self._evict()

    def put_known(self, known: Iterable[tuple[str, Geo, str]]) -> int:
        """Store answers ``geo_cache`` already holds (ip, answer, its cached_at): cached, but
        not dirty, since persisting them again would only rewrite their rows. An IP answered
        meanwhile keeps the newer answer. Returns how many were stored."""
        entries, stamps = self._entries, self._stamps
        stored = 0
        for ip, geo, cached_at in known:
            held = entries.get(ip)
            if held is not None and (not held.retryable or self.is_unpersisted(ip)):
                continue
            self._negative_until.pop(ip, None)
            entries[ip] = self._intern(geo)
            entries.move_to_end(ip)
            stamps[ip] = cached_at
            stored += 1
        if len(entries) > self.max_entries:
            self._evict()
        return stored

    def cached_at(self, ip: str) -> str | None:
        """When the cached answer for ``ip`` was obtained (ISO-8601 UTC), if cached."""
        stamp = self._stamps.get(ip)
        if stamp is None or ip not in self._entries:
            return None
        return stamp if isinstance(stamp, str) else iso_utc_from_epoch(stamp)

    def peek(self, ip: str) -> Geo | None:
        """The cached answer (a failure too), without counting a hit or a miss."""
        return self._entries.get(ip)

    def _intern(self, geo: Geo) -> Geo:
        interned, interned_ids = self._interned, self._interned_ids
        if id(geo) in interned_ids:
            return geo
        if len(interned) >= _MAX_INTERNED:
            interned.clear()
            interned_ids.clear()
        geo = interned.setdefault(geo, geo)
        interned_ids[id(geo)] = geo
        return geo

    def is_unpersisted(self, ip: str) -> bool:
        """Whether the answer for ``ip`` has not yet been confirmed by the broker downstream."""
        return ip in self._dirty or ip in self._in_flight

    def take_dirty(self) -> list[DirtyEntry]:
        """Swap out the dirty set; the entries stay pinned as in-flight until confirmed."""
        dirty, self._dirty = self._dirty, {}
        self._taken = dirty
        self._in_flight.update(dirty)
        return [DirtyEntry(ip, self._entries[ip], at) for ip, at in dirty.items()]

    def note_seen(self, ips: list[str]) -> None:
        """``ip.seen`` mentioned ``ips``: one C-level extend per delivery; the flush
        deduplicates them, off this path."""
        seen = self._seen
        if len(seen) >= MAX_SIGHTINGS and not self._seen_compacted:
            # Full of mentions, maybe of a few IPs (one seen in every message, a forged
            # stream): keep each once, so those do not crowd out the other IPs' sightings.
            # Once per window, so a window of distinct IPs costs one pass, not one per delivery.
            seen[:] = dict.fromkeys(seen)
            self.sighting_compactions += 1
            self._seen_compacted = len(seen) >= MAX_SIGHTINGS // 2
        if len(seen) < MAX_SIGHTINGS:
            seen.extend(ips)
        else:
            self.sightings_dropped += len(ips)

    def note_retried(self, ips: list[str]) -> None:
        """``ips`` are looked up for a retry or refresh: their rows are no sighting."""
        retried = self._retried
        if len(retried) >= MAX_SIGHTINGS:
            retried.clear()  # lookups that never produced a row (a failed refresh): forget them
        retried.update(ips)

    def take_sightings(self) -> FlushSightings:
        """The sightings since the last call, against the dirty set ``take_dirty`` just took:
        a row of that flush says itself that its IP was seen, unless it answered a retry."""
        taken, self._taken = self._taken, {}
        mentioned, self._seen = self._seen, []
        self._seen_compacted = False
        seen = set(mentioned)
        retried = self._retried.intersection(taken)
        if retried:
            self._retried.difference_update(retried)
        seen.difference_update(taken.keys() - retried)
        return FlushSightings(sorted(seen), frozenset(retried))

    def restore_sightings(self, sightings: FlushSightings) -> None:
        """Put back what a failed flush did not deliver (newer sightings stay)."""
        self._retried.update(sightings.retried)
        self.note_seen(sightings.seen)

    def confirm_flushed(self, entries: Iterable[DirtyEntry]) -> None:
        for entry in entries:
            self._in_flight.discard(entry.ip)
        self._evict()

    def restore_dirty(self, entries: Iterable[DirtyEntry]) -> None:
        """Put a failed flush back; answers that arrived meanwhile are newer and win."""
        for entry in entries:
            self._in_flight.discard(entry.ip)
            self._dirty.setdefault(entry.ip, entry.resolved_at)

    def forget_failures(self, ips: Iterable[str]) -> list[str]:
        """Drop failed answers for ``ips`` so the next ``get`` looks them up again.

        Returns the IPs that now need a lookup (the failed ones and the ones not cached).
        """
        out: list[str] = []
        for ip in dict.fromkeys(ips):
            geo = self._entries.get(ip)
            if geo is None or geo.retryable:
                self._negative_until.pop(ip, None)
                if geo is not None and not self.is_unpersisted(ip):
                    del self._entries[ip]
                    self._stamps.pop(ip, None)
                out.append(ip)
        return out

    def _evict(self) -> None:
        # Unpersisted entries are pinned; they are skipped (moved to the back) a bounded
        # number of times, so a cache full of dirty entries exceeds its bound until the flush.
        budget = len(self._dirty) + len(self._in_flight) + 1
        while len(self._entries) > self.max_entries and budget > 0:
            ip, geo = self._entries.popitem(last=False)
            if self.is_unpersisted(ip):
                self._entries[ip] = geo
                budget -= 1
                continue
            self._negative_until.pop(ip, None)
            self._stamps.pop(ip, None)
            self.evictions += 1
