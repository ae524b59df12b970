"""What one host's read of the command stream costs Redis: a group's, or a plain ``XREAD``.

Fills a stream of a Redis of its own with N drop commands, then has H hosts read all of it
in 1,000-entry batches, once with a consumer group each (``XREADGROUP`` + ``XACK``, what
every worker does today, on the primary) and once with ``XREAD`` after a position (what a
follower reading a replica would do), and prints Redis CPU (``INFO cpu``) per entry and host.

    python -m bench.readcost                      # 100,000 entries, 5 hosts
    python -m bench.readcost --entries 20000 --hosts 2 --json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import redis

from testbed.redis_server import RedisServer

STREAM = "{pushfw}:cmd"
BATCH = 1000


def redis_cpu_s(client: redis.Redis) -> float:
    """Redis's CPU seconds so far (user plus system, ``INFO cpu``)."""
    info: Any = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def fill_drops(client: redis.Redis, entries: int) -> None:
    """Add ``entries`` drops of distinct IPv4 addresses to the command stream, pipelined."""
    pipe = client.pipeline(transaction=False)
    for i in range(entries):
        pipe.xadd(
            STREAM, {"op": "drop.insert", "ip": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"}
        )
        if len(pipe) >= BATCH:
            pipe.execute()
    pipe.execute()


def _groups(client: redis.Redis, hosts: int) -> None:
    for host in range(hosts):
        client.xgroup_create(STREAM, f"host:{host}", id="0")
        while True:
            reply: Any = client.xreadgroup(f"host:{host}", "c", {STREAM: ">"}, count=BATCH)
            if not reply:
                break
            client.xack(STREAM, f"host:{host}", *(entry_id for entry_id, _ in reply[0][1]))


def _plain_reads(client: redis.Redis, hosts: int) -> None:
    for _ in range(hosts):
        position: Any = "0"
        while True:
            reply: Any = client.xread({STREAM: position}, count=BATCH)
            if not reply:
                break
            position = reply[0][1][-1][0]


def measure(entries: int, hosts: int) -> dict[str, float]:
    """Redis CPU microseconds per entry and host, for each way of reading."""
    with tempfile.TemporaryDirectory(prefix="pushfw-readcost-") as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        client = redis.Redis(unix_socket_path=str(server.socket_path))
        try:
            fill_drops(client, entries)
            out = {}
            for name, read in (("xreadgroup_xack_us", _groups), ("xread_us", _plain_reads)):
                before = redis_cpu_s(client)
                read(client, hosts)
                out[name] = (redis_cpu_s(client) - before) / (entries * hosts) * 1e6
            return out
        finally:
            client.close()
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.readcost", description=__doc__)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--hosts", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures = measure(args.entries, args.hosts)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"{args.entries:,} entries read by {args.hosts} hosts, Redis CPU per entry and host:")
    print(
        f"  XREADGROUP + XACK (a consumer group per host): {figures['xreadgroup_xack_us']:.2f} us"
    )
    print(f"  XREAD after a position (a follower):           {figures['xread_us']:.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
