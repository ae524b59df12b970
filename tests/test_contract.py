"""The wire contract v1 (DESIGN.md, "The wire format (v1)"), tested on raw stream fields.

``parse_command`` is the only thing standing between bytes anybody can XADD and the kernel
firewall, so every rejection is checked for *which* field it blames and *why*, not just that
something was raised.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

import pytest

from pushfw.producer.contract import (
    MAX_REASON_LEN,
    MAX_REQUEST_ID_LEN,
    MAX_TTL_S,
    Action,
    Command,
    CommandRejected,
    Op,
    parse_command,
    parse_network,
)

Fields = Mapping[str, str] | Mapping[bytes, bytes]

BASE = {"op": "drop.insert", "ip": "192.0.2.1"}
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def fields(**overrides: str | None) -> dict[str, str]:
    """BASE with some fields replaced; ``None`` removes a field."""
    out = {**BASE, **overrides}
    return {k: v for k, v in out.items() if v is not None}


def raw(**overrides: bytes | None) -> dict[bytes, bytes]:
    """Like :func:`fields`, as the bytes redis-py returns without ``decode_responses``."""
    out: dict[str, bytes | None] = {k: v.encode() for k, v in BASE.items()}
    out.update(overrides)
    return {k.encode(): v for k, v in out.items() if v is not None}


# --- accepted ---------------------------------------------------------------------------

SPELLINGS: list[tuple[str, Op]] = [
    # drop.insert
    ("drop.insert", Op.DROP_INSERT),
    ("DROP_INSERT", Op.DROP_INSERT),
    ("drop_insert", Op.DROP_INSERT),
    ("DROP.INSERT", Op.DROP_INSERT),
    ("Drop.Insert", Op.DROP_INSERT),
    # drop.delete
    ("drop.delete", Op.DROP_DELETE),
    ("DROP_DELETE", Op.DROP_DELETE),
    ("drop_delete", Op.DROP_DELETE),
    ("Drop_Delete", Op.DROP_DELETE),
    # accept.insert
    ("accept.insert", Op.ACCEPT_INSERT),
    ("ACCEPT_INSERT", Op.ACCEPT_INSERT),
    ("accept_insert", Op.ACCEPT_INSERT),
    ("Accept.Insert", Op.ACCEPT_INSERT),
    # accept.delete
    ("accept.delete", Op.ACCEPT_DELETE),
    ("ACCEPT_DELETE", Op.ACCEPT_DELETE),
    ("accept_delete", Op.ACCEPT_DELETE),
    ("Accept.Delete", Op.ACCEPT_DELETE),
    # ttl.drop.insert
    ("ttl.drop.insert", Op.TTL_DROP_INSERT),
    ("TTL_DROP_INSERT", Op.TTL_DROP_INSERT),
    ("ttl_drop_insert", Op.TTL_DROP_INSERT),
    ("TTL.DROP.INSERT", Op.TTL_DROP_INSERT),
    ("ttl_drop.insert", Op.TTL_DROP_INSERT),
    # ttl.accept.insert
    ("ttl.accept.insert", Op.TTL_ACCEPT_INSERT),
    ("TTL_ACCEPT_INSERT", Op.TTL_ACCEPT_INSERT),
    ("ttl_accept_insert", Op.TTL_ACCEPT_INSERT),
    ("Ttl.Accept.Insert", Op.TTL_ACCEPT_INSERT),
]


@pytest.mark.parametrize(("spelling", "op"), SPELLINGS, ids=[s for s, _ in SPELLINGS])
def test_seed_spellings_are_accepted(spelling: str, op: Op) -> None:
    """Any case and ``_`` for ``.`` is the same op: the seed's producers keep working."""
    ttl = {"ttl": "60"} if op.needs_ttl else {}
    command = parse_command(fields(op=spelling, **ttl))
    assert command.op is op
    assert command.ttl_s == (60 if op.needs_ttl else None)
    assert command.to_fields()["op"] == op.value


