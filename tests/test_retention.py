"""Retention: the stream is trimmed to what live groups still need, old tombstones go.

Workers here run in-process (memory backend) against the session's redis-server and are
driven one ``iteration()`` at a time, so that the test, not the worker's own housekeeping
timer, decides when ``retention.trim`` runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from pushfw.producer import Keys, Producer
from pushfw.producer.connection import redis_ms
from pushfw.producer.lists import ListContent
from pushfw.producer.records import HostStatus, RuleRecord, rule_id
from pushfw.worker import Worker, WorkerSettings
from pushfw.worker.backends.memory import MemoryBackend
from pushfw.worker.ledger import Ledger
from pushfw.worker.retention import trim, trim_point
from tests.conftest import RedisServer, memory_worker, pushfw_cli

KEYS = Keys()
HOST_EXPIRY_S = 900


def stream_ids(client: redis.Redis) -> list[str]:
    rows: Any = client.xrange(KEYS.cmd)
    return [eid.decode() for eid, _ in rows]


def ledger_rules(client: redis.Redis) -> dict[str, RuleRecord]:
    raw: Any = client.hgetall(KEYS.rules)
    return {k.decode(): RuleRecord.model_validate_json(v) for k, v in raw.items()}


def heartbeat(client: redis.Redis, host: str, age_ms: int = 0) -> None:
    status = HostStatus(host=host, backend="memory", last_seen_ms=redis_ms(client) - age_ms)
    client.hset(KEYS.hosts, host, status.model_dump_json())


def read_unacked(client: redis.Redis, host: str, count: int) -> list[str]:
    """Another host's consumer reads ``count`` entries and (so far) acknowledges none."""
    group = Keys.host_group(host)
    client.xgroup_create(KEYS.cmd, group, id="0")
    reply: Any = client.xreadgroup(group, host, {KEYS.cmd: ">"}, count=count)
    return [eid.decode() for eid, _ in reply[0][1]]


def push_many(client: redis.Redis, count: int) -> list[str]:
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        pipe.xadd(KEYS.cmd, {"op": "drop.insert", "ip": f"10.0.{i // 250}.{i % 250}"})
    return [eid.decode() for eid in pipe.execute()]


def do_trim(client: redis.Redis) -> int:
    return trim(Ledger(client, KEYS, "trimmer"), redis_ms(client), HOST_EXPIRY_S)


@pytest.fixture
def make_worker(redis_server: RedisServer) -> Iterator[Callable[[str], Worker]]:
    """A set-up worker that has done its first pass (heartbeat, first trim) on the stream."""
    made: list[Worker] = []

    def make(host: str) -> Worker:
        worker = memory_worker(
            redis_server,
            host,
            trim_interval_s=3600,
            heartbeat_interval_s=3600,
            reconcile_interval_s=0,
        )
        made.append(worker)
        worker.setup()
        worker.iteration()
        return worker

    yield make
    for worker in made:
        worker.backend.close()
        worker.client.close()
        worker.scheduler.client.close()


def consume(worker: Worker) -> None:
    """Fold and apply everything in the stream (no housekeeping: its timers are not due)."""
    while worker.iteration():
        pass
    assert worker.reader.idle()


def test_trim_removes_what_every_live_group_has_done(r, producer: Producer, make_worker):
    worker = make_worker("h1")
    for i in range(60):
        producer.drop(f"192.0.2.{i}")
    consume(worker)
    assert r.xlen(KEYS.cmd) == 60

    assert do_trim(r) == 60
    assert r.xlen(KEYS.cmd) == 0
    assert do_trim(r) == 0
    assert len(ledger_rules(r)) == 60

    # the trimmed stream still works: a new command is folded and applied
    producer.drop("198.51.100.1")
    consume(worker)
    assert len(worker.backend.committed()) == 61
    assert len(ledger_rules(r)) == 61


