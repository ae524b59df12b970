"""End to end on every kernel backend: XADD → worker subprocess in a namespace → kernel."""

from __future__ import annotations

import sys

from pushfw.producer import Producer
from pushfw.producer.connection import redis_ms
from testbed.kernel import Firewall, chain_rules
from tests.conftest import Netns, wait_for

CMD = "{pushfw}:cmd"


def status_of(producer: Producer, cmd_id: str, timeout_s: float = 15) -> str:
    results = producer.wait(cmd_id, timeout_s=timeout_s)
    assert results, f"no result for {cmd_id}"
    return results[0].status.value


def test_insert_delete_ipv6_networks(netns: Netns, backend: str, spawn_worker, producer: Producer):
    fw = Firewall(netns, backend)
    worker = spawn_worker(netns, backend=backend).start()
    assert status_of(producer, producer.drop("192.0.2.6", reason="ssh brute force")) == "applied"
    assert status_of(producer, producer.drop("2001:db8::/32")) == "applied"
    assert status_of(producer, producer.drop("2001:db8:1::7")) == "applied"
    assert status_of(producer, producer.accept("192.0.2.0/24")) == "applied"
    assert status_of(producer, producer.drop("198.51.100.0/24")) == "applied"
    assert status_of(producer, producer.drop("10.0.0.0/8")) == "applied"
    assert status_of(producer, producer.drop("10.1.0.0/16")) == "applied", "nested networks"

    assert fw.dropped() == ["10.0.0.0/8", "10.1.0.0/16", "192.0.2.6/32", "198.51.100.0/24"]
    assert fw.accepted() == ["192.0.2.0/24"]
    assert fw.dropped(v6=True) == ["2001:db8::/32", "2001:db8:1::7/128"]

    assert status_of(producer, producer.drop("192.0.2.6")) == "unchanged"
    assert status_of(producer, producer.undrop("192.0.2.6")) == "applied"
    assert status_of(producer, producer.undrop("192.0.2.6")) == "unchanged"
    assert status_of(producer, producer.undrop("10.0.0.0/8")) == "applied"
    assert fw.dropped() == ["10.1.0.0/16", "198.51.100.0/24"]
    assert worker.stop() == 0
    assert fw.dropped() == ["10.1.0.0/16", "198.51.100.0/24"], "stopping never removes a rule"


def test_iptables_chain_order_and_one_jump(netns, spawn_worker, producer):
    worker = spawn_worker(netns, backend="iptables").start()
    producer.wait(producer.drop("198.51.100.0/24"))
    producer.wait(producer.accept("192.0.2.0/24"))
    assert chain_rules(netns)[0].endswith("-j ACCEPT"), "an allow must come before every ban"
    assert worker.stop() == 0
    worker.start()
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        assert netns.run(tool, "-S", "INPUT").stdout.count("-j PUSHFW") == 1


def test_restart_rebuilds_the_index_from_the_kernel(netns, backend, spawn_worker, producer):
    fw = Firewall(netns, backend)
    worker = spawn_worker(netns, backend=backend).start()
    assert status_of(producer, producer.drop("192.0.2.6")) == "applied"
    timed = producer.drop("192.0.2.7", ttl_s=600)
    assert status_of(producer, timed) == "applied"
    assert worker.stop() == 0
    worker.start()
    assert status_of(producer, producer.drop("192.0.2.6")) == "unchanged"
    assert fw.dropped() == ["192.0.2.6/32", "192.0.2.7/32"]
    assert fw.rules()[("drop", "192.0.2.7/32")] == int(timed.split("-")[0]) + 600_000
    assert worker.stop() == 0
    assert "reconcile repaired drift" not in worker.log, "the index matched the kernel"


def test_injection_attempt_is_rejected_with_no_side_effect(
    netns, backend, spawn_worker, producer, r
):
    fw = Firewall(netns, backend)
    spawn_worker(netns, backend=backend).start()
    assert status_of(producer, producer.drop("192.0.2.1")) == "applied"
    before = fw.dump()
    attempts = [
        "192.0.2.2; iptables -F",
        "192.0.2.2 -j ACCEPT",
        "$(reboot)",
        "192.0.2.2\n-A INPUT -j DROP",
        "`id`",
        "192.0.2.2 } ; flush ruleset ; add element inet pushfw drop4 { 1.1.1.1",
    ]
    ids = [r.xadd(CMD, {"reply": "1", "op": "drop_insert", "ip": ip}).decode() for ip in attempts]
    for cmd_id in ids:
        assert status_of(producer, cmd_id) == "rejected"
    assert fw.dump() == before


def test_protected_network_refused(netns, backend, spawn_worker, producer, r):
    fw = Firewall(netns, backend)
    spawn_worker(netns, backend=backend, protect="192.0.2.0/24").start()
    for ip in ("127.0.0.1", "127.0.0.0/8", "::1", "192.0.2.77", "0.0.0.0/0", "::ffff:127.0.0.1"):
        cmd_id = r.xadd(CMD, {"reply": "1", "op": "DROP_INSERT", "ip": ip}).decode()
        results = producer.wait(cmd_id)
        assert results and results[0].status.value == "rejected", ip
        assert "protected" in results[0].detail
    assert fw.dropped() == []
    assert fw.dropped(v6=True) == []


def test_timed_rule_leaves_the_kernel_on_time(netns, backend, spawn_worker, producer, r):
    fw = Firewall(netns, backend)
    spawn_worker(netns, backend=backend).start()
    cmd_id = r.xadd(
        CMD, {"reply": "1", "op": "TTL_DROP_INSERT", "ip": "192.0.2.9", "ttl": "2"}
    ).decode()
    assert status_of(producer, cmd_id) == "applied"
    expires_ms = int(cmd_id.split("-")[0]) + 2000
    assert fw.rules() == {("drop", "192.0.2.9/32"): expires_ms}
    wait_for(lambda: fw.dropped() == [], timeout=5, what="the timed rule to leave the kernel")
    lag_ms = redis_ms(r) - expires_ms
    assert lag_ms < 1000, f"removed {lag_ms} ms after its expiry"


def test_uninstall_removes_only_pushfw(netns, backend, spawn_worker, producer):
    fw = Firewall(netns, backend)
    netns.run("iptables-legacy", "-A", "INPUT", "-s", "198.51.100.1", "-j", "DROP")
    netns.run("nft", "add", "table", "inet", "other")
    netns.run("ipset", "create", "other", "hash:ip")
    worker = spawn_worker(netns, backend=backend).start()
    assert status_of(producer, producer.drop("192.0.2.6")) == "applied"
    assert worker.stop() == 0
    settings = [f"{k}={v}" for k, v in worker.env.items() if k.startswith("PUSHFW_")]
    netns.run("env", *settings, sys.executable, "-m", "pushfw.worker", "uninstall")
    assert fw.rules() == {}
    everything = fw.dump()
    assert "pushfw" not in everything.lower()
    assert "-A INPUT -s 198.51.100.1/32 -j DROP" in everything
    assert "table inet other" in everything
    assert "create other hash:ip" in everything
