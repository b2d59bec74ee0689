"""The lookup port: given IPs, say what is known about each; and the chain of providers.

A provider answers the IPs it can and leaves the others out; the chain asks the next provider
about what is still unanswered, and whatever no provider answered is a failure the caller keeps
in the negative cache and persists as a NULL row for re-resolve to retry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import structlog

from services.resolver.geo import Geo

log = structlog.get_logger("resolver.lookup")


class GeoLookup(Protocol):
    name: str

    async def lookup(self, ips: Sequence[str]) -> Mapping[str, Geo]:
        """Answers for some of ``ips`` (all routable, distinct); missing means "don't know"."""
        ...

    async def close(self) -> None: ...


class ProviderChain:
    """Asks each provider in turn about the IPs the earlier ones did not answer."""

    def __init__(self, providers: Sequence[GeoLookup]) -> None:
        if not providers:
            raise ValueError("a provider chain needs at least one provider")
        self.providers = tuple(providers)
        self.name = ",".join(p.name for p in providers)

    async def lookup(self, ips: Sequence[str]) -> Mapping[str, Geo]:
        answers: dict[str, Geo] = {}
        pending = list(ips)
        for provider in self.providers:
            if not pending:
                break
            try:
                found = await provider.lookup(pending)
            except Exception as exc:  # one broken provider must not hide the next one's answers
                log.warning(
                    "geo_provider_failed", provider=provider.name, ips=len(pending), error=repr(exc)
                )
                continue
            answers.update(found)
            pending = [ip for ip in pending if ip not in found]
        return answers

    async def close(self) -> None:
        for provider in reversed(self.providers):
            await provider.close()
