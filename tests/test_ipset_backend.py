"""IpsetBackend against the real kernel, inside a network namespace of the test's own.

The backend must run inside the namespace, so each test drives it with a script of steps
(open, add, delete, commit, snapshot, uninstall) that :mod:`testbed.driver` runs under
``ip netns exec``, one JSON result per step. The kernel is then read back the way an
operator would: ``ipset save``, ``ipset test`` and ``iptables-legacy -S``.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from testbed.driver import Step, run, run_process
from tests.conftest import Netns, need

ROOT = Path(__file__).resolve().parents[1]
SETS = {f"pushfw-{action}{v}" for action in ("watch", "accept", "drop") for v in (4, 6)}
_SAVED = re.compile(
    r'add (\S+) (\S+)(?: timeout (\d+))?(?: packets \d+ bytes \d+)?(?: comment "([^"]*)")?'
)


def _spec(steps: tuple[Step, ...], maxelem: int | None) -> dict[str, Any]:
    options = {} if maxelem is None else {"set_size": maxelem}
    return {"backend": "ipset", "options": options, "steps": [list(s) for s in steps]}


def drive(ns: Netns, *steps: Step, maxelem: int | None = None) -> list[Any]:
    """Run ``steps`` in a fresh process inside ``ns``; one result per step."""
    return run(_spec(steps, maxelem), ns)


def drive_failing(ns: Netns, *steps: Step, maxelem: int | None = None) -> str:
    """Run ``steps`` expecting the process to fail; its stderr."""
    proc = run_process(_spec(steps, maxelem), ns)
    assert proc.returncode != 0, proc.stdout
    return proc.stderr


def saved(ns: Netns) -> dict[tuple[str, str], tuple[int, str | None]]:
    """(set, network) -> (kernel timeout s, comment) of every element of pushfw's sets."""
    out: dict[tuple[str, str], tuple[int, str | None]] = {}
    for line in ns.run("ipset", "save").stdout.splitlines():
        found = _SAVED.fullmatch(line)
        if found and found[1] in SETS:
            net = str(ipaddress.ip_network(found[2]))
            out[(found[1], net)] = (int(found[3] or 0), found[4])
    return out


def kernel_rules(ns: Netns) -> list[list[Any]]:
    """The kernel's elements in the shape of a ``snapshot`` step's result."""
    rules = []
    for (set_name, net), (_, comment) in saved(ns).items():
        action = set_name.removeprefix("pushfw-")[:-1]
        exp = int(comment.removeprefix("exp=")) if comment else None
        rules.append([action, net, exp])
    return sorted(rules)


def chain(ns: Netns, v6: bool = False) -> list[str]:
    tool = "ip6tables-legacy" if v6 else "iptables-legacy"
    return [x for x in ns.run(tool, "-S", "PUSHFW").stdout.splitlines() if x.startswith("-A")]


def now_ms() -> int:
    return int(time.time() * 1000)


def timeout_between(exp_ms: int, before_ms: int) -> tuple[int, int]:
    """The kernel timeout ``ipset save`` may show now for an element expiring at ``exp_ms``
    and added after ``before_ms``: the time remaining when added, rounded up, plus a second,
    less the time since (however slow the machine was)."""
    return (exp_ms - now_ms()) // 1000 - 1, -(-(exp_ms - before_ms) // 1000) + 1


@pytest.fixture
def ns(netns: Netns) -> Netns:
    need(shutil.which("ipset") is not None, "ipset is not installed")
    probe = netns.run("ipset", "list", "-n", check=False)
    need(probe.returncode == 0, f"ipset cannot work here (ip_set module?): {probe.stderr}")
    return netns


def test_add_delete_ipv6_network_and_rule_order(ns: Netns):
    results = drive(
        ns,
        ["open"],
        ["add", "drop", "192.0.2.1"],
        ["add", "drop", "203.0.113.0/24"],
        ["add", "drop", "2001:db8::/32"],
        ["add", "accept", "198.51.100.0/24"],
        ["add", "accept", "2001:db8:1::7"],
        ["commit"],
        ["delete", "drop", "192.0.2.1"],
        ["delete", "drop", "198.18.0.1"],  # absent: harmless
        ["commit"],
        ["snapshot"],
    )
    assert results[6]["error"] is None and results[9]["error"] is None
    assert results[10] == [
        ["accept", "198.51.100.0/24", None],
        ["accept", "2001:db8:1::7/128", None],
        ["drop", "2001:db8::/32", None],
        ["drop", "203.0.113.0/24", None],
    ]
    assert kernel_rules(ns) == results[10]
    assert ns.run("ipset", "test", "pushfw-drop4", "203.0.113.77", check=False).returncode == 0
    assert ns.run("ipset", "test", "pushfw-drop4", "203.0.114.1", check=False).returncode != 0
    assert ns.run("ipset", "test", "pushfw-drop6", "2001:db8:ffff::1", check=False).returncode == 0

    drive(ns, ["open"])  # opening again adds no second rule or jump
    assert chain(ns) == [  # watches first, with no target: they count, the chain goes on
        "-A PUSHFW -m set --match-set pushfw-watch4 src",
        "-A PUSHFW -m set --match-set pushfw-accept4 src -j ACCEPT",
        "-A PUSHFW -m set --match-set pushfw-drop4 src -j DROP",
    ]
    assert chain(ns, v6=True) == [
        "-A PUSHFW -m set --match-set pushfw-watch6 src",
        "-A PUSHFW -m set --match-set pushfw-accept6 src -j ACCEPT",
        "-A PUSHFW -m set --match-set pushfw-drop6 src -j DROP",
    ]
    assert ns.run("iptables-legacy", "-S", "INPUT").stdout.count("-j PUSHFW") == 1
    assert ns.run("ip6tables-legacy", "-S", "INPUT").stdout.count("-j PUSHFW") == 1


