"""I1/I3 under faults: a result never claims more than the kernel holds.

Real redis-server, real kernel tables in namespaces, real worker processes; the faults are
real too (another process holding the xtables lock: a private one, bind-mounted over
/run/xtables.lock in the worker's own mount namespace, so the machine's lock is never held).
"""

from __future__ import annotations

import fcntl
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from pushfw.producer import Producer
from pushfw.producer.connection import redis_ms
from testbed.kernel import Firewall, chain_rules
from tests.conftest import Netns, RedisServer, WorkerProcess, memory_worker, pushfw_cli, wait_for
from tests.test_applier import key, results_by_cmd

CMD = "{pushfw}:cmd"
DEAD = "{pushfw}:dead"


def push_timed(producer: Producer, first: int) -> dict[str, int]:
    """20 drops with a 2 or 3 s ttl, applied; network -> expiry ms (Redis's clock)."""
    ids = {
        f"192.0.2.{first + i}/32": producer.drop(f"192.0.2.{first + i}", ttl_s=2 + i % 2)
        for i in range(20)
    }
    assert [x.status.value for x in producer.wait(list(ids.values())[-1])] == ["applied"]
    return {
        net: int(cmd.split("-")[0]) + (2 + i % 2) * 1000 for i, (net, cmd) in enumerate(ids.items())
    }


def watch_leave(fw: Firewall, expires: dict[str, int], timeout_s: float = 15) -> dict[str, float]:
    """Poll the kernel until every rule left; network -> when it was first seen gone (ms)."""
    gone_at: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(gone_at) < len(expires) and time.monotonic() < deadline:
        present = {net for _, net in fw.rules()}
        now_ms = time.time() * 1000
        for net in expires.keys() - present - gone_at.keys():
            gone_at[net] = now_ms
        time.sleep(0.05)
    return gone_at


def test_i3_ordered_two_commands_for_one_rule_in_one_batch_meant_for_other_hosts(
    r: Any, redis_server: RedisServer, producer: Producer
):
    """The newest command for a rule names other hosts: this host's rule goes, in one batch."""
    worker = memory_worker(redis_server)
    worker.setup()
    producer.drop("192.0.2.60")
    worker.run(burst=True)
    assert set(worker.backend.committed()) == {key("drop", "192.0.2.60")}
    pipe = r.pipeline(transaction=False)
    pipe.xadd(CMD, {"op": "drop.insert", "ip": "192.0.2.60", "target": "h2"})
    pipe.xadd(CMD, {"op": "drop.delete", "ip": "192.0.2.60", "target": "h2"})
    pipe.execute()
    worker.run(burst=True)
    assert dict(worker.backend.committed().pairs()) == {}, (
        "the rule stayed on a host it should have left"
    )
    worker.reconcile()
    assert dict(worker.backend.committed().pairs()) == {}, "the stream and the ledger agree"


def test_i1_a_held_xtables_lock_never_yields_an_applied_rule_the_kernel_lacks(
    netns: Netns,
    spawn_worker: Callable[..., WorkerProcess],
    producer: Producer,
    r: Any,
    private_xtables_lock: Path,
):
    """The lock held past a commit's wait and past max_deliveries: late, never lost or lied."""
    fw = Firewall(netns, "iptables")
    worker = spawn_worker(
        netns, backend="iptables", retry_base_ms="100", retry_max_ms="500", max_deliveries="1"
    )
    worker.xtables_lock = private_xtables_lock
    worker.start()
    with private_xtables_lock.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as an operator's long iptables-restore would
        cmd_id = producer.drop("192.0.2.61")
        held_until = time.monotonic() + 8  # longer than one commit's 5 s wait for the lock
        while time.monotonic() < held_until:
            result = results_by_cmd(r).get(cmd_id)
            assert result is None, f"answered {result} while the kernel could not be written"
            time.sleep(0.2)
        fcntl.flock(held, fcntl.LOCK_UN)
    wait_for(lambda: cmd_id in results_by_cmd(r), 30, "the drop to be applied")
    assert results_by_cmd(r)[cmd_id]["status"] == "applied"
    assert fw.rules() == {("drop", "192.0.2.61/32"): None}
    assert r.xlen(DEAD) == 0, "a busy kernel is not the command's fault: no dead letter"
    assert worker.stop() == 0
    assert "waited 5." in worker.log and "s for the xtables lock another process holds" in (
        worker.log
    )


