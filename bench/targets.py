"""One-host targets (speed, expiry lag) against a run's results: target, measured, met."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RATIO_N = 10_000
RATIO_TARGETS = {"nftables": 1000.0, "ipset": 1000.0, "iptables": 100.0}
P99_TARGETS_MS = {"nftables": 5.0, "ipset": 5.0, "iptables": 10.0}
LIMIT_SHARE = 0.5
LIMIT_BACKENDS = ("nftables", "ipset")
RSS_MILLION_MB = 100.0
TTL_LAG_MS = 1000.0
"""I5: a timed rule leaves the kernel within 1 s of its expiry."""

Row = dict[str, Any]


def _row(target: str, measured: str, met: bool | None) -> Row:
    return {"target": target, "measured": measured, "met": met}


def _ratios(data: dict[str, Any]) -> list[Row]:
    rows = []
    jobs = {(j["backend"], j["n"]): j for j in data["throughput"]}
    for backend, want in RATIO_TARGETS.items():
        if backend not in data["plan"]["backends"]:
            continue
        target = f"{backend}: {RATIO_N:,}-rule job vs baseline >= {want:,.0f}x"
        job = jobs.get((backend, RATIO_N))
        fair = job.get("ratio_vs_baseline_without_netns_exec") if job else None
        if job is None or fair is None or not job["completed"]:
            rows.append(_row(target, "not measured", None))
            continue
        measured = f"{fair:,.0f}x ({job['ratio_vs_baseline']:,.0f}x incl. netns exec)"
        rows.append(_row(target, measured, fair >= want))
    return rows


def _latency(data: dict[str, Any]) -> list[Row]:
    rows = []
    idle = {item["backend"]: item for item in data["latency"] if item["table_size"] == 0}
    for backend, want in P99_TARGETS_MS.items():
        if backend not in data["plan"]["backends"]:
            continue
        target = f"{backend}: p99 latency, idle worker < {want:g} ms"
        item = idle.get(backend)
        if item is None:
            rows.append(_row(target, "not measured", None))
            continue
        measured = f"{item['p99_ms']:.2f} ms (p50 {item['p50_ms']:.2f}, {item['samples']} samples)"
        rows.append(_row(target, measured, item["p99_ms"] < want))
    return rows


def _limit_shares(data: dict[str, Any]) -> list[Row]:
    rows = []
    lim = data["limits"]
    shares = {(s["backend"], s["n"]): s for s in lim["shares"]}
    for backend in LIMIT_BACKENDS:
        if backend not in data["plan"]["backends"]:
            continue
        n = lim["n"]
        target = (
            f"{backend}: {n:,}-rule job >= {LIMIT_SHARE:.0%} of min(bare drain, raw kernel batch)"
        )
        share = shares.get((backend, n))
        if share is None:
            rows.append(_row(target, "not measured", None))
            continue
        measured = (
            f"{share['share_of_limit']:.1%} ({share['rules_per_s']:,.0f}/s of "
            f"{share['limit_per_s']:,.0f}/s, the {share['limit_is']})"
        )
        rows.append(_row(target, measured, share["share_of_limit"] >= LIMIT_SHARE))
    return rows


def _million_rss(data: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    million = data["memory"].get("worker_rss_million", {})
    if not data["plan"].get("million"):
        return rows
    for backend in LIMIT_BACKENDS:
        if backend not in data["plan"]["backends"]:
            continue
        target = f"{backend}: worker RSS with 1,000,000 rules < {RSS_MILLION_MB:g} MB"
        item = million.get(backend)
        if item is None or not item["rules"]:
            rows.append(_row(target, "not measured (see notes)", None))
            continue
        mb = item["vmrss_kb"] * 1024 / 1e6
        if item["completed"]:
            measured = f"{mb:,.0f} MB (peak {item['vmhwm_kb'] * 1024 / 1e6:,.0f} MB)"
            rows.append(_row(target, measured, mb < RSS_MILLION_MB))
            continue
        at_million = item["vmrss_at_million_kb"] * 1024 / 1e6
        measured = (
            f"~{at_million:,.0f} MB extrapolated ({mb:,.0f} MB at {item['rules']:,} rules, "
            "job stopped)"
        )
        rows.append(_row(target, measured, mb < RSS_MILLION_MB and at_million < RSS_MILLION_MB))
    return rows


def _ttl(data: dict[str, Any]) -> list[Row]:
    rows = []
    for item in data.get("ttl") or []:
        target = f"{item['backend']}: TTL expiry lag < {TTL_LAG_MS / 1000:g} s (I5)"
        if "max_ms" not in item:
            rows.append(_row(target, "no rule seen leaving", None))
            continue
        measured = (
            f"max {item['max_ms']:,.0f} ms (upper bound {item['max_upper_bound_ms']:,.0f}), "
            f"p99 {item['p99_ms']:,.0f} ms"
        )
        rows.append(_row(target, measured, item["max_upper_bound_ms"] < TTL_LAG_MS))
    return rows


SECTIONS: tuple[Callable[[dict[str, Any]], list[Row]], ...] = (
    _ratios,
    _latency,
    _limit_shares,
    _million_rss,
    _ttl,
)


def targets(data: dict[str, Any]) -> list[Row]:
    """Every target the run has numbers for (``met`` is None where it has none)."""
    return [row for section in SECTIONS for row in section(data)]