def test_index_is_rebuilt_from_the_kernel(ns: Netns):
    started = now_ms()
    soon, later = started + 600_000, started + 40 * 86_400_000  # 40 days: past ipset's limit
    first = drive(
        ns,
        ["open"],
        ["add", "drop", "192.0.2.1", soon],
        ["add", "drop", "192.0.2.0/25"],
        ["add", "accept", "192.0.2.0/24", later],
        ["add", "drop", "2001:db8::5", soon + 1],
        ["add", "accept", "2001:db8::/48"],
        ["commit"],
        ["snapshot"],
    )
    assert first[6]["error"] is None
    assert len(first[7]) == 5
    assert drive(ns, ["open"], ["snapshot"])[1] == first[7]
    kernel = saved(ns)
    low, high = timeout_between(soon, started)
    assert low <= kernel[("pushfw-drop4", "192.0.2.1/32")][0] <= high
    assert kernel[("pushfw-drop4", "192.0.2.1/32")][1] == f"exp={soon}"
    assert kernel[("pushfw-accept4", "192.0.2.0/24")] == (0, f"exp={later}")
    assert kernel[("pushfw-drop4", "192.0.2.0/25")] == (0, None)


def test_readding_renews_the_kernel_timeout(ns: Netns):
    for ttl_ms in (600_000, 1_200_000):
        started = now_ms()
        exp = started + ttl_ms
        drive(ns, ["open"], ["add", "drop", "192.0.2.5", exp], ["commit"])
        timeout, comment = saved(ns)[("pushfw-drop4", "192.0.2.5/32")]
        low, high = timeout_between(exp, started)
        assert low <= timeout <= high and comment == f"exp={exp}"

    drive(ns, ["open"], ["add", "drop", "192.0.2.5", None], ["commit"])
    assert saved(ns)[("pushfw-drop4", "192.0.2.5/32")] == (0, None), "permanent from now on"


def test_the_kernel_timeout_counts_from_the_clock_the_backend_was_built_with(ns: Netns):
    """The worker builds its backend with Redis's clock: an expiry 10 minutes past Redis's
    now stays 10 minutes in the kernel, however far the machine's own clock is off."""
    behind_ms = 3_600_000  # Redis's clock an hour behind this machine's
    started = now_ms()
    exp = started - behind_ms + 600_000  # an hour ago by the machine's clock
    spec = _spec((["open"], ["add", "drop", "192.0.2.6", exp], ["commit"]), None)
    spec["options"]["clock_offset_ms"] = -behind_ms
    assert run(spec, ns)[2]["error"] is None
    timeout, comment = saved(ns)[("pushfw-drop4", "192.0.2.6/32")]
    low, high = timeout_between(exp + behind_ms, started)
    assert low <= timeout <= high and comment == f"exp={exp}"


@pytest.mark.alone
def test_timed_element_leaves_the_kernel_by_itself(ns: Netns):
    expires_ms = now_ms() + 3000  # room for the driver's start on a loaded machine
    drive(ns, ["open"], ["add", "drop", "192.0.2.9", expires_ms], ["commit"])
    # no process of pushfw is left running: only the kernel timeout can remove it now
    assert ("pushfw-drop4", "192.0.2.9/32") in saved(ns)
    deadline = time.monotonic() + 8
    while ("pushfw-drop4", "192.0.2.9/32") in saved(ns):
        assert time.monotonic() < deadline, "the kernel kept a timed element"
        time.sleep(0.05)
    late_ms = now_ms() - expires_ms
    # the backstop: the time remaining rounded up, plus a second (the worker deletes first)
    assert 900 <= late_ms < 2500, f"left the kernel {late_ms} ms after its expiry"


