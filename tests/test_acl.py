"""Redis ACL users (``pushfw acl``) on a real redis-server of this module's own.

The users are made from what ``pushfw acl`` prints, run through ``ACL SETUSER`` as an
operator would pipe it into redis-cli. The producer may push and read back, nothing else;
a real worker process runs its whole loop (apply, results, ack, ledger fold, scheduler
expiry, heartbeat, trim) as the worker user, with signatures required, and Redis's
``ACL LOG`` proves nothing it tried was refused but ``CONFIG`` (not granted, on purpose).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pushfw.producer import Keys, Producer, functions
from pushfw.producer.acl import (
    PRODUCER_USER,
    WORKER_USER,
    acl_file_lines,
    producer_rules,
    worker_rules,
)
from pushfw.producer.connection import untyped
from pushfw.producer.lists import ListContent
from pushfw.producer.records import RuleRecord
from pushfw.worker.scheduler import Scheduler
from testbed.env import clean_env
from tests.conftest import REDIS_SERVER, RedisServer, need, run_pushfw, wait_for

ROOT = Path(__file__).resolve().parents[1]
ACL_CONF = ROOT / "integrations" / "redis" / "pushfw-acl.conf"
CMD = "{pushfw}:cmd"
PRODUCER_PW = "producer-secret-7f3a"
WORKER_PW = "worker-secret-91bc"
HMAC_KEY = "hmac-key-for-the-acl-test"


pushfw = run_pushfw  # the CLI, without PUSHFW_* settings from the outer world


def execute(client: redis.Redis, *args: Any) -> Any:
    """``execute_command``, typed (redis-py leaves it untyped)."""
    return untyped(client).execute_command(*args)


def url(server: RedisServer, user: str, password: str) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    """A redis-server with the users ``pushfw acl`` prints, and expiry events set by hand."""
    need(os.path.exists(REDIS_SERVER), "redis-server is not installed")
    with tempfile.TemporaryDirectory(prefix="pushfw-acl-") as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        printed = pushfw("acl", "--producer-password", PRODUCER_PW, "--worker-password", WORKER_PW)
        assert printed.returncode == 0, printed.stderr
        admin = redis.Redis(port=server.port)
        for line in printed.stdout.splitlines():
            execute(admin, *line.split())
        # CONFIG is not the worker's: the operator sets this in redis.conf
        admin.config_set("notify-keyspace-events", "Ex")
        admin.close()
        yield server
        server.stop()


@pytest.fixture
def admin(acl_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=acl_server.port)
    client.flushall()
    # FUNCTION LOAD is not the producer's: list contents are stored through list_store
    functions.install(client)
    client.acl_log_reset()
    yield client
    client.close()


@pytest.fixture
def as_producer(acl_server: RedisServer, admin: redis.Redis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(url(acl_server, PRODUCER_USER, PRODUCER_PW))
    yield client
    client.close()


def test_printed_rules_hide_the_passwords_and_match_the_shipped_file():
    printed = pushfw("acl", "--producer-password", PRODUCER_PW, "--worker-password", WORKER_PW)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert [line.split()[:3] for line in lines] == [
        ["ACL", "SETUSER", PRODUCER_USER],
        ["ACL", "SETUSER", WORKER_USER],
    ]
    assert PRODUCER_PW not in printed.stdout and WORKER_PW not in printed.stdout
    shipped = ACL_CONF.read_text().splitlines()
    placeholders = [line.split()[4] for line in shipped]
    assert all(p.startswith(">CHANGE-ME") for p in placeholders)
    assert shipped == acl_file_lines(*placeholders), "regenerate integrations/redis/pushfw-acl.conf"
    as_file = pushfw("acl", "--producer-password", "a", "--worker-password", "b", "--file")
    assert [line.split()[:2] for line in as_file.stdout.splitlines()] == [
        ["user", PRODUCER_USER],
        ["user", WORKER_USER],
    ]


def test_shipped_acl_file_loads_and_means_the_same_as_the_commands(acl_server, tmp_path):
    """The file works as ``aclfile`` and defines the very users the commands define."""
    aclfile = tmp_path / "users.acl"
    aclfile.write_text(
        ACL_CONF.read_text()
        .replace(">CHANGE-ME-producer-password", f">{PRODUCER_PW}")
        .replace(">CHANGE-ME-worker-password", f">{WORKER_PW}")
    )
    port = _spare_port()
    proc = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--save", "", "--aclfile", str(aclfile)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        from_file = redis.Redis(port=port, decode_responses=True)
        wait_for(lambda: _pings(from_file), 10, "redis-server with the ACL file")
        from_commands = redis.Redis(port=acl_server.port, decode_responses=True)
        for user in (PRODUCER_USER, WORKER_USER):
            assert _rules(from_file, user) == _rules(from_commands, user)
        from_commands.close()
        from_file.close()
    finally:
        proc.terminate()
        proc.wait(10)


def _rules(client: redis.Redis, user: str) -> dict[str, Any]:
    """ACL GETUSER with every list sorted (Redis lists commands in no fixed order)."""
    info: dict[str, Any] = untyped(client).acl_getuser(user)
    info["selectors"] = [_selector(s) for s in info.get("selectors", [])]
    return {k: sorted(map(str, v)) if isinstance(v, list) else v for k, v in info.items()}


def _selector(flat: list[str]) -> dict[str, str]:
    """One selector as a dict, its commands sorted."""
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    fields["commands"] = " ".join(sorted(fields["commands"].split()))
    return fields


def _spare_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


DENIED_TO_PRODUCER = [
    ("XACK", CMD, "host:h1", "1-0"),
    ("XGROUP", "CREATE", CMD, "evil", "$"),
    ("XREADGROUP", "GROUP", "ledger", "evil", "STREAMS", CMD, ">"),
    ("XTRIM", CMD, "MAXLEN", "0"),
    ("XRANGE", CMD, "-", "+"),
    ("DEL", CMD),
    ("CONFIG", "GET", "*"),
    ("CONFIG", "SET", "notify-keyspace-events", ""),
    ("FLUSHALL",),
    ("EVAL", "return 1", "0"),
    ("SCRIPT", "LOAD", "return 1"),
    ("FUNCTION", "LOAD", "#!lua name=x\nredis.register_function('f', function() end)"),
    ("HSET", "{pushfw}:rules", "drop 192.0.2.1/32", "{}"),
    ("HDEL", "{pushfw}:rules", "drop 192.0.2.1/32"),
    ("HSET", "{pushfw}:hosts", "h1", "{}"),
    ("ZADD", "{pushfw}:expiry", "1", "drop 192.0.2.1/32"),
    ("XADD", "{pushfw}:results", "*", "cmd", "1-0", "status", "applied"),
    ("XADD", "{pushfw}:dead", "*", "cmd", "1-0"),
    ("SET", "{pushfw}:ttl:drop 192.0.2.1/32", "1"),
    ("XADD", "other:cmd", "*", "op", "drop.insert", "ip", "192.0.2.1"),
    ("GET", "session:42"),
    ("SET", "session:42", "x"),
    ("KEYS", "*"),
    ("PSUBSCRIBE", "__keyevent@0__:expired"),
    ("ACL", "LIST"),
]


@pytest.mark.parametrize("command", DENIED_TO_PRODUCER, ids=lambda c: " ".join(c[:2]))
def test_producer_cannot(as_producer: redis.Redis, command: tuple[str, ...]):
    with pytest.raises(redis.exceptions.NoPermissionError):
        execute(as_producer, *command)


def test_producer_pushes_and_reads_back(acl_server, admin):
    producer = Producer.from_url(url(acl_server, PRODUCER_USER, PRODUCER_PW))
    cmd_id = producer.drop("192.0.2.1", ttl_s=60, reason="acl test")
    assert admin.xlen(CMD) == 1
    assert producer.wait(cmd_id, timeout_s=0.2) == []
    assert producer.results() == [] and producer.dead() == []
    assert producer.rules() == [] and producer.hosts() == []
    assert producer.lists() == []
    producer.load_list("feed", ListContent.of(["192.0.2.0/24"]))
    assert admin.xlen(CMD) == 2
    producer.client.close()
    for args in (["list"], ["lists"], ["status"], ["results"], ["dead"], ["drop", "192.0.2.2"]):
        proc = pushfw("--redis-url", url(acl_server, PRODUCER_USER, PRODUCER_PW), *args)
        assert proc.returncode == 0, (args, proc.stderr)
    assert admin.xlen(CMD) == 3
    assert _refused(admin, PRODUCER_USER) == []


def test_minimal_producer_can_only_push(acl_server, admin):
    printed = pushfw(
        "acl", "--producer-password", "m1n-pw", "--worker-password", "unused-pw", "--minimal"
    )
    producer_line = printed.stdout.splitlines()[0].split()
    execute(admin, *producer_line[:2], "pushfw-minimal", *producer_line[3:])
    client = redis.Redis.from_url(url(acl_server, "pushfw-minimal", "m1n-pw"))
    try:
        client.xadd(CMD, {"op": "drop.insert", "ip": "192.0.2.1"})
        for command in (("XREVRANGE", "{pushfw}:results", "+", "-"), ("TIME",)):
            with pytest.raises(redis.exceptions.NoPermissionError):
                execute(client, *command)
    finally:
        client.close()
        admin.acl_deluser("pushfw-minimal")


def _refused(admin: redis.Redis, user: str) -> list[str]:
    """What Redis refused this user since the log was reset (``ACL LOG``), as ``reason:object``."""
    entries: list[dict[str, Any]] = admin.acl_log(count=1000)
    out = []
    for entry in entries:
        text = {k: v.decode() if isinstance(v, bytes) else v for k, v in entry.items()}
        if text["username"] == user:
            out.append(f"{text['reason']}:{text['object']}")
    return out


class Worker:
    """``python -m pushfw.worker run`` as the worker user, memory backend, log captured."""

    def __init__(self, server: RedisServer, log: Path, follower: bool = False) -> None:
        env = clean_env(
            redis_url=url(server, WORKER_USER, WORKER_PW),
            state_dir=str(log.parent),
            backend="memory",
            host_name="acl-host",
            heartbeat_interval_s="0.3",
            trim_interval_s="0.5",
            reconcile_interval_s="2",
            hmac_key=HMAC_KEY,
            require_signature="true",
        )
        if follower:  # its "replica" is the primary itself: the same user reads it
            env["PUSHFW_READ_URL"] = url(server, WORKER_USER, WORKER_PW)
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pushfw.worker", "run"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(20)
        self.close()
        return code

    def close(self) -> None:
        if not self._log.closed:
            self._log.close()


@pytest.fixture
def acl_worker(acl_server, admin, tmp_path) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(follower: bool = False) -> Worker:
        worker = Worker(acl_server, tmp_path / f"worker{len(started)}.log", follower)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.alive():
            worker.proc.kill()
            worker.proc.wait(10)
        worker.close()


@pytest.mark.parametrize("mode", ["group", "follower"])
def test_worker_runs_its_whole_loop_as_the_worker_user(acl_server, admin, acl_worker, mode):
    worker = acl_worker(follower=mode == "follower")
    producer = Producer.from_url(url(acl_server, PRODUCER_USER, PRODUCER_PW), hmac_key=HMAC_KEY)
    wait_for(
        lambda: any(h.state == "running" for h in producer.hosts()) or not worker.alive(),
        20,
        "the worker to follow the stream",
    )
    assert worker.alive(), worker.log
    wait_for(
        lambda: int(execute(admin, "PUBSUB", "NUMPAT")) >= 1,
        10,
        "the scheduler to subscribe to key-expiry events",
    )

    ban = producer.drop("192.0.2.1", reason="permanent")
    timed = producer.drop("192.0.2.2", ttl_s=1, reason="one second")
    lifted = producer.drop("2001:db8::/32")
    for cmd_id in (ban, timed, lifted):
        [result] = producer.wait(cmd_id, timeout_s=15)
        assert (result.status.value, result.detail) == ("applied", "inserted"), result
    undo = producer.undrop("2001:db8::/32")
    assert producer.wait(undo, timeout_s=15)[0].detail == "deleted"
    # a named list: stored and sent by the producer user, folded and loaded by the worker user
    old = ListContent.of(["198.51.100.0/24"])
    for cmd_id, detail in (
        (producer.load_list("feed", old), "loaded 1 entry"),
        (producer.load_list("feed", ListContent.of(["198.51.100.0/24", "203.0.113.7"])), "1 added"),
        (producer.delete_list("feed"), "removed"),
    ):
        [result] = producer.wait(cmd_id, timeout_s=15)
        assert result.status.value == "applied" and result.detail.startswith(detail), result
    wait_for(lambda: admin.pttl(f"{{pushfw}}:list:feed:{old.version}") > 0, 10, "the fold's grace")

    def expired_by_the_scheduler() -> bool:
        """Its claim (Lua, as the worker user) took the rule off the queue and left a ttl
        tombstone, which a trim may already have forgotten: the stream and the ledger are
        trimmed every 0.5 s here, so the delete entry itself may be gone when looked for."""
        raw = admin.hget("{pushfw}:rules", "drop 192.0.2.2/32")
        record = RuleRecord.model_validate_json(raw) if raw is not None else None
        queued = admin.zscore("{pushfw}:expiry", "drop 192.0.2.2/32") is not None
        return not queued and (record is None or (record.deleted and record.origin == "ttl"))

    wait_for(expired_by_the_scheduler, 15, "the scheduler to expire the timed ban")
    wait_for(lambda: host_counts(producer) >= 8, 15, "the host to answer the scheduler's delete")
    assert [rec.network for rec in producer.rules()] == ["192.0.2.1/32"]

    [host] = producer.hosts()
    assert host.host == "acl-host" and host.backend == "memory"
    assert bool(host.position) is (mode == "follower")
    wait_for(lambda: host_pending(producer) == 0, 10, "every entry acknowledged")
    # retention forgets tombstones once every group is past them (the FORGET script)
    wait_for(lambda: admin.hlen("{pushfw}:rules") == 1, 15, "tombstones forgotten by the trim")
    seen = producer.hosts()[0].last_seen_ms
    wait_for(lambda: producer.hosts()[0].last_seen_ms > seen, 5, "a later heartbeat")

    assert worker.stop() == 0, worker.log
    log = worker.log
    assert "NOPERM" not in log
    assert [line for line in log.splitlines() if "no permissions" in line] == [
        line for line in log.splitlines() if "cannot enable key-expiry events" in line
    ], log
    assert len(re.findall("cannot enable key-expiry events", log)) == 1
    assert set(_refused(admin, WORKER_USER)) <= {"command:config|get"}, "only CONFIG"
    assert _refused(admin, PRODUCER_USER) == []
    producer.client.close()


def host_counts(producer: Producer) -> int:
    """Commands the host answered, by its heartbeat (the scheduler's deletes ask no result)."""
    hosts = producer.hosts()
    return sum(hosts[0].counts.values()) if hosts else 0


def host_pending(producer: Producer) -> int:
    hosts = producer.hosts()
    return hosts[0].pending if hosts else -1


def test_the_readme_recipe_pipes_into_redis_cli_and_can_be_rerun(acl_server, admin):
    """``pushfw acl ... | redis-cli``: redis-cli reads the lines as they are; rerunning the
    recipe (``reset`` first) leaves the same users."""
    need(shutil.which("redis-cli") is not None, "redis-cli is not installed")
    before = {u: admin.acl_getuser(u) for u in (PRODUCER_USER, WORKER_USER)}
    printed = pushfw("acl", "--producer-password", PRODUCER_PW, "--worker-password", WORKER_PW)
    piped = subprocess.run(
        ["redis-cli", "-p", str(acl_server.port)],
        input=printed.stdout,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert piped.stdout.split() == ["OK", "OK"], piped
    assert {u: admin.acl_getuser(u) for u in (PRODUCER_USER, WORKER_USER)} == before


def test_fcall_producer_calls_the_redis_functions(acl_server, admin):
    """``--fcall``: the seed's FCALL drop_insert works, cluster-correct form included."""
    functions.install(admin)
    printed = pushfw("acl", "--producer-password", "fc-pw", "--worker-password", "x", "--fcall")
    producer_line = printed.stdout.splitlines()[0].split()
    execute(admin, *producer_line[:2], "pushfw-fcall", *producer_line[3:])
    client = redis.Redis.from_url(url(acl_server, "pushfw-fcall", "fc-pw"))
    try:
        client.fcall("drop_insert", 1, CMD, "192.0.2.1")
        client.fcall("ttl_drop_insert", 0, "192.0.2.2", "60")
        assert admin.xlen(CMD) == 2
        with pytest.raises(redis.exceptions.NoPermissionError):
            execute(client, "FUNCTION", "DELETE", "pushfw")
    finally:
        client.close()
        admin.acl_deluser("pushfw-fcall")
        admin.function_delete("pushfw")


def test_scheduler_outlives_a_refused_key_event_channel(acl_server, admin):
    """``&__keyevent@*__:expired`` looks right but does not admit the PSUBSCRIBE: the
    scheduler says so once and keeps claiming expiries on its timer."""
    printed = pushfw("acl", "--producer-password", "x", "--worker-password", "wrong-chan-pw")
    worker_line = printed.stdout.splitlines()[1].split()
    rules = [
        "&__keyevent@*__:expired" if rule.startswith("&") else rule for rule in worker_line[3:]
    ]
    execute(admin, "ACL", "SETUSER", "pushfw-wrong-channel", *rules)
    client = redis.Redis.from_url(url(acl_server, "pushfw-wrong-channel", "wrong-chan-pw"))
    scheduler = Scheduler(client, Keys(), poll_s=0.1)
    try:
        record = RuleRecord(id="1-0", action="drop", network="192.0.2.1/32", expires_ms=1000)
        admin.hset(record_key := "{pushfw}:rules", record.rule_id, record.model_dump_json())
        admin.zadd("{pushfw}:expiry", {record.rule_id: 1000})
        scheduler.start()
        wait_for(lambda: scheduler.emitted == 1, 10, "the expiry claimed on the timer")
        wait_for(lambda: not scheduler.events, 10, "the refused subscription noticed")
        assert scheduler._thread is not None and scheduler._thread.is_alive()
        assert RuleRecord.model_validate_json(admin.hget(record_key, record.rule_id)).deleted
    finally:
        scheduler.close()
        admin.acl_deluser("pushfw-wrong-channel")


def test_rule_options():
    plain = " ".join(worker_rules())
    assert "+select" not in plain and "+client|setinfo" not in plain
    on_db3 = worker_rules(db=3, redis_version="7.2")
    assert {"+select", "+client|setinfo", "&__keyevent@3__:expired"} <= set(on_db3)
    assert "~tenant\\*\\[a\\]:*" in worker_rules("tenant*[a]"), "glob characters are literal"
    assert producer_rules(minimal=True) == [
        "resetchannels",
        "%W~{pushfw}:cmd",
        "-@all",
        "+xadd",
        "+ping",
        "+hello",
    ]
    for bad in ("", "a b", "it's"):
        with pytest.raises(ValueError, match="prefix"):
            worker_rules(bad)
    for args in (["--redis-version", "seven"], ["--producer-password", ""]):
        proc = pushfw("acl", "--producer-password", "p", "--worker-password", "w", *args)
        assert proc.returncode == 2 and proc.stderr.startswith("pushfw: "), proc.stderr
    proc = pushfw("acl", env={"PUSHFW_REDIS_URL": "nonsense://x"})
    assert proc.returncode == 2 and "--producer-password" in proc.stderr, "no Redis is touched"


def test_worker_user_of_another_database(acl_server, admin):
    """``--db 1``: the worker may SELECT it and subscribe to that database's expiry events."""
    printed = pushfw("acl", "--producer-password", "x", "--worker-password", "db1-pw", "--db", "1")
    worker_line = printed.stdout.splitlines()[1].split()
    execute(admin, *worker_line[:2], "pushfw-db1", *worker_line[3:])
    client = redis.Redis.from_url(
        f"redis://pushfw-db1:db1-pw@127.0.0.1:{acl_server.port}/1", decode_responses=True
    )
    scheduler = Scheduler(client, Keys(), poll_s=0.1)
    try:
        client.hset("{pushfw}:hosts", "h1", "{}")
        assert admin.hlen("{pushfw}:hosts") == 0, "it wrote to database 1"
        scheduler.start()
        wait_for(lambda: int(execute(admin, "PUBSUB", "NUMPAT")) >= 1, 10, "the subscription")
        assert scheduler.events
    finally:
        scheduler.close()
        admin.acl_deluser("pushfw-db1")
        db1 = redis.Redis(port=acl_server.port, db=1)
        db1.flushdb()
        db1.close()


# --- item 8: the producer user writes content only through pushfw -------------------------

CONTENT = ListContent.of(["192.0.2.0/24", "198.51.100.7"])
CONTENT_KEY = f"{{pushfw}}:list:feed:{CONTENT.version}"
OTHER_KEY = "{pushfw}:list:feed:" + "0" * 32

WRITES_ON_CONTENT = [
    ("SET", CONTENT_KEY, "x"),
    ("SET", CONTENT_KEY, CONTENT.to_bytes(), "PX", "1"),
    ("SET", OTHER_KEY, "x"),
    ("XADD", OTHER_KEY, "*", "op", "drop.insert"),
    ("HSET", OTHER_KEY, "a", "b"),
    ("PEXPIRE", CONTENT_KEY, "1"),
    ("EXPIRE", CONTENT_KEY, "1"),
    ("PEXPIREAT", CONTENT_KEY, "1"),
    ("DEL", CONTENT_KEY),
    ("UNLINK", CONTENT_KEY),
    ("APPEND", CONTENT_KEY, "x"),
    ("SETRANGE", CONTENT_KEY, "0", "x"),
    ("GETDEL", CONTENT_KEY),
    ("GETEX", CONTENT_KEY, "PX", "1"),
    ("RENAME", CONTENT_KEY, OTHER_KEY),
    ("RESTORE", OTHER_KEY, "0", "x"),
]


@pytest.mark.parametrize("command", WRITES_ON_CONTENT, ids=lambda c: " ".join(map(str, c[:1])))
def test_item8_the_producer_has_no_direct_write_on_list_content(
    admin: redis.Redis, as_producer: redis.Redis, command: tuple[Any, ...]
):
    admin.set(CONTENT_KEY, CONTENT.to_bytes())
    with pytest.raises(redis.exceptions.NoPermissionError):
        execute(as_producer, *command)
    assert admin.get(CONTENT_KEY) == CONTENT.to_bytes() and admin.pttl(CONTENT_KEY) == -1
    assert admin.exists(OTHER_KEY) == 0


def test_item8_list_store_writes_a_string_once_with_no_expiry_and_no_type_change(
    admin: redis.Redis, as_producer: redis.Redis
):
    blob = CONTENT.to_bytes()
    assert execute(as_producer, "FCALL", "list_store", "1", CONTENT_KEY, blob) == 1
    assert execute(as_producer, "FCALL", "list_store", "1", CONTENT_KEY, blob) == 0, "again"
    with pytest.raises(redis.ResponseError, match="already holds other content"):
        execute(as_producer, "FCALL", "list_store", "1", CONTENT_KEY, b"other bytes")
    assert admin.get(CONTENT_KEY) == blob and admin.pttl(CONTENT_KEY) == -1

    admin.pexpire(CONTENT_KEY, 60_000)  # the ledger's grace on a replaced version
    assert execute(as_producer, "FCALL", "list_store", "1", CONTENT_KEY, blob) == 0
    assert admin.pttl(CONTENT_KEY) == -1, "imported again: kept for its command"

    admin.xadd(OTHER_KEY, {"planted": "by an admin"})
    with pytest.raises(redis.ResponseError, match="already holds a stream"):
        execute(as_producer, "FCALL", "list_store", "1", OTHER_KEY, blob)
    assert admin.type(OTHER_KEY) == b"stream"
    for key in ("{pushfw}:cmd", "{pushfw}:list:feed:nothex", "{pushfw}:rules"):
        with pytest.raises(redis.ResponseError):
            execute(as_producer, "FCALL", "list_store", "1", key, blob)
    assert admin.exists("{pushfw}:cmd", "{pushfw}:rules") == 0
    planted = "{pushfw}:list:feed:cmd"  # a seed function's XADD, aimed at a content key
    with pytest.raises(redis.ResponseError, match="can't access"):
        execute(as_producer, "FCALL", "drop_insert", "1", planted, "192.0.2.1")
    assert admin.exists(planted) == 0
    assert set(_refused(admin, PRODUCER_USER)) <= {
        "key:{pushfw}:cmd",
        "key:{pushfw}:rules",
        f"key:{planted}",
    }


def test_item8_pushfw_import_as_the_producer_user_reaches_a_worker(
    acl_server, admin, acl_worker, tmp_path
):
    worker = acl_worker()
    as_producer = url(acl_server, PRODUCER_USER, PRODUCER_PW)
    producer = Producer.from_url(as_producer)
    wait_for(
        lambda: any(h.state == "running" for h in producer.hosts()) or not worker.alive(),
        20,
        "the worker to follow the stream",
    )
    assert worker.alive(), worker.log
    feed = tmp_path / "feed.netset"
    feed.write_text("192.0.2.0/24\n198.51.100.7\n")
    env = {"PUSHFW_HMAC_KEY": HMAC_KEY}  # the worker requires signatures

    def held() -> tuple[str, int] | None:
        [host] = producer.hosts()
        found = host.lists.get("feed")
        return None if found is None else (found.version, found.entries)

    def imported() -> None:
        sent = pushfw("--redis-url", as_producer, "import", str(feed), env=env)
        assert sent.returncode == 0, sent.stderr
        [record] = producer.lists()
        wait_for(lambda: held() == (record.version, 2), 15, "the host to hold the list")
        key = f"{{pushfw}}:list:feed:{record.version}"
        assert admin.type(key) == b"string" and admin.pttl(key) == -1

    imported()
    imported()  # the same version again: list_store finds the same bytes there

    admin.function_delete("pushfw")  # a Redis whose administrator has not loaded it
    try:
        missing = pushfw("--redis-url", as_producer, "import", str(feed), env=env)
        assert missing.returncode == 1
        assert "run `pushfw redis-functions install` as an administrator" in missing.stderr
    finally:
        functions.install(admin)
    assert _refused(admin, PRODUCER_USER) == ["command:function|load"]
    assert worker.stop() == 0, worker.log
    assert "NOPERM" not in worker.log
    producer.client.close()