def test_i4_convergent_one_rule_the_kernel_refuses_costs_only_itself(
    netns: Netns,
    spawn_worker: Callable[..., WorkerProcess],
    redis_server: RedisServer,
    producer: Producer,
):
    """After a reboot, reconcile installs every rule but the one ipset cannot hold, and says so."""
    fw = Firewall(netns, "ipset")
    worker = spawn_worker(netns, backend="ipset", min_accept_prefix_v4="0").start()
    refused = producer.accept("0.0.0.0/0")  # allowed here; hash:net has no room for a /0
    drops = [producer.drop(f"192.0.2.{i}") for i in range(70, 75)]
    assert [r.status.value for r in producer.wait(drops[-1])] == ["applied"]
    assert [r.status.value for r in producer.wait(refused)] == ["failed"]
    assert worker.stop() == 0
    fw.wipe()
    worker.start()
    assert fw.rules() == {("drop", f"192.0.2.{i}/32"): None for i in range(70, 75)}
    [host] = producer.hosts()
    assert host.problems == [
        "reconcile: the kernel refused 1 of the ledger's rules (first: accept 0.0.0.0/0: "
        "an ipset hash:net cannot hold 0.0.0.0/0)"
    ]
    status = pushfw_cli(redis_server, "status")
    assert status.returncode == 0, status.stderr
    assert "DEGRADED" in status.stdout
    assert f"warning: {netns.name}: reconcile: the kernel refused 1 of" in status.stderr


def test_the_scheduler_outlives_error_replies_and_says_so(r: Any, redis_server: RedisServer):
    """Seconds of OOM error replies (maxmemory) must not end the scheduler's thread."""
    worker = memory_worker(redis_server)
    worker.setup()
    Producer(redis.Redis.from_url(redis_server.url, decode_responses=True)).drop(
        "192.0.2.80", ttl_s=1
    )
    worker.ledger.fold_new()
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", "1")  # every write is refused now: Redis answers OOM errors
    try:
        worker.scheduler.start()
        wait_for(lambda: worker.scheduler.problem() is not None, 10, "the claim to fail")
        problem = worker.scheduler.problem()
        assert problem is not None and problem.startswith("scheduler: failing since ")
        assert "command not allowed when used memory > 'maxmemory'" in problem
    finally:
        r.config_set("maxmemory", "0")
    wait_for(
        lambda: worker.scheduler.emitted == 1 and worker.scheduler.problem() is None,
        10,
        "the expiry, and the problem cleared, once Redis takes writes",
    )


def test_a_worker_started_while_the_xtables_lock_is_held_waits_for_it(
    netns: Netns,
    spawn_worker: Callable[..., WorkerProcess],
    producer: Producer,
    private_xtables_lock: Path,
):
    worker = spawn_worker(netns, backend="iptables")
    worker.xtables_lock = private_xtables_lock
    with private_xtables_lock.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        worker.start(wait=False)
        time.sleep(7)  # longer than the 5 s one open waits for the lock
        assert worker.proc is not None and worker.proc.poll() is None, "the worker gave up"
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.wait_ready()
    assert [r.status.value for r in producer.wait(producer.drop("192.0.2.62"))] == ["applied"]
    assert Firewall(netns, "iptables").rules() == {("drop", "192.0.2.62/32"): None}
    assert worker.stop() == 0
    assert "the kernel is busy (xtables lock is held by another process); trying again" in (
        worker.log
    )
    assert "s for the xtables lock another process holds" in worker.log, "the wait went untold"


@pytest.mark.alone
def test_i5_timely_expiry_an_ipv4_and_an_ipv6_rule_due_in_the_same_millisecond(
    r: Any, redis_server: RedisServer
):
    """Once crashed the worker: the expiry queue compared an IPv4 with an IPv6 network."""
    worker = memory_worker(redis_server)
    worker.setup()
    ms = redis_ms(r) + 1  # both ids in one millisecond of Redis's
    first = r.xadd(CMD, {"op": "drop.insert", "ip": "192.0.2.90", "ttl": "1"}, id=f"{ms}-1")
    second = r.xadd(CMD, {"op": "drop.insert", "ip": "2001:db8::90", "ttl": "1"}, id=f"{ms}-2")
    first, second = first.decode(), second.decode()
    assert first.split("-")[0] == second.split("-")[0]
    worker.run(burst=True)
    assert len(worker.backend.committed()) == 2
    due_ms = int(first.split("-")[0]) + 1000
    wait_for(lambda: worker.applier.clock.now_ms() > due_ms, 5, "the expiry")
    assert worker.applier.expire_due() == 2
    assert dict(worker.backend.committed().pairs()) == {}


