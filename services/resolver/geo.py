"""What the resolver knows about one IP, as a small immutable value shared between IPs.

Thousands of IPs share a handful of answers (country, name, no ASN), so equal ``Geo`` values are
interned by the cache: an entry costs a dict slot and a pointer, not a new object.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.messages import Resolution


@dataclass(frozen=True, slots=True)
class Geo:
    country_code: str | None
    country_name: str | None
    asn: str | None
    org: str | None
    resolution: Resolution
    provider: str | None

    @property
    def retryable(self) -> bool:
        return self.resolution is Resolution.FAILED


NOT_GLOBAL = Geo(None, None, None, None, Resolution.NOT_GLOBAL, None)
FAILED = Geo(None, None, None, None, Resolution.FAILED, None)
