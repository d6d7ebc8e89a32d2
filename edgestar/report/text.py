"""Plain-text tables, as every edgestar command prints them."""
from __future__ import annotations


def text_table(rows: list[tuple[str, ...]], *, left: int = 1) -> list[str]:
    """``rows`` (the header first) as aligned lines with a dashed line under the header: the
    first ``left`` columns left-aligned, the others right-aligned (numbers)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines
