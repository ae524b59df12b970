"""Where one host's time goes per command: each role of an in-process worker, timed.

Fills the command stream of a Redis of its own with N drops, then lets one worker on the
memory backend (no kernel, no root) drain it in burst mode, with a timer around each role's
step. Prints wall time, the worker's CPU and Redis's CPU per command, and each timed step
in microseconds per command. The steps nest: the ledger's fold holds its Lua round trip, and
the applier's batch holds the plan and commit and the results and ``XACK``.

    python -m bench.roles                   # 100,000 commands
    python -m bench.roles --commands 20000 --json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench.readcost import fill_drops, redis_cpu_s
from pushfw.worker.backends.memory import MemoryBackend
from pushfw.worker.daemon import Worker
from pushfw.worker.settings import WorkerSettings
from testbed.redis_server import RedisServer

STEPS = (
    ("ledger", "fold", "ledger: fold a batch"),
    ("ledger", "_fold", "  of which the Lua fold's round trip"),
    ("applier", "process", "applier: decide, apply, answer a batch"),
    ("applier", "_apply", "  of which plan and commit"),
    ("answers", "finish", "  of which results and XACK"),
    ("stream", "read", "applier: read a batch (XREADGROUP)"),
)


def _timed(owner: object, name: str, totals: dict[str, float], label: str) -> None:
    """Shadow ``owner.name`` with a copy that adds its duration to ``totals[label]``."""
    step: Callable[..., Any] = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - started

    setattr(owner, name, timed)


def measure(commands: int) -> dict[str, float]:
    """Seconds in all and microseconds per command: wall, CPU, and each timed step."""
    with tempfile.TemporaryDirectory(prefix="pushfw-roles-") as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        client = redis.Redis(unix_socket_path=str(server.socket_path))
        try:
            settings = WorkerSettings(  # a short block: the last, empty read ends the run
                redis_url=server.url, host_name="h1", backend="memory", state_dir=tmp, block_ms=20
            )
            Worker(settings, backend=MemoryBackend()).run(burst=True)  # the groups, at 0
            fill_drops(client, commands)
            worker = Worker(settings, backend=MemoryBackend())
            owners = {"ledger": worker.ledger, "applier": worker.applier, "stream": worker.stream}
            owners["answers"] = worker.applier.answers
            totals = {label: 0.0 for _, _, label in STEPS}
            for owner, name, label in STEPS:
                _timed(owners[owner], name, totals, label)
            redis_before, cpu_before = redis_cpu_s(client), time.process_time()
            started = time.perf_counter()
            worker.run(burst=True)
            wall_s = time.perf_counter() - started
            per = 1e6 / commands
            return {
                "commands": commands,
                "wall_s": wall_s,
                "commands_per_s": commands / wall_s,
                "worker cpu": (time.process_time() - cpu_before) * per,
                "redis cpu": (redis_cpu_s(client) - redis_before) * per,
                **{label: seconds * per for label, seconds in totals.items()},
            }
        finally:
            client.close()
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.roles", description=__doc__)
    parser.add_argument("--commands", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.commands < 1:
        parser.error("--commands must be at least 1")
    figures = measure(args.commands)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(
        f"{args.commands:,} commands drained by one worker (memory backend) in "
        f"{figures['wall_s']:.2f} s, {figures['commands_per_s']:,.0f} commands/s"
    )
    print(f"  {'per command':42s} {'us':>7s}")
    for label in ("worker cpu", "redis cpu", *(label for _, _, label in STEPS)):
        print(f"  {label:42s} {figures[label]:7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
