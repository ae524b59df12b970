"""The one gate into the kernel, table-tested without Redis or a kernel.

Each row is a command as a host sees it and the one decision that is right for it; the
same function answers for stream entries and for ledger records, so a row holds on both
paths (:func:`request_from_record` is checked against :meth:`Request.from_entry`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from pushfw.producer.contract import Action, Status, signature
from pushfw.producer.records import RuleRecord
from pushfw.producer.wire import read_command
from pushfw.worker.backends.base import Rule, RuleKey
from pushfw.worker.decide import (
    FORGED_EXPIRY,
    Add,
    Decision,
    Delete,
    Policy,
    Report,
    Request,
    decide,
    decide_record,
    request_from_record,
)
from pushfw.worker.generation import trusts_ledger
from pushfw.worker.protect import LOOPBACK, Protection
from pushfw.worker.record import record_for
from pushfw.worker.signing import Signing
from pushfw.worker.stream import Entry

NOW = 1_800_000_000_000
KEY = b"k3y-shared-by-producers-and-workers"
PROTECTION = Protection([*LOOPBACK, ipaddress.ip_network("10.9.0.7/32")])
LAX = Policy("web1", frozenset({"web"}), PROTECTION, Signing())
STRICT = Policy("web1", frozenset({"web"}), PROTECTION, Signing(KEY, required=True))


def rule_key(action: str, net: str) -> RuleKey:
    return RuleKey(Action(action), ipaddress.ip_network(net))


def entry(fields: dict[str, str], ms: int = NOW - 1000) -> Entry:
    return Entry(f"{ms}-0", {k.encode(): v.encode() for k, v in fields.items()})


def from_stream(
    fields: dict[str, str], ms: int = NOW - 1000, seen_ms: int | None = None
) -> Request:
    e = entry(fields, ms)
    assert e.fields is not None
    return Request.from_entry(e, read_command(e.fields), ms if seen_ms is None else seen_ms)


def signed(fields: dict[str, str], ts_ms: int = NOW - 1000) -> dict[str, str]:
    out = {**fields, "ts": str(ts_ms)}
    return {**out, "sig": signature(out, KEY)}


D1 = rule_key("drop", "192.0.2.1/32")

ROWS: list[tuple[str, Policy, dict[str, str], Decision]] = [
    ("a drop", LAX, {"op": "drop.insert", "ip": "192.0.2.1"}, Add(Rule(D1))),
    (
        "a timed drop: expiry from when Redis saw it",
        LAX,
        {"op": "drop.insert", "ip": "192.0.2.1", "ttl": "60"},
        Add(Rule(D1, NOW - 1000 + 60_000)),
    ),
    ("a delete", LAX, {"op": "drop.delete", "ip": "192.0.2.1"}, Delete(D1)),
    (
        "an insert that arrives already expired ends the rule",
        LAX,
        {"op": "ttl.drop.insert", "ip": "192.0.2.1", "ttl": "1"},
        Delete(D1, Status.EXPIRED, "expired 0 ms ago"),
    ),
    (
        "meant for another host: ours must go, unreported",
        LAX,
        {"op": "drop.insert", "ip": "192.0.2.1", "target": "db1"},
        Delete(D1, Status.UNCHANGED, report=False),
    ),
    (
        "meant for one of our labels",
        LAX,
        {"op": "drop.insert", "ip": "192.0.2.1", "target": "db1,web"},
        Add(Rule(D1)),
    ),
    (
        "loopback is never dropped",
        LAX,
        {"op": "drop.insert", "ip": "127.0.0.53"},
        Delete(
            rule_key("drop", "127.0.0.53/32"),
            Status.REJECTED,
            "ip: 127.0.0.53/32 overlaps protected network 127.0.0.0/8",
        ),
    ),
    (
        "a network covering a protected address is refused",
        LAX,
        {"op": "drop.insert", "ip": "10.9.0.0/24"},
        Delete(
            rule_key("drop", "10.9.0.0/24"),
            Status.REJECTED,
            "ip: 10.9.0.0/24 overlaps protected network 10.9.0.7/32",
        ),
    ),
    (
        "the other half of IPv4 is too wide to drop",
        LAX,
        {"op": "drop.insert", "ip": "128.0.0.0/1"},
        Delete(
            rule_key("drop", "128.0.0.0/1"),
            Status.REJECTED,
            "ip: 128.0.0.0/1 is wider than /8, the widest network a drop may cover here",
        ),
    ),
    (
        "IPv6 has its own bound",
        LAX,
        {"op": "drop.insert", "ip": "2000::/15"},
        Delete(
            rule_key("drop", "2000::/15"),
            Status.REJECTED,
            "ip: 2000::/15 is wider than /16, the widest network a drop may cover here",
        ),
    ),
    (
        "an accept of everything would lift every ban",
        LAX,
        {"op": "accept.insert", "ip": "0.0.0.0/0"},
        Delete(
            rule_key("accept", "0.0.0.0/0"),
            Status.REJECTED,
            "ip: 0.0.0.0/0 is wider than /8, the widest network an accept may cover here",
        ),
    ),
    (
        "an accept of a protected network is fine",
        LAX,
        {"op": "accept.insert", "ip": "127.0.0.1"},
        Add(Rule(rule_key("accept", "127.0.0.1/32"))),
    ),
    (
        "unsigned on a strict host: refused as a whole, the rule keeps its state",
        STRICT,
        {"op": "drop.delete", "ip": "192.0.2.1"},
        Report(Status.REJECTED, "sig: missing"),
    ),
    (
        "signed on a strict host",
        STRICT,
        signed({"op": "drop.insert", "ip": "192.0.2.1"}),
        Add(Rule(D1)),
    ),
    (
        "a forged signature cannot retarget a rule away from a strict host",
        STRICT,
        {**signed({"op": "drop.insert", "ip": "192.0.2.1"}), "target": "db1"},
        Report(Status.REJECTED, "sig: does not match"),
    ),
    (
        "a signed protected drop is still refused",
        STRICT,
        signed({"op": "drop.insert", "ip": "127.0.0.1"}),
        Delete(
            rule_key("drop", "127.0.0.1/32"),
            Status.REJECTED,
            "ip: 127.0.0.1/32 overlaps protected network 127.0.0.0/8",
        ),
    ),
    (
        "a backend that cannot hold an action refuses it by name",
        replace(LAX, actions=frozenset({Action.ACCEPT, Action.DROP}), backend="bare"),
        {"op": "watch.insert", "ip": "192.0.2.1"},
        Delete(
            rule_key("watch", "192.0.2.1/32"),
            Status.REJECTED,
            "action: the bare backend cannot watch",
        ),
    ),
]


@pytest.mark.parametrize(
    ("policy", "fields", "expected"), [row[1:] for row in ROWS], ids=[row[0] for row in ROWS]
)
def test_decide_stream_and_ledger_alike(policy: Policy, fields: dict[str, str], expected: Decision):
    request = from_stream(fields)
    assert decide(request, policy, NOW) == expected
    e = entry(fields)
    assert e.fields is not None
    record = record_for(e, read_command(e.fields), NOW - 1000, NOW - 1000)
    from_ledger = request_from_record(record)
    assert from_ledger is not None
    assert decide(from_ledger, policy, NOW) == expected, "the ledger's record decides the same"


def test_a_strict_host_verifies_a_record_without_trusting_the_folder():
    fields = signed({"op": "drop.insert", "ip": "192.0.2.1", "ttl": "600"})
    e = entry(fields)
    assert e.fields is not None
    record = record_for(e, read_command(e.fields), NOW - 1000, NOW - 1000)
    assert record.signed["sig"] == fields["sig"]
    tampered = record.model_copy(update={"network": "192.0.2.2/32"})
    assert request_from_record(tampered) is None, "the record's rule must be the signed one"
    reasons = record.model_copy(update={"signed": {**record.signed, "ttl": "6000"}})
    request = request_from_record(reasons)
    assert request is not None
    assert decide(request, STRICT, NOW) == Report(Status.REJECTED, "sig: does not match")
    unsigned = record.model_copy(update={"signed": {}})
    request = request_from_record(unsigned)
    assert request is not None
    assert decide(request, STRICT, NOW) == Report(Status.REJECTED, "sig: missing")
    assert decide(request, LAX, NOW) == Add(Rule(D1, NOW - 1000 + 600_000))


def test_time_is_when_redis_first_saw_the_command():
    """An id a day ahead: expiry and the signature window start at the first-seen time."""
    ahead = NOW + 86_400_000
    fields = signed({"op": "drop.insert", "ip": "192.0.2.1", "ttl": "10"}, ts_ms=NOW - 500)
    request = from_stream(fields, ms=ahead, seen_ms=NOW - 400)
    assert decide(request, STRICT, NOW) == Add(Rule(D1, NOW - 400 + 10_000))
    by_id = from_stream(fields, ms=ahead)
    assert isinstance(decide(by_id, STRICT, NOW), Report), "measured from the id, it is refused"


EXPIRY = {"op": "drop.delete", "ip": "192.0.2.1", "origin": "ttl"}


def tomb(entry_id: str, expired_id: str = "100-0", expired_ms: int = NOW) -> RuleRecord:
    return RuleRecord(
        id=entry_id,
        action="drop",
        network="192.0.2.1/32",
        deleted=True,
        origin="ttl",
        expired_id=expired_id,
        expired_ms=expired_ms,
    )


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (tomb("500-0"), Delete(D1, expiring_by=NOW)),
        (None, Report(Status.REJECTED, FORGED_EXPIRY)),
        (tomb("600-0"), Report(Status.REJECTED, FORGED_EXPIRY)),
        (
            RuleRecord(id="500-0", action="drop", network="192.0.2.1/32"),
            Report(Status.REJECTED, FORGED_EXPIRY),
        ),
        (
            RuleRecord(id="400-0", action="drop", network="192.0.2.1/32", voided="500-0"),
            Report(Status.UNCHANGED, "renewed by 400-0 before it expired"),
        ),
        (
            RuleRecord(id="700-0", action="drop", network="192.0.2.1/32"),
            Report(Status.UNCHANGED, "superseded by newer command 700-0"),
        ),
        (
            RuleRecord(id="500-0", action="drop", network="192.0.2.1/32", deleted=True),
            Report(Status.REJECTED, FORGED_EXPIRY),
        ),
    ],
    ids=[
        "its own tombstone",
        "no record",
        "another expiry's tombstone",
        "an active rule with its id",
        "a renewal voided it",
        "a newer command",
        "a plain tombstone with its id",
    ],
)
def test_the_schedulers_expiry_counts_only_where_the_ledger_holds_it(
    record: RuleRecord | None, expected: Decision
):
    request = from_stream(EXPIRY, ms=500)
    for policy in (LAX, STRICT):
        assert decide(request, policy, NOW, record) == expected


def test_a_ttl_tombstone_decides_on_a_strict_host_too():
    request = request_from_record(tomb("500-0"))
    assert request is not None and request.confirmed
    assert decide(request, STRICT, NOW) == Delete(D1)


@pytest.mark.parametrize(
    ("marker", "known", "ledger_size", "kernel_size", "trusted"),
    [
        ("g1", "g1", 0, 5, True),  # every ban lifted, tombstones trimmed: the truth
        ("g2", "g1", 0, 5, False),  # Redis lost its data and a new ledger began
        (None, "g1", 0, 5, False),  # ... or none has begun yet
        ("g2", "g1", 0, 0, True),  # nothing to keep: adopt
        ("g1", None, 3, 5, True),  # a host new to the state file, a ledger with records
        ("g1", None, 0, 5, False),  # an empty ledger beside a full kernel looks lost
        (None, None, 0, 0, True),
    ],
)
def test_which_ledger_a_host_trusts(
    marker: str | None, known: str | None, ledger_size: int, kernel_size: int, trusted: bool
):
    assert trusts_ledger(marker, known, ledger_size, kernel_size) is trusted


def test_signed_state_outlives_unsigned_commands_in_the_one_decision():
    """A strict host that refuses a rule's newest record takes the held (newest verified)
    one, once it verified it itself; a lax host takes the newest record (I3)."""

    def record(fields: dict[str, str], ms: int) -> RuleRecord:
        e = entry(fields, ms)
        assert e.fields is not None
        return record_for(e, read_command(e.fields), ms, ms)

    ban = record(signed({"op": "drop.insert", "ip": "192.0.2.1"}), NOW - 2000)
    undrop = record({"op": "drop.delete", "ip": "192.0.2.1"}, NOW - 1000)
    assert decide_record(undrop, ban, STRICT, NOW) == (D1, Add(Rule(D1)))
    assert decide_record(None, ban, STRICT, NOW) == (D1, Add(Rule(D1))), "undrop forgotten"
    assert decide_record(undrop, ban, LAX, NOW) == (D1, Delete(D1))
    assert decide_record(undrop, None, STRICT, NOW) == (D1, Report(Status.REJECTED, "sig: missing"))
    forged = ban.model_copy(update={"signed": {**ban.signed, "sig": "0" * 64}})
    assert decide_record(undrop, forged, STRICT, NOW) == (
        D1,
        Report(Status.REJECTED, "sig: missing"),
    ), "a held record is verified like any other"
    other = record(signed({"op": "drop.insert", "ip": "192.0.2.2"}), NOW - 2000)
    assert decide_record(undrop, other, STRICT, NOW) == (
        D1,
        Report(Status.REJECTED, "sig: missing"),
    ), "a held record of another rule is no state of this one"
    lifted = record(signed({"op": "drop.delete", "ip": "192.0.2.1"}), NOW - 500)
    assert decide_record(lifted, ban, STRICT, NOW) == (D1, Delete(D1)), "newest verified wins"
