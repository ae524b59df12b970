"""One gate into the kernel, on every path: tried as a hostile producer and as an operator would.

Each test is one way around the policy that main once had, with a real redis-server, real
``pushfw-worker`` processes and real kernel tables on every backend. "Reboot" is a wiped
firewall followed by a worker start: the rules then come from reconcile alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from pushfw.producer import Keys, Producer
from pushfw.producer.connection import redis_ms
from pushfw.producer.lists import ListContent
from pushfw.worker.ledger import Ledger
from pushfw.worker.retention import trim
from pushfw.worker.scheduler import Scheduler
from testbed.kernel import Firewall, veth
from tests.conftest import Netns, RedisServer, WorkerProcess, pushfw_cli, wait_for

CMD = "{pushfw}:cmd"
KEYS = Keys()
KEY = "k3y-shared-by-producers-and-workers"


def status_of(producer: Producer, cmd_id: str, host: str | None = None) -> tuple[str, str]:
    results = producer.wait(cmd_id, expect=1 if host is None else 2, timeout_s=15)
    mine = [r for r in results if host is None or r.host == host]
    assert mine, f"no result for {cmd_id}"
    return mine[0].status.value, mine[0].detail


def reboot(fw: Firewall, worker: WorkerProcess) -> None:
    """Stop the worker, empty the kernel as a reboot does, start again: reconcile decides."""
    assert worker.stop() == 0
    fw.wipe()
    worker.start()


def test_i6_safe_protected_networks_never_reach_the_kernel_on_any_path(
    netns: Netns, backend: str, spawn_worker: Callable[..., WorkerProcess], producer: Producer
):
    fw = Firewall(netns, backend)
    worker = spawn_worker(netns, backend=backend, protect="10.9.0.7").start()
    refused = {
        "127.0.0.1": "ip: 127.0.0.1/32 overlaps protected network 127.0.0.0/8",
        "10.9.0.0/24": "ip: 10.9.0.0/24 overlaps protected network 10.9.0.7/32",
        "0.0.0.0/1": "ip: 0.0.0.0/1 overlaps protected network 127.0.0.0/8",
        "128.0.0.0/1": "ip: 128.0.0.0/1 is wider than /8, the widest network a drop may cover here",
    }
    for network, reason in refused.items():
        assert status_of(producer, producer.drop(network)) == ("rejected", reason)
    assert status_of(producer, producer.drop("192.0.2.1")) == ("applied", "inserted")
    assert fw.rules() == {("drop", "192.0.2.1/32"): None}

    reboot(fw, worker)
    assert fw.rules() == {("drop", "192.0.2.1/32"): None}, "reconcile took what the stream refused"
    assert worker.stop() == 0
    assert "reconcile repaired drift: 1 added, 0 removed" in worker.log


def test_i6_safe_a_strict_host_installs_at_reconcile_only_what_it_can_verify(
    make_netns: Callable[[], Netns],
    backend: str,
    spawn_worker: Callable[..., WorkerProcess],
    redis_server: RedisServer,
    producer: Producer,
):
    """Two hosts fold the ledger: the one without a key must not decide for the strict one."""
    strict_ns, lax_ns = make_netns(), make_netns()
    strict = spawn_worker(strict_ns, backend=backend, hmac_key=KEY, require_signature="true")
    strict.start()
    lax = spawn_worker(lax_ns, backend="memory").start()
    signer = Producer.from_url(redis_server.url, hmac_key=KEY)
    unsigned = producer
    good = signer.drop("192.0.2.1")
    bad = [unsigned.drop(f"198.51.100.{i}") for i in range(1, 21)]
    assert status_of(signer, good, strict_ns.name) == ("applied", "inserted")
    for cmd_id in bad:
        assert status_of(unsigned, cmd_id, strict_ns.name) == ("rejected", "sig: missing")
        assert status_of(unsigned, cmd_id, lax_ns.name) == ("applied", "inserted")
    fw = Firewall(strict_ns, backend)
    assert fw.rules() == {("drop", "192.0.2.1/32"): None}

    reboot(fw, strict)
    assert fw.rules() == {("drop", "192.0.2.1/32"): None}, "the ledger took unsigned drops"
    assert lax.stop() == 0
    signer.client.close()


def test_i3_ordered_time_is_redis_s_clock_not_the_producers(
    netns: Netns,
    backend: str,
    spawn_worker: Callable[..., WorkerProcess],
    redis_server: RedisServer,
    producer: Producer,
    r: Any,
):
    """An entry id a day ahead: a 3 s ban lasts 3 s, later commands (signed too) still work."""
    fw = Firewall(netns, backend)
    spawn_worker(netns, backend=backend, hmac_key=KEY).start()
    before = redis_ms(r)
    ahead = before + 86_400_000
    future = r.xadd(
        CMD, {"reply": "1", "op": "drop.insert", "ip": "192.0.2.9", "ttl": "3"}, id=f"{ahead}-0"
    )
    signer = Producer.from_url(redis_server.url, hmac_key=KEY)
    signed = signer.drop("192.0.2.10", ttl_s=600)
    assert signed == f"{ahead}-1", "Redis gives every later entry an id after the future one"
    assert status_of(producer, future.decode()) == ("applied", "inserted")
    assert status_of(signer, signed) == ("applied", "inserted"), "signature window and --wait hold"
    after = redis_ms(r)
    rules = fw.rules()
    timed, later = rules[("drop", "192.0.2.9/32")], rules[("drop", "192.0.2.10/32")]
    assert timed is not None and later is not None
    assert before + 3000 <= timed <= after + 3000, "3 s from when Redis first saw it"
    assert before + 600_000 <= later <= after + 600_000
    wait_for(lambda: ("drop", "192.0.2.9/32") not in fw.rules(), 15, "the 3 s ban to end")
    # the scheduler's delete of the 3 s ban is the third entry stamped
    [expiry] = [eid.decode() for eid, f in r.xrange(CMD) if f.get(b"origin") == b"ttl"]
    assert expiry == f"{ahead}-2"

    def stamped_three() -> bool:  # the delete is stamped when a worker first reads it
        found = producer.ids_ahead()
        return found is not None and found.count == 3

    wait_for(stamped_three, 15, "the scheduler's delete to be stamped")
    ahead_count = producer.ids_ahead()
    assert ahead_count is not None and (ahead_count.count, ahead_count.max_id) == (3, expiry)
    status = pushfw_cli(redis_server, "status")
    assert status.returncode == 0, status.stderr
    assert f"warning: 3 command(s) had ids ahead of Redis's clock, the newest {expiry}" in (
        status.stderr
    )
    signer.client.close()


def test_i3_ordered_a_renewal_added_before_the_expiry_wins_however_late_it_is_folded(
    netns: Netns,
    backend: str,
    spawn_worker: Callable[..., WorkerProcess],
    redis_server: RedisServer,
    producer: Producer,
    r: Any,
):
    fw = Firewall(netns, backend)
    worker = spawn_worker(netns, backend=backend).start()
    first = producer.drop("192.0.2.20", ttl_s=2)
    assert status_of(producer, first) == ("applied", "inserted")
    assert worker.stop() == 0
    renewal = producer.drop("192.0.2.20", ttl_s=600)  # behind a backlog: not folded yet
    due_ms = int(first.split("-")[0]) + 2000
    wait_for(lambda: redis_ms(r) > due_ms, 10, "the first ban's expiry")
    scheduler = Scheduler(redis.Redis.from_url(redis_server.url), KEYS)
    scheduler.claim_due()  # the claim sees a ledger without the renewal
    scheduler.client.close()
    [expiry] = [eid.decode() for eid, f in r.xrange(CMD, f"({renewal}") if f[b"origin"] == b"ttl"]

    worker.start()
    assert status_of(producer, renewal)[0] == "applied"
    wait_for(lambda: producer.progress(expiry) == {netns.name: "done"}, 15, "the expiry done")
    assert producer.results(cmd_id=expiry) == [], "the scheduler's deletes ask no result"
    renewed_ms = int(renewal.split("-")[0]) + 600_000
    assert fw.rules() == {("drop", "192.0.2.20/32"): renewed_ms}
    [record] = [rec for rec in producer.rules() if rec.network == "192.0.2.20/32"]
    assert (record.id, record.voided, record.expires_ms) == (renewal, expiry, renewed_ms)
    assert r.zscore(KEYS.expiry, "drop 192.0.2.20/32") == renewed_ms, "the scheduler still ends it"


def test_i3_ordered_an_insert_that_arrives_expired_ends_the_older_rule(
    netns: Netns,
    backend: str,
    spawn_worker: Callable[..., WorkerProcess],
    producer: Producer,
    r: Any,
):
    fw = Firewall(netns, backend)
    spawn_worker(netns, backend=backend).start()
    permanent = producer.drop("192.0.2.30")
    assert status_of(producer, permanent) == ("applied", "inserted")
    ms = int(permanent.split("-")[0])
    wait_for(lambda: redis_ms(r) > ms + 1500, 10, "a second to pass")
    # a 1 s ban added right after the permanent one, that reaches the host after its expiry
    late = r.xadd(
        CMD, {"reply": "1", "op": "drop.insert", "ip": "192.0.2.30", "ttl": "1"}, id=f"{ms + 1}-0"
    )
    status, detail = status_of(producer, late.decode())
    assert status == "expired" and detail.endswith("ms ago; removed the rule"), detail
    assert fw.rules() == {}, "the newest command ended the rule"
    assert [rec.network for rec in producer.rules()] == [], "as the ledger says"


def test_i4_convergent_a_returning_host_drops_bans_lifted_and_forgotten_while_away(
    netns: Netns,
    backend: str,
    spawn_worker: Callable[..., WorkerProcess],
    redis_server: RedisServer,
    producer: Producer,
    r: Any,
):
    fw = Firewall(netns, backend)
    worker = spawn_worker(netns, backend=backend).start()
    for ip in ("192.0.2.41", "192.0.2.42"):
        assert status_of(producer, producer.drop(ip)) == ("applied", "inserted")
    assert worker.stop() == 0
    producer.undrop("192.0.2.41")
    producer.undrop("192.0.2.42")
    ledger = Ledger(r, KEYS, "the-fleet")
    ledger.fold_new()  # the rest of the fleet folds the lifts while this host is away
    trim(ledger, redis_ms(r) + 3_600_000, host_expiry_s=900)  # ... and trims past it
    assert r.hlen(KEYS.rules) == 0, "the tombstones are forgotten: the ledger is empty"

    worker.start()
    assert fw.rules() == {}, "an empty ledger of the same generation is the truth"
    assert status_of(producer, producer.drop("192.0.2.43")) == ("applied", "inserted")
    assert worker.stop() == 0
    assert "reconcile repaired drift: 0 added, 2 removed" in worker.log

    r.flushall()  # Redis lost its data: a new, empty ledger begins
    worker.start()
    assert fw.rules() == {("drop", "192.0.2.43/32"): None}, "a lost ledger is not the truth"
    shown = pushfw_cli(redis_server, "status", "--json")
    assert shown.returncode == 0, shown.stderr
    [host] = json.loads(shown.stdout)
    assert (host["state"], host["ledger_lost"]) == ("LEDGER LOST", True)
    assert worker.stop() == 0
    assert "did Redis lose its data?" in worker.log

    in_ns = ["ip", "netns", "exec", netns.name, sys.executable, "-m", "pushfw.worker"]
    forced = subprocess.run(
        [*in_ns, "reconcile", "--force"],
        env=worker.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.startswith("added 0, removed 1")
    assert fw.rules() == {}
    worker.start()
    assert worker.stop() == 0
    assert "did Redis lose its data?" not in worker.last_run_log, "the host adopted the new ledger"


def test_i4_convergent_reconcile_after_every_redis_reconnect(
    netns: Netns,
    backend: str,
    spawn_worker: Callable[..., WorkerProcess],
    aof_redis: RedisServer,
):
    """With the periodic reconcile off, an outage still ends in a reconcile."""
    fw = Firewall(netns, backend)
    spawn_worker(netns, server=aof_redis, backend=backend, reconcile_interval_s="0").start()
    producer = Producer.from_url(aof_redis.url)
    assert status_of(producer, producer.drop("192.0.2.51")) == ("applied", "inserted")
    aof_redis.stop()
    fw.flush()  # an operator's mistake while Redis is away
    assert fw.rules() == {}
    aof_redis.start()
    wait_for(lambda: fw.rules() == {("drop", "192.0.2.51/32"): None}, 30, "the reconcile")
    producer.client.close()


@contextmanager
def redis_that_moves(
    make_netns: Callable[[], Netns], tmp_path: Path
) -> Iterator[tuple[Netns, RedisServer, Callable[[], None]]]:
    """A namespace whose Redis host name resolves to 10.215.0.1, and a call that moves the
    name to 10.215.0.3 (a DNS change, a failover) and drops the server's clients."""
    hub, db = make_netns(), make_netns()
    veth(hub, "10.215.0.1", db, "10.215.0.2", "m")
    hub.run("ip", "addr", "add", "10.215.0.3/24", "dev", f"pfma{hub.name[-7:]}")
    server = RedisServer(tmp_path, netns=hub.name, bind="127.0.0.1 10.215.0.1 10.215.0.3")
    server.start()
    etc = Path("/etc/netns") / db.name  # `ip netns exec` mounts these files over /etc
    etc.mkdir(parents=True)
    hosts = etc / "hosts"
    hosts.write_text("10.215.0.1 redis-home\n")

    def move() -> None:
        with hosts.open("w") as rewrite:  # in place: the bind mount keeps the inode
            rewrite.write("10.215.0.3 redis-home\n")
        admin = redis.Redis.from_url(server.url)
        admin.client_kill_filter(_type="normal", skipme=True)
        admin.close()

    try:
        yield db, server, move
    finally:
        server.stop()
        hosts.unlink()
        etc.rmdir()


