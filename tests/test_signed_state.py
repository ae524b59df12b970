"""Signed state outlives unsigned attempts to remove it (issue 20, item 7).

Real redis-server, ``pushfw-worker run`` processes with ``require_signature`` inside network
namespaces, real nftables and ipset, packets over a veth. Each attack is sent as the
``pushfw-producer`` ACL user exactly as ``pushfw acl`` prints it; each must be without
effect at once, after the strict host restarts with its kernel emptied (a reboot), and on a
strict host that joins afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from pushfw.producer import Producer
from pushfw.producer.acl import PRODUCER_USER, WORKER_USER
from pushfw.producer.connection import untyped
from pushfw.producer.lists import ListContent
from testbed.kernel import Firewall
from tests.conftest import Netns, RedisServer, WorkerProcess, run_pushfw, wait_for
from tests.test_packets import CLIENT_IP, can_connect, listening_peer

CMD = "{pushfw}:cmd"
KEY = "k3y-shared-by-producers-and-workers"
PRODUCER_PW = "producer-secret-item-7"
SIGNED = ListContent.of([CLIENT_IP, "198.51.100.0/24", "2001:db8::/48"])


@pytest.fixture
def as_producer(r: redis.Redis, redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client logged in as the producer user that ``pushfw acl`` prints."""
    printed = run_pushfw(
        "acl", "--producer-password", PRODUCER_PW, "--worker-password", "worker-secret-item-7"
    )
    assert printed.returncode == 0, printed.stderr
    for line in printed.stdout.splitlines():
        untyped(r).execute_command(*line.split())
    client = redis.Redis(port=redis_server.port, username=PRODUCER_USER, password=PRODUCER_PW)
    yield client
    client.close()
    untyped(r).execute_command("ACL", "DELUSER", PRODUCER_USER, WORKER_USER)


@pytest.fixture
def signer(r: redis.Redis, redis_server: RedisServer) -> Iterator[Producer]:
    producer = Producer.from_url(redis_server.url, hmac_key=KEY)
    yield producer
    producer.client.close()


def strict_host(
    spawn: Callable[..., WorkerProcess], ns: Netns, backend: str, **settings: str
) -> WorkerProcess:
    return spawn(ns, backend=backend, hmac_key=KEY, require_signature="true", **settings).start()


def answer(producer: Producer, cmd_id: str) -> tuple[str, str]:
    [result] = producer.wait(cmd_id, timeout_s=30)
    return result.status.value, result.detail


def reboot(
    host: WorkerProcess, fw: Firewall, while_down: Callable[[], None] = lambda: None
) -> None:
    """The host goes down, its kernel tables are emptied, it comes back (and reconciles)."""
    host.kill9()
    fw.wipe()
    assert fw.rules() == {} and fw.list_entries("signed") == []
    while_down()
    host.start()


def attack_as_producer(as_producer: redis.Redis, fields: dict[str, str]) -> str:
    wire: dict[Any, Any] = {**fields, "reply": "1"}
    entry_id: Any = as_producer.xadd(CMD, wire)
    return str(entry_id.decode())


def holds_the_list(
    make_netns: Callable[[], Netns],
    backend: str,
    spawn: Callable[..., WorkerProcess],
    signer: Producer,
    attack: Callable[[], None],
    while_down: Callable[[], None] = lambda: None,
    **settings: str,
) -> WorkerProcess:
    """Load the signed list on a strict host, run ``attack`` on it, then prove the host
    blocks the list's entries at once, after a reboot (``while_down`` runs while it is
    down), and on a strict host joining later; returns the first host."""
    server, client = make_netns(), make_netns()
    entries = sorted(SIGNED.networks())
    with listening_peer(server, client):
        assert can_connect(client)
        host = strict_host(spawn, server, backend, **settings)
        fw = Firewall(server, backend)
        assert answer(signer, signer.load_list("signed", SIGNED)) == ("applied", "loaded 3 entries")
        assert sorted(fw.list_entries("signed")) == entries
        assert not can_connect(client)

        attack()
        assert sorted(fw.list_entries("signed")) == entries, "at once"
        assert not can_connect(client)

        reboot(host, fw, while_down)
        assert sorted(fw.list_entries("signed")) == entries, "after a reboot"
        assert not can_connect(client)

    joined = make_netns()
    strict_host(spawn, joined, backend)
    assert sorted(Firewall(joined, backend).list_entries("signed")) == entries, "a new host"
    return host


