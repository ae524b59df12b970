"""The ``pushfw`` CLI as an operator runs it: a real process against a real redis-server.

Mistakes must come back as one line starting with ``pushfw: `` and a non-zero exit, never a
traceback, and must not put anything on the stream.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
import redis
from redis.typing import EncodableT, FieldT

from pushfw.producer import Op, parse_command
from pushfw.producer.connection import redis_ms
from pushfw.producer.records import HostStatus
from tests.conftest import RedisServer, Run

CMD = "{pushfw}:cmd"
RESULTS = "{pushfw}:results"
DEAD = "{pushfw}:dead"
HOSTS = "{pushfw}:hosts"
UNREACHABLE = "redis://127.0.0.1:1/0"
ENTRY_ID = re.compile(r"\d+-\d+")
WHEN = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The single ``pushfw: ...`` line on stderr, after checking there is nothing else."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pushfw: "), lines[0]
    return lines[0]


def text_fields(fields: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in fields.items()}


RawEntry = tuple[bytes, dict[bytes, bytes]]


def entries(client: redis.Redis, key: str) -> list[RawEntry]:
    """XRANGE on a bytes client, typed."""
    return cast(list[RawEntry], client.xrange(key))


def beat(
    client: redis.Redis, host: str, labels: tuple[str, ...] = (), state: str = "running"
) -> None:
    """A heartbeat as a worker writes it, stamped now by Redis's clock."""
    status = HostStatus(host=host, labels=list(labels), last_seen_ms=redis_ms(client), state=state)
    client.hset(HOSTS, host, status.model_dump_json())


def xadd(client: redis.Redis, key: str, fields: dict[str, str]) -> str:
    """XADD string fields, as redis-cli or a worker would; returns the entry id."""
    return cast(bytes, client.xadd(key, cast(dict[FieldT, EncodableT], fields))).decode()


# --- pushing commands -------------------------------------------------------------------


def test_drop_with_ttl_and_reason(pushfw: Run, r: redis.Redis) -> None:
    """The wire format is what DESIGN.md says: canonical op, the address, ttl in seconds."""
    proc = pushfw("drop", "203.0.113.9", "--ttl", "10m", "--reason", "ssh brute force")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    cmd_id = proc.stdout.strip()
    assert ENTRY_ID.fullmatch(cmd_id), proc.stdout
    [(entry_id, fields)] = entries(r, CMD)
    assert entry_id.decode() == cmd_id
    assert text_fields(fields) == {
        "op": "drop.insert",
        "ip": "203.0.113.9",
        "ttl": "600",
        "reason": "ssh brute force",
    }
    command = parse_command(fields)
    assert (command.op, command.ttl_s) == (Op.DROP_INSERT, 600)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["accept", "2001:db8::/32", "--target", "web,eu", "--request-id", "req-1"],
            {
                "op": "accept.insert",
                "ip": "2001:db8::/32",
                "target": "web,eu",
                "request_id": "req-1",
            },
        ),
        (
            ["accept", "192.0.2.0/24", "--ttl", "2h"],
            {"op": "accept.insert", "ip": "192.0.2.0/24", "ttl": "7200"},
        ),
        (["undrop", "::ffff:192.0.2.1"], {"op": "drop.delete", "ip": "192.0.2.1"}),
        (["unaccept", "10.0.0.0/8", "--target", "*"], {"op": "accept.delete", "ip": "10.0.0.0/8"}),
        (
            ["drop", "198.51.100.7", "--ttl", "90"],
            {"op": "drop.insert", "ip": "198.51.100.7", "ttl": "90"},
        ),
    ],
    ids=["accept-target", "accept-ttl", "undrop-mapped", "unaccept-all", "drop-seconds"],
)
def test_push_commands(
    pushfw: Run, r: redis.Redis, args: list[str], expected: dict[str, str]
) -> None:
    """Each subcommand writes one entry with canonical fields and nothing empty."""
    proc = pushfw(*args)
    assert proc.returncode == 0, proc.stderr
    [(entry_id, fields)] = entries(r, CMD)
    assert proc.stdout.strip() == entry_id.decode()
    assert text_fields(fields) == expected


