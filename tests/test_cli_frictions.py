"""What a new operator saw go wrong in the CLI (issue 12), as they see it now.

``pushfw status`` with no host, ``--wait`` for a target no live host matches, and counts
with their noun in the singular ("1 active rule", "0 of 1 result").
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from pushfw.producer import Producer, parse_command
from pushfw.producer.client import is_live, reaches
from pushfw.producer.connection import redis_ms
from pushfw.producer.records import HostStatus
from pushfw.producer.render import plural
from tests.conftest import RedisServer, Run, memory_worker, wait_for
from tests.test_cli import CMD, HOSTS, beat, entries, one_line_error

NO_HOST = (
    "no host has reported to {pushfw}:hosts yet: is a pushfw-worker running against this Redis?"
)


def silent_host(client: redis.Redis, host: str, labels: list[str], silent_s: float) -> None:
    """A heartbeat last written ``silent_s`` ago (5 s interval: STALE after 15 s)."""
    status = HostStatus(
        host=host, labels=labels, last_seen_ms=redis_ms(client) - int(silent_s * 1000)
    )
    client.hset(HOSTS, host, status.model_dump_json())


# --- pushfw status with no host ---------------------------------------------------------


def test_status_without_hosts_says_so(pushfw: Run) -> None:
    """Not a bare header: one line naming the heartbeat key; exit 0, as for any listing."""
    proc = pushfw("status")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == NO_HOST + "\n"


def test_status_json_without_hosts_is_an_empty_list(pushfw: Run) -> None:
    proc = pushfw("status", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    assert proc.stderr == ""


# --- --wait for a target no live host matches -------------------------------------------


@pytest.fixture
def known_hosts(r: redis.Redis) -> None:
    """web1 (labels eu, web) runs; db1 stopped; gone1 (label web) fell silent 10 minutes ago."""
    beat(r, "web1", ("eu", "web"))
    beat(r, "db1", state="stopped")
    silent_host(r, "gone1", ["web"], 600)


@pytest.mark.usefixtures("known_hosts")
@pytest.mark.parametrize("target", ["nosuchhost", "db1", "gone1", "nosuchhost,db1"])
def test_wait_for_a_target_no_live_host_matches(pushfw: Run, r: redis.Redis, target: str) -> None:
    """Exit 3 at once with one line: the command id, the target, the hosts there are."""
    started = time.monotonic()
    proc = pushfw("drop", "192.0.2.1", "--target", target, "--wait", "--timeout", "60")
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - started < 30, "it did not wait for the timeout"
    [(entry_id, _)] = entries(r, CMD)
    assert one_line_error(proc) == (
        f"pushfw: sent {entry_id.decode()}, but no live host matches target '{target}'; "
        "known hosts: db1 (stopped), gone1 [web] (STALE), web1 [eu,web]"
    )
    assert proc.stdout == ""


@pytest.mark.usefixtures("known_hosts")
def test_wait_json_for_a_target_no_live_host_matches(pushfw: Run) -> None:
    """``--json`` keeps its shape (a list of results, here none); the reason is on stderr."""
    proc = pushfw("accept", "192.0.2.1", "--target", "db", "--wait", "--json")
    assert proc.returncode == 3, proc.stderr
    assert json.loads(proc.stdout) == []
    assert "but no live host matches target 'db'; known hosts: db1 (stopped)," in proc.stderr


def test_wait_names_at_most_ten_hosts(pushfw: Run, r: redis.Redis) -> None:
    for i in range(12):
        beat(r, f"h{i:02}", state="stopped")
    proc = pushfw("undrop", "192.0.2.1", "--wait")
    assert proc.returncode == 3, proc.stderr
    assert one_line_error(proc).endswith(
        "no live host matches target '*'; known hosts: "
        + ", ".join(f"h{i:02} (stopped)" for i in range(10))
        + ", and 2 more (pushfw status)"
    )


def test_wait_for_a_label_gets_the_worker_s_result(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A live host the target reaches by label: the CLI waits, the real worker answers."""
    worker = memory_worker(redis_server, "web1", host_labels="eu,web")
    worker.setup()  # its heartbeat says running
    silent_host(r, "gone1", ["eu"], 600)
    args = ["--redis-url", redis_server.url, "drop", "192.0.2.1", "--target", "eu", "--wait"]
    with subprocess.Popen(
        [sys.executable, "-m", "pushfw.producer", *args, "--timeout", "30", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    ) as cli:
        wait_for(lambda: r.exists(CMD) and r.xlen(CMD) == 1, what="the CLI to send its command")
        worker.run(burst=True)
        out, err = cli.communicate(timeout=60)
    assert cli.returncode == 0, err
    [result] = json.loads(out)
    assert (result["host"], result["status"]) == ("web1", "applied")


TARGETS = [(), ("web1",), ("web",), ("eu", "nosuchhost"), ("db1",), ("nosuchhost",), ("web1x",)]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: ",".join(t) or "*")
def test_reaches_is_the_contract_s_rule(target: tuple[str, ...]) -> None:
    """The producer's match is the one every worker applies (Command.targets)."""
    host = HostStatus(host="web1", labels=["eu", "web"], last_seen_ms=0)
    fields = {"op": "drop.insert", "ip": "192.0.2.1", "target": ",".join(target)}
    command = parse_command(fields)
    assert reaches(target, host) == command.targets(host.host, frozenset(host.labels))


def test_live_hosts(producer: Producer, r: redis.Redis) -> None:
    beat(r, "web1")
    beat(r, "db1", state="starting")
    beat(r, "old1", state="stopped")
    silent_host(r, "quiet1", [], 10)
    silent_host(r, "gone1", [], 16)
    now_ms = producer.now_ms()
    live = {h.host for h in producer.hosts() if is_live(h, now_ms)}
    assert live == {"web1", "db1", "quiet1"}


# --- one rule, not "1 rules" ------------------------------------------------------------


def test_plural() -> None:
    assert [plural(n, "rule") for n in (0, 1, 2)] == ["0 rules", "1 rule", "2 rules"]
    assert plural(1, "entry", "entries") == "1 entry"
    assert plural(3, "entry", "entries") == "3 entries"


def test_list_counts_one_rule(pushfw: Run, producer: Producer, redis_server: RedisServer) -> None:
    producer.drop("192.0.2.1", reason="one")
    worker = memory_worker(redis_server, "web1")
    worker.setup()
    worker.run(burst=True)
    proc = pushfw("list")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "1 active rule\n"
    proc = pushfw("list", "--host", "web1")
    assert proc.stderr == "1 active rule for web1\n"
