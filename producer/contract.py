"""The wire contract (v1): a command as stream fields, and a host's result.

A command is a flat map of strings so that ``redis-cli XADD {pushfw}:cmd '*' op drop.insert
ip 192.168.1.6`` is a complete producer. Parsing never trusts the bytes: every field is
decoded strictly, bounded, and validated with :mod:`ipaddress`; the first problem becomes
a :class:`CommandRejected` whose message names the field and the reason. What each op
does is its row in :data:`.ops.OPS`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Collection, Mapping
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pushfw.producer.connection import text
from pushfw.producer.ops import OPS, Action, Op, is_list_op

__all__ = [
    "DEFAULT_MIN_ACCEPT_PREFIX_V4",
    "DEFAULT_MIN_ACCEPT_PREFIX_V6",
    "DEFAULT_MIN_DROP_PREFIX_V4",
    "DEFAULT_MIN_DROP_PREFIX_V6",
    "LIST_SIGNED_FIELDS",
    "LOOPBACK",
    "MAX_REASON_LEN",
    "MAX_REQUEST_ID_LEN",
    "MAX_TTL_S",
    "SIGNED_FIELDS",
    "Action",
    "Command",
    "CommandRejected",
    "Network",
    "Op",
    "Result",
    "Status",
    "decode_fields",
    "default_min_prefix",
    "explain",
    "option_fields",
    "parse_command",
    "parse_network",
    "signature",
    "signing_payload",
    "targets",
]

MAX_TTL_S = 10 * 365 * 24 * 3600
MAX_REASON_LEN = 256
MAX_REQUEST_ID_LEN = 128
MAX_TARGETS = 64
MAX_FIELD_LEN = 4096

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK: tuple[Network, ...] = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv6Network("::1/128"),
)
"""Networks every host protects: a drop of them is refused everywhere (the importer too)."""

# The blast-radius bounds a host applies unless configured otherwise (the worker settings
# min_*_prefix_v*), as prefix lengths: the widest network one drop or accept may cover. The
# importer holds a list to them, since every host with the defaults refuses a wider entry.
DEFAULT_MIN_DROP_PREFIX_V4 = 8
DEFAULT_MIN_DROP_PREFIX_V6 = 16
DEFAULT_MIN_ACCEPT_PREFIX_V4 = 8  # an accept beats every ban: 0.0.0.0/0 would lift them all
DEFAULT_MIN_ACCEPT_PREFIX_V6 = 16

_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_REQUEST_ID = re.compile(r"[\x21-\x7e]+")
_ORIGIN = re.compile(r"[a-z][a-z0-9_-]{0,15}")
_TTL = re.compile(r"[0-9]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class CommandRejected(ValueError):
    """A stream entry that is not a valid command; the message says why."""


def default_min_prefix(action: Action, version: int) -> int:
    """The default bound: the shortest prefix an ``action`` of this IP version may have."""
    if action is Action.DROP:
        return DEFAULT_MIN_DROP_PREFIX_V4 if version == 4 else DEFAULT_MIN_DROP_PREFIX_V6
    return DEFAULT_MIN_ACCEPT_PREFIX_V4 if version == 4 else DEFAULT_MIN_ACCEPT_PREFIX_V6


class Status(StrEnum):
    """What a host did with a command."""

    APPLIED = "applied"
    UNCHANGED = "unchanged"
    EXPIRED = "expired"
    REJECTED = "rejected"
    FAILED = "failed"


def parse_network(raw: str) -> Network:
    """Parse an address or a network strictly; an IPv4-mapped IPv6 value means the IPv4 one."""
    if not raw:
        raise ValueError("is empty")
    if _CONTROL.search(raw) or " " in raw:
        raise ValueError(f"{raw[:60]!r} contains whitespace or control characters")
    if "%" in raw:
        raise ValueError(f"{raw[:60]!r}: scoped IPv6 addresses are not firewall rules")
    if len(raw) > 64:
        raise ValueError(f"is too long ({len(raw)} characters) to be an address")
    try:
        net = ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            raise ValueError(f"{raw!r} has host bits set; send the network address") from None
        raise ValueError(f"{raw!r} is not an IPv4/IPv6 address or network") from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_V4_MAPPED):
        v4 = ipaddress.IPv4Address(int(net.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network((v4, net.prefixlen - 96))
    return net


class Command(BaseModel):
    """One validated command.

    Built by :func:`parse_command` from stream fields, or directly by the producer client.
    ``ttl_s`` is set for timed inserts; expiry is the entry id's time plus ``ttl_s``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    op: Op
    network: Network
    ttl_s: Annotated[int, Field(ge=1, le=MAX_TTL_S)] | None = None
    target: tuple[str, ...] = ()
    reason: Annotated[str, Field(max_length=MAX_REASON_LEN)] = ""
    request_id: Annotated[str, Field(max_length=MAX_REQUEST_ID_LEN)] = ""
    origin: str = ""
    reply: bool = False
    """Ask every host for a result entry (a ``request_id`` asks too; rejected and failed
    commands always get one). Without it a host only counts the command in its heartbeat."""

    @field_validator("op", mode="before")
    @classmethod
    def _op(cls, value: object) -> object:
        return Op.parse(value) if isinstance(value, str) else value

    @field_validator("network", mode="before")
    @classmethod
    def _network(cls, value: object) -> object:
        return parse_network(value) if isinstance(value, str) else value

    @field_validator("ttl_s", mode="before")
    @classmethod
    def _ttl(cls, value: object) -> object:
        if isinstance(value, str):
            if not _TTL.fullmatch(value):
                raise ValueError(f"{value[:40]!r} is not a whole number of seconds")
            digits = value.lstrip("0") or "0"
            seconds = int(digits) if len(digits) <= 12 else MAX_TTL_S + 1
            if not 1 <= seconds <= MAX_TTL_S:
                raise ValueError(f"{digits[:40]} is outside 1..{MAX_TTL_S} seconds")
            return seconds
        return value

    @field_validator("target", mode="before")
    @classmethod
    def _target(cls, value: object) -> object:
        if isinstance(value, str):
            value = () if value.strip() in ("", "*") else tuple(value.split(","))
        if isinstance(value, (tuple, list)):
            names = tuple(str(name).strip() for name in value)
            if len(names) > MAX_TARGETS:
                raise ValueError(f"names {len(names)} hosts; at most {MAX_TARGETS}")
            for name in names:
                if not _HOST_NAME.fullmatch(name):
                    raise ValueError(f"{name[:70]!r} is not a host name or label")
            return names
        return value

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        if _CONTROL.search(value):
            raise ValueError("contains control characters (newline, NUL, ...)")
        return value

    @field_validator("request_id")
    @classmethod
    def _request_id(cls, value: str) -> str:
        if value and not _REQUEST_ID.fullmatch(value):
            raise ValueError("must be printable ASCII without spaces")
        return value

    @field_validator("reply", mode="before")
    @classmethod
    def _reply(cls, value: object) -> object:
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _YES:
                return True
            if word in _NO:
                return False
            raise ValueError(f"{value[:20]!r} is not 1/yes/true or 0/no/false")
        return value

    @field_validator("origin")
    @classmethod
    def _origin(cls, value: str) -> str:
        if value and not _ORIGIN.fullmatch(value):
            raise ValueError(f"{value[:20]!r} is not a valid origin tag")
        return value

    @model_validator(mode="after")
    def _ttl_matches_op(self) -> Command:
        if self.op.needs_ttl and self.ttl_s is None:
            raise ValueError(f"ttl: op {self.op.value} needs a ttl")
        if not OPS[self.op].takes_ttl and self.ttl_s is not None:
            raise ValueError(f"ttl: op {self.op.value} takes no ttl")
        return self

    @property
    def action(self) -> Action:
        return self.op.action

    @property
    def is_insert(self) -> bool:
        return self.op.is_insert

    @property
    def wants_result(self) -> bool:
        """The producer asked for a per-host result entry."""
        return self.reply or bool(self.request_id)

    def targets(self, host: str, labels: frozenset[str]) -> bool:
        """Whether a host with this name and these labels is meant by ``target``."""
        return targets(self.target, host, labels)

    def to_fields(self) -> dict[str, str]:
        """The stream fields of this command, in canonical spelling."""
        fields = {"op": self.op.value, "ip": _network_text(self.network)}
        return fields | option_fields(
            self.ttl_s, self.target, self.reason, self.request_id, self.origin, self.reply
        )


