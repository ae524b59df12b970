"""A picture of a run: ``python -m bench.plot results/latest.json`` writes ``latest.svg``.

Two panels, drawn from the run's JSON alone (hand-written SVG, no plotting library):

- throughput: commands per second against the job size N, log-log, one line per backend and
  one for the per-rule ``iptables`` baseline measured in the same run (a hollow mark: a job
  stopped at its time limit, or a baseline estimate extrapolated past its samples);
- expiry lag: each backend's timed rules sorted by how late they left the kernel (the
  fraction of rules gone by then against the lag), from the ``lags_ms`` the TTL phase
  records; a run written before that field existed shows its min/p50/p99/max instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

__all__ = ["Series", "main", "render_svg", "write_svg"]

WIDTH, HEIGHT = 1000, 520
PANEL_W, PANEL_H = 380, 300
PANEL_TOP = 80
PANEL_LEFT = (90, 590)
COLORS = {
    "nftables": "#1f77b4",
    "ipset": "#2ca02c",
    "iptables": "#d62728",
    "memory": "#9467bd",
    "baseline": "#555555",
}
OTHER_COLORS = ("#ff7f0e", "#8c564b", "#e377c2", "#17becf")
FONT = 'font-family="sans-serif"'


@dataclass(frozen=True)
class Series:
    """One line of a panel: its points, and which of them are hollow (partial)."""

    name: str
    points: list[tuple[float, float]]
    hollow: list[bool]
    label: str = ""
    """The legend's words (default: the name)."""
    marks: bool = True
    """Draw a circle at each point (throughput); an ECDF of many points is a line only."""
    dashed: bool = False


def throughput_series(data: dict[str, Any]) -> list[Series]:
    """Rules per second against N: one series per backend, then the baseline."""
    out: list[Series] = []
    jobs = data.get("throughput") or []
    for backend in dict.fromkeys(j["backend"] for j in jobs):
        mine = sorted((j for j in jobs if j["backend"] == backend), key=lambda j: j["n"])
        mine = [j for j in mine if j.get("rules_per_s")]
        points = [(float(j["n"]), float(j["rules_per_s"])) for j in mine]
        out.append(Series(backend, points, [not j["completed"] for j in mine]))
    estimates = (data.get("baseline") or {}).get("estimates") or []
    if estimates:
        ordered = sorted(estimates, key=lambda e: e["n"])
        points = [(float(e["n"]), float(e["rules_per_s"])) for e in ordered]
        hollow = [bool(e["extrapolated"]) for e in ordered]
        label = "baseline: one iptables process per rule"
        out.append(Series("baseline", points, hollow, label=label, dashed=True))
    return out


def lag_series(data: dict[str, Any]) -> list[Series]:
    """Per backend: (lag ms, fraction of its removed rules gone by then)."""
    out: list[Series] = []
    for ttl in data.get("ttl") or []:
        lags = ttl.get("lags_ms")
        if lags:
            ordered = sorted(float(x) for x in lags)
            n = len(ordered)
            points = [(lag, (i + 1) / n) for i, lag in enumerate(ordered)]
            out.append(Series(ttl["backend"], points, [False] * n, marks=False))
        elif "p50_ms" in ttl:  # a report from before lags_ms was recorded
            keys = (("min_ms", 0.0), ("p50_ms", 0.5), ("p99_ms", 0.99), ("max_ms", 1.0))
            points = [(float(ttl[k]), f) for k, f in keys]
            out.append(Series(ttl["backend"], points, [True] * len(points)))
    return out


class Axis:
    """A linear or log10 mapping from data values to pixels, with ticks inside its range.

    A log axis with ``decades`` starts and ends at powers of ten; without, it reaches a
    little past the data on both sides (the job sizes: points never sit on the frame).
    """

    def __init__(
        self, low: float, high: float, pixels: tuple[float, float], log: bool, decades: bool
    ) -> None:
        self.log = log
        if log and decades:
            low, high = 10 ** math.floor(math.log10(low)), 10 ** math.ceil(math.log10(high))
            high = max(high, low * 10)
        elif log:
            low, high = low / 1.6, high * 1.6
        elif low == high:
            low, high = low - 1, high + 1
        self.low, self.high = low, high
        self.pixels = pixels

    def _t(self, value: float) -> float:
        return math.log10(value) if self.log else value

    def __call__(self, value: float) -> float:
        p0, p1 = self.pixels
        share = (self._t(value) - self._t(self.low)) / (self._t(self.high) - self._t(self.low))
        return p0 + share * (p1 - p0)

    def ticks(self) -> list[float]:
        if not self.log:
            ticks = nice_ticks(self.low, self.high, 8)
        else:
            first, last = math.floor(math.log10(self.low)), math.ceil(math.log10(self.high))
            decades = [10.0**k for k in range(first, last + 1)]
            inside = [t for t in decades if self.low <= t <= self.high]
            ticks = decades if len(inside) >= 3 else [d * m for d in decades for m in (1, 2, 5)]
        return [t for t in ticks if self.low <= t * (1 + 1e-9) and t <= self.high * (1 + 1e-9)]


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """About ``count`` round values (1, 2 or 5 times a power of ten) covering low..high."""
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(ticks[-1] + step)
    return ticks


