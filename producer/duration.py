"""Durations as people write them: ``600``, ``10m``, ``1h30m``, ``2d``."""

from __future__ import annotations

import re

__all__ = ["parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"([0-9]+)([smhdw])")


def parse_duration(text: str) -> int:
    """Seconds in ``text``; a bare number is seconds.

    Raises:
        ValueError: the text is not a positive duration.
    """
    raw = text.strip().lower()
    if raw.isascii() and raw.isdigit():
        seconds = int(raw)
    else:
        parts = _PART.findall(raw)
        if not parts or "".join(n + u for n, u in parts) != raw:
            raise ValueError(f"{text!r} is not a duration (examples: 600, 10m, 1h30m, 2d)")
        seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"{text!r} must be longer than 0 seconds")
    return seconds
