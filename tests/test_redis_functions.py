"""The seed's commands as Redis Functions (``FCALL drop_insert ...``) on a real redis-server.

The library is installed the way an operator does it (``pushfw redis-functions install``, a
real process); each function only appends a stream entry, and an in-process worker (memory
backend) applies what they appended like any other command.
"""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from pushfw.producer import parse_command
from pushfw.producer.connection import connect
from pushfw.producer.entry_ids import entry_order
from pushfw.producer.functions import FUNCTIONS, LIBRARY_NAME, LIST_STORE
from testbed.env import clean_env
from tests.conftest import RedisServer, need, pushfw_cli
from tests.test_applier import key, make_worker, results_by_cmd
from tests.test_topologies import cluster, redis_binary  # noqa: F401 (fixtures used below)

CMD = "{pushfw}:cmd"


@pytest.fixture
def fr(r: redis.Redis) -> Iterator[redis.Redis]:
    """The flushed bytes client, on a Redis with Functions; the library is removed after.

    (FLUSHALL keeps function libraries, so the test cleans up after itself.)
    """
    major = int(str(r.info("server")["redis_version"]).split(".")[0])
    need(major >= 7, f"Redis Functions need redis-server >= 7 (this is {major})")
    yield r
    with contextlib.suppress(redis.ResponseError):
        r.function_delete(LIBRARY_NAME)


@pytest.fixture
def installed(fr: redis.Redis, redis_server: RedisServer, tmp_path: Path) -> redis.Redis:
    """The library installed by the CLI, twice: the second load replaces the first."""
    for _ in range(2):
        proc = pushfw_cli(redis_server, "redis-functions", "install", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"loaded library {LIBRARY_NAME}: drop_insert"), proc.stdout
    return fr


def fcall(r: redis.Redis, name: str, numkeys: int, *keys_and_args: str) -> str:
    reply = cast(bytes, r.fcall(name, numkeys, *keys_and_args))
    return reply.decode()


def entries(r: redis.Redis, stream: str = CMD) -> dict[str, dict[str, str]]:
    return {
        eid.decode(): {k.decode(): v.decode() for k, v in fields.items()}
        for eid, fields in cast(list[Any], r.xrange(stream))
    }


def ms(entry_id: str) -> int:
    return int(entry_id.split("-")[0])


def test_library_has_the_seed_commands(installed: redis.Redis) -> None:
    libraries = installed.function_list(library=LIBRARY_NAME)
    assert len(libraries) == 1
    library = dict(zip(libraries[0][::2], libraries[0][1::2], strict=True))
    names = {
        dict(zip(f[::2], f[1::2], strict=True))[b"name"].decode() for f in library[b"functions"]
    }
    assert names == {*FUNCTIONS, LIST_STORE}
    seed = {"drop_insert", "drop_delete", "accept_insert", "accept_delete"}
    assert set(FUNCTIONS) == seed | {"ttl_drop_insert", "ttl_accept_insert"}


