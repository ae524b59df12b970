"""The ledger fold and the TTL scheduler, against a real redis-server (no worker, no kernel).

The fold is a compare-and-set on the entry id; the scheduler claims due expiries in Lua.
Expiry lags are measured on Redis's own clock: the delete entry's id time minus the rule's
expiry (the insert entry's id time plus its ttl).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from ipaddress import ip_network
from typing import Any

import pytest
import redis

from pushfw.producer import Keys, Producer
from pushfw.producer.connection import redis_ms
from pushfw.producer.records import RuleRecord, rule_id
from pushfw.worker.ledger import Ledger
from pushfw.worker.scheduler import Scheduler, enable_expiry_events
from pushfw.worker.stream import Entry, entries_from_reply
from tests.conftest import RedisServer, wait_for

KEYS = Keys()
LAG_BOUND_MS = 1000


def ms_of(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def entry(client: redis.Redis, entry_id: str) -> Entry:
    rows: Any = client.xrange(KEYS.cmd, min=entry_id, max=entry_id)
    (found,) = entries_from_reply(rows)
    return found


def record(client: redis.Redis, rid: str) -> RuleRecord | None:
    raw: Any = client.hget(KEYS.rules, rid)
    return None if raw is None else RuleRecord.model_validate_json(raw)


def ttl_deletes(client: redis.Redis) -> list[tuple[str, dict[str, str]]]:
    """Every ``*.delete`` entry the scheduler emitted (``origin ttl``), in stream order."""
    rows: Any = client.xrange(KEYS.cmd)
    out = []
    for eid, raw in rows:
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        if fields.get("origin") == "ttl":
            out.append((eid.decode(), fields))
    return out


def expiry_state(client: redis.Redis) -> tuple[Any, Any]:
    return client.hgetall(KEYS.rules), client.zrange(KEYS.expiry, 0, -1, withscores=True)


def lag_summary(lags: list[int]) -> str:
    ordered = sorted(lags)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"n={len(ordered)} p50={statistics.median(ordered):.0f} ms "
        f"p99={p99} ms max={ordered[-1]} ms"
    )


@pytest.fixture
def ledger(r: redis.Redis) -> Ledger:
    folder = Ledger(r, KEYS, consumer="test")
    folder.ensure_group()
    return folder


@pytest.fixture
def keyspace_events(r: redis.Redis) -> Iterator[redis.Redis]:
    """Lets a test change ``notify-keyspace-events``; the original value is put back."""
    original = r.config_get("notify-keyspace-events")["notify-keyspace-events"] or ""
    yield r
    r.config_set("notify-keyspace-events", original)


@pytest.fixture
def start_scheduler(redis_server: RedisServer) -> Iterator[Callable[[], Scheduler]]:
    """Schedulers in their own threads, each with a Redis client of its own."""
    started: list[Scheduler] = []

    def start() -> Scheduler:
        scheduler = Scheduler(redis.Redis.from_url(redis_server.url), KEYS)
        started.append(scheduler)
        scheduler.start()
        return scheduler

    yield start
    for scheduler in started:
        scheduler.close()
        scheduler.client.close()


# --- the fold: a compare-and-set on the entry id ---------------------------------------


def test_newer_command_wins_when_folded_first(r, producer: Producer, ledger: Ledger):
    old = producer.drop("192.0.2.1", ttl_s=600, reason="old")
    new = producer.drop("192.0.2.1", reason="new")
    rid = rule_id("drop", "192.0.2.1/32")

    assert ledger.fold([entry(r, new)]) == 1
    assert ledger.fold([entry(r, old)]) == 0

    rec = record(r, rid)
    assert rec is not None
    assert (rec.id, rec.reason, rec.expires_ms, rec.deleted) == (new, "new", None, False)
    # the older timed insert neither queued an expiry nor set a marker
    assert r.zscore(KEYS.expiry, rid) is None
    assert not r.exists(KEYS.ttl_marker(rid))


def test_newer_timed_command_keeps_its_expiry_against_an_older_fold(r, producer, ledger):
    old = producer.drop("192.0.2.2", reason="permanent")
    new = producer.drop("192.0.2.2", ttl_s=600, reason="timed")
    rid = rule_id("drop", "192.0.2.2/32")

    ledger.fold([entry(r, new)])
    assert ledger.fold([entry(r, old)]) == 0

    rec = record(r, rid)
    assert rec is not None and rec.id == new and rec.expires_ms == ms_of(new) + 600_000
    assert r.zscore(KEYS.expiry, rid) == ms_of(new) + 600_000
    assert r.exists(KEYS.ttl_marker(rid))


def test_folding_the_same_entry_twice_changes_nothing(r, producer, ledger):
    timed = producer.drop("192.0.2.3", ttl_s=600, reason="x")
    plain = producer.accept("2001:db8::/32")
    entries = [entry(r, timed), entry(r, plain)]

    assert ledger.fold(entries) == 2
    before = expiry_state(r)
    assert ledger.fold(entries) == 0
    assert ledger.fold(entries + entries) == 0
    assert expiry_state(r) == before


def test_delete_leaves_a_tombstone_an_older_insert_cannot_undo(r, producer, ledger):
    insert = producer.drop("192.0.2.4", ttl_s=600)
    delete = producer.undrop("192.0.2.4")
    rid = rule_id("drop", "192.0.2.4/32")

    assert ledger.fold([entry(r, delete)]) == 1
    assert ledger.fold([entry(r, insert)]) == 0

    rec = record(r, rid)
    assert rec is not None
    assert rec.deleted and rec.id == delete and rec.expires_ms is None
    assert r.zscore(KEYS.expiry, rid) is None
    assert not r.exists(KEYS.ttl_marker(rid))
    assert producer.rules() == []


def test_delete_in_order_dequeues_the_expiry(r, producer, ledger):
    insert = producer.drop("192.0.2.5", ttl_s=600)
    delete = producer.undrop("192.0.2.5")
    rid = rule_id("drop", "192.0.2.5/32")

    ledger.fold([entry(r, insert)])
    assert r.zscore(KEYS.expiry, rid) is not None
    assert ledger.fold([entry(r, delete)]) == 1

    rec = record(r, rid)
    assert rec is not None and rec.deleted and rec.id == delete
    assert r.zcard(KEYS.expiry) == 0
    assert not r.exists(KEYS.ttl_marker(rid))


def test_insert_already_expired_at_fold_time_is_a_tombstone(r, ledger):
    past = f"{redis_ms(r) - 5000}-0"
    r.xadd(KEYS.cmd, {"op": "ttl.drop.insert", "ip": "192.0.2.6", "ttl": "2"}, id=past)
    rid = rule_id("drop", "192.0.2.6/32")

    assert ledger.fold([entry(r, past)]) == 1

    rec = record(r, rid)
    assert rec is not None
    assert rec.deleted and rec.id == past and rec.expires_ms is None
    assert r.zcard(KEYS.expiry) == 0
    assert not r.exists(KEYS.ttl_marker(rid))


def test_timed_insert_queues_its_expiry_and_sets_the_marker(r, producer, ledger):
    eid = producer.drop("192.0.2.7", ttl_s=600)
    rid = rule_id("drop", "192.0.2.7/32")
    expires_ms = ms_of(eid) + 600_000

    ledger.fold([entry(r, eid)])

    rec = record(r, rid)
    assert rec is not None and not rec.deleted and rec.expires_ms == expires_ms
    assert r.zscore(KEYS.expiry, rid) == expires_ms
    marker = KEYS.ttl_marker(rid)
    assert r.get(marker) == eid.encode()
    remaining = expires_ms - redis_ms(r)
    pttl = int(r.pttl(marker))
    assert 0 < pttl <= remaining + 5
    assert remaining - pttl < 1000


# --- the scheduler ----------------------------------------------------------------------


def push_timed(producer: Producer, count: int, prefix: str) -> dict[str, tuple[str, int]]:
    """``count`` bans with ttl 1 or 2 s; rule id -> (insert entry id, expiry ms)."""
    pipe = producer.client.pipeline(transaction=False)
    networks = [f"{prefix}.{i // 250}.{i % 250}" for i in range(count)]
    ttls = [1 + i % 2 for i in range(count)]
    for net, ttl in zip(networks, ttls, strict=True):
        pipe.xadd(KEYS.cmd, {"op": "drop.insert", "ip": net, "ttl": str(ttl)})
    ids = pipe.execute()
    return {
        rule_id("drop", f"{net}/32"): (eid, ms_of(eid) + ttl * 1000)
        for net, ttl, eid in zip(networks, ttls, ids, strict=True)
    }


def emission_lags(r: redis.Redis, rules: dict[str, tuple[str, int]]) -> list[int]:
    """Check one ttl delete per rule and a tombstone for each; return the lags in ms."""
    deletes = ttl_deletes(r)
    by_rule: dict[str, list[str]] = {}
    for eid, fields in deletes:
        assert fields["op"] == "drop.delete"
        by_rule.setdefault(rule_id("drop", str(ip_network(fields["ip"]))), []).append(eid)
    assert set(by_rule) == set(rules)
    duplicated = {rid: ids for rid, ids in by_rule.items() if len(ids) != 1}
    assert not duplicated, f"expiries emitted more than once: {duplicated}"
    assert r.zcard(KEYS.expiry) == 0
    lags = []
    for rid, (_, expires_ms) in rules.items():
        rec = record(r, rid)
        assert rec is not None and rec.deleted and rec.origin == "ttl"
        assert rec.id == by_rule[rid][0]
        lags.append(ms_of(by_rule[rid][0]) - expires_ms)
    assert min(lags) >= 0, "a rule was removed before its expiry"
    assert max(lags) < LAG_BOUND_MS, lag_summary(lags)
    return lags


@pytest.mark.alone
def test_two_racing_schedulers_emit_each_expiry_once(
    r, producer, ledger, keyspace_events, start_scheduler
):
    enable_expiry_events(r)
    first, second = start_scheduler(), start_scheduler()
    rules = push_timed(producer, 300, "10.1")
    assert ledger.fold_new() == 300
    assert r.zcard(KEYS.expiry) == 300
    latest = max(exp for _, exp in rules.values())

    wait_for(
        lambda: r.zcard(KEYS.expiry) == 0 and redis_ms(r) > latest + 300,
        timeout=15,
        what="every expiry to be claimed",
    )
    first.close()
    second.close()

    lags = emission_lags(r, rules)
    assert first.emitted + second.emitted == 300
    print(
        f"\ntwo schedulers, events on: {lag_summary(lags)} "
        f"(emitted {first.emitted} + {second.emitted})"
    )
    # the ledger folding the scheduler's own deletes changes nothing
    before = expiry_state(r)
    assert ledger.fold_new() == 300
    assert expiry_state(r) == before


@pytest.mark.alone
def test_scheduler_meets_the_bound_on_its_timer_alone(
    r, producer, ledger, keyspace_events, start_scheduler
):
    r.config_set("notify-keyspace-events", "")
    scheduler = start_scheduler()
    rules = push_timed(producer, 200, "10.2")
    assert ledger.fold_new() == 200
    latest = max(exp for _, exp in rules.values())

    wait_for(
        lambda: r.zcard(KEYS.expiry) == 0 and redis_ms(r) > latest + 300,
        timeout=15,
        what="every expiry to be claimed",
    )
    scheduler.close()

    lags = emission_lags(r, rules)
    assert scheduler.emitted == 200
    print(f"\none scheduler, events off: {lag_summary(lags)}")


@pytest.mark.alone
def test_extended_ban_is_not_cut_short(r, producer, ledger, start_scheduler):
    scheduler = start_scheduler()
    rid = rule_id("drop", "192.0.2.8/32")
    first = producer.drop("192.0.2.8", ttl_s=1)
    ledger.fold_new()
    second = producer.drop("192.0.2.8", ttl_s=2, reason="again")
    ledger.fold_new()
    first_expiry, second_expiry = ms_of(first) + 1000, ms_of(second) + 2000
    assert redis_ms(r) < first_expiry, "the test was too slow to extend before the first expiry"

    wait_for(lambda: redis_ms(r) > first_expiry + 500, what="the first expiry to pass")
    assert ttl_deletes(r) == []
    rec = record(r, rid)
    assert rec is not None and not rec.deleted and rec.expires_ms == second_expiry
    assert r.zscore(KEYS.expiry, rid) == second_expiry
    assert any(rec.network == "192.0.2.8/32" for rec in producer.rules())

    wait_for(lambda: ttl_deletes(r), timeout=5, what="the extended ban to expire")
    scheduler.close()
    ((eid, fields),) = ttl_deletes(r)
    assert (fields["op"], fields["ip"]) == ("drop.delete", "192.0.2.8/32")
    assert 0 <= ms_of(eid) - second_expiry < LAG_BOUND_MS


def test_delete_before_expiry_leaves_no_stray_ttl_delete(r, producer, ledger, start_scheduler):
    scheduler = start_scheduler()
    rid = rule_id("drop", "192.0.2.9/32")
    insert = producer.drop("192.0.2.9", ttl_s=1)
    ledger.fold_new()
    delete = producer.undrop("192.0.2.9")
    ledger.fold_new()

    wait_for(lambda: redis_ms(r) > ms_of(insert) + 1000 + 700, what="the original expiry to pass")
    scheduler.close()

    assert ttl_deletes(r) == []
    assert scheduler.emitted == 0
    rec = record(r, rid)
    assert rec is not None and rec.deleted and rec.id == delete and rec.origin == ""
    assert r.zcard(KEYS.expiry) == 0
    assert not r.exists(KEYS.ttl_marker(rid))
