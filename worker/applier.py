"""The Applier role: read a host's share of the command stream and make the kernel follow it.

Per batch: validate every entry, decide each command against the backend's index (so a rule
already present costs no kernel call), commit the batch once, write one result per command,
then XACK. A batch the kernel refuses is split and retried one command at a time so one bad
command cannot hold the others back; a command that keeps failing ends in the dead-letter
stream after ``max_deliveries``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import redis
from redis.typing import EncodableT, FieldT

from pushfw.producer.contract import Action, Command, CommandRejected, Status
from pushfw.worker.backends.base import Backend, Rule, RuleKey
from pushfw.worker.backoff import Backoff
from pushfw.worker.errors import BackendError, PermanentBackendError, TransientBackendError
from pushfw.worker.expiry import ExpiryQueue
from pushfw.worker.ledger import Ledger
from pushfw.worker.metrics import Metrics
from pushfw.worker.protect import Protection
from pushfw.worker.settings import WorkerSettings
from pushfw.worker.signing import Signing, confirm_expiry
from pushfw.worker.stream import CommandStream, Entry, ParsedEntries, stream_id_order

logger = logging.getLogger(__name__)

_QUICK_RETRIES = 3


class StopRequested(Exception):
    """Raised from the signal handler to cut an idle blocking read short."""


@dataclass
class Outcome:
    """What happened to one entry; ``status`` None means: leave it pending and retry later."""

    entry: Entry
    status: Status | None
    detail: str = ""
    request_id: str = ""
    command: Command | None = None
    change: Rule | None = None
    key: RuleKey | None = None
    skip: bool = False
    permanent: bool = False
    unverified: bool = False


class Applier:
    """One host's applier: consumer group ``host:<name>`` on the command stream."""

    def __init__(
        self,
        client: redis.Redis,
        backend: Backend,
        settings: WorkerSettings,
        protection: Protection,
        ledger: Ledger | None = None,
    ) -> None:
        from pushfw.producer.keys import Keys

        self.settings = settings
        self.backend = backend
        self.protection = protection
        self.ledger = ledger
        self.signing = Signing.from_settings(settings)
        self.parsed = ledger.parsed if ledger is not None else ParsedEntries()
        self.host = settings.host_name
        self.labels = settings.labels
        keys = Keys(settings.key_prefix)
        self.stream = CommandStream(
            client, keys, Keys.host_group(self.host), settings.consumer_name
        )
        self.stopping = False
        self.blocking = False
        self._pending_from: str | None = "0"
        self._retry_at = 0.0
        self._retry_backoff = Backoff(settings.retry_base_ms / 1000, settings.retry_max_ms / 1000)
        self._claim_start = "0-0"
        self._claim_at = 0.0
        self.expiry = ExpiryQueue()
        self._failing: set[str] = set()  # entries left pending to retry: logged once, not per try
        self._high_water = (0, 0)
        self._clock_offset_ms = 0
        self.metrics = Metrics()  # the worker shares it with its other roles

    def setup(self, start_id: str = "0") -> None:
        """Create the host's group at ``start_id`` if it is new (the worker opens the backend)."""
        if self.stream.ensure_group(start_id):
            logger.info(
                "created consumer group %s on %s at %s",
                self.stream.group,
                self.stream.keys.cmd,
                start_id,
            )
        self._high_water = stream_id_order(self.stream.last_delivered())
        self._sync_clock(self.stream.now_ms())
        self.rebuild_expiry()

    def rebuild_expiry(self) -> None:
        """Queue every timed rule the backend holds (after open or a reconcile)."""
        self.expiry.rebuild(self.backend.snapshot().values())

    def _sync_clock(self, redis_ms: int) -> None:
        self._clock_offset_ms = redis_ms - int(time.time() * 1000)

    def now_ms(self) -> int:
        """Redis's clock, estimated locally so expiry keeps working while Redis is away."""
        return int(time.time() * 1000) + self._clock_offset_ms

    def expire_due(self) -> int:
        """Remove the timed rules whose expiry has passed (see :mod:`pushfw.worker.expiry`)."""
        now = self.now_ms()
        due = self.expiry.pop_due(now, self.backend.get)
        if not due:
            return 0
        for rule in due:
            self.backend.delete(rule.key)
        error = self._commit_with_retry()
        if error is not None:
            logger.warning("could not remove %d expired rules (%s); will retry", len(due), error)
            self.expiry.retry(due, delay_ms=1000)
            return 0
        expiries = [r.expires_ms for r in due if r.expires_ms is not None]
        logger.info("expired %d rules (oldest %d ms late)", len(due), now - min(expiries))
        self.metrics.expired(expiries, self.now_ms())
        return len(due)

    def iteration(self) -> int:
        """Expire what is due, then read one batch (pending, claimed, new) and process it."""
        self.expire_due()
        boundary = self._high_water
        entries = self._next_entries()
        if entries:
            self._high_water = max(self._high_water, entries[-1].order)
            self.process(entries, boundary)
        return len(entries)

    def _next_entries(self) -> list[Entry]:
        count = self.settings.batch_size
        now = time.monotonic()
        if self._pending_from is None and self._retry_at and now >= self._retry_at:
            self._retry_at = 0.0
            self._pending_from = "0"
        if self._pending_from is not None:
            entries = self.stream.read(self._pending_from, count, None)
            self._pending_from = entries[-1].id if entries else None
            if entries:
                return entries
            if not self._retry_at:
                self._retry_backoff.reset()
        if now >= self._claim_at:
            self._claim_start, entries = self.stream.autoclaim(
                self.settings.claim_idle_ms, self._claim_start, count
            )
            if self._claim_start == "0-0":
                self._claim_at = now + max(1.0, self.settings.claim_idle_ms / 2000)
            if entries:
                logger.info(
                    "reclaimed %d idle entries of group %s", len(entries), self.stream.group
                )
                return entries
        return self._read_new(count)

    def _read_new(self, count: int) -> list[Entry]:
        block_ms = self.settings.block_ms
        if self._retry_at:
            block_ms = min(block_ms, int((self._retry_at - time.monotonic()) * 1000))
        next_expiry_ms = self.expiry.ms_until_next(self.now_ms())
        if next_expiry_ms is not None:
            block_ms = min(block_ms, next_expiry_ms)
        block_ms = max(1, block_ms)
        self.blocking = True
        try:
            if self.stopping:
                return []
            return self.stream.read(">", count, block_ms)
        finally:
            self.blocking = False

    def process(self, entries: list[Entry], boundary: tuple[int, int] = (0, 0)) -> None:
        """Decide, apply, report and acknowledge one batch.

        ``boundary`` is the newest entry this host had read before this batch: a command
        the ledger knows a newer command for, up to there, is superseded.
        """
        started = time.perf_counter()
        now_ms = self.stream.now_ms()
        self._sync_clock(now_ms)
        outcomes = [self._classify(entry, now_ms) for entry in entries]
        self._confirm_expiries(outcomes)
        changes = self._drop_superseded([o for o in outcomes if o.status is None], boundary)
        if changes:
            self._apply(changes)
        self._finish(outcomes)
        self.metrics.batch(outcomes, time.perf_counter() - started, self.now_ms())
        tally = Counter(o.status.value if o.status else "retry" for o in outcomes if not o.skip)
        logger.info(
            "batch of %d (%s..%s) in %.1f ms: %s",
            len(entries),
            entries[0].id,
            entries[-1].id,
            (time.perf_counter() - started) * 1000,
            ", ".join(f"{n} {s}" for s, n in sorted(tally.items())) or "none for this host",
        )

    def _classify(self, entry: Entry, now_ms: int) -> Outcome:
        """Everything decidable without the kernel: parse, target, protection, expiry."""
        if entry.fields is None:
            return Outcome(entry, Status.FAILED, "entry was trimmed before it was applied")
        try:
            cmd = self.parsed.parse(entry)
            unverified = self.signing.check(entry.fields, entry.ms, cmd)
        except CommandRejected as exc:
            request_id = entry.fields.get(b"request_id", b"")[:128].decode("utf-8", "replace")
            return Outcome(entry, Status.REJECTED, str(exc), request_id=request_id)
        out = Outcome(entry, None, request_id=cmd.request_id, command=cmd, unverified=unverified)
        out.key = RuleKey(cmd.action, cmd.network)
        if not cmd.targets(self.host, self.labels):
            # The newest command for this rule is meant for other hosts: ours must go.
            out.skip = True
            if self.backend.get(out.key) is None:
                out.status = Status.UNCHANGED
            return out
        if cmd.is_insert and cmd.action is Action.DROP:
            protected = self.protection.covering(cmd.network)
            if protected is not None:
                out.status = Status.REJECTED
                out.detail = f"ip: {cmd.network} overlaps protected network {protected}"
                return out
        expires_ms = entry.ms + cmd.ttl_s * 1000 if cmd.ttl_s else None
        if expires_ms is not None and expires_ms <= now_ms:
            out.status, out.detail = Status.EXPIRED, f"expired {now_ms - expires_ms} ms ago"
            return out
        if cmd.is_insert:
            out.change = Rule(out.key, expires_ms)
        return out

    def _confirm_expiries(self, outcomes: list[Outcome]) -> None:
        """Unsigned expiries count only where the ledger holds their own tombstone."""
        unsigned = [o for o in outcomes if o.unverified]
        keys = [str(o.key) for o in unsigned]
        records = self.ledger.records_for(keys) if keys and self.ledger is not None else {}
        for out in unsigned:
            verdict = confirm_expiry(out.entry.id, records.get(str(out.key)))
            if verdict is not None:
                out.status, out.detail = verdict
                out.change, out.skip = None, out.skip and verdict.status is Status.UNCHANGED

    def _drop_superseded(self, changes: list[Outcome], boundary: tuple[int, int]) -> list[Outcome]:
        """Skip commands overtaken by a newer one this host already read (late retries)."""
        # Only an entry this host had already read can have been overtaken by a newer one it
        # also read: entries fresh from '>' are all past the boundary and skip the lookup.
        older = [o for o in changes if o.entry.order <= boundary]
        if self.ledger is None or not older:
            return changes
        ids = list({str(o.key): None for o in older if o.key is not None})
        newest = self.ledger.newest_ids(ids)
        remaining = []
        for out in changes:
            newer = newest.get(str(out.key))
            if newer is not None and out.entry.order < stream_id_order(newer) <= boundary:
                out.status, out.detail = Status.UNCHANGED, f"superseded by newer command {newer}"
            else:
                remaining.append(out)
        return remaining

    def _apply(self, changes: list[Outcome]) -> None:
        self._stage(changes)
        error = self._commit_with_retry()
        if error is None:
            self._settled(changes)
            return
        retrying = all(o.entry.id in self._failing for o in changes)
        logger.log(
            logging.DEBUG if retrying else logging.WARNING,
            "batch of %d refused (%s); applying one by one",
            len(changes),
            error,
        )
        for out in changes:
            out.status, out.detail = None, ""
            self._stage([out])
            single_error = self._commit_with_retry()
            if single_error is None:
                self._settled([out])
            else:
                out.status, out.detail = None, str(single_error)
                out.permanent = isinstance(single_error, PermanentBackendError)

    def _stage(self, changes: list[Outcome]) -> None:
        """Stage against the index plus earlier changes of the same batch (last write wins)."""
        view: dict[RuleKey, Rule | None] = {}
        for out in changes:
            assert out.key is not None
            current = view[out.key] if out.key in view else self.backend.get(out.key)
            if out.change is not None:
                if current is not None and current.expires_ms == out.change.expires_ms:
                    out.status, out.detail = Status.UNCHANGED, "already present"
                    continue
                self.backend.add(out.change)
                view[out.key] = out.change
                out.detail = "inserted" if current is None else "renewed"
            else:
                if current is None:
                    out.status, out.detail = Status.UNCHANGED, "not present"
                    continue
                self.backend.delete(out.key)
                view[out.key] = None
                out.detail = "deleted"

    def _commit_with_retry(self) -> BackendError | None:
        backoff = Backoff(0.05, 0.5)
        for attempt in range(_QUICK_RETRIES):
            try:
                self.backend.commit()
                return None
            except TransientBackendError as exc:
                if attempt == _QUICK_RETRIES - 1:
                    return exc
                time.sleep(backoff.next_delay_s())
            except BackendError as exc:
                return exc
        return None

    def _settled(self, changes: list[Outcome]) -> None:
        for out in changes:
            if out.status is None:
                out.status = Status.APPLIED
                if out.change is not None:
                    self.expiry.push(out.change)

    def _finish(self, outcomes: list[Outcome]) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            for out in outcomes:
                logger.debug(
                    "%s %s: %s %s",
                    out.entry.id,
                    out.key or "-",
                    out.status.value if out.status else "retry",
                    out.detail,
                )
        failing = [o for o in outcomes if o.status is None]
        dead: list[dict[FieldT, EncodableT]] = []
        if failing:
            counts = self.stream.deliveries([o.entry.id for o in failing])
            for out in failing:
                delivered = counts.get(out.entry.id, 0)
                if out.permanent or delivered >= self.settings.max_deliveries:
                    dead.append(self._dead_letter(out, delivered))
                    out.status = Status.FAILED
                    out.detail = f"dead letter after {delivered} deliveries: {out.detail}"
            self._schedule_retry()
        self._failing.update(o.entry.id for o in outcomes if o.status is None)
        done = [o for o in outcomes if o.status is not None]
        self._failing.difference_update(o.entry.id for o in done)
        results = [self._result_fields(o) for o in done if not o.skip]
        self.stream.finish(
            [o.entry.id for o in done],
            results,
            dead,
            self.settings.results_maxlen,
            self.settings.dead_maxlen,
        )
        self.metrics.dead_letters.inc(len(dead))

    def _schedule_retry(self) -> None:
        if not self._retry_at:
            self._retry_at = time.monotonic() + self._retry_backoff.next_delay_s()

    def _result_fields(self, out: Outcome) -> dict[FieldT, EncodableT]:
        assert out.status is not None
        return {
            "cmd": out.entry.id,
            "request_id": out.request_id,
            "host": self.host,
            "status": out.status.value,
            "detail": out.detail,
        }

    def _dead_letter(self, out: Outcome, delivered: int) -> dict[FieldT, EncodableT]:
        fields: dict[FieldT, EncodableT] = {
            k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
            for k, v in (out.entry.fields or {}).items()
        }
        fields.update(
            {
                "cmd": out.entry.id,
                "error": out.detail or "failed",
                "deliveries": str(delivered),
                "host": self.host,
            }
        )
        logger.error("dead letter %s after %d deliveries: %s", out.entry.id, delivered, out.detail)
        return fields

    def reset_reads(self) -> None:
        """After a lost connection, re-read our pending entries before anything new."""
        self._pending_from = "0"

    def idle(self) -> bool:
        """Nothing of ours is pending or waiting for a retry."""
        return self._pending_from is None and not self._retry_at
