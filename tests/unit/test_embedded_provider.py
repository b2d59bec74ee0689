"""The offline ``embedded`` provider: countries as ``iptocc`` registers them, names from
``pycountry``, no ASN or org, and silence about addresses it does not know."""

from __future__ import annotations

import iptocc
import pycountry

from services.resolver.providers.embedded import EmbeddedProvider
from shared.messages import Resolution

SAMPLE = [
    "8.8.8.8",
    "1.1.1.1",
    "193.0.6.139",
    "200.160.2.3",
    "41.0.0.1",
    "81.2.69.142",
    "133.1.1.1",
    "2001:4860:4860::8888",
    "2001:67c:2e8:22::c100:68b",
]
UNKNOWN = ["10.0.0.1", "240.0.0.1", "192.0.2.1"]


async def test_answers_match_iptocc_and_pycountry() -> None:
    answers = await EmbeddedProvider().lookup(SAMPLE)
    codes = iptocc.country_code(SAMPLE)
    assert all(codes), "the sample should only hold registered addresses"
    assert set(answers) == set(SAMPLE)
    for ip, code in zip(SAMPLE, codes, strict=True):
        geo = answers[ip]
        assert geo.country_code == code
        country = pycountry.countries.get(alpha_2=code)
        assert country is not None
        assert geo.country_name == country.name
        assert (geo.asn, geo.org) == (None, None)
        assert geo.resolution is Resolution.RESOLVED
        assert geo.provider == "embedded"


async def test_well_known_addresses() -> None:
    answers = await EmbeddedProvider().lookup(["8.8.8.8", "193.0.6.139"])
    assert answers["8.8.8.8"].country_code == "US"
    assert answers["8.8.8.8"].country_name == "United States"
    assert answers["193.0.6.139"].country_code == "NL"


async def test_unknown_addresses_are_left_out() -> None:
    ips = ["8.8.8.8", *UNKNOWN]
    assert iptocc.country_code(UNKNOWN) == [None] * len(UNKNOWN)
    answers = await EmbeddedProvider().lookup(ips)
    assert set(answers) == {"8.8.8.8"}


async def test_empty_question_gets_an_empty_answer() -> None:
    provider = EmbeddedProvider()
    assert await provider.lookup([]) == {}
    await provider.close()
