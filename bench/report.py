"""Machine facts and the human-readable report of a run's JSON."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any


def _first_line(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def machine_info() -> dict[str, Any]:
    iptables = _first_line(["iptables", "-V"])
    return {
        "nproc": int(_first_line(["nproc"])),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "iptables": iptables,
        "iptables_variant": "nf_tables" if "nf_tables" in iptables else "legacy",
        "iptables_legacy": _first_line(["iptables-legacy", "-V"]),
        "redis_server": _first_line(["redis-server", "--version"]),
        "python": platform.python_version(),
        "pushfw": _version("pushfw"),
        "python_iptables": _version("python-iptables"),
        "redis_py": _version("redis"),
        "hiredis": _version("hiredis"),
        "loadavg_at_start": list(os.getloadavg()),
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    """Columns padded to their widest cell; the first column left-aligned, the rest right."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return (indent + "  ".join(parts)).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 10_000:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _machine(m: dict[str, Any]) -> str:
    load = ", ".join(f"{x:.2f}" for x in m["loadavg_at_start"])
    end = ", ".join(f"{x:.2f}" for x in m.get("loadavg_at_end", []))
    return (
        f"machine: {m['nproc']} CPUs (nproc), {m['cpu_model']}, kernel {m['kernel']}\n"
        f"         {m['iptables']} (the host's default: {m['iptables_variant']}); "
        f"pushfw writes {m['iptables_legacy']}\n"
        f"         {m['redis_server'].split(' sha=')[0]}, python {m['python']}, "
        f"pushfw {m['pushfw']}, python-iptables {m['python_iptables']}, "
        f"redis-py {m['redis_py']}, hiredis {m['hiredis']}\n"
        f"         load average at start: {load}; at end: {end}"
    )


def _baseline(b: dict[str, Any]) -> str:
    rows = [
        [
            str(s["table_size"]),
            str(s["rules"]),
            num(s["mean_ms"]),
            num(s["p50_ms"]),
            num(s["p99_ms"]),
        ]
        for s in b["samples"]
    ]
    est = [
        [
            str(e["n"]),
            num(e["seconds"]),
            num(e["rules_per_s"]),
            num(e["seconds_without_netns_exec"]),
            "yes" if e["extrapolated"] else "no",
        ]
        for e in b["estimates"]
    ]
    return (
        f"Baseline, the seed's way: {b['command']}\n"
        f"  host iptables: {b['iptables']}; 'ip netns exec' adds "
        f"{b['netns_exec_overhead_ms']:.1f} ms per rule (the seed forked sh directly)\n"
        + table(["table size", "rules", "mean ms", "p50 ms", "p99 ms"], rows)
        + "\n  estimated job time from an empty chain (integral of the per-rule cost):\n"
        + table(["N", "seconds", "rules/s", "s w/o netns exec", "extrapolated"], est)
    )


def _throughput(jobs: list[dict[str, Any]]) -> str:
    rows = []
    for j in jobs:
        rows.append(
            [
                j["backend"],
                str(j["n"]),
                num(j["seconds"], 2),
                num(j["rules_per_s"], 0),
                num(j["xadd_seconds"], 2),
                num(j.get("baseline_seconds")),
                "x" + num(j.get("ratio_vs_baseline")),
                "x" + num(j.get("ratio_vs_baseline_without_netns_exec")),
                j.get("note", ""),
            ]
        )
    return "pushfw end to end (first XADD -> group acked all, and the kernel holds N):\n" + table(
        ["backend", "N", "seconds", "rules/s", "xadd s", "baseline s", "vs base", "vs base-ns", ""],
        rows,
    )


def _latency(lat: list[dict[str, Any]]) -> str:
    rows = [
        [
            item["backend"],
            str(item["table_size"]),
            str(item["samples"]),
            num(item["p50_ms"], 2),
            num(item["p99_ms"], 2),
            num(item["max_ms"], 2),
        ]
        for item in lat
    ]
    return "Latency of one command on an idle worker (XADD -> its result, XREAD BLOCK):\n" + table(
        ["backend", "rules in table", "samples", "p50 ms", "p99 ms", "max ms"], rows
    )


