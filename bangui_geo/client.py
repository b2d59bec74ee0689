"""Publishing ``ip.seen`` and asking ``geo.lookup`` from another BanGUI component: the
supported, uniquely named import.

``from bangui_geo.client import GeoPublisher, GeoClient`` stays
valid however the services' internals
(``shared.client`` today) are arranged.
"""

from shared.client import (
    BrokerError,
    BrokerUnreachable,
    GeoClient,
    GeoPublisher,
    LookupFailed,
    LookupRow,
    PublishFailed,
)

__all__ = [
    "BrokerError",
    "BrokerUnreachable",
    "GeoClient",
    "GeoPublisher",
    "LookupFailed",
    "LookupRow",
    "PublishFailed",
]
