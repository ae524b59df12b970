"""Hit counters: real packets over a veth pair, counted by the kernel, shown by the CLI.

``pushfw list --hits`` reads what the workers publish.

Each kernel backend counts per rule (nft set-element counters, ipset ``counters``, iptables
entry counters); the worker reads them every :data:`~pushfw.worker.hits.EVERY_BEATS`
heartbeats and publishes them to ``{pushfw}:hits:<host>``. The tests beat every 0.25 s, so
a reading comes every 3 s, through the worker's one documented setting, no test-only knob.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from pushfw.producer import Action, Keys, Producer
from pushfw.producer.lists import ListContent
from pushfw.producer.records import TOP_LIST_ENTRIES, ListHits, RuleHits
from pushfw.worker.backends.base import (
    ListCounters,
    Rule,
    RuleKey,
    list_counters_of,
    rule_counters_of,
)
from pushfw.worker.backends.memory import MemoryBackend
from pushfw.worker.hits import (
    EVERY_BEATS,
    HitsReader,
    busiest,
    list_record,
    publish_hits,
    totals,
)
from pushfw.worker.metrics import Metrics
from testbed.env import clean_env
from testbed.kernel import Firewall, veth
from tests.conftest import Netns, RedisServer, memory_worker, wait_for

SERVER_IP = "10.214.0.1"
CLIENT_IP = "10.214.0.2"
QUIET_IP = "192.0.2.77"
BEAT_S = 0.25
PUSHFW = (sys.executable, "-m", "pushfw.producer")
SENT = 20
SEND = f"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range({SENT}):
    s.sendto(b"x" * 100, ("{SERVER_IP}", 9))
    time.sleep(0.02)
"""


def key(action: str, net: str) -> RuleKey:
    return RuleKey(Action(action), ipaddress.ip_network(net))


