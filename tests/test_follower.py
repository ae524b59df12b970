"""Followers (``read_url``): a host reads the command stream on a replica after a position
it keeps, and writes to the primary only its heartbeat, results, dead letters and its share
of the ledger's fold. Real primary and replica redis-servers, in-process workers on the
memory backend; ``tests/test_chaos.py`` kills a follower process with SIGKILL too.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from pushfw.producer import Producer
from pushfw.producer.connection import redis_ms
from pushfw.producer.entry_ids import entry_order
from pushfw.worker.backends.memory import MemoryBackend
from pushfw.worker.daemon import Worker
from pushfw.worker.follower import SavedPosition
from pushfw.worker.ledger import Ledger
from pushfw.worker.retention import trim, trim_point
from pushfw.worker.settings import WorkerSettings
from testbed.redis_server import free_port
from tests.conftest import RedisServer, memory_worker, pushfw_cli, synced, wait_for
from tests.daemon import cli, worker_env
from tests.test_applier import key
from tests.test_supervision import running

CMD = "{pushfw}:cmd"


class Killed(BaseException):
    """Stands for SIGKILL: nothing of the worker runs after it (no ``finally`` cleanup
    either: the test drops the worker object where it stands)."""


def follower(
    redis_server: RedisServer,
    replica: RedisServer,
    state_dir: Path,
    backend: MemoryBackend | None = None,
    host: str = "f1",
    **overrides: Any,
) -> Worker:
    return memory_worker(
        redis_server,
        host=host,
        backend=backend,
        read_url=replica.url,
        state_dir=str(state_dir),
        **overrides,
    )


def commandstats(client: redis.Redis) -> dict[str, int]:
    raw: Any = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in raw.items()}


def groups(client: redis.Redis) -> set[str]:
    return {g["name"].decode() for g in client.xinfo_groups(CMD)}


def in_sync(replica: RedisServer) -> bool:
    """Whether this replica's link to its primary is up (``WAIT`` counts any replica)."""
    client = redis.Redis.from_url(replica.url)
    try:
        return bool(client.info("replication").get("master_link_status") == "up")
    finally:
        client.close()


def running_hosts(producer: Producer) -> list[str]:
    return [h.host for h in producer.hosts() if h.state == "running"]


def beat(producer: Producer, host: str) -> Any:
    return {h.host: h for h in producer.hosts()}[host]


def test_a_follower_reads_on_the_replica_and_answers_on_the_primary(
    r: Any, redis_server: RedisServer, replica_server: RedisServer, producer: Producer, tmp_path
):
    worker = follower(redis_server, replica_server, tmp_path)
    worker.setup()
    r.config_resetstat()
    replica = redis.Redis.from_url(replica_server.url)
    replica.config_resetstat()
    quiet = [producer.drop(f"192.0.2.{i}", reply=False) for i in range(1, 6)]
    asked = r.xadd(CMD, {"op": "drop.insert", "ip": "192.0.2.7", "reply": "yes"}).decode()
    bad = r.xadd(CMD, {"op": "drop.insert", "ip": "192.0.2.300"}).decode()
    lifted = producer.undrop("192.0.2.1", reply=False)
    synced(r)
    worker.run(burst=True)

    assert set(worker.backend.committed()) == {key("drop", f"192.0.2.{i}") for i in (2, 3, 4, 5, 7)}
    results = {f[b"cmd"].decode(): f[b"status"].decode() for _, f in r.xrange("{pushfw}:results")}
    assert results == {asked: "applied", bad: "rejected"}
    assert groups(r) == {"ledger"}, "a follower has no consumer group on the primary"
    on_primary, on_replica = commandstats(r), commandstats(replica)
    assert "xread" not in on_primary and on_replica.get("xread", 0) >= 1
    status = beat(producer, "f1")
    assert status.position == lifted and status.pending == 0 and status.lag == 0
    assert status.counts == {"applied": 7, "rejected": 1}
    saved = json.loads((tmp_path / "f1.position").read_text())
    assert saved["position"] == lifted
    assert producer.progress(quiet[0])["f1"] == "done"
    shown = pushfw_cli(redis_server, "results", "--cmd", quiet[0], "--json")
    assert shown.returncode == 0, shown.stderr
    assert {"host": "f1", "status": "done"}.items() <= json.loads(shown.stdout)[0].items()
    replica.close()


