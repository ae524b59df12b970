"""The guarantees written on :class:`Backend` checked against every backend, one suite.

What :meth:`Backend.commit` and its friends promise: add and delete are idempotent, a batch
is all-or-nothing per table and address family, a failed batch and :meth:`Backend.discard`
forget the staged changes, :meth:`Backend.committed` describes the kernel (expiry ms
included), :meth:`Backend.open` may be called again and re-reads the kernel, and
:meth:`Backend.uninstall` leaves every other rule alone.

A kernel backend must run inside the network namespace it manages, so each test writes a
SCRIPT of steps that :mod:`testbed.driver` runs as ``python -m testbed.driver`` under
``ip netns exec``; the ``kernel`` step reads the namespace's firewall with
:class:`testbed.kernel.Firewall` at that point of the script. The memory backend runs the same
scripts in the test process; it has no kernel, so its ``kernel`` steps answer None.
"""

from __future__ import annotations

import ipaddress
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from testbed.driver import Script, Step, run
from testbed.kernel import kernel_view
from tests.conftest import Netns, need

BACKENDS = ("memory", "iptables", "nftables", "ipset")
MAX_PREFIX = {4: 32, 6: 128}


# --- the test side: where scripts run (testbed.driver runs them) ---


@dataclass
class Subject:
    """One backend under test: where its scripts run and how to read its kernel."""

    name: str
    ns: Netns | None
    private_lock: Path | None = None

    @property
    def kernel(self) -> bool:
        return self.ns is not None

    def run(self, script: Script, **options: Any) -> list[Any]:
        spec = {"backend": self.name, "options": options, "steps": script.steps}
        return run(spec, self.ns, self.private_lock)


def _subject_for(name: str, request: pytest.FixtureRequest, private_lock: bool = False) -> Subject:
    """Memory in this process, a kernel backend in a namespace of the test's own (with an
    xtables lock of its own if ``private_lock``); a missing tool skips (fails under CI)."""
    if name == "memory":
        return Subject(name, None)
    ns: Netns = request.getfixturevalue("netns")
    tool = {"iptables": "iptables-legacy", "nftables": "nft", "ipset": "ipset"}[name]
    need(shutil.which(tool) is not None, f"{tool} is not installed")
    if name == "ipset":
        probe = ns.run("ipset", "list", "-n", check=False)
        need(probe.returncode == 0, f"ipset cannot work here (ip_set module?): {probe.stderr}")
    if private_lock:
        return Subject(name, ns, private_lock=request.getfixturevalue("private_xtables_lock"))
    return Subject(name, ns)


@pytest.fixture(params=BACKENDS)
def subject(request: pytest.FixtureRequest) -> Subject:
    """Each backend in turn: memory in this process, the kernel ones in a namespace."""
    return _subject_for(str(request.param), request)


def agrees(snapshot: list[Any], kernel: dict[str, Any] | None) -> None:
    """The snapshot lists exactly what the kernel holds, expiry ms included, once each."""
    if kernel is None:
        return  # memory: its dict is all there is
    assert snapshot == kernel["rules"], "committed() differs from the kernel"
    assert kernel["entries"] == len(kernel["rules"]), "the kernel holds a rule twice"


def now_ms() -> int:
    return int(time.time() * 1000)


def net(text: str) -> str:
    return str(ipaddress.ip_network(text))


def rules(*rows: list[Any]) -> list[list[Any]]:
    """[action, network, expires_ms] rows in the order a ``snapshot`` step lists them."""
    return sorted(rows)


# --- the contract ---


