"""Named lists: a blocklist stored once in Redis and referenced by one stream command.

``pushfw import FILE`` reads a list (plain addresses, CIDR networks, comments; FireHOL
netsets and Spamhaus DROP files are such lists), validates every entry as strictly as a
single command's ``ip``, removes duplicates and entries a wider entry covers, and packs what
is left into :class:`ListContent`: sorted fixed-width records, 5 bytes per IPv4 entry and 17
per IPv6 one. An entry every host with the default bounds would refuse (wider than them, or
a drop of loopback) is an invalid line, never a wider entry that covers others: removing
what it covers would leave those out of every kernel. The content is stored under a key
named after its hash (the list's version), and a ``list.load`` command names the list and
that version; every host fetches the content, checks the hash and makes its kernel follow.
Hosts keep the packed content of the version they hold, so a new version costs the kernel
only the difference (:func:`difference`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import operator
import re
import socket
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pushfw.producer.connection import text
from pushfw.producer.contract import (
    LOOPBACK,
    MAX_REASON_LEN,
    MAX_REQUEST_ID_LEN,
    MAX_TTL_S,
    Action,
    Command,
    CommandRejected,
    Network,
    decode_fields,
    default_min_prefix,
    explain,
    option_fields,
    parse_network,
    targets,
)
from pushfw.producer.keys import Keys
from pushfw.producer.ops import OPS, ListOp, is_list_op

__all__ = [
    "LIST_NAME",
    "LOCAL_SPACE",
    "MAX_LIST_ENTRIES",
    "ListCommand",
    "ListContent",
    "ListFile",
    "ListOp",
    "difference",
    "is_list_entry",
    "list_name_for",
    "local_space",
    "parse_list_command",
    "read_content",
    "read_list",
    "record_text",
    "refused_by_default",
    "refused_with",
]

LIST_NAME = re.compile(r"[a-z][a-z0-9_]{0,15}")
"""A list's name: short enough for an ipset set name with pushfw's prefix and a family."""
MAX_LIST_ENTRIES = 2_000_000
"""The most entries a list may have: a 2M-entry load is about 17 s of kernel work on a
small machine, within the 30 s of the worker's systemd watchdog (one call cannot ping it)."""
_MAGIC = b"PFL1"
_HEADER = struct.Struct(">4sII")
_WIDTH = {4: 5, 6: 17}
_VERSION = re.compile(r"[0-9a-f]{32}")


def is_list_entry(fields: Mapping[bytes, bytes] | None) -> bool:
    """Whether a stream entry's ``op`` is a list operation (``list.load``, ``list.delete``)."""
    if not fields:
        return False
    for key, value in fields.items():
        if key.lower() == b"op":
            return is_list_op(value)
    return False


def list_name_for(path_stem: str) -> str:
    """A valid list name from a file name: ``firehol_level1.netset`` -> ``firehol_level1``."""
    name = re.sub(r"[^a-z0-9_]+", "_", path_stem.lower().split(".")[0]).strip("_")
    if not name or not name[0].isalpha():
        name = f"list_{name}"
    return name[:16].rstrip("_")


def _record(token: str) -> tuple[int, bytes]:
    """One entry as (family, packed record); raises ValueError with the reason."""
    addr, slash, plen = token.partition("/")
    if ":" not in addr and (not slash or (plen.isascii() and plen.isdigit() and len(plen) <= 2)):
        try:
            packed = socket.inet_pton(socket.AF_INET, addr)
        except OSError:
            packed = b""
        prefix = int(plen) if slash else 32
        if packed and prefix <= 32:
            if int.from_bytes(packed) & ((1 << (32 - prefix)) - 1):
                raise ValueError(f"{token!r} has host bits set; write the network address")
            return 4, packed + bytes((prefix,))
    net = parse_network(token)  # the strict parser single commands use: it says what is wrong
    return net.version, net.network_address.packed + bytes((net.prefixlen,))


def _span(rec: bytes) -> tuple[int, int]:
    """The first and last address a packed record covers."""
    start = int.from_bytes(rec[:-1])
    return start, start | ((1 << ((len(rec) - 1) * 8 - rec[-1])) - 1)


