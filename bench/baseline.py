"""The baseline: the seed's way of adding a rule, one shell per rule.

RedisPushIptables forks ``/bin/sh -c "iptables -C ... || iptables -I ..."`` for every
command. Here the benchmark builds that line itself, from addresses it generates with
:mod:`ipaddress` (never from request data; this is the thing pushfw replaces), and runs it
inside the namespace with the host's default ``iptables``, in a chain of its own.

``iptables -C`` reads the whole ruleset, so the per-rule cost grows with the table size. It
is sampled at a few table sizes (the chain pre-filled by one untimed ``iptables-restore``),
and the time of an N-rule job is the integral of the per-rule cost over table sizes 0..N,
with the cost interpolated linearly between samples and extrapolated along the last
segment past the largest one.
"""

from __future__ import annotations

import itertools
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.env import BenchEnv, BenchError, Netns, address

CHAIN = "PUSHFWB"


@dataclass(frozen=True)
class Sample:
    """Per-rule times of ``rules`` rules added to a chain that held ``table_size`` rules."""

    table_size: int
    seconds: tuple[float, ...]

    @property
    def x(self) -> float:
        """The mean table size during the sample (it grows by one per rule)."""
        return self.table_size + len(self.seconds) / 2

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.seconds)

    def to_json(self) -> dict[str, Any]:
        ordered = sorted(self.seconds)
        return {
            "table_size": self.table_size,
            "rules": len(self.seconds),
            "mean_ms": self.mean_s * 1000,
            "p50_ms": percentile(ordered, 50) * 1000,
            "p99_ms": percentile(ordered, 99) * 1000,
        }


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def cost_at(points: Sequence[tuple[float, float]], x: float) -> float:
    """Per-rule cost at table size ``x``: flat before the first point, linear between
    points, along the last segment after the last one (never below the last point)."""
    if len(points) == 1 or x <= points[0][0]:
        return points[0][1]
    for (x0, c0), (x1, c1) in itertools.pairwise(points):
        if x <= x1:
            return c0 + (c1 - c0) * (x - x0) / (x1 - x0)
    (x0, c0), (x1, c1) = points[-2], points[-1]
    slope = max(0.0, (c1 - c0) / (x1 - x0))
    return c1 + slope * (x - x1)


def job_seconds(points: Sequence[tuple[float, float]], n: int) -> float:
    """Estimated time to add ``n`` rules to an empty chain: the exact integral of the
    piecewise-linear per-rule cost over table sizes 0..n."""
    marks = sorted({0.0, float(n), *(x for x, _ in points if 0 < x < n)})
    return sum(
        (b - a) * (cost_at(points, a) + cost_at(points, b)) / 2
        for a, b in itertools.pairwise(marks)
    )


def _prefill(ns: Netns, size: int) -> None:
    """(Re)declare the chain and fill it with ``size`` rules in one untimed restore."""
    lines = ["*filter", f":{CHAIN} - [0:0]"]
    lines += [f"-A {CHAIN} -s {address(i)} -j DROP" for i in range(size)]
    lines += ["COMMIT", ""]
    ns.run("iptables-restore", "--noflush", stdin="\n".join(lines))


def _count(ns: Netns) -> int:
    out = ns.run("iptables", "-S", CHAIN).stdout
    return sum(1 for line in out.splitlines() if line.startswith(f"-A {CHAIN} "))


def _time_rules(ns: Netns, first: int, rules: int) -> tuple[float, ...]:
    times = []
    for i in range(first, first + rules):
        ip = address(i)
        line = f"iptables -C {CHAIN} -s {ip} -j DROP || iptables -I {CHAIN} -s {ip} -j DROP"
        started = time.perf_counter()
        subprocess.run(
            ns.argv("sh", "-c", line),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        times.append(time.perf_counter() - started)
    return tuple(times)


def sample(ns: Netns, table_size: int, rules: int) -> Sample:
    _prefill(ns, table_size)
    if (have := _count(ns)) != table_size:
        raise BenchError(f"baseline pre-fill: chain holds {have} rules, expected {table_size}")
    result = Sample(table_size, _time_rules(ns, table_size, rules))
    if (have := _count(ns)) != table_size + rules:
        raise BenchError(f"baseline: chain holds {have} rules, expected {table_size + rules}")
    return result


def exec_overhead_s(ns: Netns, runs: int = 30) -> float:
    """What ``ip netns exec`` adds to each process: best of ``runs`` with and without it,
    interleaved (the minimum is the stable statistic on a busy machine)."""
    direct: list[float] = []
    wrapped: list[float] = []
    for _ in range(runs):
        for argv, times in ((["true"], direct), (ns.argv("true"), wrapped)):
            started = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times.append(time.perf_counter() - started)
    return max(0.0, min(wrapped) - min(direct))


def iptables_version(ns: Netns) -> str:
    return ns.run("iptables", "-V").stdout.strip()


def variant(version_line: str) -> str:
    return "nf_tables" if "nf_tables" in version_line else "legacy"


class Baseline:
    """The sampled per-rule cost and the estimates derived from it."""

    def __init__(self, samples: list[Sample], netns_overhead_s: float, version: str) -> None:
        self.samples = samples
        self.netns_overhead_s = netns_overhead_s
        self.version = version
        self.points = [(s.x, s.mean_s) for s in samples]
        self.net_points = [(x, max(c - netns_overhead_s, 1e-6)) for x, c in self.points]

    def seconds(self, n: int, net: bool = False) -> float:
        return job_seconds(self.net_points if net else self.points, n)

    def extrapolated(self, n: int) -> bool:
        return n > self.samples[-1].table_size + len(self.samples[-1].seconds)

    def estimate(self, n: int) -> dict[str, Any]:
        seconds = self.seconds(n)
        net = self.seconds(n, net=True)
        return {
            "n": n,
            "seconds": seconds,
            "rules_per_s": n / seconds,
            "seconds_without_netns_exec": net,
            "extrapolated": self.extrapolated(n),
        }

    def to_json(self, sizes: Sequence[int]) -> dict[str, Any]:
        return {
            "iptables": self.version,
            "variant": variant(self.version),
            "command": (
                f'ip netns exec NS sh -c "iptables -C {CHAIN} -s IP -j DROP'
                f' || iptables -I {CHAIN} -s IP -j DROP"'
            ),
            "netns_exec_overhead_ms": self.netns_overhead_s * 1000,
            "samples": [s.to_json() for s in self.samples],
            "estimates": [self.estimate(n) for n in sizes],
        }


def run_baseline(env: BenchEnv, table_sizes: Sequence[int], rules: int) -> Baseline:
    """Sample the per-rule cost at each table size, then remove the baseline's chain."""
    ns = env.ns
    version = iptables_version(ns)
    env.progress(f"baseline: {version}, {rules} rules per table size {list(table_sizes)}")
    overhead = exec_overhead_s(ns)  # the seed forked sh directly, without 'ip netns exec'
    samples = []
    try:
        for size in table_sizes:
            samples.append(sample(ns, size, rules))
            env.progress(
                f"baseline: table size {size}: {samples[-1].mean_s * 1000:.1f} ms per rule"
            )
    finally:
        ns.run("iptables", "-F", CHAIN, check=False)
        ns.run("iptables", "-X", CHAIN, check=False)
    return Baseline(samples, overhead, version)
