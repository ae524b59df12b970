"""Listings for people (aligned tables) and for scripts (JSON)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

__all__ = ["as_json", "as_table", "plural"]


def as_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """An aligned text table with upper-case headers; empty cells show as ``-``."""
    cells = [[str(row.get(col, "")) or "-" for col in columns] for row in rows]
    widths = [max([len(col), *(len(r[i]) for r in cells)]) for i, col in enumerate(columns)]
    lines = ["  ".join(col.upper().ljust(w) for col, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def as_json(rows: Sequence[Mapping[str, object]]) -> str:
    return json.dumps(list(rows), indent=2, default=str)


def plural(count: int, noun: str, nouns: str = "") -> str:
    """A count with its noun: ``1 rule``, ``2 rules``, ``plural(n, "entry", "entries")``."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"