def test_full_set_is_a_permanent_failure_and_is_undone(ns: Netns):
    exp, exp2 = now_ms() + 600_000, now_ms() + 900_000
    results = drive(
        ns,
        ["open"],
        ["add_hosts", "drop", "192.0.2.1", 5, None],
        ["commit"],
        ["snapshot"],
        ["add", "drop", "192.0.2.1", exp],
        ["add", "drop", "192.0.2.2"],
        ["add", "drop", "192.0.2.3"],
        ["commit"],
        # renews one, deletes one, then adds one more than fits
        ["add", "drop", "192.0.2.1", exp2],
        ["delete", "drop", "192.0.2.2"],
        ["add_hosts", "drop", "198.51.100.1", 3, None],
        ["commit"],
        ["snapshot"],
        maxelem=4,
    )
    assert results[2]["error"] == "PermanentBackendError"
    assert "is full" in results[2]["detail"]
    assert results[3] == [] and results[7]["error"] is None
    assert results[11]["error"] == "PermanentBackendError"
    before = [["drop", "192.0.2.1/32", exp], ["drop", "192.0.2.2/32", None]]
    assert results[12] == [*before, ["drop", "192.0.2.3/32", None]]
    assert kernel_rules(ns) == results[12], "the index describes the kernel"
    assert drive(ns, ["open"], ["snapshot"], maxelem=4)[1] == results[12]


def test_a_zero_length_prefix_is_refused_before_the_kernel(ns: Netns):
    results = drive(
        ns, ["open"], ["add", "accept", "192.0.2.0/24"], ["add", "accept", "0.0.0.0/0"], ["commit"]
    )
    assert results[3]["error"] == "PermanentBackendError"
    assert saved(ns) == {}


def test_maxelem_change_moves_the_elements(ns: Netns):
    started = now_ms()
    exp = started + 600_000
    drive(ns, ["open"], ["add", "drop", "192.0.2.1", exp], ["add", "drop", "192.0.2.2"], ["commit"])
    assert "maxelem 1000000 " in ns.run("ipset", "list", "-t", "pushfw-drop4").stdout

    results = drive(
        ns, ["open"], ["snapshot"], ["add_hosts", "drop", "198.51.100.1", 4], ["commit"], maxelem=6
    )
    assert "maxelem 6 " in ns.run("ipset", "list", "-t", "pushfw-drop4").stdout
    assert results[1] == [["drop", "192.0.2.1/32", exp], ["drop", "192.0.2.2/32", None]]
    assert results[3]["error"] is None
    after = saved(ns)
    assert after[("pushfw-drop4", "192.0.2.1/32")][1] == f"exp={exp}"
    low, high = timeout_between(exp, started)
    assert low <= after[("pushfw-drop4", "192.0.2.1/32")][0] <= high
    assert len(after) == 6
    assert len(chain(ns)) == 3, "the rules matching the sets survive the swap"

    failed = drive_failing(ns, ["open"], maxelem=4)
    assert "PermanentBackendError" in failed and "is full" in failed, failed
    assert kernel_rules(ns) == [
        *results[1],
        *(["drop", f"198.51.100.{i}/32", None] for i in range(1, 5)),
    ]
    assert ns.run("ipset", "list", "-n").stdout.split() == sorted(SETS, key=_creation_order)


def _creation_order(name: str) -> int:
    return [f"pushfw-{a}{v}" for v in (4, 6) for a in ("watch", "accept", "drop")].index(name)


def test_foreign_rules_in_the_chain_are_left_alone(ns: Netns):
    drive(ns, ["open"])
    ns.run("iptables-legacy", "-D", "PUSHFW", "2")  # our accept rule, removed by hand
    ns.run("iptables-legacy", "-I", "PUSHFW", "-s", "198.51.100.7", "-j", "DROP")
    drive(ns, ["open"])
    assert chain(ns) == [
        "-A PUSHFW -m set --match-set pushfw-watch4 src",
        "-A PUSHFW -m set --match-set pushfw-accept4 src -j ACCEPT",
        "-A PUSHFW -m set --match-set pushfw-drop4 src -j DROP",
        "-A PUSHFW -s 198.51.100.7/32 -j DROP",
    ]


def test_uninstall_removes_only_pushfw(ns: Netns):
    ns.run("ipset", "create", "other", "hash:ip")
    ns.run("iptables-legacy", "-A", "INPUT", "-s", "198.51.100.1", "-j", "DROP")
    results = drive(ns, ["open"], ["add", "drop", "192.0.2.6"], ["commit"], ["uninstall"])
    assert results[3].startswith("removed chain PUSHFW and its jumps (IPv4 and IPv6); sets: ")
    assert "pushfw-drop4" in results[3]
    assert ns.run("ipset", "list", "-n").stdout.split() == ["other"]
    v4 = ns.run("iptables-legacy", "-S").stdout
    assert "PUSHFW" not in v4 and "-A INPUT -s 198.51.100.1/32 -j DROP" in v4
    assert "PUSHFW" not in ns.run("ip6tables-legacy", "-S").stdout
    again = drive(ns, ["uninstall"])[0]
    assert again == "no chain PUSHFW or jump to it was present; sets: none present", (
        "uninstall twice is harmless, and says there was nothing left"
    )