_LOOPBACK_SPANS: dict[int, tuple[int, int]] = {
    net.version: (int(net.network_address), int(net.broadcast_address)) for net in LOOPBACK
}
_LOOPBACK_LEAD = {4: b"", 6: b""}
"""The first byte of each loopback network (all of them /8 or longer): an entry of /8 or
longer overlaps one only if its first byte is among these, a cheap test per entry."""
for _net in LOOPBACK:
    assert _net.prefixlen >= 8
    _LOOPBACK_LEAD[_net.version] += _net.network_address.packed[:1]


def refused_by_default(network: Network, action: Action) -> str | None:
    """Why every host with the default bounds refuses a rule on ``network`` (None: it may
    not): the CLI warns before such a rule goes out, as the importer does for an entry."""
    family, rec = _record(str(network))
    return _refused_everywhere(family, rec, action, "")


def _refused_everywhere(
    family: int,
    rec: bytes,
    action: Action,
    lost: str = ", and what it covers would be lost with it",
) -> str | None:
    """Why every host with the default bounds refuses this entry (None: it may not)."""
    widest = default_min_prefix(action, family)
    if rec[-1] < widest:
        return (
            f"{record_text(rec)} is wider than /{widest}, the widest network a"
            f"{'n' if action is Action.ACCEPT else ''} {action.value} may cover by default "
            f"(min_{'drop' if action is Action.DROP else 'accept'}_prefix_v{family}); "
            f"hosts refuse it{lost}"
        )
    if action is Action.DROP:
        low, high = _LOOPBACK_SPANS[family]
        start, end = _span(rec)
        if start <= high and end >= low:
            return f"{record_text(rec)} covers loopback, which no host drops"
    return None


def _uncovered(
    records: list[bytes], width: int, covers: dict[bytes, int] | None = None
) -> list[bytes]:
    """Sorted records without duplicates and without entries a wider one covers; with
    ``covers``, counts there how many narrower entries each kept one covers."""
    records.sort()  # by address, then by prefix: a wider network before what it covers
    bits = (width - 1) * 8
    kept: list[bytes] = []
    covered_to = -1
    previous = b""
    for rec in records:
        start = int.from_bytes(rec[:-1])
        if start <= covered_to:
            if covers is not None and rec != previous:  # duplicates are adjacent
                covers[kept[-1]] = covers.get(kept[-1], 0) + 1
            previous = rec
            continue
        kept.append(rec)
        previous = rec
        covered_to = start | ((1 << (bits - rec[-1])) - 1)
    return kept


