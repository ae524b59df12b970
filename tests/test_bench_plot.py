"""bench.plot draws a run's JSON as SVG: it parses, and shows every series and every point."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from bench.plot import nice_ticks, render_svg, write_svg

ROOT = Path(__file__).resolve().parent.parent
SVG = "{http://www.w3.org/2000/svg}"


def job(backend: str, n: int, rate: float, completed: bool = True) -> dict[str, Any]:
    return {"backend": backend, "n": n, "completed": completed, "rules_per_s": rate}


RUN: dict[str, Any] = {
    "quick": True,
    "started": "2026-12-01T13:30:00+00:00",
    "machine": {"nproc": 2, "cpu_model": "Test CPU", "kernel": "6.1.0"},
    "throughput": [
        job("nftables", 1000, 9000.0),
        job("nftables", 10_000, 12_500.0),
        job("iptables", 1000, 8000.0),
        job("iptables", 10_000, 3800.0, completed=False),
    ],
    "baseline": {
        "estimates": [
            {"n": 1000, "rules_per_s": 60.0, "extrapolated": False},
            {"n": 10_000, "rules_per_s": 54.0, "extrapolated": True},
        ]
    },
    "ttl": [
        {"backend": "nftables", "ttl_s": [1, 2], "p50_ms": 70.0, "lags_ms": [90.5, 20.0, 70.0]},
        {"backend": "ipset", "ttl_s": [1, 2], "p50_ms": 40.0, "lags_ms": [-3.0, 40.0, 41, 99.9]},
    ],
}


def groups(root: ET.Element, panel: str) -> dict[str, ET.Element]:
    found = root.iter(f"{SVG}g")
    return {g.attrib["data-series"]: g for g in found if g.attrib.get("data-panel") == panel}


def polyline_points(group: ET.Element) -> list[tuple[float, float]]:
    line = group.find(f"{SVG}polyline")
    assert line is not None
    pairs = (p.split(",") for p in line.attrib["points"].split())
    return [(float(x), float(y)) for x, y in pairs]


def marked(group: ET.Element) -> list[tuple[float, float]]:
    """The data values each circle's tooltip states, e.g. 'nftables: 1000, 9,000.0'."""
    values = []
    for circle in group.iter(f"{SVG}circle"):
        title = circle.find(f"{SVG}title")
        assert title is not None and title.text is not None
        x, y = title.text.split(": ", 1)[1].split(", ")
        values.append((float(x), float(y.replace(",", ""))))
    return values


def test_the_svg_parses_and_shows_every_series_and_point():
    root = ET.fromstring(render_svg(RUN))
    assert root.tag == f"{SVG}svg"

    throughput = groups(root, "throughput")
    assert list(throughput) == ["nftables", "iptables", "baseline"]
    for name, group in throughput.items():
        jobs = [j for j in RUN["throughput"] if j["backend"] == name] or RUN["baseline"][
            "estimates"
        ]
        want = sorted((float(j["n"]), float(j["rules_per_s"])) for j in jobs)
        assert group.attrib["data-points"] == str(len(want))
        assert len(polyline_points(group)) == len(want)
        assert marked(group) == want, name

    circles = {c.attrib["fill"] for c in throughput["iptables"].iter(f"{SVG}circle")}
    assert "#fff" in circles, "the unfinished job is hollow"

    lag = groups(root, "lag")
    assert list(lag) == ["nftables", "ipset"]
    for ttl in RUN["ttl"]:
        points = polyline_points(lag[ttl["backend"]])
        assert len(points) == len(ttl["lags_ms"])
        xs = [x for x, _ in points]
        ys = [y for _, y in points]
        assert xs == sorted(xs), "lags are drawn sorted"
        assert ys == sorted(ys, reverse=True), "the fraction gone only grows (upwards)"

    text = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    for words in ("commands/s", "lag after expiry (ms)", "1k", "10k", "Test CPU", "ttl 1-2 s"):
        assert words in text
    legends = [g for g in root.iter(f"{SVG}g") if g.attrib.get("class") == "legend"]
    assert [len(g.findall(f"{SVG}text")) for g in legends] == [3, 2]


def test_higher_rate_is_drawn_higher():
    root = ET.fromstring(render_svg(RUN))
    nft = polyline_points(groups(root, "throughput")["nftables"])
    base = polyline_points(groups(root, "throughput")["baseline"])
    assert nft[0][0] < nft[1][0], "N grows to the right"
    assert nft[1][1] < nft[0][1], "12,500/s sits above 9,000/s"
    assert all(b[1] > n[1] for b, n in zip(base, nft, strict=True)), "the baseline is below"


def test_a_run_without_lags_or_ttl_still_draws():
    old = {**RUN, "ttl": [{"backend": "iptables", "ttl_s": [2, 5], "p50_ms": 114.0}]}
    old["ttl"][0].update(min_ms=3.0, p99_ms=400.0, max_ms=427.0)
    lag = groups(ET.fromstring(render_svg(old)), "lag")
    assert marked(lag["iptables"]) == [(3.0, 0.0), (114.0, 0.5), (400.0, 0.99), (427.0, 1.0)]

    bare = {"quick": False, "throughput": [], "ttl": []}
    root = ET.fromstring(render_svg(bare))
    assert "not measured" in " ".join(t.text or "" for t in root.iter(f"{SVG}text"))


def test_written_next_to_the_json_and_redrawn_from_it(tmp_path: Path):
    report = tmp_path / "latest.json"
    report.write_text(json.dumps(RUN))
    assert write_svg(RUN, report) == tmp_path / "latest.svg"
    first = (tmp_path / "latest.svg").read_text()
    (tmp_path / "latest.svg").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.plot", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "latest.svg").read_text() == first


def test_nice_ticks_cover_the_range():
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    ticks = nice_ticks(-7.0, 432.0)
    assert ticks[0] <= -7 and ticks[-1] >= 432 and len(ticks) <= 8
