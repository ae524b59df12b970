"""Follower mode: a host of a large fleet reads the command stream off the primary.

With ``read_url`` set, a host has no consumer group. It reads the stream with ``XREAD``
from a replica, after the position it last carried out, and writes to the primary only
what must be written there: its heartbeat, results, dead letters and its share of the
ledger's fold. The primary's work per command then no longer grows with the fleet
(``XREADGROUP`` and ``XACK`` are writes: a group cannot be read on a replica).

The position plays the part of the group's pending list:

- It advances only over entries the applier finished (answered after their kernel commit).
  It is saved in ``<state_dir>/<host>.position`` before the heartbeat reports it, so a
  worker killed at any point reads again from the saved position; applying an entry twice
  has the effect of once (I2).
- Entries read but not finished (a refused command waiting for its retry) stay in memory
  with their delivery counts, which the file keeps too, and hold the position back.
- The newest entry read is saved as well: after a restart the entries up to it count as
  delivered again, and the applier's boundary for late retries is where it was.
- The heartbeat carries the position, and trimming keeps every entry after it. A position
  the stream was trimmed past (the host was silent longer than ``host_expiry_s``), or that
  the stream no longer reaches (Redis lost its data), is dropped: the host starts at the
  stream's head from the ledger, as a new host does.
- Only entries the primary generated are carried out (ACLs are not replicated: a replica
  may let others write). A batch read on the replica that reaches past the primary's newest
  id or its count of entries ever added (its ``XINFO STREAM``, asked only then) is dropped,
  and the host reads on the primary as it does while the replica is down, until a probe
  finds the replica holding nothing the primary lacks.

The file is not fsynced: it matters only while the kernel's rules do, and they do not
survive the power loss that could lose an unsynced write; after a reboot the host
reconciles from the ledger.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import redis
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from redis.typing import EncodableT, FieldT, KeyT, StreamIdT

from pushfw.producer.connection import redis_ms, text
from pushfw.producer.entry_ids import entry_order, is_entry_id
from pushfw.producer.keys import Keys
from pushfw.producer.render import plural
from pushfw.worker.statefile import read_state, write_state
from pushfw.worker.stream import (
    Entry,
    entries_from_reply,
    queue_answers,
)

__all__ = ["FollowerStream", "PositionFile", "SavedPosition", "StreamGone"]

logger = logging.getLogger(__name__)

_REPLICA_WAIT_S = 2.0
"""How long a replica may take to show the primary's ledger marker at start (a new ledger's
marker reaches it with the replication lag) before the host reads on the primary."""
_PROBE_EVERY_S = 5.0
"""While reads go to the primary, how often the replica is asked whether it is back."""
_STALE_AFTER_S = 10.0
"""A replica behind the primary that has not moved for this long is read no more."""
_REPLICA_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.NoPermissionError)
"""A replica that does not answer (a loading one raises BusyLoadingError, one of these), or
refuses this user (its ACL is not the primary's)."""


class StreamGone(redis.ResponseError):
    """The stream no longer reaches this follower's position: set up again from the ledger.

    A ``NOGROUP`` error, as a group host gets when its group vanished, so the worker's loop
    treats both the same way.
    """


def _other_marker(found: Any, want: Any) -> str:
    """Why a replica is not read: it does not replicate the primary, or not yet."""
    shown = "none" if found is None else text(found)
    return f"it holds ledger generation {shown}, the primary {text(want or b'none')}"


def _why(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _entries_added(info: Mapping[str, Any] | None) -> int:
    """XINFO STREAM's count of entries ever added (0 for no stream)."""
    return int((info or {}).get("entries-added", 0))


def _newest(info: Mapping[str, Any] | None) -> str:
    """XINFO STREAM's last generated id ("0-0" for no stream)."""
    return text((info or {}).get("last-generated-id", "0-0"))


def _ahead(newest: str, added: int, primary: Mapping[str, Any] | None) -> str | None:
    """Why a replica whose stream reaches ``newest``, its ``added``-th entry, holds entries
    the primary never generated (written on the replica: its ACL is not the primary's);
    None when it may not. ``primary``: the primary's XINFO STREAM, asked after the replica,
    so that it holds whatever the replica got from it."""
    theirs, their_added = _newest(primary), _entries_added(primary)
    never = "it holds entries the primary never generated"
    if entry_order(newest) > entry_order(theirs):
        return f"{never} (up to {newest}; the primary's newest is {theirs})"
    if added > their_added:
        return f"{never} ({added} ever added; the primary's {their_added})"
    return None


def _entries(reply: Any) -> list[Entry]:
    """The entries of an XREAD reply on one stream."""
    return entries_from_reply(reply[0][1]) if reply else []


def _before(entry_id: str) -> str:
    """The id just before ``entry_id``: reading after it starts at ``entry_id``."""
    ms, seq = entry_order(entry_id)
    if seq:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-18446744073709551615" if ms else "0-0"


def _entry_id(value: str) -> str:
    if not is_entry_id(value):
        raise ValueError("is not a stream entry id")
    return value


_EntryId = Annotated[str, AfterValidator(_entry_id)]


class SavedPosition(BaseModel):
    """The position file's content, checked field by field: a file that holds anything
    else counts as no position (read from the ledger), never as a reason to stop."""

    model_config = ConfigDict(strict=True, frozen=True)

    position: _EntryId
    read: _EntryId | None = None
    """The newest entry read (None: the position)."""
    added: int = Field(default=0, ge=0)
    """The stream's ``entries-added`` count at the position."""
    tries: dict[_EntryId, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    """Deliveries of the entries read and not finished."""


class PositionFile:
    """``<state_dir>/<host>.position``: JSON with the position, the newest entry read, the
    stream's ``entries-added`` count at that entry, and the tries of unfinished entries.

    Held in memory, with one warning, when the directory is not writable.
    """

    def __init__(self, state_dir: str, host: str) -> None:
        self.path = Path(state_dir) / f"{host}.position"
        self._memory: SavedPosition | None = None
        self._warned = False

    def read(self) -> SavedPosition | None:
        """The saved position; None for none, and for a file that is not one (warned)."""
        if self._memory is not None:
            return self._memory
        return read_state(self.path, SavedPosition.model_validate_json, "follower position")

    def write(self, state: SavedPosition) -> None:
        self._memory = state
        try:
            write_state(self.path, state.model_dump_json().encode())
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "cannot keep the follower position in %s (%s): remembered until the "
                    "worker stops; a restart then starts from the ledger",
                    self.path,
                    exc,
                )
            return
        self._memory = None

    def remove(self) -> None:
        self._memory = None
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("cannot remove the follower position %s: %s", self.path, exc)


class FollowerStream:
    """One follower's view of the command stream: read on a replica, finished on the primary.

    Args:
        client: the primary (results, dead letters, the stream's head, Redis's clock).
        replica: where the entries are read (``read_url``).
        keys: key names.
        host: this host's name (the position file's name).
        state_dir: where the position file lives.
        probe: the replica on a client with a short timeout, to ask whether it is back
            while reads go to the primary (the ``replica`` client if not given).
        name: the replica as logs name it (its URL, password masked).
    """

    def __init__(
        self,
        client: redis.Redis,
        replica: redis.Redis,
        keys: Keys,
        host: str,
        state_dir: str,
        probe: redis.Redis | None = None,
        name: str = "the replica",
    ) -> None:
        self.client = client
        self.replica = replica
        self.probe = probe or replica
        self.name = name
        self.replica_down: str | None = None
        """Why reads go to the primary now; None while they go to the replica."""
        self.replica_down_ms = 0
        self._probe_at = self._watch_at = 0.0
        self._stuck: tuple[int, float] | None = None
        """The replica's ``entries-added`` when it was first seen behind the primary, and when."""
        self.keys = keys
        self.group = f"follower:{host}"
        self.file = PositionFile(state_dir, host)
        self._unfinished: dict[str, tuple[Entry, int]] = {}
        """Entries read and not finished, in stream order, each with its ordinal: the
        stream's ``entries-added`` count when it was added."""
        self._tries: Counter[str] = Counter()
        self._head = ("0-0", 0)
        self._primary: tuple[tuple[int, int], int] = ((0, 0), 0)
        """The primary's newest id and ``entries-added`` as last asked: what the replica
        may hand this host without asking the primary again."""
        self._load()

    def _load(self) -> None:
        state = self.file.read()
        self._unfinished.clear()
        self._tries.clear()
        if state is None:
            self.position = ""
            self._read_mark = self._last_read = "0-0"
            self._position_added = self._read_added = 0
            return
        self.position = self._last_read = state.position
        self._read_mark = state.read or self.position
        self._position_added = self._read_added = state.added
        self._tries.update(state.tries)

    def _save(self) -> None:
        self.file.write(
            SavedPosition(
                position=self.position,
                read=self._read_mark,
                added=self._position_added,
                tries={i: self._tries[i] for i in self._unfinished if self._tries[i]},
            )
        )

    def ensure_group(self, start_id: str = "0") -> bool:
        """Start at ``start_id`` when this host holds no position; False if it held one."""
        if self.position:
            return False
        head_id, added = self._head
        self.position = self._read_mark = self._last_read = start_id
        self._position_added = self._read_added = added if start_id == head_id else 0
        self._save()
        return True

    def check_replica(self) -> None:
        """Read on the replica only once it replicates the primary: its ledger generation
        marker is the primary's, and it holds nothing the primary lacks. An unrelated Redis,
        or one not yet synced, would leave this host following a stream that no command
        reaches, and one written to behind the primary's back would command it; until the
        probe finds it sound, the host reads on the primary and its heartbeat says why."""
        deadline = time.monotonic() + _REPLICA_WAIT_S
        while True:
            try:
                why = self._replica_fault()
            except _REPLICA_ERRORS as exc:
                self.probe.connection_pool.disconnect()
                self._read_on_primary(_why(exc))  # asked again later, by the probe
                return
            if why is None:
                self._replica_back()
                return
            if time.monotonic() >= deadline:
                self._read_on_primary(why)
                return
            time.sleep(0.05)

    def _replica_fault(self) -> str | None:
        """Why reads may not go to the replica now (None: they may): another ledger's
        marker, entries this host read on the primary that it lacks, or entries the primary
        never generated. The replica is asked first: what it holds then, the primary holds
        by the time it is asked.

        Raises the replica's errors (``_REPLICA_ERRORS``).
        """
        found = self.probe.get(self.keys.generation)
        theirs = self._info(self.probe)
        want = self.client.get(self.keys.generation)
        ours = self._note_primary(self._info(self.client))
        if found != want:
            return _other_marker(found, want)
        added = _entries_added(theirs)
        if added < self._read_added:
            lacks = plural(self._read_added - added, "entry", "entries")
            return f"it lacks {lacks} read on the primary"
        return _ahead(_newest(theirs), added, ours)

    def _note_primary(self, info: dict[str, Any] | None) -> dict[str, Any] | None:
        self._primary = (entry_order(_newest(info)), _entries_added(info))
        return info

    def group_exists(self) -> bool:
        """Whether the saved position still reaches the stream; drops it if not.

        The stream was trimmed past it when it lost more entries than were added up to the
        position (``entries-added`` less ``length``), and Redis lost its data when the
        stream's newest id is older than the newest entry this host read.
        """
        if not self.position:
            return False
        info = self._info(self.client)
        reason = self._lost(info)
        if reason is None:
            return True
        logger.warning(
            "follower position %s is lost (%s): starting at the stream's head from the ledger",
            self.position,
            reason,
        )
        self.forget()
        return False

    def forget(self) -> None:
        self.file.remove()
        self._load()

    def _lost(self, info: Mapping[str, Any] | None) -> str | None:
        if info is None:
            return "the stream is gone"
        added = int(info.get("entries-added", self._position_added))
        if added < self._position_added:
            return f"the stream holds {added} entries ever added, fewer than read: a new stream"
        removed = added - int(info.get("length", 0))
        if removed > self._position_added:
            return f"{removed - self._position_added} entries after it were trimmed"
        newest = entry_order(text(info.get("last-generated-id", "0-0")))
        if newest < entry_order(self._read_mark):
            return f"the stream ends at {text(info.get('last-generated-id'))}: a new stream"
        return None

    def _info(self, client: redis.Redis) -> dict[str, Any] | None:
        """XINFO STREAM, or None when there is no stream. https://redis.io/commands/xinfo-stream/"""
        try:
            raw: Any = client.xinfo_stream(self.keys.cmd)
        except redis.exceptions.NoPermissionError:
            raise
        except redis.ResponseError:
            return None
        return {text(k): v for k, v in dict(raw).items()}

    def read(self, start: str, count: int, block_ms: int | None) -> list[Entry]:
        """``>``: the replica's next entries; an id: this host's unfinished entries after it,
        as ``XREADGROUP`` with an id returns a consumer's pending ones."""
        if start != ">":
            after = entry_order(start)
            again = [e for e, _ in self._unfinished.values() if e.order > after][:count]
            self._tries.update(e.id for e in again)
            return again
        streams: dict[KeyT, StreamIdT] = {self.keys.cmd: self._last_read}
        entries = self._xread(streams, count, block_ms)
        if not entries:
            return []
        mark = entry_order(self._read_mark)
        for entry in entries:
            self._read_added += 1
            self._unfinished[entry.id] = (entry, self._read_added)
            if entry.order <= mark and entry.id not in self._tries:
                self._tries[entry.id] = 1  # read once before a restart
            self._tries[entry.id] += 1
        self._last_read = entries[-1].id
        if entries[-1].order > mark:
            self._read_mark = self._last_read
        self._save()
        return entries

    def _xread(
        self, streams: dict[KeyT, StreamIdT], count: int, block_ms: int | None
    ) -> list[Entry]:
        """On the replica; on the primary while the replica cannot be read, and from the
        first batch the replica hands over that holds an entry the primary never generated
        (none of that batch is carried out)."""
        if self.replica_down is None or self._replica_is_back():
            try:
                entries = _entries(self.replica.xread(streams, count=count, block=block_ms))
            except _REPLICA_ERRORS as exc:
                self._read_on_primary(_why(exc))
            else:
                why = self._not_generated(entries)
                if why is None:
                    return entries
                self._read_on_primary(why)
        return _entries(self.client.xread(streams, count=count, block=block_ms))

    def _not_generated(self, entries: Sequence[Entry]) -> str | None:
        """Why the primary never generated some of these entries read on the replica (None:
        it did). The primary is asked only when they reach past what it was last seen
        holding: its newest id and its count of entries ever added."""
        if not entries:
            return None
        added = self._read_added + len(entries)
        if entries[-1].order <= self._primary[0] and added <= self._primary[1]:
            return None
        return _ahead(entries[-1].id, added, self._note_primary(self._info(self.client)))

    def _read_on_primary(self, why: str) -> None:
        if self.replica_down is None:
            logger.warning(
                "replica %s cannot be read (%s): reading the command stream on the primary "
                "until it can",
                self.name,
                why,
            )
            self.replica_down_ms = redis_ms(self.client)
        self.replica_down = why
        self._probe_at = time.monotonic() + _PROBE_EVERY_S
        self._stuck = None
        self.replica.connection_pool.disconnect()

    def _replica_is_back(self) -> bool:
        """Whether the replica may be read again (:meth:`_replica_fault`); asked at most
        every ``_PROBE_EVERY_S``."""
        if time.monotonic() < self._probe_at:
            return False
        self._probe_at = time.monotonic() + _PROBE_EVERY_S
        try:
            why = self._replica_fault()
        except _REPLICA_ERRORS as exc:
            why = _why(exc)
            self.probe.connection_pool.disconnect()
        if why is not None:
            self.replica_down = why
            return False
        self._replica_back()
        return True

    def _replica_back(self) -> None:
        if self.replica_down is not None:
            logger.info("replica %s is back: reading the command stream there", self.name)
        self.replica_down = None

    def _watch_replica(self, primary: dict[str, Any]) -> None:
        """At heartbeats, at most every ``_PROBE_EVERY_S``: a replica that answers but no
        longer follows the primary (its link is down and it serves stale data) is read no
        more once it has stayed behind, without moving, for ``_STALE_AFTER_S``; nor one
        that holds more than the primary has generated (asked again after the replica: it
        may have got newer entries meanwhile)."""
        if self.replica_down is not None or time.monotonic() < self._watch_at:
            return
        self._watch_at = time.monotonic() + _PROBE_EVERY_S  # heartbeats come faster when busy
        try:
            theirs = self._info(self.probe)
        except _REPLICA_ERRORS as exc:
            self.probe.connection_pool.disconnect()
            self._read_on_primary(_why(exc))
            return
        added, primary_added = _entries_added(theirs), _entries_added(primary)
        why = _ahead(_newest(theirs), added, primary)
        if why is not None:  # or the replica got newer entries after the primary was asked
            why = _ahead(_newest(theirs), added, self._note_primary(self._info(self.client)))
        if why is not None:
            self._read_on_primary(why)
            return
        now = time.monotonic()
        if added >= primary_added:
            self._stuck = None
        elif self._stuck is None or self._stuck[0] != added:
            self._stuck = (added, now)
        elif now - self._stuck[1] >= _STALE_AFTER_S:
            self._read_on_primary(
                f"it is {plural(primary_added - added, 'entry', 'entries')} behind the "
                f"primary and has not moved for {now - self._stuck[1]:.0f} s"
            )

    def autoclaim(self, min_idle_ms: int, start: str, count: int) -> tuple[str, list[Entry]]:
        """No other consumer shares a follower's position: nothing to claim."""
        return "0-0", []

    def deliveries(self, ids: Sequence[str]) -> dict[str, int]:
        return {i: self._tries[i] for i in ids}

    def finish(
        self,
        ack_ids: Sequence[str],
        results: Sequence[Mapping[FieldT, EncodableT]],
        dead: Sequence[Mapping[FieldT, EncodableT]],
        results_maxlen: int,
        dead_maxlen: int,
    ) -> None:
        """Write results and dead letters on the primary, then advance and save the position."""
        if results or dead:
            pipe = self.client.pipeline(transaction=True)
            queue_answers(pipe, self.keys, results, dead, results_maxlen, dead_maxlen)
            pipe.execute()
        for entry_id in ack_ids:
            self._unfinished.pop(entry_id, None)
            self._tries.pop(entry_id, None)
        position, added = self._last_read, self._read_added
        if self._unfinished:  # kept in the order they were read: the stream's
            oldest, ordinal = next(iter(self._unfinished.values()))
            position, added = _before(oldest.id), ordinal - 1
        if ack_ids or position != self.position:
            self.position, self._position_added = position, added
            self._save()

    def head(self) -> str:
        """The primary's newest entry id: a new follower starts there, from the ledger."""
        info = self._note_primary(self._info(self.client))
        self._head = (_newest(info), _entries_added(info))
        return self._head[0]

    def last_delivered(self) -> str:
        """The newest entry this host has read, before a restart included."""
        return max(self._read_mark, self._last_read, key=entry_order)

    def progress(self) -> tuple[int | None, int]:
        """Entries on the primary not yet read (replication lag included), and those read
        but unfinished.

        Raises StreamGone when the stream no longer reaches the position.
        """
        info = self._info(self.client)
        reason = self._lost(info) if self.position else None
        if reason is not None:
            logger.warning("follower position %s is lost (%s): setting up", self.position, reason)
            self.forget()
            raise StreamGone(f"NOGROUP follower position lost: {reason}")
        self._note_primary(info)
        if info is None:
            return None, len(self._unfinished)
        self._watch_replica(info)
        lag = _entries_added(info) - self._read_added
        return max(0, lag), len(self._unfinished)

    def now_ms(self) -> int:
        return redis_ms(self.client)