def test_i1_entries_a_crashed_ledger_consumer_read_are_folded(
    r: Any, redis_server: RedisServer, producer: Producer
):
    """A worker killed between reading for the ledger and folding: its restart folds them,
    and another worker takes over what a dead one left idle."""
    first = memory_worker(redis_server, host="h1", claim_idle_ms=100)
    first.setup()
    producer.drop("192.0.2.100")
    producer.drop("192.0.2.101")
    r.xreadgroup("ledger", "h1", {CMD: ">"}, count=1)  # read, then killed before the fold
    r.xreadgroup("ledger", "gone", {CMD: ">"}, count=1)  # a worker that never comes back
    first.setup()  # the restart
    assert [rec.network for rec in producer.rules()] == ["192.0.2.100/32"]
    time.sleep(0.15)  # the dead consumer's entry is idle past claim_idle_ms
    assert first.ledger.recover(100) == 1
    assert [rec.network for rec in producer.rules()] == ["192.0.2.100/32", "192.0.2.101/32"]
    assert r.xpending(CMD, "ledger")["pending"] == 0


@pytest.mark.alone
def test_i5_timely_expiry_while_redis_is_down(
    netns: Netns, backend: str, spawn_worker: Callable[..., WorkerProcess], aof_redis: RedisServer
):
    """Redis killed with timed rules due: each leaves the kernel within 1 s of its expiry."""
    fw = Firewall(netns, backend)
    spawn_worker(netns, server=aof_redis, backend=backend).start()
    producer = Producer.from_url(aof_redis.url)
    expires = push_timed(producer, first=110)
    producer.client.close()
    aof_redis.stop(hard=True)
    gone_at = watch_leave(fw, expires)
    aof_redis.start()
    assert len(gone_at) == len(expires), "timed rules outlived their expiry while Redis was down"
    lags = sorted(gone_at[net] - expires[net] for net in expires)
    print(f"\nexpiry lag with Redis down (ms): min {lags[0]:.0f} max {lags[-1]:.0f}")
    assert lags[0] >= -50, "a rule left before its expiry"
    assert lags[-1] < 1000


def test_nftables_starts_with_a_full_ipv6_set_and_leaves_its_bans_alone(
    netns: Netns, spawn_worker: Callable[..., WorkerProcess], producer: Producer
):
    """The renewal probe once ran in the live drop6 set: it flapped a ban of 100::1, and with
    the set full it failed and the worker exited, at every restart."""
    fw = Firewall(netns, "nftables")
    worker = spawn_worker(netns, backend="nftables", set_size="2").start()
    for ip in ("100::1", "2001:db8::1"):
        assert [x.status.value for x in producer.wait(producer.drop(ip))] == ["applied"]
    assert worker.stop() == 0
    worker.start()
    assert fw.dropped(v6=True) == ["100::1/128", "2001:db8::1/128"]
    assert worker.stop() == 0
    assert "reconcile: kernel matches the ledger (2 rules)" in worker.last_run_log, "no flap"


def test_i4_convergent_a_wiped_firewall_is_put_back_by_the_next_command(
    netns: Netns, backend: str, spawn_worker: Callable[..., WorkerProcess], producer: Producer
):
    """A hand flush used to make every command a dead letter until the periodic reconcile
    (and crashed the iptables worker): the first refused batch now re-opens and reconciles."""
    fw = Firewall(netns, backend)
    spawn_worker(netns, backend=backend).start()
    for i in range(120, 123):
        assert [x.status.value for x in producer.wait(producer.drop(f"192.0.2.{i}"))] == ["applied"]
    fw.wipe()  # iptables -F/-X, nft flush ruleset, ipset destroy
    [result] = producer.wait(producer.drop("192.0.2.123"), timeout_s=15)
    assert (result.status.value, result.detail) == ("applied", "inserted")
    want = [f"192.0.2.{i}/32" for i in range(120, 124)]
    wait_for(lambda: fw.dropped() == want, 15, "the reconcile the refused batch asked for")
    assert producer.dead() == []


HAND_FLUSHES = {  # two per backend that leave the next commit working; each trips its own check
    # (command, the rules still dropped after it, still hooked into INPUT)
    "iptables": (
        (["iptables-legacy", "-F"], False, False),  # every chain: the rules and the jump
        (["iptables-legacy", "-F", "PUSHFW"], False, True),  # the rules, the jump stays
    ),
    "nftables": (
        (["nft", "flush", "chain", "inet", "pushfw", "input"], True, False),  # the set's rule
        (["nft", "flush", "set", "inet", "pushfw", "drop4"], False, True),  # a set emptied
    ),
    "ipset": (
        (["ipset", "flush", "pushfw-drop4"], False, True),  # the set emptied
        (["iptables-legacy", "-F"], True, False),  # the jump and the set's match rules
    ),
}