def targets(target: Collection[str], host: str, labels: Collection[str]) -> bool:
    """Whether a command with ``target`` is meant for a host with this name and these labels.

    The one rule, on every path (stream, ledger, lists, ``pushfw status``): no target means
    every host, else a name in it is the host's name or one of its labels.
    """
    return not target or any(t == host or t in labels for t in target)


def option_fields(
    ttl_s: int | None,
    target: tuple[str, ...],
    reason: str,
    request_id: str,
    origin: str,
    reply: bool,
) -> dict[str, str]:
    """The optional fields every command shares, as the wire spells them (unset ones left out)."""
    fields = {"ttl": str(ttl_s)} if ttl_s is not None else {}
    if target:
        fields["target"] = ",".join(target)
    for name, value in (("reason", reason), ("request_id", request_id), ("origin", origin)):
        if value:
            fields[name] = value
    if reply:
        fields["reply"] = "1"
    return fields


def _network_text(net: Network) -> str:
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


_WIRE_TO_MODEL = {
    "op": "op",
    "ip": "network",
    "ttl": "ttl_s",
    "target": "target",
    "reason": "reason",
    "request_id": "request_id",
    "origin": "origin",
    "reply": "reply",
}
_YES = frozenset({"1", "yes", "true", "on"})
_NO = frozenset({"", "0", "no", "false", "off"})