def test_add_and_delete_are_idempotent(subject: Subject):
    exp = now_ms() + 600_000
    batch: list[Step] = [
        ["add", "drop", "192.0.2.1"],
        ["add", "drop", "198.51.100.0/24"],
        ["add", "accept", "192.0.2.0/24", exp],
        ["add", "drop", "2001:db8::/32"],
        ["add", "accept", "2001:db8:1::7", exp + 1],
        ["add", "drop", "192.0.2.1"],  # twice in one batch
        ["delete", "drop", "203.0.113.9"],  # absent
        ["delete", "accept", "198.51.100.0/24"],  # absent: only its drop is present
    ]
    s = Script()
    s("open")
    for step in batch:
        s(*step)
    first = s("commit")
    snap1, kern1 = s("snapshot"), s("kernel")
    for step in batch:  # the same batch replayed
        s(*step)
    replay = s("commit")
    snap2, kern2 = s("snapshot"), s("kernel")
    s("delete", "drop", "192.0.2.1")
    s("delete", "drop", "192.0.2.1")  # twice in one batch
    s("delete", "drop", "2001:db8:ffff::1")  # absent
    deleted = s("commit")
    snap3, kern3 = s("snapshot"), s("kernel")
    s("delete", "drop", "192.0.2.1")  # absent by now
    again = s("commit")
    snap4 = s("snapshot")

    r = subject.run(s)
    assert [r[i]["error"] for i in (first, replay, deleted, again)] == [None] * 4
    want = rules(
        ["accept", "192.0.2.0/24", exp],
        ["accept", net("2001:db8:1::7"), exp + 1],
        ["drop", "192.0.2.1/32", None],
        ["drop", "198.51.100.0/24", None],
        ["drop", "2001:db8::/32", None],
    )
    assert r[snap1] == want
    agrees(r[snap1], r[kern1])
    assert r[snap2] == want and r[kern2] == r[kern1], "a replayed batch changed something"
    want.remove(["drop", "192.0.2.1/32", None])
    assert r[snap3] == want
    agrees(r[snap3], r[kern3])
    assert r[snap4] == want


def test_snapshot_equals_the_kernel_with_expiry_ms(subject: Subject):
    soon, later = now_ms() + 600_000, now_ms() + 40 * 86_400_000  # 40 days: past ipset's limit
    s = Script()
    s("open")
    s("add", "drop", "192.0.2.10", soon)
    s("add", "drop", "192.0.2.11")
    s("add", "accept", "192.0.2.11")  # drop and accept of one network coexist
    s("add", "accept", "198.51.100.0/25", later)
    s("add", "drop", "2001:db8:5::/48", soon + 7)
    s("add", "accept", "2001:db8::9")
    first = s("commit")
    snap1, kern1 = s("snapshot"), s("kernel")
    s("add", "drop", "192.0.2.10", soon + 60_000)  # renewed
    s("add", "drop", "192.0.2.11", soon + 1)  # permanent -> timed
    s("add", "accept", "198.51.100.0/25")  # timed -> permanent
    second = s("commit")
    snap2, kern2 = s("snapshot"), s("kernel")
    s("open@b")  # another instance rebuilds its index from the kernel
    reread = s("snapshot@b")

    r = subject.run(s)
    assert r[first]["error"] is None and r[second]["error"] is None
    assert r[snap1] == rules(
        ["accept", "198.51.100.0/25", later],
        ["accept", net("2001:db8::9"), None],
        ["drop", "192.0.2.10/32", soon],
        ["drop", "192.0.2.11/32", None],
        ["accept", "192.0.2.11/32", None],
        ["drop", "2001:db8:5::/48", soon + 7],
    )
    agrees(r[snap1], r[kern1])
    assert r[snap2] == rules(
        ["accept", "198.51.100.0/25", None],
        ["accept", net("2001:db8::9"), None],
        ["drop", "192.0.2.10/32", soon + 60_000],
        ["drop", "192.0.2.11/32", soon + 1],
        ["accept", "192.0.2.11/32", None],
        ["drop", "2001:db8:5::/48", soon + 7],
    )
    agrees(r[snap2], r[kern2])
    if subject.kernel:
        assert r[reread] == r[snap2], "open() read another index than the kernel holds"


def test_a_rule_the_kernel_timed_out_can_be_deleted_and_renewed(subject: Subject):
    """The set backends' kernels drop a timed element soon after its expiry, by themselves
    (ipset: the expiry rounded up to a second; nftables: a second later): the worker's own
    delete, or a renewal, then finds it absent, and that must stay harmless."""
    exp = now_ms() + 300
    renewed = now_ms() + 600_000
    s = Script()
    s("open")
    s("add", "drop", "192.0.2.70", exp)
    s("add", "drop", "192.0.2.71", exp)
    s("add", "drop", "192.0.2.72")
    s("commit")
    timeouts = subject.name in ("ipset", "nftables")
    s("sleep", 2.5 if timeouts else 0)  # nftables: 300 ms rounded up to 1 s, plus 1 s
    timed_out = s("kernel")
    s("delete", "drop", "192.0.2.70")
    s("add", "drop", "192.0.2.71", renewed)
    s("add", "drop", "192.0.2.73")
    commit = s("commit")
    snap, kern = s("snapshot"), s("kernel")

    r = subject.run(s)
    if timeouts:
        assert r[timed_out]["rules"] == [["drop", "192.0.2.72/32", None]], "not timed out yet"
    assert r[commit]["error"] is None, r[commit]
    assert r[snap] == rules(
        ["drop", "192.0.2.71/32", renewed],
        ["drop", "192.0.2.72/32", None],
        ["drop", "192.0.2.73/32", None],
    )
    agrees(r[snap], r[kern])


