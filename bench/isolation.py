"""What a refused batch costs: isolating its failing commands against a full set.

A set filled to its size refuses every add. The applier then commits the batch's commands
one at a time; each refused commit must cost O(1), not a re-read of the table
(docs/benchmarks.md, "Measurements behind the code"). This fills a set backend to N in a
throwaway network namespace, then times one refused batch of ``--batch`` adds and each of
its commands alone, beside one accepted single add into a set of the same size. (ipset's
kernel count may let a set take an element or two past ``maxelem`` after a refused batch was
undone: those adds are accepted and left out of the mean.)

    python -m bench.isolation                    # nftables and ipset at 10k and 20k
    python -m bench.isolation --sizes 100000 --backends nftables --json
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys
import time
from typing import Any

from pushfw.producer.contract import Action
from pushfw.worker.backends import make_backend
from pushfw.worker.backends.base import Backend, Rule, RuleKey
from pushfw.worker.errors import BackendError

_BASE = int(ipaddress.IPv4Address("10.0.0.0"))


def _rule(i: int) -> Rule:
    return Rule(RuleKey(Action.DROP, ipaddress.ip_network(ipaddress.IPv4Address(_BASE + i))))


def _commit_s(backend: Backend, rules: list[Rule]) -> tuple[float, bool]:
    """Seconds one commit of these adds took, and whether the kernel refused it."""
    started = time.perf_counter()
    for rule in rules:
        backend.add(rule)
    try:
        backend.commit()
    except BackendError:
        backend.discard()
        return time.perf_counter() - started, True
    return time.perf_counter() - started, False


def measure(backend_name: str, size: int, batch: int) -> dict[str, Any]:
    """Inside a namespace: fill to ``size``, time the refused batch and its commands alone."""
    backend = make_backend(backend_name, set_size=size)
    backend.open()
    try:
        for first in range(0, size - 1, 10_000):
            for i in range(first, min(first + 10_000, size - 1)):
                backend.add(_rule(i))
            backend.commit()
        started = time.perf_counter()
        backend.add(_rule(size - 1))  # the last free slot: an accepted single add at size N
        backend.commit()
        accepted_s = time.perf_counter() - started
        extra = [_rule(size + i) for i in range(batch)]
        whole_s, refused = _commit_s(backend, extra)
        if not refused:
            raise SystemExit(f"{backend_name}: the full set took the batch: nothing measured")
        tries = [_commit_s(backend, [rule]) for rule in extra]
        alone = [seconds for seconds, refused in tries if refused]
    finally:
        backend.uninstall()
        backend.close()
    return {
        "backend": backend_name,
        "size": size,
        "batch": batch,
        "accepted_add_ms": accepted_s * 1000,
        "refused_batch_ms": whole_s * 1000,
        "refused_alone": len(alone),
        "refused_alone_ms_mean": sum(alone) / len(alone) * 1000,
        "refused_alone_ms_max": max(alone) * 1000,
        "isolating_batch_ms": (whole_s + sum(seconds for seconds, _ in tries)) * 1000,
    }


def _in_namespace(backend: str, size: int, batch: int) -> dict[str, Any]:
    name = f"pfw-iso-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        inside = ["--inside", "--backends", backend, "--sizes", str(size), "--batch", str(batch)]
        out = subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, "-m", "bench.isolation", *inside],
            check=True,
            capture_output=True,
            text=True,
        )
        result: dict[str, Any] = json.loads(out.stdout)
        return result
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.isolation", description=__doc__)
    parser.add_argument("--backends", default="nftables,ipset")
    parser.add_argument("--sizes", default="10000,20000")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.inside:
        print(json.dumps(measure(backends[0], sizes[0], args.batch)))
        return 0
    rows = []
    for backend in backends:
        for size in sizes:
            print(f"{backend} at {size}: filling and measuring ...", file=sys.stderr)
            rows.append(_in_namespace(backend, size, args.batch))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'BACKEND':9} {'SIZE':>7} {'ADD_MS':>7} {'REFUSED_BATCH_MS':>16} "
        f"{'ALONE_MEAN_MS':>13} {'ALONE_MAX_MS':>12} {'ISOLATE_ALL_MS':>14}"
    )
    for row in rows:
        print(
            f"{row['backend']:9} {row['size']:>7} {row['accepted_add_ms']:>7.2f} "
            f"{row['refused_batch_ms']:>16.2f} {row['refused_alone_ms_mean']:>13.2f} "
            f"{row['refused_alone_ms_max']:>12.2f} {row['isolating_batch_ms']:>14.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
