"""Plain-text tables for the terminal: columns padded to their widest cell, numbers right."""

from __future__ import annotations

from collections.abc import Sequence


def render_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[int] = ()
) -> str:
    """A row shorter than ``headers`` ends with a cell that spans the rest (e.g. a note) and
    does not widen its column."""
    widths = [len(h) for h in headers]
    for row in rows:
        sized = row if len(row) >= len(headers) else row[:-1]
        for index, cell in enumerate(sized[: len(widths)]):
            widths[index] = max(widths[index], len(cell))

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if index in right else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=False))
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def thousands(count: int) -> str:
    return f"{count:,}"
