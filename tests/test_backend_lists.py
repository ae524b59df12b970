"""Named lists (:meth:`Backend.load_list` and friends) checked against every set backend.

Like :mod:`tests.test_backend_contract`, a kernel backend runs inside the namespace it
manages: each test writes a script of steps, run here for memory and by
:mod:`testbed.driver` under ``ip netns exec`` for nftables and ipset.
The ``content`` step reads what the kernel holds for a list with the operator's tools
(``nft -j list table``, ``ipset save``), never through the backend under test.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from testbed.driver import Script, run_script
from testbed.kernel import by_family, list_content
from tests.conftest import Netns, wait_for
from tests.test_backend_contract import Subject, _subject_for
from tests.test_packets import CLIENT_IP, can_connect, listening_peer

LIST_BACKENDS = ("memory", "nftables", "ipset")


def run(subject: Subject, script: Script, **options: Any) -> list[Any]:
    return subject.run(script, **options)


def content(
    backend_name: str, name: str, backend: Any = None, ns: Netns | None = None
) -> list[str]:
    return list_content(backend_name, name, backend, ns)


@pytest.fixture(params=LIST_BACKENDS)
def subject(request: pytest.FixtureRequest) -> Subject:
    return _subject_for(str(request.param), request)


@pytest.fixture(params=LIST_BACKENDS[1:])
def kernel_subject(request: pytest.FixtureRequest) -> Subject:
    return _subject_for(str(request.param), request)


def now_ms() -> int:
    return int(time.time() * 1000)


def ok(result: Any) -> None:
    assert result == {"error": None}, result


FIRST = ["192.0.2.0/24", "198.51.100.7/32", "10.0.0.0/8", "2001:db8::/32", "2001:db8:1::1/128"]
SECOND = ["192.0.2.0/25", "203.0.113.0/24", "2001:db8:2::/48"]


ordered = by_family


# --- the contract ---


def test_load_then_names_and_content(subject: Subject):
    s = Script()
    s("open")
    before = s("names")
    loaded = s("load", "bad", "drop", FIRST)
    names = s("names")
    held = s("content", "bad")
    s("load", "good", "accept", [])  # an empty list exists too
    both = s("names")

    r = run(subject, s)
    ok(r[loaded])
    assert r[before] == []
    assert r[names] == ["bad"]
    assert r[held] == ordered(FIRST)
    assert r[both] == ["bad", "good"]


def test_load_replaces_the_content_exactly(subject: Subject):
    s = Script()
    s("open")
    s("load", "bad", "drop", FIRST)
    again = s("load", "bad", "drop", SECOND)
    held = s("content", "bad")
    s("add", "drop", "192.0.2.99")
    committed = s("commit")  # rules and lists live side by side
    rules = s("snapshot")
    held_after_commit = s("content", "bad")

    r = run(subject, s)
    ok(r[again])
    assert r[held] == ordered(SECOND)
    assert r[committed]["error"] is None
    assert r[rules] == [["drop", "192.0.2.99/32", None]], "a list's entries are not rules"
    assert r[held_after_commit] == ordered(SECOND)


def test_change_adds_and_removes_and_repeats_harmlessly(subject: Subject):
    s = Script()
    s("open")
    s("load", "bad", "drop", FIRST)
    changed = s("change", "bad", "drop", ["203.0.113.0/24", "2001:db8:9::/48"], FIRST[:2])
    held = s("content", "bad")
    # a duplicate add, an absent remove (of a prefix length the list never held), twice
    again = s("change", "bad", "drop", ["203.0.113.0/24"], [FIRST[0], "172.16.0.0/12"])
    twice = s("change", "bad", "drop", ["203.0.113.0/24"], [FIRST[0], "172.16.0.0/12"])
    held_again = s("content", "bad")

    r = run(subject, s)
    ok(r[changed])
    want = ordered([*FIRST[2:], "203.0.113.0/24", "2001:db8:9::/48"])
    assert r[held] == want
    ok(r[again])
    ok(r[twice])
    assert r[held_again] == want


def test_a_refused_load_keeps_the_previous_content(kernel_subject: Subject):
    """Entries a kernel tool would refuse (or resolve in the DNS) are refused before any I/O;
    the memory backend takes entries as given (see the injected failure below)."""
    s = Script()
    s("open")
    s("load", "bad", "drop", FIRST)
    host_bits = s("load", "bad", "drop", [*SECOND, "10.0.0.1/8"])  # refused before any I/O
    not_an_address = s("load", "bad", "drop", [*SECOND, "example.com/32"])
    held = s("content", "bad")
    bad_change = s("change", "bad", "drop", ["203.0.113.0/24"], ["0.0.0.0/0"])
    held_after_change = s("content", "bad")

    r = run(kernel_subject, s)
    for refused in (host_bits, not_an_address, bad_change):
        assert r[refused]["error"] == "PermanentBackendError", r[refused]
    assert r[held] == ordered(FIRST)
    assert r[held_after_change] == ordered(FIRST)


def test_memory_failure_injected_keeps_the_previous_content():
    s = Script()
    s("load", "bad", "drop", FIRST)
    failed = s("load", "bad", "drop", ["203.0.113.9/32", *SECOND])
    held = s("content", "bad")
    spec = {"backend": "memory", "options": {"memory_fail": ["203.0.113.9/32"]}, "steps": s.steps}

    r = run_script(spec)
    assert r[failed]["error"] == "BackendError"
    assert r[held] == ordered(FIRST)


def test_nftables_refused_transaction_keeps_the_previous_content(
    request: pytest.FixtureRequest,
):
    """A timeout past the kernel's range: nf_tables refuses the whole transaction."""
    subject = _subject_for("nftables", request)
    s = Script()
    s("open")
    s("load", "bad", "drop", FIRST)
    refused = s("load", "bad", "drop", SECOND, now_ms() + 5 * 10**18)
    held = s("content", "bad")
    intact = s("intact")

    r = run(subject, s)
    assert r[refused]["error"] == "BackendError", r[refused]
    assert r[held] == ordered(FIRST)
    assert r[intact] is True


def test_nftables_fills_a_large_list_in_chunks_and_swaps_it_in(
    request: pytest.FixtureRequest,
):
    """Past ``list_chunk`` changed elements (2 here) a load fills the other slot's shared
    sets, a chunk per transaction, and swaps them in; smaller changes go to the live slot.
    Sets of a fill cut short
    (made here by hand, unmatched by any rule) are removed by the next start, or cleared
    by the next load; a chunk the kernel refuses leaves the list as it was."""
    subject = _subject_for("nftables", request)

    def has(set_name: str) -> int:
        """0 if the kernel holds that set (``shell`` steps give the exit code)."""
        return s("shell", "sh", "-c", f"nft list sets inet | grep -q 'set {set_name} '")

    def leave_a_fill() -> int:
        """The b slot's /32 set with an element, as a killed fill would leave it."""
        made = s(
            "shell", "nft", "add", "set", "inet", "pushfw", "lists_drop4_32b",
            "{ type ipv4_addr; flags timeout; }",
        )  # fmt: skip
        s("shell", "nft", "add", "element", "inet", "pushfw", "lists_drop4_32b", "{ 192.0.2.77 }")
        return made

    s = Script()
    s("open")
    s("load", "big", "drop", FIRST)
    first = s("content", "big")
    plain_first, b_first = has("lists_drop4_32"), has("lists_drop4_32b")
    s("change", "big", "drop", ["203.0.113.0/24"], ["198.51.100.7/32"])
    changed = s("content", "big")
    s("load", "big", "drop", SECOND)
    second = s("content", "big")
    plain_second, b_second = has("lists_drop4_24"), has("lists_drop4_24b")
    left = leave_a_fill()
    s("open@b")  # a restart
    after_start = s("content", "big")
    left_again = leave_a_fill()
    s("load", "big", "drop", FIRST)  # by the first instance, which knows the b slot is live
    third = s("content", "big")
    refused = s("load", "big", "drop", SECOND, now_ms() + 5 * 10**18)
    kept = s("content", "big")
    names = s("names")
    intact = s("intact")

    r = run(subject, s, list_chunk=2)
    assert r[first] == ordered(FIRST)
    assert (r[plain_first], r[b_first]) == (1, 0), "a first load fills the other slot"
    assert r[changed] == ordered([*(e for e in FIRST if e != "198.51.100.7/32"), "203.0.113.0/24"])
    assert r[second] == ordered(SECOND)
    assert (r[plain_second], r[b_second]) == (0, 1), "the reload swapped the plain slot in"
    assert r[left] == 0 and r[left_again] == 0
    assert r[after_start] == ordered(SECOND), "the start removed the unfinished fill"
    assert r[third] == ordered(FIRST), "the load cleared the unfinished fill first"
    assert r[refused]["error"] == "BackendError", r[refused]
    assert r[kept] == ordered(FIRST)
    assert r[names] == ["big"] and r[intact] is True


