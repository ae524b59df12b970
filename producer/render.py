"""Listings for people (aligned tables) and for scripts (JSON).

Also the one way a listing writes time: a point as ``2026-11-27 12:40:01`` in a table and
ISO 8601 UTC beside its epoch ms in JSON, a span as ``9m 58s``, a time left as ``never``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from pushfw.producer.entry_ids import entry_ms

__all__ = [
    "ago",
    "as_json",
    "as_table",
    "entry_ms",
    "expires_in",
    "iso_ms",
    "listing",
    "plural",
    "span",
    "when",
]


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


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def when(entry_id: str) -> str:
    """When Redis stamped an entry, as a table shows it: ``2026-11-27 12:40:01``."""
    return _utc(entry_ms(entry_id))


def iso_ms(ms: int) -> str:
    """Epoch ms as ISO 8601 UTC, e.g. ``2026-12-06T04:30:00.000Z``."""
    when = datetime.fromtimestamp(ms / 1000, UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def span(ms: int) -> str:
    """A duration as a person reads it: ``9m 58s``, ``3h 12m``, ``2d 4h``."""
    days, rest = divmod(max(0, ms // 1000), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {seconds}s" if minutes else f"{seconds}s"


def ago(ms: int) -> str:
    """How long ago ``ms`` milliseconds were: ``4m 2s ago`` (``in 3s`` when ahead)."""
    return span(ms) + " ago" if ms >= 0 else "in " + span(-ms)


def expires_in(expires_ms: int | None, now_ms: int, json_out: bool) -> object:
    """The time a rule or list has left: seconds (None: permanent) in JSON, ``9m 58s``
    (``never``) in a table."""
    left = None if expires_ms is None else max(0, expires_ms - now_ms)
    if json_out:
        return None if left is None else left / 1000
    return "never" if left is None else span(left)


_POINTS = {
    "time": "time_ms",
    "set_at": "set_ms",
    "expires_at": "expires_ms",
    "last_seen": "last_seen_ms",
    "started": "started_ms",
    "read_at": "read_ms",
}
"""Row keys that hold a point in time as Redis epoch ms, and the key its ms keep in JSON.
JSON shows each as ISO 8601 UTC (:func:`iso_ms`, as ``pushfw why``) beside its ms;
tables as ``2026-11-27 12:40:01`` under a ``..._UTC`` header. One format everywhere."""


_TABLE_UTC = ("time", "set_at")
"""The points tables show as dates (others, such as LAST_SEEN, show as ``4m 2s ago``)."""


def _times(row: Mapping[str, object], json_out: bool) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in row.items():
        ms_key = _POINTS.get(key)
        if ms_key is None or not (value is None or type(value) is int):
            out[key] = value
        elif json_out:
            out[key] = None if value is None else iso_ms(value)
            out[ms_key] = value
        else:
            out[key] = "" if value is None else _utc(value)
    return out


def listing(rows: Sequence[Mapping[str, object]], columns: Sequence[str], json_out: bool) -> str:
    """Rows as JSON (every key, points as ISO and ms) or as a table of ``columns``, whose
    points are UTC dates under a ``..._UTC`` header (a table says its zone)."""
    timed = [_times(row, json_out) for row in rows]
    if json_out:
        return as_json(timed)
    utc = [f"{c}_utc" if c in _TABLE_UTC else c for c in columns]
    named = [{f"{k}_utc" if k in _TABLE_UTC else k: v for k, v in row.items()} for row in timed]
    return as_table(named, utc)
