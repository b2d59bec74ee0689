"""What the embedded provider should answer for an address, computed from its data (iptocc,
pycountry) directly, so a test compares the rows the services wrote with an independent
answer."""

from __future__ import annotations

import iptocc
import pycountry

from shared.ipnorm import is_routable

# Codes the RIR data uses that ISO 3166 (pycountry) has no country for, by the names the embedded
# provider gives them (a row with one of them is resolved and named).
RIR_ONLY_NAMES = {"EU": "European Union", "AP": "Asia/Pacific Region", "XK": "Kosovo"}


def expected_row(ip: str) -> tuple[str | None, str | None, str]:
    """(country_code, country_name, resolution) computed from the embedded data directly."""
    if not is_routable(ip):
        return None, None, "not_global"
    code = iptocc.country_code(ip)
    if code is None:
        return None, None, "failed"
    country = pycountry.countries.get(alpha_2=code)
    return code, (country.name if country else RIR_ONLY_NAMES.get(code)), "resolved"
