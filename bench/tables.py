"""One aligned text table: the header row, a rule, then the rows (cells padded to their
column's widest, trailing spaces dropped). Shared by the benchmark scripts that print a
plain table of strings."""

from __future__ import annotations

from collections.abc import Sequence


def aligned(rows: Sequence[Sequence[str]]) -> str:
    """``rows[0]`` is the header; every row has as many cells."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    text = [
        " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    text.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(text)