@pytest.mark.parametrize("op", list(Op), ids=[op.value for op in Op])
def test_every_op_parses_in_the_seed_spellings(op: Op) -> None:
    """Every op, a new one too, parses from its name, the seed's ``TTL_DROP_INSERT`` form
    and any case, so no op slips in that the seed's producers cannot send."""
    ttl = {"ttl": "60"} if op.needs_ttl else {}
    seed = op.value.replace(".", "_").upper()
    for spelling in (op.value, seed, seed.lower(), op.value.title()):
        assert parse_command(fields(op=spelling, **ttl)).op is op, spelling


def test_op_properties() -> None:
    """Action, insert-ness and the need for a ttl follow from the op's name."""
    assert [(op.action, op.is_insert, op.needs_ttl) for op in Op] == [
        (Action.DROP, True, False),
        (Action.DROP, False, False),
        (Action.ACCEPT, True, False),
        (Action.ACCEPT, False, False),
        (Action.DROP, True, True),
        (Action.ACCEPT, True, True),
        (Action.WATCH, True, False),
        (Action.WATCH, False, False),
        (Action.WATCH, True, True),
    ]


NETWORKS = [
    ("192.0.2.1", ipaddress.IPv4Network("192.0.2.1/32")),
    ("192.0.2.1/32", ipaddress.IPv4Network("192.0.2.1/32")),
    ("10.0.0.0/8", ipaddress.IPv4Network("10.0.0.0/8")),
    ("0.0.0.0/0", ipaddress.IPv4Network("0.0.0.0/0")),
    ("2001:db8::1", ipaddress.IPv6Network("2001:db8::1/128")),
    ("2001:DB8::1", ipaddress.IPv6Network("2001:db8::1/128")),
    ("2001:db8::/32", ipaddress.IPv6Network("2001:db8::/32")),
    ("::1", ipaddress.IPv6Network("::1/128")),
    ("::ffff:192.0.2.1", ipaddress.IPv4Network("192.0.2.1/32")),
    ("::ffff:c000:201", ipaddress.IPv4Network("192.0.2.1/32")),
    ("::FFFF:192.0.2.1", ipaddress.IPv4Network("192.0.2.1/32")),
    ("::ffff:192.0.2.0/120", ipaddress.IPv4Network("192.0.2.0/24")),
    ("::ffff:192.0.2.1/128", ipaddress.IPv4Network("192.0.2.1/32")),
]


@pytest.mark.parametrize(("text", "network"), NETWORKS, ids=[t for t, _ in NETWORKS])
def test_addresses_and_networks(
    text: str, network: ipaddress.IPv4Network | ipaddress.IPv6Network
) -> None:
    """Addresses become host networks; IPv4-mapped IPv6 means the IPv4 address it maps."""
    command = parse_command(fields(ip=text))
    assert command.network == network
    assert type(command.network) is type(network)


@pytest.mark.parametrize("op", ["drop.insert", "accept.insert", "DROP_INSERT"])
def test_ttl_on_plain_insert_is_allowed(op: str) -> None:
    """``ttl`` on ``*.insert`` means the same as the ``ttl.`` form."""
    command = parse_command(fields(op=op, ttl="600"))
    assert command.ttl_s == 600
    assert command.is_insert


@pytest.mark.parametrize("ttl", ["1", "600", "0600", str(MAX_TTL_S)])
def test_ttl_bounds_accepted(ttl: str) -> None:
    """1 second up to 10 years, inclusive."""
    assert parse_command(fields(op="ttl.drop.insert", ttl=ttl)).ttl_s == int(ttl)


def test_unknown_fields_are_ignored() -> None:
    """Forward compatibility: a v2 producer's extra fields do not break a v1 host,
    not even when they are not UTF-8."""
    command = parse_command(raw(future=b"whatever", priority=b"\xff\xfe", **{"x-trace": b"abc"}))
    assert command == parse_command(BASE)
    assert parse_command({**BASE, "comment": "hi"}) == parse_command(BASE)
    assert parse_command({b"op": b"drop.insert", b"ip": b"192.0.2.1", b"\xff": b"1"}) == (
        parse_command(BASE)
    )