def _inject_kills(worker: Worker, rng: random.Random, calls_left: list[int]) -> None:
    """Make a random one of the follower's steps (before or after the real call) a kill.

    The wrappers are attributes of the instances; the kernel outlives the worker, so
    the caller takes its wrapper off (``del kernel.commit``) before the next worker."""
    stream: Any = worker.stream
    targets: list[tuple[Any, str]] = [
        (stream, "read"),
        (stream, "finish"),
        (stream.file, "write"),
        (worker.backend, "commit"),
        (worker.ledger, "fold"),
    ]

    def wrap(owner: Any, name: str) -> None:
        real: Callable[..., Any] = getattr(owner, name)

        def step(*args: Any, **kwargs: Any) -> Any:
            calls_left[0] -= 1
            if calls_left[0] == 0 and rng.random() < 0.5:
                raise Killed(f"before {name}")
            out = real(*args, **kwargs)
            if calls_left[0] <= 0:
                raise Killed(f"after {name}")
            return out

        setattr(owner, name, step)

    for owner, name in targets:
        wrap(owner, name)


def test_a_follower_killed_at_random_steps_ends_where_the_stream_says(
    r: Any, redis_server: RedisServer, replica_server: RedisServer
):
    """Up to 25 kills at random steps (read, commit, results, position file, fold) while
    600 inserts and deletes arrive; the kernel must then hold what the stream says, and
    every command must have its result (each asks for one): a start reconciles the kernel
    from the ledger, so only the results show that no entry was skipped."""
    rng = random.Random(20261201)
    pool = [f"198.51.100.{i}" for i in range(1, 41)]
    state = Path(tempfile.mkdtemp(prefix="follower-", dir=redis_server.workdir))
    kernel = MemoryBackend()
    expected: dict[str, bool] = {}
    kills = 0
    sent: list[str] = []
    for _ in range(25):
        pipe = r.pipeline(transaction=False)
        for _ in range(24):
            address, insert = rng.choice(pool), rng.random() < 0.6
            op = f"drop.{'insert' if insert else 'delete'}"
            pipe.xadd(CMD, {"op": op, "ip": address, "reply": "1"})
            expected[address] = insert
        sent += (eid.decode() for eid in pipe.execute())
        synced(r)
        worker = follower(redis_server, replica_server, state, kernel, batch_size=7)
        _inject_kills(worker, rng, [rng.randint(1, 30)])
        try:
            worker.setup()
            for _ in range(200):
                worker.iteration()
        except Killed:
            kills += 1
        worker.request_stop()
        del kernel.commit
    survivor = follower(redis_server, replica_server, state, kernel)
    survivor.run(burst=True)
    want = {key("drop", a) for a, present in expected.items() if present}
    assert kills >= 15, f"only {kills} kills: the test did not try hard"
    assert set(kernel.committed()) == want
    assert r.xlen("{pushfw}:dead") == 0
    answered = {f[b"cmd"].decode() for _, f in r.xrange("{pushfw}:results")}
    assert not set(sent[24:]) - answered, "commands read by a follower and never answered"


def test_a_refused_command_is_retried_and_dead_lettered_while_the_rest_goes_on(
    r: Any, redis_server: RedisServer, replica_server: RedisServer, producer: Producer, tmp_path
):
    worker = follower(
        redis_server, replica_server, tmp_path, memory_fail="203.0.113.9", max_deliveries=3
    )
    worker.setup()
    refused = producer.drop("203.0.113.9", reply=False)
    after = producer.drop("192.0.2.10", reply=False)
    synced(r)
    worker.run(burst=True)
    assert set(worker.backend.committed()) == {key("drop", "192.0.2.10")}
    [(_, dead)] = r.xrange("{pushfw}:dead")
    assert (dead[b"cmd"].decode(), dead[b"deliveries"]) == (refused, b"3")
    assert beat(producer, "f1").position == after
    assert producer.progress(refused)["f1"] == "done"


def test_trimming_keeps_what_a_live_follower_needs(
    r: Any, redis_server: RedisServer, replica_server: RedisServer, producer: Producer, tmp_path
):
    worker = follower(redis_server, replica_server, tmp_path)
    worker.setup()
    first = producer.drop("192.0.2.1", reply=False)
    synced(r)
    worker.iteration()  # applied and folded: the ledger group needs nothing before it now
    for i in range(2, 6):
        producer.drop(f"192.0.2.{i}", reply=False)
    worker.heartbeat()
    ledger = Ledger(r, worker.stream.keys, "trimmer")
    ledger.fold_new()
    now_ms = worker.applier.clock.now_ms()
    ms, seq = first.split("-")
    assert trim_point(r, worker.stream.keys, now_ms, 60) == f"{ms}-{int(seq) + 1}"


