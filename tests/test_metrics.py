"""The Prometheus endpoint, scraped over real HTTP from workers running in this process."""

from __future__ import annotations

import ipaddress
import re
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from pushfw.producer import Action, Producer
from pushfw.producer.lists import ListContent
from pushfw.worker import Worker
from pushfw.worker.backends.base import Rule, RuleKey
from pushfw.worker.heartbeat import pushfw_version
from pushfw.worker.metrics import Metrics
from tests.conftest import RedisServer, memory_worker, wait_for

CMD = "{pushfw}:cmd"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def build(server: RedisServer, host: str = "h1", **overrides: Any) -> Worker:
    settings = {"heartbeat_interval_s": 0.1, "metrics_listen": "127.0.0.1:0", **overrides}
    return memory_worker(server, host, **settings)


@contextmanager
def running(*workers: Worker) -> Iterator[None]:
    """Each worker's loop in a thread of its own, until the block ends."""
    threads = [threading.Thread(target=w.run) for w in workers]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: all(w.notifier.is_ready for w in workers), what="the workers to be ready")
        yield
    finally:
        for worker in workers:
            worker.request_stop()
        for thread in threads:
            thread.join(timeout=10)


def scrape(worker: Worker) -> Samples:
    """GET /metrics and parse it with prometheus-client's own parser."""
    assert worker.metrics.address is not None
    host, port = worker.metrics.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def results(r: Any) -> dict[str, str]:
    return {f[b"cmd"].decode(): f[b"status"].decode() for _, f in r.xrange("{pushfw}:results")}


def test_counters_after_pushing_commands(r, redis_server: RedisServer, producer: Producer):
    producer.drop("192.0.2.50")  # before the host's first start: reaches it by reconcile
    worker = build(redis_server, memory_fail="203.0.113.66", max_deliveries=2)
    extra = RuleKey(Action.DROP, ipaddress.ip_network("192.0.2.99"))
    worker.backend.add(Rule(extra))  # in the kernel, not in the ledger: drift to remove
    worker.backend.commit()
    with running(worker):
        sent = [
            producer.drop("192.0.2.1"),  # applied
            producer.drop("192.0.2.1"),  # unchanged
            r.xadd(CMD, {"op": "explode", "ip": "192.0.2.3"}).decode(),  # rejected, bad op
            r.xadd(CMD, {"op": "drop.insert", "ip": "1.2.3.4; reboot"}).decode(),  # rejected
            producer.drop("203.0.113.66"),  # fails twice: a dead letter
            producer.drop("192.0.2.2", ttl_s=1),  # applied, then expired by the sweep
        ]
        wait_for(lambda: set(sent) <= set(results(r)), what="a result for every command")

        def settled() -> bool:
            s = scrape(worker)
            return (
                value(s, "pushfw_scheduler_expiries_total") == 1
                and value(s, "pushfw_expiry_lag_seconds_count") == 1
                and value(s, "pushfw_commands_total", op="drop.delete", status="applied")
                + value(s, "pushfw_commands_total", op="drop.delete", status="unchanged")
                == 1
                and value(s, "pushfw_rules", backend="memory", action="drop") == 2
            )

        wait_for(settled, timeout=20, what="the expiry to be counted everywhere")
        samples = scrape(worker)

    def commands(op: str, status: str) -> float:
        return value(samples, "pushfw_commands_total", op=op, status=status)

    assert commands("drop.insert", "applied") == 2
    assert commands("drop.insert", "unchanged") == 1
    assert commands("drop.insert", "rejected") == 1
    assert commands("invalid", "rejected") == 1
    assert commands("drop.insert", "failed") == 1
    answered = sum(v for (name, _), v in samples.items() if name == "pushfw_commands_total")
    assert answered == 7, "six commands and the scheduler's delete"
    assert value(samples, "pushfw_command_lag_seconds_count") == answered
    assert value(samples, "pushfw_dead_letters_total") == 1
    assert value(samples, "pushfw_reconcile_drift_total", kind="added") == 1
    assert value(samples, "pushfw_reconcile_drift_total", kind="removed") == 1
    assert value(samples, "pushfw_reconcile_drift_total", kind="updated") == 0
    assert value(samples, "pushfw_rules", backend="memory", action="accept") == 0
    assert value(samples, "pushfw_group_pending") == 0
    assert value(samples, "pushfw_redis_reconnects_total") == 0
    batches = value(samples, "pushfw_batch_size_count")
    assert batches >= 1
    assert value(samples, "pushfw_apply_duration_seconds_count") == batches
    assert value(samples, "pushfw_batch_size_sum") >= answered