def test_each_seed_command_appends_the_equivalent_entry(
    installed: redis.Redis, redis_server: RedisServer
) -> None:
    r = installed
    worker = make_worker(redis_server)  # a new host follows from the head: start it first
    ids = {
        "drop": fcall(r, "drop_insert", 1, CMD, "192.168.1.6"),
        "drop_seed": fcall(r, "drop_insert", 0, "192.168.1.7", "seed form"),
        "ttl_drop": fcall(r, "ttl_drop_insert", 1, CMD, "192.168.1.8", "600", "ssh brute force"),
        "ttl_drop_seed": fcall(r, "ttl_drop_insert", 0, "192.168.1.9", "600"),
        "accept": fcall(r, "accept_insert", 1, CMD, "198.51.100.7"),
        "ttl_accept": fcall(r, "ttl_accept_insert", 0, "2001:db8::8", "3600", "partner"),
        "drop_gone": fcall(r, "drop_insert", 0, "192.168.1.10"),
        "undrop": fcall(r, "drop_delete", 0, "192.168.1.10", "false positive"),
        "accept_gone": fcall(r, "accept_insert", 0, "198.51.100.9"),
        "unaccept": fcall(r, "accept_delete", 1, CMD, "198.51.100.9"),
    }

    stream = entries(r)
    assert list(stream) == list(ids.values()), "one entry per call, in call order"
    fcall_tag = {"origin": "fcall"}
    assert stream[ids["drop"]] == {"op": "drop.insert", "ip": "192.168.1.6", **fcall_tag}
    assert stream[ids["drop_seed"]] == {
        "op": "drop.insert",
        "ip": "192.168.1.7",
        "reason": "seed form",
        **fcall_tag,
    }
    assert stream[ids["ttl_drop"]] == {
        "op": "ttl.drop.insert",
        "ip": "192.168.1.8",
        "ttl": "600",
        "reason": "ssh brute force",
        **fcall_tag,
    }
    assert stream[ids["ttl_drop_seed"]] == {
        "op": "ttl.drop.insert",
        "ip": "192.168.1.9",
        "ttl": "600",
        **fcall_tag,
    }
    assert stream[ids["ttl_accept"]]["op"] == "ttl.accept.insert"
    assert stream[ids["undrop"]] == {
        "op": "drop.delete",
        "ip": "192.168.1.10",
        "reason": "false positive",
        **fcall_tag,
    }
    assert stream[ids["unaccept"]] == {"op": "accept.delete", "ip": "198.51.100.9", **fcall_tag}
    for fields in stream.values():
        parse_command(fields)  # every entry is a valid v1 command

    worker.run(burst=True)
    rules = dict(worker.backend.committed().pairs())
    assert set(rules) == {
        key("drop", "192.168.1.6"),
        key("drop", "192.168.1.7"),
        key("drop", "192.168.1.8"),
        key("drop", "192.168.1.9"),
        key("accept", "198.51.100.7"),
        key("accept", "2001:db8::8"),
    }
    assert rules[key("drop", "192.168.1.6")].expires_ms is None
    assert rules[key("drop", "192.168.1.8")].expires_ms == ms(ids["ttl_drop"]) + 600_000
    assert rules[key("drop", "192.168.1.9")].expires_ms == ms(ids["ttl_drop_seed"]) + 600_000
    assert rules[key("accept", "2001:db8::8")].expires_ms == ms(ids["ttl_accept"]) + 3_600_000
    answers = worker.applier.answers
    assert answers.done_id == max(ids.values(), key=entry_order)
    assert answers.counts == {"applied": len(ids)}, "the seed's commands ask no result"
    assert results_by_cmd(r) == {}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (("drop_insert", 0), "wrong number of arguments (got 0, expected 1 or 2)"),
        (("drop_insert", 0, "192.0.2.1", "reason", "extra"), "wrong number of arguments (got 3"),
        (("drop_delete", 1, CMD), "wrong number of arguments (got 0"),
        (("ttl_drop_insert", 0, "192.0.2.1"), "wrong number of arguments (got 1, expected 2 or 3)"),
        (("ttl_accept_insert", 1, CMD, "192.0.2.1"), "wrong number of arguments (got 1"),
        (("ttl_drop_insert", 0, "192.0.2.1", "10m"), "ttl must be a whole number of seconds"),
        (("ttl_drop_insert", 0, "192.0.2.1", "-5"), "ttl must be a whole number of seconds"),
        (("ttl_accept_insert", 0, "192.0.2.1", ""), "ttl must be a whole number of seconds"),
        (("drop_insert", 1, "192.168.1.6"), "the key must be the command stream"),
        (("drop_insert", 2, CMD, CMD, "192.0.2.1"), "takes one key, the stream (got 2)"),
    ],
)
def test_wrong_arguments_are_a_clear_error_and_append_nothing(
    installed: redis.Redis, call: tuple[Any, ...], message: str
) -> None:
    name = call[0]
    with pytest.raises(redis.ResponseError) as caught:
        installed.fcall(*call)
    text = str(caught.value)
    assert f"pushfw {name}: {message}" in text
    assert f"usage: FCALL {name} 1 {CMD} <ip>" in text
    assert installed.dbsize() == 0, "an error writes nothing"