def test_drop_json(pushfw: Run, r: redis.Redis) -> None:
    """``--json`` without ``--wait`` prints the entry id as JSON."""
    proc = pushfw("drop", "192.0.2.1", "--json")
    assert proc.returncode == 0, proc.stderr
    [(entry_id, _)] = entries(r, CMD)
    assert json.loads(proc.stdout) == [{"cmd": entry_id.decode()}]


# --- mistakes ---------------------------------------------------------------------------

BAD_ARGS = [
    (
        "bad-ip",
        ["drop", "203.0.113.300"],
        "pushfw: ip: '203.0.113.300' is not an IPv4/IPv6 address",
    ),
    ("host-bits", ["drop", "10.0.0.1/8"], "pushfw: ip: '10.0.0.1/8' has host bits set"),
    ("shell-in-ip", ["drop", "192.0.2.1;reboot"], "pushfw: ip: '192.0.2.1;reboot' is not an"),
    (
        "ttl-zero",
        ["drop", "192.0.2.1", "--ttl", "0"],
        "pushfw: Invalid value for '--ttl': '0' must be longer",
    ),
    (
        "ttl-abc",
        ["drop", "192.0.2.1", "--ttl", "abc"],
        "pushfw: Invalid value for '--ttl': 'abc' is not a duration",
    ),
    (
        "ttl-too-long",
        ["drop", "192.0.2.1", "--ttl", "11000d"],
        "pushfw: ttl: 950400000 is outside 1..315360000",
    ),
    (
        "ttl-absurd",
        ["drop", "192.0.2.1", "--ttl", "100000000w"],
        "pushfw: ttl: 60480000000000 is outside 1..315360000",
    ),
    ("ttl-on-undrop", ["undrop", "192.0.2.1", "--ttl", "60"], "pushfw: No such option '--ttl'"),
    (
        "reason-newline",
        ["drop", "192.0.2.1", "--reason", "a\nb"],
        "pushfw: reason: contains control characters",
    ),
    (
        "bad-target",
        ["drop", "192.0.2.1", "--target", "web;reboot"],
        "pushfw: target: 'web;reboot' is not a host",
    ),
    (
        "bad-request-id",
        ["drop", "192.0.2.1", "--request-id", "a b"],
        "pushfw: request_id: must be printable",
    ),
    (
        "bad-timeout",
        ["drop", "192.0.2.1", "--wait", "--timeout", "soon"],
        "pushfw: Invalid value for '--timeout'",
    ),
    ("unknown-subcommand", ["frobnicate"], "pushfw: No such command 'frobnicate'."),
    ("missing-argument", ["drop"], "pushfw: Missing argument 'IP'."),
    (
        "count-zero",
        ["results", "--count", "0"],
        "pushfw: Invalid value for '--count': 0 is not in the range",
    ),
    ("dead-count-zero", ["dead", "--count", "0"], "pushfw: Invalid value for '--count'"),
]


