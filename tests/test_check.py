"""``pushfw status --check`` and ``--version``, as cron or Nagios runs them: real processes
against the session's redis-server, read by exit status and first line."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import redis

from pushfw.producer import Keys, Producer
from pushfw.producer.connection import redis_ms
from pushfw.producer.records import HostStatus
from testbed.env import clean_env
from tests.conftest import RedisServer, Run, memory_worker, run_pushfw, wait_for
from tests.test_metrics import build, running, scrape, value

KEYS = Keys()


def beat(r: redis.Redis, host: str, **fields: object) -> None:
    """A heartbeat as a worker of ``host`` writes it, in the state ``fields`` say."""
    status = HostStatus.model_validate({"host": host, "last_seen_ms": redis_ms(r), **fields})
    r.hset(KEYS.hosts, host, status.model_dump_json())


def check(pushfw: Run, *args: str, **kwargs: str | None) -> tuple[int, str]:
    proc = pushfw("status", "--check", *args, **kwargs)  # type: ignore[arg-type]
    assert proc.stdout.count("\n") == 1, proc.stdout + proc.stderr
    return proc.returncode, proc.stdout.strip()


def test_check_follows_a_real_worker(r: redis.Redis, redis_server: RedisServer, pushfw: Run):
    assert check(pushfw) == (3, "PUSHFW UNKNOWN: no host has sent a heartbeat | hosts=0")
    worker = memory_worker(redis_server, "web1")  # beats every 5 s: stale after 15 s
    with running(worker):
        producer = Producer.from_url(redis_server.url)
        try:
            assert producer.wait(producer.drop("192.0.2.1"))
        finally:
            producer.client.close()
        wait_for(lambda: check(pushfw)[0] == 0, what="the host to be running")
        assert check(pushfw) == (
            0,
            "PUSHFW OK: 1 of 1 hosts ok | hosts=1 ok=1 warning=0 critical=0",
        )
    code, line = check(pushfw)
    assert (code, line.split(" | ")[0]) == (1, "PUSHFW WARNING: web1 stopped; 0 of 1 hosts ok")


def test_check_names_each_unhealthy_host_and_exits_with_the_worst(r: redis.Redis, pushfw: Run):
    beat(r, "ok1", state="running")
    beat(r, "busy1", state="running", problems=["scheduler: failing since 04:00"])
    assert check(pushfw) == (
        1,
        "PUSHFW WARNING: busy1 DEGRADED; 1 of 2 hosts ok | hosts=2 ok=1 warning=1 critical=0",
    )
    beat(r, "new1", state="starting")
    assert "new1" not in check(pushfw)[1], "a host starting without a problem is ok"
    beat(r, "new1", state="starting", problems=["startup: failing since 04:00"])
    beat(r, "lost1", state="running", ledger_lost=True)
    beat(r, "twin1", state="running", duplicate="a1b2c3")
    beat(r, "gone1", last_seen_ms=redis_ms(r) - 600_000)
    beat(r, "off1", state="stopped", last_seen_ms=redis_ms(r) - 600_000)
    code, line = check(pushfw)
    assert code == 2
    assert line == (
        "PUSHFW CRITICAL: busy1 DEGRADED, gone1 STALE, lost1 LEDGER LOST, "
        "new1 starting with problems, off1 STOPPED, twin1 DUPLICATE; "
        "1 of 7 hosts ok | hosts=7 ok=1 warning=2 critical=4"
    )


def test_check_of_named_hosts(r: redis.Redis, pushfw: Run):
    beat(r, "web1", state="running")
    beat(r, "gone1", last_seen_ms=redis_ms(r) - 600_000)
    assert check(pushfw, "--host", "web1")[0] == 0
    assert check(pushfw, "--host", "web1", "--host", "db9") == (
        2,
        "PUSHFW CRITICAL: db9 MISSING; 1 of 2 hosts ok | hosts=2 ok=1 warning=0 critical=1",
    )


def test_check_says_unknown_when_redis_cannot_be_read(pushfw: Run):
    code, line = check(pushfw, url="redis://127.0.0.1:1/0")
    assert code == 3
    assert line.startswith("PUSHFW UNKNOWN: cannot read the hosts: ")


def test_check_takes_no_json(pushfw: Run):
    proc = pushfw("status", "--check", "--json")
    assert proc.returncode == 2 and "no --json" in proc.stderr


def test_status_without_check_still_exits_0_with_a_stale_host(r: redis.Redis, pushfw: Run):
    beat(r, "gone1", last_seen_ms=redis_ms(r) - 600_000)
    proc = pushfw("status")
    assert proc.returncode == 0 and "STALE" in proc.stdout


def test_version_of_both_clis():
    expected = version("pushfw")
    for module, prog in (("pushfw.producer", "pushfw"), ("pushfw.worker", "pushfw-worker")):
        proc = subprocess.run(
            [sys.executable, "-m", module, "--version"],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=60,
        )
        assert (proc.returncode, proc.stdout) == (0, f"{prog}, version {expected}\n")


def test_a_real_ledger_lost_is_critical_in_check_mode_and_in_the_metrics(
    volatile_redis: RedisServer,
):
    """FLUSHALL under a running worker: both the check and the scrape say so."""
    worker = build(volatile_redis, heartbeat_interval_s=0.5)
    producer = Producer.from_url(volatile_redis.url)
    try:
        with running(worker):
            assert producer.wait(producer.drop("192.0.2.1"))
            assert value(scrape(worker), "pushfw_ledger_lost") == 0
            producer.client.flushall()
            wait_for(
                lambda: value(scrape(worker), "pushfw_ledger_lost") == 1,
                what="the metric to say the ledger is lost",
            )
            proc = run_pushfw("--redis-url", volatile_redis.url, "status", "--check")
    finally:
        producer.client.close()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.startswith("PUSHFW CRITICAL: h1 LEDGER LOST; 0 of 1 hosts ok | ")