def _reconcile(r: dict[str, Any]) -> str:
    return (
        f"Reconcile, empty kernel -> {r['n']} rules (one-shot 'python -m pushfw.worker "
        "reconcile' with the ledger holding them, worker stopped, chain flushed):\n"
        + table(
            ["measure", "seconds"],
            [
                ["one-shot process, wall", num(r["wall_s"], 2)],
                ["the same, no-op (kernel already matches)", num(r["noop_wall_s"], 2)],
                ["wall minus no-op", num(r["minus_noop_s"], 2)],
                ["interpreter + imports ('--help')", num(r["startup_s"], 2)],
                ["wall minus interpreter + imports", num(r["minus_startup_s"], 2)],
                [
                    "reconcile's own 'in X s' (no-op)",
                    f"{num(r['reported_s'], 2)} ({num(r['noop_reported_s'], 2)})",
                ],
            ],
        )
    )


def _ttl(t: dict[str, Any]) -> str:
    lags = (
        f"p50 {num(t['p50_ms'])} ms, p99 {num(t['p99_ms'])} ms, max {num(t['max_ms'])} ms "
        f"(upper bound {num(t['max_upper_bound_ms'])} ms), min {num(t['min_ms'])} ms"
        if "p50_ms" in t
        else "no rule was seen leaving"
    )
    return (
        f"TTL expiry lag, {t['n']} timed rules (ttl 2-5 s): kernel polled with "
        f"iptables-legacy-save every {num(t['poll_period_ms_p50'])} ms (p50), lag = midpoint "
        f"between snapshots - expiry;\n  the poller used {t['poller_cpu_share'] * 100:.0f}% "
        f"of one CPU meanwhile\n"
        f"  {lags}\n"
        f"  removed {t['removed']}; never seen in the kernel {t['never_seen']}; results "
        f"'expired' (reached after their expiry) {t['reported_expired']}; "
        f"still present at the end {t['still_present']}"
    )


def _memory(mem: dict[str, Any]) -> str:
    lines = ["Redis memory and worker RSS:"]
    for kind in ("permanent", "timed"):
        m = mem.get(kind)
        if not m:
            continue
        keys = m["key_bytes"]
        lines.append(
            f"  {kind} rules ({m['active_rules']} active, {m['ttl_markers']} ttl markers): "
            f"ledger (rules + expiry) {num(m['ledger_bytes_per_rule'])} B/rule "
            f"[rules {num(keys['rules'] / 1024)} KiB, expiry {num(keys['expiry'] / 1024)} KiB]; "
            f"used_memory delta {num(m['used_memory_delta_per_rule'])} B/rule "
            f"(incl. cmd stream {num(keys['cmd_stream'] / 1024)} KiB, "
            f"results {num(keys['results_stream'] / 1024)} KiB)"
        )
    for backend, rss in mem.get("worker_rss", {}).items():
        lines.append(
            f"  worker RSS ({backend}, {rss['n']} rules): {num(rss['vmrss_kb'] / 1024)} MiB"
        )
    return "\n".join(lines)


def _limits(lim: dict[str, Any]) -> str:
    rows = [
        [
            s["backend"],
            str(s["n"]),
            num(s["seconds"], 2),
            num(s["floor_seconds"], 2),
            f"{s['pushfw_share'] * 100:.0f}%",
        ]
        for s in lim["shares"]
    ]
    return (
        f"Limits ({lim['n']} entries; hiredis {'on' if lim['hiredis'] else 'off'}): "
        f"bare XREADGROUP+XACK drain {num(lim['drain_per_s'], 0)}/s "
        f"({num(lim['drain_us_per_entry'])} us each), parse_command "
        f"{num(lim['parse_per_s'], 0)}/s ({num(lim['parse_us_per_entry'])} us each)\n"
        + table(["backend", "N", "job s", "drain+parse s", "pushfw share"], rows)
    )


def render(data: dict[str, Any]) -> str:
    head = (
        f"pushfw benchmark ({'quick' if data['quick'] else 'full'}), {data['started']}, "
        f"{num(data['duration_s'])} s"
    )
    parts = [head, _machine(data["machine"])]
    if data.get("baseline"):
        parts.append(_baseline(data["baseline"]))
    parts.append(_throughput(data["throughput"]))
    parts.append(_latency(data["latency"]))
    if data.get("reconcile"):
        parts.append(_reconcile(data["reconcile"]))
    if data.get("ttl"):
        parts.append(_ttl(data["ttl"]))
    parts.append(_memory(data["memory"]))
    parts.append(_limits(data["limits"]))
    if data.get("notes"):
        parts.append("\n".join(f"note: {n}" for n in data["notes"]))
    return "\n\n".join(parts) + "\n"