def test_bytes_and_str_fields_mean_the_same() -> None:
    """Workers read bytes, producers may hand str: same command either way."""
    text = fields(op="TTL_DROP_INSERT", ttl="60", target="web,eu", reason="r", request_id="q")
    as_bytes = {k.encode(): v.encode() for k, v in text.items()}
    assert parse_command(text) == parse_command(as_bytes)


@pytest.mark.parametrize(
    ("target", "names"),
    [
        ("*", ()),
        ("", ()),
        (" * ", ()),
        ("web", ("web",)),
        ("web,eu", ("web", "eu")),
        ("web, eu", ("web", "eu")),
        ("host-1.example.org,db_2", ("host-1.example.org", "db_2")),
        (",".join(f"h{i}" for i in range(64)), tuple(f"h{i}" for i in range(64))),
    ],
    ids=["star", "empty", "star-padded", "one", "two", "two-spaced", "dotted", "64-hosts"],
)
def test_target(target: str, names: tuple[str, ...]) -> None:
    """``*`` (or nothing) is every host; else comma-separated host names or labels."""
    assert parse_command(fields(target=target)).target == names


def test_targets_matches_host_name_or_label() -> None:
    """A command for ``web,eu`` reaches a host named web and a host labelled eu only."""
    everyone = parse_command(BASE)
    some = parse_command(fields(target="web,eu"))
    assert everyone.targets("db1", frozenset())
    assert some.targets("web", frozenset())
    assert some.targets("db1", frozenset({"eu", "prod"}))
    assert not some.targets("db1", frozenset({"us", "prod"}))


def test_request_id_and_reason_are_echoed() -> None:
    """The producer's correlation id and free text come through untouched."""
    command = parse_command(
        fields(request_id="req-42:abc/def", reason="ssh brute force from 192.0.2.1 (café ☕)")
    )
    assert command.request_id == "req-42:abc/def"
    assert command.reason == "ssh brute force from 192.0.2.1 (café ☕)"
    assert command.to_fields()["request_id"] == "req-42:abc/def"


def test_longest_allowed_reason_and_request_id() -> None:
    """The bounds are inclusive."""
    command = parse_command(
        fields(reason="r" * MAX_REASON_LEN, request_id="q" * MAX_REQUEST_ID_LEN)
    )
    assert len(command.reason) == MAX_REASON_LEN
    assert len(command.request_id) == MAX_REQUEST_ID_LEN


ROUND_TRIPS = [
    fields(),
    fields(op="DROP_DELETE", ip="2001:db8::/32"),
    fields(op="ttl_accept_insert", ip="::ffff:192.0.2.0/120", ttl="3600"),
    fields(op="accept.insert", ip="10.0.0.0/8", ttl="60", target="web,eu"),
    fields(op="drop.insert", ip="2001:DB8::1", reason="why not", request_id="id-1", origin="api"),
]


@pytest.mark.parametrize("wire", ROUND_TRIPS, ids=[str(i) for i in range(len(ROUND_TRIPS))])
def test_to_fields_round_trips(wire: dict[str, str]) -> None:
    """``to_fields`` writes canonical spelling that parses back to the same command."""
    command = parse_command(wire)
    canonical = command.to_fields()
    assert parse_command(canonical) == command
    assert parse_command({k.encode(): v.encode() for k, v in canonical.items()}) == command
    assert canonical["op"] == command.op.value
    assert all(value for value in canonical.values()), "empty fields are left out"


def test_to_fields_is_canonical() -> None:
    """Hosts are written as bare addresses, mapped addresses as IPv4, ops with dots."""
    assert parse_command(
        fields(op="TTL_DROP_INSERT", ip="::ffff:192.0.2.1", ttl="60")
    ).to_fields() == {
        "op": "ttl.drop.insert",
        "ip": "192.0.2.1",
        "ttl": "60",
    }
    assert parse_command(fields(ip="2001:db8::/32", target="web")).to_fields() == {
        "op": "drop.insert",
        "ip": "2001:db8::/32",
        "target": "web",
    }


