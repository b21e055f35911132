"""What the command line prints: aligned text tables and key/value summaries, the one terminal renderer.

Cells are text, as for `reports.common.markdown_table` (numbers formatted with `number` / `percent` first), so
a table goes to a markdown file or to the terminal from the same rows. Columns are two spaces apart; trailing
spaces are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

GAP = "  "


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    align: str = "",
    indent: str = "",
    widths: Sequence[int] = (),
) -> str:
    """Rows in aligned columns under `headers` (none when empty).

    `align` has a "<" (left) or ">" (right, for numbers) per column; columns it does not cover are left-aligned.
    `widths` are minimum column widths: rows printed one at a time, as each is measured, line up with each
    other.
    """
    lines = [list(headers)] if headers else []
    lines += [list(row) for row in rows]
    count = max((len(line) for line in lines), default=0)
    sizes = [max([len(line[i]) for line in lines if i < len(line)] + list(widths[i : i + 1])) for i in range(count)]
    sides = [align[i] if i < len(align) else "<" for i in range(count)]
    return "\n".join(_line(line, sides, sizes, indent) for line in lines)


def _line(cells: Sequence[str], sides: Sequence[str], sizes: Sequence[int], indent: str) -> str:
    padded = (f"{cell:{side}{size}}" for cell, side, size in zip(cells, sides, sizes, strict=False))
    return (indent + GAP.join(padded)).rstrip()


def key_values(pairs: Sequence[tuple[str, str]], indent: str = "") -> str:
    """`name  value` lines, the values lined up after the longest name."""
    return table((), pairs, indent=indent)
