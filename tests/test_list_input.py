"""Lists are untrusted input: what a producer stores can neither pass the gate, stall a host,
nor cover more than the host allows.

Every attack is sent as the ``pushfw-producer`` ACL user exactly as ``pushfw acl`` prints
it, against the session's real redis-server; in-process workers on the memory backend
answer, and real nftables and ipset sets with real packets prove the bounds.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from pushfw.producer import Keys, Producer, functions
from pushfw.producer.acl import PRODUCER_USER
from pushfw.producer.connection import untyped
from pushfw.producer.contract import Result
from pushfw.producer.lists import ListContent
from pushfw.worker.backends.memory import MemoryBackend
from pushfw.worker.daemon import Worker
from testbed.kernel import Firewall
from tests.conftest import Netns, RedisServer, WorkerProcess, memory_worker, run_pushfw, wait_for
from tests.test_packets import CLIENT_IP, can_connect, listening_peer

KEYS = Keys()
PRODUCER_PW = "producer-secret"


@pytest.fixture
def as_producer(r: redis.Redis, redis_server: RedisServer) -> Iterator[Producer]:
    """A producer that holds only the ``pushfw-producer`` user ``pushfw acl`` prints."""
    printed = run_pushfw("acl", "--producer-password", PRODUCER_PW, "--worker-password", "w" * 16)
    assert printed.returncode == 0, printed.stderr
    for line in printed.stdout.splitlines():
        untyped(r).execute_command(*line.split())
    functions.install(r)  # an administrator's job: the producer stores content through it
    url = f"redis://{PRODUCER_USER}:{PRODUCER_PW}@127.0.0.1:{redis_server.port}/0"
    producer = Producer.from_url(url)
    yield producer
    producer.client.close()


def records(*entries: tuple[str, int]) -> bytes:
    """IPv4 records exactly as given (order, duplicates, host bits, prefix) — what a hostile
    producer can store, since the content only has to hash to the version it names."""
    return b"".join(
        bytes(int(part) for part in address.split(".")) + bytes((plen,))
        for address, plen in entries
    )


def forged(v4: bytes) -> ListContent:
    return ListContent(v4)


def store(producer: Producer, name: str, content: ListContent) -> None:
    """Store ``content`` as version of list ``name`` as the producer user can (its one write
    there, ``FCALL list_store``, takes any bytes), no command."""
    functions.store_list(
        producer.client, KEYS.list_content(name, content.version), content.to_bytes()
    )


def load(producer: Producer, name: str, content: ListContent, **fields: str) -> str:
    """Store ``content`` and send one ``list.load`` for it, ``fields`` overriding the
    command's own (a size that is not the content's)."""
    store(producer, name, content)
    command = {"op": "list.load", "name": name, "version": content.version, "reply": "1"}
    command.update({"size": str(content.size), **fields})
    return str(untyped(producer.client).xadd(KEYS.cmd, command))


def answer(producer: Producer, cmd_id: str, host: str = "h1") -> Result:
    found = [res for res in producer.results(cmd_id=cmd_id) if res.host == host]
    assert found, f"no result for {cmd_id}"
    return found[0]


def held(worker: Worker, name: str) -> set[str] | None:
    backend = worker.backend
    assert isinstance(backend, MemoryBackend)
    found = backend.lists.get(name)
    return None if found is None else found[1]


def problems(producer: Producer) -> list[str]:
    [host] = producer.hosts()
    return host.problems


# --- item 1: stored content is checked before the gate ------------------------------------


HOSTILE = {
    "unsorted": (
        records(("203.0.113.0", 24), ("127.0.0.0", 8), ("10.99.0.0", 16), ("198.51.100.0", 24)),
        "not after record",
    ),
    "duplicate": (records(("192.0.2.0", 24), ("192.0.2.0", 24)), "not after record"),
    "covered": (records(("10.0.0.0", 8), ("10.99.0.0", 16)), "not after record"),
    "prefix": (records(("192.0.2.0", 33)), "prefix length 33, beyond 32"),
    "host_bits": (records(("192.0.2.1", 24)), "host bits set"),
}


def test_item1_stored_content_that_the_importer_would_not_write_is_rejected(
    redis_server: RedisServer, as_producer: Producer
):
    worker = memory_worker(redis_server, protect="10.99.0.0/16")
    worker.setup()
    sent = {name: load(as_producer, name, forged(blob)) for name, (blob, _) in HOSTILE.items()}
    fine = as_producer.drop("192.0.2.50")
    worker.run(burst=True)
    for name, (_, reason) in HOSTILE.items():
        res = answer(as_producer, sent[name])
        assert (res.status.value, reason in res.detail) == ("rejected", True), (name, res)
        assert held(worker, name) is None, f"{name}: nothing of it reaches the kernel"
    assert answer(as_producer, fine).status.value == "applied", "the worker goes on"
    assert any("list unsorted: content: IPv4 record 2" in p for p in problems(as_producer))


def test_item1_a_count_unlike_the_commands_size_is_rejected_before_the_value_is_read(
    r: redis.Redis, redis_server: RedisServer, as_producer: Producer
):
    worker = memory_worker(redis_server)
    worker.setup()
    three = ListContent.of(["192.0.2.1", "192.0.2.2", "192.0.2.3"])
    wrong_size = load(as_producer, "three", three, size="1", action="drop")
    start = struct.unpack(">I", bytes((198, 18, 0, 0)))[0]
    huge = ListContent(b"".join(struct.pack(">IB", start + i, 32) for i in range(2_000_001)))
    too_many = load(as_producer, "huge", huge, size="1", action="drop")
    sent_before = r.info("stats")["total_net_output_bytes"]
    worker.run(burst=True)
    sent = r.info("stats")["total_net_output_bytes"] - sent_before
    assert answer(as_producer, wrong_size).status.value == "rejected"
    assert answer(as_producer, wrong_size).detail == (
        "content: the content holds 3 entries, the command says 1"
    )
    res = answer(as_producer, too_many)
    assert res.status.value == "rejected"
    assert "the content is 10,000,017 bytes, and 1 entries take 17 to 29" in res.detail
    assert sent < 1_000_000, "the 10 MB content was never read: its length said enough"
    assert held(worker, "three") is None and held(worker, "huge") is None


def test_item1_a_key_that_is_not_a_string_is_rejected_and_the_worker_goes_on(
    r: redis.Redis, redis_server: RedisServer, as_producer: Producer
):
    worker = memory_worker(redis_server)
    worker.setup()
    version = ListContent.of(["192.0.2.1"]).version
    r.xadd(KEYS.list_content("planted", version), {"x": "1"})  # a stream where content goes
    planted = str(
        as_producer.client.xadd(
            KEYS.cmd,
            {"op": "list.load", "name": "planted", "version": version, "size": "1", "reply": "1"},
        )
    )
    fine = as_producer.drop("192.0.2.51")
    worker.run(burst=True)
    res = answer(as_producer, planted)
    assert (res.status.value, "is a stream, not a list's content" in res.detail) == (
        "rejected",
        True,
    )
    assert answer(as_producer, fine).status.value == "applied"


# --- item 2: nothing on the list path can stall a host ------------------------------------


def test_item2_a_bad_list_stalls_no_host_and_a_restarted_worker_becomes_ready(
    r: redis.Redis, redis_server: RedisServer, as_producer: Producer
):
    backend = MemoryBackend()
    worker = memory_worker(redis_server, backend=backend)
    worker.setup()
    bad = load(as_producer, "bad", forged(records(("192.0.2.0", 40))))
    good = as_producer.load_list("good", ListContent.of(["198.51.100.0/24"]))
    after = as_producer.drop("192.0.2.52")
    worker.run(burst=True)
    assert answer(as_producer, bad).status.value == "rejected"
    assert answer(as_producer, good).status.value == "applied"
    assert answer(as_producer, after).status.value == "applied"

    # the ledger itself damaged: one record that does not parse, one whose id is not an id
    r.hset(KEYS.lists, "junk", "{not json")
    r.hset(KEYS.lists, "badid", '{"id": "x-y", "name": "badid", "version": "' + "0" * 32 + '"}')
    restarted = memory_worker(redis_server, backend=backend)
    restarted.setup()
    assert restarted.house.converger.error is None
    assert held(restarted, "good") == {"198.51.100.0/24"}, "the valid list is still held"
    later = as_producer.drop("192.0.2.53")
    restarted.run(burst=True)
    assert answer(as_producer, later).status.value == "applied", "the restarted worker applies"


def test_item2_a_kernel_that_refuses_a_list_fails_it_then_dead_letters_it(
    redis_server: RedisServer, as_producer: Producer
):
    worker = memory_worker(redis_server, memory_fail="192.0.2.66/32", max_deliveries=2)
    worker.setup()
    refused = as_producer.load_list("refused", ListContent.of(["192.0.2.66"]))
    after = as_producer.drop("192.0.2.54")

    def dead_lettered() -> bool:
        worker.run(burst=True)
        return bool(as_producer.dead())

    wait_for(dead_lettered, 30, "a dead letter")
    assert answer(as_producer, after).status.value == "applied"
    res = answer(as_producer, refused)
    assert res.status.value == "failed" and "dead letter after 2 deliveries" in res.detail
    assert [d.cmd for d in as_producer.dead()] == [refused]
    assert any(p.startswith("list refused: ") for p in problems(as_producer))


# --- item 4: a list cannot cover what no command may --------------------------------------


def slash8s(first: int, count: int) -> ListContent:
    return ListContent.of([f"{n}.0.0.0/8" for n in range(first, first + count)])


def test_item4_lists_are_bounded_by_what_they_cover_together(
    redis_server: RedisServer, as_producer: Producer
):
    worker = memory_worker(redis_server)
    worker.setup()
    every_address = as_producer.load_list("everyone", slash8s(0, 256), action="accept")
    a = as_producer.load_list("a", slash8s(1, 16), action="accept")
    b = as_producer.load_list("b", slash8s(20, 16), action="accept")
    c = as_producer.load_list("c", slash8s(40, 1), action="accept")
    country = as_producer.load_list("country", slash8s(100, 95))  # 37 %: the largest country
    worker.run(burst=True)
    res = answer(as_producer, every_address)
    assert res.status.value == "rejected"
    assert "the list covers 100.000% of the IPv4 space, more than one accept" in res.detail
    assert [answer(as_producer, i).status.value for i in (a, b)] == ["applied", "applied"]
    res = answer(as_producer, c)
    assert (res.status.value, "with the 2 other accept lists held here" in res.detail) == (
        "rejected",
        True,
    )
    assert answer(as_producer, country).status.value == "applied"
    assert held(worker, "everyone") is None and held(worker, "c") is None


def test_item4_an_accept_list_of_every_address_lifts_no_ban_over_real_tcp(
    make_netns: Callable[[], Netns],
    set_backend: str,
    spawn_worker: Callable[..., WorkerProcess],
    as_producer: Producer,
):
    server, client = make_netns(), make_netns()
    with listening_peer(server, client):
        spawn_worker(server, backend=set_backend).start()
        ban = as_producer.drop(CLIENT_IP)
        assert wait_answer(as_producer, ban, server.name).status.value == "applied"
        assert not can_connect(client)
        lift = as_producer.load_list("everyone", slash8s(0, 256), action="accept")
        res = wait_answer(as_producer, lift, server.name)
        assert res.status.value == "rejected", res
        assert Firewall(server, set_backend).list_entries("everyone") == []
        assert not can_connect(client), "the ban holds"


def wait_answer(producer: Producer, cmd_id: str, host: str) -> Any:
    [res] = producer.wait(cmd_id, timeout_s=30)
    assert res.host == host
    return res


def test_item1_the_check_sees_a_duplicate_across_its_chunks():
    """The check runs over chunks of records (bounded memory): an order broken exactly where
    one chunk ends and the next begins is found as surely as inside one."""
    from pushfw.producer.lists import _CHECK_CHUNK

    start = struct.unpack(">I", bytes((198, 18, 0, 0)))[0]
    good = [struct.pack(">IB", start + i, 32) for i in range(_CHECK_CHUNK + 2)]
    ListContent(b"".join(good)).check()
    broken = [*good[:_CHECK_CHUNK], good[_CHECK_CHUNK - 1], *good[_CHECK_CHUNK + 1 :]]
    with pytest.raises(ValueError, match=f"record {_CHECK_CHUNK + 1} .* is not after"):
        ListContent(b"".join(broken)).check()
