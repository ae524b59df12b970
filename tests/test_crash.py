"""I1: kill -9 of the worker at random points, and a Redis restart with AOF, lose nothing."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import redis

from pushfw.producer import Producer
from testbed.kernel import Firewall, dropped
from tests.conftest import Netns, RedisServer, wait_for

CMD = "{pushfw}:cmd"


def address(i: int) -> str:
    return f"198.18.{i // 250}.{i % 250 + 1}"


def push(
    server: RedisServer, start: int, stop: int, chunk: int = 50, pause_s: float = 0.02
) -> None:
    """XADD like a producer would: pipelined chunks."""
    client = redis.Redis.from_url(server.url)
    for first in range(start, stop, chunk):
        pipe = client.pipeline(transaction=False)
        for i in range(first, min(first + chunk, stop)):
            pipe.xadd(CMD, {"op": "drop_insert", "ip": address(i), "reply": "1"})
        pipe.execute()
        time.sleep(pause_s)
    client.close()


def settled(client: Any, group: str) -> bool:
    groups = {g["name"].decode(): g for g in client.xinfo_groups(CMD)}
    info = groups.get(group)
    return info is not None and info["pending"] == 0 and info["lag"] == 0


def assert_each_rule_once(ns: Netns, count: int, backend: str = "iptables") -> None:
    rules = Firewall(ns, backend).dropped() if backend != "iptables" else dropped(ns)
    assert len(rules) == len(set(rules)), "a rule is in the kernel twice"
    assert sorted(rules) == sorted(f"{address(i)}/32" for i in range(count))


def test_kill9_at_random_points_loses_nothing(netns, backend, spawn_worker, redis_server, r):
    rng = random.Random(7)
    worker = spawn_worker(netns, backend=backend, batch_size="50").start()
    sender = threading.Thread(target=push, args=(redis_server, 0, 1000, 25, 0.08))
    sender.start()
    kills = 0
    while sender.is_alive() or kills < 3:
        time.sleep(rng.uniform(0.05, 0.4))
        worker.kill9()
        kills += 1
        worker.start(wait=False)
    sender.join()
    worker.wait_ready()
    wait_for(lambda: settled(r, f"host:{netns.name}"), timeout=60, what="the host group to drain")
    assert worker.stop() == 0
    assert kills >= 3
    assert_each_rule_once(netns, 1000, backend)
    results = {fields[b"cmd"]: fields[b"status"] for _, fields in r.xrange("{pushfw}:results")}
    assert len(results) == 1000, "every command has a result"
    assert set(results.values()) <= {b"applied", b"unchanged"}


def test_redis_restart_with_aof_loses_nothing(netns, spawn_worker, aof_redis: RedisServer):
    client = redis.Redis.from_url(aof_redis.url)
    worker = spawn_worker(netns, server=aof_redis, batch_size="20").start()
    push(aof_redis, 0, 300, chunk=20, pause_s=0.005)
    aof_redis.restart()
    push(aof_redis, 300, 600, chunk=20, pause_s=0.005)
    aof_redis.stop(hard=True)
    time.sleep(0.5)
    aof_redis.start()
    try:
        wait_for(
            lambda: settled(client, f"host:{netns.name}"), timeout=60, what="the group to drain"
        )
        assert worker.stop() == 0
        assert_each_rule_once(netns, 600)
        assert "redis unavailable" in worker.log
        assert "redis is back" in worker.log
        producer = Producer(redis.Redis.from_url(aof_redis.url, decode_responses=True))
        assert {r.status.value for r in producer.results(count=2000)} <= {"applied", "unchanged"}
    finally:
        client.close()