def decode_fields(
    fields: Mapping[bytes, bytes] | Mapping[str, str], wire: Mapping[str, str] = _WIRE_TO_MODEL
) -> dict[str, str]:
    """Decode the known fields strictly; unknown fields are ignored (forward compatibility)."""
    decoded: dict[str, str] = {}
    for raw_key, raw_value in fields.items():
        key = text(raw_key).lower()
        if key not in wire:
            continue
        if wire[key] in decoded:
            raise CommandRejected(f"{key}: appears more than once")
        if isinstance(raw_value, bytes):
            try:
                value = raw_value.decode("utf-8")
            except UnicodeDecodeError:
                raise CommandRejected(f"{key}: is not valid UTF-8") from None
        else:
            value = raw_value
        if len(value) > MAX_FIELD_LEN:
            raise CommandRejected(
                f"{key}: is {len(value)} characters long, at most {MAX_FIELD_LEN}"
            )
        decoded[wire[key]] = value
    return decoded


def explain(exc: ValidationError, wire: Mapping[str, str] = _WIRE_TO_MODEL) -> str:
    """A validation error as one line that names the wire fields."""
    model_to_wire = {v: k for k, v in wire.items()}
    parts = []
    for err in exc.errors(include_url=False):
        loc = model_to_wire.get(str(err["loc"][0]), str(err["loc"][0])) if err["loc"] else ""
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_command(fields: Mapping[bytes, bytes] | Mapping[str, str]) -> Command:
    """Parse one stream entry's fields into a :class:`Command`.

    Raises:
        CommandRejected: the entry is not a valid v1 command; the message says which field
            is wrong and why, and is safe to show (it quotes at most a short prefix).
    """
    values = decode_fields(fields)
    for required, wire in (("op", "op"), ("network", "ip")):
        if required not in values:
            raise CommandRejected(f"{wire}: is missing")
    try:
        return Command.model_validate(values)
    except ValidationError as exc:
        raise CommandRejected(explain(exc)) from None