def test_a_worker_trims_what_it_consumed_by_itself(r, redis_server, producer):
    for i in range(20):
        producer.drop(f"192.0.2.{i}")
    settings = WorkerSettings(redis_url=redis_server.url, host_name="h1", backend="memory")
    worker = Worker(settings, backend=MemoryBackend([]))
    worker.run(burst=True)
    assert r.xlen(KEYS.cmd) == 0
    assert len(ledger_rules(r)) == 20


def test_a_silent_host_does_not_hold_the_stream_back(r, producer, make_worker):
    worker = make_worker("h1")
    for i in range(40):
        producer.drop(f"192.0.2.{i}")
    consume(worker)
    ids = stream_ids(r)
    assert read_unacked(r, "gone", 10) == ids[:10]
    heartbeat(r, "gone", age_ms=(HOST_EXPIRY_S + 60) * 1000)

    now = redis_ms(r)
    # were it still within the host expiry, its oldest pending entry would be the limit
    assert trim_point(r, KEYS, now, host_expiry_s=HOST_EXPIRY_S + 3600) == ids[0]
    assert do_trim(r) == 40
    assert r.xlen(KEYS.cmd) == 0


def test_a_live_host_with_pending_entries_holds_the_trim_point(r, make_worker):
    worker = make_worker("h1")
    ids = push_many(r, 1000)
    consume(worker)
    read_unacked(r, "h2", 700)
    r.xack(KEYS.cmd, Keys.host_group("h2"), *ids[:600])
    heartbeat(r, "h2")
    # XTRIM MINID ~ removes whole stream nodes only: up to one node's worth may stay behind
    slack = int(r.config_get("stream-node-max-entries")["stream-node-max-entries"])

    assert trim_point(r, KEYS, redis_ms(r), HOST_EXPIRY_S) == ids[600]
    trimmed = do_trim(r)
    left = stream_ids(r)
    assert left[-400:] == ids[600:], "an entry h2 still needs was trimmed"
    assert len(left) == 1000 - trimmed < 400 + slack

    # once h2 acknowledges what it read, what it has not read yet still holds the stream
    r.xack(KEYS.cmd, Keys.host_group("h2"), *ids[600:700])
    trimmed += do_trim(r)
    left = stream_ids(r)
    assert left[-300:] == ids[700:]
    assert len(left) == 1000 - trimmed < 300 + slack


def test_old_tombstones_go_and_active_records_stay(r, producer, make_worker):
    worker = make_worker("h1")
    past = f"{redis_ms(r) - 5000}-0"
    r.xadd(KEYS.cmd, {"op": "ttl.drop.insert", "ip": "192.0.2.9", "ttl": "2"}, id=past)
    producer.drop("192.0.2.1", reason="permanent")
    producer.drop("192.0.2.2")
    producer.undrop("192.0.2.2")
    producer.drop("192.0.2.3", ttl_s=600)
    hold = producer.drop("192.0.2.4")
    late_delete = producer.undrop("192.0.2.4")
    consume(worker)

    # h2 read everything and acknowledged all but the entries from `hold` on
    read_unacked(r, "h2", 100)
    ids = stream_ids(r)
    r.xack(KEYS.cmd, Keys.host_group("h2"), *ids[: ids.index(hold)])
    heartbeat(r, "h2")

    expired, lifted, permanent, timed, later = (
        rule_id("drop", f"192.0.2.{n}/32") for n in (9, 2, 1, 3, 4)
    )
    before = ledger_rules(r)
    assert before[expired].deleted and before[lifted].deleted and before[later].deleted

    do_trim(r)
    assert stream_ids(r)[-2:] == [hold, late_delete]
    after = ledger_rules(r)
    assert set(after) == {permanent, timed, later}
    assert after[later].deleted and after[later].id == late_delete
    assert after[permanent] == before[permanent] and after[timed] == before[timed]

    r.xack(KEYS.cmd, Keys.host_group("h2"), hold, late_delete)
    do_trim(r)
    assert r.xlen(KEYS.cmd) == 0
    assert set(ledger_rules(r)) == {permanent, timed}
    assert r.zscore(KEYS.expiry, timed) is not None