def test_a_follower_whose_position_was_trimmed_past_starts_from_the_ledger(
    r: Any,
    redis_server: RedisServer,
    replica_server: RedisServer,
    producer: Producer,
    tmp_path,
    caplog,
):
    kernel = MemoryBackend()
    worker = follower(redis_server, replica_server, tmp_path, kernel)
    producer.drop("192.0.2.1", reply=False)
    producer.drop("192.0.2.2", reply=False)
    synced(r)
    worker.run(burst=True)
    producer.undrop("192.0.2.1", reply=False)  # while it is away
    for i in range(3, 300):
        producer.drop(f"10.0.{i // 250}.{i % 250 + 1}", ttl_s=3600, reply=False)
    ledger = Ledger(r, worker.stream.keys, "trimmer")
    while ledger.fold_new():
        pass
    far_future = worker.applier.clock.now_ms() + 3_600_000  # the follower looks silent by then
    assert trim(ledger, far_future, host_expiry_s=60) > 0
    synced(r)
    with caplog.at_level(logging.WARNING):
        back = follower(redis_server, replica_server, tmp_path, kernel)
        back.run(burst=True)
    assert "follower position" in caplog.text and "trimmed" in caplog.text
    want = {key("drop", f"10.0.{i // 250}.{i % 250 + 1}") for i in range(3, 300)}
    want.add(key("drop", "192.0.2.2"))
    assert set(kernel.committed()) == want


def test_a_follower_starts_again_when_the_stream_no_longer_reaches_its_position(
    r: Any, redis_server: RedisServer, replica_server: RedisServer, producer: Producer, tmp_path
):
    """Redis lost its data: the new stream's ids are behind what the follower read (here a
    producer-chosen id ahead of the clock), so reading after its position would skip every
    new command."""
    worker = follower(redis_server, replica_server, tmp_path)
    worker.setup()
    r.xadd(CMD, {"op": "drop.insert", "ip": "192.0.2.1"}, id="1999999999999-0")
    synced(r)
    worker.iteration()
    assert worker.stream.last_delivered() == "1999999999999-0"
    r.flushall()
    producer.drop("192.0.2.2", reply=False)
    synced(r)
    worker.run(burst=True)
    assert key("drop", "192.0.2.2") in set(worker.backend.committed())


def test_a_read_url_that_is_no_replica_of_the_primary_is_read_around_and_named(
    r: Any,
    redis_server: RedisServer,
    aof_redis: RedisServer,
    producer: Producer,
    tmp_path,
    monkeypatch,
):
    """Following an unrelated Redis would apply nothing, silently: the host reads on the
    primary, and its heartbeat says the replica holds another ledger."""
    monkeypatch.setattr("pushfw.worker.follower._REPLICA_WAIT_S", 0.2)
    worker = follower(redis_server, aof_redis, tmp_path)
    worker.setup()
    producer.drop("192.0.2.1", reply=False)
    worker.run(burst=True)
    assert key("drop", "192.0.2.1") in set(worker.backend.committed())
    status = beat(producer, "f1")
    assert status.reads == "primary"
    assert [p for p in status.problems if "holds ledger generation none, the primary " in p]


@pytest.mark.parametrize(
    "position",
    [
        '{"position": "1-0", "added": "many"}',  # valid JSON, a field of the wrong type
        '{"position": 1700000000000}',
        '{"position": "1-0", "read": "yesterday", "tries": {"1-0": -1}}',
        '["1-0"]',
        '{"position": "1-0", "tries"',  # cut short by a full disk
    ],
)
def test_state_files_that_are_not_pushfws_are_warned_about_and_ignored(
    r: Any,
    redis_server: RedisServer,
    replica_server: RedisServer,
    producer: Producer,
    tmp_path: Path,
    position: str,
):
    """The real worker, with a position file and a generation file it cannot use: one
    warning each, a start from the ledger, and the files it writes then are sound."""
    config = tmp_path / "worker.toml"
    config.write_text("")
    env = worker_env(config, host_name="f9", backend="memory", redis_url=redis_server.url) | {
        "PUSHFW_READ_URL": replica_server.url
    }
    state = tmp_path / "state"
    state.mkdir()
    (state / "f9.position").write_text(position)
    (state / "f9.generation").write_bytes(b"\xff\xfe not a marker")
    producer.drop("192.0.2.1", reply=False)  # in the ledger before the host starts
    synced(r)

    first = cli("run", "--burst", env=env)
    assert first.returncode == 0, first.stderr
    warnings = [json.loads(line) for line in first.stderr.splitlines()]
    ignored = [w["message"] for w in warnings if w["message"].startswith("ignoring the ")]
    assert len(ignored) == 2, first.stderr
    assert f"ignoring the follower position in {state / 'f9.position'}: " in ignored[0]
    assert f"ignoring the ledger generation in {state / 'f9.generation'}: " in ignored[1]
    assert (
        "following {pushfw}:cmd as follower:f9 via " in first.stderr
        and ": 1 rule (" in first.stderr
    )
    saved = SavedPosition.model_validate_json((state / "f9.position").read_bytes())

    later = producer.drop("192.0.2.2")  # read after the position the first run saved
    synced(r)
    second = cli("run", "--burst", env=env)
    assert second.returncode == 0, second.stderr
    assert "ignoring" not in second.stderr
    assert [res.status for res in producer.wait(later)] == ["applied"]
    assert beat(producer, "f9").position == later != saved.position


