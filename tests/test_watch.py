"""Shadow mode: a watch rule counts real packets over a veth and lets them through.

An operator tries an address (or a list) as ``watch`` first, reads its hits in ``pushfw
list --hits``, then sends it again as a drop. Every kernel backend watches: nftables with a
set matched before the verdicts, iptables with rules that have no target above the accepts,
ipset with its own sets matched by such a rule.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from pushfw.producer import Producer
from pushfw.worker.hits import EVERY_BEATS
from testbed.kernel import Firewall
from tests.conftest import Netns, RedisServer, pushfw_cli, wait_for
from tests.test_hits import BEAT_S, hit_rows
from tests.test_packets import CLIENT_IP, can_connect, listening_peer


def test_watch_counts_traffic_it_lets_through_then_a_drop_blocks_it(
    make_netns: Callable[[], Netns],
    backend: str,
    spawn_worker,
    producer: Producer,
    redis_server: RedisServer,
):
    server, client = make_netns(), make_netns()
    with listening_peer(server, client, tag="w"):
        spawn_worker(server, backend=backend, heartbeat_interval_s=str(BEAT_S)).start()
        results = producer.wait(producer.watch(CLIENT_IP, reason="shadow"), timeout_s=15)
        assert [r.status.value for r in results] == ["applied"]
        for _ in range(3):
            assert can_connect(client), "a watch must neither drop nor end evaluation"

        def watched() -> dict[str, Any] | None:
            rows = [
                r
                for r in hit_rows(redis_server)
                if r["network"] == f"{CLIENT_IP}/32" and r["action"] == "watch"
            ]
            return rows[0] if rows and rows[0]["packets"] >= 3 else None

        wait_for(watched, timeout=EVERY_BEATS * BEAT_S * 10, what="the watched packets counted")
        first = watched()
        assert first is not None and first["bytes"] > 0

        results = producer.wait(producer.drop(CLIENT_IP, reason="shadow over"), timeout_s=15)
        assert [r.status.value for r in results] == ["applied"]
        assert not can_connect(client), "the same address as a drop must block it"

        def grew() -> bool:
            row = watched()
            return row is not None and row["packets"] > first["packets"]

        # The dropped SYNs still pass the watch rule first: it sees every packet.
        wait_for(grew, timeout=EVERY_BEATS * BEAT_S * 10, what="the watch to count the drops")

        results = producer.wait(producer.unwatch(CLIENT_IP), timeout_s=15)
        assert [r.status.value for r in results] == ["applied"]
        assert not can_connect(client), "removing the watch leaves the drop"


def test_a_watch_counts_what_an_accept_lets_through(
    make_netns: Callable[[], Netns],
    backend: str,
    spawn_worker,
    producer: Producer,
    redis_server: RedisServer,
):
    """An accept ends evaluation in pushfw's chain, so a watch must come before it (iptables:
    watches at the top of PUSHFW, an accept added later inserted below them)."""
    server, client = make_netns(), make_netns()
    with listening_peer(server, client, tag="a"):
        spawn_worker(server, backend=backend, heartbeat_interval_s=str(BEAT_S)).start()
        for sent in (producer.watch(CLIENT_IP), producer.accept(CLIENT_IP)):
            assert [r.status.value for r in producer.wait(sent, timeout_s=15)] == ["applied"]
        for _ in range(3):
            assert can_connect(client)

        def watched() -> bool:
            rows = hit_rows(redis_server)
            mine = [r for r in rows if r["network"] == f"{CLIENT_IP}/32"]
            counts: dict[str, int] = {r["action"]: r["packets"] for r in mine}
            return counts.get("watch", 0) >= 3 and counts.get("accept", 0) >= 3

        wait_for(watched, timeout=EVERY_BEATS * BEAT_S * 10, what="watch and accept counted")


def test_a_list_imported_as_watch_lets_traffic_through_then_as_drop_blocks_it(
    make_netns: Callable[[], Netns],
    set_backend: str,
    spawn_worker,
    producer: Producer,
    redis_server: RedisServer,
    tmp_path: Path,
):
    server, client = make_netns(), make_netns()
    path = tmp_path / "level1.netset"
    path.write_text("# a feed that covers the client's own network\n10.213.0.0/24\n198.18.0.0/15\n")
    with listening_peer(server, client, tag="l"):
        spawn_worker(server, backend=set_backend).start()
        shadow = pushfw_cli(
            redis_server, "import", str(path), "--name", "level1", "--action", "watch", "--wait"
        )
        assert "applied" in shadow.stdout, shadow.stdout
        assert sorted(Firewall(server, set_backend).list_entries("level1")) == [
            "10.213.0.0/24",
            "198.18.0.0/15",
        ]
        assert can_connect(client), "a watch list must let its entries' traffic through"

        drop = pushfw_cli(redis_server, "import", str(path), "--name", "level1", "--wait")
        assert "applied" in drop.stdout, drop.stdout
        assert not can_connect(client), "the same list as a drop must block the client"


def test_the_cli_warns_of_a_watch_wider_than_the_accept_bound_and_lists_watches(
    redis_server: RedisServer,
):
    wide = pushfw_cli(redis_server, "watch", "0.0.0.0/4", "--reason", "too wide")
    assert wide.returncode == 0, wide.stderr
    assert (
        "0.0.0.0/4 is wider than /8, the widest network a watch may cover by default "
        "(min_accept_prefix_v4)" in wide.stderr
    ), wide.stderr
    assert "protected" not in wide.stderr
    helped = pushfw_cli(redis_server, "list", "--help")
    assert "watch" in helped.stdout, "list --action takes watch"
    shown = pushfw_cli(redis_server, "list", "--action", "watch")
    assert shown.returncode == 0, shown.stderr


def test_a_watch_in_the_ledger_reaches_the_kernel_at_the_workers_start(
    netns: Netns, backend: str, spawn_worker, producer: Producer
):
    producer.watch("192.0.2.9", reply=False)
    producer.drop("192.0.2.10", reply=False)
    spawn_worker(netns, backend=backend).start()
    held = {("drop", "192.0.2.10/32"): None, ("watch", "192.0.2.9/32"): None}
    wait_for(lambda: Firewall(netns, backend).rules() == held, what="the reconciled rules")


SCRAPE = """
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
"""


def test_watch_lists_count_per_list_and_per_entry_in_lists_list_hits_and_metrics(
    make_netns: Callable[[], Netns],
    set_backend: str,
    spawn_worker,
    producer: Producer,
    redis_server: RedisServer,
    tmp_path: Path,
):
    """Two watch lists hold the client's network (one element in the shared sets): its
    packets count for both, per list and per entry; an entry that saw nothing is not shown."""
    server, client = make_netns(), make_netns()
    level1, vpc = tmp_path / "level1.netset", tmp_path / "vpc.netset"
    level1.write_text("10.213.0.0/24\n198.18.0.0/15\n")
    vpc.write_text("10.213.0.0/24\n")
    with listening_peer(server, client, tag="h"):
        spawn_worker(
            server,
            backend=set_backend,
            heartbeat_interval_s=str(BEAT_S),
            metrics_listen="127.0.0.1:9477",
        ).start()
        for path in (level1, vpc):  # --wait would judge a host beating every 0.25 s stale
            imported = pushfw_cli(
                redis_server, "import", str(path), "--name", path.stem, "--action", "watch"
            )
            assert imported.returncode == 0, imported.stderr
        fw = Firewall(server, set_backend)
        both = ["10.213.0.0/24", "198.18.0.0/15"]  # one action's lists share their sets
        wait_for(lambda: sorted(fw.list_entries("vpc")) == both, what="both lists loaded")
        for _ in range(3):
            assert can_connect(client), "a watch list must let its entries' traffic through"

        def counted() -> dict[str, Any] | None:
            shown = pushfw_cli(redis_server, "lists", "--json")
            rows = {row["name"]: row for row in json.loads(shown.stdout)}
            done = all((rows[n]["hits"] or 0) >= 3 for n in ("level1", "vpc"))
            return rows if done else None

        wait_for(counted, timeout=EVERY_BEATS * BEAT_S * 10, what="the lists' hits published")
        rows = counted()
        assert rows is not None
        assert rows["level1"]["hits"] == rows["vpc"]["hits"], "one element counts for both"
        assert rows["level1"]["hit_bytes"] > 0

        table = pushfw_cli(redis_server, "lists")
        print(table.stdout)  # the report shows it (pytest -s)
        header = table.stdout.splitlines()[0].split()
        assert "HITS" in header, table.stdout
        for line in table.stdout.splitlines()[1:]:
            assert line.split()[header.index("HITS")].isdigit(), table.stdout

        entries = json.loads(
            pushfw_cli(redis_server, "list", "--hits", "--list", "level1", "--json").stdout
        )
        assert [(e["list"], e["action"], e["network"]) for e in entries] == [
            ("level1", "watch", "10.213.0.0/24")
        ], "only the entry that saw packets, named with its list"
        assert entries[0]["packets"] >= 3 and entries[0]["host"] == server.name
        published = producer.list_hits([server.name])[server.name]["level1"]
        assert [e[0] for e in published.entries] == ["10.213.0.0/24"]
        assert published.packets == entries[0]["packets"], "one entry: its sum is the list's"
        print(pushfw_cli(redis_server, "list", "--hits").stdout)
        both = json.loads(pushfw_cli(redis_server, "list", "--hits", "--json").stdout)
        assert sorted(e["list"] for e in both) == ["level1", "vpc"]

        metrics = server.run(sys.executable, "-c", SCRAPE, "http://127.0.0.1:9477/metrics")
        found = {
            (s.name, s.labels.get("list")): s.value
            for family in text_string_to_metric_families(metrics.stdout)
            for s in family.samples
            if s.name.startswith("pushfw_list_hits")
        }
        assert found[("pushfw_list_hits_packets", "level1")] >= 3
        assert found[("pushfw_list_hits_packets", "vpc")] >= 3
        assert found[("pushfw_list_hits_bytes", "level1")] > 0


def test_watches_flushed_by_hand_are_put_back_at_the_next_heartbeat(
    netns: Netns, backend: str, spawn_worker, producer: Producer
):
    """Only the watch objects go (ipset: its watch sets emptied; iptables: the rules with no
    target deleted; nftables: the watch sets emptied); the worker sees it and reconciles."""
    fw = Firewall(netns, backend)
    worker = spawn_worker(netns, backend=backend, heartbeat_interval_s="0.5").start()
    for sent in (producer.watch("192.0.2.140"), producer.drop("192.0.2.141")):
        assert [r.status.value for r in producer.wait(sent)] == ["applied"]
    want = {("watch", "192.0.2.140/32"): None, ("drop", "192.0.2.141/32"): None}
    assert fw.rules() == want
    worker.pause()  # the kernel as the flush left it, before any heartbeat repairs it
    fw.flush("watch")
    left = fw.rules()
    worker.resume()
    assert left == {("drop", "192.0.2.141/32"): None}
    wait_for(lambda: fw.rules() == want, 15, "the heartbeat to put the watch back")
    assert worker.stop() == 0
    assert worker.log.count("the kernel lost pushfw's rules or hooks") == 1