# --- rejected ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    id: str
    fields: Fields
    field: str  # the wire field the message must start with
    says: str  # a word of the reason the message must contain


def bad(name: str, field: str, says: str, **overrides: str | None) -> Bad:
    return Bad(name, fields(**overrides), field, says)


def bad_bytes(name: str, field: str, says: str, **overrides: bytes | None) -> Bad:
    return Bad(name, raw(**overrides), field, says)


NOT_ADDR = "is not an IPv4/IPv6 address or network"
WS = "contains whitespace or control characters"
UNKNOWN_OP = "unknown op"
NOT_UTF8 = "is not valid UTF-8"
WHOLE = "is not a whole number of seconds"
OUTSIDE = f"is outside 1..{MAX_TTL_S} seconds"
CTRL = "contains control characters"
NOT_HOST = "is not a host name or label"
PRINTABLE = "must be printable ASCII without spaces"

MALFORMED: list[Bad] = [
    # ip: shell metacharacters and option injection
    bad("ip-semicolon", "ip", NOT_ADDR, ip="192.0.2.1;reboot"),
    bad("ip-semicolon-spaced", "ip", WS, ip="192.0.2.1; rm -rf /"),
    bad("ip-pipe", "ip", NOT_ADDR, ip="192.0.2.1|nc"),
    bad("ip-and-and", "ip", NOT_ADDR, ip="192.0.2.1&&reboot"),
    bad("ip-dollar-paren", "ip", NOT_ADDR, ip="$(reboot)"),
    bad("ip-backticks", "ip", NOT_ADDR, ip="`reboot`"),
    bad("ip-redirect", "ip", NOT_ADDR, ip="192.0.2.1>/etc/passwd"),
    bad("ip-option", "ip", NOT_ADDR, ip="--flush"),
    bad("ip-option-spaced", "ip", WS, ip="-j ACCEPT"),
    bad("ip-star", "ip", NOT_ADDR, ip="*"),
    # ip: whitespace and control characters
    bad("ip-newline", "ip", WS, ip="192.0.2.1\n"),
    bad("ip-newline-injection", "ip", WS, ip="192.0.2.1\n-A INPUT -j ACCEPT"),
    bad("ip-cr", "ip", WS, ip="192.0.2.1\r"),
    bad("ip-tab", "ip", WS, ip="\t192.0.2.1"),
    bad("ip-nul", "ip", WS, ip="192.0.2.1\x00"),
    bad("ip-space", "ip", WS, ip=" 192.0.2.1"),
    bad("ip-nbsp", "ip", NOT_ADDR, ip="192.0.2.1\u00a0"),
    bad("ip-fullwidth-digit", "ip", NOT_ADDR, ip="\uff11.2.3.4"),
    # ip: length
    bad("ip-empty", "ip", "is empty", ip=""),
    bad("ip-too-long", "ip", "is too long (65 characters)", ip="1" * 65),
    bad("ip-over-field-limit", "ip", "is 5000 characters long, at most 4096", ip="1" * 5000),
    # ip: not an address
    bad("ip-hostname", "ip", NOT_ADDR, ip="example.com"),
    bad("ip-integer", "ip", NOT_ADDR, ip="3221225985"),
    bad("ip-leading-zero", "ip", NOT_ADDR, ip="010.0.0.1"),
    bad("ip-octet-256", "ip", NOT_ADDR, ip="256.1.1.1"),
    bad("ip-octet-negative", "ip", NOT_ADDR, ip="1.2.3.-4"),
    bad("ip-five-octets", "ip", NOT_ADDR, ip="1.2.3.4.5"),
    bad("ip-three-octets", "ip", NOT_ADDR, ip="1.2.3"),
    bad("ip-v6-triple-colon", "ip", NOT_ADDR, ip="2001:db8:::1"),
    bad("ip-v6-two-double-colons", "ip", NOT_ADDR, ip="2001::db8::1"),
    bad("ip-v6-bad-hex", "ip", NOT_ADDR, ip="2001:db8::g"),
    bad("ip-scoped-v6", "ip", "scoped IPv6", ip="fe80::1%eth0"),
    # ip: prefixes
    bad("ip-prefix-33", "ip", NOT_ADDR, ip="10.0.0.0/33"),
    bad("ip-prefix-129", "ip", NOT_ADDR, ip="2001:db8::/129"),
    bad("ip-prefix-negative", "ip", NOT_ADDR, ip="10.0.0.0/-1"),
    bad("ip-prefix-empty", "ip", NOT_ADDR, ip="10.0.0.0/"),
    bad("ip-two-prefixes", "ip", NOT_ADDR, ip="10.0.0.0/8/8"),
    bad("ip-host-bits-v4", "ip", "has host bits set", ip="10.0.0.1/8"),
    bad("ip-host-bits-v4-24", "ip", "has host bits set", ip="192.0.2.1/24"),
    bad("ip-host-bits-v6", "ip", "has host bits set", ip="2001:db8::1/32"),
    bad("ip-host-bits-mapped", "ip", "has host bits set", ip="::ffff:192.0.2.1/120"),
    bad("ip-missing", "ip", "is missing", ip=None),
    bad_bytes("ip-not-utf8", "ip", NOT_UTF8, ip=b"192.0.2.\xff"),
    # op
    bad("op-missing", "op", "is missing", op=None),
    bad("op-empty", "op", "unknown op ''", op=""),
    bad("op-unknown", "op", "unknown op 'drop.everything'", op="drop.everything"),
    bad("op-dash", "op", UNKNOWN_OP, op="drop-insert"),
    bad("op-padded", "op", UNKNOWN_OP, op=" drop.insert"),
    bad("op-newline", "op", UNKNOWN_OP, op="drop.insert\n"),
    bad("op-shell", "op", UNKNOWN_OP, op="drop.insert;reboot"),
    bad("op-ttl-delete", "op", UNKNOWN_OP, op="ttl.drop.delete"),
    bad("op-long", "op", UNKNOWN_OP, op="x" * 300),
    bad("op-over-field-limit", "op", "is 5000 characters long, at most 4096", op="x" * 5000),
    bad_bytes("op-not-utf8", "op", NOT_UTF8, op=b"drop.\xffinsert"),
    # ttl: values
    bad("ttl-zero", "ttl", OUTSIDE, op="ttl.drop.insert", ttl="0"),
    bad("ttl-zeros", "ttl", OUTSIDE, op="ttl.drop.insert", ttl="000"),
    bad("ttl-negative", "ttl", WHOLE, op="ttl.drop.insert", ttl="-5"),
    bad("ttl-over-10-years", "ttl", OUTSIDE, op="ttl.drop.insert", ttl=str(MAX_TTL_S + 1)),
    bad("ttl-13-digits", "ttl", OUTSIDE, op="ttl.drop.insert", ttl="9" * 13),
    bad("ttl-4000-digits", "ttl", OUTSIDE, op="ttl.drop.insert", ttl="9" * 4000),
    bad("ttl-non-numeric", "ttl", WHOLE, op="ttl.drop.insert", ttl="abc"),
    bad("ttl-float", "ttl", WHOLE, op="ttl.drop.insert", ttl="1.5"),
    bad("ttl-exponent", "ttl", WHOLE, op="ttl.drop.insert", ttl="1e3"),
    bad("ttl-hex", "ttl", WHOLE, op="ttl.drop.insert", ttl="0x10"),
    bad("ttl-duration-unit", "ttl", WHOLE, op="ttl.drop.insert", ttl="10m"),
    bad("ttl-leading-space", "ttl", WHOLE, op="ttl.drop.insert", ttl=" 60"),
    bad("ttl-trailing-space", "ttl", WHOLE, op="ttl.drop.insert", ttl="60 "),
    bad("ttl-trailing-newline", "ttl", WHOLE, op="ttl.drop.insert", ttl="60\n"),
    bad("ttl-plus", "ttl", WHOLE, op="ttl.drop.insert", ttl="+60"),
    bad("ttl-underscore", "ttl", WHOLE, op="ttl.drop.insert", ttl="1_000"),
    bad("ttl-arabic-digits", "ttl", WHOLE, op="ttl.drop.insert", ttl="\u0666\u0660"),
    bad("ttl-empty", "ttl", WHOLE, op="ttl.drop.insert", ttl=""),
    bad("ttl-empty-on-insert", "ttl", WHOLE, ttl=""),
    bad_bytes("ttl-not-utf8", "ttl", NOT_UTF8, op=b"ttl.drop.insert", ttl=b"6\xc30"),
    # ttl: against the op
    bad("ttl-missing-drop", "ttl", "op ttl.drop.insert needs a ttl", op="ttl.drop.insert"),
    bad("ttl-missing-accept", "ttl", "op ttl.accept.insert needs a ttl", op="TTL_ACCEPT_INSERT"),
    bad("ttl-on-drop-delete", "ttl", "op drop.delete takes no ttl", op="drop.delete", ttl="60"),
    bad(
        "ttl-on-accept-delete", "ttl", "op accept.delete takes no ttl", op="Accept.Delete", ttl="1"
    ),
    # reason
    bad("reason-newline", "reason", CTRL, reason="ban\nfake log line"),
    bad("reason-cr", "reason", CTRL, reason="ban\r"),
    bad("reason-nul", "reason", CTRL, reason="ban\x00"),
    bad("reason-tab", "reason", CTRL, reason="ban\tme"),
    bad("reason-escape", "reason", CTRL, reason="\x1b[2J\x1b[31mred"),
    bad("reason-del", "reason", CTRL, reason="ban\x7f"),
    bad("reason-c1-csi", "reason", CTRL, reason="\x9b31mred"),
    bad("reason-c1-nel", "reason", CTRL, reason="line\x85next"),
    bad("reason-too-long", "reason", "at most 256 characters", reason="r" * 257),
    bad("reason-over-field-limit", "reason", "is 5000 characters long", reason="r" * 5000),
    bad_bytes("reason-not-utf8", "reason", NOT_UTF8, reason=b"caf\xe9"),
    bad_bytes("reason-truncated-utf8", "reason", NOT_UTF8, reason=b"\xe2\x82"),
    bad_bytes("reason-surrogate-utf8", "reason", NOT_UTF8, reason=b"\xed\xa0\x80"),
    # request_id
    bad("request_id-space", "request_id", PRINTABLE, request_id="req 1"),
    bad("request_id-non-ascii", "request_id", PRINTABLE, request_id="café"),
    bad("request_id-newline", "request_id", PRINTABLE, request_id="req-1\n"),
    bad("request_id-tab", "request_id", PRINTABLE, request_id="req\t1"),
    bad("request_id-nul", "request_id", PRINTABLE, request_id="req\x00"),
    bad("request_id-too-long", "request_id", "at most 128 characters", request_id="q" * 129),
    bad_bytes("request_id-not-utf8", "request_id", NOT_UTF8, request_id=b"\x80req"),
    # target
    bad("target-space", "target", NOT_HOST, target="web server"),
    bad("target-semicolon", "target", NOT_HOST, target="web;reboot"),
    bad("target-dollar", "target", NOT_HOST, target="$(reboot)"),
    bad("target-leading-dash", "target", NOT_HOST, target="-web"),
    bad("target-path", "target", NOT_HOST, target="../etc"),
    bad("target-non-ascii", "target", NOT_HOST, target="wéb"),
    bad("target-empty-name", "target", "'' is not a host name or label", target="web,,eu"),
    bad("target-trailing-comma", "target", "'' is not a host name or label", target="web,"),
    bad("target-star-and-name", "target", "'*' is not a host name or label", target="*,web"),
    bad("target-newline-inside", "target", NOT_HOST, target="web\nx"),
    bad("target-name-too-long", "target", NOT_HOST, target="a" * 64),
    bad("target-65-hosts", "target", "names 65 hosts; at most 64", target=",".join(["h"] * 65)),
    bad("target-over-field-limit", "target", "is 6000 characters long", target="a," * 3000),
    bad_bytes("target-not-utf8", "target", NOT_UTF8, target=b"web\xfe"),
    # origin (an optional tag the client sets)
    bad("origin-bad", "origin", "is not a valid origin tag", origin="Bad Tag!"),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c.id for c in MALFORMED])