def test_read_url_names_one_server():
    with pytest.raises(ValueError, match="one replica"):
        WorkerSettings(read_url="redis+sentinel://s1:26379/mymaster")


def test_a_follower_reads_on_the_primary_while_its_replica_is_dead_frozen_or_stale(
    r: Any, redis_server: RedisServer, producer: Producer, tmp_path, monkeypatch
):
    """The replica is killed (SIGKILL), then frozen (SIGSTOP), then cut from the primary
    (it serves stale data). Meanwhile the host goes on carrying out commands, read on the
    primary, and its heartbeat says why; once the replica is back it reads there again."""
    monkeypatch.setattr("pushfw.worker.follower._PROBE_EVERY_S", 0.3)
    monkeypatch.setattr("pushfw.worker.follower._STALE_AFTER_S", 0.5)
    replica = RedisServer(tmp_path / "replica", replica_of=redis_server.port)
    replica.workdir.mkdir()
    replica.start()
    wait_for(lambda: in_sync(replica), 20, "the replica to sync")
    worker = follower(redis_server, replica, tmp_path, heartbeat_interval_s=0.05)

    def state() -> tuple[str, list[str]]:
        status = {h.host: h for h in producer.hosts()}.get("f1")
        return (status.state, status.problems) if status else ("", [])

    def done(address: str) -> bool:
        drop = producer.drop(address, reply=False)
        wait_for(lambda: producer.progress(drop)["f1"] == "done", 30, f"{address} done")
        return key("drop", address) in set(worker.backend.committed())

    def reads(server: RedisServer) -> int:
        client = redis.Redis.from_url(server.url)
        try:
            return commandstats(client).get("xread", 0)
        finally:
            client.close()

    def reads_on_the_replica_again() -> None:
        wait_for(lambda: state() == ("running", []), 30, "the heartbeat to say all is well")
        assert beat(producer, "f1").reads == "replica"
        before = reads(replica)
        assert done("192.0.2.9") and reads(replica) > before
        lifted = producer.undrop("192.0.2.9", reply=False)
        wait_for(lambda: producer.progress(lifted)["f1"] == "done", 30, "the undrop done")

    try:
        with running(worker):
            wait_for(lambda: state() == ("running", []), 20, "the follower to run")
            assert done("192.0.2.1")
            replica.stop(hard=True)
            assert done("192.0.2.2"), "a dead replica stopped the host"
            status, problems = state()
            assert status == "running"
            assert [p for p in problems if f"replica redis://127.0.0.1:{replica.port}" in p]
            assert "reading on the primary" in problems[0]
            shown = pushfw_cli(redis_server, "status")
            assert shown.returncode == 0 and "DEGRADED" in shown.stdout, shown.stderr
            assert beat(producer, "f1").reads == "primary"
            gauge = worker.metrics.registry.get_sample_value
            assert gauge("pushfw_reads_from", {"source": "primary"}) == 1
            assert gauge("pushfw_reads_from", {"source": "replica"}) == 0
            header, row = shown.stdout.splitlines()[:2]
            assert row[header.index("READS") :].split()[0] == "primary"
            replica.start()
            reads_on_the_replica_again()

            assert replica.proc is not None
            replica.proc.send_signal(signal.SIGSTOP)
            try:
                assert done("192.0.2.3"), "a frozen replica stopped the host"
                assert [p for p in state()[1] if "reading on the primary" in p]
            finally:
                replica.proc.send_signal(signal.SIGCONT)
            reads_on_the_replica_again()

            cut = redis.Redis.from_url(replica.url)
            try:
                cut.replicaof("127.0.0.1", str(free_port()))  # nothing listens there
                assert done("192.0.2.4"), "a stale replica stopped the host"
                assert [p for p in state()[1] if "behind the primary" in p]
                cut.replicaof("127.0.0.1", str(redis_server.port))
            finally:
                cut.close()
            reads_on_the_replica_again()
    finally:
        replica.stop()
    assert {key("drop", f"192.0.2.{i}") for i in (1, 2, 3, 4)} == set(worker.backend.committed())