@dataclass(frozen=True, slots=True)
class ListContent:
    """A list's entries, packed: ``v4`` and ``v6`` hold sorted fixed-width records."""

    v4: bytes = b""
    v6: bytes = b""

    @classmethod
    def pack(
        cls, records4: list[bytes], records6: list[bytes], covers: dict[bytes, int] | None = None
    ) -> ListContent:
        return cls(
            b"".join(_uncovered(records4, 5, covers)), b"".join(_uncovered(records6, 17, covers))
        )

    @classmethod
    def of(cls, networks: Iterable[str]) -> ListContent:
        """Content from entries already known to be valid (tests, the Python producer)."""
        by_family: dict[int, list[bytes]] = {4: [], 6: []}
        for net in networks:
            family, rec = _record(net)
            by_family[family].append(rec)
        return cls.pack(by_family[4], by_family[6])

    @property
    def size(self) -> int:
        return len(self.v4) // 5 + len(self.v6) // 17

    def to_bytes(self) -> bytes:
        """What is stored in Redis: a header with both counts, then both record runs."""
        return _HEADER.pack(_MAGIC, len(self.v4) // 5, len(self.v6) // 17) + self.v4 + self.v6

    @classmethod
    def from_bytes(cls, blob: bytes) -> ListContent:
        """Raises ValueError if ``blob`` is not a list's content."""
        if len(blob) < _HEADER.size:
            raise ValueError("list content is truncated")
        magic, n4, n6 = _HEADER.unpack_from(blob)
        if magic != _MAGIC or len(blob) != _HEADER.size + n4 * 5 + n6 * 17:
            raise ValueError("list content is not in the format this worker reads")
        split = _HEADER.size + n4 * 5
        return cls(blob[_HEADER.size : split], blob[split:])

    @staticmethod
    def stored_length(v4: int, v6: int) -> int:
        """The bytes :meth:`to_bytes` writes for ``v4`` IPv4 and ``v6`` IPv6 entries."""
        return _HEADER.size + v4 * 5 + v6 * 17

    def check(self) -> None:
        """Raise ValueError unless this is what :meth:`pack` writes: per family, prefix
        lengths within the family's width, no host bits set, and records strictly
        increasing with no entry inside another (the gate's binary search relies on it).

        Content read from Redis is input: a producer can store any bytes that hash to the
        version it names, so a worker checks them before the gate sees a single entry.
        """
        for blob, width in ((self.v4, 5), (self.v6, 17)):
            if blob:
                _check_records(blob, width)

    def cover(self, version: int) -> int:
        """How many addresses of one family the entries cover (they never overlap)."""
        blob, width = (self.v4, 5) if version == 4 else (self.v6, 17)
        bits = (width - 1) * 8
        prefixes = blob[width - 1 :: width]
        return sum(prefixes.count(plen) << (bits - plen) for plen in set(prefixes))

    @property
    def version(self) -> str:
        """The content's id: the first 128 bits of its SHA-256, in hex."""
        return hashlib.sha256(self.to_bytes()).hexdigest()[:32]

    def networks(self) -> Iterator[str]:
        """Every entry as a canonical CIDR string, IPv4 first."""
        yield from _texts(self.v4, 4)
        yield from _texts(self.v6, 6)

    def without(self, refused4: set[bytes], refused6: set[bytes]) -> ListContent:
        """This content less some of its records."""
        return ListContent(
            b"".join(r for r in _records(self.v4, 5) if r not in refused4) if refused4 else self.v4,
            b"".join(r for r in _records(self.v6, 17) if r not in refused6)
            if refused6
            else self.v6,
        )

    def overlapping(self, version: int, start: int, end: int) -> list[bytes]:
        """The records of one family that overlap the address range ``start..end``."""
        blob, width = (self.v4, 5) if version == 4 else (self.v6, 17)
        count = len(blob) // width
        bits = (width - 1) * 8

        def first_address(i: int) -> int:
            return int.from_bytes(blob[i * width : i * width + width - 1])

        found = []
        i = bisect.bisect_right(range(count), start, key=first_address) - 1
        i = max(i, 0)
        while i < count:
            rec = blob[i * width : (i + 1) * width]
            first = int.from_bytes(rec[:-1])
            if first > end:
                break
            if first | ((1 << (bits - rec[-1])) - 1) >= start:
                found.append(rec)
            i += 1
        return found

    def narrower_than(self, version: int, widest: int) -> list[bytes]:
        """The records of one family wider than ``/widest`` (a prefix shorter than it)."""
        blob, width = (self.v4, 5) if version == 4 else (self.v6, 17)
        if not blob or min(blob[width - 1 :: width]) >= widest:
            return []
        return [r for r in _records(blob, width) if r[-1] < widest]


def read_content(
    client: redis.Redis, keys: Keys, name: str, version: str, size: int
) -> ListContent | None:
    """One version of a list's entries (None: gone), checked as strictly as a command: a
    string of the length ``size`` entries take (asked before the value is read), in the
    importer's format, holding ``size`` entries, hashing to ``version``.

    Raises:
        ValueError: the content is not what the importer would have written; the message
            says why.
    """
    key = keys.list_content(name, version)
    kind = text(client.type(key))
    if kind == "none":
        return None
    if kind != "string":
        raise ValueError(f"{key} is a {kind}, not a list's content")
    if not 0 <= size <= MAX_LIST_ENTRIES:
        raise ValueError(f"size {size} is beyond the {MAX_LIST_ENTRIES:,} entries a list may have")
    length: Any = client.strlen(key)
    shortest, longest = ListContent.stored_length(size, 0), ListContent.stored_length(0, size)
    if not shortest <= length <= longest:
        raise ValueError(
            f"the content is {length:,} bytes, and {size:,} entries take {shortest:,} to "
            f"{longest:,}: the command's size (the entry count) is not the content's"
        )
    # raw bytes from either kind of client (a producer's decodes replies to str)
    raw: Any = client.execute_command("GET", key, NEVER_DECODE=[])  # type: ignore[no-untyped-call]
    if raw is None:
        return None
    content = ListContent.from_bytes(raw)
    if content.size != size:
        raise ValueError(f"the content holds {content.size:,} entries, the command says {size:,}")
    if content.version != version:
        raise ValueError(f"the content stored as version {version} hashes to {content.version}")
    content.check()
    return content


def _starts(blob: bytes, width: int) -> list[int]:
    """The first address of every record, as integers (IPv4 unpacked in one C call)."""
    if width == 5:
        aligned = bytearray(len(blob) // 5 * 4)
        for byte in range(4):
            aligned[byte::4] = blob[byte::5]
        return list(struct.unpack(f">{len(aligned) // 4}I", aligned))
    return [int.from_bytes(blob[i : i + width - 1]) for i in range(0, len(blob), width)]


_CHECK_CHUNK = 65_536
"""Records checked at once: a million at once held three lists of a million integers (about
90 MB on top of the worker's peak); a chunk holds a few MB, at the same speed."""


def _check_records(blob: bytes, width: int) -> None:
    """:meth:`ListContent.check` for one family's records, in C-speed passes over chunks (a
    1M list is checked in a small share of its kernel load, in bounded memory)."""
    bits = (width - 1) * 8
    family = "IPv4" if width == 5 else "IPv6"
    prefixes = blob[width - 1 :: width]
    if max(prefixes) > bits:
        i = next(i for i, plen in enumerate(prefixes) if plen > bits)
        raise ValueError(f"{family} record {i + 1} has prefix length {prefixes[i]}, beyond {bits}")
    host_masks = [(1 << (bits - plen)) - 1 for plen in range(bits + 1)]
    previous_end = -1
    for first in range(0, len(prefixes), _CHECK_CHUNK):
        chunk = blob[first * width : (first + _CHECK_CHUNK) * width]
        masks = list(map(host_masks.__getitem__, prefixes[first : first + _CHECK_CHUNK]))
        starts = _starts(chunk, width)
        if any(map(operator.and_, starts, masks)):
            i = next(i for i, (s, m) in enumerate(zip(starts, masks, strict=True)) if s & m)
            raise ValueError(f"{family} record {first + i + 1} has host bits set")
        ends = [previous_end, *map(operator.or_, starts, masks)]
        if not all(map(operator.gt, starts, ends)):
            i = first + next(i for i in range(len(starts)) if starts[i] <= ends[i])
            raise ValueError(
                f"{family} record {i + 1} ({record_text(blob[i * width : (i + 1) * width])}) is "
                f"not after record {i} ({record_text(blob[(i - 1) * width : i * width])}): "
                "records must be sorted, without duplicates or entries inside another"
            )
        previous_end = ends[-1]


def _records(blob: bytes, width: int) -> Iterator[bytes]:
    for i in range(0, len(blob), width):
        yield blob[i : i + width]


def record_text(rec: bytes) -> str:
    """A packed record as a canonical CIDR string."""
    family = socket.AF_INET if len(rec) == 5 else socket.AF_INET6
    return f"{socket.inet_ntop(family, rec[:-1])}/{rec[-1]}"


def _texts(blob: bytes, version: int) -> Iterator[str]:
    family, width = (socket.AF_INET, 5) if version == 4 else (socket.AF_INET6, 17)
    ntop = socket.inet_ntop
    for i in range(0, len(blob), width):
        yield f"{ntop(family, blob[i : i + width - 1])}/{blob[i + width - 1]}"


def difference(old: ListContent, new: ListContent) -> tuple[list[str], list[str]]:
    """What turns ``old`` into ``new``: (entries to add, entries to remove), as CIDR strings."""
    added: list[str] = []
    removed: list[str] = []
    for before, after, width in ((old.v4, new.v4, 5), (old.v6, new.v6, 17)):
        if before == after:
            continue
        i = j = 0
        while i < len(before) and j < len(after):
            a, b = before[i : i + width], after[j : j + width]
            if a == b:
                i += width
                j += width
            elif a < b:
                removed.append(record_text(a))
                i += width
            else:
                added.append(record_text(b))
                j += width
        removed.extend(record_text(r) for r in _records(before[i:], width))
        added.extend(record_text(r) for r in _records(after[j:], width))
    return added, removed


@dataclass(frozen=True, slots=True)
class ListFile:
    """A list file as read: its content and what was left out, line by line."""

    content: ListContent
    lines: int
    entries: int
    """Entries read (before duplicates and covered entries were removed)."""
    errors: tuple[tuple[int, str], ...]
    """(line number, why) for every line that is not an address, a network or a comment."""
    covers: Mapping[bytes, int] = field(default_factory=dict)
    """Per entry of the content that covers narrower entries of the file, how many: a host
    that refuses that entry holds none of them (see :func:`refused_with`)."""


def _token(line: str) -> str:
    """The entry on one line: comments (``#``, ``;``) cut, Spamhaus JSON lines read."""
    text = line.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError:
            return text
        if isinstance(value, dict):
            return str(value.get("cidr", "")) if "cidr" in value else ""
        return text
    for mark in ("#", ";"):
        text = text.partition(mark)[0]
    return text.split(maxsplit=1)[0] if text.strip() else ""


def read_list(lines: Iterable[str], action: Action = Action.DROP) -> ListFile:
    """Read a list file's lines (plain addresses, CIDR networks, ``#``/``;`` comments, blank
    lines; FireHOL netset, Spamhaus DROP text and JSON layouts).

    An entry wider than the default bounds for ``action``, or a drop covering loopback, is
    an error of its line: left out, it covers (and so removes) nothing.

    Raises:
        ValueError: the list has more than :data:`MAX_LIST_ENTRIES` entries.
    """
    by_family: dict[int, list[bytes]] = {4: [], 6: []}
    errors: list[tuple[int, str]] = []
    number = entries = 0
    widest = {v: default_min_prefix(action, v) for v in (4, 6)}
    drop, lead = action is Action.DROP, _LOOPBACK_LEAD
    for number, line in enumerate(lines, 1):
        token = _token(line)
        if not token:
            continue
        try:
            family, rec = _record(token)
        except ValueError as exc:
            errors.append((number, str(exc)))
            continue
        # a cheap test first: a million entries pass here
        if rec[-1] < widest[family] or rec[-1] < 8 or (drop and rec[0] in lead[family]):
            refused = _refused_everywhere(family, rec, action)
            if refused is not None:
                errors.append((number, refused))
                continue
        by_family[family].append(rec)
        entries += 1
        if entries > MAX_LIST_ENTRIES:
            raise ValueError(f"more than {MAX_LIST_ENTRIES:,} entries; split the list")
    covers: dict[bytes, int] = {}
    content = ListContent.pack(by_family[4], by_family[6], covers)
    return ListFile(content, number, entries, tuple(errors), covers)


LOCAL_SPACE: tuple[tuple[Network, str], ...] = tuple(
    (parse_network(net), what)
    for net, what in (
        ("10.0.0.0/8", "RFC 1918"),
        ("172.16.0.0/12", "RFC 1918"),
        ("192.168.0.0/16", "RFC 1918"),
        ("100.64.0.0/10", "CGNAT"),
        ("169.254.0.0/16", "link-local"),
        ("fc00::/7", "unique local"),
        ("fe80::/10", "link-local"),
    )
)
"""Address space a host's own peers often use (a VPC, a cluster, a carrier's NAT): a drop
list that covers it cuts those off unless the hosts' ``protect`` setting covers them."""


def local_space(content: ListContent, protect: Iterable[Network] = ()) -> tuple[list[str], int]:
    """The :data:`LOCAL_SPACE` ranges the content's entries reach outside ``protect``, and
    how many entries do (each counted once)."""
    protected = list(protect)
    reached: list[str] = []
    entries: set[bytes] = set()
    for space, what in LOCAL_SPACE:
        low, high = int(space.network_address), int(space.broadcast_address)
        found = []
        for rec in content.overlapping(space.version, low, high):
            start, end = _span(rec)
            part = (max(start, low), min(end, high))  # the part of the entry in this range
            if not any(
                net.version == space.version
                and int(net.network_address) <= part[0]
                and part[1] <= int(net.broadcast_address)
                for net in protected
            ):
                found.append(rec)
        if found:
            reached.append(f"{space} ({what})")
            entries.update(found)
    return reached, len(entries)


def refused_with(parsed: ListFile, protect: Iterable[Network]) -> list[tuple[str, Network, int]]:
    """The entries of a drop list that hosts protecting ``protect`` refuse: (entry, the
    protected network it overlaps, how many other entries of the file it covers, which
    those hosts then do not hold either)."""
    found: dict[bytes, tuple[Network, int]] = {}
    for net in protect:
        low, high = int(net.network_address), int(net.broadcast_address)
        for rec in parsed.content.overlapping(net.version, low, high):
            found.setdefault(rec, (net, parsed.covers.get(rec, 0)))
    return [(record_text(rec), net, n) for rec, (net, n) in sorted(found.items())]


class ListCommand(BaseModel):
    """A validated list command: ``list.load`` (a version of a list) or ``list.delete``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    op: ListOp
    name: str
    version: str = ""
    action: Action = Action.DROP
    ttl_s: Annotated[int, Field(ge=1, le=MAX_TTL_S)] | None = None
    target: tuple[str, ...] = ()
    reason: Annotated[str, Field(max_length=MAX_REASON_LEN)] = ""
    request_id: Annotated[str, Field(max_length=MAX_REQUEST_ID_LEN)] = ""
    size: Annotated[int, Field(ge=0, le=MAX_LIST_ENTRIES)] = 0
    reply: bool = False
    origin: str = ""

    @field_validator("op", mode="before")
    @classmethod
    def _op(cls, value: object) -> object:
        return value.strip().lower().replace("_", ".") if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not LIST_NAME.fullmatch(value):
            raise ValueError(
                f"{value[:40]!r} is not a list name (a lower-case letter, then up to 15 "
                "letters, digits or _)"
            )
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if value and not _VERSION.fullmatch(value):
            raise ValueError("is not a list version (32 hex digits)")
        return value

    # The fields a single command has too are checked by the same validators.
    _ttl = field_validator("ttl_s", mode="before")(lambda v: Command._ttl(v))
    _target = field_validator("target", mode="before")(lambda v: Command._target(v))
    _reason = field_validator("reason")(lambda v: Command._reason(v))
    _request_id = field_validator("request_id")(lambda v: Command._request_id(v))
    _reply = field_validator("reply", mode="before")(lambda v: Command._reply(v))
    _origin = field_validator("origin")(lambda v: Command._origin(v))

    @property
    def wants_result(self) -> bool:
        return self.reply or bool(self.request_id)

    @property
    def is_insert(self) -> bool:
        return OPS[self.op].insert

    def targets(self, host: str, labels: frozenset[str]) -> bool:
        return targets(self.target, host, labels)

    def to_fields(self) -> dict[str, str]:
        fields = {"op": self.op.value, "name": self.name}
        if self.op is ListOp.LOAD:
            fields.update(version=self.version, action=self.action.value, size=str(self.size))
        return fields | option_fields(
            self.ttl_s, self.target, self.reason, self.request_id, self.origin, self.reply
        )


_LIST_WIRE = {
    "op": "op",
    "name": "name",
    "version": "version",
    "action": "action",
    "ttl": "ttl_s",
    "target": "target",
    "reason": "reason",
    "request_id": "request_id",
    "size": "size",
    "reply": "reply",
    "origin": "origin",
}


def parse_list_command(fields: Mapping[bytes, bytes] | Mapping[str, str]) -> ListCommand:
    """Parse a ``list.*`` stream entry.

    Raises:
        CommandRejected: not a valid list command; the message names the field and why.
    """
    values = decode_fields(fields, _LIST_WIRE)
    for required in ("op", "name"):
        if required not in values:
            raise CommandRejected(f"{required}: is missing")
    try:
        cmd = ListCommand.model_validate(values)
    except ValidationError as exc:
        raise CommandRejected(explain(exc, _LIST_WIRE)) from None
    if cmd.op is ListOp.LOAD and not cmd.version:
        raise CommandRejected("version: is missing (list.load names the content it loads)")
    if cmd.ttl_s is not None and not OPS[cmd.op].takes_ttl:
        raise CommandRejected(f"ttl: {cmd.op.value} takes no ttl")
    return cmd
