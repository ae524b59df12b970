"""Thin typed wrappers over the Redis stream commands the applier uses.

The client runs with ``decode_responses=False``: a producer may write bytes that are not
UTF-8, and that must become one ``rejected`` entry, not a decode error that stalls the read.
Entry ids are decoded to ``str`` here, once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import redis
from redis.typing import EncodableT, FieldT

from pushfw.producer.connection import redis_ms, text
from pushfw.producer.contract import CommandRejected
from pushfw.producer.entry_ids import entry_ms, entry_order
from pushfw.producer.keys import Keys
from pushfw.producer.wire import ParsedCommand, read_command


class GroupGone(redis.ResponseError):
    """``NOGROUP``: the command stream is gone with this host's group (Redis lost its data),
    so the worker's loop sets up again as it does when its group vanished."""


class Entry(NamedTuple):
    """One stream entry; ``fields`` is ``None`` when the entry was trimmed while pending.

    A named tuple: a worker makes one per entry it reads, twice (ledger and applier).
    """

    id: str
    fields: dict[bytes, bytes] | None

    @property
    def ms(self) -> int:
        """The entry's time in Redis's clock when it was added."""
        return entry_ms(self.id)

    @property
    def order(self) -> tuple[int, int]:
        return entry_order(self.id)


LUA_ID_ORDER = """
local function parse(id)
  local ms, seq = string.match(id, "^(%d+)-(%d+)$")
  return tonumber(ms), tonumber(seq)
end
local function newer(a, b)
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  return ams > bms or (ams == bms and aseq > bseq)
end
"""
"""Lua helpers for scripts that compare entry ids: ``parse(id)`` and ``newer(a, b)``."""


def entries_from_reply(raw: Sequence[Any]) -> list[Entry]:
    return [
        Entry(
            text(entry_id),
            fields if fields is None or isinstance(fields, dict) else dict(fields),
        )
        for entry_id, fields in raw
    ]


class HostStream(Protocol):
    """How a host reads its commands and says it is done with them: a consumer group on the
    primary (:class:`CommandStream`) or a follower's position (:mod:`pushfw.worker.follower`)."""

    keys: Keys
    group: str
    position: str

    def ensure_group(self, start_id: str = "0") -> bool: ...
    def group_exists(self) -> bool: ...
    def read(self, start: str, count: int, block_ms: int | None) -> list[Entry]: ...
    def autoclaim(self, min_idle_ms: int, start: str, count: int) -> tuple[str, list[Entry]]: ...
    def deliveries(self, ids: Sequence[str]) -> dict[str, int]: ...
    def finish(
        self,
        ack_ids: Sequence[str],
        results: Sequence[Mapping[FieldT, EncodableT]],
        dead: Sequence[Mapping[FieldT, EncodableT]],
        results_maxlen: int,
        dead_maxlen: int,
    ) -> None: ...
    def head(self) -> str: ...
    def last_delivered(self) -> str: ...
    def progress(self) -> tuple[int | None, int]: ...
    def now_ms(self) -> int: ...


