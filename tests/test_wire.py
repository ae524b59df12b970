"""The worker's fast paths agree with the pydantic models they stand in for.

``read_command`` must accept exactly what ``parse_command`` accepts, with equal values, and
reject the rest with the same message; the ledger's record JSON must be the one
``RuleRecord`` writes; ``Protection.covering`` must answer as ``ipaddress``'s ``overlaps``.
Each is checked over tens of thousands of generated inputs, tricky spellings included.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from pushfw.producer.contract import CommandRejected, Network, parse_command
from pushfw.producer.records import RuleRecord
from pushfw.producer.wire import ParsedCommand, read_command
from pushfw.worker.protect import Protection
from pushfw.worker.record import folded
from pushfw.worker.stream import Entry

# Each pool starts with the valid values (_VALID says how many), then the invalid ones.
_OPS = [
    "drop.insert", "drop.delete", "accept.insert", "accept.delete", "ttl.drop.insert",
    "ttl.accept.insert", "DROP_INSERT", "Ttl_Drop_Insert", "drop_delete",
    "drop", "list.load", "", "drop.insert ", "drop..insert", "dróp.insert",
]  # fmt: skip
_IPS = [
    "10.1.2.3", "10.1.2.0/24", "0.0.0.0/0", "255.255.255.255", "192.168.0.0/16", "127.0.0.1",
    "128.0.0.0/1", "::1", "::ffff:1.2.3.4", "::ffff:10.0.0.0/104", "2001:db8::/32", "2001:DB8::1",
    "10.1.2.3/24", "010.1.2.3", "1.2.3.4/33", "1.2.3.4/032", "0.0.0.0/00", "256.1.1.1", "1.2.3",
    "1.2.3.4.", " 1.2.3.4", "1.2.3.4\n", "\uff11.2.3.4", "1.2.3.\u0664", "2001:db8::1/32",
    "fe80::1%eth0", "1.2.3.4/", "/24", "1.2.3.4/-1", "", "1.2.3.4/+8",
]  # fmt: skip
_TTLS = [None, "600", "1", "00600", "315360000",
         "0", "-1", "1e3", "315360001", "", " 60", "\u0663", "9" * 40]  # fmt: skip
_TARGETS = [None, "", "*", "a,b", "a, b", "web-1", " * ",
            "bad name!", ",".join(["h"] * 65), "a,,b"]  # fmt: skip
_REASONS = [None, "", "ssh brute force", "x" * 256, "café", "a\nb", "x" * 257, "tab\there"]
_REQUEST_IDS = [None, "", "abc-1", "r" * 128, "a b", "r" * 129, "é"]
_ORIGINS = [None, "", "f2b", "ttl", "x" * 16, "TTL", "x" * 17, "9ab"]
_REPLIES = [None, "1", "yes", "no", "", " TRUE ", "0", "maybe"]
_VALID = {
    "op": 9, "ip": 12, "ttl": 5, "target": 7, "reason": 5, "request_id": 4, "origin": 5, "reply": 7,
}  # fmt: skip


def _fields(rng: random.Random) -> dict[bytes, bytes]:
    fields: dict[bytes, bytes] = {}
    for name, pool in (
        ("op", _OPS), ("ip", _IPS), ("ttl", _TTLS), ("target", _TARGETS), ("reason", _REASONS),
        ("request_id", _REQUEST_IDS), ("origin", _ORIGINS), ("reply", _REPLIES),
    ):  # fmt: skip
        # the first values of each pool are valid: a corpus of mostly good commands
        value = rng.choice(pool[: _VALID[name]] if rng.random() < 0.8 else pool)
        if name not in ("op", "ip") and rng.random() < 0.6:
            value = None
        if value is not None or (name in ("op", "ip") and rng.random() < 0.97):
            fields[name.upper().encode() if rng.random() < 0.05 else name.encode()] = (
                value or ""
            ).encode()
    roll = rng.random()
    if roll < 0.02:
        fields[b"OP"] = b"drop.insert"  # a field given twice
    elif roll < 0.04:
        fields[b"reason"] = b"\xff\xfe"  # not UTF-8
    elif roll < 0.06:
        fields[b"future_field"] = b"x"
    return fields


def _outcome(parse: object) -> object:
    try:
        return parse()  # type: ignore[operator]
    except CommandRejected as exc:
        return f"rejected: {exc}"


@pytest.mark.parametrize("seed", range(4))
def test_read_command_agrees_with_the_pydantic_model(seed: int) -> None:
    rng = random.Random(seed)
    accepted = 0
    for _ in range(10_000):
        fields = _fields(rng)
        fast = _outcome(lambda f=fields: read_command(f))
        slow = _outcome(lambda f=fields: ParsedCommand.of(parse_command(f)))
        assert fast == slow, fields
        accepted += isinstance(fast, ParsedCommand)
    assert 1_000 < accepted < 9_000, "the corpus must hold both valid and invalid commands"


def test_every_valid_spelling_of_each_field_agrees() -> None:
    """One field varied at a time on a valid command: every pool value, on its own."""
    base = {"op": "ttl.drop.insert", "ip": "192.0.2.1", "ttl": "60"}
    for name, pool in (
        ("op", _OPS), ("ip", _IPS), ("ttl", _TTLS), ("target", _TARGETS), ("reason", _REASONS),
        ("request_id", _REQUEST_IDS), ("origin", _ORIGINS), ("reply", _REPLIES),
    ):  # fmt: skip
        for value in pool:
            fields = {k.encode(): v.encode() for k, v in base.items() if k != name}
            if value is not None:
                fields[name.encode()] = value.encode()
            fast = _outcome(lambda f=fields: read_command(f))
            slow = _outcome(lambda f=fields: ParsedCommand.of(parse_command(f)))
            assert fast == slow, fields


def test_the_ledger_writes_the_json_rule_record_writes() -> None:
    rng = random.Random(7)
    checked = 0
    for _ in range(5_000):
        fields = _fields(rng)
        if rng.random() < 0.2:
            fields |= {b"ts": b"1700000000", b"sig": b"ab" * 32}
        try:
            cmd = read_command(fields)
        except CommandRejected:
            continue
        entry = Entry(f"1700000000000-{checked}", fields)
        seen_ms = entry.ms + rng.choice([0, 0, 250])
        now_ms = entry.ms + rng.choice([0, 5_000_000])
        expires_ms = seen_ms + cmd.ttl_s * 1000 if cmd.ttl_s else None
        deleted = not cmd.is_insert or (expires_ms is not None and expires_ms <= now_ms)
        signed = {
            k.lower().decode(): v.decode("utf-8", "replace")
            for k, v in fields.items()
            if k.lower() in {b"ip", b"op", b"origin", b"reason", b"request_id", b"target", b"ts",
                             b"ttl", b"sig"}
        }  # fmt: skip
        model = RuleRecord(
            id=entry.id,
            action=cmd.action.value,
            network=str(cmd.network),
            expires_ms=None if deleted else expires_ms,
            target=list(cmd.target),
            reason=cmd.reason,
            origin=cmd.origin,
            deleted=deleted,
            seen_ms=seen_ms if seen_ms != entry.ms else None,
            signed=signed if b"sig" in fields else {},
        )
        written = folded(entry, cmd, seen_ms, now_ms)
        assert written.json == model.model_dump_json(exclude_defaults=True).encode(), fields
        assert (written.rule_id, written.id, written.expires_ms) == (
            model.rule_id,
            model.id,
            model.expires_ms,
        )
        checked += 1
    assert checked > 1_000


def _random_network(rng: random.Random) -> Network:
    """Mostly narrow networks, some wide ones, many near loopback and the start of the space."""
    if rng.random() < 0.5:
        prefix = rng.choice([0, 1, 7, 8, 9, 16, 23, 24, 25, 31, 32, 32, 32])
        bits = rng.getrandbits(32)
        if rng.random() < 0.3:
            bits = 0x7F000000 | bits >> 8
        return ipaddress.IPv4Network((bits, prefix), strict=False)
    prefix = rng.choice([0, 1, 16, 32, 48, 64, 127, 128, 128])
    bits = rng.getrandbits(128)
    if rng.random() < 0.3:
        bits >>= 120
    return ipaddress.IPv6Network((bits, prefix), strict=False)


def test_protection_covers_what_ipaddress_says_overlaps() -> None:
    rng = random.Random(3)
    protected = [_random_network(rng) for _ in range(6)] + [
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    ]
    protection = Protection(protected)
    hits = 0
    for _ in range(20_000):
        network = _random_network(rng)
        expected = next(
            (p for p in protected if p.version == network.version and p.overlaps(network)), None
        )
        assert protection.covering(network) == expected, network
        hits += expected is not None
    assert 1_000 < hits < 19_000
