"""The Ledger role: every worker folds the command stream, once, into the shared ledger.

Every worker reads the shared ``ledger`` consumer group, so any one of them may fold an
entry (:mod:`pushfw.worker.fold` paces it); one that crashed leaves its entries pending
and another's :meth:`Ledger.recover` folds them. The ledger records only commands that pass
validation, whoever folds them: the fold does not apply the folding worker's signature
policy or protected networks (each host has its own), and every host checks a record
against its own policy (:mod:`pushfw.worker.decide`) before reconcile installs it.

Where the rest lives: the record one command sets, :mod:`pushfw.worker.record`; the Lua
that writes the ledger (compare-and-set, tombstones, the scheduler's claim),
:mod:`pushfw.worker.ledger_lua`; the held verified state, :mod:`pushfw.worker.held`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from redis.typing import StreamIdT

from pushfw.producer.connection import text
from pushfw.producer.contract import CommandRejected
from pushfw.producer.entry_ids import entry_order
from pushfw.producer.keys import Keys
from pushfw.producer.lists import is_list_entry, parse_list_command
from pushfw.producer.records import RuleRecord
from pushfw.worker.clock import Clock
from pushfw.worker.decide import refused_by_every_host
from pushfw.worker.held import held_records, verifies
from pushfw.worker.ledger_lua import FOLD, FORGET, LIST_CONTENT_GRACE_MS, LIST_FOLD
from pushfw.worker.record import Folded, folded, list_record_for
from pushfw.worker.signing import Signing
from pushfw.worker.stream import (
    Entry,
    ParsedEntries,
    entries_from_reply,
)

logger = logging.getLogger(__name__)

_FOLD_CHUNK = 500


class Ledger:
    """Folds the command stream into ``{pushfw}:rules`` and ``{pushfw}:expiry``.

    ``signing``: the folding worker's signature policy; with a key, the records of commands
    whose signature it verifies are ``checked`` (their state is then held:
    :mod:`pushfw.worker.held`).
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        consumer: str,
        batch_size: int = 500,
        clock: Clock | None = None,
        signing: Signing | None = None,
    ):
        self.client = client
        self.signing = signing
        self.keys = keys
        self.consumer = consumer
        self.batch_size = batch_size
        self.clock = clock or Clock(client, keys)
        self.parsed = ParsedEntries()
        self._fold = client.register_script(FOLD)
        self._fold_list = client.register_script(LIST_FOLD)
        self._forget = client.register_script(FORGET)

    def ensure_group(self) -> None:
        """Create the ledger group, and the generation marker with it if the ledger is new.

        A ledger that has records but no marker predates markers: it gets one too.
        """
        try:
            self.client.xgroup_create(self.keys.cmd, Keys.LEDGER_GROUP, id="0", mkstream=True)
            created = True
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            created = False
        if created or self.size() > 0:
            token = secrets.token_hex(8)
            if self.client.set(self.keys.generation, token, nx=True):
                logger.info("ledger generation %s begins", token)

    def generation(self) -> str | None:
        """The marker written once when this ledger began (None: Redis lost it, or too old)."""
        raw: Any = self.client.get(self.keys.generation)
        return text(raw) if raw is not None else None

    def fold_own_pending(self) -> int:
        """Fold the entries this consumer read for the ledger but never folded."""
        folded = 0
        while True:
            reply: Any = self.client.xreadgroup(
                Keys.LEDGER_GROUP, self.consumer, {self.keys.cmd: "0"}, count=self.batch_size
            )
            entries = entries_from_reply(reply[0][1]) if reply else []
            if not entries:
                return folded
            self.fold(entries)
            folded += len(entries)

    def recover(self, idle_ms: int) -> int:
        """Fold what this consumer read but never folded (it crashed), then what other ledger
        consumers left pending longer than ``idle_ms`` (they died); returns entries folded.

        https://redis.io/commands/xautoclaim/
        """
        folded = self.fold_own_pending()
        start = "0-0"
        while True:
            claimed: Any = self.client.xautoclaim(
                self.keys.cmd, Keys.LEDGER_GROUP, self.consumer, idle_ms, start, self.batch_size
            )
            start = text(claimed[0])
            entries = entries_from_reply([e for e in claimed[1] if e is not None])
            self.fold(entries)
            folded += len(entries)
            if start == "0-0":
                break
        if folded:
            logger.info("ledger folded %d entries left pending by a crash", folded)
        return folded

    def fold_new(self, block_ms: int | None = None) -> int:
        """Read the ledger group's next entries (non-blocking by default) and fold them."""
        reply: Any = self.client.xreadgroup(
            Keys.LEDGER_GROUP,
            self.consumer,
            {self.keys.cmd: ">"},
            count=self.batch_size,
            block=block_ms,
        )
        entries = entries_from_reply(reply[0][1]) if reply else []
        self.fold(entries)
        return len(entries)

    def fold(self, entries: list[Entry]) -> int:
        """Fold entries (invalid ones are only acknowledged); returns how many changed state."""
        if not entries:
            return 0
        now_ms, seen = self.clock.read(entries)
        of_rules = self._fold_lists(entries, seen)
        records = [
            r for r in (self._record(e, seen[e.id], now_ms) for e in of_rules) if r is not None
        ]
        changed = 0
        for start in range(0, len(records), _FOLD_CHUNK):
            changed += self._fold_rules(records[start : start + _FOLD_CHUNK])
        self.client.xack(self.keys.cmd, Keys.LEDGER_GROUP, *(e.id for e in entries))
        logger.debug(
            "ledger folded %d of %d entries, %d changed state", len(records), len(entries), changed
        )
        return changed

    def _fold_lists(self, entries: list[Entry], seen: dict[str, int]) -> list[Entry]:
        """Fold the ``list.*`` entries one by one; returns the entries of rules."""
        lists = [e for e in entries if is_list_entry(e.fields)]
        if not lists:
            return entries
        for entry in lists:
            self._fold_list_entry(entry, seen[entry.id])
        return [e for e in entries if not is_list_entry(e.fields)]

    def _fold_rules(self, records: list[Folded]) -> int:
        """One round trip of :data:`~.ledger_lua.FOLD`; returns how many changed state."""
        args: list[str | bytes] = []
        for record in records:
            expires = record.expires_ms
            args += [
                record.rule_id,
                record.id,
                record.json,
                "" if expires is None else str(expires),
                "1" if record.checked else "",
            ]
        markers = [self.keys.ttl_marker(r.rule_id) for r in records]
        keys = [self.keys.rules, self.keys.expiry, self.keys.tombs, self.keys.held]
        return int(self._fold(keys=[*keys, *markers], args=args))

    def _fold_list_entry(self, entry: Entry, seen_ms: int) -> bool:
        """Fold one ``list.*`` command (an invalid one is only acknowledged)."""
        assert entry.fields is not None
        try:
            cmd = parse_list_command(entry.fields)
        except CommandRejected:
            return False
        record = list_record_for(entry, cmd, seen_ms, verifies(self.signing, entry, seen_ms))
        content = self.keys.list_content(cmd.name, cmd.version) if cmd.version else None
        return bool(
            self._fold_list(
                keys=[self.keys.lists, content or self.keys.lists, self.keys.held_lists],
                args=[
                    cmd.name,
                    entry.id,
                    record.model_dump_json(exclude_defaults=True),
                    cmd.version,
                    self.keys.list_content(cmd.name, ""),
                    LIST_CONTENT_GRACE_MS,
                    "" if record.expires_ms is None else str(record.expires_ms),
                    "1" if record.checked else "",
                ],
            )
        )

    def _record(self, entry: Entry, seen_ms: int, now_ms: int) -> Folded | None:
        """The state an entry sets; None for what every host refuses."""
        if entry.fields is None:
            return None
        try:
            cmd = self.parsed.parse(entry)
        except CommandRejected:
            return None
        if refused_by_every_host(cmd, entry.fields):
            return None
        return folded(entry, cmd, seen_ms, now_ms, verifies(self.signing, entry, seen_ms))

    def catch_up(self, position: str) -> None:
        """Make the ledger hold every entry up to ``position`` before a host reconciles.

        New entries up to there are folded here; entries up to there that another ledger
        consumer holds pending are folded again (the fold is idempotent), so the ledger is
        never behind what this host has applied.
        """
        order = entry_order(position)
        while self._last_delivered() < order and self.fold_new():
            pass
        rows = self.client.xpending_range(
            self.keys.cmd, Keys.LEDGER_GROUP, min="-", max=position, count=100_000
        )
        ids: list[StreamIdT] = [row["message_id"] for row in rows]
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            claimed: Any = self.client.xclaim(
                self.keys.cmd, Keys.LEDGER_GROUP, self.consumer, 0, chunk
            )
            self.fold(entries_from_reply([c for c in claimed if c is not None]))

    def _last_delivered(self) -> tuple[int, int]:
        for group in self.client.xinfo_groups(self.keys.cmd):
            name = group["name"]
            if text(name) == Keys.LEDGER_GROUP:
                last = group["last-delivered-id"]
                return entry_order(text(last))
        return (0, 0)

    def size(self) -> int:
        """How many records (tombstones included) the ledger holds."""
        return int(self.client.hlen(self.keys.rules))

    def records(self) -> Iterator[RuleRecord]:
        """Every record, tombstones included, read in HSCAN pages."""
        for _, raw in self.client.hscan_iter(self.keys.rules, count=1000):
            yield RuleRecord.model_validate_json(raw)

    def records_for(self, rule_ids: list[str]) -> dict[str, RuleRecord]:
        """The record (tombstones included) of each rule that has one."""
        values: Any = self.client.hmget(self.keys.rules, rule_ids) if rule_ids else []
        return {
            rid: RuleRecord.model_validate_json(raw)
            for rid, raw in zip(rule_ids, values, strict=True)
            if raw is not None
        }

    def held(self) -> dict[str, RuleRecord]:
        """The held records by rule id (:func:`~pushfw.worker.held.held_records`)."""
        return held_records(self.client, self.keys)

    def forget(
        self, stale: Sequence[tuple[Any, Any]], of_lists: bool = False, held: bool = False
    ) -> int:
        """Delete tombstones (field, raw value) that no fold replaced since they were read;
        ``of_lists``: in ``{pushfw}:lists`` (which the tombstone index does not cover);
        ``held``: held records (in ``{pushfw}:held``, or ``:held-lists`` with ``of_lists``)."""
        forgotten = 0
        where = [self.keys.lists if of_lists else self.keys.rules, self.keys.tombs]
        if held:
            where = [self.keys.held_lists if of_lists else self.keys.held]
        for start in range(0, len(stale), 1000):
            args = [part for pair in stale[start : start + 1000] for part in pair]
            forgotten += int(self._forget(keys=where, args=args))
        return forgotten
