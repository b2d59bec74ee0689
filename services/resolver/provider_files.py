"""The resolver's start check of its provider files: only the resolver reads them, so the other
services (same environment in compose) need not have them mounted, and the check lives here
rather than in the settings every service loads."""

from __future__ import annotations

from shared.settings import Settings, SettingsError


def check_provider_files(settings: Settings) -> None:
    """The provider files the resolver will read exist and are readable."""
    if "mmdb" not in settings.provider_chain:
        return
    for variable, path in (
        ("GEO_MMDB_PATH", settings.mmdb_path),
        ("GEO_MMDB_ASN_PATH", settings.mmdb_asn_path),
    ):
        if path is None:
            continue
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise SettingsError(f"{variable}: cannot read {path}: {exc.strerror or exc}") from None