def test_a_timed_list_leaves_the_kernel_on_its_own(kernel_subject: Subject):
    s = Script()
    s("open")
    loaded = s("load", "soon", "drop", FIRST, now_ms() + 2000)
    s("load", "later", "accept", SECOND, now_ms() + 600_000)  # nftables: drop lists share sets
    added = s("change", "soon", "drop", ["203.0.113.0/24"], [], now_ms() + 2000)
    held = s("content", "soon")

    r = run(kernel_subject, s)
    ok(r[loaded])
    ok(r[added])
    assert r[held] == ordered([*FIRST, "203.0.113.0/24"])
    started = time.monotonic()
    wait_for(
        lambda: content(kernel_subject.name, "soon", ns=kernel_subject.ns) == [],
        timeout=15,
        what="the kernel to time out the list's entries",
    )
    assert time.monotonic() - started > 0.5, "entries left long before their expiry"
    assert content(kernel_subject.name, "later", ns=kernel_subject.ns) == ordered(SECOND)


def test_remove_list_removes_sets_and_rules_and_is_harmless_twice(subject: Subject):
    s = Script()
    s("open")
    s("load", "bad", "drop", FIRST)
    s("load", "good", "accept", SECOND)
    removed = s("remove", "bad")
    twice = s("remove", "bad")
    never = s("remove", "never_loaded")
    names = s("names")
    held = s("content", "bad")
    intact = s("intact")

    r = run(subject, s)
    for result in (removed, twice, never):
        ok(r[result])
    assert r[names] == ["good"]
    assert r[held] == []
    assert r[intact] is True
    if subject.ns is not None:  # nothing of the list is left in the kernel, rules included
        dump = _kernel_dump(subject.ns)
        assert "bad" not in dump and "good" in dump


def _kernel_dump(ns: Netns) -> str:
    nft = ns.run("nft", "list", "ruleset", check=False).stdout
    legacy = ns.run("iptables-legacy-save", check=False).stdout
    six = ns.run("ip6tables-legacy-save", check=False).stdout
    return nft + legacy + six + ns.run("ipset", "list", "-n", check=False).stdout


def _hand_removal(backend: str) -> list[list[str]]:
    """Commands an operator might run that take a loaded list's kernel objects away."""
    if backend == "nftables":
        return [["nft", "flush", "ruleset"]]
    return [["iptables-legacy", "-F", "PUSHFW"], ["ipset", "destroy", "pushfw-md-bad"]]


def test_a_restart_lifts_nothing_until_every_list_is_loaded_again_then_exactly(
    kernel_subject: Subject,
):
    """The kernel keeps the union of the lists, not each list: a restarted worker does not
    know what another list held, so until every list it finds is loaded again its loads only
    add; the last one makes the shared sets exactly the lists' union."""
    s = Script()
    s("open")
    s("load", "a", "drop", ["192.0.2.1/32", "192.0.2.2/32"])
    s("load", "b", "drop", ["198.51.100.0/24"])
    s("open@b")  # a restart; meanwhile a dropped 192.0.2.2
    ok_a = s("load@b", "a", "drop", ["192.0.2.1/32"])
    meanwhile = s("content@b", "a")
    ok_b = s("load@b", "b", "drop", ["198.51.100.0/24", "203.0.113.9/32"])
    settled, names, intact = s("content@b", "a"), s("names@b"), s("intact@b")
    gone = s("remove@b", "b")
    after = s("content@b", "a")

    r = run(kernel_subject, s)
    for result in (ok_a, ok_b, gone):
        ok(r[result])
    assert r[meanwhile] == ordered(["192.0.2.1/32", "192.0.2.2/32", "198.51.100.0/24"])
    assert r[settled] == ordered(["192.0.2.1/32", "198.51.100.0/24", "203.0.113.9/32"])
    assert (r[names], r[intact]) == (["a", "b"], True)
    assert r[after] == ["192.0.2.1/32"]