def test_workers_in_one_process_count_apart(r, redis_server: RedisServer, producer: Producer):
    web, db = build(redis_server, "web1"), build(redis_server, "db1")
    with running(web, db):
        cmd = producer.drop("192.0.2.7", target=["web1"])
        wait_for(lambda: cmd in results(r), what="web1's result")
        producer.wait(producer.drop("192.0.2.8"), expect=2)
        web_samples, db_samples = scrape(web), scrape(db)
    assert web.metrics.address is None, "the endpoint closes with the worker"
    applied = {"op": "drop.insert", "status": "applied"}
    assert value(web_samples, "pushfw_commands_total", **applied) == 2
    assert value(db_samples, "pushfw_commands_total", **applied) == 1


def test_redis_reconnects_are_counted(aof_redis: RedisServer):
    worker = build(aof_redis)
    with running(worker):
        aof_redis.stop()
        wait_for(
            lambda: value(scrape(worker), "pushfw_redis_reconnects_total") == 1,
            what="the lost connection to be counted",
        )
        aof_redis.start()
        producer = Producer.from_url(aof_redis.url)
        try:
            assert producer.wait(producer.drop("192.0.2.1"), timeout_s=30), "the worker is back"
        finally:
            producer.client.close()
        assert value(scrape(worker), "pushfw_redis_reconnects_total") == 1


def test_what_status_knows_and_the_process(r, redis_server: RedisServer, producer: Producer):
    worker = build(redis_server)
    with running(worker):
        entries = ListContent.of(["127.0.0.0/8", "192.0.2.7", "2001:db8::/32"])
        assert producer.wait(producer.load_list("feed", entries))

        def listed() -> bool:
            return value(scrape(worker), "pushfw_list_entries", list="feed") == 2

        wait_for(listed, what="the list's entries at heartbeat")
        samples = scrape(worker)
        producer.wait(producer.delete_list("feed"))
        wait_for(
            lambda: ("pushfw_list_entries", frozenset({("list", "feed")})) not in scrape(worker),
            what="a removed list's series to go",
        )
    assert value(samples, "pushfw_list_refused", list="feed") == 1, "loopback is protected"
    assert value(samples, "pushfw_build_info", version=pushfw_version()) == 1
    assert value(samples, "pushfw_ledger_lost") == 0
    assert value(samples, "pushfw_problems") == 0
    assert value(samples, "process_resident_memory_bytes") > 1_000_000
    assert value(samples, "process_start_time_seconds") > 0
    assert not [name for name, _ in samples if name.endswith("_created")]


def test_operating_doc_lists_every_metric() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "operating.md").read_text()
    listed = set(re.findall(r"^\| `(pushfw_\w+)", doc, flags=re.MULTILINE))
    names = set()
    for family in Metrics().registry.collect():
        suffix = "_total" if family.type == "counter" else ""
        names.add(family.name + suffix)
    assert {name for name in names if name.startswith("pushfw_")} == listed


def test_list_hits_have_one_series_per_list_held_and_a_gone_list_loses_its_own() -> None:
    metrics = Metrics()

    def series() -> dict[tuple[str, str], float]:
        return {
            (s.name, s.labels["list"]): s.value
            for family in metrics.registry.collect()
            for s in family.samples
            if s.name.startswith("pushfw_list_hits")
        }

    metrics.list_hits({"level1": (12, 640), "vpc": (3, 180)})
    assert series() == {
        ("pushfw_list_hits_packets", "level1"): 12,
        ("pushfw_list_hits_bytes", "level1"): 640,
        ("pushfw_list_hits_packets", "vpc"): 3,
        ("pushfw_list_hits_bytes", "vpc"): 180,
    }
    metrics.list_hits({"vpc": (5, 300)})  # level1 removed from the host
    assert series() == {
        ("pushfw_list_hits_packets", "vpc"): 5,
        ("pushfw_list_hits_bytes", "vpc"): 300,
    }
