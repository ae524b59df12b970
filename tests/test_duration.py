"""Durations as people type them on the command line (``--ttl``, ``--timeout``)."""

from __future__ import annotations

import pytest

from pushfw.producer.duration import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("600", 600),
        ("1", 1),
        ("45s", 45),
        ("10m", 600),
        ("1h30m", 5400),
        ("2d", 172800),
        ("1w", 604800),
        ("1w2d3h4m5s", 604800 + 2 * 86400 + 3 * 3600 + 4 * 60 + 5),
        ("1H30M", 5400),
        (" 10m ", 600),
        ("90m", 5400),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    """A bare number is seconds; units s, m, h, d, w add up, in any case."""
    assert parse_duration(text) == seconds


NOT_DURATIONS = {
    "empty": "",
    "blank": "   ",
    "negative": "-5",
    "unknown-unit": "10x",
    "fraction": "1.5h",
    "unit-first": "m10",
    "unit-only": "h",
    "inner-space": "1h 30m",
    "double-unit": "10mm",
    "exponent": "1e3",
    "hex": "0x10",
    "arabic-digits": "\u0666\u0660",  # Nd digits, but not ASCII
    "superscript": "\u00b2",  # str.isdigit() is true, int() fails
}


@pytest.mark.parametrize("text", NOT_DURATIONS.values(), ids=NOT_DURATIONS.keys())
def test_parse_duration_rejects(text: str) -> None:
    """Anything else is a ValueError that quotes the input and shows examples."""
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value) == f"{text!r} is not a duration (examples: 600, 10m, 1h30m, 2d)"


@pytest.mark.parametrize("text", ["0", "000", "0m", "0h0m"])
def test_parse_duration_rejects_zero(text: str) -> None:
    """A zero lifetime or timeout is a mistake, not "forever" or "now"."""
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value) == f"{text!r} must be longer than 0 seconds"
