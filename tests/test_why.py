"""``pushfw why ADDRESS`` as an operator runs it, against real in-process workers.

Two workers (memory backend) fold and apply a mix of rules and a list against the session's
redis-server; the CLI then says what covers an address and what each host did with it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import redis

from pushfw.producer import Keys, Producer
from pushfw.producer.connection import text
from pushfw.producer.lists import ListContent
from pushfw.producer.records import HostStatus
from tests.conftest import RedisServer, Run, memory_worker

KEYS = Keys()


def _fleet(r: redis.Redis, redis_server: RedisServer, producer: Producer) -> dict[str, str]:
    """web1 (label web) and db1, which protects 203.0.113.0/28, after one burst."""
    web = memory_worker(redis_server, "web1", host_labels="web")
    db = memory_worker(redis_server, "db1", protect="203.0.113.0/28")
    for worker in (web, db):
        worker.setup()
    ids = {
        "drop": text(
            r.xadd(
                KEYS.cmd,
                {
                    "op": "drop.insert",
                    "ip": "203.0.113.0/24",
                    "reason": "ssh-bf",
                    "origin": "crowdsec",
                },
            )
        ),
        "accept": producer.accept("203.0.113.9", target=["web"], reason="monitoring"),
        "other": producer.drop("198.51.100.1", reason="not this one"),
        "list": producer.load_list(
            "feed", ListContent.of(["203.0.113.0/25", "192.0.2.1"]), reason="firehol"
        ),
    }
    for worker in (web, db):
        worker.run(burst=True)
    return ids


def test_why_names_every_cover_the_winner_and_each_hosts_part(
    r: Any, redis_server: RedisServer, producer: Producer, pushfw: Run
):
    ids = _fleet(r, redis_server, producer)

    shown = pushfw("why", "203.0.113.9")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == ("203.0.113.9: 3 covers; accept wins over drop: rule accept 203.0.113.9/32")
    assert lines[1].split() == [
        "KIND",
        "NAME",
        "NETWORK",
        "ACTION",
        "REASON",
        "ORIGIN",
        "EXPIRES_IN",
        "TARGET",
        "SET_AT_UTC",
    ]
    covers = [line.split()[:8] for line in lines[2:5]]
    set_at = datetime.fromtimestamp(int(ids["accept"].split("-")[0]) / 1000, UTC)
    assert lines[2].split()[8:] == set_at.strftime("%Y-%m-%d %H:%M:%S").split()
    assert covers == [
        ["rule", "-", "203.0.113.9/32", "accept", "monitoring", "producer", "never", "web"],
        ["list", "feed", "203.0.113.0/25", "drop", "firehol", "list", "never", "*"],
        ["rule", "-", "203.0.113.0/24", "drop", "ssh-bf", "crowdsec", "never", "*"],
    ]
    assert "198.51.100.1" not in shown.stdout, "a rule that does not cover it is not named"

    as_json = pushfw("why", "203.0.113.9", "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["wins"]["name"] == "accept 203.0.113.9/32"
    assert data["wins"]["set_by"] == ids["accept"]
    assert data["wins"]["set_at"].endswith("Z") and data["wins"]["expires_at"] is None
    assert data["problems"] == []
    hosts = {h["host"]: h for h in data["hosts"]}
    parts = {
        host: {f"{p['kind']} {p['network']}": (p["state"], p["detail"]) for p in h["covers"]}
        for host, h in hosts.items()
    }
    assert parts["web1"] == {
        "rule 203.0.113.9/32": ("holds", ""),
        "list 203.0.113.0/25": ("holds", ""),
        "rule 203.0.113.0/24": ("holds", ""),
    }
    assert hosts["web1"]["verdict"] == "accept"
    # burst workers said "stopped" when done: a stopped worker leaves its kernel as it was
    assert (hosts["web1"]["live"], hosts["web1"]["state"]) == (False, "stopped")
    # db1 protects 203.0.113.0/28: it refused the /24 drop (its result says so) and one
    # entry of the list (its heartbeat counts it, without saying which)
    assert parts["db1"]["rule 203.0.113.9/32"] == ("not targeted", "")
    state, detail = parts["db1"]["rule 203.0.113.0/24"]
    assert state == "refused" and "203.0.113.0/28" in detail
    assert parts["db1"]["list 203.0.113.0/25"] == (
        "uncertain",
        "holds this version less 1 refused entry, and does not say which",
    )
    assert hosts["db1"]["verdict"] == "none or drop"
    assert lines[5].split() == ["HOST", "VERDICT", "COVER", "STATE", "DETAIL"]
    assert [line.split()[:8] for line in lines[6:]][:1] == [
        ["db1", "(stopped)", "none", "or", "drop", "rule", "accept", "203.0.113.9/32"]
    ]


def test_why_an_address_nothing_covers_and_bad_input(
    r: Any, redis_server: RedisServer, producer: Producer, pushfw: Run
):
    _fleet(r, redis_server, producer)
    shown = pushfw("why", "192.0.2.200")
    assert (shown.returncode, shown.stdout) == (
        0,
        "192.0.2.200: no rule or list entry covers it\n",
    )
    listed = json.loads(pushfw("why", "192.0.2.1", "--json").stdout)
    assert [(c["kind"], c["name"], c["network"]) for c in listed["covers"]] == [
        ("list", "feed", "192.0.2.1/32")
    ]
    # db1 refused one entry of the list and does not say which: it may be this one
    verdicts = {h["host"]: h["verdict"] for h in listed["hosts"]}
    assert verdicts == {"db1": "none or drop", "web1": "drop"}

    bad = pushfw("why", "203.0.113.0/24")
    assert bad.returncode == 2
    assert bad.stderr == "pushfw: '203.0.113.0/24' is not an IP address (like 203.0.113.9)\n"


def test_why_reads_list_content_as_strictly_as_a_worker(
    r: Any, redis_server: RedisServer, producer: Producer, pushfw: Run
):
    _fleet(r, redis_server, producer)
    [record] = producer.lists()
    r.set(KEYS.list_content("feed", record.version), b"PFL1 forged")
    shown = pushfw("why", "192.0.2.1")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "192.0.2.1: no rule or list entry covers it\n"
    assert shown.stderr.startswith("warning: list feed: content unreadable: ")


def test_why_trusts_a_hosts_result_before_its_next_heartbeat(
    r: Any, redis_server: RedisServer, producer: Producer, pushfw: Run
):
    """``pushfw drop X --wait`` returns on the host's result, which is written before the
    heartbeat that says the host went past the command (up to a read's block later, 1 s by
    default): a ``why`` run at once must not say the host has not carried it out."""
    worker = memory_worker(redis_server, "web1")
    worker.setup()
    drop = producer.drop("203.0.113.9", reason="ssh-bf")
    worker.run(burst=True)
    assert [(x.host, x.status.value) for x in producer.results_of([drop])] == [("web1", "applied")]
    # the heartbeat as it stood between that result and the next beat
    beat = HostStatus.model_validate_json(r.hget(KEYS.hosts, "web1"))
    r.hset(KEYS.hosts, "web1", beat.model_copy(update={"done_id": ""}).model_dump_json())

    data = json.loads(pushfw("why", "203.0.113.9", "--json").stdout)
    [host] = data["hosts"]
    assert [(p["name"], p["state"]) for p in host["covers"]] == [("drop 203.0.113.9/32", "holds")]
    assert host["verdict"] == "drop"