SIGNED_FIELDS = ("ip", "op", "origin", "reason", "request_id", "target", "ts", "ttl")
"""The fields a signature covers: every known field but ``reply`` (which only asks for result
entries), plus ``ts``; never ``sig`` itself."""


LIST_SIGNED_FIELDS = (
    "action",
    "name",
    "op",
    "origin",
    "reason",
    "request_id",
    "size",
    "target",
    "ts",
    "ttl",
    "version",
)
"""What a list command's signature covers; ``version`` is the content's hash, so the
signature covers every entry of the list too."""


def _wire_items(fields: Mapping[bytes, bytes] | Mapping[str, str]) -> dict[bytes, bytes]:
    """Field names lower-cased, names and values as bytes (str values as UTF-8)."""
    out: dict[bytes, bytes] = {}
    for raw_key, raw_value in fields.items():
        key = raw_key if isinstance(raw_key, bytes) else raw_key.encode("utf-8")
        value = raw_value if isinstance(raw_value, bytes) else raw_value.encode("utf-8")
        key = key.lower()
        if key in out:
            raise CommandRejected(f"{key.decode('utf-8', 'replace')}: appears more than once")
        out[key] = value
    return out


def signing_payload(fields: Mapping[bytes, bytes] | Mapping[str, str]) -> bytes:
    """The bytes an HMAC signature of a command covers (signing rule v1).

    Take every field of :data:`SIGNED_FIELDS` (:data:`LIST_SIGNED_FIELDS` for an ``op`` that
    starts with ``list.``) that the entry has (field names compared in
    lower case; other fields, ``sig`` among them, are left out), write each as
    ``name=value`` with the name in lower case and the value's bytes exactly as sent (UTF-8
    for text), sort these lines by name and join them with ``\n`` (no newline at the end).
    The signature is the lower-case hex HMAC-SHA256 of these bytes under the shared key.

    Raises:
        CommandRejected: a signed field appears twice (``op`` and ``OP``) or a value holds a
            newline, either of which would make the payload ambiguous.
    """
    items = _wire_items(fields)
    lines = []
    names = LIST_SIGNED_FIELDS if is_list_op(items.get(b"op", b"")) else SIGNED_FIELDS
    for name in names:
        value = items.get(name.encode())
        if value is None:
            continue
        if b"\n" in value:
            raise CommandRejected(f"{name}: contains a newline")
        lines.append(name.encode() + b"=" + value)
    return b"\n".join(lines)


def signature(fields: Mapping[bytes, bytes] | Mapping[str, str], key: bytes | str) -> str:
    """The ``sig`` field for these fields: hex HMAC-SHA256 of :func:`signing_payload`."""
    secret = key.encode("utf-8") if isinstance(key, str) else key
    return hmac.new(secret, signing_payload(fields), hashlib.sha256).hexdigest()


class Result(BaseModel):
    """One host's outcome for one command, as written to the results stream."""

    model_config = ConfigDict(frozen=True)

    cmd: str
    host: str
    status: Status
    detail: str = ""
    request_id: str = ""
    id: str = ""

    def to_fields(self) -> dict[str, str]:
        return {
            "cmd": self.cmd,
            "request_id": self.request_id,
            "host": self.host,
            "status": self.status.value,
            "detail": self.detail,
        }

    @classmethod
    def from_entry(cls, entry_id: str, fields: Mapping[str, str]) -> Result:
        return cls(
            id=entry_id,
            cmd=fields.get("cmd", ""),
            host=fields.get("host", ""),
            status=Status(fields.get("status", "failed")),
            detail=fields.get("detail", ""),
            request_id=fields.get("request_id", ""),
        )
