"""Named lists through real workers into real kernel sets, across kill -9 and a hand flush.

Real redis-server, ``pushfw-worker run`` processes inside network namespaces, real
nftables and ipset sets read back with the operator's tools, and real packets over a veth.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from pushfw.producer import Producer
from pushfw.producer.keys import Keys
from pushfw.producer.lists import ListContent
from pushfw.worker.ledger import Ledger
from testbed.kernel import Firewall
from tests.conftest import Netns, WorkerProcess, pushfw_cli, wait_for
from tests.test_packets import CLIENT_IP, can_connect, listening_peer


def feed(count: int, *extra: str) -> ListContent:
    """``count`` /32 entries of 198.18.0.0/15 (none of them the test's peers), and ``extra``."""
    return ListContent.of([*(f"198.18.{i // 256}.{i % 256}" for i in range(count)), *extra])


def answer(producer: Producer, cmd_id: str) -> tuple[str, str]:
    [result] = producer.wait(cmd_id, timeout_s=30)
    return result.status.value, result.detail


def test_an_imported_list_blocks_real_traffic_and_its_change_lets_it_through(
    make_netns: Callable[[], Netns],
    set_backend: str,
    spawn_worker: Callable[..., WorkerProcess],
    producer: Producer,
):
    server, client = make_netns(), make_netns()
    with listening_peer(server, client):
        spawn_worker(server, backend=set_backend).start()
        fw = Firewall(server, set_backend)

        first = producer.load_list("abusers", feed(3000, "10.213.0.0/24"))
        assert answer(producer, first) == ("applied", "loaded 3001 entries")
        [beat] = producer.hosts()  # written before the result: no stale "0 hosts hold it"
        assert beat.lists["abusers"].entries == 3001
        assert len(fw.list_entries("abusers")) == 3001
        assert not can_connect(client), "a list entry covering the peer must block it"

        second = producer.load_list("abusers", feed(3000, "203.0.113.0/24"))
        assert answer(producer, second) == ("applied", "1 added, 1 removed: 3001 entries")
        assert "10.213.0.0/24" not in fw.list_entries("abusers")
        assert can_connect(client), "the entry left the list: traffic passes again"

        third = producer.load_list("abusers", feed(3000, CLIENT_IP))
        assert answer(producer, third)[0] == "applied"
        assert not can_connect(client)
        allow = producer.accept(CLIENT_IP)
        assert answer(producer, allow) == ("applied", "inserted")
        assert can_connect(client), "a single accept wins over a drop list"
        assert answer(producer, producer.undrop(CLIENT_IP))[1] == "not present", (
            "an undrop of one address does not punch a hole in a list"
        )
        assert CLIENT_IP + "/32" in fw.list_entries("abusers")

        gone = producer.delete_list("abusers")
        assert answer(producer, gone) == ("applied", "removed")
        assert fw.list_entries("abusers") == []


def test_a_list_survives_kill_9_and_a_restart_brings_what_changed_meanwhile(
    netns: Netns,
    set_backend: str,
    spawn_worker: Callable[..., WorkerProcess],
    producer: Producer,
):
    fw = Firewall(netns, set_backend)
    worker = spawn_worker(netns, backend=set_backend).start()
    assert answer(producer, producer.load_list("keep", feed(500)))[0] == "applied"
    # goes and new accept: the kernel holds the union of the lists of one action
    goes = producer.load_list("goes", feed(10, "192.0.2.0/24"), action="accept")
    assert answer(producer, goes)[0] == "applied"
    worker.kill9()
    assert len(fw.list_entries("keep")) == 500, "bans stay in force while the worker is down"

    producer.load_list("keep", feed(400, "203.0.113.7"), reply=False)
    producer.delete_list("goes", reply=False)
    producer.load_list("new", feed(0, "198.51.100.0/24"), action="accept", reply=False)
    worker.start()
    wait_for(lambda: producer.progress(_newest(producer)) == {netns.name: "done"}, 30, "done")
    assert len(fw.list_entries("keep")) == 401 and "203.0.113.7/32" in fw.list_entries("keep")
    assert fw.list_entries("goes") == []
    assert fw.list_entries("new") == ["198.51.100.0/24"]

    def heartbeat_lists() -> dict[str, int]:
        [beat] = producer.hosts()
        return {name: held.entries for name, held in beat.lists.items()}

    wait_for(lambda: heartbeat_lists() == {"keep": 401, "new": 1}, 10, "the heartbeat to say so")


def _newest(producer: Producer) -> str:
    rows: Any = producer.client.xrevrange(producer.keys.cmd, count=1)
    return str(rows[0][0])


def test_a_hand_flush_of_the_lists_sets_or_of_their_elements_is_repaired_within_heartbeats(
    netns: Netns,
    set_backend: str,
    spawn_worker: Callable[..., WorkerProcess],
    producer: Producer,
):
    fw = Firewall(netns, set_backend)
    spawn_worker(netns, backend=set_backend, heartbeat_interval_s="0.5").start()
    assert answer(producer, producer.load_list("feed", feed(200)))[0] == "applied"
    fw.wipe()  # nft flush ruleset; iptables -F and -X, then ipset destroy
    assert fw.list_entries("feed") == []
    wait_for(lambda: len(fw.list_entries("feed")) == 200, 30, "the list to be loaded again")

    if set_backend == "nftables":  # the elements go, the sets and rules stay
        netns.run("nft", "flush", "set", "inet", "pushfw", "lists_drop4_32")
    else:
        netns.run("ipset", "flush")
    assert fw.list_entries("feed") == []
    wait_for(lambda: len(fw.list_entries("feed")) == 200, 30, "the emptied list loaded again")
    [beat] = producer.hosts()
    assert beat.lists["feed"].entries == 200
    wait_for(lambda: not producer.hosts()[0].problems, 30, "the heartbeat to say all is well")


def test_an_iptables_host_refuses_a_list_and_says_so_in_its_status(
    netns: Netns,
    spawn_worker: Callable[..., WorkerProcess],
    producer: Producer,
    redis_server: Any,
):
    spawn_worker(netns, backend="iptables").start()
    refused = producer.load_list("feed", feed(5))
    status, detail = answer(producer, refused)
    assert (status, detail) == (
        "rejected",
        "the iptables backend keeps no sets: lists need ipset or nftables",
    )
    assert producer.results(cmd_id=refused)[0].status.value == "rejected"
    shown = pushfw_cli(redis_server, "lists")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[1].split()[4] == "0/1", "no host holds it"


def test_lists_under_kill_9_end_as_the_newest_commands_say(
    netns: Netns,
    set_backend: str,
    spawn_worker: Callable[..., WorkerProcess],
    producer: Producer,
    r: Any,
):
    """I1 and I3 for lists: loads, changes and removals of three lists while the worker is
    SIGKILLed at random points (in a load, in a start); once quiet, each list in the kernel
    is exactly its newest command's content, nothing pending, no dead letter."""
    rng = random.Random(20261201)
    pool = [f"198.18.{i // 250}.{i % 250}" for i in range(5000)] + [
        f"198.19.{i}.0/24" for i in range(50)
    ]
    fw = Firewall(netns, set_backend)
    worker = spawn_worker(netns, backend=set_backend).start()
    newest: dict[str, list[str]] = {}
    for _ in range(15):
        name = rng.choice(["alpha", "beta", "gamma"])
        if newest.get(name) and rng.random() < 0.25:
            producer.delete_list(name, reply=False)
            newest[name] = []
        else:
            content = ListContent.of(rng.sample(pool, rng.randint(1, 3000)))
            producer.load_list(name, content, reply=False)
            newest[name] = sorted(content.networks())
        time.sleep(rng.uniform(0, 0.5))
        worker.kill9()
        worker.start(wait=False)
    worker.kill9()
    worker.start()
    wait_for(lambda: producer.progress(_newest(producer)) == {netns.name: "done"}, 60, "done")
    union = sorted(set().union(*newest.values()))  # the drop lists share sets
    for name, entries in newest.items():
        expected = union if entries else []
        assert sorted(fw.list_entries(name)) == expected, f"list {name}"
    assert r.xlen("{pushfw}:dead") == 0
    wait_for(lambda: producer.hosts()[0].pending == 0, 15, "nothing pending in the heartbeat")


def test_item6_entries_under_a_refused_wide_entry_stay_in_the_kernel_and_block(
    make_netns: Callable[[], Netns],
    set_backend: str,
    spawn_worker: Callable[..., WorkerProcess],
    producer: Producer,
    redis_server: Any,
    tmp_path: Any,
):
    """A feed with ``0.0.0.0/0`` in it: every host refuses that entry, and the importer used
    to drop every entry it covered, so nothing of the feed's IPv4 part reached a kernel."""
    server, client = make_netns(), make_netns()
    path = tmp_path / "feed.netset"
    under = [f"198.18.{i // 256}.{i % 256}" for i in range(300)]
    path.write_text("\n".join(["0.0.0.0/0", *under, CLIENT_IP, "2001:db8::/32"]) + "\n")
    with listening_peer(server, client):
        spawn_worker(server, backend=set_backend).start()
        fw = Firewall(server, set_backend)
        assert can_connect(client)

        refused = pushfw_cli(redis_server, "import", str(path))
        assert refused.returncode == 2 and f"{path}:1: 0.0.0.0/0 is wider than /8" in (
            refused.stderr
        )
        assert fw.list_entries("feed") == [], "nothing sent"

        sent = pushfw_cli(redis_server, "import", str(path), "--skip-invalid", "--wait")
        assert sent.returncode == 0, sent.stderr
        assert f"{path}:1: 0.0.0.0/0 is wider than /8" in sent.stderr
        assert "1 entry drop private, CGNAT or link-local space: 10.0.0.0/8" in sent.stderr
        assert "applied" in sent.stdout and "loaded 302 entries" in sent.stdout
        assert "refused" not in sent.stdout
        held = set(fw.list_entries("feed"))
        assert held == {*(f"{a}/32" for a in under), f"{CLIENT_IP}/32", "2001:db8::/32"}
        assert not can_connect(client), "an entry under the wide one blocks real traffic"


def test_a_list_that_cannot_come_back_after_a_restart_no_longer_keeps_dropped_entries(
    netns: Netns,
    set_backend: str,
    spawn_worker: Callable[..., WorkerProcess],
    producer: Producer,
    r: Any,
):
    """After a restart the shared sets delete nothing until every list the kernel held is
    loaded again (their entries cannot be told apart). A list whose content left Redis never
    is: once reconcile knows it, the worker lets it go, and an entry another list drops then
    leaves the kernel instead of staying banned."""
    fw = Firewall(netns, set_backend)
    worker = spawn_worker(netns, backend=set_backend).start()
    assert answer(producer, producer.load_list("keep", feed(10, "203.0.113.5")))[0] == "applied"
    assert answer(producer, producer.load_list("lost", feed(0, "198.51.100.0/24")))[0] == "applied"
    assert worker.stop() == 0
    [lost] = [record for record in producer.lists() if record.name == "lost"]
    assert r.delete(producer.keys.list_content("lost", lost.version)) == 1

    worker.start()
    assert fw.list_entries("lost") == [], "nothing vouches for the entries of a list gone"
    assert "198.51.100.0/24" not in fw.list_entries("keep")
    assert len(fw.list_entries("keep")) == 11
    smaller = producer.load_list("keep", feed(10))
    assert answer(producer, smaller) == ("applied", "0 added, 1 removed: 10 entries")
    assert "203.0.113.5/32" not in fw.list_entries("keep"), "an entry dropped stays banned"
    assert len(fw.list_entries("keep")) == 10
    [beat] = producer.hosts()
    assert [p for p in beat.problems if p.startswith("list lost: ")] == [
        f"list lost: version {lost.version} of list lost is not in Redis; import the list again"
    ]
    assert worker.stop() == 0
    assert (
        "lists lost: held before this start, not loaded again (see the problems): removed, "
        "with every entry no loaded list holds"
    ) in worker.last_run_log


def test_a_forged_command_for_a_list_held_before_a_restart_does_not_unban_it(
    netns: Netns,
    set_backend: str,
    spawn_worker: Callable[..., WorkerProcess],
    producer: Producer,
    redis_server: Any,
    r: Any,
):
    """The one case the worker does not let a list it cannot load again go: its newest
    command is one this host refuses (a bad signature). Its entries stay in the kernel."""
    fw = Firewall(netns, set_backend)
    key = "k" * 16 + "-lists"
    worker = spawn_worker(netns, backend=set_backend, hmac_key=key).start()
    signed = Producer.from_url(redis_server.url, hmac_key=key)
    assert answer(signed, signed.load_list("held", feed(0, "198.51.100.0/24")))[0] == "applied"
    assert worker.stop() == 0
    forger = Producer.from_url(redis_server.url, hmac_key="f" * 16 + "-forged")
    forged = forger.load_list("held", feed(0, "192.0.2.1"))
    Ledger(r, Keys(), "the-fleet").fold_new()  # the ledger's newest record is the forged one

    worker.start()
    status, detail = answer(producer, forged)
    assert (status, detail.split(":")[0]) == ("rejected", "sig")
    assert fw.list_entries("held") == ["198.51.100.0/24"]
    assert worker.stop() == 0
    assert "not loaded again" not in worker.last_run_log
    signed.client.close()
    forger.client.close()