def hooked(ns: Netns, backend: str) -> bool:
    """Does traffic reach pushfw's drop4 rules: a jump from INPUT, a rule matching the set?"""
    if backend == "nftables":
        return "@drop4" in ns.run("nft", "list", "chain", "inet", "pushfw", "input").stdout
    jumps = "-j PUSHFW" in ns.run("iptables-legacy", "-S", "INPUT").stdout
    if backend == "iptables":
        return jumps
    return jumps and any("--match-set pushfw-drop4 src" in line for line in chain_rules(ns))


def test_i4_convergent_a_hand_flush_is_put_back_at_the_next_heartbeat(
    netns: Netns, backend: str, spawn_worker: Callable[..., WorkerProcess], producer: Producer
):
    """A flush that leaves the next commit working (iptables -F, nft flush chain, ipset flush)
    kept the rules missing until the periodic reconcile, 300 s later by default."""
    fw = Firewall(netns, backend)
    worker = spawn_worker(netns, backend=backend, heartbeat_interval_s="0.5").start()
    want = [f"192.0.2.{i}/32" for i in range(130, 133)]
    for net in want:
        assert [x.status.value for x in producer.wait(producer.drop(net))] == ["applied"]
    assert fw.dropped() == want and hooked(netns, backend)
    for command, keeps_rules, keeps_hook in HAND_FLUSHES[backend]:
        worker.pause()  # the kernel as the flush left it, before any heartbeat repairs it
        netns.run(*command)
        left = (fw.dropped(), hooked(netns, backend))
        worker.resume()
        assert left == (want if keeps_rules else [], keeps_hook), command
        wait_for(
            lambda: fw.dropped() == want and hooked(netns, backend),
            15,
            f"the heartbeat to put back what {' '.join(command)} removed",
        )
    time.sleep(2)  # four more heartbeats with nothing lost
    assert worker.stop() == 0
    assert worker.log.count("the kernel lost pushfw's rules or hooks") == 2, "once per flush"


@pytest.mark.alone
def test_i5_timely_expiry_while_redis_is_frozen(
    netns: Netns, backend: str, spawn_worker: Callable[..., WorkerProcess], aof_redis: RedisServer
):
    """Redis stopped with SIGSTOP: its socket stays open and every call hangs until a timeout;
    the expiry alarm cuts the call short, so each timed rule still leaves within 1 s."""
    fw = Firewall(netns, backend)
    worker = spawn_worker(netns, server=aof_redis, backend=backend).start()
    producer = Producer.from_url(aof_redis.url)
    expires = push_timed(producer, first=140)
    assert aof_redis.proc is not None
    aof_redis.proc.send_signal(signal.SIGSTOP)
    try:
        gone_at = watch_leave(fw, expires)
    finally:
        aof_redis.proc.send_signal(signal.SIGCONT)
    assert len(gone_at) == len(expires), "timed rules outlived their expiry while Redis was frozen"
    lags = sorted(gone_at[net] - expires[net] for net in expires)
    print(f"\nexpiry lag with Redis frozen (ms): min {lags[0]:.0f} max {lags[-1]:.0f}")
    assert lags[0] >= -50, "a rule left before its expiry"
    assert lags[-1] < 1000
    after = producer.drop("192.0.2.139")
    assert [x.status.value for x in producer.wait(after, timeout_s=20)] == ["applied"]
    assert worker.stop() == 0
    producer.client.close()


def test_a_hook_chain_missing_from_the_legacy_table_is_one_line_not_a_traceback(
    netns: Netns, spawn_worker: Callable[..., WorkerProcess]
):
    """Docker on an nf_tables host makes DOCKER-USER with iptables-nft: libiptc cannot see it."""
    for backend in ("iptables", "ipset"):
        worker = spawn_worker(netns, backend=backend, hooks="DOCKER-USER").start(wait=False)
        assert worker.proc is not None
        worker.proc.wait(timeout=30)
        assert worker.stop() == 1
        assert "Traceback" not in worker.log
        assert (
            "pushfw-worker: hooks: chain DOCKER-USER does not exist in the legacy iptables "
            "filter table" in worker.log
        )
        assert "PUSHFW_BACKEND=nftables" in worker.log
