"""Reading commands off the stream fast: the checks :class:`.contract.Command` makes, without
a pydantic model per entry.

A worker reads every command of the stream, so building and validating a pydantic model for
each was most of a host's work per command (docs/benchmarks.md). :func:`read_command` applies the
same rules with plain code and returns a slotted :class:`ParsedCommand`. It only ever
accepts what ``Command`` accepts: whatever it is not sure of (a value its quick checks
refuse, a spelling it has not seen) goes through :func:`.parse_command`,
which accepts it with the same values or rejects it with the same message. Pydantic stays
at the edges: producers build ``Command``; hosts read ``ParsedCommand``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from pushfw.producer.contract import (
    MAX_REASON_LEN,
    MAX_REQUEST_ID_LEN,
    Action,
    Command,
    Network,
    Op,
    decode_fields,
    parse_command,
    parse_network,
)
from pushfw.producer.ops import OPS

__all__ = ["ParsedCommand", "read_command", "read_network"]

_ACTION = {op: op.action for op in Op}
_INSERT = {op: OPS[op].insert for op in Op}
_NEEDS_TTL = {op: OPS[op].ttl == "required" for op in Op}
_TAKES_TTL = {op: OPS[op].takes_ttl for op in Op}
_OPS: dict[str, Op] = {op.value: op for op in Op}
_OPS_KEPT = 256
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_V4_NET = re.compile(rf"({_OCTET}(?:\.{_OCTET}){{3}})(?:/(3[0-2]|[12]?[0-9]))?")
"""Dotted quads without leading zeros, as :mod:`ipaddress` spells them, and a prefix."""


@dataclass(frozen=True, slots=True)
class ParsedCommand:
    """One valid command as a host read it: the fields of :class:`.contract.Command`."""

    op: Op
    network: Network
    ttl_s: int | None = None
    target: tuple[str, ...] = ()
    reason: str = ""
    request_id: str = ""
    origin: str = ""
    reply: bool = False

    @classmethod
    def of(cls, cmd: Command) -> ParsedCommand:
        return cls(
            cmd.op,
            cmd.network,
            cmd.ttl_s,
            cmd.target,
            cmd.reason,
            cmd.request_id,
            cmd.origin,
            cmd.reply,
        )

    @property
    def action(self) -> Action:
        return _ACTION[self.op]

    @property
    def is_insert(self) -> bool:
        return _INSERT[self.op]

    @property
    def wants_result(self) -> bool:
        """The producer asked for a per-host result entry."""
        return self.reply or bool(self.request_id)


def read_command(fields: Mapping[bytes, bytes]) -> ParsedCommand:
    """Parse one stream entry's fields as :func:`.parse_command` does.

    Raises:
        CommandRejected: as :func:`.parse_command` would, with its message.
    """
    values = decode_fields(fields)
    try:
        return _quick(values)
    except (KeyError, ValueError):
        pass
    return ParsedCommand.of(parse_command(fields))


def _quick(values: dict[str, str]) -> ParsedCommand:
    """The common shapes, checked by hand; any doubt raises for the full parse to answer."""
    op = _op(values["op"])
    network = read_network(values["network"])
    ttl = values.get("ttl_s")
    ttl_s = cast(int, Command._ttl(ttl)) if ttl is not None else None
    if (ttl_s is None and _NEEDS_TTL[op]) or (ttl_s is not None and not _TAKES_TTL[op]):
        raise ValueError("ttl does not fit op")
    target = values.get("target")
    reason = values.get("reason", "")
    if len(reason) > MAX_REASON_LEN:
        raise ValueError("reason too long")
    request_id = values.get("request_id", "")
    if len(request_id) > MAX_REQUEST_ID_LEN:
        raise ValueError("request_id too long")
    reply = values.get("reply")
    return ParsedCommand(
        op,
        network,
        ttl_s,
        cast(tuple[str, ...], Command._target(target)) if target is not None else (),
        Command._reason(reason) if reason else "",
        Command._request_id(request_id),
        Command._origin(values.get("origin", "")),
        cast(bool, Command._reply(reply)) if reply is not None else False,
    )


def _op(raw: str) -> Op:
    op = _OPS.get(raw)
    if op is None:
        op = Op.parse(raw)
        if len(_OPS) < _OPS_KEPT:
            _OPS[raw] = op
    return op


def read_network(raw: str) -> Network:
    """:func:`.parse_network`, with dotted quads built from their integer (a third of its
    time): the stream's and the ledger's networks are read with it."""
    match = _V4_NET.fullmatch(raw)
    if match is None:
        return parse_network(raw)
    address, prefix = match.group(1, 2)
    a, b, c, d = address.split(".")
    value = int(a) << 24 | int(b) << 16 | int(c) << 8 | int(d)
    length = 32 if prefix is None else int(prefix)
    if value & (0xFFFFFFFF >> length):
        raise ValueError("host bits set")
    return ipaddress.IPv4Network((value, length))