def test_values_are_validated_by_the_worker_not_the_function(
    installed: redis.Redis, redis_server: RedisServer
) -> None:
    """The function checks counts only; a bad address or ttl is the worker's "rejected"."""
    r = installed
    worker = make_worker(redis_server)
    bad_ip = fcall(r, "drop_insert", 0, "1.2.3.4; reboot")
    bad_ttl = fcall(r, "ttl_drop_insert", 0, "192.0.2.1", "0")
    worker.run(burst=True)
    results = results_by_cmd(r)
    assert results[bad_ip]["status"] == results[bad_ttl]["status"] == "rejected"
    assert "whitespace" in results[bad_ip]["detail"]
    assert results[bad_ttl]["detail"].startswith("ttl:")
    assert dict(worker.backend.committed().pairs()) == {}


def test_show_prints_the_library_and_a_prefix_moves_the_default_stream(
    fr: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    packaged = resources.files("pushfw.producer").joinpath("functions.lua").read_text("utf-8")
    shown = pushfw_cli(redis_server, "redis-functions", "show", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    # the packaged source, its table of the seed's commands rendered from pushfw.producer.ops
    head, _, rest = shown.stdout.partition("local COMMANDS = {\n")
    rows, _, tail = rest.partition("}\n")
    assert head + "local COMMANDS = {}\n" + tail == packaged
    assert '    {name = "drop_delete", op = "drop.delete", timed = false},' in rows.splitlines()
    assert '    {name = "ttl_drop_insert", op = "ttl.drop.insert", timed = true},' in rows
    assert len(rows.splitlines()) == len(FUNCTIONS)
    assert shown.stdout.startswith(f"#!lua name={LIBRARY_NAME}\n")

    other = pushfw_cli(redis_server, "--prefix", "{acme}", "redis-functions", "show", cwd=tmp_path)
    assert 'local DEFAULT_STREAM = "{acme}:cmd"' in other.stdout
    proc = pushfw_cli(
        redis_server, "--prefix", "{acme}", "redis-functions", "install", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    seed = fcall(fr, "drop_insert", 0, "192.0.2.5")
    explicit = fcall(fr, "drop_insert", 1, "{acme}:cmd", "192.0.2.6")
    assert list(entries(fr, "{acme}:cmd")) == [seed, explicit]
    assert fr.exists(CMD) == 0
    stored = entries(fr, "{acme}:cmd")[seed]
    assert ipaddress.ip_address(stored["ip"]) == ipaddress.ip_address("192.0.2.5")


def test_cluster_form_routes_by_the_stream_key(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """On a 3-master Cluster: install loads every primary; numkeys 1 reaches the right node."""
    url = cast(str, request.getfixturevalue("cluster"))  # test_topologies' fixture
    env = clean_env()
    proc = subprocess.run(
        [sys.executable, "-m", "pushfw.producer", "--redis-url", url, "redis-functions",
         "install"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"loaded library {LIBRARY_NAME}: "), proc.stdout
    client = connect(url, decode_responses=True)
    try:
        ids = [
            client.fcall("drop_insert", 1, CMD, "192.0.2.1"),
            client.fcall("ttl_drop_insert", 1, CMD, "192.0.2.2", "60", "cluster"),
        ]
        stored = cast(list[Any], client.xrange(CMD))
        assert [eid for eid, _ in stored] == ids
        assert stored[1][1] == {
            "op": "ttl.drop.insert",
            "ip": "192.0.2.2",
            "ttl": "60",
            "reason": "cluster",
            "origin": "fcall",
        }
    finally:
        client.close()
