"""The agent's pure rules: where to read from after a purge, an unban or a new file, how bans
become messages, the lag, the back-off and the state file format."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from services.agent.backoff import retry_delay
from services.agent.command import parse_since
from services.agent.position import (
    START,
    BanRow,
    Continue,
    FileIdentity,
    Position,
    Rewind,
    StateCorrupt,
    advance,
    dump_state,
    group,
    lag_seconds,
    load_state,
    on_file,
    plan_read,
)
from services.agent.runner import bodies_of
from shared.messages import IpSeen

ANCHOR = BanRow(7, "sshd", "192.0.2.7", 1_000)
FILE = FileIdentity(device=1, inode=42)


def test_a_first_read_starts_at_the_beginning() -> None:
    assert plan_read(None, None) == Continue(0)


def test_an_anchor_still_in_place_continues_after_it() -> None:
    assert plan_read(ANCHOR, BanRow(7, "sshd", "192.0.2.7", 1_000)) == Continue(7)


@pytest.mark.parametrize(
    "found",
    [
        None,  # purged or unbanned
        BanRow(7, "sshd", "198.51.100.1", 1_050),  # its rowid reused by a newer ban
        BanRow(7, "nginx", "192.0.2.7", 1_000),
    ],
)
def test_an_anchor_gone_or_changed_rewinds_to_its_time(found: BanRow | None) -> None:
    assert plan_read(ANCHOR, found) == Rewind(after_rowid=7, since=1_000)


def test_the_same_file_keeps_its_position_another_starts_over() -> None:
    position = Position(FILE, ANCHOR)
    assert on_file(position, FILE) is position
    other = FileIdentity(device=1, inode=43)
    assert on_file(position, other) == Position(other, None)
    assert on_file(START, FILE) == Position(FILE, None)


def test_advance_moves_to_the_last_row_and_stays_without_rows() -> None:
    position = Position(FILE, ANCHOR)
    rows = [BanRow(8, "sshd", "192.0.2.8", 1_001), BanRow(9, "sshd", "192.0.2.9", 1_002)]
    assert advance(position, rows) == Position(FILE, rows[-1])
    assert advance(position, []) is position


def test_bans_are_grouped_by_jail_normalized_deduplicated_and_cut_at_1000() -> None:
    rows = [
        BanRow(n, "sshd", f"10.{n // 65536}.{(n // 256) % 256}.{n % 256}", n) for n in range(2500)
    ]
    rows += [
        BanRow(3000, "nginx", "2001:DB8::0001", 5),
        BanRow(3001, "sshd", "10.0.0.1", 9_999),  # again, later
        BanRow(3002, "recidive", "not-an-ip", 6),
    ]
    batch = group(rows)
    assert [(m.jail, len(m.ips)) for m in batch.messages] == [
        ("sshd", 1000),
        ("sshd", 1000),
        ("sshd", 500),
        ("nginx", 1),
    ]
    assert batch.messages[3].ips == ("2001:db8::1",)
    assert batch.ip_count == 2501
    assert [row.ip for row in batch.skipped] == ["not-an-ip"]
    # seen_at is the newest ban of the message: the repeated 10.0.0.1 counts with its later time
    assert batch.messages[0].seen_at == 9_999
    assert batch.messages[1].seen_at == 1_999
    assert batch.messages[2].seen_at == 2_499


def test_lag_is_the_newest_ban_minus_the_last_confirmed() -> None:
    newest = BanRow(20, "sshd", "192.0.2.20", 1_300)
    assert lag_seconds(ANCHOR, newest, None) == 300
    assert lag_seconds(newest, newest, None) == 0
    assert lag_seconds(ANCHOR, None, None) == 0
    assert lag_seconds(None, newest, BanRow(1, "sshd", "192.0.2.1", 1_100)) == 200
    assert lag_seconds(None, None, None) == 0


def test_back_off_doubles_up_to_the_cap_with_jitter_in_the_upper_half() -> None:
    delays = [retry_delay(n, base=0.5, cap=8.0, jitter=0.0) for n in range(8)]
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert retry_delay(3, base=0.5, cap=8.0, jitter=0.999) == pytest.approx(3.998)
    assert retry_delay(10_000, base=0.5, cap=30.0, jitter=0.5) == 22.5


def test_the_state_round_trips() -> None:
    position = Position(FILE, ANCHOR)
    assert load_state(dump_state(position, "/db"), "/db") == position
    assert load_state(dump_state(START, "/db"), "/db") == START


def test_a_state_of_another_database_path_is_the_start() -> None:
    assert load_state(dump_state(Position(FILE, ANCHOR), "/old"), "/new") == START


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "not JSON"),
        ('{"format": 1, "database": "/db"', "not JSON"),
        ("[1, 2]", "not a format-1 agent state"),
        ('{"format": 9, "database": "/db"}', "not a format-1 agent state"),
        ('{"format": 1, "database": "/db"}', "bad field"),
        (
            json.dumps(
                {
                    "format": 1,
                    "database": "/db",
                    "device": 1,
                    "inode": 2,
                    "anchor": {"rowid": "7", "jail": "sshd", "ip": "x", "timeofban": 1},
                }
            ),
            "bad field",
        ),
    ],
)
def test_a_corrupt_state_says_why(text: str, reason: str) -> None:
    with pytest.raises(StateCorrupt, match=reason):
        load_state(text, "/db")


def test_since_takes_an_age_or_an_iso_time() -> None:
    now = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
    assert parse_since("12h", now) == int(datetime(2026, 1, 10, 0, 0, tzinfo=UTC).timestamp())
    assert parse_since("7d", now) == int(datetime(2026, 1, 3, 12, 0, tzinfo=UTC).timestamp())
    assert parse_since("2026-01-01", now) == int(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
    assert parse_since("2026-01-01T00:00:00+01:00", now) == int(
        datetime(2025, 12, 31, 23, 0, tzinfo=UTC).timestamp()
    )
    with pytest.raises(ValueError, match="neither an ISO date/time nor an age"):
        parse_since("yesterday", now)


def test_the_bodies_are_ip_seen_messages_of_the_contract() -> None:
    rows = [BanRow(1, "sshd", "192.0.2.1", 1_764_000_000), BanRow(2, "nginx", "::ffff:1.2.3.4", 5)]
    bodies = bodies_of(group(rows))
    messages = [IpSeen.model_validate_json(body) for body in bodies]
    assert [m.addresses for m in messages] == [["192.0.2.1"], ["1.2.3.4"]]
    fields = [json.loads(body) for body in bodies]
    assert fields[0] == {
        "ips": ["192.0.2.1"],
        "source": "fail2ban",
        "jail": "sshd",
        "seen_at": "2025-11-24T16:00:00Z",
    }
    assert fields[1]["seen_at"] == "1970-01-01T00:00:05Z"
