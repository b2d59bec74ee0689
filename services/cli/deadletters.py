"""``bangui-geo dead-letters list|replay``: what is in ``geo.dead_letter`` and why, and sending
it back to ``bangui`` once the cause is fixed (the AMQP side is in ``shared.amqp``)."""

from __future__ import annotations

from collections.abc import Sequence

from shared.amqp import DeadLetter, PurgeReport, ReplayOutcome


def excerpt(body: bytes, limit: int) -> str:
    """The start of ``body`` as one printable line."""
    text = body[:limit].decode("utf-8", "replace")
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return shown + ("..." if len(body) > limit else "")


def render_letter(number: int, letter: DeadLetter, *, body_chars: int) -> str:
    """The trusted origin (``shared.deadletters``): never a header a publisher could forge."""
    delivered = letter.delivered_as if letter.delivered_as != letter.replay_key else None
    origin = " ".join(
        part
        for part in (
            f"rejected by {letter.rejected_by}" if letter.rejected_by else "",
            f"from {letter.original_queue}" if letter.original_queue else "",
            f"delivered as {delivered}" if delivered else "",
        )
        if part
    )
    head = f"#{number}  routing key {letter.replay_key or '-'}"
    lines = [
        head + (f"  {origin}" if origin else ""),
        f"    reason: {letter.reason}",
        f"    body ({len(letter.body):,} bytes): {excerpt(letter.body, body_chars)}",
    ]
    if letter.refusal is not None:
        lines.append(f"    replay: {letter.refusal}")
    return "\n".join(lines)


def render_list(total: int, letters: Sequence[DeadLetter], *, body_chars: int) -> str:
    if total == 0:
        return "geo.dead_letter is empty"
    shown = f", showing the first {len(letters)}" if len(letters) < total else ""
    lines = [f"geo.dead_letter: {total:,} message{'s' if total != 1 else ''}{shown}"]
    for number, letter in enumerate(letters, 1):
        lines.append(render_letter(number, letter, body_chars=body_chars))
    return "\n".join(lines)


def render_replay(total: int, outcomes: Sequence[ReplayOutcome], *, dry_run: bool) -> str:
    """``total``: the dead letters in the queue when the replay began (``--limit`` may have
    looked at fewer), so "left" counts the queue, not the page."""
    if not outcomes:
        return "geo.dead_letter is empty"
    lines = [
        f"#{n}  {o.note}  ({o.letter.reason})" if not o.replayed else f"#{n}  {o.note}"
        for n, o in enumerate(outcomes, 1)
    ]
    replayed = sum(o.replayed for o in outcomes)
    if dry_run:
        would = sum(o.note.startswith("would replay") for o in outcomes)
        lines.append(
            f"dry run: nothing replayed ({would:,} of the {len(outcomes):,} shown would be); "
            f"{total:,} left in geo.dead_letter"
        )
    else:
        kept = len(outcomes) - replayed
        lines.append(
            f"replayed {replayed:,} of {len(outcomes):,}; {kept:,} kept; "
            f"{total - replayed:,} left in geo.dead_letter"
        )
    return "\n".join(lines)


def purge_question(selected: int, total: int, criteria: str) -> str:
    return f"purge {selected:,} of the {total:,} dead letters in geo.dead_letter ({criteria})?"


def render_purge(report: PurgeReport) -> str:
    left = report.total - report.purged
    return f"purged {report.purged:,} dead letters; {left:,} left in geo.dead_letter"