def test_a_rule_banned_again_while_trim_runs_is_not_forgotten(r, redis_server):
    """A fold that replaces an old tombstone during the trim's scan must survive the trim."""
    count = 3000
    Ledger(r, KEYS, "first").ensure_group()

    def push(op: str) -> None:
        pipe = r.pipeline(transaction=False)
        for i in range(count):
            pipe.xadd(KEYS.cmd, {"op": op, "ip": f"10.0.{i // 250}.{i % 250}"})
        pipe.execute()

    push("drop.delete")
    while Ledger(r, KEYS, "first").fold_new():
        pass
    push("drop.insert")  # the same rules banned again, not yet folded

    other = redis.Redis.from_url(redis_server.url)
    folder = Ledger(other, KEYS, "second", batch_size=50)
    folding = threading.Event()

    def fold_all() -> None:
        while folder.fold_new():
            folding.set()

    thread = threading.Thread(target=fold_all)
    thread.start()
    try:
        assert folding.wait(10)
        do_trim(r)
    finally:
        thread.join()
        other.close()

    records = ledger_rules(r)
    lost = [
        rid
        for rid in (rule_id("drop", f"10.0.{i // 250}.{i % 250}/32") for i in range(count))
        if rid not in records or records[rid].deleted
    ]
    assert not lost, f"{len(lost)} re-banned rules vanished from the ledger, e.g. {lost[:3]}"