def list_hits(server: RedisServer, *args: str) -> subprocess.CompletedProcess[str]:
    """``pushfw list --hits ARGS`` as an operator runs it."""
    return subprocess.run(
        [*PUSHFW, "--redis-url", server.url, "list", "--hits", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
        check=True,
    )


def hit_rows(server: RedisServer, *args: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(list_hits(server, "--json", *args).stdout)
    return rows


def test_list_hits_shows_the_packets_a_ban_dropped(
    make_netns: Callable[[], Netns],
    backend: str,
    spawn_worker,
    producer: Producer,
    redis_server: RedisServer,
):
    server, client = make_netns(), make_netns()
    veth(server, SERVER_IP, client, CLIENT_IP)
    spawn_worker(server, backend=backend, heartbeat_interval_s=str(BEAT_S)).start()
    for ip in (CLIENT_IP, QUIET_IP):
        assert [r.status.value for r in producer.wait(producer.drop(ip), timeout_s=15)] == [
            "applied"
        ]

    client.run(sys.executable, "-c", SEND)

    def counted() -> dict[str, Any] | None:
        rows = hit_rows(redis_server)
        mine = [r for r in rows if r["network"] == f"{CLIENT_IP}/32" and r["host"] == server.name]
        return mine[0] if mine and mine[0]["packets"] == SENT else None

    wait_for(counted, timeout=EVERY_BEATS * BEAT_S * 10, what="the dropped packets to be counted")
    row = counted()
    assert row is not None and row["action"] == "drop"
    assert row["bytes"] == SENT * 128, "100 bytes of payload, UDP and IPv4 headers"
    quiet = [r for r in hit_rows(redis_server) if r["network"] == f"{QUIET_IP}/32"]
    assert all(r["packets"] == 0 for r in quiet), quiet
    assert [r["network"] for r in hit_rows(redis_server, "--top", "1")] == [f"{CLIENT_IP}/32"]

    table = list_hits(redis_server, "--host", server.name)
    assert f"{CLIENT_IP}/32" in table.stdout.splitlines()[1], table.stdout
    assert "with hit counts on 1 host" in table.stderr


EVERY_RULE = """
import ipaddress, json, sys, time
from pushfw.producer.contract import Action
from pushfw.worker.backends import make_backend
from pushfw.worker.backends.base import ListCounters, Rule, RuleKey, list_counters_of

backend = make_backend(sys.argv[1])
backend.open()
later = int(time.time() * 1000) + 600_000
for action, net, exp in [
    ("drop", "192.0.2.1", None), ("drop", "192.0.2.0/24", later),
    ("accept", "2001:db8::1", later), ("drop", "2001:db8::/32", None),
]:
    backend.add(Rule(RuleKey(Action(action), ipaddress.ip_network(net)), exp))
backend.commit()
print(json.dumps(sorted([str(k), *v] for k, v in backend.hits().items())))
"""


def test_every_rule_has_a_count_read_in_one_dump(netns: Netns, backend: str):
    proc = netns.run(sys.executable, "-c", EVERY_RULE, backend)
    assert json.loads(proc.stdout) == [
        ["accept 2001:db8::1/128", 0, 0],
        ["drop 192.0.2.0/24", 0, 0],
        ["drop 192.0.2.1/32", 0, 0],
        ["drop 2001:db8::/32", 0, 0],
    ]


def _old_sets(ns: Netns, backend: str) -> None:
    """pushfw's drop4 set as workers made it before counters, holding one ban."""
    if backend == "ipset":
        options = ("family", "inet", "timeout", "0", "comment", "maxelem", "1000000")
        ns.run("ipset", "create", "pushfw-drop4", "hash:net", *options)
        ns.run("ipset", "add", "pushfw-drop4", "192.0.2.7", "timeout", "0")
        return
    ruleset = """
table inet pushfw {
    set drop4 { type ipv4_addr; flags timeout; size 1000000; elements = { 192.0.2.7 } }
    chain input { type filter hook input priority -10; policy accept; ip saddr @drop4 drop; }
}
"""
    subprocess.run(
        ["ip", "netns", "exec", ns.name, "nft", "-f", "-"], input=ruleset, text=True, check=True
    )


def test_sets_made_before_counters_gain_them_and_keep_their_bans(
    netns: Netns, set_backend: str, spawn_worker, producer: Producer
):
    _old_sets(netns, set_backend)
    producer.drop("192.0.2.7", reply=False)  # the ledger holds the ban too
    worker = spawn_worker(netns, backend=set_backend).start()
    assert Firewall(netns, set_backend).rules() == {("drop", "192.0.2.7/32"): None}
    if set_backend == "ipset":
        header = netns.run("ipset", "list", "-t", "pushfw-drop4").stdout
        assert " counters " in header, header
        assert "maxelem 1000000" in header
    else:
        listing = json.loads(
            netns.run("nft", "-j", "list", "set", "inet", "pushfw", "drop4").stdout
        )
        [found] = [item["set"] for item in listing["nftables"] if "set" in item]
        assert [s for s in found["stmt"] if "counter" in s], found
        assert "counter" in found["elem"][0]["elem"], found["elem"]
    worker.stop()
    assert "counters" in worker.log


def test_the_busiest_rules_come_first_and_totals_are_per_action():
    hits = {
        key("drop", "192.0.2.1"): (5, 500),
        key("drop", "2001:db8::1"): (5, 700),
        key("drop", "192.0.2.0/24"): (0, 0),
        key("accept", "198.51.100.1"): (9, 900),
        key("watch", "203.0.113.0/24"): (2, 80),
    }
    assert [str(k) for k, _ in busiest(hits, 3)] == [
        "accept 198.51.100.1/32",
        "drop 2001:db8::1/128",
        "drop 192.0.2.1/32",
    ]
    assert totals(hits) == {
        Action.DROP: (10, 1200),
        Action.ACCEPT: (9, 900),
        Action.WATCH: (2, 80),
    }
    assert totals({}) == {Action.DROP: (0, 0), Action.ACCEPT: (0, 0), Action.WATCH: (0, 0)}
    assert rule_counters_of(MemoryBackend()) is None, "no kernel, no counts"


class CountingBackend(MemoryBackend):
    """The memory backend with counts set by the test (the kernel's part of the story)."""

    def __init__(self, counts: dict[RuleKey, tuple[int, int]]) -> None:
        super().__init__()
        self.counts = counts

    def hits(self) -> dict[RuleKey, tuple[int, int]]:
        return dict(self.counts)


def test_publishing_replaces_the_hosts_hash_and_list_sorts_across_hosts(
    r: redis.Redis, redis_server: RedisServer, producer: Producer
):
    keys = Keys()
    metrics = Metrics()
    for host in ("web1", "db1"):
        r.hset(keys.hosts, host, json.dumps({"host": host, "last_seen_ms": 1}))
    web = CountingBackend({key("drop", "192.0.2.1"): (3, 300), key("drop", "192.0.2.2"): (1, 60)})
    db = CountingBackend({key("drop", "192.0.2.1"): (7, 420)})
    assert publish_hits(r, keys, "web1", web, 1_000, metrics) == 2
    assert publish_hits(r, keys, "db1", db, 2_000) == 1
    assert metrics.rule_hits_packets.labels("drop")._value.get() == 4

    rows = hit_rows(redis_server)
    assert [(row["host"], row["network"], row["packets"]) for row in rows] == [
        ("db1", "192.0.2.1/32", 7),
        ("web1", "192.0.2.1/32", 3),
        ("web1", "192.0.2.2/32", 1),
    ]
    assert rows[0] == {
        "host": "db1",
        "action": "drop",
        "network": "192.0.2.1/32",
        "list": None,  # a rule, not a list's entry
        "packets": 7,
        "bytes": 420,
        "read_at": "1970-01-01T00:00:02.000Z",
        "read_ms": 2_000,
    }
    assert len(hit_rows(redis_server, "--top", "2")) == 2
    assert [row["host"] for row in hit_rows(redis_server, "--host", "web1")] == ["web1", "web1"]

    web.counts = {}  # its rules were removed: the next reading leaves nothing behind
    assert publish_hits(r, keys, "web1", web, 3_000) == 0
    assert producer.hits(["web1", "db1"]) == {
        "web1": {},
        "db1": {"drop 192.0.2.1/32": RuleHits(packets=7, bytes=420, ms=2_000)},
    }


def test_a_reading_waits_for_a_gap_between_expiries(r: redis.Redis):
    backend = CountingBackend({})
    reader = HitsReader(r, Keys(), "h1", backend, interval_s=0.2, counters=backend)
    reader.read_s = 1.0  # the last reading took a second: it needs 2.5 s clear
    assert reader.interval_s == 100.0, "a reading takes at most 1% of the worker's time"
    assert reader.clear(None), "no timed rule"
    assert reader.clear(2_500)
    assert not reader.clear(2_000), "an expiry would fall due during the reading"
    time.sleep(0.25)
    assert reader.clear(2_000), "waited one more interval: reads anyway"
    started = time.monotonic()
    assert reader.publish(1_000) == 0
    took_s = time.monotonic() - started
    assert 0 < reader.read_s <= took_s, "the reading's own duration replaces the last one"
    assert not reader.clear(0), "a new wait starts after each reading"


def test_past_hits_max_rules_the_counters_are_not_read_and_the_hash_goes(r: redis.Redis):
    """A reading lists every element: past the bound the host stops, and says so once."""
    keys = Keys()
    counts = {key("drop", f"192.0.2.{i}"): (i, 60 * i) for i in range(1, 4)}
    backend = CountingBackend(counts)
    backend.add(Rule(key("drop", "192.0.2.1")))
    backend.commit()
    reader = HitsReader(r, keys, "big", backend, interval_s=0.2, max_rules=1, counters=backend)
    assert reader.publish(1_000) == 3
    assert r.hlen(keys.hits("big")) == 3
    for ip in ("192.0.2.2", "192.0.2.3"):
        backend.add(Rule(key("drop", ip)))
    backend.commit()
    read: list[int] = []

    def hits() -> dict[RuleKey, tuple[int, int]]:
        read.append(1)
        return dict(counts)

    backend.hits = hits  # type: ignore[method-assign]
    assert reader.publish(2_000) is None and reader.publish(3_000) is None
    assert read == [], "the counters were read past the bound"
    assert not r.exists(keys.hits("big")), "an old reading was left to age"
    backend.delete(key("drop", "192.0.2.3"))
    backend.delete(key("drop", "192.0.2.2"))
    backend.commit()
    assert reader.publish(4_000) == 3 and read == [1], "back under the bound: read again"


class CountedLists:
    """List counters as a set backend reports them (:class:`ListCounters`), without a kernel."""

    def __init__(self, lists: dict[str, dict[str, tuple[int, int]]], entries: int) -> None:
        self.lists, self.entries, self.reads = lists, entries, 0

    def held_entries(self) -> int:
        return self.entries

    def list_hits(self) -> dict[str, dict[str, tuple[int, int]]]:
        self.reads += 1
        return self.lists


def test_list_counters_are_published_beside_the_rules_and_bounded_apart(
    r: redis.Redis, producer: Producer
):
    keys = Keys()
    backend = CountingBackend({key("drop", "192.0.2.1"): (5, 300)})
    backend.add(Rule(key("drop", "192.0.2.1")))
    backend.commit()
    lists = CountedLists({"level1": {"10.213.0.0/24": (11, 596)}, "quiet": {}}, entries=2)
    assert isinstance(lists, ListCounters)
    assert list_counters_of(MemoryBackend()) is None, "no kernel, no list counters"
    metrics = Metrics()
    reader = HitsReader(
        r, keys, "h1", backend, 0.2, metrics, max_rules=2, lists=lists, counters=backend
    )
    assert reader.publish(1_000) == 1
    assert producer.list_hits(["h1"]) == {
        "h1": {
            "level1": ListHits(
                packets=11, bytes=596, ms=1_000, entries=[("10.213.0.0/24", 11, 596)]
            ),
            "quiet": ListHits(packets=0, bytes=0, ms=1_000),
        }
    }
    assert metrics.list_hits_packets.labels("level1")._value.get() == 11

    lists.entries = 3  # past the bound: the lists' counters go, the rules' stay
    assert reader.publish(2_000) == 1 and lists.reads == 1
    assert not r.exists(keys.list_hits("h1")) and r.hlen(keys.hits("h1")) == 1
    lists.entries = 2
    assert reader.publish(3_000) == 1 and lists.reads == 2
    assert r.hlen(keys.list_hits("h1")) == 2

    r.hset(keys.list_hits("h1"), "forged", '{"packets": -1, "bytes": 0, "ms": 0}')
    assert set(producer.list_hits(["h1"])["h1"]) == {"level1", "quiet"}, "input, not truth"
    rules = set(producer.hits(["h1"])["h1"])
    r.hset(keys.hits("h1"), "drop 192.0.2.9/32", "not a count")
    assert set(producer.hits(["h1"])["h1"]) == rules, "a rule's count is input too"


def test_top_or_list_without_hits_is_a_usage_error(redis_server: RedisServer, tmp_path: Path):
    for option, value in (("--top", "3"), ("--list", "level1")):
        proc = subprocess.run(
            [*PUSHFW, "--redis-url", redis_server.url, "list", option, value],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=30,
        )
        assert proc.returncode == 2 and f"{option} goes with --hits" in proc.stderr, proc.stderr


def test_ipset_save_with_counters_is_parsed():
    from pushfw.worker.backends.ipset_cmd import Element, parse_save

    text = """create pushfw-drop4 hash:net family inet maxelem 4 timeout 0 counters comment
add pushfw-drop4 192.0.2.1 timeout 599 packets 12 bytes 1008 comment "exp=1795783706829"
add pushfw-drop4 192.0.2.0/24 timeout 0 packets 0 bytes 0
add pushfw-drop4 198.51.100.0/24 timeout 0
"""
    net = ipaddress.ip_network
    assert list(parse_save(text, "pushfw-drop4", 4)) == [
        Element(net("192.0.2.1/32"), 599, 1795783706829, (12, 1008)),
        Element(net("192.0.2.0/24"), 0, None, (0, 0)),
        Element(net("198.51.100.0/24"), 0, None, None),
    ]


def test_a_list_record_sums_every_entry_and_keeps_only_the_busiest():
    entries = {f"10.0.{i // 256}.{i % 256}/32": (i, i * 60) for i in range(1, 1001)}
    record = list_record(entries, 5)
    assert (record.packets, record.bytes, record.ms) == (500_500, 500_500 * 60, 5)
    assert len(record.entries) == TOP_LIST_ENTRIES, "a large list costs Redis its top only"
    assert record.entries[0] == ("10.0.3.232/32", 1000, 60_000)
    assert [e[1] for e in record.entries] == list(range(1000, 1000 - TOP_LIST_ENTRIES, -1))


def test_a_lists_counts_from_before_its_newest_command_are_not_shown_for_it(
    r: redis.Redis, redis_server: RedisServer, producer: Producer
):
    """A watch list re-imported as a drop: the counts a host read while it watched are not
    the drop's. Until the host reads again, ``lists`` shows no HITS for it and ``list --hits``
    no entry, rather than a drop that seems to have matched what it never dropped."""
    worker = memory_worker(redis_server, "h1")
    worker.setup()
    content = ListContent.of(["198.18.0.2/31"])
    producer.load_list("level1", content, action="watch")
    worker.run(burst=True)
    watched = ListHits(
        packets=15, bytes=820, ms=producer.now_ms(), entries=[("198.18.0.2/31", 15, 820)]
    )
    r.hset(Keys().list_hits("h1"), "level1", watched.model_dump_json())

    def shown() -> tuple[object, list[dict[str, Any]]]:
        lists = subprocess.run(
            [*PUSHFW, "--redis-url", redis_server.url, "lists", "--json"],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=30,
            check=True,
        )
        [row] = json.loads(lists.stdout)
        return row["hits"], hit_rows(redis_server, "--list", "level1")

    hits, entries = shown()
    assert hits == 15 and [(e["action"], e["packets"]) for e in entries] == [("watch", 15)]

    wait_for(lambda: producer.now_ms() > watched.ms, 5, "Redis's clock to pass the reading")
    producer.load_list("level1", content, action="drop")
    worker.run(burst=True)
    assert shown() == (None, []), "the watch's counts are shown as the drop's"

    r.hset(
        Keys().list_hits("h1"),
        "level1",
        ListHits(
            packets=5, bytes=300, ms=producer.now_ms(), entries=[("198.18.0.2/31", 5, 300)]
        ).model_dump_json(),
    )
    hits, entries = shown()
    assert hits == 5 and [(e["action"], e["packets"]) for e in entries] == [("drop", 5)]
