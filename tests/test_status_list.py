"""``pushfw status`` and ``pushfw list`` as real processes, fed by real in-process workers.

Two workers (memory backend) fold and apply the commands in burst mode against the
session's redis-server; the CLI then reads their heartbeats and the ledger.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from pushfw.producer import Keys, Producer
from pushfw.producer.connection import redis_ms
from pushfw.producer.records import HostStatus
from pushfw.producer.why import iso_ms
from pushfw.worker import Worker, WorkerSettings
from pushfw.worker.backends.memory import MemoryBackend
from testbed.env import clean_env
from tests.conftest import RedisServer, wait_for

KEYS = Keys()
STATUS_COLUMNS = [
    "HOST",
    "STATE",
    "LAST_SEEN",
    "RULES",
    "LAG",
    "PENDING",
    "READS",
    "BACKEND",
    "LABELS",
    "VERSION",
    "UP",
]
LIST_COLUMNS = ["ACTION", "NETWORK", "EXPIRES_IN", "TARGET", "REASON", "ORIGIN", "SET_AT_UTC"]


def run_pushfw(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = clean_env()
    proc = subprocess.run(
        [sys.executable, "-m", "pushfw.producer", "--redis-url", url, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def make_worker(server: RedisServer, host: str, **overrides: Any) -> Worker:
    settings = WorkerSettings(
        redis_url=server.url, host_name=host, backend="memory", block_ms=50, **overrides
    )
    worker = Worker(settings, backend=MemoryBackend(settings.fail_networks))
    worker.setup()
    return worker


@dataclass
class Fleet:
    url: str
    ids: dict[str, str]
    rules: dict[str, int]
    expired_ms: int


@pytest.fixture
def fleet(r: redis.Redis, redis_server: RedisServer, producer: Producer) -> Fleet:
    """Hosts web1 (labels web, eu) and db1 after one burst over a mix of commands."""
    # first, so that its explicit id is older than the others: expired when folded
    stale = f"{redis_ms(r) - 5000}-0"
    r.xadd(KEYS.cmd, {"op": "ttl.drop.insert", "ip": "192.0.2.90", "ttl": "2"}, id=stale)
    web1 = make_worker(redis_server, "web1", host_labels="web,eu")
    db1 = make_worker(redis_server, "db1")
    ids = {
        "everyone": producer.drop("192.0.2.1", ttl_s=600, reason="ssh brute force"),
        "web": producer.drop("192.0.2.2", target=["web"], reason="web scanner"),
        "db1": producer.accept("198.51.100.0/24", target=["db1"], reason="backup net"),
        "eu": producer.drop("2001:db8::/32", target=["eu"], reason="gdpr"),
        "lifted": producer.drop("192.0.2.3", reason="mistake"),
        "short": producer.drop("192.0.2.4", ttl_s=1, reason="blink"),
        "stale": stale,
    }
    r.xadd(KEYS.cmd, {"op": "drop.insert", "ip": "203.0.113.7", "origin": "fail2ban"})
    producer.undrop("192.0.2.3")
    web1.run(burst=True)
    db1.run(burst=True)
    return Fleet(
        url=redis_server.url,
        ids=ids,
        # at heartbeat time: 192.0.2.1, .4, 203.0.113.7 everywhere, plus the targeted ones
        rules={"web1": 5, "db1": 4},
        expired_ms=int(ids["short"].split("-")[0]) + 1000,
    )


def test_status_table_shows_every_host(fleet: Fleet):
    """The two burst workers have exited: their last heartbeat says so."""
    proc = run_pushfw(fleet.url, "status")
    lines = proc.stdout.rstrip("\n").splitlines()
    assert lines[0].split() == STATUS_COLUMNS
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"web1", "db1"}
    for host in ("web1", "db1"):
        row = rows[host]
        assert row[1] == "stopped"
        assert re.fullmatch(r"\d+s", row[2]) and row[3] == "ago"
        assert row[4] == str(fleet.rules[host])
        assert row[5:9] == ["0", "0", "group", "memory"]
    assert rows["web1"][9] == "eu,web"
    assert rows["db1"][9] == "-"


def test_status_marks_a_silent_host_stale(r: redis.Redis, fleet: Fleet):
    now_ms = redis_ms(r)
    old = HostStatus(
        host="gone1",
        labels=["web"],
        backend="iptables",
        last_seen_ms=now_ms - 600_000,
        started_ms=now_ms - 3_600_000,
        rules=12,
    )
    r.hset(KEYS.hosts, old.host, old.model_dump_json())
    # a worker that said it stopped, ten minutes ago: not silent, but not applying commands
    off = old.model_copy(update={"host": "off1", "state": "stopped"})
    r.hset(KEYS.hosts, off.host, off.model_dump_json())

    proc = run_pushfw(fleet.url, "status")
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert set(rows) == {"web1", "db1", "gone1", "off1"}
    assert rows["gone1"].split()[1] == "STALE"
    assert rows["off1"].split()[1] == "STOPPED"
    assert re.search(r"STALE\s+10m \ds ago\s+12\s", rows["gone1"])
    # up from its start until its last heartbeat, not until now: it is not up any more
    assert rows["gone1"].split()[-2:] == ["50m", "0s"]
    assert rows["web1"].split()[1] == rows["db1"].split()[1] == "stopped"


def test_status_json(r: redis.Redis, fleet: Fleet):
    old = HostStatus(host="gone1", last_seen_ms=redis_ms(r) - 600_000)
    r.hset(KEYS.hosts, old.host, old.model_dump_json())

    rows = json.loads(run_pushfw(fleet.url, "status", "--json").stdout)
    by_host = {row["host"]: row for row in rows}
    assert set(by_host) == {"web1", "db1", "gone1"}
    fields = {"host", "state", "last_seen", "rules", "lag", "pending", "backend", "labels"}
    for row in rows:
        assert fields | {"version", "up"} <= set(row)
    web1 = by_host["web1"]
    assert web1["state"] == "stopped"
    assert web1["labels"] == ["eu", "web"]
    assert web1["rules"] == fleet.rules["web1"]
    assert (web1["lag"], web1["pending"], web1["backend"]) == (0, 0, "memory")
    assert isinstance(web1["last_seen_ms"], int) and isinstance(web1["up"], int)
    assert web1["last_seen"] == iso_ms(web1["last_seen_ms"])
    assert web1["started"] == iso_ms(web1["started_ms"])
    assert by_host["db1"]["rules"] == fleet.rules["db1"]
    assert by_host["gone1"]["state"] == "STALE"
    assert by_host["gone1"]["lag"] is None


def list_rows(fleet: Fleet, *args: str) -> tuple[list[str], dict[str, str], str]:
    proc = run_pushfw(fleet.url, "list", *args)
    lines = proc.stdout.rstrip("\n").splitlines()
    rows = {line.split()[1]: line for line in lines[1:]}
    return lines[0].split(), rows, proc.stderr


def wait_short_expired(r: redis.Redis, fleet: Fleet) -> None:
    wait_for(lambda: redis_ms(r) > fleet.expired_ms, timeout=5, what="the 1 s ban to expire")


def test_list_shows_active_rules_with_time_left(r: redis.Redis, fleet: Fleet):
    wait_short_expired(r, fleet)
    header, rows, err = list_rows(fleet)
    assert header == LIST_COLUMNS
    assert set(rows) == {
        "192.0.2.1/32",
        "192.0.2.2/32",
        "198.51.100.0/24",
        "2001:db8::/32",
        "203.0.113.7/32",
    }
    assert re.search(
        r"^drop\s+192\.0\.2\.1/32\s+9m 5\ds\s+\*\s+ssh brute force\s+producer\s",
        rows["192.0.2.1/32"],
    )
    assert re.search(
        r"^drop\s+192\.0\.2\.2/32\s+never\s+web\s+web scanner\s+producer", rows["192.0.2.2/32"]
    )
    assert re.search(
        r"^accept\s+198\.51\.100\.0/24\s+never\s+db1\s+backup net\s", rows["198.51.100.0/24"]
    )
    assert re.search(r"\snever\s+\*\s+-\s+fail2ban\s", rows["203.0.113.7/32"])
    assert err.strip() == "5 active rules"


def test_list_for_one_host_follows_names_and_labels(r: redis.Redis, fleet: Fleet):
    wait_short_expired(r, fleet)
    _, db1, err = list_rows(fleet, "--host", "db1")
    assert set(db1) == {"192.0.2.1/32", "198.51.100.0/24", "203.0.113.7/32"}
    assert err.strip() == "3 active rules for db1"

    _, web1, _ = list_rows(fleet, "--host", "web1")
    assert set(web1) == {"192.0.2.1/32", "192.0.2.2/32", "2001:db8::/32", "203.0.113.7/32"}

    _, unknown, _ = list_rows(fleet, "--host", "nobody")
    assert set(unknown) == {"192.0.2.1/32", "203.0.113.7/32"}


def test_list_json(r: redis.Redis, fleet: Fleet):
    wait_short_expired(r, fleet)
    rows = json.loads(run_pushfw(fleet.url, "list", "--json").stdout)
    by_net = {row["network"]: row for row in rows}
    assert len(by_net) == len(rows) == 5
    everyone = by_net["192.0.2.1/32"]
    assert 590 < everyone["expires_in"] <= 600
    assert everyone["expires_ms"] == int(fleet.ids["everyone"].split("-")[0]) + 600_000
    assert everyone["set_by"] == fleet.ids["everyone"]
    set_ms = int(fleet.ids["everyone"].split("-")[0])
    assert everyone["set_ms"] == set_ms
    assert everyone["set_at"] == iso_ms(set_ms)
    assert everyone["set_at"].endswith("Z")
    assert everyone["expires_at"] == iso_ms(everyone["expires_ms"])
    assert (everyone["reason"], everyone["origin"], everyone["target"]) == (
        "ssh brute force",
        "producer",
        "*",
    )
    web = by_net["192.0.2.2/32"]
    assert web["expires_in"] is None and web["expires_ms"] is None
    assert web["expires_at"] is None
    assert web["set_by"] == fleet.ids["web"]
    assert by_net["2001:db8::/32"]["set_by"] == fleet.ids["eu"]
    assert by_net["198.51.100.0/24"]["action"] == "accept"
    assert "192.0.2.3/32" not in by_net and "192.0.2.4/32" not in by_net
