"""Publishing ``ip.seen`` from another BanGUI component: the supported, uniquely named import.

``from bangui_geo.client import GeoPublisher`` stays valid however the services' internals
(``shared.client`` today) are arranged.
"""

from shared.client import BrokerError, BrokerUnreachable, GeoPublisher, PublishFailed

__all__ = ["BrokerError", "BrokerUnreachable", "GeoPublisher", "PublishFailed"]
