"""``python -m bench``: run every measurement once, print the report, write the JSON."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import baseline, limits, phases, plot
from bench.env import (
    WIDE_NET,
    BenchEnv,
    BenchError,
    Progress,
    WorkerProc,
    backend_missing,
    bench_env,
    wide_address,
)
from bench.report import machine_info, render
from bench.targets import targets

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"
BACKENDS = ("nftables", "ipset", "iptables", "memory")
SET_BACKENDS = ("nftables", "ipset")
KERNEL_BACKENDS = ("nftables", "ipset", "iptables")
MAX_N = 120_000
BIG_N = 100_000
BIG_IPTABLES_TIMEOUT_S = 120.0
MILLION = 1_000_000
MILLION_CAP_S = 150.0
"""The 1M-rule job (set backends, full run) is stopped after this long."""
MILLION_SKIP_S = 3 * MILLION_CAP_S
"""... and not started if its estimate is beyond this (it would reach too few rules)."""
MILLION_SET_SIZE = 1_100_000
LATENCY_SAMPLES = 50
TIMED_TTL_S = 3600


@dataclass
class Plan:
    quick: bool
    sizes: list[int]
    backends: list[str]
    out: Path
    baseline_table_sizes: list[int] = field(default_factory=list)
    baseline_rules: int = 200
    reconcile_n: int = 10_000
    ttl_n: int = 10_000
    ttls: tuple[int, ...] = (2, 3, 4, 5)
    million: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = bool(args.quick)
        sizes = args.sizes or ([1000, 10_000] if quick else [1000, 10_000, BIG_N])
        backends = args.backends or list(BACKENDS)
        return cls(
            quick=quick,
            sizes=sorted(set(sizes)),
            backends=backends,
            out=args.out,
            baseline_table_sizes=[0, 1000, 5000] if quick else [0, 1000, 5000, 20_000],
            baseline_rules=50 if quick else 200,
            reconcile_n=1000 if quick else 10_000,
            ttl_n=1000 if quick else 10_000,
            ttls=(1, 2) if quick else (2, 3, 4, 5),
            million=not quick and not args.no_million,
        )

    def timeout_s(self, backend: str, n: int) -> float:
        if backend == "iptables" and n >= BIG_N:
            return BIG_IPTABLES_TIMEOUT_S
        return max(120.0, n / 100)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated whole numbers") from None
    if not sizes or any(not 1 <= n <= MAX_N for n in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be 1..{MAX_N}")
    return sizes


def _backends(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    bad = [n for n in names if n not in BACKENDS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"backends are {', '.join(BACKENDS)}")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark pushfw against a per-rule 'sh -c iptables' baseline "
        "(needs root; runs in a throwaway network namespace and redis-server).",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--sizes", type=_sizes, help="job sizes N, e.g. 1000,10000")
    parser.add_argument(
        "--backends", type=_backends, default=None, help=f"default {','.join(BACKENDS)}"
    )
    parser.add_argument(
        "--no-million",
        action="store_true",
        help="skip the worker-RSS job of 1,000,000 rules on the set backends (full run)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    return parser.parse_args(argv)


class Run:
    """One benchmark run: its plan, environment, and the results as they come."""

    def __init__(self, plan: Plan, env: BenchEnv) -> None:
        self.plan = plan
        self.env = env
        self.log = env.progress
        self.jobs: list[dict[str, Any]] = []
        self.latency: list[dict[str, Any]] = []
        self.memory: dict[str, Any] = {"worker_rss": {}, "worker_rss_million": {}}
        self.reconcile: dict[str, dict[str, Any]] = {}
        self.ttl: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def backend(self, backend: str) -> None:
        for n in self.plan.sizes:
            self.job(backend, n)
        if backend in KERNEL_BACKENDS and backend not in self.reconcile:
            self.job(backend, self.plan.reconcile_n, record=False)
        with self.env.worker(backend) as worker:
            self.log(f"{backend}: latency, {LATENCY_SAMPLES} commands on an idle worker")
            lat = phases.measure_latency(
                self.env, worker, 0, LATENCY_SAMPLES, phases.LATENCY_OFFSET
            )
            self.latency.append(lat.to_json())
        if backend in KERNEL_BACKENDS:
            self.ttl_lag(backend)
        if self.plan.million and backend in SET_BACKENDS:
            self.million(backend)

    def job(self, backend: str, n: int, record: bool = True) -> None:
        timeout = self.plan.timeout_s(backend, n)
        self.log(f"{backend}: {n} drops end to end (timeout {timeout:.0f} s)")
        with self.env.worker(backend) as worker:
            job = phases.run_job(self.env, worker, n, timeout)
            self.log(
                f"{backend}: {n} drops: {job.seconds:.2f} s"
                + ("" if job.completed else f" (not finished, {job.acknowledged} acked)")
            )
            if record:
                self.jobs.append(job.to_json())
            if job.completed and record:
                self.after_job(worker, job)
            if (
                job.completed
                and backend in KERNEL_BACKENDS
                and n == self.plan.reconcile_n
                and backend not in self.reconcile
            ):
                worker.stop()
                self.log(f"{backend}: reconcile, hand-flushed kernel -> {n} rules")
                self.reconcile[backend] = phases.measure_reconcile(self.env, backend, n)
        if not job.completed and n >= BIG_N:
            self.notes.append(
                f"{backend} N={n} was stopped at its {timeout:.0f} s limit, unfinished; its "
                f"row shows the rate of the {job.acknowledged} commands acknowledged by then"
            )

    def after_job(self, worker: WorkerProc, job: phases.Job) -> None:
        """Worker RSS and Redis memory (kept for the largest job that finished), and the
        latency with the largest table."""
        n = job.n
        self.jobs[-1]["worker_rss_kb"] = rss = worker.rss_kb()
        self.memory["worker_rss"][worker.backend] = {"n": n, "vmrss_kb": rss}
        if worker.backend == self.plan.backends[0]:
            phases.wait_ledger(self.env, job.last_id)
            self.memory["permanent"] = phases.redis_memory(self.env, job.used_memory_before)
        if n == self.plan.sizes[-1]:
            self.log(f"{worker.backend}: latency with {n} rules in the table")
            lat = phases.measure_latency(
                self.env, worker, n, LATENCY_SAMPLES, phases.LATENCY_OFFSET + LATENCY_SAMPLES
            )
            self.latency.append(lat.to_json())

    def ttl_lag(self, backend: str) -> None:
        n = self.plan.ttl_n
        ttls = self.plan.ttls
        self.log(
            f"{backend}: ttl, {n} timed drops (ttl {min(ttls)}-{max(ttls)} s), "
            "watching them leave the kernel"
        )
        with self.env.worker(backend) as worker:
            ttl = phases.measure_ttl(self.env, backend, n, ttls)
            ttl["worker_warnings"] = worker.warnings()
            self.ttl.append(ttl)

    def million(self, backend: str) -> None:
        """Worker RSS with 1M rules: the job is stopped at :data:`MILLION_CAP_S`, and skipped
        if its estimate (from the backend's two largest jobs) is far beyond that."""
        done = [j for j in self.jobs if j["backend"] == backend and j["completed"]]
        if not done or done[-1]["n"] < BIG_N:
            self.notes.append(f"{backend}: no 1M-rule job (no finished {BIG_N}-rule job to go by)")
            return
        estimate = estimate_s([(j["n"], j["seconds"]) for j in done], MILLION)
        if estimate > MILLION_SKIP_S:
            self.notes.append(
                f"{backend}: 1M-rule job skipped: from its jobs up to {done[-1]['n']} rules it "
                f"would take ~{estimate:.0f} s"
            )
            return
        self.log(
            f"{backend}: {MILLION} drops for worker RSS (estimate {estimate:.0f} s, "
            f"stopped at {MILLION_CAP_S:.0f} s)"
        )
        settings = {"PUSHFW_SET_SIZE": str(MILLION_SET_SIZE)}
        with self.env.worker(backend, settings) as worker:
            idle_kb = worker.rss_kb()
            job = phases.run_job(self.env, worker, MILLION, MILLION_CAP_S, where=wide_address)
            rss_kb = worker.rss_kb()
            reached = job.n if job.completed else job.acknowledged
            self.log(f"{backend}: {MILLION} drops: {job.seconds:.1f} s, {reached} acked")
            grown_kb = rss_kb - idle_kb
            self.memory["worker_rss_million"][backend] = {
                **job.to_json(),
                "estimate_s": estimate,
                "rules": reached,
                "idle_vmrss_kb": idle_kb,
                "vmrss_kb": rss_kb,
                "vmhwm_kb": worker.rss_kb("VmHWM"),
                "bytes_per_rule": grown_kb * 1024 / reached if reached else None,
                "vmrss_at_million_kb": (
                    idle_kb + grown_kb * MILLION / reached if reached else None
                ),
                "set_size": MILLION_SET_SIZE,
            }
        if not job.completed:
            self.notes.append(
                f"{backend}: the 1M-rule job was stopped at {MILLION_CAP_S:.0f} s with {reached:,} "
                f"rules applied (estimate was {estimate:.0f} s); its RSS at 1M is extrapolated "
                "linearly from the worker's RSS idle and at that point"
            )

    def timed_memory(self) -> None:
        backend = "memory" if "memory" in self.plan.backends else self.plan.backends[0]
        n = self.plan.ttl_n
        self.log(f"memory: {n} timed drops (ttl {TIMED_TTL_S} s) on the {backend} backend")
        with self.env.worker(backend):
            before = phases.used_memory(self.env)
            commands = [
                {"op": "drop.insert", "ip": f["ip"], "ttl": str(TIMED_TTL_S)}
                for f in phases.drop_fields(n)
            ]
            ids = phases.push(self.env, commands)
            if not phases.wait_until(
                lambda: phases.processed(self.env, ids[-1]), time.perf_counter() + 300
            ):
                raise BenchError("timed drops were not processed within 300 s")
            phases.wait_ledger(self.env, ids[-1])
            self.memory["timed"] = phases.redis_memory(self.env, before)


def estimate_s(jobs: list[tuple[int, float]], n: int) -> float:
    """Time for an n-rule job, from (N, seconds) of smaller ones: t = a*N + b*N^2 through
    the two largest (b >= 0: a per-batch cost that grows with the table shows as b)."""
    (n1, t1), (n2, t2) = [(0, 0.0), *sorted(jobs)][-2:]
    if n1 == 0:
        return t2 / n2 * n
    b = max(0.0, (t2 / n2 - t1 / n1) / (n2 - n1))
    a = max(0.0, t2 / n2 - b * n2)
    return a * n + b * n * n


def _attach_baseline(jobs: list[dict[str, Any]], base: baseline.Baseline) -> None:
    """Baseline time for the same work: N rules, or the rules acknowledged by a job that
    was stopped at its time limit."""
    for job in jobs:
        done = job["n"] if job["completed"] else job["acknowledged"]
        job["baseline_seconds"] = seconds = base.seconds(done) if done else None
        job["baseline_extrapolated"] = base.extrapolated(done)
        job["ratio_vs_baseline"] = seconds / job["seconds"] if seconds else None
        net = base.seconds(done, net=True) if done else None
        job["ratio_vs_baseline_without_netns_exec"] = net / job["seconds"] if net else None


def _notes(data: dict[str, Any], base: baseline.Baseline) -> list[str]:
    notes = []
    sampled = base.samples[-1].table_size + len(base.samples[-1].seconds)
    if any(base.extrapolated(n) for n in data["plan"]["sizes"]):
        notes.append(
            f"baseline times past table size {sampled} are extrapolated along the last "
            "sampled segment (iptables -C reads the whole ruleset: the cost keeps growing)"
        )
    for ttl in data.get("ttl") or []:
        if ttl["never_seen"]:
            notes.append(
                f"ttl ({ttl['backend']}): {ttl['never_seen']} of {ttl['n']} timed rules never "
                "reached the kernel: their expiry passed while the worker was still applying "
                "the burst, so it reported them 'expired' instead of applying them (as designed)"
            )
    if any(t["backend"] in SET_BACKENDS for t in data.get("ttl") or []):
        notes.append(
            "ttl (set backends): the kernel also times each element out itself, at the "
            "expiry rounded up to a whole second, so their lag cannot much exceed 1 s even "
            "if the worker is late; the lag shown is the worker's delete when it came first"
        )
    notes.append(
        f"latency p99 of {LATENCY_SAMPLES} samples is their maximum; numbers vary between "
        "runs with the machine's load (see load average), the ratios less so: the baseline "
        "and pushfw run under the same load"
    )
    if data["memory"].get("worker_rss_million"):
        notes.append(
            f"the 1M-rule jobs use addresses of {WIDE_NET} (the benchmarking range holds "
            f"131,070) and PUSHFW_SET_SIZE={MILLION_SET_SIZE} (the default, 1,000,000, "
            "would leave no room beyond the job)"
        )
    return notes


def _available(plan: Plan, progress: Progress) -> list[str]:
    """The plan's backends this machine can run; the others are dropped with a note."""
    notes = []
    for backend in list(plan.backends):
        why = backend_missing(backend)
        if why:
            plan.backends.remove(backend)
            notes.append(f"{backend} backend not measured: {why}")
            progress(notes[-1])
    if not plan.backends:
        raise BenchError("no backend can run here")
    return notes


def execute(plan: Plan, progress: Progress) -> dict[str, Any]:
    started = datetime.datetime.now(datetime.UTC)
    skipped = _available(plan, progress)
    data: dict[str, Any] = {
        "version": 2,
        "quick": plan.quick,
        "started": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "plan": {
            "sizes": plan.sizes,
            "backends": plan.backends,
            "baseline_table_sizes": plan.baseline_table_sizes,
            "baseline_rules_per_size": plan.baseline_rules,
            "latency_samples": LATENCY_SAMPLES,
            "reconcile_n": plan.reconcile_n,
            "ttl_n": plan.ttl_n,
            "ttl_s": list(plan.ttls),
            "million": plan.million,
            "worker": "default PUSHFW_* settings (batch 500, block 1000 ms)",
        },
    }
    with bench_env(progress) as env:
        run = Run(plan, env)
        run.notes += skipped
        base = baseline.run_baseline(env, plan.baseline_table_sizes, plan.baseline_rules)
        for backend in plan.backends:
            run.backend(backend)
        run.timed_memory()
        progress(f"limits: bare drain, parse and raw kernel batches of {plan.sizes[-1]} entries")
        lim = limits.measure_limits(env, plan.sizes[-1], plan.backends)
    data["machine"]["loadavg_at_end"] = list(os.getloadavg())
    _attach_baseline(run.jobs, base)
    lim["shares"] = limits.shares(lim, run.jobs)
    data.update(
        {
            "baseline": base.to_json(plan.sizes),
            "throughput": run.jobs,
            "latency": run.latency,
            "reconcile": list(run.reconcile.values()),
            "ttl": run.ttl,
            "memory": run.memory,
            "limits": lim,
        }
    )
    data["targets"] = targets(data)
    data["notes"] = run.notes + _notes(data, base)
    data["duration_s"] = progress.elapsed()
    return data


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.from_args(args)
    progress = Progress()
    try:
        data = execute(plan, progress)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    plan.out.write_text(json.dumps(data, indent=2) + "\n")
    svg = plot.write_svg(data, plan.out)
    sys.stdout.write(render(data))
    progress(f"wrote {plan.out} and {svg.name} (python -m bench.plot redraws it)")
    return 0