def test_a_replica_whose_acl_refuses_the_worker_is_named_and_read_around(
    r: Any, redis_server: RedisServer, producer: Producer, tmp_path, monkeypatch
):
    """ACLs are not replicated: a replica set up without the worker's user, or with fewer
    commands for it, must not leave the host applying nothing."""
    monkeypatch.setattr("pushfw.worker.follower._PROBE_EVERY_S", 0.3)
    replica = RedisServer(tmp_path / "replica", replica_of=redis_server.port)
    replica.workdir.mkdir()
    replica.start()
    user = "pushfw-follower-acl"
    rules = ["reset", "on", ">pw", "~*", "&*", "+@all"]
    r.execute_command("ACL", "SETUSER", user, *rules)
    admin: Any = redis.Redis.from_url(replica.url)
    try:
        wait_for(lambda: in_sync(replica), 20, "the replica to sync")
        url = f"redis://{user}:pw@127.0.0.1:{{}}/0"
        settings = WorkerSettings(
            redis_url=url.format(redis_server.port),
            read_url=url.format(replica.port),
            host_name="f1",
            backend="memory",
            block_ms=50,
            state_dir=str(tmp_path),
        )
        worker = Worker(settings, backend=MemoryBackend())
        worker.setup()  # the replica knows no such user
        producer.drop("192.0.2.1", reply=False)
        worker.run(burst=True)
        assert key("drop", "192.0.2.1") in set(worker.backend.committed())
        [problem] = [p for p in worker.heart.problems() if p.startswith("replica ")]
        assert "reading on the primary" in problem and "***" in problem, problem

        admin.execute_command("ACL", "SETUSER", user, *rules, "-xread")  # a narrower ACL
        stream: Any = worker.stream
        stream._probe_at = 0.0  # ask the replica again now
        producer.drop("192.0.2.2", reply=False)
        worker.run(burst=True)
        assert key("drop", "192.0.2.2") in set(worker.backend.committed())
        [problem] = [p for p in worker.heart.problems() if p.startswith("replica ")]
        assert "xread" in problem.lower(), problem
    finally:
        r.execute_command("ACL", "DELUSER", user)
        admin.close()
        replica.stop()