@dataclass(frozen=True)
class Refusal:
    """A way to make a backend's commit fail, as the kernel (or the backend) really does."""

    backend: str
    id: str
    error: str = ""
    steps: tuple[Step, ...] = ()
    """Staged in the failing batch after the changes that alone would commit."""
    before_commit: tuple[Step, ...] = ()
    after_commit: tuple[Step, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    skip: str = ""


REFUSALS = [
    Refusal(
        "memory",
        "injected",
        "BackendError",
        (["add", "drop", "203.0.113.0/24"],),
        options={"memory_fail": ["203.0.113.0/24"]},
    ),
    Refusal(
        "nftables",
        "full-set",
        "PermanentBackendError",
        (["add_hosts", "drop", "203.0.113.1", 5],),
        options={"set_size": 4},
    ),
    Refusal(
        "ipset",
        "full-set",
        "PermanentBackendError",
        (["add_hosts", "drop", "203.0.113.1", 5],),
        options={"set_size": 4},
    ),
    Refusal("ipset", "zero-prefix", "PermanentBackendError", (["add", "drop", "0.0.0.0/0"],)),
    Refusal(
        "iptables",
        "refused-change",
        skip="no change the iptables backend stages is refused by the kernel: libiptc "
        "replaces a family's whole filter table in one call, a chain has no size limit, and "
        "every rule has one shape (source, comment, ACCEPT/DROP) valid for any network, /0 "
        "included; its failed-commit path is checked with a busy xtables lock instead",
    ),
    Refusal(
        "iptables",
        "busy-lock",
        "TransientBackendError",
        before_commit=(["hold_lock"],),
        after_commit=(["release_lock"],),
        options={"lock_timeout_s": 0.2},
    ),
]


@pytest.mark.parametrize("refusal", REFUSALS, ids=[f"{x.backend}-{x.id}" for x in REFUSALS])
def test_a_refused_batch_changes_nothing_and_is_forgotten(
    refusal: Refusal, request: pytest.FixtureRequest
):
    if refusal.skip:
        pytest.skip(refusal.skip)
    subject = _subject_for(refusal.backend, request, private_lock=bool(refusal.before_commit))
    exp, exp2 = now_ms() + 600_000, now_ms() + 900_000
    s = Script()
    s("open")
    s("add", "drop", "192.0.2.1", exp)
    s("add", "drop", "192.0.2.2")
    s("add", "accept", "198.51.100.7")
    setup = s("commit")
    before, kern_before = s("snapshot"), s("kernel")
    # one family's batch: a renewal, a delete, an add to a set or chain of its own, the refusal
    s("add", "drop", "192.0.2.1", exp2)
    s("delete", "drop", "192.0.2.2")
    s("delete", "accept", "198.51.100.7")
    s("add", "accept", "198.51.100.0/24")
    for step in refusal.steps:
        s(*step)
    for step in refusal.before_commit:
        s(*step)
    failed = s("commit")
    for step in refusal.after_commit:
        s(*step)
    after, kern_after = s("snapshot"), s("kernel")
    empty = s("commit")  # the failed batch's changes are not staged any more
    after_empty, kern_empty = s("snapshot"), s("kernel")
    s("add", "drop", "192.0.2.50")
    good = s("commit")
    final, kern_final = s("snapshot"), s("kernel")
    s("open@b")
    reread = s("snapshot@b")

    r = subject.run(s, **refusal.options)
    assert r[setup]["error"] is None
    assert r[failed]["error"] == refusal.error, r[failed]
    assert r[after] == r[before], "a failed batch changed committed()"
    if subject.kernel:
        assert r[kern_after] == r[kern_before], "a failed batch changed the kernel"
    agrees(r[after], r[kern_after])
    assert r[empty]["error"] is None
    assert r[after_empty] == r[before], "commit() after a failure applied the failed changes"
    agrees(r[after_empty], r[kern_empty])
    assert r[good]["error"] is None
    assert r[final] == rules(*r[before], ["drop", "192.0.2.50/32", None])
    agrees(r[final], r[kern_final])
    if subject.kernel:
        assert r[reread] == r[final]


def test_discard_forgets_staged_changes(subject: Subject):
    s = Script()
    s("open")
    s("add", "drop", "192.0.2.20")
    s("commit")
    s("add", "drop", "192.0.2.21")
    s("add", "drop", "2001:db8::21", now_ms() + 600_000)
    s("delete", "drop", "192.0.2.20")
    s("discard")
    nothing = s("commit")
    snap, kern = s("snapshot"), s("kernel")
    s("close")  # never removes a rule
    s("open@b")
    reread = s("snapshot@b")

    r = subject.run(s)
    assert r[nothing]["error"] is None
    assert r[snap] == [["drop", "192.0.2.20/32", None]], "discard() left staged changes"
    agrees(r[snap], r[kern])
    if subject.kernel:
        assert r[reread] == r[snap], "close() or discard() touched the kernel"


def test_open_twice_is_harmless(subject: Subject):
    s = Script()
    s("open")
    s("add", "drop", "192.0.2.30")
    s("add", "accept", "2001:db8::30")
    s("commit")
    snap1, dump1 = s("snapshot"), s("dump")
    s("open")
    snap2, dump2, kern2 = s("snapshot"), s("dump"), s("kernel")
    s("add", "drop", "192.0.2.31")
    after = s("commit")
    snap3, kern3 = s("snapshot"), s("kernel")

    r = subject.run(s)
    assert r[snap1] == [["accept", net("2001:db8::30"), None], ["drop", "192.0.2.30/32", None]]
    assert r[snap2] == r[snap1]
    assert r[dump2] == r[dump1], "a second open() changed the firewall"
    agrees(r[snap2], r[kern2])
    assert r[after]["error"] is None
    assert r[snap3] == rules(*r[snap1], ["drop", "192.0.2.31/32", None])
    agrees(r[snap3], r[kern3])


def test_open_rereads_what_another_instance_committed(subject: Subject):
    if not subject.kernel:
        pytest.skip("a MemoryBackend's rules live in its own dict: no kernel is shared")
    exp = now_ms() + 600_000
    s = Script()
    s("open")
    s("add", "drop", "192.0.2.40")
    s("commit")
    s("open@b")
    seen_by_b = s("snapshot@b")
    s("add@b", "drop", "192.0.2.41", exp)
    s("add@b", "accept", "2001:db8::41")
    s("delete@b", "drop", "192.0.2.40")
    by_b = s("commit@b")
    s("open")  # a again: its index was made before b's commit
    reread, kern = s("snapshot"), s("kernel")
    s("add", "drop", "192.0.2.41", exp)  # present: b added it
    s("delete", "drop", "192.0.2.40")  # absent: b deleted it
    again = s("commit")
    final, kern_final = s("snapshot"), s("kernel")

    r = subject.run(s)
    assert r[seen_by_b] == [["drop", "192.0.2.40/32", None]]
    assert r[by_b]["error"] is None
    want = [["accept", net("2001:db8::41"), None], ["drop", "192.0.2.41/32", exp]]
    assert r[reread] == want, "open() did not re-read the kernel"
    agrees(r[reread], r[kern])
    assert r[again]["error"] is None
    assert r[final] == want
    agrees(r[final], r[kern_final])


def test_intact_sees_what_a_hand_flush_or_an_uninstall_removed(subject: Subject):
    if not subject.kernel:
        pytest.skip("a MemoryBackend's rules cannot be removed behind its back")
    s = Script()
    s("open")
    s("add", "drop", "192.0.2.80")
    s("add", "accept", "2001:db8::80")
    s("commit")
    whole = s("intact")
    s("flush")
    flushed = s("intact")
    s("open")  # re-reads the kernel: nothing is missing any more
    reread, after_open = s("snapshot"), s("intact")
    s("add", "drop", "192.0.2.81")
    s("commit")
    s("uninstall@b")
    uninstalled = s("intact")

    r = subject.run(s)
    assert r[whole] is True
    assert r[flushed] is False, "intact() missed a hand flush of every managed rule"
    assert r[reread] == [] and r[after_open] is True
    assert r[uninstalled] is False, "intact() missed the managed chain or sets being removed"


def test_watch_rules_are_held_beside_accepts_and_drops_and_a_flush_is_seen(subject: Subject):
    """Every backend holds watch (shadow) rules: one network may be watched and dropped at
    once, both in the snapshot and the kernel; a hand flush takes the watches too."""
    exp = now_ms() + 600_000
    s = Script()
    s("open")
    s("add", "watch", "192.0.2.90")
    s("add", "drop", "192.0.2.90")
    s("add", "accept", "192.0.2.91")
    s("add", "watch", "2001:db8::90", exp)
    s("add", "watch", "198.51.100.0/24")
    first = s("commit")
    snap1, kern1 = s("snapshot"), s("kernel")
    s("delete", "watch", "192.0.2.90")
    s("add", "watch", "2001:db8::90")  # timed -> permanent
    s("add", "accept", "198.51.100.7")
    second = s("commit")
    snap2, kern2 = s("snapshot"), s("kernel")
    s("open@b")
    reread = s("snapshot@b")
    whole = s("intact")
    s("flush", "watch")  # the watches alone
    flushed = s("intact")
    s("open")
    after_open, kern3 = s("snapshot"), s("kernel")

    r = subject.run(s)
    assert r[first]["error"] is None and r[second]["error"] is None
    assert r[snap1] == rules(
        ["watch", "192.0.2.90/32", None],
        ["drop", "192.0.2.90/32", None],
        ["accept", "192.0.2.91/32", None],
        ["watch", net("2001:db8::90"), exp],
        ["watch", "198.51.100.0/24", None],
    )
    agrees(r[snap1], r[kern1])
    want = rules(
        ["drop", "192.0.2.90/32", None],
        ["accept", "192.0.2.91/32", None],
        ["watch", net("2001:db8::90"), None],
        ["watch", "198.51.100.0/24", None],
        ["accept", "198.51.100.7/32", None],
    )
    assert r[snap2] == want
    agrees(r[snap2], r[kern2])
    if subject.kernel:
        assert r[reread] == want, "open() read another index than the kernel holds"
        assert r[whole] is True
        assert r[flushed] is False, "intact() missed a hand flush of the watch rules"
        assert r[after_open] == [row for row in want if row[0] != "watch"]
        agrees(r[after_open], r[kern3])


FOREIGN: dict[str, list[list[str]]] = {  # rules and sets of someone else's, by tool
    "iptables": [
        ["iptables-legacy", "-A", "INPUT", "-s", "198.51.100.1", "-j", "DROP"],
        ["iptables-legacy", "-N", "OTHER"],
        ["iptables-legacy", "-A", "OTHER", "-s", "198.51.100.2", "-j", "ACCEPT"],
        ["iptables-legacy", "-A", "INPUT", "-j", "OTHER"],
        ["ip6tables-legacy", "-A", "INPUT", "-s", "2001:db8:ffff::1", "-j", "DROP"],
    ],
    "nftables": [
        ["nft", "add", "table", "inet", "other"],
        ["nft", "add", "set", "inet", "other", "bad4", "{ type ipv4_addr; }"],
        ["nft", "add", "element", "inet", "other", "bad4", "{ 198.51.100.3 }"],
        ["nft", "add", "chain", "inet", "other", "input", "{ type filter hook input priority 0; }"],
        ["nft", "add", "rule", "inet", "other", "input", "ip", "saddr", "@bad4", "drop"],
    ],
    "ipset": [
        ["ipset", "create", "other", "hash:ip"],
        ["ipset", "add", "other", "198.51.100.4"],
        [
            "iptables-legacy",
            "-A",
            "INPUT",
            "-m",
            "set",
            "--match-set",
            "other",
            "src",
            "-j",
            "DROP",
        ],
    ],
}


def test_uninstall_leaves_other_rules_alone(subject: Subject):
    if subject.ns is None:
        pytest.skip("the memory backend creates nothing outside its own dict")
    ns = subject.ns
    for tool in ("nft", "ipset", "iptables-legacy"):
        need(shutil.which(tool) is not None, f"{tool} is not installed (for foreign rules)")
    for command in (c for commands in FOREIGN.values() for c in commands):
        ns.run(*command)
    before = kernel_view(ns, subject.name, dump=True)
    s = Script()
    s("open")
    s("add", "drop", "192.0.2.60")
    s("add", "accept", "2001:db8::60", now_ms() + 600_000)
    committed = s("commit")
    s("uninstall")
    snap = s("snapshot")
    twice = s("uninstall@b")

    r = subject.run(s)
    assert r[committed]["error"] is None
    assert r[snap] == [], "committed() lists rules uninstall() removed"
    assert isinstance(r[twice], str), "uninstall twice is harmless"
    assert kernel_view(ns, subject.name, dump=True) == before