def label(value: float) -> str:
    """A tick label: 1k, 10k, 1M for large numbers, plain otherwise."""
    if value == 0:
        return "0"
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def _value(y: float) -> str:
    """A point's value in its tooltip: rates with thousands separators, fractions exact."""
    return f"{y:,.1f}" if abs(y) >= 10 else f"{y:.4g}"


def _color(name: str, index: int) -> str:
    return COLORS.get(name, OTHER_COLORS[index % len(OTHER_COLORS)])


def _text(x: float, y: float, content: str, **attrs: str) -> str:
    extra = "".join(f" {k.replace('_', '-')}={quoteattr(v)}" for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}" {FONT}{extra}>{escape(content)}</text>'


def _frame(left: float, xa: Axis, ya: Axis, title: str, xlabel: str, ylabel: str) -> list[str]:
    """A panel's box, grid, ticks, tick labels and axis labels."""
    top, bottom, right = PANEL_TOP, PANEL_TOP + PANEL_H, left + PANEL_W
    parts = [
        _text(left + PANEL_W / 2, top - 14, title, font_size="15", text_anchor="middle"),
        f'<rect x="{left}" y="{top}" width="{PANEL_W}" height="{PANEL_H}" fill="none" '
        'stroke="#000"/>',
    ]
    for tick in xa.ticks():
        x = xa(tick)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#ddd"/>')
        parts.append(
            f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 5}" stroke="#000"/>'
        )
        parts.append(_text(x, bottom + 19, label(tick), font_size="12", text_anchor="middle"))
    for tick in ya.ticks():
        y = ya(tick)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<line x1="{left - 5}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#000"/>')
        parts.append(_text(left - 8, y + 4, label(tick), font_size="12", text_anchor="end"))
    parts.append(
        _text(left + PANEL_W / 2, bottom + 40, xlabel, font_size="13", text_anchor="middle")
    )
    y_mid = top + PANEL_H / 2
    parts.append(
        _text(
            left - 58,
            y_mid,
            ylabel,
            font_size="13",
            text_anchor="middle",
            transform=f"rotate(-90 {left - 58} {y_mid:.1f})",
        )
    )
    return parts


def _series(panel: str, series: Series, color: str, xa: Axis, ya: Axis) -> list[str]:
    """One series as a group: a polyline through its points and, if marked, a circle each."""
    coords = " ".join(f"{xa(x):.1f},{ya(y):.1f}" for x, y in series.points)
    dash = ' stroke-dasharray="6 4"' if series.dashed else ""
    parts = [
        f'<g class="series" data-panel="{panel}" data-series={quoteattr(series.name)} '
        f'data-points="{len(series.points)}">',
        f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"{dash}/>',
    ]
    if series.marks:
        for (x, y), hollow in zip(series.points, series.hollow, strict=True):
            fill = "#fff" if hollow else color
            parts.append(
                f'<circle cx="{xa(x):.1f}" cy="{ya(y):.1f}" r="4" fill="{fill}" stroke="{color}" '
                f'stroke-width="1.5"><title>{escape(series.name)}: {x:g}, {_value(y)}</title>'
                "</circle>"
            )
    parts.append("</g>")
    return parts