def test_an_entry_only_the_replica_holds_is_never_applied_and_read_around(
    r: Any, redis_server: RedisServer, producer: Producer, tmp_path, monkeypatch, caplog
):
    """ACLs are not replicated: whoever may write on a replica that accepts writes adds
    entries the primary never generated. The host applies none of them, reads on the
    primary and says why, without setting up again; it reads the replica again once the
    replica has been resynced from the primary."""
    monkeypatch.setattr("pushfw.worker.follower._PROBE_EVERY_S", 0.05)
    delay = r.config_get("repl-diskless-sync-delay")["repl-diskless-sync-delay"]
    r.config_set("repl-diskless-sync-delay", 0)  # the syncs below, at once
    replica = RedisServer(tmp_path / "replica", replica_of=redis_server.port)
    replica.workdir.mkdir()
    replica.start()
    writer: Any = redis.Redis.from_url(replica.url)
    worker = follower(redis_server, replica, tmp_path, heartbeat_interval_s=0.05)

    def done(address: str) -> bool:
        drop = producer.drop(address, reply=False)
        wait_for(lambda: producer.progress(drop)["f1"] == "done", 30, f"{address} done")
        return key("drop", address) in set(worker.backend.committed())

    def problems() -> list[str]:
        return [p for p in beat(producer, "f1").problems if p.startswith("replica ")]

    def probes() -> int:
        return commandstats(writer).get("xinfo|stream", 0)

    try:
        wait_for(lambda: in_sync(replica), 20, "the replica to sync")
        with caplog.at_level(logging.INFO, logger="pushfw"), running(worker):
            wait_for(lambda: running_hosts(producer) == ["f1"], 20, "the follower to run")
            assert done("192.0.2.1") and beat(producer, "f1").reads == "replica"
            writer.config_set("replica-read-only", "no")
            forged = [
                writer.xadd(CMD, {"op": "drop.insert", "ip": "192.0.2.66", "reply": "yes"}),
                writer.xadd(CMD, {"op": "drop.insert", "ip": "192.0.2.300"}),  # rejected
            ]
            wait_for(problems, 20, "the heartbeat to name the replica")
            [problem] = problems()
            assert "entries the primary never generated" in problem, problem
            assert "reading on the primary" in problem
            shown = pushfw_cli(redis_server, "status")
            assert shown.returncode == 0 and "DEGRADED" in shown.stdout, shown.stderr
            assert beat(producer, "f1").reads == "primary"
            assert done("192.0.2.2"), "the host stopped carrying out the primary's commands"
            asked = probes()
            wait_for(lambda: probes() >= asked + 10, 30, "ten probes of the replica")
            assert done("192.0.2.3") and problems(), "an inconsistent replica was read again"

            writer.config_set("replica-read-only", "yes")  # as docs/operating.md says
            writer.replicaof("no", "one")  # then again: a full resync drops what it held
            writer.replicaof("127.0.0.1", str(redis_server.port))
            wait_for(lambda: in_sync(replica), 20, "the replica to resync")
            wait_for(lambda: not problems(), 30, "the heartbeat to say the replica is back")
            assert beat(producer, "f1").reads == "replica"
            before = commandstats(writer).get("xread", 0)
            assert done("192.0.2.4") and commandstats(writer).get("xread", 0) > before

        assert set(worker.backend.committed()) == {key("drop", f"192.0.2.{i}") for i in range(1, 5)}
        answered = {f[b"cmd"] for _, f in r.xrange("{pushfw}:results")}
        assert not answered & set(forged), "a forged entry was answered"
        assert not r.xrange(CMD, forged[0], forged[0]), "the primary holds no forged entry"
        messages = [rec.getMessage() for rec in caplog.records]
        assert sum(m.startswith("ready: ") for m in messages) == 1, "set up again"
        assert sum(m.startswith("reconcile") for m in messages) == 1, "reconciled again"
        assert not [m for m in messages if "is lost" in m]
        assert sum("cannot be read" in m for m in messages) == 1
    finally:
        r.config_set("repl-diskless-sync-delay", delay)
        writer.close()
        replica.stop()


def test_a_replica_written_to_while_the_follower_was_away_is_not_read_at_start(
    r: Any, redis_server: RedisServer, producer: Producer, tmp_path, monkeypatch
):
    """The primary generated a newer entry after the forged one, so the forged entry's id
    alone does not give it away; the replica's count of entries ever added does. A follower
    that starts reads on the primary, even one entry per batch."""
    monkeypatch.setattr("pushfw.worker.follower._REPLICA_WAIT_S", 0.2)
    replica = RedisServer(tmp_path / "replica", replica_of=redis_server.port)
    replica.workdir.mkdir()
    replica.start()
    writer: Any = redis.Redis.from_url(replica.url)
    try:
        wait_for(lambda: in_sync(replica), 20, "the replica to sync")
        kernel = MemoryBackend()  # what the second worker finds, as after a restart
        first = follower(redis_server, replica, tmp_path, kernel, batch_size=1)
        first.setup()
        producer.drop("192.0.2.1", reply=False)
        synced(r)
        first.run(burst=True)
        writer.config_set("replica-read-only", "no")
        forged = writer.xadd(CMD, {"op": "drop.insert", "ip": "192.0.2.66"}).decode()
        forged_ms = int(forged.partition("-")[0])
        wait_for(lambda: redis_ms(r) > forged_ms, 5, "Redis's clock to pass the forgery")
        later = producer.drop("192.0.2.2", reply=False)
        synced(r)
        assert writer.xlen(CMD) == 3, "the primary's entry reached the replica after it"
        assert entry_order(forged) < entry_order(later)

        again = follower(redis_server, replica, tmp_path, kernel, batch_size=1)
        again.setup()
        again.run(burst=True)
        assert set(again.backend.committed()) == {key("drop", f"192.0.2.{i}") for i in (1, 2)}
        [problem] = [p for p in again.heart.problems() if p.startswith("replica ")]
        assert "it holds entries the primary never generated (3 ever added" in problem, problem
        assert beat(producer, "f1").reads == "primary"
    finally:
        writer.close()
        replica.stop()
