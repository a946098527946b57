"""Plain-text output for operators: aligned tables, times and byte counts."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime


def render_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, right: Collection[str] = ()
) -> str:
    """Columns padded to their widest cell, two spaces apart; `right` names right-aligned ones."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = []
    for cells in (header, *rows):
        padded = [
            cell.rjust(width) if name in right else cell.ljust(width)
            for name, cell, width in zip(header, cells, widths, strict=True)
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def format_time(moment: datetime | None, *, seconds: bool = False, never: str = "-") -> str:
    """Local time to the minute (or second); `never` for None."""
    if moment is None:
        return never
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def format_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")