def test_ten_thousand_adds_in_one_batch(ns: Netns):
    exp = now_ms() + 3_600_000
    results = drive(
        ns,
        ["open"],
        ["add_hosts", "drop", "10.0.0.0", 5_000, exp],
        ["add_hosts", "drop", "2001:db8::", 5_000, None],
        ["timed_commit"],
        ["snapshot"],
    )
    assert results[3]["error"] is None
    print(f"10,000 adds in one ipset restore: {results[3]['seconds'] * 1000:.0f} ms")
    assert len(results[4]) == 10_000
    assert "Number of entries: 5000" in ns.run("ipset", "list", "-t", "pushfw-drop4").stdout
    assert "Number of entries: 5000" in ns.run("ipset", "list", "-t", "pushfw-drop6").stdout


def test_kernel_timeout_is_the_time_remaining_rounded_up_plus_one():
    from pushfw.worker.backends.ipset_cmd import MAX_TIMEOUT_S, kernel_timeout_s

    assert kernel_timeout_s(10_001, 10_000) == 2, "rounded up, and the backstop's second"
    assert kernel_timeout_s(11_000, 10_000) == 2
    assert kernel_timeout_s(11_001, 10_000) == 3
    assert kernel_timeout_s(9_000, 10_000) == 2, "already due: the worker deletes it"
    assert kernel_timeout_s((MAX_TIMEOUT_S - 1) * 1000, 0) == MAX_TIMEOUT_S
    assert kernel_timeout_s((MAX_TIMEOUT_S - 1) * 1000 + 1, 0) == 0, "past ipset's limit"


def test_save_output_is_parsed_into_networks():
    from pushfw.worker.backends.ipset_cmd import Element, parse_save

    text = """create pushfw-drop4 hash:net family inet hashsize 1024 maxelem 4 timeout 0 comment
add pushfw-drop4 192.0.2.1 timeout 599 comment "exp=1795783706829"
add pushfw-drop4 192.0.2.0/24 timeout 0
add pushfw-drop4 198.51.100.0/24 timeout 0 comment "by hand"
add pushfw-drop4 198.51.101.0/24 timeout 0 comment "exp=12x"
add pushfw-drop4 203.0.113.0/24 timeout 0 nomatch comment "x y"
add other 192.0.2.2 timeout 0
add pushfw-drop6 2001:db8::/32 timeout 0 comment "exp=5"
add pushfw-drop6 2001:db8::1 timeout 7
"""
    net = ipaddress.ip_network
    assert list(parse_save(text, "pushfw-drop4", 4)) == [
        Element(net("192.0.2.1/32"), 599, 1795783706829),
        Element(net("192.0.2.0/24"), 0, None),
        Element(net("198.51.100.0/24"), 0, None),
        Element(net("198.51.101.0/24"), 0, None),
    ]
    assert list(parse_save(text, "pushfw-drop6", 6)) == [
        Element(net("2001:db8::/32"), 0, 5),
        Element(net("2001:db8::1/128"), 7, None),
    ]


def test_bad_set_prefix_is_a_config_error():
    from pushfw.worker.backends.ipset import IpsetBackend
    from pushfw.worker.errors import ConfigError

    with pytest.raises(ConfigError):
        IpsetBackend(set_prefix="a b")
    with pytest.raises(ConfigError):
        IpsetBackend(set_prefix="x" * 20)
    with pytest.raises(ConfigError):
        IpsetBackend(maxelem=0)


def test_a_restore_that_stops_reading_is_ended_at_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The input is streamed from a thread, so a restore that never reads it (here a stand-in
    that only sleeps) is killed at the bound instead of blocking the worker's write."""
    from pushfw.worker.backends import ipset, ipset_cmd
    from pushfw.worker.errors import BackendError

    stand_in = tmp_path / "ipset"
    stand_in.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    stand_in.chmod(0o755)
    backend = ipset.IpsetBackend()
    backend._exe = str(stand_in)
    monkeypatch.setattr(ipset_cmd, "_RUN_TIMEOUT_S", 0.5)
    lines = (f"add pushfw-drop4 10.0.{i >> 8 & 255}.{i & 255}\n" for i in range(10**6))
    with pytest.raises(BackendError, match="no end within"):
        backend._restore(lines)
    assert subprocess.run(["pgrep", "-f", str(stand_in)], capture_output=True).returncode == 1, (
        "the stand-in restore was left running"
    )
