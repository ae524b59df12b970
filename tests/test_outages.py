"""Redis outages and a Redis that comes back empty, as a running worker meets them.

Real worker processes (in a namespace, real kernel tables) against a redis-server of the
test's own, which the test flushes, restarts without persistence, stops or freezes.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from typing import Any

from pushfw.producer import Producer
from testbed.kernel import Firewall
from tests.conftest import Netns, RedisServer, WorkerProcess, pushfw_cli, wait_for


def host_status(server: RedisServer, host: str) -> dict[str, Any]:
    """The host's row of ``pushfw status --json`` ({} while it has no heartbeat)."""
    shown = pushfw_cli(server, "status", "--json")
    assert shown.returncode == 0, shown.stderr
    rows: list[dict[str, Any]] = json.loads(shown.stdout or "[]")
    return next((row for row in rows if row["host"] == host), {})


def applied(producer: Producer, ip: str) -> bool:
    return [x.status.value for x in producer.wait(producer.drop(ip), timeout_s=20)] == ["applied"]


def test_a_redis_that_comes_back_empty_never_stops_a_worker(
    netns: Netns, spawn_worker: Callable[..., WorkerProcess], volatile_redis: RedisServer
) -> None:
    """FLUSHALL, then a restart without persistence: the worker keeps its rules, says
    LEDGER LOST, sets up its groups again and applies what comes next."""
    fw = Firewall(netns, "iptables")
    worker = spawn_worker(netns, server=volatile_redis, heartbeat_interval_s="0.5").start()
    producer = Producer.from_url(volatile_redis.url)
    try:
        assert applied(producer, "192.0.2.1") and applied(producer, "192.0.2.2")
        assert fw.dropped() == ["192.0.2.1/32", "192.0.2.2/32"]

        producer.client.flushall()
        wait_for(
            lambda: host_status(volatile_redis, worker.host).get("state") == "LEDGER LOST",
            20,
            "status to say LEDGER LOST after FLUSHALL",
        )
        assert applied(producer, "192.0.2.3")
        assert fw.dropped() == ["192.0.2.1/32", "192.0.2.2/32", "192.0.2.3/32"]

        volatile_redis.restart()  # no AOF, no snapshot: it comes back empty
        wait_for(
            lambda: host_status(volatile_redis, worker.host).get("state") == "LEDGER LOST",
            20,
            "status to say LEDGER LOST after the restart",
        )
        assert applied(producer, "192.0.2.4")
        assert worker.alive(), worker.log_tail()
        assert fw.dropped() == [f"192.0.2.{i}/32" for i in range(1, 5)], "no rule was lost"
        assert "Traceback" not in worker.log, worker.log_tail(60)
    finally:
        producer.client.close()
    assert worker.stop() == 0


def freeze(server: RedisServer) -> None:
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)


def thaw(server: RedisServer) -> None:
    assert server.proc is not None
    server.proc.send_signal(signal.SIGCONT)


def warnings_by_role(log: str) -> dict[str, int]:
    """WARNING lines per role: the role a supervisor line names, else the logger."""
    counts: dict[str, int] = {}
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        doc = json.loads(line)
        if doc["level"] == "WARNING":
            role = str(doc.get("role") or doc["logger"])
            counts[role] = counts.get(role, 0) + 1
    return counts


def daemon_warnings(worker: WorkerProcess) -> int:
    return warnings_by_role(worker.log).get("pushfw.worker.daemon", 0)


def test_outages_are_reported_once_and_truthfully(
    netns: Netns, spawn_worker: Callable[..., WorkerProcess], aof_redis: RedisServer
) -> None:
    """Redis stopped for a while, then frozen (SIGSTOP) past the client's timeout: each
    outage is one WARNING per role, no traceback, and one "back" line once Redis answers."""
    fw = Firewall(netns, "iptables")
    worker = spawn_worker(netns, server=aof_redis, block_ms="300").start()
    producer = Producer.from_url(aof_redis.url)
    try:
        assert applied(producer, "192.0.2.1")

        aof_redis.stop()
        wait_for(lambda: daemon_warnings(worker) == 1, 20, "the outage seen")
        time.sleep(3)  # several reconnect attempts, each refused
        assert "redis is back" not in worker.log, "nothing answered yet"
        aof_redis.start()
        wait_for(lambda: "redis is back" in worker.log, 20, "the worker to say Redis is back")
        assert applied(producer, "192.0.2.2")
        assert worker.log.count("redis is back") == 1

        freeze(aof_redis)  # the socket stays open; every call waits for its timeout
        try:
            wait_for(lambda: daemon_warnings(worker) == 2, 30, "the freeze seen")
            assert worker.log.count("redis is back") == 1, "nothing answered yet"
        finally:
            thaw(aof_redis)
        wait_for(lambda: worker.log.count("redis is back") == 2, 30, "Redis back after the freeze")
        assert applied(producer, "192.0.2.3")
        assert fw.dropped() == ["192.0.2.1/32", "192.0.2.2/32", "192.0.2.3/32"]
    finally:
        producer.client.close()
    assert worker.stop() == 0
    log = worker.log
    assert "Traceback" not in log, log
    assert log.count("redis is back") == 2, "one per outage, only once Redis answered"
    assert all(n <= 2 for n in warnings_by_role(log).values()), warnings_by_role(log)
    assert warnings_by_role(log).get("pushfw.worker.daemon") == 2, "each outage was seen"
    assert warnings_by_role(log).get("scheduler", 0) >= 1, "the scheduler's thread saw it too"
    assert '"level": "ERROR"' not in log, "an expected outage is no error"