def test_signed_state_outlives_an_unsigned_list_delete(
    make_netns: Callable[[], Netns],
    set_backend: str,
    spawn_worker: Callable[..., WorkerProcess],
    as_producer: redis.Redis,
    signer: Producer,
):
    def unsigned_delete() -> None:
        attack = attack_as_producer(as_producer, {"op": "list.delete", "name": "signed"})
        assert answer(signer, attack) == ("rejected", "sig: missing")
        wait_for(lambda: signer.lists() == [], 10, "the ledger to fold the delete")

    holds_the_list(make_netns, set_backend, spawn_worker, signer, unsigned_delete)


def test_signed_state_outlives_signed_content_re_stored_with_a_1_ms_expiry(
    make_netns: Callable[[], Netns],
    set_backend: str,
    spawn_worker: Callable[..., WorkerProcess],
    as_producer: redis.Redis,
    signer: Producer,
    r: redis.Redis,
):
    content_key = f"{{pushfw}}:list:signed:{SIGNED.version}"

    def expire_content() -> None:
        try:
            as_producer.set(content_key, SIGNED.to_bytes(), px=1)
        except redis.exceptions.NoPermissionError:  # content written through a Function only
            r.set(content_key, SIGNED.to_bytes(), px=1)
        # expired, or already stored again (without an expiry) by a strict host
        wait_for(lambda: r.pttl(content_key) < 0, 5, "the content to expire")

    def expire_then_see_it_stored_again() -> None:
        expire_content()
        # the running host's periodic reconcile writes its copy back, for hosts joining later
        wait_for(lambda: r.get(content_key) == SIGNED.to_bytes(), 15, "the content back")

    host = holds_the_list(
        make_netns,
        set_backend,
        spawn_worker,
        signer,
        expire_then_see_it_stored_again,
        expire_content,  # the host restarts with the content gone: it loads its own copy
        reconcile_interval_s="1",
    )
    assert "is gone from Redis: loaded this host's copy" in host.last_run_log, "at restart"
    assert r.get(content_key) == SIGNED.to_bytes(), "the strict host stored its copy again"
    assert r.pttl(content_key) == -1


def test_signed_state_outlives_an_unsigned_undrop_of_a_signed_ban(
    make_netns: Callable[[], Netns],
    set_backend: str,
    spawn_worker: Callable[..., WorkerProcess],
    as_producer: redis.Redis,
    signer: Producer,
):
    server, client = make_netns(), make_netns()
    ban = ("drop", f"{CLIENT_IP}/32")
    with listening_peer(server, client):
        assert can_connect(client)
        host = strict_host(spawn_worker, server, set_backend)
        fw = Firewall(server, set_backend)
        assert answer(signer, signer.drop(CLIENT_IP, reason="signed ban")) == (
            "applied",
            "inserted",
        )
        assert not can_connect(client)

        undrop = attack_as_producer(as_producer, {"op": "drop.delete", "ip": CLIENT_IP})
        assert answer(signer, undrop) == ("rejected", "sig: missing")
        wait_for(lambda: signer.rules() == [], 10, "the ledger to fold the undrop")
        assert ban in fw.rules() and not can_connect(client), "at once"

        reboot(host, fw)
        assert ban in fw.rules() and not can_connect(client), "after a reboot"

    joined = make_netns()
    strict_host(spawn_worker, joined, set_backend)
    assert ban in Firewall(joined, set_backend).rules(), "a new strict host holds it too"