def test_a_change_removing_an_entry_deleted_by_hand_still_applies(kernel_subject: Subject):
    """nftables fails a whole transaction on deleting an absent element: the shared sets
    are refilled instead."""
    if kernel_subject.name == "nftables":
        by_hand = ["nft", "delete", "element", "inet", "pushfw", "lists_drop4_32", "{ 192.0.2.2 }"]
    else:
        by_hand = ["ipset", "del", "pushfw-lists-d4", "192.0.2.2"]
    s = Script()
    s("open")
    s("load", "a", "drop", ["192.0.2.1/32", "192.0.2.2/32", "192.0.2.3/32"])
    deleted = s("shell", *by_hand)
    changed = s("change", "a", "drop", ["198.51.100.0/24"], ["192.0.2.2/32"])
    held = s("content", "a")

    r = run(kernel_subject, s)
    assert r[deleted] == 0
    ok(r[changed])
    assert r[held] == ordered(["192.0.2.1/32", "192.0.2.3/32", "198.51.100.0/24"])


def test_intact_sees_a_list_removed_by_hand(kernel_subject: Subject):
    s = Script()
    s("open")
    s("load", "bad", "drop", FIRST)
    before = s("intact")
    for command in _hand_removal(kernel_subject.name):
        s("shell", *command)
    after = s("intact")
    s("open@b")  # a restart sees the list gone (or half gone), and writes no rule for it
    names = s("names@b")
    intact_b = s("intact@b")
    reloaded = s("load@b", "bad", "drop", FIRST)  # what the worker does for a list not there
    repaired = s("intact@b")

    r = run(kernel_subject, s)
    assert r[before] is True
    assert r[after] is False
    assert r[names] == []
    assert r[intact_b] is True
    ok(r[reloaded])
    assert r[repaired] is True


@pytest.mark.parametrize("action", ["drop", "watch"])
def test_a_list_emptied_by_hand_is_no_longer_held_but_one_a_change_emptied_is(
    kernel_subject: Subject, action: str
):
    """An operator's flush leaves the sets (and rules) but no element: a list to load again.
    A change that removes a family's last entries leaves an empty set too, rightly. So for
    a watch (shadow) list, whose shared sets are its action's own."""
    if kernel_subject.name == "nftables":
        flush = ["nft", "flush", "set", "inet", "pushfw", f"lists_{action}4_24"]
    else:
        flush = ["ipset", "flush", f"pushfw-lists-{action[0]}4"]
    s = Script()
    s("open")
    s("load", "bad", action, FIRST)
    s("change", "bad", action, [], [e for e in FIRST if ":" in e])
    quiet, held = s("intact"), s("names")
    s("shell", *flush)
    alarmed, missing = s("intact"), s("names")
    ok_ = s("load", "bad", action, FIRST)
    repaired, content_ = s("intact"), s("content", "bad")

    r = run(kernel_subject, s)
    assert (r[quiet], r[held]) == (True, ["bad"]), "an empty family after a change is no alarm"
    assert (r[alarmed], r[missing]) == (False, [])
    ok(r[ok_])
    assert (r[repaired], r[content_]) == (True, ordered(FIRST))


def test_open_keeps_lists_and_uninstall_removes_them(subject: Subject):
    s = Script()
    s("open")
    s("load", "bad", "drop", FIRST)
    s("open")  # as a restart does: open() reads the kernel again
    kept = s("content", "bad")
    intact = s("intact")
    s("uninstall")
    names = s("names")

    r = run(subject, s)
    assert r[kept] == ordered(FIRST), "open() must not touch a list it finds"
    assert r[intact] is True
    if subject.ns is not None:  # the memory backend's uninstall() keeps its lists
        assert r[names] == []
        assert "bad" not in _kernel_dump(subject.ns)


# --- real packets ---


def test_a_drop_list_blocks_real_packets_and_an_accept_list_beats_a_drop(
    make_netns: Callable[[], Netns], kernel_subject: Subject
):
    server = kernel_subject.ns
    assert server is not None

    def steps(*step: Any) -> list[Any]:
        s = Script()
        s("open")
        s(*step)
        return run(kernel_subject, s)

    with listening_peer(server, client := make_netns(), tag="l"):
        ok(steps("load", "bad", "drop", ["192.0.2.0/24", "10.213.0.0/24"])[1])
        assert not can_connect(client), "a drop list holding the client's network lets it in"
        ok(steps("remove", "bad")[1])
        assert can_connect(client), "pings are still blocked after remove_list"

        s = Script()
        s("open")
        s("add", "drop", CLIENT_IP)
        s("commit")
        s("load", "good", "accept", ["10.213.0.0/24"])
        run(kernel_subject, s)
        assert can_connect(client), "an accept list must win over a drop rule"
        ok(steps("remove", "good")[1])
        assert not can_connect(client), (
            "the drop rule is back in force once the accept list is gone"
        )