def test_i6_safe_redis_is_protected_at_the_address_it_moves_to(
    make_netns: Callable[[], Netns],
    backend: str,
    spawn_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
):
    """A Redis host name that comes to resolve elsewhere: a drop of the new address is lifted
    (it would cut the worker off) and refused from then on."""
    with redis_that_moves(make_netns, tmp_path) as (db, server, move):
        producer = Producer.from_url(server.url)
        fw = Firewall(db, backend)
        url = f"redis://redis-home:{server.port}/0"
        worker = spawn_worker(db, server=server, backend=backend, redis_url=url).start()
        moved_to = producer.drop("10.215.0.3")
        assert status_of(producer, moved_to) == ("applied", "inserted"), "not Redis's, yet"

        move()
        wait_for(lambda: ("drop", "10.215.0.3/32") not in fw.rules(), 30, "the drop to be lifted")
        again = producer.drop("10.215.0.3")
        assert status_of(producer, again) == (
            "rejected",
            "ip: 10.215.0.3/32 overlaps protected network 10.215.0.3/32",
        )
        reboot(fw, worker)  # the ledger holds that drop: reconcile refuses it too
        assert fw.rules() == {}
        producer.client.close()


def test_item3_a_held_list_stops_dropping_the_address_redis_moves_to(
    make_netns: Callable[[], Netns],
    set_backend: str,
    spawn_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
):
    """Issue 20 item 3: protection that grows puts every held list through the gate again,
    and the entries it refuses now leave the kernel at once (single rules did already)."""
    with redis_that_moves(make_netns, tmp_path) as (db, server, move):
        producer = Producer.from_url(server.url)
        fw = Firewall(db, set_backend)
        url = f"redis://redis-home:{server.port}/0"
        spawn_worker(
            db, server=server, backend=set_backend, redis_url=url, reconcile_interval_s="0"
        ).start()
        feed = ListContent.of(["10.215.0.3", "192.0.2.0/24"])
        assert status_of(producer, producer.load_list("feed", feed))[0] == "applied"
        assert set(fw.list_entries("feed")) == {"10.215.0.3/32", "192.0.2.0/24"}

        move()
        wait_for(
            lambda: set(fw.list_entries("feed")) == {"192.0.2.0/24"},
            30,
            "the list's entry covering Redis's new address to leave the kernel",
        )
        wait_for(
            lambda: producer.hosts()[0].lists["feed"].refused == 1,
            30,
            "the heartbeat to count the entry refused",
        )
        producer.client.close()