def _legend(left: float, series: Sequence[Series], colors: Sequence[str]) -> list[str]:
    """Swatch and name per series, in rows under the panel (never over its data)."""
    parts = ['<g class="legend">']
    x, y = left, PANEL_TOP + PANEL_H + 62
    for item, color in zip(series, colors, strict=True):
        words = item.label or item.name
        width = 40 + 6.8 * len(words)
        if x > left and x + width > left + PANEL_W:
            x, y = left, y + 18
        dash = ' stroke-dasharray="6 4"' if item.dashed else ""
        parts.append(
            f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x + 22:.1f}" y2="{y:.1f}" stroke="{color}" '
            f'stroke-width="2"{dash}/>'
        )
        parts.append(_text(x + 28, y + 4, words, font_size="12"))
        x += width
    parts.append("</g>")
    return parts


def _panel(
    panel: str,
    left: float,
    series: list[Series],
    log: tuple[bool, bool],
    title: str,
    xlabel: str,
    ylabel: str,
) -> list[str]:
    """A panel with its series; an empty panel says there was nothing to show."""
    if not series or not any(s.points for s in series):
        frame = [
            _text(left + PANEL_W / 2, PANEL_TOP - 14, title, font_size="15", text_anchor="middle"),
            f'<rect x="{left}" y="{PANEL_TOP}" width="{PANEL_W}" height="{PANEL_H}" fill="none" '
            'stroke="#000"/>',
        ]
        middle = PANEL_TOP + PANEL_H / 2
        return [*frame, _text(left + PANEL_W / 2, middle, "not measured", text_anchor="middle")]
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    x_low, x_high = min(xs), max(xs)
    if not log[0]:
        pad = (x_high - x_low) * 0.03 or 1.0
        x_low, x_high = x_low - pad, x_high + pad
    y_low, y_high = (min(ys), max(ys)) if log[1] else (0.0, 1.0)
    xa = Axis(x_low, x_high, (left, left + PANEL_W), log[0], decades=False)
    ya = Axis(y_low, y_high, (PANEL_TOP + PANEL_H, PANEL_TOP), log[1], decades=True)
    colors = [_color(s.name, i) for i, s in enumerate(series)]
    parts = _frame(left, xa, ya, title, xlabel, ylabel)
    for item, color in zip(series, colors, strict=True):
        parts += _series(panel, item, color, xa, ya)
    return parts + _legend(left, series, colors)


def render_svg(data: dict[str, Any]) -> str:
    """The plot of one run's JSON (as ``python -m bench`` writes it), as SVG text."""
    machine = data.get("machine") or {}
    kind = "quick" if data.get("quick") else "full"
    heading = f"pushfw benchmark ({kind}), {data.get('started', '?')}"
    where = f"{machine.get('nproc', '?')} CPUs, {machine.get('cpu_model', '?')}, kernel "
    where += f"{machine.get('kernel', '?')}"
    ttl = data.get("ttl") or []
    lag_note = ""
    if ttl:
        low, high = ttl[0]["ttl_s"]
        lag_note = f" (ttl {low}-{high} s)"
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}">',
        f"<title>{escape(heading)}</title>",
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#fff"/>',
        _text(WIDTH / 2, 24, heading, font_size="17", text_anchor="middle"),
        _text(WIDTH / 2, 44, where, font_size="12", text_anchor="middle", fill="#444"),
        *_panel(
            "throughput",
            PANEL_LEFT[0],
            throughput_series(data),
            (True, True),
            "Throughput (first XADD to all N acked)",
            "N (commands in the job)",
            "commands/s",
        ),
        *_panel(
            "lag",
            PANEL_LEFT[1],
            lag_series(data),
            (False, False),
            f"Expiry lag{lag_note}",
            "lag after expiry (ms)",
            "fraction of timed rules gone",
        ),
        _text(
            WIDTH / 2,
            HEIGHT - 12,
            "hollow mark: job stopped at its time limit, baseline extrapolated, or a "
            "percentile (runs without lags_ms)",
            font_size="11",
            text_anchor="middle",
            fill="#444",
        ),
        "</svg>",
    ]
    return "\n".join(parts) + "\n"


def write_svg(data: dict[str, Any], json_path: Path) -> Path:
    """Write the plot next to ``json_path`` (same name, ``.svg``); its path."""
    out = json_path.with_suffix(".svg")
    out.write_text(render_svg(data))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.plot", description="Draw a benchmark run's JSON as an SVG."
    )
    parser.add_argument("json", type=Path, help="a report written by python -m bench")
    parser.add_argument("--out", type=Path, help="SVG file (default: next to the JSON)")
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    if args.out:
        args.out.write_text(render_svg(data))
        out = args.out
    else:
        out = write_svg(data, args.json)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
