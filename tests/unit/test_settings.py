"""The ``GEO_*`` variables are a public contract: their defaults, and the one-line error that
names a bad variable and stops a service before it touches the broker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.settings import Settings, SettingsError, load_settings, split_amqp_urls

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("GEO_"):
            monkeypatch.delenv(name)


def test_defaults_match_the_contract() -> None:
    settings = load_settings()
    assert settings.amqp_url == "amqp://guest:guest@localhost:5672/"
    assert settings.db_path == Path("data/geo_cache.sqlite3")
    assert settings.flush_interval == 60
    assert settings.re_resolve_interval == 600
    assert settings.provider == "embedded"
    assert settings.provider_chain == ("embedded",)


def test_variables_are_read_with_the_geo_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEO_AMQP_URL", "amqps://u:p@rabbit:5671/bangui")
    monkeypatch.setenv("GEO_DB_PATH", "/var/lib/geo/cache.sqlite3")
    monkeypatch.setenv("GEO_FLUSH_INTERVAL", "0.5")
    monkeypatch.setenv("GEO_RE_RESOLVE_INTERVAL", "30")
    monkeypatch.setenv("GEO_PROVIDER", " embedded , ip-api ")
    monkeypatch.setenv("GEO_IPAPI_URL", "http://ip-api.local/")
    monkeypatch.setenv("FLUSH_INTERVAL", "999")  # no prefix: not ours
    settings = load_settings()
    assert settings.amqp_url == "amqps://u:p@rabbit:5671/bangui"
    assert settings.db_path == Path("/var/lib/geo/cache.sqlite3")
    assert settings.flush_interval == 0.5
    assert settings.re_resolve_interval == 30
    assert settings.provider_chain == ("embedded", "ip-api")
    assert settings.ipapi_url == "http://ip-api.local"


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("GEO_FLUSH_INTERVAL", "soon", "valid number"),
        ("GEO_FLUSH_INTERVAL", "0", "greater than or equal to 0.05"),
        ("GEO_RE_RESOLVE_INTERVAL", "-5", "greater than or equal to 0.05"),
        ("GEO_AMQP_URL", "http://localhost:5672/", "must start with amqp://"),
        ("GEO_AMQP_URL", "amqp://a:5672/,http://b:5672/", "each URL of the list must start"),
        ("GEO_PROVIDER", "maxmind", "unknown provider maxmind"),
        ("GEO_PROVIDER", "embedded,,ip-api", "unknown provider"),
        ("GEO_PREFETCH", "1", "greater than or equal to 2"),
        ("GEO_CACHE_MAX_ENTRIES", "0", "greater than or equal to 1"),
        ("GEO_DRAIN_TIMEOUT", "30", "less than or equal to 8"),
        ("GEO_LOG_LEVEL", "verbose", "'debug', 'info', 'warning' or 'error'"),
        ("GEO_IPAPI_URL", "ip-api.com", "must start with http://"),
    ],
)
def test_bad_value_names_the_variable_first(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    text = str(info.value)
    assert text.startswith(f"{variable}: ")
    assert says in text
    assert repr(value) in text
    assert "\n" not in text
    assert "pydantic" not in text


def test_a_rule_across_variables_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEO_PROVIDER", "embedded,mmdb")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert str(info.value).startswith("GEO_MMDB_PATH ")


def test_settings_built_explicitly_ignore_nothing_they_are_given() -> None:
    settings = Settings(flush_interval=2.0, prefetch=10, negative_ttl=0)
    assert (settings.flush_interval, settings.prefetch, settings.negative_ttl) == (2.0, 10, 0)


def test_service_with_a_bad_setting_exits_2_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEO_")}
    env["GEO_FLUSH_INTERVAL"] = "soon"
    result = subprocess.run(
        [sys.executable, "-m", "services.resolver"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "GEO_FLUSH_INTERVAL" in lines[0]
    assert lines[0].startswith("resolver: invalid setting GEO_FLUSH_INTERVAL: ")
    assert result.stdout == ""


def test_secret_files_supply_settings_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "geo_amqp_url").write_text("amqp://geo-resolver:s3cret@broker:5672/bangui\n")
    monkeypatch.setenv("GEO_SECRETS_DIR", str(tmp_path))
    monkeypatch.delenv("GEO_AMQP_URL", raising=False)
    assert load_settings().amqp_url == "amqp://geo-resolver:s3cret@broker:5672/bangui"
    monkeypatch.setenv("GEO_AMQP_URL", "amqp://from-env:5672/")
    assert load_settings().amqp_url == "amqp://from-env:5672/"


def test_amqp_url_may_list_cluster_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().amqp_urls == ("amqp://guest:guest@localhost:5672/",)
    nodes = "amqp://u:p@rabbit-a:5672/bangui, amqp://u:p@rabbit-b:5672/bangui,amqps://c/bangui"
    monkeypatch.setenv("GEO_AMQP_URL", nodes)
    settings = load_settings()
    assert settings.amqp_url == nodes  # as given: the variable keeps its value
    assert settings.amqp_urls == (
        "amqp://u:p@rabbit-a:5672/bangui",
        "amqp://u:p@rabbit-b:5672/bangui",
        "amqps://c/bangui",
    )


def test_a_comma_inside_a_single_url_does_not_split_it() -> None:
    # RFC 3986 allows a comma unencoded in the password: only ",<scheme>://" starts a new URL.
    assert split_amqp_urls("amqp://geo:pa,ss@rabbit:5672/bangui") == (
        "amqp://geo:pa,ss@rabbit:5672/bangui",
    )
    assert split_amqp_urls("amqp://geo:a,b@x/v,amqp://geo:c,d@y/v") == (
        "amqp://geo:a,b@x/v",
        "amqp://geo:c,d@y/v",
    )


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("GEO_FLUSH_INTERVAL", "inf", "Input should be a finite number"),
        ("GEO_FLUSH_INTERVAL", "nan", "Input should be a finite number"),
        ("GEO_FLUSH_INTERVAL", "0.001", "greater than or equal to 0.05"),
        ("GEO_FLUSH_INTERVAL", "100000", "less than or equal to 86400"),
        ("GEO_RE_RESOLVE_INTERVAL", "0", "greater than or equal to 0.05"),
        ("GEO_RE_RESOLVE_INTERVAL", "1e9", "less than or equal to 604800"),
        ("GEO_NEGATIVE_TTL", "inf", "Input should be a finite number"),
    ],
)
def test_intervals_are_finite_and_bounded(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).startswith(f"{variable}: ")
    assert says in str(caught.value)


def test_the_bounds_themselves_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEO_FLUSH_INTERVAL", "0.05")
    monkeypatch.setenv("GEO_RE_RESOLVE_INTERVAL", "604800")
    settings = load_settings()
    assert (settings.flush_interval, settings.re_resolve_interval) == (0.05, 604800.0)
