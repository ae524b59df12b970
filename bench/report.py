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
        rss = j.get("worker_rss_kb")
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
                num(rss / 1024) if rss else "-",
                j.get("note", ""),
            ]
        )
    return (
        "pushfw end to end (first XADD -> the host group acked all N; the kernel then checked "
        "to hold N):\n"
        + table(
            [
                "backend",
                "N",
                "seconds",
                "rules/s",
                "xadd s",
                "baseline s",
                "vs base",
                "vs base-ns",
                "RSS MiB",
                "",
            ],
            rows,
        )
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


def _reconcile(items: list[dict[str, Any]]) -> str:
    measures = [
        ("one-shot process, wall", "wall_s"),
        ("the same, no-op (kernel already matches)", "noop_wall_s"),
        ("wall minus no-op", "minus_noop_s"),
        ("interpreter + imports ('--help')", "startup_s"),
        ("wall minus interpreter + imports", "minus_startup_s"),
        ("reconcile's own 'in X s'", "reported_s"),
        ("reconcile's own 'in X s', no-op", "noop_reported_s"),
    ]
    rows = [[label, *(num(r[key], 2) for r in items)] for label, key in measures]
    flushes = "; ".join(f"{r['backend']}: {r['flush']}" for r in items)
    sizes = sorted({r["n"] for r in items})
    return (
        f"Reconcile, hand-flushed kernel -> {', '.join(map(str, sizes))} rules (one-shot "
        "'python -m pushfw.worker reconcile' with the ledger holding them, worker stopped), "
        f"seconds;\n  flushed with {flushes}\n"
        + table(["measure", *(r["backend"] for r in items)], rows)
    )


def _ttl(items: list[dict[str, Any]]) -> str:
    rows = []
    for t in items:
        has = "p50_ms" in t
        rows.append(
            [
                t["backend"],
                str(t["n"]),
                t["poll_tool"],
                num(t["poll_period_ms_p50"]),
                f"{t['poller_cpu_share'] * 100:.0f}%",
                num(t["p50_ms"]) if has else "-",
                num(t["p99_ms"]) if has else "-",
                num(t["max_ms"]) if has else "-",
                num(t["max_upper_bound_ms"]) if has else "-",
                num(t["min_ms"]) if has else "-",
                str(t["removed"]),
                str(t["never_seen"]),
                str(t["reported_expired"]),
                str(t["still_present"]),
                str(sum(t.get("worker_warnings", {}).values())),
            ]
        )
    warned = [
        f"  {t['backend']} worker: {count} x '{message}'"
        for t in items
        for message, count in t.get("worker_warnings", {}).items()
    ]
    low, high = items[0]["ttl_s"]
    return (
        f"TTL expiry lag (timed drops, ttl {low}-{high} s, pushed at once; the kernel polled; "
        "lag = midpoint between the last snapshot with the rule and the first without - expiry;\n"
        "  upper = the later snapshot; never seen: expired before the worker reached them; "
        "expired: results 'expired'; left: still present at the end; warnings: the worker "
        "log's, during the phase):\n"
        + table(
            [
                "backend",
                "N",
                "polled with",
                "poll ms",
                "CPU",
                "p50 ms",
                "p99 ms",
                "max ms",
                "upper ms",
                "min ms",
                "removed",
                "never seen",
                "expired",
                "left",
                "warnings",
            ],
            rows,
        )
        + "".join("\n" + line for line in warned)
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
    for backend, big in mem.get("worker_rss_million", {}).items():
        per_rule = big["bytes_per_rule"]
        at_million = big["vmrss_at_million_kb"]
        state = (
            "finished"
            if big["completed"]
            else f"stopped at {num(big['seconds'])} s with {big['rules']:,} rules applied "
            f"(estimate {num(big['estimate_s'])} s); at 1M, extrapolated: "
            f"{num(at_million / 1024 if at_million else None)} MiB"
        )
        lines.append(
            f"  worker RSS ({backend}, {big['rules']:,} rules of a {big['n']:,}-rule job): "
            f"{num(big['vmrss_kb'] / 1024)} MiB (idle before it "
            f"{num(big['idle_vmrss_kb'] / 1024)} MiB, peak {num(big['vmhwm_kb'] / 1024)} MiB, "
            f"{num(per_rule, 0)} B per rule); {num(big['rules_per_s'], 0)} rules/s, {state}"
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
            num(s["rules_per_s"], 0),
            num(s["kernel_batch_per_s"], 0),
            f"{num(s['limit_per_s'], 0)} ({s['limit_is']})",
            f"{s['share_of_limit'] * 100:.1f}%",
        ]
        for s in lim["shares"]
    ]
    raw = [
        f"  raw kernel batch, {k}: {num(r['adds_per_s'], 0)} adds/s ({num(r['seconds'], 3)} s; "
        f"best of {len(r['runs_seconds'])}): {r['how']}"
        for k, r in lim.get("raw_kernel", {}).items()
    ]
    return (
        f"Limits ({lim['n']} entries; hiredis {'on' if lim['hiredis'] else 'off'}): "
        f"bare XREADGROUP+XACK drain {num(lim['drain_per_s'], 0)}/s "
        f"({num(lim['drain_us_per_entry'])} us each), parse_command "
        f"{num(lim['parse_per_s'], 0)}/s ({num(lim['parse_us_per_entry'])} us each); "
        f"the two in series {num(lim['drain_and_parse_per_s'], 0)}/s (the most one worker "
        "process could do if everything else were free)\n"
        + "".join(line + "\n" for line in raw)
        + "  pushfw share: the job's time beyond drain+parse; limit: the slower of the bare "
        "drain and the backend's raw kernel batch (measured at the N above)\n"
        + table(
            [
                "backend",
                "N",
                "job s",
                "drain+parse s",
                "pushfw share",
                "rules/s",
                "kernel batch/s",
                "limit/s",
                "of limit",
            ],
            rows,
        )
    )


def _targets(rows: list[dict[str, Any]]) -> str:
    met = {True: "yes", False: "NO", None: "-"}
    return "Targets (one host: speed and timely expiry; a report, nothing asserted):\n" + table(
        ["target", "measured", "met"],
        [[r["target"], r["measured"], met[r["met"]]] for r in rows],
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
    if data.get("targets"):
        parts.append(_targets(data["targets"]))
    return "\n\n".join(parts) + "\n"
