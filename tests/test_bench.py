"""The benchmark harness runs (``python -m bench --quick``) and reports every section.

No speed thresholds: this only proves the harness works end to end on this machine and
cleans up after itself (its namespace and its redis-server).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REDIS_SERVER, need

ROOT = Path(__file__).resolve().parent.parent


def positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def test_quick_benchmark_reports_every_section(tmp_path, netns_capable):
    need(netns_capable, "needs root and 'ip netns' (network namespaces)")
    for tool in ("iptables", "iptables-restore", "iptables-legacy", "iptables-legacy-save"):
        need(shutil.which(tool) is not None, f"{tool} is not installed")
    need(os.path.exists(REDIS_SERVER), "redis-server is not installed")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "pushfw end to end" in proc.stdout
    data = json.loads(out.read_text())

    assert data["quick"] is True
    machine = data["machine"]
    assert positive(machine["nproc"])
    assert machine["iptables_variant"] in ("nf_tables", "legacy")

    baseline = data["baseline"]
    assert baseline["samples"]
    assert all(positive(s["mean_ms"]) for s in baseline["samples"])
    assert all(positive(e["seconds"]) for e in baseline["estimates"])

    jobs = {(j["backend"], j["n"]): j for j in data["throughput"]}
    assert set(jobs) == {(b, n) for b in ("iptables", "memory") for n in (1000, 10000)}
    for job in jobs.values():
        assert job["completed"], job
        assert positive(job["seconds"]) and positive(job["rules_per_s"])
        assert positive(job["ratio_vs_baseline"])
    assert jobs["iptables", 1000]["kernel_rules"] == 1000

    latency = {(item["backend"], item["table_size"]) for item in data["latency"]}
    assert {("iptables", 0), ("memory", 0)} <= latency
    assert all(positive(item["p50_ms"]) and item["samples"] == 50 for item in data["latency"])

    reconcile = data["reconcile"]
    assert reconcile["kernel_rules_after"] == reconcile["n"] == 1000
    assert positive(reconcile["wall_s"]) and positive(reconcile["reported_s"])

    ttl = data["ttl"]
    assert ttl["removed"] > 0 and positive(ttl["max_ms"])

    memory = data["memory"]
    for kind in ("permanent", "timed"):
        assert positive(memory[kind]["ledger_bytes_per_rule"])
        assert positive(memory[kind]["used_memory_delta_per_rule"])
    assert positive(memory["worker_rss"]["iptables"]["vmrss_kb"])

    limits = data["limits"]
    assert positive(limits["drain_per_s"]) and positive(limits["parse_per_s"])
    assert limits["shares"]

    made = re.search(r"namespace (pfwbench-\d+)", proc.stderr)
    assert made is not None, proc.stderr[-2000:]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert made.group(1) not in namespaces.split(), "the benchmark left its namespace behind"
