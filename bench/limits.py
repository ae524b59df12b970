"""The floors under pushfw's throughput, measured in the same run.

- bare drain: XREADGROUP COUNT 500 + XACK of N entries shaped like the jobs' commands,
  doing nothing with them, through redis-py (with hiredis when installed);
- parse: :func:`pushfw.producer.contract.parse_command` on N raw field dicts, as the
  worker gets them from the stream (bytes);
- raw kernel batch (set backends): the same N adds in one kernel batch, one ``ipset -exist
  restore`` and one libnftables JSON transaction into scratch sets (:mod:`bench.rawkernel`,
  run inside the namespace; best of a few runs).

A job's time beyond ``N * (drain + parse per entry)`` is pushfw's own share; a job's rate
over the slower of the bare drain and the backend's raw kernel batch rate is how close
pushfw comes to the limits it cannot beat.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import redis.utils

from bench.env import BenchEnv, BenchError
from bench.phases import drop_fields, push
from pushfw.producer.contract import parse_command

DRAIN_KEY = "bench:drain"
DRAIN_GROUP = "drain"
DRAIN_COUNT = 500


def drain_seconds(env: BenchEnv, n: int) -> float:
    """Time to read and acknowledge N entries with no work in between."""
    client = env.client
    client.delete(DRAIN_KEY)
    push(env, drop_fields(n), key=DRAIN_KEY)
    client.xgroup_create(DRAIN_KEY, DRAIN_GROUP, id="0")
    started = time.perf_counter()
    total = 0
    while True:
        reply: Any = client.xreadgroup(
            DRAIN_GROUP, "c", {DRAIN_KEY: ">"}, count=DRAIN_COUNT, block=None
        )
        entries = reply[0][1] if reply else []
        if not entries:
            break
        client.xack(DRAIN_KEY, DRAIN_GROUP, *(entry_id for entry_id, _ in entries))
        total += len(entries)
    seconds = time.perf_counter() - started
    client.delete(DRAIN_KEY)
    if total != n:
        raise RuntimeError(f"drained {total} entries, expected {n}")
    return seconds


def parse_seconds(n: int) -> float:
    raw = [{k.encode(): v.encode() for k, v in f.items()} for f in drop_fields(n)]
    started = time.perf_counter()
    for fields in raw:
        parse_command(fields)
    return time.perf_counter() - started


def measure_limits(env: BenchEnv, n: int, backends: Sequence[str]) -> dict[str, Any]:
    drain = drain_seconds(env, n)
    parse = parse_seconds(n)
    return {
        "raw_kernel": raw_kernel(env, n, backends),
        "n": n,
        "hiredis": bool(redis.utils.HIREDIS_AVAILABLE),
        "drain_seconds": drain,
        "drain_per_s": n / drain,
        "drain_us_per_entry": drain / n * 1e6,
        "parse_seconds": parse,
        "parse_per_s": n / parse,
        "parse_us_per_entry": parse / n * 1e6,
        "drain_and_parse_per_s": n / (drain + parse),
    }


RAW_KERNEL_BACKENDS = ("nftables", "ipset")
RAW_KERNEL_RUNS = 3


def raw_kernel(env: BenchEnv, n: int, backends: Sequence[str]) -> dict[str, Any]:
    """Adds/s of one N-element kernel batch per set backend in ``backends``: best of
    :data:`RAW_KERNEL_RUNS` runs of :mod:`bench.rawkernel` inside the namespace."""
    kinds = [b for b in RAW_KERNEL_BACKENDS if b in backends]
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for _ in range(RAW_KERNEL_RUNS if kinds else 0):
        proc = env.ns.run(
            env.python, "-m", "bench.rawkernel", str(n), *kinds, env=env.helper_env(), timeout=600
        )
        for kind, result in json.loads(proc.stdout).items():
            if "error" in result:
                raise BenchError(f"raw {kind} batch of {n}: {result['error']}")
            if result["elements_after"] != n:
                raise BenchError(f"raw {kind} batch: {result['elements_after']} elements, not {n}")
            runs[kind].append(result)
    out = {}
    for kind, results in runs.items():
        best = min(results, key=lambda r: r["seconds"])
        out[kind] = {**best, "runs_seconds": [r["seconds"] for r in results]}
    return out


def shares(limits: dict[str, Any], jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per job: the floor (drain + parse for its N) and the share of time beyond it; its
    rate as a share of the slower of the bare drain and its backend's raw kernel batch."""
    per_entry_s = (limits["drain_us_per_entry"] + limits["parse_us_per_entry"]) / 1e6
    raw = limits.get("raw_kernel", {})
    out = []
    for job in jobs:
        if not job["completed"]:
            continue
        floor = job["n"] * per_entry_s
        kernel_per_s = raw[job["backend"]]["adds_per_s"] if job["backend"] in raw else None
        limit_per_s = min(limits["drain_per_s"], kernel_per_s or limits["drain_per_s"])
        out.append(
            {
                "backend": job["backend"],
                "n": job["n"],
                "floor_seconds": floor,
                "seconds": job["seconds"],
                "pushfw_share": max(0.0, 1 - floor / job["seconds"]),
                "rules_per_s": job["rules_per_s"],
                "kernel_batch_per_s": kernel_per_s,
                "limit_per_s": limit_per_s,
                "limit_is": "drain" if limit_per_s == limits["drain_per_s"] else "kernel",
                "share_of_limit": job["rules_per_s"] / limit_per_s,
            }
        )
    return out