def commandstats(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the stats were reset (``INFO commandstats``)."""
    stats: Any = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}


def test_tombstones_are_forgotten_without_reading_the_whole_ledger(
    r, producer: Producer, make_worker
):
    """O(change): a trim reads the tombstones it forgets, not the 3,000 live rules beside them."""
    worker = make_worker("h1")
    pipe = r.pipeline(transaction=False)
    for i in range(3000):
        pipe.xadd(KEYS.cmd, {"op": "drop.insert", "ip": f"10.1.{i // 250}.{i % 250}"})
    pipe.execute()
    for i in range(20):
        producer.drop(f"192.0.2.{i}", reply=False)
        producer.undrop(f"192.0.2.{i}", reply=False)
    consume(worker)
    assert r.zcard(KEYS.tombs) == 20, "the fold indexes each tombstone it writes"
    do_trim(r)  # the first trim of a Redis marks the index complete (no older tombstones)
    producer.drop("192.0.2.99", reply=False)
    producer.undrop("192.0.2.99", reply=False)
    consume(worker)
    r.config_resetstat()
    do_trim(r)
    calls = commandstats(r)
    assert "hscan" not in calls, f"the trim scanned a hash: {calls}"
    tombstones = {k for k, rec in ledger_rules(r).items() if rec.deleted}
    assert tombstones == set(), "every tombstone behind the trim point is forgotten"
    assert len(ledger_rules(r)) == 3000
    assert r.zcard(KEYS.tombs) == 0


def test_a_ledger_from_before_the_tombstone_index_is_indexed_once(
    r, producer: Producer, make_worker
):
    worker = make_worker("h1")
    for i in range(10):
        producer.drop(f"192.0.2.{i}", reply=False)
        producer.undrop(f"192.0.2.{i}", reply=False)
    consume(worker)
    r.delete(KEYS.tombs, KEYS.tombs_indexed)  # as an older pushfw left it
    do_trim(r)
    assert not [k for k, rec in ledger_rules(r).items() if rec.deleted]
    assert r.get(KEYS.tombs_indexed) == b"1"


def test_one_trim_keeps_up_with_any_input_rate(r, make_worker):
    """An approximate XTRIM removes at most 10,000 entries per call unless told otherwise."""
    worker = make_worker("h1")
    push_many(r, 25_000)
    consume(worker)
    do_trim(r)
    assert r.xlen(KEYS.cmd) < 1000, "one trim removes everything every group is done with"


def test_a_host_silent_past_retire_after_is_retired(r, make_worker, caplog):
    make_worker("h1")
    for host, age_ms in (("gone", 3_600_000), ("away", 60_000)):
        r.xgroup_create(KEYS.cmd, Keys.host_group(host), id="$")
        heartbeat(r, host, age_ms=age_ms)
    trim(Ledger(r, KEYS, "trimmer"), redis_ms(r), HOST_EXPIRY_S, retire_after_s=1800)
    groups = {g["name"].decode() for g in r.xinfo_groups(KEYS.cmd)}
    assert groups == {"ledger", "host:h1", "host:away"}
    assert set(r.hkeys(KEYS.hosts)) == {b"h1", b"away"}
    assert "retired host gone, silent for 3600 s" in caplog.text
    trim(Ledger(r, KEYS, "trimmer"), redis_ms(r), HOST_EXPIRY_S, retire_after_s=0)
    assert {g["name"].decode() for g in r.xinfo_groups(KEYS.cmd)} == groups, "0: never"


def test_one_worker_of_the_fleet_trims_per_interval(r, redis_server: RedisServer):
    first = memory_worker(redis_server, "h1", trim_interval_s=3600)
    second = memory_worker(redis_server, "h2", trim_interval_s=3600)
    for worker in (first, second):
        worker.setup()
    r.config_resetstat()
    for worker in (first, second):
        worker.house.trim()
    assert commandstats(r).get("xinfo|groups", 0) == 1, "the second worker waits its turn"
    assert r.get(KEYS.trimming) == first.settings.consumer_name.encode()


def test_hosts_forget_retires_a_stopped_host_and_refuses_a_live_one(
    r, redis_server: RedisServer, producer: Producer
):
    worker = memory_worker(redis_server, "web9")
    worker.setup()
    live = pushfw_cli(redis_server, "hosts", "forget", "web9")
    assert live.returncode == 1
    assert live.stderr.strip().endswith(
        "host web9 is still reporting (state running): stop its worker first, or pass --force"
    )
    unknown = pushfw_cli(redis_server, "hosts", "forget", "nosuch")
    assert (unknown.returncode, "no host 'nosuch' is known" in unknown.stderr) == (2, True)
    worker.heartbeat("stopped")
    done = pushfw_cli(redis_server, "hosts", "forget", "web9")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "forgot host web9: its consumer group and heartbeat are removed\n"
    assert "host:web9" not in {g["name"].decode() for g in r.xinfo_groups(KEYS.cmd)}
    assert producer.hosts() == []

    producer.drop("192.0.2.5", reply=False)
    back = memory_worker(redis_server, "web9")
    back.run(burst=True)  # a new group at the stream's head: the rule comes from the ledger
    assert [str(k.network) for k in back.backend.committed()] == ["192.0.2.5/32"]


def test_removed_and_expired_lists_are_forgotten_once_trimmed_past(
    r, producer: Producer, make_worker
):
    worker = make_worker("h1")
    past = f"{redis_ms(r) - 5000}-0"  # a timed list that was over before it arrived
    r.xadd(KEYS.cmd, {"op": "list.load", "name": "brief", "version": "0" * 32, "ttl": "1"}, id=past)
    producer.load_list("kept", ListContent.of(["192.0.2.1"]), reply=False)
    producer.load_list("removed", ListContent.of(["192.0.2.2"]), reply=False)
    producer.delete_list("removed", reply=False)
    consume(worker)
    assert set(r.hkeys(KEYS.lists)) == {b"kept", b"removed", b"brief"}
    do_trim(r)
    assert set(r.hkeys(KEYS.lists)) == {b"kept"}
    assert [rec.name for rec in producer.lists()] == ["kept"]
