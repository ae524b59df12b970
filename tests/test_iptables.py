"""End to end: redis-cli-style XADD → worker subprocess in a namespace → kernel table."""

from __future__ import annotations

import sys

from pushfw.producer import Producer
from tests.conftest import Netns, wait_for
from tests.kernel import accepted, chain_rules, dropped

CMD = "{pushfw}:cmd"


def status_of(producer: Producer, cmd_id: str, timeout_s: float = 15) -> str:
    results = producer.wait(cmd_id, timeout_s=timeout_s)
    assert results, f"no result for {cmd_id}"
    return results[0].status.value


def test_insert_delete_ipv6_and_order(netns: Netns, spawn_worker, producer: Producer):
    worker = spawn_worker(netns).start()
    assert status_of(producer, producer.drop("192.0.2.6", reason="ssh brute force")) == "applied"
    assert status_of(producer, producer.drop("2001:db8::/32")) == "applied"
    assert status_of(producer, producer.accept("192.0.2.0/24")) == "applied"
    assert status_of(producer, producer.drop("198.51.100.0/24")) == "applied"

    assert dropped(netns) == ["192.0.2.6/32", "198.51.100.0/24"]
    assert accepted(netns) == ["192.0.2.0/24"]
    assert dropped(netns, v6=True) == ["2001:db8::/32"]
    rules = chain_rules(netns)
    assert rules[0].endswith("-j ACCEPT"), "an allow must come before every ban"
    jumps = netns.run("iptables-legacy", "-S", "INPUT").stdout
    assert jumps.count("-j PUSHFW") == 1
    assert netns.run("ip6tables-legacy", "-S", "INPUT").stdout.count("-j PUSHFW") == 1

    assert status_of(producer, producer.drop("192.0.2.6")) == "unchanged"
    assert status_of(producer, producer.undrop("192.0.2.6")) == "applied"
    assert status_of(producer, producer.undrop("192.0.2.6")) == "unchanged"
    assert dropped(netns) == ["198.51.100.0/24"]
    assert worker.stop() == 0
    assert dropped(netns) == ["198.51.100.0/24"], "stopping the worker never removes a rule"


def test_restart_rebuilds_the_index_from_the_kernel(netns, spawn_worker, producer):
    worker = spawn_worker(netns).start()
    assert status_of(producer, producer.drop("192.0.2.6")) == "applied"
    assert worker.stop() == 0
    worker.start()
    assert status_of(producer, producer.drop("192.0.2.6")) == "unchanged"
    assert dropped(netns) == ["192.0.2.6/32"]
    assert netns.run("iptables-legacy", "-S", "INPUT").stdout.count("-j PUSHFW") == 1
    assert worker.stop() == 0


def test_injection_attempt_is_rejected_with_no_side_effect(netns, spawn_worker, producer, r):
    spawn_worker(netns).start()
    baseline = producer.drop("192.0.2.1")
    assert status_of(producer, baseline) == "applied"
    before = netns.run("iptables-legacy-save").stdout.splitlines()
    attempts = [
        "192.0.2.2; iptables -F",
        "192.0.2.2 -j ACCEPT",
        "$(reboot)",
        "192.0.2.2\n-A INPUT -j DROP",
        "`id`",
    ]
    ids = [r.xadd(CMD, {"op": "drop_insert", "ip": ip}).decode() for ip in attempts]
    for cmd_id in ids:
        assert status_of(producer, cmd_id) == "rejected"
    after = netns.run("iptables-legacy-save").stdout.splitlines()
    assert rules_only(after) == rules_only(before)


def rules_only(save_lines: list[str]) -> list[str]:
    return [x for x in save_lines if not x.startswith(("#", ":"))]


def test_protected_network_refused(netns, spawn_worker, producer, r):
    spawn_worker(netns, protect="192.0.2.0/24").start()
    for ip in ("127.0.0.1", "127.0.0.0/8", "::1", "192.0.2.77", "0.0.0.0/0"):
        cmd_id = r.xadd(CMD, {"op": "DROP_INSERT", "ip": ip}).decode()
        results = producer.wait(cmd_id)
        assert results and results[0].status.value == "rejected", ip
        assert "protected" in results[0].detail
    assert dropped(netns) == []
    assert dropped(netns, v6=True) == []


def test_timed_rule_leaves_the_kernel_on_time(netns, spawn_worker, producer, r):
    spawn_worker(netns).start()
    cmd_id = r.xadd(CMD, {"op": "TTL_DROP_INSERT", "ip": "192.0.2.9", "ttl": "2"}).decode()
    assert status_of(producer, cmd_id) == "applied"
    rules = chain_rules(netns)
    expires_ms = int(cmd_id.split("-")[0]) + 2000
    assert any(f"pushfw exp={expires_ms}" in line for line in rules), rules
    wait_for(lambda: dropped(netns) == [], timeout=5, what="the timed rule to leave the kernel")
    seconds, micros = r.time()
    lag_ms = seconds * 1000 + micros // 1000 - expires_ms
    assert lag_ms < 1000, f"removed {lag_ms} ms after its expiry"


def test_uninstall_removes_only_pushfw(netns, spawn_worker, producer):
    netns.run("iptables-legacy", "-A", "INPUT", "-s", "198.51.100.1", "-j", "DROP")
    worker = spawn_worker(netns).start()
    assert status_of(producer, producer.drop("192.0.2.6")) == "applied"
    assert worker.stop() == 0
    settings = [f"{k}={v}" for k, v in worker.env.items() if k.startswith("PUSHFW_")]
    out = netns.run("env", *settings, sys.executable, "-m", "pushfw.worker", "uninstall")
    assert "removed chain PUSHFW" in out.stdout
    rules = netns.run("iptables-legacy", "-S").stdout
    assert "PUSHFW" not in rules
    assert "-A INPUT -s 198.51.100.1/32 -j DROP" in rules
    assert "PUSHFW" not in netns.run("ip6tables-legacy", "-S").stdout
