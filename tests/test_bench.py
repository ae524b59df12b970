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


def measured(value: object) -> bool:
    """A duration a fast machine may round to zero: a number, never negative."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def test_quick_benchmark_reports_every_section(tmp_path, netns_capable):
    """One kernel backend and the memory one at two small sizes: every section of the
    report, in half the time of the whole quick run (each backend's own behaviour is
    tested elsewhere)."""
    need(netns_capable, "needs root and 'ip netns' (network namespaces)")
    for tool in ("nft", "iptables", "iptables-restore", "iptables-legacy", "iptables-legacy-save"):
        need(shutil.which(tool) is not None, f"{tool} is not installed")
    need(os.path.exists(REDIS_SERVER), "redis-server is not installed")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "bench", "--quick", "--out", str(out)),
            *("--backends", "nftables,memory", "--sizes", "1000,2000"),
        ],
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

    backends = data["plan"]["backends"]
    assert set(backends) == {"nftables", "memory"}
    kernels = [b for b in backends if b != "memory"]
    sets = [b for b in backends if b in ("nftables", "ipset")]
    jobs = {(j["backend"], j["n"]): j for j in data["throughput"]}
    assert set(jobs) == {(b, n) for b in backends for n in (1000, 2000)}
    for job in jobs.values():
        assert job["completed"], job
        assert positive(job["seconds"]) and positive(job["rules_per_s"])
        assert positive(job["ratio_vs_baseline"])
    for backend in kernels:
        assert jobs[backend, 1000]["kernel_rules"] == 1000, backend

    latency = {(item["backend"], item["table_size"]) for item in data["latency"]}
    assert {(b, 0) for b in backends} <= latency
    assert all(positive(item["p50_ms"]) and item["samples"] == 50 for item in data["latency"])

    reconcile = {r["backend"]: r for r in data["reconcile"]}
    assert set(reconcile) == set(kernels)
    for r in reconcile.values():
        assert r["kernel_rules_after"] == r["n"] == 1000, r
        assert positive(r["wall_s"]) and measured(r["reported_s"])

    ttl = {t["backend"]: t for t in data["ttl"]}
    assert set(ttl) == set(kernels)
    for t in ttl.values():
        assert t["removed"] > 0 and isinstance(t["max_ms"], int | float), t

    memory = data["memory"]
    for kind in ("permanent", "timed"):
        assert positive(memory[kind]["ledger_bytes_per_rule"])
        assert positive(memory[kind]["used_memory_delta_per_rule"])
    for backend in backends:
        assert positive(memory["worker_rss"][backend]["vmrss_kb"]), backend

    limits = data["limits"]
    assert positive(limits["drain_per_s"]) and positive(limits["parse_per_s"])
    assert set(limits["raw_kernel"]) == set(sets)
    for raw in limits["raw_kernel"].values():
        assert positive(raw["adds_per_s"]) and raw["elements_after"] == limits["n"]
    assert limits["shares"]
    assert all(positive(s["share_of_limit"]) for s in limits["shares"])

    targets = data["targets"]
    assert targets and all(set(t) == {"target", "measured", "met"} for t in targets)
    assert "Targets" in proc.stdout

    made = re.search(r"namespace (pfwbench-\d+)", proc.stderr)
    assert made is not None, proc.stderr[-2000:]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert made.group(1) not in namespaces.split(), "the benchmark left its namespace behind"
