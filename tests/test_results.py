"""Results on request: a result entry per host only when a command asks for one (``reply``,
a ``request_id``) and always for rejected and failed ones; every host's progress is in its
heartbeat, and ``pushfw results --cmd`` answers for any command still in the stream.
Real redis-server, in-process workers on the memory backend.
"""

from __future__ import annotations

import json
from typing import Any

from pushfw.producer import Producer
from pushfw.producer.records import HostStatus
from tests.conftest import RedisServer, memory_worker, pushfw_cli
from tests.test_applier import key, results_by_cmd

CMD = "{pushfw}:cmd"


def beats_of(producer: Producer) -> dict[str, HostStatus]:
    return {h.host: h for h in producer.hosts()}


def test_only_commands_that_ask_get_result_entries_and_progress_is_in_the_heartbeat(
    r: Any, redis_server: RedisServer, producer: Producer
):
    hosts = [memory_worker(redis_server, host=name) for name in ("h1", "h2")]
    for worker in hosts:
        worker.setup()
    quiet = [producer.drop(f"192.0.2.{i}", reply=False) for i in range(1, 6)]
    raw = r.xadd(CMD, {"op": "drop.insert", "ip": "192.0.2.6"}).decode()  # as redis-cli would
    asked = r.xadd(CMD, {"op": "drop.insert", "ip": "192.0.2.7", "reply": "yes"}).decode()
    with_id = producer.drop("192.0.2.8", reply=False, request_id="ticket-8")
    bad = r.xadd(CMD, {"op": "drop.insert", "ip": "192.0.2.300"}).decode()
    for worker in hosts:
        worker.run(burst=True)
    assert beats_of(producer)["h1"].counts == {"applied": 8, "rejected": 1}

    by_cmd: dict[str, set[str]] = {}
    for _, fields in r.xrange("{pushfw}:results"):
        by_cmd.setdefault(fields[b"cmd"].decode(), set()).add(fields[b"host"].decode())
    assert by_cmd == {asked: {"h1", "h2"}, with_id: {"h1", "h2"}, bad: {"h1", "h2"}}
    assert results_by_cmd(r)[bad]["status"] == "rejected"
    for worker in hosts:
        assert set(worker.backend.committed()) == {key("drop", f"192.0.2.{i}") for i in range(1, 9)}

    beats = beats_of(producer)
    for name in ("h1", "h2"):
        assert beats[name].done_id == bad
        counts = beats[name].counts  # h2 may find a rule already there: reconcile put it
        assert counts.get("applied", 0) + counts.get("unchanged", 0) == 8
        assert counts["rejected"] == 1

    assert producer.progress(quiet[0]) == {"h1": "done", "h2": "done"}
    shown = pushfw_cli(redis_server, "results", "--cmd", raw, "--json")
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert sorted((row["host"], row["status"], row["detail"]) for row in rows) == [
        ("h1", "done", "no result requested"),
        ("h2", "done", "no result requested"),
    ]


def test_results_for_a_command_are_found_behind_thousands_of_newer_ones(
    r: Any, redis_server: RedisServer, producer: Producer
):
    worker = memory_worker(redis_server, batch_size=1000)
    worker.setup()
    first = producer.drop("198.51.100.1")
    pipe = r.pipeline(transaction=False)
    for i in range(2500):
        pipe.xadd(CMD, {"op": "drop.insert", "ip": f"10.{i // 250}.{i % 250}.1", "reply": "1"})
    pipe.execute()
    worker.run(burst=True)
    assert r.xlen("{pushfw}:results") == 2501
    [result] = producer.results(cmd_id=first)
    assert (result.host, result.status.value, result.detail) == ("h1", "applied", "inserted")
    shown = pushfw_cli(redis_server, "results", "--cmd", first)
    assert shown.returncode == 0, shown.stderr
    assert "applied" in shown.stdout and first in shown.stdout


def test_results_cmd_refuses_what_is_not_an_entry_id(redis_server: RedisServer):
    shown = pushfw_cli(redis_server, "results", "--cmd", "yesterday")
    assert shown.returncode == 2
    assert "'yesterday' is not a stream entry id" in shown.stderr
    assert "Traceback" not in shown.stderr


def test_a_bad_reply_field_rejects_the_command(r: Any, redis_server: RedisServer):
    worker = memory_worker(redis_server)
    worker.setup()
    cmd = r.xadd(CMD, {"op": "drop.insert", "ip": "192.0.2.9", "reply": "maybe"}).decode()
    worker.run(burst=True)
    result = results_by_cmd(r)[cmd]
    assert result["status"] == "rejected"
    assert result["detail"] == "reply: 'maybe' is not 1/yes/true or 0/no/false"
    assert dict(worker.backend.committed().pairs()) == {}
