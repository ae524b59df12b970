"""The applier against a real redis-server, with the in-memory backend (no root needed)."""

from __future__ import annotations

import ipaddress
import threading
import time
from typing import Any

from pushfw.producer import Action, Producer
from pushfw.producer.connection import redis_ms
from pushfw.worker import Worker
from pushfw.worker.backends.base import RuleKey
from pushfw.worker.backends.memory import MemoryBackend
from tests.conftest import RedisServer, memory_worker

CMD = "{pushfw}:cmd"


def make_worker(server: RedisServer, host: str = "h1", **overrides: Any) -> Worker:
    worker = memory_worker(server, host, **overrides)
    worker.setup()
    return worker


def results_by_cmd(r: Any) -> dict[str, dict[str, str]]:
    out = {}
    for _, fields in r.xrange("{pushfw}:results"):
        decoded = {k.decode(): v.decode() for k, v in fields.items()}
        out[decoded["cmd"]] = decoded
    return out


def key(action: str, ip: str) -> RuleKey:
    return RuleKey(Action(action), ipaddress.ip_network(ip))


def pending(r: Any, host: str = "h1") -> int:
    return int(r.xpending(CMD, f"host:{host}")["pending"])


def test_commands_sent_before_first_start_are_applied(r, redis_server, producer: Producer):
    """A new group starts at the beginning of the stream: nothing sent earlier is lost."""
    worker = make_worker(redis_server)
    a = producer.drop("192.0.2.1", reason="ssh brute force", request_id="req-1")
    b = producer.drop("2001:db8::/32")
    c = producer.accept("198.51.100.0/24")
    worker.run(burst=True)

    rules = dict(worker.backend.committed().pairs())
    assert set(rules) == {
        key("drop", "192.0.2.1"),
        key("drop", "2001:db8::/32"),
        key("accept", "198.51.100.0/24"),
    }
    results = results_by_cmd(r)
    assert {results[x]["status"] for x in (a, b, c)} == {"applied"}
    assert results[a]["request_id"] == "req-1"
    assert results[a]["host"] == "h1"
    assert pending(r) == 0


def test_repeat_insert_is_unchanged_and_delete_removes(r, redis_server, producer):
    worker = make_worker(redis_server)
    first = producer.drop("192.0.2.1")
    again = producer.drop("192.0.2.1")
    gone = producer.undrop("192.0.2.1")
    absent = producer.undrop("192.0.2.1")
    worker.run(burst=True)

    results = results_by_cmd(r)
    assert [results[x]["status"] for x in (first, again, gone, absent)] == [
        "applied",
        "unchanged",
        "applied",
        "unchanged",
    ]
    assert dict(worker.backend.committed().pairs()) == {}


def test_one_commit_per_batch(r, redis_server, producer):
    worker = make_worker(redis_server)
    for i in range(200):
        producer.drop(f"192.0.2.{i}")
    worker.run(burst=True)
    assert isinstance(worker.backend, MemoryBackend)
    assert len(worker.backend.committed()) == 200
    assert worker.backend.commits == 1


def test_invalid_entries_are_rejected_and_acked_without_harm(r, redis_server, producer):
    worker = make_worker(redis_server)
    bad = [
        r.xadd(CMD, {"reply": "1", "op": "drop.insert", "ip": "1.2.3.4; reboot"}),
        r.xadd(CMD, {"reply": "1", "op": "drop.insert", "ip": b"\xff\xfe"}),
        r.xadd(CMD, {"reply": "1", "op": "explode", "ip": "192.0.2.1"}),
        r.xadd(CMD, {"ip": "192.0.2.1"}),
    ]
    good = producer.drop("192.0.2.9")
    worker.run(burst=True)

    results = results_by_cmd(r)
    for entry_id in bad:
        assert results[entry_id.decode()]["status"] == "rejected"
    assert "whitespace" in results[bad[0].decode()]["detail"]
    assert "UTF-8" in results[bad[1].decode()]["detail"]
    assert results[good]["status"] == "applied"
    assert set(worker.backend.committed()) == {key("drop", "192.0.2.9")}
    assert pending(r) == 0


def test_protected_networks_are_never_dropped(r, redis_server, producer):
    worker = make_worker(redis_server, protect="203.0.113.128/25")
    loop = r.xadd(CMD, {"reply": "1", "op": "drop.insert", "ip": "127.0.0.1"})
    everything = r.xadd(CMD, {"reply": "1", "op": "drop.insert", "ip": "0.0.0.0/0"})
    configured = producer.drop("203.0.113.0/24")
    allowed = producer.accept("127.0.0.1")
    worker.run(burst=True)

    results = results_by_cmd(r)
    for entry_id in (loop.decode(), everything.decode(), configured):
        assert results[entry_id]["status"] == "rejected"
        assert "protected" in results[entry_id]["detail"]
    assert results[allowed]["status"] == "applied"
    assert set(worker.backend.committed()) == {key("accept", "127.0.0.1")}


def test_target_selects_hosts_by_name_or_label(r, redis_server, producer):
    worker = make_worker(redis_server, host_labels="web,eu")
    mine = producer.drop("192.0.2.1", target=["h1"])
    by_label = producer.drop("192.0.2.2", target=["web"])
    other = producer.drop("192.0.2.3", target=["h2", "db"])
    worker.run(burst=True)

    assert set(worker.backend.committed()) == {key("drop", "192.0.2.1"), key("drop", "192.0.2.2")}
    results = results_by_cmd(r)
    assert results[mine]["status"] == results[by_label]["status"] == "applied"
    assert other not in results, "a host that is not targeted reports nothing"
    assert pending(r) == 0