class CommandStream:
    """The command stream as one host's consumer group sees it."""

    position = ""
    """A group host has no position of its own: its group on the primary says where it is."""

    def __init__(self, client: redis.Redis, keys: Keys, group: str, consumer: str) -> None:
        self.client = client
        self.keys = keys
        self.group = group
        self.consumer = consumer

    def ensure_group(self, start_id: str = "0") -> bool:
        """Create the group at ``start_id`` (MKSTREAM); False if it existed.

        https://redis.io/commands/xgroup-create/
        """
        try:
            self.client.xgroup_create(self.keys.cmd, self.group, id=start_id, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise
        return True

    def read(self, start: str, count: int, block_ms: int | None) -> list[Entry]:
        """XREADGROUP from ``start``: ``>`` for new entries, an id for this consumer's pending.

        https://redis.io/commands/xreadgroup/
        """
        try:
            reply: Any = self.client.xreadgroup(
                self.group, self.consumer, {self.keys.cmd: start}, count=count, block=block_ms
            )
        except redis.ResponseError as exc:  # a blocked read the stream's deletion ended, too
            self._raise_if_gone(exc)
            raise
        if not reply:
            return []
        return entries_from_reply(reply[0][1])

    def autoclaim(self, min_idle_ms: int, start: str, count: int) -> tuple[str, list[Entry]]:
        """Take entries other consumers of the group left pending too long.

        https://redis.io/commands/xautoclaim/
        """
        reply = self.client.xautoclaim(
            self.keys.cmd, self.group, self.consumer, min_idle_ms, start, count=count
        )
        next_start = text(reply[0])
        claimed = [e for e in reply[1] if e is not None]
        return next_start, entries_from_reply(claimed)

    def deliveries(self, ids: Sequence[str]) -> dict[str, int]:
        """How many times each pending entry has been delivered (XPENDING extended form).

        https://redis.io/commands/xpending/
        """
        pipe = self.client.pipeline(transaction=False)
        for eid in ids:
            pipe.xpending_range(self.keys.cmd, self.group, min=eid, max=eid, count=1)
        counts: dict[str, int] = {}
        for eid, rows in zip(ids, pipe.execute(), strict=True):
            counts[eid] = int(rows[0]["times_delivered"]) if rows else 0
        return counts

    def finish(
        self,
        ack_ids: Sequence[str],
        results: Sequence[Mapping[FieldT, EncodableT]],
        dead: Sequence[Mapping[FieldT, EncodableT]],
        results_maxlen: int,
        dead_maxlen: int,
    ) -> None:
        """Write results and dead letters, then XACK, in one MULTI/EXEC.

        https://redis.io/commands/xack/
        """
        pipe = self.client.pipeline(transaction=True)
        queue_answers(pipe, self.keys, results, dead, results_maxlen, dead_maxlen)
        if ack_ids:
            pipe.xack(self.keys.cmd, self.group, *ack_ids)
        pipe.execute()

    def group_exists(self) -> bool:
        try:
            rows: Any = self.client.xinfo_groups(self.keys.cmd)
        except redis.ResponseError:
            return False
        return any(text(r["name"]) == self.group for r in rows)

    def head(self) -> str:
        """The id of the newest entry in the stream ("0-0" if it is empty)."""
        rows: Any = self.client.xrevrange(self.keys.cmd, count=1)
        if not rows:
            return "0-0"
        first = rows[0][0]
        return text(first)

    def last_delivered(self) -> str:
        """The group's last-delivered id: this host has read everything up to it.

        https://redis.io/commands/xinfo-groups/
        """
        try:
            rows: Any = self.client.xinfo_groups(self.keys.cmd)
        except redis.ResponseError as exc:
            self._raise_if_gone(exc)
            raise
        for row in rows:
            name = text(row["name"])
            if name == self.group:
                last = row["last-delivered-id"]
                return text(last)
        return "0-0"

    def _raise_if_gone(self, exc: redis.ResponseError) -> None:
        """:class:`GroupGone` if the stream no longer exists (told by asking Redis, not by
        the error's text)."""
        if not self.client.exists(self.keys.cmd):
            raise GroupGone(f"NOGROUP {self.keys.cmd} is gone (Redis lost its data?)") from exc

    def progress(self) -> tuple[int | None, int]:
        """The group's lag (None if Redis cannot tell) and pending entries, for the heartbeat.

        https://redis.io/commands/xinfo-groups/
        """
        try:
            rows: Any = self.client.xinfo_groups(self.keys.cmd)
        except redis.ResponseError:  # no stream yet
            return None, 0
        for row in rows:
            name = text(row["name"])
            if name == self.group:
                lag = row.get("lag")
                return (int(lag) if lag is not None else None), int(row["pending"])
        return None, 0

    def now_ms(self) -> int:
        """Redis's clock: expiry is measured against the clock that stamped the entry ids."""
        return redis_ms(self.client)


def queue_answers(
    pipe: Any,
    keys: Keys,
    results: Sequence[Mapping[FieldT, EncodableT]],
    dead: Sequence[Mapping[FieldT, EncodableT]],
    results_maxlen: int,
    dead_maxlen: int,
) -> None:
    """Queue a batch's result entries and dead letters on a pipeline (XADD, trimmed)."""
    for fields in results:
        pipe.xadd(keys.results, dict(fields), maxlen=results_maxlen, approximate=True)
    for fields in dead:
        pipe.xadd(keys.dead, dict(fields), maxlen=dead_maxlen, approximate=True)


class ParsedEntries:
    """Each entry parsed once per worker: the ledger and the applier read the same entries.

    Entry ids are unique in a stream and an entry's fields never change, so a parse (or its
    rejection) can be remembered by id; the most recent ``size`` are kept.
    """

    def __init__(self, size: int = 8192) -> None:
        self.size = size
        self._parsed: OrderedDict[str, ParsedCommand | CommandRejected] = OrderedDict()

    def parse(self, entry: Entry) -> ParsedCommand:
        """The entry's command. Raises CommandRejected as :func:`read_command` does."""
        assert entry.fields is not None
        found = self._parsed.get(entry.id)
        if found is None:
            try:
                found = read_command(entry.fields)
            except CommandRejected as exc:
                found = exc
            if len(self._parsed) >= self.size:
                self._parsed.popitem(last=False)
            self._parsed[entry.id] = found
        if isinstance(found, CommandRejected):
            raise found
        return found