def test_malformed_is_rejected_with_reason(case: Bad) -> None:
    """The whole command is rejected; the message names the field, then says why."""
    with pytest.raises(CommandRejected) as info:
        parse_command(case.fields)
    message = str(info.value)
    assert message.startswith(f"{case.field}: "), message
    assert case.says in message, message


@pytest.mark.parametrize("case", MALFORMED, ids=[c.id for c in MALFORMED])
def test_rejection_message_is_safe_to_show(case: Bad) -> None:
    """Messages end up in results and terminals: one short line, no raw control bytes."""
    with pytest.raises(CommandRejected) as info:
        parse_command(case.fields)
    message = str(info.value)
    assert not CONTROL.search(message), repr(message)
    assert len(message) <= 300, message


def test_a_caller_that_knows_only_value_error_catches_a_rejection() -> None:
    """Code written against ``ValueError`` (settings, scripts) gets the field and the why."""
    try:
        parse_command(fields(ip="nope"))
    except ValueError as exc:
        assert str(exc) == "ip: 'nope' is not an IPv4/IPv6 address or network"
    else:
        pytest.fail("parse_command accepted ip='nope'")


def test_command_cannot_be_built_invalid() -> None:
    """The model keeps its own rules when the client builds it directly."""
    with pytest.raises(ValueError, match="needs a ttl"):
        Command(op=Op.TTL_DROP_INSERT, network=ipaddress.IPv4Network("192.0.2.1/32"))
    with pytest.raises(ValueError, match="host bits"):
        Command.model_validate({"op": "drop.insert", "network": "10.0.0.1/8"})