def test_command_past_its_expiry_is_reported_expired(r, redis_server):
    """Expiry is absolute: the entry id's time plus ttl; a late host applies nothing."""
    worker = make_worker(redis_server)
    old = r.xadd(
        CMD, {"reply": "1", "op": "ttl_drop_insert", "ip": "192.0.2.1", "ttl": "60"}, id="1000-0"
    )
    worker.run(burst=True)
    assert results_by_cmd(r)[old.decode()]["status"] == "expired"
    assert dict(worker.backend.committed().pairs()) == {}


def test_late_host_applies_only_the_time_remaining(r, redis_server):
    worker = make_worker(redis_server)
    now_ms = redis_ms(r)
    entry = r.xadd(
        CMD, {"op": "drop.insert", "ip": "192.0.2.1", "ttl": "3600"}, id=f"{now_ms - 600_000}-0"
    )
    worker.run(burst=True)
    rule = worker.backend.committed().get(key("drop", "192.0.2.1"))
    assert rule is not None
    assert rule.expires_ms == int(entry.decode().split("-")[0]) + 3_600_000


def test_timed_rule_is_removed_on_time(r, redis_server, producer):
    worker = make_worker(redis_server)
    producer.drop("192.0.2.1", ttl_s=1)
    producer.drop("192.0.2.2")
    stop = threading.Event()
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while key("drop", "192.0.2.1") not in worker.backend.committed():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        rule = worker.backend.committed().get(key("drop", "192.0.2.1"))
        assert rule is not None and rule.expires_ms is not None
        while key("drop", "192.0.2.1") in worker.backend.committed():
            assert time.monotonic() < deadline
            time.sleep(0.005)
        lag_ms = redis_ms(r) - rule.expires_ms
        assert lag_ms < 1000, f"removed {lag_ms} ms after its expiry"
        assert set(worker.backend.committed()) == {key("drop", "192.0.2.2")}
    finally:
        stop.set()
        worker.request_stop()
        thread.join(timeout=10)


def test_failing_command_goes_to_dead_letters_and_blocks_nothing(r, redis_server, producer):
    worker = make_worker(redis_server, memory_fail="203.0.113.66", max_deliveries=3)
    before = producer.drop("192.0.2.1")
    poison = producer.drop("203.0.113.66", reason="keeps failing", request_id="p-1")
    after = producer.drop("192.0.2.2")
    worker.run(burst=True)

    assert set(worker.backend.committed()) == {key("drop", "192.0.2.1"), key("drop", "192.0.2.2")}
    results = results_by_cmd(r)
    assert results[before]["status"] == results[after]["status"] == "applied"
    assert results[poison]["status"] == "failed"
    assert "dead letter after 3 deliveries" in results[poison]["detail"]
    dead = r.xrange("{pushfw}:dead")
    assert len(dead) == 1
    fields = {k.decode(): v.decode() for k, v in dead[0][1].items()}
    assert fields["op"] == "drop.insert"
    assert fields["ip"] == "203.0.113.66"
    assert fields["reason"] == "keeps failing"
    assert fields["cmd"] == poison
    assert fields["deliveries"] == "3"
    assert fields["host"] == "h1"
    assert "injected failure" in fields["error"]
    assert pending(r) == 0
    assert [d.cmd for d in producer.dead()] == [poison]


def test_entries_left_by_a_dead_consumer_are_reclaimed(r, redis_server, producer):
    """A consumer that read and died leaves entries pending; XAUTOCLAIM takes them over."""
    r.xgroup_create(CMD, "host:h1", id="0", mkstream=True)
    orphan = producer.drop("192.0.2.7")
    r.xreadgroup("host:h1", "old-consumer", {CMD: ">"})
    assert pending(r) == 1
    time.sleep(0.25)
    worker = make_worker(redis_server, claim_idle_ms=200)
    worker.run(burst=True)
    assert set(worker.backend.committed()) == {key("drop", "192.0.2.7")}
    # reconcile at start already converged on the ledger, which folded the orphan too
    answer = results_by_cmd(r)[orphan]
    assert (answer["status"], answer["detail"]) == ("unchanged", "already present")
    assert pending(r) == 0


def test_in_stream_order_last_write_wins(r, redis_server, producer):
    worker = make_worker(redis_server)
    producer.drop("192.0.2.1")
    producer.undrop("192.0.2.1")
    producer.drop("192.0.2.1", ttl_s=600)
    producer.drop("192.0.2.2", ttl_s=600)
    producer.drop("192.0.2.2")
    worker.run(burst=True)
    rules = dict(worker.backend.committed().pairs())
    assert rules[key("drop", "192.0.2.1")].expires_ms is not None
    assert rules[key("drop", "192.0.2.2")].expires_ms is None


def test_retargeting_a_rule_removes_it_from_hosts_no_longer_named(r, redis_server, producer):
    """A rule has one state: the newest command's target decides which hosts hold it."""
    web = make_worker(redis_server, host="web1")
    db = make_worker(redis_server, host="db1")
    producer.drop("192.0.2.1")
    web.run(burst=True)
    db.run(burst=True)
    assert key("drop", "192.0.2.1") in web.backend.committed()
    assert key("drop", "192.0.2.1") in db.backend.committed()

    producer.drop("192.0.2.1", target=["db1"])
    web.run(burst=True)
    db.run(burst=True)
    assert dict(web.backend.committed().pairs()) == {}
    assert set(db.backend.committed()) == {key("drop", "192.0.2.1")}
    assert pending(r, "web1") == pending(r, "db1") == 0