@pytest.mark.parametrize(
    ("args", "starts"), [b[1:] for b in BAD_ARGS], ids=[b[0] for b in BAD_ARGS]
)
def test_bad_arguments(pushfw: Run, r: redis.Redis, args: list[str], starts: str) -> None:
    """A usage mistake: exit 2, one line on stderr, nothing on stdout or on the stream."""
    proc = pushfw(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert one_line_error(proc).startswith(starts)
    assert proc.stdout == ""
    assert r.exists(CMD) == 0


@pytest.mark.parametrize(
    "args",
    [["drop", "192.0.2.1"], ["results"], ["dead", "--json"]],
    ids=["drop", "results", "dead"],
)
def test_unreachable_redis(pushfw: Run, args: list[str]) -> None:
    """Redis down: one ``pushfw: redis: ...`` line and exit 1."""
    proc = pushfw(*args, url=UNREACHABLE)
    assert proc.returncode == 1, proc.stderr
    assert one_line_error(proc).startswith("pushfw: redis: ")
    assert "127.0.0.1:1" in proc.stderr
    assert proc.stdout == ""


# --- reading results and dead letters ---------------------------------------------------

RESULT_HEADER = ["TIME", "HOST", "STATUS", "CMD", "REQUEST_ID", "DETAIL"]
DEAD_HEADER = ["TIME", "HOST", "CMD", "OP", "IP", "DELIVERIES", "ERROR"]


def add_result(
    client: redis.Redis, cmd: str, host: str, status: str, detail: str = "", request_id: str = ""
) -> str:
    """XADD a result exactly as a worker does (DESIGN.md: cmd, request_id, host, status, detail)."""
    fields = {
        "cmd": cmd,
        "request_id": request_id,
        "host": host,
        "status": status,
        "detail": detail,
    }
    return xadd(client, RESULTS, fields)


def test_results_table_and_json(pushfw: Run, r: redis.Redis) -> None:
    """Newest first, a header line, ``--count`` and ``--cmd`` filter; ``--json`` parses."""
    first = add_result(r, "1700000000000-0", "web-1", "applied", "rule inserted", "req-1")
    second = add_result(r, "1700000000000-0", "web-2", "failed", "iptables: exit 4")
    third = add_result(r, "1700000000001-0", "db-1", "unchanged")

    table = pushfw("results")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == RESULT_HEADER
    hosts = [re.match(WHEN.pattern + r"\s+(\S+)", row) for row in rows]
    assert [m.group(1) if m else row for m, row in zip(hosts, rows, strict=True)] == [
        "db-1",
        "web-2",
        "web-1",
    ]
    assert "rule inserted" in rows[2] and "req-1" in rows[2]
    assert rows[0].split()[-1] == "-", "an empty cell shows as -"

    listed = json.loads(pushfw("results", "--json").stdout)
    assert [row["host"] for row in listed] == ["db-1", "web-2", "web-1"]
    assert listed[2] == {
        "time": listed[2]["time"],
        "cmd": "1700000000000-0",
        "request_id": "req-1",
        "host": "web-1",
        "status": "applied",
        "detail": "rule inserted",
    }
    assert WHEN.fullmatch(listed[2]["time"])
    assert {first, second, third} == {e.decode() for e, _ in entries(r, RESULTS)}

    one = json.loads(pushfw("results", "--json", "--count", "1").stdout)
    assert [row["host"] for row in one] == ["db-1"]
    only = json.loads(pushfw("results", "--json", "--cmd", "1700000000000-0").stdout)
    assert [row["host"] for row in only] == ["web-2", "web-1"]


def test_dead_table_and_json(pushfw: Run, r: redis.Redis) -> None:
    """Dead letters keep the original fields; the table shows op and ip, JSON all of them."""
    original = {"op": "ttl.drop.insert", "ip": "192.0.2.7", "ttl": "60", "reason": "scan"}
    meta = {
        "cmd": "1700000000000-3",
        "error": "iptables: Resource temporarily unavailable",
        "deliveries": "5",
        "host": "web-1",
    }
    xadd(r, DEAD, {**original, **meta})

    table = pushfw("dead")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == DEAD_HEADER
    for value in ("web-1", "1700000000000-3", "ttl.drop.insert", "192.0.2.7", " 5 ", meta["error"]):
        assert value in row

    [letter] = json.loads(pushfw("dead", "--json").stdout)
    assert letter == {
        "time": letter["time"],
        "host": "web-1",
        "cmd": "1700000000000-3",
        "op": "ttl.drop.insert",
        "ip": "192.0.2.7",
        "deliveries": 5,
        "error": meta["error"],
        "fields": original,
    }


@pytest.mark.parametrize(("sub", "header"), [("results", RESULT_HEADER), ("dead", DEAD_HEADER)])
def test_empty_listings(pushfw: Run, sub: str, header: list[str]) -> None:
    """Nothing yet: just the header, or an empty JSON list."""
    table = pushfw(sub)
    assert table.returncode == 0, table.stderr
    assert table.stdout.split() == header
    listed = pushfw(sub, "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []


# --- waiting for hosts ------------------------------------------------------------------


def test_wait_without_any_worker_says_so_at_once(pushfw: Run, r: redis.Redis) -> None:
    """No host ever reported: exit 3 at once, naming the heartbeat key, not after the timeout."""
    started = time.monotonic()
    proc = pushfw("drop", "192.0.2.1", "--wait", "--timeout", "60")
    assert proc.returncode == 3, proc.stderr
    [(entry_id, _)] = entries(r, CMD)
    assert one_line_error(proc) == (
        f"pushfw: sent {entry_id.decode()}, but no host has reported to {{pushfw}}:hosts yet: "
        "is a pushfw-worker running against this Redis?"
    )
    assert proc.stdout == ""
    assert time.monotonic() - started < 30, "it did not wait for the timeout"


def test_wait_times_out_when_the_live_host_is_silent(pushfw: Run, r: redis.Redis) -> None:
    """A live host that does not answer: exit 3 and one line saying how many results came."""
    beat(r, "web-1")
    started = time.monotonic()
    proc = pushfw("drop", "192.0.2.1", "--wait", "--timeout", "1")
    assert proc.returncode == 3, proc.stderr
    assert one_line_error(proc) == "pushfw: 0 of 1 result before the timeout"
    assert 1 <= time.monotonic() - started < 30
    assert r.xlen(CMD) == 1, "the command was sent all the same"


def answer_when_sent(
    redis_server: RedisServer, reply: Callable[[redis.Redis, str], object]
) -> tuple[threading.Thread, list[BaseException]]:
    """A stand-in worker: waits for the command to appear, then calls ``reply``.

    The CLI reads results from just before its command's id, so a reply written at any
    time after the command is one it reads."""
    errors: list[BaseException] = []

    def run() -> None:
        client = redis.Redis.from_url(redis_server.url)
        try:
            deadline = time.monotonic() + 20
            while not (sent := entries(client, CMD)):
                if time.monotonic() > deadline:
                    raise TimeoutError("the CLI never sent its command")
                time.sleep(0.02)
            reply(client, sent[0][0].decode())
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.parametrize(
    ("status", "code"), [("applied", 0), ("unchanged", 0), ("rejected", 4), ("failed", 4)]
)
def test_wait_json_prints_the_result(
    pushfw: Run, r: redis.Redis, redis_server: RedisServer, status: str, code: int
) -> None:
    """``--wait --json`` prints this command's result only; failures exit 4."""

    def reply(client: redis.Redis, cmd_id: str) -> None:
        add_result(client, "1-0", "other-host", "failed", "another command")
        add_result(client, cmd_id, "web-1", status, "by the test", "req-7")

    beat(r, "web-1")
    thread, errors = answer_when_sent(redis_server, reply)
    proc = pushfw(
        "drop", "192.0.2.1", "--request-id", "req-7", "--wait", "--timeout", "20", "--json"
    )
    thread.join(timeout=30)
    assert not errors, errors
    assert proc.returncode == code, proc.stderr
    assert proc.stderr == ""
    [result] = json.loads(proc.stdout)
    cmd_id = result["cmd"]
    assert ENTRY_ID.fullmatch(cmd_id)
    assert result == {
        "time": result["time"],
        "cmd": cmd_id,
        "request_id": "req-7",
        "host": "web-1",
        "status": status,
        "detail": "by the test",
    }


def test_wait_for_more_hosts_than_answer(
    pushfw: Run, r: redis.Redis, redis_server: RedisServer
) -> None:
    """``--expect 2`` with one answer: the answer is shown, then exit 3."""
    beat(r, "web-1")
    thread, errors = answer_when_sent(
        redis_server, lambda client, cmd_id: add_result(client, cmd_id, "web-1", "applied")
    )
    proc = pushfw("drop", "192.0.2.1", "--wait", "--expect", "2", "--timeout", "3", "--json")
    thread.join(timeout=30)
    assert not errors, errors
    assert proc.returncode == 3, proc.stderr
    assert one_line_error(proc) == "pushfw: 1 of 2 results before the timeout"
    assert [row["host"] for row in json.loads(proc.stdout)] == ["web-1"]


# --- configuration ----------------------------------------------------------------------


def test_redis_url_from_environment(pushfw: Run, r: redis.Redis, redis_server: RedisServer) -> None:
    """PUSHFW_REDIS_URL is used when ``--redis-url`` is not given."""
    proc = pushfw("drop", "192.0.2.1", url=None, env={"PUSHFW_REDIS_URL": redis_server.url})
    assert proc.returncode == 0, proc.stderr
    [(entry_id, _)] = entries(r, CMD)
    assert proc.stdout.strip() == entry_id.decode()

    down = pushfw("results", url=None, env={"PUSHFW_REDIS_URL": UNREACHABLE})
    assert down.returncode == 1
    assert one_line_error(down).startswith("pushfw: redis: ")


def test_redis_url_option_beats_environment(pushfw: Run, r: redis.Redis) -> None:
    """An explicit ``--redis-url`` wins over the environment."""
    proc = pushfw("drop", "192.0.2.1", env={"PUSHFW_REDIS_URL": UNREACHABLE})
    assert proc.returncode == 0, proc.stderr
    assert r.xlen(CMD) == 1


def test_redis_url_from_a_file_keeps_the_password_off_the_command_line(
    pushfw: Run, r: redis.Redis, aof_redis: RedisServer, tmp_path: Path
) -> None:
    """``--redis-url-file`` (or PUSHFW_REDIS_URL_FILE) reads the URL, password included, from
    a file; it beats PUSHFW_REDIS_URL. A password typed on the command line still works, with
    a warning that ``ps`` shows it."""
    admin = redis.Redis(unix_socket_path=str(aof_redis.socket_path))
    admin.config_set("requirepass", "f1le-pw")
    url = f"redis://:f1le-pw@127.0.0.1:{aof_redis.port}/0"
    url_file = tmp_path / "redis.url"
    url_file.write_text(f"# pushfw's Redis\n{url}\n")
    env = {"PUSHFW_REDIS_URL": UNREACHABLE}
    by_option = pushfw("--redis-url-file", str(url_file), "drop", "192.0.2.1", url=None, env=env)
    assert by_option.returncode == 0 and by_option.stderr == "", by_option.stderr
    by_env = pushfw("drop", "192.0.2.2", url=None, env={"PUSHFW_REDIS_URL_FILE": str(url_file)})
    assert by_env.returncode == 0 and by_env.stderr == "", by_env.stderr
    assert admin.xlen(CMD) == 2

    typed = pushfw("drop", "192.0.2.3", url=url)
    assert typed.returncode == 0
    assert "the password in --redis-url is visible in the process list" in typed.stderr
    assert "f1le-pw" not in typed.stderr
    admin.close()

    both = pushfw("--redis-url-file", str(url_file), "status", url=url)
    assert both.returncode == 2
    assert one_line_error(both).endswith("give the Redis URL once: --redis-url or --redis-url-file")
    missing = pushfw("--redis-url-file", str(tmp_path / "nope"), "status", url=None)
    assert missing.returncode == 2
    assert "nope: No such file or directory" in one_line_error(missing)
    url_file.write_text("")
    empty = pushfw("--redis-url-file", str(url_file), "status", url=None)
    assert empty.returncode == 2 and "holds 0 URLs, not one" in one_line_error(empty)


def test_prefix_from_environment(pushfw: Run, r: redis.Redis) -> None:
    """PUSHFW_KEY_PREFIX moves every key, hash tag included."""
    proc = pushfw("drop", "192.0.2.1", env={"PUSHFW_KEY_PREFIX": "{fw2}"})
    assert proc.returncode == 0, proc.stderr
    assert r.exists(CMD) == 0
    assert r.xlen("{fw2}:cmd") == 1