# --- parse_network ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "network"),
    [
        ("198.51.100.0/24", ipaddress.IPv4Network("198.51.100.0/24")),
        ("2001:db8:1::/48", ipaddress.IPv6Network("2001:db8:1::/48")),
        ("::ffff:198.51.100.7", ipaddress.IPv4Network("198.51.100.7/32")),
        ("::ffff:198.51.100.0/120", ipaddress.IPv4Network("198.51.100.0/24")),
        # all of IPv4-mapped space is all of IPv4, by the same rule
        ("::ffff:0:0/96", ipaddress.IPv4Network("0.0.0.0/0")),
        # below /96 it is an IPv6 network that merely contains the mapped block
        ("::/64", ipaddress.IPv6Network("::/64")),
    ],
    ids=["v4-net", "v6-net", "mapped-host", "mapped-net", "mapped-all", "v6-wide"],
)
def test_parse_network(text: str, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
    """Strict parsing; the IPv4-mapped form comes back as IPv4."""
    parsed = parse_network(text)
    assert parsed == network
    assert type(parsed) is type(network)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "is empty"),
        ("10.0.0.1/8", "'10.0.0.1/8' has host bits set; send the network address"),
        ("fe80::1%eth0", "'fe80::1%eth0': scoped IPv6 addresses are not firewall rules"),
        ("192.0.2.1 ", f"'192.0.2.1 ' {WS}"),
        ("nope", "'nope' is not an IPv4/IPv6 address or network"),
        ("1" * 65, "is too long (65 characters) to be an address"),
    ],
    ids=["empty", "host-bits", "scoped", "space", "word", "long"],
)
def test_parse_network_rejects(text: str, says: str) -> None:
    """A plain ValueError without a field name: callers (settings, CLI) add their own."""
    with pytest.raises(ValueError) as info:
        parse_network(text)
    assert str(info.value) == says