def _hook_rules(backend: str, ns: Netns) -> int:
    """The rules a packet walks, counted in the kernel's own listing."""
    if backend == "nftables":
        listing = json.loads(ns.run("nft", "-j", "list", "chain", "inet", "pushfw", "input").stdout)
        return sum(1 for item in listing["nftables"] if "rule" in item)
    saved = ns.run("iptables-legacy-save").stdout + ns.run("ip6tables-legacy-save").stdout
    return sum(1 for line in saved.splitlines() if line.startswith("-A PUSHFW"))


def _small_list(index: int) -> list[str]:
    """A few entries of several prefix lengths, the same lengths for every index."""
    return [
        f"10.{index}.0.0/16",
        f"172.16.{index}.0/24",
        f"192.168.{index}.7/32",
        f"2001:db8:{index}::/48",
    ]


def test_the_rules_a_packet_walks_do_not_grow_with_the_number_of_lists(
    make_netns: Callable[[], Netns], kernel_subject: Subject
):
    """A drop list and an accept list, then 31 more drop lists of the same shape: the
    hook's rules are as many (counted in the kernel's listing); removing a list that
    overlaps another removes only what no other list holds; a listed client is dropped
    while the lists are loaded, and an accept list still beats them all."""
    server = kernel_subject.ns
    assert server is not None
    with listening_peer(server, client := make_netns(), tag="n"):
        _walk_lists(kernel_subject, server, client)


def _walk_lists(kernel_subject: Subject, server: Netns, client: Netns) -> None:
    client_list = ["10.213.0.0/24", "10.1.0.0/16"]  # 10.1.0.0/16 is in list first too

    def base(s: Script) -> None:
        s("open")
        s("load", "first", "drop", _small_list(1))
        s("load", "allow", "accept", ["198.18.0.0/24"])

    s = Script()
    base(s)
    run(kernel_subject, s)
    one = _hook_rules(kernel_subject.name, server)
    s = Script()
    base(s)  # a new process: the lists it changes must be loaded by it
    for index in range(2, 32):
        s("load", f"more{index}", "drop", _small_list(index))
    s("load", "client", "drop", client_list)
    names = s("names")
    removed = s("remove", "first")
    kept = s("content", "client")
    r = run(kernel_subject, s)
    assert len(r[names]) == 33
    ok(r[removed])
    many = _hook_rules(kernel_subject.name, server)
    assert many == one, f"{one} rules with 2 lists, {many} with 33"
    assert "10.1.0.0/16" in r[kept], "removing a list took another list's overlapping entry"
    assert "10.213.0.0/24" in r[kept] and "172.16.1.0/24" not in r[kept]

    assert not can_connect(client), "a listed client got in while 32 lists are loaded"
    s = Script()
    s("open")
    ok_ = s("load", "allow", "accept", ["198.18.0.0/24", "10.213.0.0/24"])
    ok(run(kernel_subject, s)[ok_])
    assert can_connect(client), "an accept list must beat every drop list"


# --- scale: a figure to read, not a timed assertion ---


def test_a_list_of_120k_entries_loads_whole(kernel_subject: Subject):
    """More than two of nftables' 50,000-entry chunks; ``bench.lists`` loads a million."""
    count = 120_000
    base = int(ipaddress.IPv4Address("11.0.0.0"))
    entries = [  # hosts and /28 networks, none overlapping
        f"{ipaddress.IPv4Address(base + 16 * i)}/{32 if i % 2 else 28}" for i in range(count)
    ]
    s = Script()
    s("open")
    s("load", "big", "drop", entries)
    changed = s("change", "big", "drop", ["203.0.113.0/24"], entries[:2])  # a grown set
    started = time.monotonic()
    r = run(kernel_subject, s)
    seconds = time.monotonic() - started
    ok(r[1])
    ok(r[changed])
    held = content(kernel_subject.name, "big", ns=kernel_subject.ns)
    print(f"\n{kernel_subject.name}: {count} entries loaded in {seconds:.2f} s (open included)")
    assert len(held) == count - 1
