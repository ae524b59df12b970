"""The reconcile summary an operator reads after a start: rules and lists in one line, an
INFO for a new host's first load, a WARNING only for a kernel that lost what this host
had committed. Real worker processes, redis-server and nftables in a network namespace."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable

import redis

from pushfw.producer import Producer
from pushfw.producer.keys import Keys
from pushfw.worker.ledger import Ledger
from testbed.kernel import Firewall
from tests.conftest import Netns, WorkerProcess, _kernel_backend
from tests.test_lists_kernel import feed


def summary(log: str) -> list[tuple[str, str]]:
    """(level, message) of every reconcile summary line of a worker's JSON log."""
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [
        (line["level"], line["message"])
        for line in lines
        if line["message"].startswith(("reconcile: ", "reconcile repaired drift"))
    ]


def without_time(found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(level, message.rsplit(" in ", 1)[0]) for level, message in found]


def test_a_new_hosts_first_load_is_info_and_a_hand_flush_at_restart_is_drift(
    netns: Netns, spawn_worker: Callable[..., WorkerProcess], producer: Producer, r: redis.Redis
):
    fw = Firewall(netns, _kernel_backend("nftables"))
    producer.drop("192.0.2.1", reply=False)
    producer.drop("192.0.2.2", reply=False)
    producer.load_list("feed", feed(20), reply=False)
    worker = spawn_worker(netns, backend="nftables").start()
    assert fw.dropped() == ["192.0.2.1/32", "192.0.2.2/32"]
    assert len(fw.list_entries("feed")) == 20
    assert worker.stop() == 0
    assert without_time(summary(worker.last_run_log)) == [
        ("INFO", "reconcile: initial load: loaded 2 rules and 1 list from the ledger")
    ]

    worker.start()  # nothing changed: the list is loaded whole again (sets are not read back)
    assert worker.stop() == 0
    assert without_time(summary(worker.last_run_log)) == [
        ("INFO", "reconcile: kernel matches the ledger (2 rules), lists: 1 reloaded")
    ]
    settings = [f"{k}={v}" for k, v in worker.env.items() if k.startswith("PUSHFW_")]
    once = netns.run("env", *settings, sys.executable, "-m", "pushfw.worker", "reconcile")
    assert re.fullmatch(
        r"added 0, removed 0, expiry fixed 0, kept 2 in \d+\.\d{3} s; lists: 1 reloaded\n",
        once.stdout,
    )

    fw.wipe()  # a hand flush (or a reboot) while the worker was away
    worker.start()
    assert fw.dropped() == ["192.0.2.1/32", "192.0.2.2/32"]
    assert len(fw.list_entries("feed")) == 20
    assert worker.stop() == 0
    assert without_time(summary(worker.last_run_log)) == [
        (
            "WARNING",
            "reconcile repaired drift: 2 added, 0 removed, 0 expiry fixed (0 kept); "
            "lists: 1 loaded",
        )
    ]


def test_the_summary_counts_the_lists_loaded_removed_and_refused_at_a_restart(
    netns: Netns, spawn_worker: Callable[..., WorkerProcess], producer: Producer, r: redis.Redis
):
    fw = Firewall(netns, _kernel_backend("nftables"))
    worker = spawn_worker(netns, backend="nftables").start()
    producer.wait(producer.drop("192.0.2.1"))
    producer.wait(producer.load_list("keep", feed(10)))
    producer.wait(producer.load_list("goes", feed(0, "203.0.113.0/24")))
    lost = producer.load_list("lost", feed(0, "198.51.100.0/24"))
    producer.wait(lost)
    assert worker.stop() == 0

    # while the worker is away: one list is deleted, one is new, one loses its content
    producer.delete_list("goes", reply=False)
    producer.load_list("new", feed(0, "198.51.100.77"), action="accept", reply=False)
    [record] = [x for x in producer.lists() if x.name == "lost"]
    assert r.delete(Keys().list_content("lost", record.version)) == 1
    Ledger(r, Keys(), "the-fleet").fold_new()  # the rest of the fleet folds them
    worker.start()
    assert worker.stop() == 0
    assert fw.list_entries("goes") == []
    assert fw.list_entries("new") == ["198.51.100.77/32"]
    assert without_time(summary(worker.last_run_log)) == [
        (
            "WARNING",
            "reconcile repaired drift: 0 added, 0 removed, 0 expiry fixed (1 kept); "
            "lists: 1 loaded, 1 reloaded, 1 removed, 1 refused",
        )
    ]
