"""The floors under pushfw's throughput, measured in the same run.

- bare drain: XREADGROUP COUNT 500 + XACK of N entries shaped like the jobs' commands,
  doing nothing with them, through redis-py (with hiredis when installed);
- parse: :func:`pushfw.producer.contract.parse_command` on N raw field dicts, as the
  worker gets them from the stream (bytes).

A job's time beyond ``N * (drain + parse per entry)`` is pushfw's own share.
"""

from __future__ import annotations

import time
from typing import Any

import redis.utils

from bench.env import BenchEnv
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


def measure_limits(env: BenchEnv, n: int) -> dict[str, Any]:
    drain = drain_seconds(env, n)
    parse = parse_seconds(n)
    return {
        "n": n,
        "hiredis": bool(redis.utils.HIREDIS_AVAILABLE),
        "drain_seconds": drain,
        "drain_per_s": n / drain,
        "drain_us_per_entry": drain / n * 1e6,
        "parse_seconds": parse,
        "parse_per_s": n / parse,
        "parse_us_per_entry": parse / n * 1e6,
    }


def shares(limits: dict[str, Any], jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per job: the floor (drain + parse for its N) and the share of time beyond it."""
    per_entry_s = (limits["drain_us_per_entry"] + limits["parse_us_per_entry"]) / 1e6
    out = []
    for job in jobs:
        if not job["completed"]:
            continue
        floor = job["n"] * per_entry_s
        out.append(
            {
                "backend": job["backend"],
                "n": job["n"],
                "floor_seconds": floor,
                "seconds": job["seconds"],
                "pushfw_share": max(0.0, 1 - floor / job["seconds"]),
            }
        )
    return out
