"""Lessons from the field, each on real kernel tables in a namespace.

- CrowdSec's nftables bouncer skipped elements already present, so extended bans kept their
  old timeout and ~54k bans expired in the same second (cs-firewall-bouncer #509, #243).
- A full set must fail loudly and permanently, not be retried forever.
- A reload that wipes the firewall (``firewall-cmd --reload``) must not leave pushfw's
  hooks missing until the next restart.
"""

from __future__ import annotations

import re
import time

from pushfw.producer import Producer
from testbed.kernel import Firewall
from tests.conftest import Netns, wait_for


def kernel_timeout_s(ns: Netns, backend: str, ip: str) -> int:
    """The timeout the kernel holds for one element, as `nft list` / `ipset list` show it."""
    if backend == "nftables":
        out = ns.run("nft", "list", "set", "inet", "pushfw", "drop4").stdout
    else:
        out = ns.run("ipset", "list", "pushfw-drop4").stdout
    # the element, then (counters may come first) its timeout: "192.0.2.70 counter ... timeout 3s"
    found = re.search(rf"{re.escape(ip)}\s[^,}}\n]*?timeout (\S+)", out)
    assert found is not None, f"no timeout for {ip} in:\n{out}"
    digits = "".join(c for c in found.group(1) if c.isdigit() or c in "hms")
    total, number = 0, ""
    for c in digits:
        if c.isdigit():
            number += c
        else:
            total += int(number) * {"h": 3600, "m": 60, "s": 1}[c]
            number = ""
    return total + (int(number) if number else 0)


def test_extending_a_ban_renews_the_kernel_timeout(
    netns: Netns, set_backend: str, spawn_worker, producer: Producer
):
    fw = Firewall(netns, set_backend)
    worker = spawn_worker(netns, backend=set_backend).start()
    producer.wait(producer.drop("192.0.2.70", ttl_s=2))
    assert (
        kernel_timeout_s(netns, set_backend, "192.0.2.70") <= 3
    )  # 2 s, rounded up (+1 s on nftables)
    extended = producer.drop("192.0.2.70", ttl_s=600)
    assert [r.status.value for r in producer.wait(extended)] == ["applied"]
    assert kernel_timeout_s(netns, set_backend, "192.0.2.70") > 590
    assert worker.stop() == 0
    time.sleep(3)
    assert fw.dropped() == ["192.0.2.70/32"], "the kernel kept the old 2 s timeout"


def test_a_full_set_is_a_permanent_failure(
    netns: Netns, set_backend: str, spawn_worker, producer: Producer, r
):
    spawn_worker(netns, backend=set_backend, set_size="4", max_deliveries="5").start()
    ids = [producer.drop(f"192.0.2.{80 + i}") for i in range(6)]
    for cmd_id in ids[:4]:
        assert [x.status.value for x in producer.wait(cmd_id)] == ["applied"]
    for cmd_id in ids[4:]:
        results = producer.wait(cmd_id)
        assert [x.status.value for x in results] == ["failed"]
        assert "full" in results[0].detail
    dead = producer.dead(count=10)
    assert sorted(d.cmd for d in dead) == sorted(ids[4:])
    assert all(d.deliveries == 1 for d in dead), "no point retrying a full set"


def test_reconcile_restores_hooks_after_a_firewall_reload(
    netns: Netns, backend: str, spawn_worker, producer: Producer
):
    fw = Firewall(netns, backend)
    spawn_worker(netns, backend=backend, reconcile_interval_s="1").start()
    producer.wait(producer.drop("192.0.2.90"))
    producer.wait(producer.drop("192.0.2.91", ttl_s=600))
    if backend == "nftables":
        netns.run("nft", "flush", "ruleset")
    else:
        netns.run("iptables-legacy", "-D", "INPUT", "-j", "PUSHFW")
        netns.run("ip6tables-legacy", "-D", "INPUT", "-j", "PUSHFW")

    def hooked() -> bool:
        if backend == "nftables":
            listing = netns.run("nft", "list", "chain", "inet", "pushfw", "input", check=False)
            return "@drop4 drop" in listing.stdout
        return "-j PUSHFW" in netns.run("iptables-legacy", "-S", "INPUT").stdout

    wait_for(hooked, timeout=10, what="reconcile to restore the hook")
    wait_for(lambda: fw.dropped() == ["192.0.2.90/32", "192.0.2.91/32"], what="the rules back")
